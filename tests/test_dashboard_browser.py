"""One real browser session: `emascope dashboard RUN` as a subprocess, driven by Chromium via Playwright.

Checks that the charts render, that changing the metric changes the page, that records appended
to metrics.jsonl show up live, and that the export button leads to a checkpoint file. Saves a
screenshot to the test's tmp dir, or to $EMASCOPE_SCREENSHOT when set (how docs/dashboard.png is made). The "agent" side of the live export is a small thread that fulfils the request
exactly as docs/run-format.md specifies (request file in, checkpoint + status file out).
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

import numpy as np
import pytest
from dashboard_fixtures import make_run, metric_lines, write_jsonl

from agent.atomic import atomic_write_bytes, atomic_write_json

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


def _heartbeat(run: Path, step: int) -> None:
    atomic_write_json(
        run / "heartbeat",
        {"time": time.time(), "step": step, "pid": os.getpid(), "state": "running", "interval": 10.0},
    )


class ContractAgent(threading.Thread):
    """Keeps the heartbeat fresh and fulfils export requests as the run-format contract says."""

    def __init__(self, run: Path):
        super().__init__(daemon=True)
        self.run_dir, self.stop_flag, self.step = run, threading.Event(), 3000

    def run(self) -> None:
        from safetensors.numpy import save

        last_beat = 0.0
        while not self.stop_flag.is_set():
            if time.time() - last_beat > 5:
                _heartbeat(self.run_dir, self.step)
                last_beat = time.time()
            for req_path in sorted((self.run_dir / "requests").glob("*.json")):
                req = json.loads(req_path.read_text())
                out = self.run_dir / "exports" / f"{req['name']}.safetensors"
                atomic_write_bytes(
                    out,
                    save(
                        {"w": np.full((256, 256), float(req["variant"] != "raw"), np.float32)},
                        metadata={"variant": req["variant"]},
                    ),
                )
                atomic_write_json(
                    self.run_dir / "exports" / f"{req['id']}.status.json",
                    {
                        "id": req["id"],
                        "state": "done",
                        "variant": req["variant"],
                        "step": self.step,
                        "path": f"exports/{out.name}",
                        "bytes": out.stat().st_size,
                        "time": time.time(),
                        "error": None,
                    },
                )
                req_path.unlink()
            self.stop_flag.wait(0.3)


def _wait_text(page, text: str, timeout_ms: int) -> float:
    t0 = time.monotonic()
    page.get_by_text(text).first.wait_for(timeout=timeout_ms)
    return time.monotonic() - t0


def _choose(page, label: str, option: str) -> None:
    page.get_by_role("combobox", name=label).click()
    page.get_by_role("option", name=option).click()


def test_dashboard_in_a_real_browser(tmp_path):
    _require_browser()
    from playwright.sync_api import sync_playwright

    run = make_run(
        tmp_path,
        "tree2d-live",
        steps=(1000, 2000, 3000),
        metrics=("fid", "precision", "recall", "density", "coverage"),
    )
    (run / "requests").mkdir()
    agent = ContractAgent(run)
    _heartbeat(run, 3000)
    agent.start()
    port = _free_port()
    exe = shutil.which("emascope", path=str(Path(sys.executable).parent))
    cmd = ([exe] if exe else [sys.executable, "-m", "agent.cli"]) + [
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
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 1250})
            page.goto(url)
            page.wait_for_selector(".js-plotly-plot", timeout=45_000)
            _wait_text(page, "fid vs EMA decay", 15_000)
            assert page.get_by_text("At step 3,000, the best").count() >= 1

            # change the metric in the sidebar
            _choose(page, "Metric", "precision (↑)")
            _wait_text(page, "precision vs EMA decay", 15_000)
            assert page.get_by_text("the best precision").count() >= 1

            # new records appear live (the stage slider follows the newest stage)
            write_jsonl(
                run / "metrics.jsonl",
                metric_lines([4000], metrics=("fid", "precision", "recall", "density", "coverage")),
            )
            seen_after = _wait_text(page, "At step 4,000", 15_000)
            print(f"new stage visible {seen_after:.2f} s after the append")

            # export the recommended variant through the live agent
            page.get_by_role("tab", name="Export").click()
            page.get_by_role("button", name="Export (ask the live agent)").click()
            _wait_text(page, "Exported", 20_000)
            exported = list((run / "exports").glob("*.safetensors"))
            assert len(exported) == 1 and exported[0].stat().st_size > 256 * 256 * 4
            assert page.get_by_text(exported[0].name).count() >= 1

            # screenshot of the main view with the default metric
            _choose(page, "Metric", "fid (↓)")
            page.get_by_role("tab", name="Metric vs decay").click()
            _wait_text(page, "fid vs EMA decay", 15_000)
            page.wait_for_timeout(1500)
            shot = Path(os.environ.get("EMASCOPE_SCREENSHOT") or tmp_path / "dashboard.png")
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
            browser.close()
    finally:
        agent.stop_flag.set()
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
