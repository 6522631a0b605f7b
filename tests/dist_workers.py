"""Workers of tests/test_distributed.py, in their own module: ``torch.multiprocessing.spawn`` pickles a
worker by module name, and pytest's importlib mode gives test files names a child cannot import."""

from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist

DECAYS = (0.9, 0.99)
STEPS = 10


def ddp_worker(rank: int, world: int, tmp: str, attach_on: str) -> None:
    from scope_helpers import Denoiser, mixture, sampler, train_step

    from emascope import attach
    from emascope.bank import EMABank

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
                           decays=DECAYS, request_interval=0.0,
                           score_busy="wait")  # background sweeps on rank 0; none of the stages skipped
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
