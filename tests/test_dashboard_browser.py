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

The machine may be loaded (2 shared cores, other test suites beside this one): every wait is bounded
but generous, and every click goes through :func:`_click`, which scrolls the element into view and
retries a click Playwright refused (the element was moving, or a re-rendering chart lay over it)
until its deadline. A retry never repeats a click that reached the page: Playwright raises only
before it dispatches the click, and the waits after a click check its effect, not a time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
WAIT_S = 300.0  # longest the test waits for the training thread at any one point...
STALL_S = 90.0  # ...and for the thread to make progress (a step, a record) while it waits
IDLE_S = 600.0  # longest the training thread waits for the test (the test always releases it at the end)
CLICK_S = 90.0  # longest one click is retried while the page moves under it
TEXT_MS = 60_000  # longest the test waits for a text the page is about to show


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
            if not self.go_stage.wait(IDLE_S):
                return
            while scope.current_step < 4 * EVERY:
                train_step(model, opt, data, g)
            scope.wait()
            self.at_stage4.set()
            if not self.go_export.wait(IDLE_S):
                return
            deadline = time.monotonic() + IDLE_S
            while not list((self.run_dir / "exports").glob("*.status.json")):
                if time.monotonic() > deadline:
                    return
                train_step(model, opt, data, g)
                time.sleep(0.02)  # a slow job: step boundaries keep coming, the page gets CPU
            self.frozen.set()
            self.finish.wait(IDLE_S)

    def progress(self) -> tuple[int, int]:
        """(optimizer step, bytes of metrics.jsonl): changes while the job trains or scores."""
        scope = self.scope
        try:
            size = (self.run_dir / "metrics.jsonl").stat().st_size
        except OSError:
            size = -1
        return (scope.current_step if scope is not None else -1), size

    def wait(self, event: threading.Event, what: str) -> None:
        """Wait for ``event``: a slow (loaded) machine gets time as long as the job makes progress,
        a stalled job fails after STALL_S, and no wait is longer than WAIT_S."""
        start = since = time.monotonic()
        last = self.progress()
        while not event.wait(0.5):
            now, seen = time.monotonic(), self.progress()
            if seen != last:
                last, since = seen, now
            assert now - since < STALL_S and now - start < WAIT_S, (
                f"training thread did not reach: {what} (step {last[0]}, {last[1]} bytes of metrics; "
                f"{now - start:.0f} s waited, {now - since:.0f} s without progress)")
        if self.error is not None:
            raise AssertionError(f"training thread failed before: {what}") from self.error


def _wait_text(page, text: str, timeout_ms: int = TEXT_MS) -> float:
    t0 = time.monotonic()
    page.get_by_text(text).first.wait_for(timeout=timeout_ms)
    return time.monotonic() - t0


