"""``emascope demo``: train a sample model live with the agent attached and watch it in the dashboard.

```bash
emascope demo                       # tree2d, ~2000 steps, 8 stages, opens the browser
emascope demo --sample digits --no-browser
emascope demo --steps 400 --no-dashboard --run-dir /tmp/demo
```

What happens: a fresh run directory is created (default ``./emascope-demo/<sample>-<time>``), the
dashboard (``emascope dashboard RUN_DIR``, i.e. :mod:`emascope.dashboard.launch`) is started on it as a child
process, and the sample trains in this process with a progress bar in the terminal; every
``steps / 8`` optimizer steps the agent scores every EMA decay and the dashboard shows the new
stage. When training ends the dashboard keeps running until Ctrl-C (``--exit-when-done`` stops it
instead). The dashboard child is always stopped on exit: nothing is left running, also when the
demo is killed with SIGKILL (see :mod:`emascope.procs`).

The demo is a shorter version of the shipped runs (fewer steps and samples, so it finishes in a
few minutes on a laptop CPU); ``python -m emascope.samples.tree2d`` / ``emascope.samples.digits`` are the
full-size scripts.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import webbrowser
from collections.abc import Sequence
from pathlib import Path

from emascope import runformat as rf
from emascope.procs import child_env, die_with_parent_preexec, restore_sigint

SAMPLES = ("tree2d", "digits")
DEFAULT_STEPS = {"tree2d": 2000, "digits": 1200}
DEFAULT_SAMPLES = {"tree2d": 2000, "digits": 500}
NUM_STAGES = 8


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="emascope demo", description="Train a sample model live with emascope "
                                "attached and open the dashboard on it.")
    p.add_argument("--sample", choices=SAMPLES, default="tree2d", help="sample to train (default tree2d)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps (default {DEFAULT_STEPS['tree2d']} for tree2d, "
                        f"{DEFAULT_STEPS['digits']} for digits); scored at {NUM_STAGES} evenly spaced stages")
    p.add_argument("--num-samples", type=int, default=None,
                   help=f"samples per decay per stage (default {DEFAULT_SAMPLES['tree2d']} for tree2d, "
                        f"{DEFAULT_SAMPLES['digits']} for digits)")
    p.add_argument("--run-dir", default=None,
                   help="fresh run directory to write (default ./emascope-demo/<sample>-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--no-browser", action="store_true", help="start the dashboard but do not open a browser")
    p.add_argument("--no-dashboard", action="store_true", help="train only, do not start the dashboard")
    p.add_argument("--exit-when-done", action="store_true",
                   help="stop the dashboard and exit when training ends (default: keep it until Ctrl-C)")
    p.add_argument("--port", type=int, default=None, help="dashboard port (default: first free from 8501)")
    args = p.parse_args(list(argv))
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.sample]
    if args.num_samples is None:
        args.num_samples = DEFAULT_SAMPLES[args.sample]
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.num_samples < 10:
        p.error(f"--num-samples must be >= 10, got {args.num_samples}")
    if args.port is not None and not 1 <= args.port <= 65535:
        p.error(f"--port must be in 1..65535, got {args.port}")
    return args


def stage_interval(steps: int, stages: int = NUM_STAGES) -> int:
    """Steps between scoring stages so that ``steps`` holds ``stages`` of them (the last at ``steps``
    when ``steps`` is a multiple of ``stages``; otherwise the agent scores once more at the end)."""
    return max(1, steps // stages)


def free_port(start: int = 8501, tries: int = 100) -> int:
    """The first port from ``start`` that can be bound on 127.0.0.1."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{start + tries - 1}; pass --port")


def default_run_dir(sample: str) -> Path:
    return Path("emascope-demo") / f"{sample}-{time.strftime('%Y%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------------------------
# progress bar


