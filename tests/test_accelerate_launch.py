"""``accelerate launch`` with 2 CPU processes (gloo, DDP, gradient accumulation 2) and the agent attached
on every rank: the run's bank (as ``emascope export`` gives it) equals a float64 EMA of a
single-process reference trained on the whole batches, every rank counts the real optimizer steps,
and only rank 0 writes the run directory. The test checks behaviour only (what a user sees), so it
holds whichever way the bank is stored across ranks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate_worker import ACCUMULATION, DECAYS, LR, STEPS, batches, loss_of, make_model
from safetensors.torch import load_file

from emascope.export_cli import main as export_main

WORKER = Path(__file__).with_name("accelerate_worker.py")
JOB_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference() -> tuple[dict[float, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """One process, whole batches: the same optimizer steps in exact arithmetic; float64 EMAs."""
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    ema = {d: {k: v.detach().double().clone() for k, v in model.state_dict().items()} for d in DECAYS}
    parts = batches()
    for step in range(STEPS):
        micro = parts[step * ACCUMULATION:(step + 1) * ACCUMULATION]
        loss = sum(loss_of(model, *b) for b in micro) / ACCUMULATION
        opt.zero_grad()
        loss.backward()
        opt.step()
        for d in DECAYS:
            for k, v in model.state_dict().items():
                ema[d][k].mul_(d).add_(v.detach().double(), alpha=1 - d)
    return ema, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.distributed
def test_accelerate_launch_two_cpu_processes(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(WORKER), str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        out = ""
        pytest.fail(f"accelerate launch did not finish within {JOB_TIMEOUT_S} s")
    finally:
        try:  # the launcher and both workers die with the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out[-4000:]
    r0, r1 = (json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2))
    assert (r0["world"], r0["backend"], r0["distributed_type"]) == (2, "gloo", "DistributedType.MULTI_CPU")
    assert r0["current_step"] == r1["current_step"] == STEPS  # accumulation: one step per 2 micro-batches
    assert r0["is_writer"] and not r1["is_writer"]

    run_dir = tmp_path / "run"
    info = json.loads((run_dir / "run.json").read_text())
    hb = json.loads((run_dir / "heartbeat").read_text())
    assert info["pid"] == hb["pid"] == r0["pid"] and hb["state"] == "closed" and hb["step"] == STEPS
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events].count("start") == 1 and events[-1]["type"] == "close"
    assert not [e for e in events if e["type"] == "error"]
    assert [e["step"] for e in events if e["type"] == "score_done"] == [3, 6]

    ema, live = _reference()
    for decay in DECAYS:
        out_file = tmp_path / f"ema-{decay}.safetensors"
        assert export_main([str(run_dir), "--variant", str(decay), "--out", str(out_file)]) == 0
        got = load_file(str(out_file))
        assert set(got) == set(ema[decay])
        worst = max(float((got[k].double() - v).abs().max()) for k, v in ema[decay].items())
        print(f"decay {decay}: max |bank - single-process float64 EMA| = {worst:.2e}")
        assert worst <= 1e-6  # measured 6e-8: float32 rounding of the two gradient reductions
    assert export_main([str(run_dir), "--variant", "raw", "--out", str(tmp_path / "raw.safetensors")]) == 0
    raw = load_file(str(tmp_path / "raw.safetensors"))
    for k, v in live.items():
        torch.testing.assert_close(raw[k], v, rtol=0, atol=1e-6)
