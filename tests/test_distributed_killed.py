"""A rank killed mid-run (real torchrun, 2 gloo ranks, a sharded bank): torchrun stops the job, the run
directory stays readable (the last complete sharded snapshot, the metrics so far), ``emascope
export`` consolidates it offline, and the dashboard (the real Streamlit app) shows the run as stale
(stopped: no fresh heartbeat). Every process of the job is in its own process group, killed at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from streamlit.testing.v1 import AppTest

from emascope import runformat as rf
from emascope import shardfiles as SF
from emascope.dashboard.data import load_run
from emascope.export_cli import main as export_main

pytestmark = pytest.mark.distributed
TESTS = Path(__file__).resolve().parent
APP = str(TESTS.parent / "dashboard" / "app.py")


def test_a_killed_rank_leaves_a_readable_run_shown_as_stale(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "0",
           "--monitor-interval", "0.5", "--standalone", str(TESTS / "dist_killed_rank.py"),
           str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode != 0, out[-3000:]  # torchrun reports the failed rank
    assert "exitcode" in out and "17" in out, out[-3000:]
    # the run directory is readable: run.json, the stages scored before the kill, a complete snapshot set
    run = load_run(run_dir)
    assert run.info["settings"]["placement"] == "sharded"
    steps = sorted(run.metrics["step"].unique())
    assert steps and steps[0] == 4, steps
    snap = SF.open_snapshot(run_dir / rf.SNAPSHOT_INDEX)
    assert snap.world_size == 2 and snap.step >= 4
    out_file = tmp_path / "ema.safetensors"
    assert export_main([str(run_dir), "--variant", "0.99", "--out", str(out_file)]) == 0
    assert load_file(str(out_file))
    # the run stopped, and the dashboard says so. Either rank 0 saw the failure first (gloo reports the
    # dead peer: the training loop raised inside `with attach(...)`, an error event, the run closed
    # without a collective) or torchrun's SIGTERM came first (no close: the heartbeat goes stale).
    events = [json.loads(x) for x in (run_dir / rf.EVENTS).read_text().splitlines() if x.strip()]
    closed = "close" in [e.get("type") for e in events]
    if closed:
        failed = [e for e in events if e.get("type") == "error" and e.get("where") == "training"]
        assert failed, events[-5:]
        expected = "finished"
    else:
        beat = json.loads((run_dir / rf.HEARTBEAT).read_text())["time"]
        time.sleep(max(0.0, 3 * 0.3 + 0.5 - (time.time() - beat)))
        expected = "stale"
    assert run.state() == expected
    monkeypatch.setenv("EMASCOPE_DASHBOARD_PATH", str(run_dir.parent))
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    status = {m.label: m.value for m in at.metric}["Status"]
    assert status.endswith(expected) and "live" not in status, status