def _scoring_state(run_dir: Path) -> tuple[int, bool]:
    """(stages scored, a sweep in progress) from ``events.jsonl`` (torn last lines are skipped)."""
    done, busy = 0, False
    try:
        with open(run_dir / rf.EVENTS, encoding="utf-8") as f:
            for line in f:
                try:
                    kind = json.loads(line).get("type")
                except ValueError:
                    continue
                if kind == "score_start":
                    busy = True
                elif kind == "score_done":
                    done, busy = done + 1, False
    except OSError:
        pass
    return done, busy


class ProgressBar:
    """Redraws ``[####----] step/total  stages  elapsed`` on stderr twice a second from a thread.

    On a terminal it rewrites one line; otherwise it prints a line every 10% (logs stay short).
    """

    def __init__(self, total: int, run_dir: Path, stream=None) -> None:
        self.total, self.run_dir = total, run_dir
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.step = 0
        self.t0 = time.time()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last_decile = -1
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __call__(self, step: int, total: int) -> None:
        self.step = step

    def start(self) -> ProgressBar:
        self._thread.start()
        return self

    def line(self) -> str:
        done, busy = _scoring_state(self.run_dir)
        frac = min(1.0, self.step / self.total)
        bar = "#" * int(frac * 30) + "-" * (30 - int(frac * 30))
        el = int(time.time() - self.t0)
        state = "  scoring..." if busy else ""
        return (f"[{bar}] {self.step}/{self.total} steps  {done} stages scored  "
                f"{el // 60:02d}:{el % 60:02d}{state}")

    def say(self, text: str) -> None:
        """Print a message above the bar."""
        with self._lock:
            if self.tty:
                self.stream.write("\r\033[K")
            self.stream.write(text + "\n")
            self.stream.flush()

    def _draw(self, final: bool = False) -> None:
        with self._lock:
            if self.tty:
                self.stream.write("\r\033[K" + self.line() + ("\n" if final else ""))
            else:
                decile = int(10 * self.step / self.total)
                if decile == self._last_decile and not final:
                    return
                self._last_decile = decile
                self.stream.write(self.line() + "\n")
            self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._draw()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._draw(final=True)


# ----------------------------------------------------------------------------------------------
# the dashboard child process


