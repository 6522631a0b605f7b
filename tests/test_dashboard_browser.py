"""One real browser session: `emascope dashboard RUN` as a subprocess, driven by Chromium via Playwright,
on a run written live by the real agent.

A tiny real training job (the 2-D denoiser of the agent tests, Adam) runs in a background thread
with ``agent.attach`` hooked to its optimizer and scoring every ``EVERY`` steps against a small
reference set (FD, KID, precision/recall, density/coverage through the real metric code). The test
checks that the charts render, that changing the metric changes the page, that a stage the agent
scores while the page is open shows up live, and that the export button is fulfilled by the agent's
own request poller: the checkpoint appears, loads into a fresh model and equals
``scope.bank.materialize(variant)`` at the step of the export. Saves a screenshot to the test's tmp
dir, or to $EMASCOPE_SCREENSHOT when set (to look at the page).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from scope_helpers import Denoiser, mixture, sampler, train_step

from emascope import attach

pytestmark = pytest.mark.browser
REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
EVERY = 200  # optimizer steps between scoring sweeps
DECAYS = (0.9, 0.99, 0.995, 0.998, 0.999, 0.9999)
WAIT_S = 60.0  # longest the test waits for the training thread at any one point


def _require_browser():
    missing = None
    if not os.path.exists(CHROMIUM):
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "playwright for Python is not installed"
    if missing:
        if os.environ.get("EMASCOPE_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveTraining(threading.Thread):
    """A real training loop with the real agent attached; the test paces it with events.

    1. trains to ``3 * EVERY`` steps (the agent scores at EVERY, 2*EVERY, 3*EVERY), then waits;
    2. on ``go_stage`` trains to ``4 * EVERY`` (one more stage, scored while the page is open), waits;
    3. on ``go_export`` keeps training, slowly, until the agent has fulfilled an export request (the
       poller runs inside ``optimizer.step``), then stops stepping so the bank stays at the export's
       step, and waits for ``finish`` before ``close``.
    Each wait is bounded, so a failing test never leaves the thread hanging.
    """

    def __init__(self, run_dir: Path) -> None:
        super().__init__(daemon=True, name="live-training")
        self.run_dir = run_dir
        self.at_stage3, self.at_stage4, self.frozen = threading.Event(), threading.Event(), threading.Event()
        self.go_stage, self.go_export, self.finish = threading.Event(), threading.Event(), threading.Event()
        self.scope = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._train()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            for ev in (self.at_stage3, self.at_stage4, self.frozen):
                ev.set()

    def _train(self) -> None:
        torch.manual_seed(0)
        model = Denoiser()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        data, reference = mixture(4000, seed=1), mixture(500, seed=2)
        g = torch.Generator().manual_seed(0)
        with attach(model, opt, run_dir=self.run_dir, sampler=sampler, reference=reference,
                    score_every=EVERY, num_samples=250, batch_size=250, decays=DECAYS,
                    request_interval=0.2, score_at_close=False, score_busy="wait") as scope:
            self.scope = scope  # background sweeps (the default); "wait": none of the stages is skipped
            while scope.current_step < 3 * EVERY:
                train_step(model, opt, data, g)
            scope.wait()
            self.at_stage3.set()
            if not self.go_stage.wait(WAIT_S):
                return
            while scope.current_step < 4 * EVERY:
                train_step(model, opt, data, g)
            scope.wait()
            self.at_stage4.set()
            if not self.go_export.wait(WAIT_S):
                return
            deadline = time.monotonic() + WAIT_S
            while not list((self.run_dir / "exports").glob("*.status.json")):
                if time.monotonic() > deadline:
                    return
                train_step(model, opt, data, g)
                time.sleep(0.02)  # a slow job: step boundaries keep coming, the page gets CPU
            self.frozen.set()
            self.finish.wait(WAIT_S)

    def wait(self, event: threading.Event, what: str) -> None:
        assert event.wait(WAIT_S), f"training thread did not reach: {what}"
        if self.error is not None:
            raise AssertionError(f"training thread failed before: {what}") from self.error


def _wait_text(page, text: str, timeout_ms: int) -> float:
    t0 = time.monotonic()
    page.get_by_text(text).first.wait_for(timeout=timeout_ms)
    return time.monotonic() - t0


def _choose(page, label: str, option: str) -> None:
    page.get_by_role("combobox", name=label).click()
    page.get_by_role("option", name=option).click()


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _stages(run: Path) -> set[int]:
    return {r["step"] for r in _records(run)}


def test_dashboard_in_a_real_browser(tmp_path):
    _require_browser()
    from playwright.sync_api import sync_playwright
    from safetensors.torch import load_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: training, Streamlit and Chromium run side by side
    run = tmp_path / "denoiser-live"
    trainer = LiveTraining(run)
    trainer.start()
    deadline = time.monotonic() + WAIT_S
    while not (run / "run.json").exists():  # attach() has created the run; the server boots meanwhile
        assert trainer.error is None and time.monotonic() < deadline, f"attach failed: {trainer.error!r}"
        time.sleep(0.05)
    port = _free_port()
    exe = shutil.which("emascope", path=str(Path(sys.executable).parent))
    cmd = ([exe] if exe else [sys.executable, "-m", "emascope.cli"]) + [
        "dashboard",
        str(run),
        "--no-browser",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        url = None
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and url is None:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                break
            if line.startswith("emascope dashboard:"):
                url = line.rsplit(" ", 1)[-1].strip()
        assert url == f"http://localhost:{port}", f"server did not come up (url={url!r})"
        trainer.wait(trainer.at_stage3, f"the third stage (step {3 * EVERY})")
        assert _stages(run) == {EVERY, 2 * EVERY, 3 * EVERY}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 1250})
            page.goto(url)
            page.wait_for_selector(".js-plotly-plot", timeout=45_000)
            _wait_text(page, "fd vs EMA decay", 15_000)  # identity features on 2-D points: fd, not fid
            assert page.get_by_text(f"At step {3 * EVERY}, the best").count() >= 1
            assert page.get_by_text("live · heartbeat").count() >= 1  # the agent's heartbeat is fresh

            # change the metric in the sidebar
            _choose(page, "Metric", "precision (↑)")
            _wait_text(page, "precision vs EMA decay", 15_000)
            assert page.get_by_text("the best precision").count() >= 1

            # the agent scores a new stage while the page is open; it appears live
            trainer.go_stage.set()
            _wait_text(page, f"At step {4 * EVERY}, the best precision", 30_000)
            seen = time.time()
            trainer.wait(trainer.at_stage4, f"the fourth stage (step {4 * EVERY})")
            new = [r for r in _records(run) if r["step"] == 4 * EVERY and r["metric"] == "precision"]
            assert len(new) == 1 + len(DECAYS)  # raw and every decay, scored by the agent
            first = min(r["time"] for r in new)
            print(f"new stage visible {seen - first:.2f} s after the agent wrote its first precision record")

            # export the recommended variant: the request is fulfilled by the agent's own poller
            trainer.go_export.set()
            page.get_by_role("tab", name="Export").click()
            page.get_by_role("button", name="Export (ask the live agent)").click()
            trainer.wait(trainer.frozen, "an export request fulfilled by the agent")
            _wait_text(page, "Exported", 20_000)
            statuses = list((run / "exports").glob("*.status.json"))
            assert len(statuses) == 1
            status = json.loads(statuses[0].read_text())
            assert status["state"] == "done" and status["error"] is None, status
            scope = trainer.scope
            assert status["step"] == scope.current_step > 4 * EVERY  # exported at a later step boundary
            exported = list((run / "exports").glob("*.safetensors"))
            assert [f"exports/{p.name}" for p in exported] == [status["path"]]
            assert exported[0].stat().st_size == status["bytes"]
            assert page.get_by_text(exported[0].name).count() >= 1
            assert not list((run / "requests").glob("*.json"))  # the request was consumed
            # the checkpoint loads into a fresh model and is exactly the bank's variant at that step
            variant = status["variant"]
            assert variant in scope.bank.variants
            fresh = Denoiser()
            fresh.load_state_dict(load_file(exported[0]))
            want = scope.bank.materialize(variant)
            got = fresh.state_dict()
            assert set(got) == set(want)
            assert all(torch.equal(got[k], want[k]) for k in want)
            if variant != "raw":  # an average, not the live weights
                live = scope.model.state_dict()
                assert any(not torch.equal(got[k], live[k]) for k in want)

            # screenshot of the main view with the default metric
            _choose(page, "Metric", "fd (↓)")
            page.get_by_role("tab", name="Metric vs decay").click()
            _wait_text(page, "fd vs EMA decay", 15_000)
            page.wait_for_timeout(1500)
            shot = Path(os.environ.get("EMASCOPE_SCREENSHOT") or tmp_path / "dashboard.png")
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
            browser.close()
    finally:
        torch.set_num_threads(threads)
        trainer.finish.set()
        trainer.go_stage.set()
        trainer.go_export.set()
        trainer.join(timeout=60)
        server.terminate()  # the launcher forwards SIGTERM to the Streamlit server
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        time.sleep(1)
        try:  # nothing of ours may be left running
            os.killpg(server.pid, 0)
            leftover = True
        except ProcessLookupError:
            leftover = False
        if leftover:
            os.killpg(server.pid, signal.SIGKILL)
        assert not leftover, "the Streamlit server outlived `emascope dashboard`"
    assert not trainer.is_alive(), "the training thread did not finish"
    assert trainer.error is None, trainer.error
    # the agent closed the run: final heartbeat and close event, no error recorded anywhere
    assert json.loads((run / "heartbeat").read_text())["state"] == "closed"
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e for e in events if e["type"] == "error"] == []
    assert events[-1]["type"] == "close"
    assert [e["ok"] for e in events if e["type"] == "export"] == [True]
