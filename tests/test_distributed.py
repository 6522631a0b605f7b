"""attach() under real torch.distributed: 2 CPU processes, gloo, a DDP-wrapped model, scoring on.

Only rank 0 writes the run directory; rank 1 must neither write nor hang (the whole job runs
under a timeout, and the process group's own timeout is short so a deadlock surfaces as an
error). Rank 1 keeps an independent EMABank of its own DDP replica: DDP keeps the weights equal,
so rank 0's bank must equal it exactly. FSDP2 (``fully_shard``) is refused with NotImplementedError.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dist_workers import STEPS, ddp_worker

JOB_TIMEOUT_S = 240


def _run(tmp_path: Path, attach_on: str) -> list[dict]:
    ctx = mp.spawn(ddp_worker, args=(2, str(tmp_path), attach_on), nprocs=2, join=False)
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=JOB_TIMEOUT_S)
    while not ctx.join(timeout=5):
        if datetime.datetime.now() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed job did not finish within {JOB_TIMEOUT_S} s (deadlock?)")
    results = [torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(2)]
    for r in results:
        assert "error" not in r, r["error"]
    return results


@pytest.mark.parametrize("attach_on", ["all", "rank0"])
def test_ddp_two_ranks_only_rank0_writes_no_hang(tmp_path, attach_on):
    r0, r1 = _run(tmp_path, attach_on)
    run_dir = tmp_path / "run"
    # DDP kept the replicas equal, and rank 0's bank equals rank 1's independent bank bit for bit
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k
    assert torch.equal(r0["own_bank"], r1["own_bank"])
    assert torch.equal(r0["scope_bank"], r1["own_bank"]) and r0["scope_step"] == STEPS
    assert r0["is_writer"] and r0["score_now"] and r0["export"] and not r0["bank_is_none"]
    if attach_on == "all":
        assert r1["is_writer"] is False and r1["bank_is_none"] and r1["current_step"] == STEPS
        assert not r1["score_now"] and not r1["export"]
    # only rank 0 wrote: one start/close, its pid in run.json and the heartbeat
    info = json.loads((run_dir / "run.json").read_text())
    hb = json.loads((run_dir / "heartbeat").read_text())
    assert info["pid"] == hb["pid"] == r0["pid"] and hb["state"] == "closed"
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events].count("start") == 1 and events[-1]["type"] == "close"
    assert not [e for e in events if e["type"] == "error"]
    assert [e["step"] for e in events if e["type"] == "score_done"] == [4, 8, 10]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 * 3 * 8  # 3 stages x 3 variants x (7 feature metrics + val), written once
    assert not (tmp_path / "fsdp").exists()
    for r in (r0, r1):
        if r["fsdp"].startswith("unavailable"):
            continue
        assert r["fsdp"].startswith("NotImplementedError") and "FSDP2" in r["fsdp"], r["fsdp"]


def test_rank_from_launcher_env_before_init(tmp_path, monkeypatch):
    """attach() called before init_process_group under torchrun: RANK decides who writes."""
    from scope_helpers import Denoiser

    from emascope import attach

    monkeypatch.setenv("RANK", "1")
    scope = attach(Denoiser(), run_dir=tmp_path / "run", score_every=None)
    scope.step()
    scope.close()
    assert not scope.is_writer and scope.bank is None and scope.current_step == 1
    assert not (tmp_path / "run").exists()
