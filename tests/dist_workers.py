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


def spawn(fn, world: int, args: tuple, tmp: str, timeout_s: float = 240) -> list[dict]:
    """Run ``fn(rank, world, tmp, *args)`` on ``world`` spawned processes; kill them all if the job
    outlives ``timeout_s`` or the caller fails (a deadlock surfaces as a failure, never a hang).
    Returns each rank's result dict (``tmp/result<rank>.pt``); a rank's error fails the test."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=(world, tmp, *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed job did not finish within {timeout_s:.0f} s (deadlock?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    results = [torch.load(f"{tmp}/result{r}.pt", weights_only=True) for r in range(world)]
    for r in results:
        assert "error" not in r, r["error"]
    return results


AGENT_KW = {"score_every": 4, "snapshot_every": 4, "num_samples": 100, "batch_size": 30, "decays": DECAYS,
            "request_interval": 0.0, "heartbeat_interval": 0.5, "score_at_close": True,
            "score_busy": "wait"}  # shard=False: background sweeps on rank 0, none of the stages skipped


def agent_hooks() -> dict:
    """The scoring hooks of the agent jobs (also used by the one-process comparison)."""
    from scope_helpers import mixture, sampler

    return {"sampler": sampler, "reference": mixture(200, 3),
            "evaluate": lambda m: {"val": float(m(mixture(50, 4), 0.4).pow(2).mean())},
            "metric_directions": {"val": "lower"}}


def agent_worker(rank: int, world: int, tmp: str, mode: str) -> None:
    """attach() on a DDP job: ``"sharded"`` (the default: every rank attaches, holds a shard, draws
    its share of every sweep) or ``"rank0"`` (``shard=False``, attached on rank 0 only); then, for
    ``"sharded"``, an FSDP2 (``fully_shard``) job scored with a collective sampler."""
    from scope_helpers import Denoiser, mixture, train_step

    from emascope import attach
    from emascope import runformat as rf
    from emascope.atomic import atomic_write_json
    from emascope.bank import EMABank

    out: dict = {"rank": rank, "pid": os.getpid()}
    try:
        _init(rank, world, tmp)
        torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts them)
        model = torch.nn.parallel.DistributedDataParallel(Denoiser())
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        data, g = mixture(1000, seed=10 + rank), torch.Generator().manual_seed(rank)  # different batches
        sharded = mode == "sharded"
        scope = None
        if sharded:  # refused alike on every rank before anything is written (no collective)
            try:
                attach(model, opt, run_dir=f"{tmp}/external", scoring="external", **agent_hooks(), **AGENT_KW)
            except ValueError as exc:
                out["external_refused"] = "scoring='external'" in str(exc) and not os.path.exists(f"{tmp}/external")
            try:  # post-hoc synthesis reads one-process stage snapshots: its search is refused alike
                attach(model, opt, run_dir=f"{tmp}/search", search_evals=2, **agent_hooks(), **AGENT_KW)
            except ValueError as exc:
                out["search_refused"] = "search_evals" in str(exc) and not os.path.exists(f"{tmp}/search")
        if sharded or rank == 0:
            scope = attach(model, opt, run_dir=f"{tmp}/run", shard=None if sharded else False, **agent_hooks(),
                           **AGENT_KW)
            out["is_writer"], out["sharded"] = scope.is_writer, scope.sharded
            if rank == 0:  # a dashboard export request: served at the next snapshot step
                req = rf.ExportRequest("req1", "0.9", "from-dashboard", None)
                atomic_write_json(scope.run_dir / rf.request_file("req1"), rf.request_body(req, 0.0))
                if sharded:  # a synthesised decay: refused with its reason (no stage snapshots), no collective
                    syn = rf.parse_request({"id": "req2", "decay": 0.9996, "name": "synth"}, stem="req2")
                    atomic_write_json(scope.run_dir / rf.request_file("req2"), rf.request_body(syn, 0.0))
        own = EMABank(model, DECAYS, shard=False)  # an independent whole bank of this rank's replica
        for _ in range(STEPS):
            train_step(model, opt, data, g)
            own.update()
        if scope is not None:
            out["score_now"] = scope.score_now() is not None  # a collective when sharded: every rank
            out["export"] = scope.export("0.99") is not None
            if sharded:  # refused alike on every rank (rank 0 checks the path), no rank left in a collective
                out["refused"] = []
                for bad in ({"path": f"{tmp}/run/run.json"}, {"format": "transformers"}):
                    try:
                        scope.export("0.99", **bad)
                        out["refused"].append(None)
                    except ValueError as exc:
                        out["refused"].append(str(exc))
            scope.close()
            out["bank_is_none"] = scope.bank is None
            out["current_step"] = scope.current_step
        out["own_bank"] = own.state_dict()["bank"]
        out["weights"] = {k: v.clone() for k, v in model.module.state_dict().items()}
        dist.barrier()  # every rank reaches the end: nobody is stuck in a collective
        if sharded:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            torch.manual_seed(5)
            fsdp = Denoiser()
            fully_shard(fsdp, mesh=init_device_mesh("cpu", (world,)))
            opt = torch.optim.Adam(fsdp.parameters(), lr=1e-2)
            kw = {**AGENT_KW, "score_every": 3, "snapshot_every": 3, "num_samples": 70}  # batches: 2 + 1
            with attach(fsdp, opt, run_dir=f"{tmp}/fsdp", **agent_hooks(), **kw) as scope:
                out["fsdp_sharded"] = scope.bank.shard_plan.kind
                for _ in range(6):
                    train_step(fsdp, opt, data, g)
                before = scope.bank.state_dict()
            dist.barrier()
            # resume at the same world size through attach: every rank reloads its own rank file bit-exactly
            again = attach(fsdp, opt, run_dir=f"{tmp}/fsdp", resume=True, decays=DECAYS, score_every=None)
            assert again.sharded and again.current_step == 6 and again.bank.step == 6
            assert _same_state(again.bank.state_dict(), before)
            again.close()
            out["fsdp_resumed"] = True
            dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the parent
        out["error"] = traceback.format_exc()
    torch.save(out, f"{tmp}/result{rank}.pt")


# --------------------------------------------------------------------------------------------------
# sharded banks (tests/test_distributed_bank.py)

BANK_DECAYS = (0.5, 0.9, 0.999)
BANK_KW = {"bias_correction": True, "bema": True, "update_every": 2}


def ddp_net() -> torch.nn.Module:
    """6,339 averaged scalars = 4 blocks of 2048 (W = 3 holds 1, 1, 2 blocks), a BatchNorm buffer."""
    from torch import nn

    return nn.Sequential(nn.Linear(7, 300), nn.SiLU(), nn.Linear(300, 13), nn.BatchNorm1d(13))


def fsdp_net() -> torch.nn.Module:
    """bf16; first dims 301 and 2 do not divide by 2 or 3 (uneven shards; rank 2 of 3 holds no row of
    the last layer)."""
    from torch import nn

    return nn.Sequential(nn.Linear(7, 301), nn.SiLU(), nn.Linear(301, 2), nn.LayerNorm(2)).to(torch.bfloat16)


def _init(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))


def _same_state(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def _check_variants(bank, ref, model, wrapped) -> None:
    """Every readout of the sharded ``bank`` equals the single-process ``ref`` (collectives); a swap
    communicates nothing with FSDP2 and one all-gather each way with DDP (counted)."""
    from emascope.collectives import CollectiveCounter

    for v in ref.variants:
        assert torch.equal(bank.variant_flat(v), ref.variant_flat(v)), v
        want = ref.materialize(v)
        got = bank.materialize(v)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), v
        streamed = {}
        for keys, t in bank.stream_variant(v, dst=0):
            assert (t is not None) == (dist.get_rank() == 0)
            for k in keys:
                streamed[k] = t
        if dist.get_rank() == 0:
            assert all(torch.equal(streamed[k], want[k].cpu()) for k in want), v
        live = {k: (t.full_tensor() if hasattr(t, "full_tensor") else t).clone() for k, t in model.state_dict().items()}
        swap = bank.swap(wrapped, v)
        with CollectiveCounter() as enter:
            swap.__enter__()
        try:
            inside = {k: (t.full_tensor() if hasattr(t, "full_tensor") else t) for k, t in model.state_dict().items()}
            assert all(torch.equal(inside[k], want[k]) for k in want), v
        finally:
            with CollectiveCounter() as leave:
                swap.__exit__(None, None, None)
        # FSDP2: each rank writes its own shards (no communication); DDP: one all-gather in, one back
        n = 0 if bank.shard_plan.kind == "fsdp" else 1
        assert len(enter.ops) == n and len(leave.ops) == n, (enter.ops, leave.ops)
        assert all("allgather" in op for op in enter.ops + leave.ops), (enter.ops, leave.ops)
        after = {k: (t.full_tensor() if hasattr(t, "full_tensor") else t) for k, t in model.state_dict().items()}
        assert all(torch.equal(after[k], live[k]) for k in live), v


def bank_worker(rank: int, world: int, tmp: str, reshard_from: str) -> None:
    """DDP and FSDP2 sharded banks against a single-process EMABank on the same trajectory."""
    from torch import nn

    from emascope import runformat as rf
    from emascope import shardfiles as SF
    from emascope.bank import BLOCK, EMABank
    from emascope.collectives import CollectiveCounter
    from emascope.snapshot import load_snapshot, save_snapshot

    out: dict = {"rank": rank}
    try:
        _init(rank, world, tmp)
        # ---------------- DDP: a contiguous 1/W of the columns, updated from the rank's replica
        torch.manual_seed(0)
        model = ddp_net()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        banks = {"plain": (EMABank(ddp, BANK_DECAYS), EMABank(model, BANK_DECAYS, shard=False)),
                 "bc_bema_m2": (EMABank(ddp, BANK_DECAYS, **BANK_KW), EMABank(model, BANK_DECAYS, shard=False,
                                                                               **BANK_KW)),
                 # the host placement on a sharded bank: this rank's columns in host memory, a worker thread
                 "host": (EMABank(ddp, BANK_DECAYS, device="cpu", **BANK_KW),
                          EMABank(model, BANK_DECAYS, shard=False, **BANK_KW))}
        g = torch.Generator().manual_seed(rank)  # every rank its own batches; DDP keeps replicas equal
        comm_ops, comm_bytes = 0, 0
        for _ in range(9):
            x = torch.randn(32, 7, generator=g)
            ddp(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            for bank, ref in banks.values():
                with CollectiveCounter() as c:
                    bank.update()
                comm_ops, comm_bytes = comm_ops + len(c.ops), comm_bytes + c.bytes
                ref.update()
        out["ddp_comm"] = [comm_ops, comm_bytes]
        host, _ = banks.pop("host")
        assert host.sharded and host.placement == "host" and host.shard_plan.kind == "ddp"
        assert _same_state(host.state_dict(), banks["bc_bema_m2"][0].state_dict())
        _check_variants(host, banks["bc_bema_m2"][1], model, ddp)
        host.close()
        bank, ref = banks["bc_bema_m2"]
        assert bank.sharded and bank.shard_plan.kind == "ddp" and not ref.sharded
        for b, r in banks.values():
            _check_variants(b, r, model, ddp)
        out["ddp_nbytes"] = [b.nbytes for b, _ in banks.values()]
        out["ddp_total"] = [r.nbytes for _, r in banks.values()]
        out["ddp_block_bytes"] = (len(BANK_DECAYS) + 2) * BLOCK * 4
        # sharded snapshot (collective) + the reference's single-file snapshot
        SF.save_sharded_snapshot(bank, f"{tmp}/ddp", rf.SNAPSHOT_INDEX, lambda r, w: rf.snapshot_shard_file(9, r, w),
                                 step=9, run_id="ddp-run")
        if rank == 0:
            save_snapshot(ref, f"{tmp}/ref_ddp.safetensors", {"run_id": "ddp-run", "step": "9"})
        dist.barrier()
        # resume at the same world size: bit-exact, counters included; then both continue identically
        again = EMABank(ddp, BANK_DECAYS, **BANK_KW)
        SF.load_bank_state(again, f"{tmp}/ddp/{rf.SNAPSHOT_INDEX}")
        assert _same_state(again.state_dict(), bank.state_dict())
        # re-shard a single-process snapshot into this sharding
        other = EMABank(ddp, BANK_DECAYS, **BANK_KW)
        SF.load_bank_state(other, f"{tmp}/ref_ddp.safetensors")
        assert _same_state(other.state_dict(), bank.state_dict())
        keep = [bank, again, other, ref]
        if reshard_from:  # another world size's set (the W = 2 job): its columns, re-cut for this world
            index, ref_file, _, _ = reshard_from.split("|")
            moved = EMABank(ddp, BANK_DECAYS, **BANK_KW)
            assert SF.load_bank_state(moved, index) == 9
            whole = load_snapshot(ref_file).state_dict()
            expect = EMABank(ddp, BANK_DECAYS, **BANK_KW)
            expect.load_state_dict(whole)  # a whole state: a sharded bank takes its own columns
            assert _same_state(moved.state_dict(), expect.state_dict())
            ref2 = EMABank(model, BANK_DECAYS, shard=False, **BANK_KW)
            ref2.load_state_dict(whole)
            keep += [moved, ref2]
        for _ in range(3):  # continue after the resume: still the single-process numbers
            ddp(torch.randn(32, 7, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            for b in keep:
                b.update()
        assert _same_state(again.state_dict(), bank.state_dict()) and _same_state(other.state_dict(),
                                                                                  bank.state_dict())
        _check_variants(bank, ref, model, ddp)
        if reshard_from:
            expect = EMABank(ddp, BANK_DECAYS, **BANK_KW)
            expect.load_state_dict(ref2.state_dict())
            assert _same_state(moved.state_dict(), expect.state_dict())
            out["resharded"] = True

        # ---------------- FSDP2: each rank's own (uneven, maybe empty) shards, bf16 weights, fp32 bank
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(1)
        fsdp = fsdp_net()
        plain = fsdp_net()
        plain.load_state_dict(fsdp.state_dict())
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(fsdp[0], mesh=mesh)
        fully_shard(fsdp, mesh=mesh)
        fb = EMABank(fsdp, BANK_DECAYS, **BANK_KW)
        fh = EMABank(fsdp, BANK_DECAYS, device="cpu", **BANK_KW)  # host placement of the local shards
        rb = EMABank(plain, BANK_DECAYS, **BANK_KW)
        assert fb.sharded and fb.shard_plan.kind == "fsdp"
        opt = torch.optim.SGD(fsdp.parameters(), lr=0.5)
        comm_ops, comm_bytes = 0, 0
        for t in range(7):
            x = torch.randn(16, 7, generator=torch.Generator().manual_seed(100 * t + rank)).to(torch.bfloat16)
            fsdp(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            with CollectiveCounter() as c:
                fb.update()
                fh.update()
            comm_ops, comm_bytes = comm_ops + len(c.ops), comm_bytes + c.bytes
            # the reference sees the same weights: gathered (test only, not the bank) into a plain model
            plain.load_state_dict({k: (v.full_tensor() if hasattr(v, "full_tensor") else v)
                                   for k, v in fsdp.state_dict().items()})
            rb.update()
        # FSDP2's own mixed precision (fp32 sharded parameters, bf16 compute): the bank reads the fp32 shards
        from torch.distributed.fsdp import MixedPrecisionPolicy

        torch.manual_seed(2)
        mixed = nn.Sequential(nn.Linear(7, 301), nn.SiLU(), nn.Linear(301, 2))
        plain_mixed = nn.Sequential(nn.Linear(7, 301), nn.SiLU(), nn.Linear(301, 2))
        plain_mixed.load_state_dict(mixed.state_dict())
        fully_shard(mixed, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        mb, rmb = EMABank(mixed, BANK_DECAYS, **BANK_KW), EMABank(plain_mixed, BANK_DECAYS, **BANK_KW)
        opt_mixed = torch.optim.SGD(mixed.parameters(), lr=0.5)
        for t in range(4):
            y = mixed(torch.randn(16, 7, generator=torch.Generator().manual_seed(100 * t + rank)))
            assert y.dtype == torch.bfloat16
            y.float().pow(2).mean().backward()
            opt_mixed.step()
            opt_mixed.zero_grad()
            with CollectiveCounter() as c:
                mb.update()
            comm_ops, comm_bytes = comm_ops + len(c.ops), comm_bytes + c.bytes
            plain_mixed.load_state_dict({k: v.full_tensor() for k, v in mixed.state_dict().items()})
            rmb.update()
        assert {p.dtype for p in mixed.parameters()} == {torch.float32}
        for v in rmb.variants:
            assert torch.equal(mb.variant_flat(v), rmb.variant_flat(v)), v
        out["fsdp_comm"] = [comm_ops, comm_bytes]
        out["fsdp_local_numel"] = fb.local_numel
        out["fsdp_numel"] = fb.numel
        out["fsdp_nbytes"], out["fsdp_total"] = fb.nbytes, rb.nbytes
        assert {p.dtype for p in fsdp.parameters()} == {torch.bfloat16}
        assert fb.state_dict()["bank"].dtype == torch.float32
        _check_variants(fb, rb, fsdp, fsdp)
        assert fh.placement == "host" and fh.shard_plan.kind == "fsdp"
        assert _same_state(fh.state_dict(), fb.state_dict())
        fh.close()
        SF.save_sharded_snapshot(fb, f"{tmp}/fsdp", rf.SNAPSHOT_INDEX, lambda r, w: rf.snapshot_shard_file(7, r, w),
                                 step=7, run_id="fsdp-run")
        if rank == 0:
            save_snapshot(rb, f"{tmp}/ref_fsdp.safetensors", {"run_id": "fsdp-run", "step": "7"})
        dist.barrier()
        fb2 = EMABank(fsdp, BANK_DECAYS, **BANK_KW)
        SF.load_bank_state(fb2, f"{tmp}/fsdp/{rf.SNAPSHOT_INDEX}")
        assert _same_state(fb2.state_dict(), fb.state_dict())
        fb3 = EMABank(fsdp, BANK_DECAYS, **BANK_KW)
        SF.load_bank_state(fb3, f"{tmp}/ref_fsdp.safetensors")  # a single-process snapshot, re-sharded
        assert _same_state(fb3.state_dict(), fb.state_dict())
        if reshard_from:  # the W = 2 job's FSDP2 set re-cut for this world's (uneven) shards
            _, _, index, ref_file = reshard_from.split("|")
            moved = EMABank(fsdp, BANK_DECAYS, **BANK_KW)
            assert SF.load_bank_state(moved, index) == 7
            expect = EMABank(fsdp, BANK_DECAYS, **BANK_KW)
            expect.load_state_dict(load_snapshot(ref_file).state_dict())
            assert _same_state(moved.state_dict(), expect.state_dict())
            out["fsdp_resharded"] = True
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the parent
        out["error"] = traceback.format_exc()
    torch.save(out, f"{tmp}/result{rank}.pt")
