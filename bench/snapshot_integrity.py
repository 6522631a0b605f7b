"""What the snapshot checksum costs: save and load with and without it, side by side.

Contenders, all on the same bank (K decays over an N-parameter MLP), in one process:

- ``save, checksum``: :func:`emascope.snapshot.save_snapshot` as shipped (sha256 over the tensors
  as written, stored in the metadata; atomic replace + fsync);
- ``save, no checksum``: the same call with the checksum replaced by a constant (what a snapshot
  cost before checksums existed);
- ``load, verified``: :func:`emascope.snapshot.load_snapshot` (header validation, tensors,
  checksum verification, model-less bank);
- ``load, unverified``: the same with the verification skipped.

Repetitions are interleaved (each repetition runs every contender once, in a rotating order);
prints medians and the ratio checksum / no checksum. Asserts nothing.

    .venv/bin/python bench/snapshot_integrity.py              # ~2.5M params x 10 decays (~100 MB bank)
    .venv/bin/python bench/snapshot_integrity.py --quick      # tiny smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import emascope.snapshot as snap  # noqa: E402
from emascope import runformat as rf  # noqa: E402
from emascope.bank import DEFAULT_DECAYS, EMABank  # noqa: E402


def build(width: int, depth: int) -> EMABank:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    bank = EMABank(model, DEFAULT_DECAYS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    bank.update()
    return bank


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.depth, args.repeats = 128, 2, 3
    torch.set_num_threads(1)
    bank = build(args.width, args.depth)
    real_checksum = snap.snapshot_checksum
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "latest.safetensors"

        def save(checksum: bool) -> None:
            snap.snapshot_checksum = real_checksum if checksum else (lambda tensors, meta: "sha256:none")
            try:
                snap.save_snapshot(bank, path, metadata={"run_id": "bench", "step": "1"})
            finally:
                snap.snapshot_checksum = real_checksum

        def load(verify: bool) -> None:
            if not verify:  # skip the comparison: the recomputed checksum is the stored one
                with safe_open(str(path), framework="pt") as f:
                    stored = f.metadata()[rf.SNAPSHOT_CHECKSUM_KEY]
                snap.snapshot_checksum = lambda tensors, meta: stored
            try:
                snap.load_snapshot(path)
            finally:
                snap.snapshot_checksum = real_checksum

        names = ["save, checksum", "save, no checksum", "load, verified", "load, unverified"]
        times: dict[str, list[float]] = {k: [] for k in names}
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                if name.startswith("load"):
                    save(True)  # a fresh file, written outside the timed region
                    t = time.perf_counter()
                    load(name == "load, verified")
                else:
                    t = time.perf_counter()
                    save(name == "save, checksum")
                times[name].append(time.perf_counter() - t)
        size = path.stat().st_size
    data = torch.empty(size // 4, dtype=torch.float32).numpy().tobytes()
    t = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    sha_gbs = size / (time.perf_counter() - t) / 1e9
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"snapshot file: {size / 1e6:.1f} MB ({bank.variant_flat('raw').numel()} params x {len(bank.decays)} "
          f"decays); sha256 {sha_gbs:.2f} GB/s on this machine; median of {args.repeats}, interleaved")
    print("| contender | median ms |")
    print("|---|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} |")
    print(f"save checksum / no checksum: {med['save, checksum'] / med['save, no checksum']:.2f}x; "
          f"load verified / unverified: {med['load, verified'] / med['load, unverified']:.2f}x")


if __name__ == "__main__":
    main()
