"""``emascope demo``: runs to completion with the real dashboard child (no browser), reads back as a
finished run with 8 stages, leaves no process behind (also when interrupted), refuses a used run dir."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emascope.dashboard.data import load_run
from emascope.samples import demo

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes whose argv contains ``text`` (our run dir is unique)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def _assert_nothing_left(run_dir: Path, port: int) -> None:
    deadline = time.time() + 15
    while _processes_mentioning(str(run_dir)) and time.time() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(run_dir)) == []
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"


def _training_started(run_dir: Path) -> bool:
    """The heartbeat (rewritten every 2 s once attach finished) reports a step past 0."""
    try:
        return json.loads((run_dir / "heartbeat").read_text())["step"] >= 1
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _demo_cmd(run_dir: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "emascope.cli", "demo", "--no-browser", "--run-dir", str(run_dir),
            "--port", str(port), *extra]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process check reads /proc")
def test_demo_trains_with_the_dashboard_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "demo-run"
    port = demo.free_port(8620)
    proc = subprocess.run(_demo_cmd(run_dir, port, "--steps", "8", "--num-samples", "40", "--exit-when-done"),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"dashboard -> http://localhost:{port}" in out  # the demo saw the dashboard answer
    assert "8/8 steps" in out and "8 stages scored" in out
    assert f"emascope export {run_dir.resolve()} --variant" in out
    run = load_run(run_dir)
    assert run.error is None and run.state() == "finished"
    assert sorted(run.metrics["step"].unique()) == list(range(1, 9))
    assert {"fd", "precision", "recall", "coverage", "tail_coverage", "log_likelihood"} <= set(run.directions)
    _assert_nothing_left(run_dir.resolve(), port)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process check reads /proc")
def test_demo_interrupted_leaves_nothing_running(tmp_path):
    run_dir = tmp_path / "demo-int"
    port = demo.free_port(8640)
    # started the way a non-interactive shell's background job starts it: SIGINT ignored. The demo
    # restores the default handler, so Ctrl-C works all the same.
    proc = subprocess.Popen(_demo_cmd(run_dir, port, "--steps", "4000", "--num-samples", "40"), cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            # interrupt once the dashboard answers and training has taken steps (an interrupt while
            # attach is still starting undoes the start, by design: nothing would be left to read)
            if any("dashboard -> http" in x for x in lines) and _training_started(run_dir):
                break
        assert any("dashboard -> http" in x for x in lines), "".join(lines)
        proc.send_signal(signal.SIGINT)  # Ctrl-C on the demo process only
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted" in rest
    _assert_nothing_left(run_dir.resolve(), port)
    run = load_run(run_dir)  # what was written so far is a readable, closed run
    assert run.error is None and run.state() == "finished"


def test_demo_digits_without_dashboard(tmp_path, capsys):
    run_dir = tmp_path / "digits"
    assert demo.main(["--sample", "digits", "--no-dashboard", "--steps", "8", "--num-samples", "20",
                      "--run-dir", str(run_dir)]) == 0
    run = load_run(run_dir)
    assert run.error is None and run.info["sample_kind"] == "images"
    assert len(run.metrics["step"].unique()) == 8
    assert "isc_mean" in set(run.metrics["metric"])
    assert "emascope demo: done" in capsys.readouterr().err


def test_demo_refuses_a_used_run_dir_and_bad_arguments(tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "run.json").write_text("{}")
    assert demo.main(["--no-dashboard", "--run-dir", str(used)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    for bad in (["--steps", "0"], ["--sample", "mnist"], ["--port", "70000"], ["--num-samples", "1"]):
        with pytest.raises(SystemExit) as exc:
            demo.parse_args(bad)
        assert exc.value.code == 2


def test_stage_interval_gives_eight_stages():
    assert demo.stage_interval(2000) == 250
    assert demo.stage_interval(8) == 1
    assert demo.stage_interval(3) == 1
    assert [s for s in range(1, 2001) if s % demo.stage_interval(2000) == 0] == list(range(250, 2001, 250))