def _wait_until(check, what: str, timeout_s: float) -> bool:
    """Poll ``check()`` until it is true or ``timeout_s`` passed; returns the last answer."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _click(locator, what: str, timeout_s: float = CLICK_S) -> None:
    """Click ``locator`` as a user would, under load. Each try is one Playwright click: it finds the
    element again whenever a rerun replaced it, waits until it is visible, stable (the same box two
    animation frames running) and enabled, scrolls it into view and checks that it, not another
    element such as a re-rendering chart, receives the click at its centre. A try that times out
    (the page kept moving or re-mounting the element) is followed by another until ``timeout_s``;
    then the test fails with every reason seen and a screenshot. A click is never forced, and never
    repeated once dispatched (Playwright raises only before it dispatches)."""
    from playwright.sync_api import Error as PlaywrightError

    deadline = time.monotonic() + timeout_s
    tries, last, reasons = 0, "", []
    while True:
        left_ms = (deadline - time.monotonic()) * 1000
        if left_ms <= 0:
            shot = Path(tempfile.gettempdir()) / f"emascope-browser-click-failed-{os.getpid()}.png"
            try:
                locator.page.screenshot(path=str(shot), full_page=True)
                found = f"{locator.count()} match(es), first visible: {locator.first.is_visible()}"
            except PlaywrightError as exc:
                found = f"no screenshot: {exc}"
            raise AssertionError(f"could not click {what} in {timeout_s:.0f} s ({tries} tries; {found}; "
                                 f"page saved to {shot}): " + " | ".join(dict.fromkeys(reasons)))
        tries += 1
        target = locator.first
        try:
            target.click(timeout=max(1.0, min(left_ms, 15_000)))
            if tries > 1:  # shown with -s: how often the page moved under a click
                print(f"clicked {what} at try {tries} (before: {last})")
            return
        except PlaywrightError as exc:  # TimeoutError included: not clicked, try again
            lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
            last = " / ".join(lines[:1] + lines[-2:]) if lines else type(exc).__name__
            reasons.append(last)
            time.sleep(0.5)


def _select_tab(page, name: str, timeout_s: float = CLICK_S) -> None:
    """Open the tab ``name`` and check it is the selected one (a rerun that lands on the click may
    swallow it: clicking an open tab again is harmless, so it is clicked until it is selected)."""
    tab = page.get_by_role("tab", name=name, exact=True)
    deadline = time.monotonic() + timeout_s
    while tab.first.get_attribute("aria-selected") != "true":
        assert time.monotonic() < deadline, f"the tab {name!r} did not open in {timeout_s:.0f} s"
        _click(tab, f"the tab {name!r}", max(1.0, deadline - time.monotonic()))
        _wait_until(lambda: tab.first.get_attribute("aria-selected") == "true", name, 5.0)


def _set_toggle(page, label: str, on: bool, timeout_s: float = CLICK_S) -> None:
    """Set the switch ``label`` to ``on`` by clicking its label, checking its state after each click."""
    switch = page.get_by_role("switch", name=label, exact=True)
    deadline = time.monotonic() + timeout_s
    while switch.is_checked() != on:
        assert time.monotonic() < deadline, f"the switch {label!r} did not turn {'on' if on else 'off'}"
        _click(page.get_by_text(label, exact=True), f"the switch {label!r}", max(1.0, deadline - time.monotonic()))
        _wait_until(lambda: switch.is_checked() == on, label, 5.0)


def _choose(page, label: str, option: str, timeout_s: float = CLICK_S) -> None:
    """Pick ``option`` in the select box ``label``; reopens the list if a rerun closed it meanwhile."""
    from playwright.sync_api import Error as PlaywrightError

    box = page.get_by_role("combobox", name=label)
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        _click(box, f"the select box {label!r}", max(1.0, deadline - time.monotonic()))
        item = page.get_by_role("option", name=option)
        try:
            item.first.wait_for(state="visible", timeout=10_000)
        except PlaywrightError as exc:  # the list closed (or never opened): open it again
            last = str(exc).strip().splitlines()[0]
            continue
        try:
            _click(item, f"the option {option!r}", min(15.0, max(1.0, deadline - time.monotonic())))
            return
        except AssertionError as exc:
            last = str(exc)
    raise AssertionError(f"could not choose {option!r} in {label!r} in {timeout_s:.0f} s: {last}")


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
    output: list[str] = []  # the server's output, read all along (a full pipe would stall the server)
    reader = threading.Thread(target=lambda: output.extend(server.stdout), daemon=True, name="server-output")
    reader.start()
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline and (reader.is_alive() or server.poll() is None):
            url = next((x.rsplit(" ", 1)[-1].strip() for x in list(output) if x.startswith("emascope dashboard:")),
                       None)
            time.sleep(0.1)
        assert url == f"http://localhost:{port}", f"server did not come up (url={url!r}): {''.join(output[-20:])}"
        trainer.wait(trainer.at_stage3, f"the third stage (step {3 * EVERY})")
        assert _stages(run) == {EVERY, 2 * EVERY, 3 * EVERY}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 1250})
            page.set_default_timeout(TEXT_MS)  # a bound for any wait not given its own
            page.goto(url, timeout=90_000)
            page.wait_for_selector(".js-plotly-plot", timeout=90_000)
            _wait_text(page, "fd vs EMA decay")  # identity features on 2-D points: fd, not fid
            assert page.get_by_text(f"At step {3 * EVERY}, the best").count() >= 1
            assert page.get_by_text("live · heartbeat").count() >= 1  # the agent's heartbeat is fresh

            # change the metric in the sidebar
            _choose(page, "Metric", "precision (↑)")
            _wait_text(page, "precision vs EMA decay")
            assert page.get_by_text("the best precision").count() >= 1

            # the agent scores a new stage while the page is open; it appears live
            trainer.go_stage.set()
            _wait_text(page, f"At step {4 * EVERY}, the best precision", 120_000)
            seen = time.time()
            trainer.wait(trainer.at_stage4, f"the fourth stage (step {4 * EVERY})")
            new = [r for r in _records(run) if r["step"] == 4 * EVERY and r["metric"] == "precision"]
            assert len(new) == 1 + len(DECAYS)  # raw and every decay, scored by the agent
            first = min(r["time"] for r in new)
            print(f"new stage visible {seen - first:.2f} s after the agent wrote its first precision record")

            # export the recommended variant: the request is fulfilled by the agent's own poller.
            # A live page reruns on every heartbeat (2 s) and its layout moves (charts re-render,
            # widgets re-mount): pause live updates to reach the button, resume them to see the
            # agent's answer arrive live
            _set_toggle(page, "Pause live updates", True)
            _select_tab(page, "Export")
            trainer.go_export.set()  # the job trains on; the request is handled at a step boundary
            _click(page.get_by_role("button", name="Export (ask the live agent)"), "the Export button")
            _wait_text(page, "Waiting for the agent")
            _set_toggle(page, "Pause live updates", False)
            trainer.wait(trainer.frozen, "an export request fulfilled by the agent")
            _wait_text(page, "Exported")
            statuses = list((run / "exports").glob("*.status.json"))
            assert len(statuses) == 1
            status = json.loads(statuses[0].read_text())
            assert status["state"] == "done" and status["error"] is None, status
            scope = trainer.scope
            assert status["step"] == scope.current_step > 4 * EVERY  # exported at a later step boundary
            exported = list((run / "exports").glob("*.safetensors"))
            assert [f"exports/{p.name}" for p in exported] == [status["path"]]
            assert exported[0].stat().st_size == status["bytes"]
            _wait_text(page, exported[0].name)  # listed in the page (drawn just after the message)
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
            _select_tab(page, "Metric vs decay")
            _wait_text(page, "fd vs EMA decay")
            page.wait_for_timeout(1500)
            shot = Path(os.environ.get("EMASCOPE_SCREENSHOT") or tmp_path / "dashboard.png")
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
            browser.close()
    finally:
        print("the server's output (last 40 lines):\n" + "".join(output[-40:]))  # shown when the test fails
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
