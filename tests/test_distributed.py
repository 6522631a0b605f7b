"""attach() under real torch.distributed: 2 CPU processes, gloo, a DDP-wrapped model, scoring on.

Only rank 0 writes the run directory; rank 1 must neither write nor hang (the whole job runs
under a timeout, and the process group's own timeout is short so a deadlock surfaces as an
error). Rank 1 keeps an independent EMABank of its own DDP replica: DDP keeps the weights equal,
so rank 0's bank must equal it exactly. FSDP2 (``fully_shard``) is refused with NotImplementedError.
"""

from __future__ import annotations

import datetime
import json
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DECAYS = (0.9, 0.99)
STEPS = 10
JOB_TIMEOUT_S = 240


def _worker(rank: int, world: int, tmp: str, attach_on: str) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from scope_helpers import Denoiser, mixture, sampler, train_step

    from agent import attach
    from agent.bank import EMABank

    torch.set_num_threads(1)
    out: dict = {"rank": rank, "pid": os.getpid()}
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts them)
        model = torch.nn.parallel.DistributedDataParallel(Denoiser())
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        data, g = mixture(1000, seed=10 + rank), torch.Generator().manual_seed(rank)  # different batches
        scope = None
        if attach_on == "all" or rank == 0:
            scope = attach(model, opt, run_dir=f"{tmp}/run", sampler=sampler, reference=mixture(200, 3),
                           evaluate=lambda m: {"val": float(m(mixture(50, 4), 0.4).pow(2).mean())},
                           metric_directions={"val": "lower"}, score_every=4, num_samples=100,
                           decays=DECAYS, request_interval=0.0)
            out["is_writer"] = scope.is_writer
        own = EMABank(model, DECAYS)  # an independent bank of this rank's replica
        for _ in range(STEPS):
            train_step(model, opt, data, g)
            own.update()
        if scope is not None:
            out["score_now"] = scope.score_now() is not None
            out["export"] = scope.export("0.99") is not None
            scope.close()
            out["bank_is_none"] = scope.bank is None
            if scope.bank is not None:
                out["scope_bank"] = scope.bank.state_dict()["bank"]
                out["scope_step"] = scope.bank.step
            out["current_step"] = scope.current_step
        out["own_bank"] = own.state_dict()["bank"]
        out["weights"] = {k: v.clone() for k, v in model.module.state_dict().items()}
        dist.barrier()  # both ranks reach the end: nobody is stuck in a collective

        # FSDP2: sharded (DTensor) parameters are refused with a clear error, on every rank
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            sharded = Denoiser()
            fully_shard(sharded, mesh=mesh)
            try:
                attach(sharded, run_dir=f"{tmp}/fsdp")
                out["fsdp"] = "attached"
            except NotImplementedError as exc:
                out["fsdp"] = f"NotImplementedError: {exc}"
        except ImportError as exc:  # torch without FSDP2
            out["fsdp"] = f"unavailable: {exc}"
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the parent
        out["error"] = traceback.format_exc()
    torch.save(out, f"{tmp}/result{rank}.pt")


def _run(tmp_path: Path, attach_on: str) -> list[dict]:
    ctx = mp.spawn(_worker, args=(2, str(tmp_path), attach_on), nprocs=2, join=False)
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

    from agent import attach

    monkeypatch.setenv("RANK", "1")
    scope = attach(Denoiser(), run_dir=tmp_path / "run", score_every=None)
    scope.step()
    scope.close()
    assert not scope.is_writer and scope.bank is None and scope.current_step == 1
    assert not (tmp_path / "run").exists()