class Dashboard:
    """``python -m emascope.dashboard.launch RUN_DIR --no-browser --port P`` as a child process; its output
    goes to a log file (printed if it fails). ``stop()`` terminates it and waits."""

    def __init__(self, run_dir: Path, port: int, open_browser: bool, say) -> None:
        from emascope.dashboard.launch import probe_url, url_for

        self.port, self.open_browser, self.say = port, open_browser, say
        self.url = url_for("127.0.0.1", port)
        self._probe = probe_url("127.0.0.1", port)
        self.log = tempfile.NamedTemporaryFile(prefix="emascope-demo-dashboard-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "emascope.dashboard.launch", str(run_dir), "--port", str(port), "--no-browser"]
        # dies with this process, even when it is SIGKILLed: a parent-death signal on Linux, and the
        # child polls its parent (EMASCOPE_PARENT_PID) everywhere
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=child_env(), preexec_fn=die_with_parent_preexec())
        self.up = threading.Event()
        self._thread = threading.Thread(target=self._wait_up, daemon=True)
        self._thread.start()

    def _wait_up(self) -> None:
        from emascope.dashboard.launch import wait_until_up

        if wait_until_up(self._probe, self.proc, timeout=120.0):
            self.up.set()
            self.say(f"emascope demo: dashboard -> {self.url}")
            if self.open_browser:
                webbrowser.open(self.url)
        elif self.proc.poll() is not None:
            self.say(f"emascope demo: the dashboard exited (code {self.proc.returncode}); "
                     f"log: {self.log.name}\n"
                     + self.log_tail())

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_up(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return self.up.is_set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # emascope.dashboard.launch forwards it to the Streamlit server
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if self.up.is_set():
            Path(self.log.name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# main


def train_sample(sample: str, run_dir: Path, steps: int, num_samples: int, progress) -> None:
    """Train the demo-sized version of ``sample`` into ``run_dir``."""
    every = stage_interval(steps)
    if sample == "tree2d":
        from emascope.samples.tree2d import Tree2DConfig
        from emascope.samples.tree2d import train as train_tree2d

        cfg = Tree2DConfig(steps=steps, score_every=every, num_samples=num_samples,
                           reference_size=num_samples)
        train_tree2d(run_dir, cfg, progress=progress, name=f"demo-{sample}", score_at_close=False)
    else:
        from emascope.samples.digits import SHIPPED_CLASSIFIER, DigitsConfig
        from emascope.samples.digits import train as train_digits

        classifier = SHIPPED_CLASSIFIER if SHIPPED_CLASSIFIER.is_file() else run_dir.parent / "digits_cnn.pt"
        cfg = DigitsConfig(steps=steps, score_every=every, num_samples=num_samples)
        train_digits(run_dir, cfg, classifier=classifier, progress=progress, name=f"demo-{sample}",
                     score_at_close=False)


def summary(run_dir: Path) -> tuple[str, str | None]:
    """(text, variant): the best decay per ranked metric at the first and the last stage, read back
    from the run directory with the dashboard's data layer, and the FD/FID-best variant at the end."""
    from emascope.dashboard.data import load_run
    from emascope.dashboard.ranking import best_per_stage

    run = load_run(run_dir)
    lines, pick = [], None
    for metric in ("fd", "fid", "precision", "recall", "coverage", "tail_coverage", "isc_mean"):
        best = best_per_stage(run.metrics, metric, run.directions.get(metric))
        if len(best):
            first, last = best.iloc[0], best.iloc[-1]
            lines.append(f"  {metric:>13}: best {first['variant']} at step {int(first['step'])}, "
                         f"{last['variant']} at step {int(last['step'])}")
            if metric in ("fd", "fid") and pick is None:
                pick = str(last["variant"])
    return "\n".join(lines), pick


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``emascope demo``; returns the exit code."""
    restore_sigint()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.sample)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        print(f"emascope demo: --run-dir {str(run_dir)!r} exists and is not an empty directory; "
              "the demo writes a fresh run", file=sys.stderr)
        return 2
    port = None
    if not args.no_dashboard:  # a taken --port is refused before anything is written or trained
        from emascope.dashboard.launch import PortError, choose_port

        try:
            port = choose_port("127.0.0.1", args.port)
        except PortError as exc:
            print(f"emascope demo: {exc}", file=sys.stderr)
            return 2
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"emascope demo: cannot create --run-dir {str(run_dir)!r}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    run_dir = run_dir.resolve()
    bar = ProgressBar(args.steps, run_dir)
    bar.say(f"emascope demo: training {args.sample} for {args.steps} steps, "
            f"{NUM_STAGES} scoring stages -> {run_dir}")
    dash: Dashboard | None = None
    try:
        if port is not None:
            dash = Dashboard(run_dir, port, open_browser=not args.no_browser, say=bar.say)
        bar.start()
        try:
            train_sample(args.sample, run_dir, args.steps, args.num_samples, bar)
        finally:
            bar.stop()
        text, pick = summary(run_dir)
        bar.say(f"emascope demo: done -> {run_dir}\n{text}")
        if pick is not None:
            bar.say(f"export it: emascope export {run_dir} --variant {pick}")
        if dash is not None:
            if args.exit_when_done:
                if not dash.wait_up(timeout=120.0):
                    print("emascope demo: the dashboard did not come up", file=sys.stderr)
                    return 1
            elif dash.proc.poll() is not None:
                print(f"emascope demo: the dashboard is not running (exit code {dash.proc.returncode}); "
                      f"log: {dash.log.name}", file=sys.stderr)
                return 1
            else:
                bar.say(f"emascope demo: the dashboard keeps running at {dash.url}; Ctrl-C to stop")
                dash.proc.wait()
        return 0
    except KeyboardInterrupt:
        print("\nemascope demo: interrupted", file=sys.stderr)
        return 130
    finally:
        if dash is not None:
            dash.stop()
