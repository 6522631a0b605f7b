"""A sharded bank over W ranks (torch.distributed, gloo on CPU): bytes per rank, update time per rank,
bytes communicated per update; and the host placement's cost on the training thread.

For each world size W (default 1, 2, 4) the script spawns W processes (``torch.multiprocessing``,
file:// rendezvous, gloo), each holding the same ~25M-parameter model (76 tensors of
transformer-block shapes, ``bench/bank_update.py``'s model) as DDP replicas do, and a bank of K = 10
decays sharded over the W ranks (``EMABank(model, shard=True)``; W = 1 is the single-process bank).
Rank 0 also holds a whole, unsharded bank of the same model: the single-process reference, timed in
the same run, interleaved with the shards.

Measured per rank, ``--repeats`` interleaved repetitions, medians:

- ``bank bytes``: ``EMABank.nbytes`` of the rank's shard, and its ratio to ``total / W``;
- ``update ms (alone)``: one ``update()`` with the other ranks parked in a barrier (the rank's own
  work; on this 2-core machine four ranks updating at once would share two cores);
- ``update / (single / W)``: that time over the whole bank's time divided by W (goal <= 1.2);
- ``bytes / update``: every ``c10d`` operation dispatched during ``update()`` and the bytes of its
  tensors (:class:`emascope.collectives.CollectiveCounter`), goal 0. The counter itself is shown to
  work on a 1 MiB all-reduce.

Then, in one process, the host placement (``device="cpu"``: copy on the training thread, lerp on a
background worker) against the in-line bank: the training thread's time per ``update()``, the whole
update's time, and whether the rows are bit-identical.

    .venv/bin/python bench/distributed_bank.py                 # W = 1, 2, 4; ~25M params; K = 10
    .venv/bin/python bench/distributed_bank.py --quick         # a tiny smoke run

Prints tables; asserts nothing. GPU: the same script runs on CPU tensors only (gloo); on CUDA the
update path is the same code, not measured here.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bank_update import build_model  # noqa: E402

from emascope.bank import DEFAULT_DECAYS, EMABank  # noqa: E402
from emascope.collectives import CollectiveCounter  # noqa: E402


def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def worker(rank: int, world: int, store: str, params: int, quick: bool, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    model = build_model(params, quick)  # seeded: every rank holds the same replica
    decays = DEFAULT_DECAYS
    bank = EMABank(model, decays, shard=world > 1)
    whole = EMABank(model, decays, shard=False) if rank == 0 else None
    gen = torch.Generator().manual_seed(rank)
    params_list = [p for p in model.parameters()]

    def perturb() -> None:
        with torch.no_grad():
            p = params_list[int(torch.randint(len(params_list), (1,), generator=gen))]
            p.add_(1e-3)

    for _ in range(2):  # warm-up
        bank.update()
        if whole is not None:
            whole.update()
    mine, single = [], []
    for rep in range(repeats):
        order = [*range(world), -1]  # -1: rank 0's whole (single-process) bank
        order = order[rep % len(order):] + order[:rep % len(order)]  # rotate who goes first
        for who in order:
            dist.barrier()
            perturb()
            if who == rank:
                t = time.perf_counter()
                bank.update()
                mine.append(time.perf_counter() - t)
            elif who == -1 and whole is not None:
                t = time.perf_counter()
                whole.update()
                single.append(time.perf_counter() - t)
        dist.barrier()
    with CollectiveCounter() as counter:
        for _ in range(3):
            bank.update()
    with CollectiveCounter() as probe:  # the counter sees a real collective
        x = torch.zeros(2**18)
        dist.all_reduce(x)
    torch.save({"rank": rank, "nbytes": bank.nbytes, "cols": bank.local_numel, "update_s": statistics.median(mine),
                "single_s": statistics.median(single) if single else None,
                "whole_nbytes": whole.nbytes if whole else None, "comm_ops": len(counter.ops) / 3,
                "comm_bytes": counter.bytes / 3, "probe": [probe.ops, probe.bytes]}, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, params: int, quick: bool, repeats: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(worker, args=(world, os.path.join(tmp, "store"), params, quick, repeats, out), nprocs=world)
        return [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]


def host_placement(params: int, quick: bool, repeats: int) -> None:
    torch.set_num_threads(1)
    model = build_model(params, quick)
    inline = EMABank(model, DEFAULT_DECAYS)
    host = EMABank(model, DEFAULT_DECAYS, device="cpu")
    params_list = list(model.parameters())
    t_inline, t_host_call, t_host_total = [], [], []
    for rep in range(repeats + 2):
        with torch.no_grad():
            params_list[rep % len(params_list)].add_(1e-3)
        for first in ((inline, host) if rep % 2 else (host, inline)):
            t = time.perf_counter()
            first.update()
            t_call = time.perf_counter() - t
            if first is host:
                host.num_updates  # noqa: B018 - waits for the worker
                t_total = time.perf_counter() - t
                if rep >= 2:
                    t_host_call.append(t_call)
                    t_host_total.append(t_total)
            elif rep >= 2:
                t_inline.append(t_call)
    same = torch.equal(host.state_dict()["bank"], inline.state_dict()["bank"])
    host.close()
    print("\nHost placement (one process, CPU weights; the worker thread does the lerp):\n")
    print("| bank | training thread ms / update | whole update ms | rows bit-identical |")
    print("|---|---:|---:|---|")
    print(f"| in line (device placement) | {_median_ms(t_inline):.1f} | {_median_ms(t_inline):.1f} | - |")
    print(f"| host placement (copy + background lerp) | {_median_ms(t_host_call):.1f} | "
          f"{_median_ms(t_host_total):.1f} | {same} |")
    print(f"\ntraining thread: {_median_ms(t_host_call) / _median_ms(t_inline):.2f}x the in-line update "
          "(the copy of the weights; the lerp runs beside training on another core)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="1,2,4", help="world sizes (comma separated)")
    ap.add_argument("--params", type=float, default=25e6, help="model size (default 25e6)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="tiny model, 3 repeats (smoke run)")
    args = ap.parse_args()
    params, repeats = (int(1e6), 3) if args.quick else (int(args.params), args.repeats)
    worlds = [int(w) for w in args.worlds.split(",")]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1 thread per rank, K = {len(DEFAULT_DECAYS)} decays, "
          f"gloo on CPU, {repeats} repetitions")
    rows = []
    for w in worlds:
        res = run_world(w, params, args.quick, repeats)
        single = res[0]["single_s"]
        whole = res[0]["whole_nbytes"]
        for r in res:
            rows.append((w, r, single, whole))
        print(f"W={w}: counter probe on a 1 MiB all_reduce: {res[0]['probe'][0]} {res[0]['probe'][1]} bytes",
              flush=True)
    n = build_model(params, args.quick)
    nparams = sum(p.numel() for p in n.parameters())
    print(f"\nSharded bank, {nparams / 1e6:.1f}M parameters, {len(list(n.parameters()))} tensors "
          f"(whole bank {rows[0][3] / 2**20:.0f} MiB):\n")
    print("| W | rank | bank MiB | bytes / (total / W) | update ms (alone) | whole bank ms (same run) | "
          "update / (whole / W) | c10d ops / update | bytes / update |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w, r, single, whole in rows:
        print(f"| {w} | {r['rank']} | {r['nbytes'] / 2**20:.1f} | {r['nbytes'] / (whole / w):.4f} | "
              f"{r['update_s'] * 1e3:.1f} | {single * 1e3:.1f} | {r['update_s'] / (single / w):.2f} | "
              f"{r['comm_ops']:.0f} | {r['comm_bytes']:.0f} |")
    host_placement(params, args.quick, repeats)


if __name__ == "__main__":
    main()
