"""Time one full K-decay EMA update: emascope's EMABank vs K copies of each peer EMA, side by side.

Contenders, all updating the same fp32 model with the same K decays (default: the 10 of
``emascope.bank.DEFAULT_DECAYS``), all built and timed in one process:

- ``emascope EMABank``: one fused pass over a ``[K, N]`` fp32 bank;
- ``timm ModelEmaV3 xK``: K instances, ``foreach=True``;
- ``torch AveragedModel xK``: K instances, ``multi_avg_fn=get_ema_multi_avg_fn(d)``;
- ``ema-pytorch EMA xK``: K instances, ``use_foreach=True``, ``update_every=1``;
- ``naive loop``: ``for d in decays: for p in params: ema.lerp_(p, 1 - d)``;
- ``plain copy``: ``dst.copy_(src)`` of a ``[K, N]`` fp32 tensor (the bandwidth yardstick).

Repetitions are interleaved (every repetition runs each contender once, in a rotating order), so
machine noise hits all of them alike. Prints the median ms per full update, each contender's time
relative to the bank's, and the bank's effective bandwidth (bytes it must move: K rows read and
written plus the live weights read, ``(2K + 1) * N * 4``) against the plain copy's. Asserts nothing.

    .venv/bin/python bench/bank_update.py                   # ~25M params, CPU (+ GPU when present), 1 thread
    .venv/bin/python bench/bank_update.py --device cpu --repeats 31 --threads 0   # torch's thread count
    .venv/bin/python bench/bank_update.py --quick           # tiny smoke run

Memory: ~7 GB for 25M parameters (the bank, K copies per peer, the copy source and target).
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emascope.bank import DEFAULT_DECAYS, EMABank  # noqa: E402

BANK = "emascope EMABank"
COPY = "plain copy [K,N] fp32"
NAIVE = "naive loop (per decay, per param)"


class Block(nn.Module):
    """Transformer-block-shaped parameters: 2 LayerNorms, fused qkv, out projection, 4x MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)


class BenchModel(nn.Module):
    """Token + position embeddings, ``depth`` blocks, final LayerNorm (a small GPT/DiT-like shape)."""

    def __init__(self, dim: int, depth: int, vocab: int, ctx: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(ctx, dim))
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)


def build_model(target_params: int, quick: bool) -> BenchModel:
    """Width 512 (64 with ``quick``); depth for ~``target_params``, the vocabulary takes the rest."""
    dim, vocab, ctx = (64, 512, 64) if quick else (512, 8192, 1024)
    per_block = 12 * dim * dim + 13 * dim
    depth = max(1, round((target_params - (vocab + ctx + 2) * dim) / per_block))
    vocab = max(256, (target_params - depth * per_block) // dim - ctx - 2)
    torch.manual_seed(0)
    return BenchModel(dim, depth, vocab, ctx)


def make_contenders(model: nn.Module, decays: tuple[float, ...],
                    device: torch.device) -> dict[str, Callable[[], None]]:
    out: dict[str, Callable[[], None]] = {}
    bank = EMABank(model, decays)
    out[BANK] = bank.update

    try:
        from timm.utils.model_ema import ModelEmaV3

        timm_emas = [ModelEmaV3(model, decay=d, foreach=True) for d in decays]

        def timm_update() -> None:
            for e in timm_emas:
                e.update(model)

        out["timm ModelEmaV3 xK (foreach)"] = timm_update
    except ImportError as exc:
        print(f"skipping timm: {exc}")

    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    swa = [AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d)) for d in decays]

    def swa_update() -> None:
        for s in swa:
            s.update_parameters(model)

    out["torch AveragedModel xK (multi_avg_fn)"] = swa_update

    try:
        from ema_pytorch import EMA

        eps = [EMA(model, beta=d, update_after_step=0, update_every=1, use_foreach=True,
                   include_online_model=False) for d in decays]

        def ema_pytorch_update() -> None:
            for e in eps:
                e.update()

        out["ema-pytorch EMA xK (use_foreach)"] = ema_pytorch_update
    except ImportError as exc:
        print(f"skipping ema-pytorch: {exc}")

    params = [p for p in model.parameters() if p.requires_grad]
    naive = [[p.detach().clone() for p in params] for _ in decays]

    @torch.no_grad()
    def naive_update() -> None:
        for d, emas in zip(decays, naive, strict=True):
            for e, p in zip(emas, params, strict=True):
                e.lerp_(p, 1.0 - d)

    out[NAIVE] = naive_update

    src = torch.rand(len(decays), bank.numel, device=device)
    dst = torch.empty_like(src)
    out[COPY] = lambda: dst.copy_(src)
    return out


def run_device(device: torch.device, args: argparse.Namespace, decays: tuple[float, ...]) -> None:
    model = build_model(args.params, args.quick).to(device)
    n = sum(p.numel() for p in model.parameters())
    n_tensors = sum(1 for _ in model.parameters())
    contenders = make_contenders(model, decays, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = list(contenders)
    for name in names:  # warm up: first calls allocate / copy (AveragedModel, ema-pytorch)
        for _ in range(args.warmup):
            contenders[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync()
            t0 = time.perf_counter()
            contenders[name]()
            sync()
            times[name].append(time.perf_counter() - t0)

    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    spread = {name: (min(ts) * 1e3, max(ts) * 1e3) for name, ts in times.items()}
    k = len(decays)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\n== {device.type}: {dev_name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model: {n / 1e6:.1f}M fp32 params in {n_tensors} tensors; K = {k} decays; "
          f"{args.repeats} interleaved repetitions after {args.warmup} warm-up calls each")
    print(f"{'contender':42s} {'median ms':>10s} {'min ms':>9s} {'max ms':>9s} {'time / bank':>12s}")
    for name in names:
        lo, hi = spread[name]
        print(f"{name:42s} {med[name]:10.2f} {lo:9.2f} {hi:9.2f} {med[name] / med[BANK]:11.2f}x")
    peers = {name: med[name] for name in names if name not in (BANK, COPY, NAIVE)}
    best = min(peers, key=peers.get)  # type: ignore[arg-type]
    print(f"ratio table: bank / best peer library ({best}) = {med[BANK] / peers[best]:.3f}x "
          f"(goal <= 0.75x on CPU); bank / naive loop = {med[BANK] / med[NAIVE]:.3f}x")
    bank_bytes = (2 * k + 1) * n * 4
    copy_bytes = 2 * k * n * 4
    bank_bw = bank_bytes / (med[BANK] / 1e3) / 1e9
    copy_bw = copy_bytes / (med[COPY] / 1e3) / 1e9
    goal = " (goal on GPU: >= 85%)" if device.type == "cuda" else ""
    print(f"bank effective bandwidth: {bank_bw:.1f} GB/s ((2K+1)*N*4 = {bank_bytes / 1e9:.2f} GB per update) "
          f"= {100 * bank_bw / copy_bw:.0f}% of plain copy ({copy_bw:.1f} GB/s, counted as 2*K*N*4 bytes)"
          f"{goal}")
    del contenders, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=25e6, help="approximate model size (default 25e6)")
    ap.add_argument("--repeats", type=int, default=15, help="interleaved repetitions (default 15)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per contender first (default 2)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: cpu, then cuda when available")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: stable on a shared machine; 0: torch default)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 3 repetitions: a smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        args.params = min(args.params, 2e5)
        args.repeats = min(args.repeats, 3)
        args.warmup = 1
    args.params = int(args.params)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print("command: python " + " ".join(sys.argv if argv is None else ["bench/bank_update.py", *argv]))
    for dev in devices:
        run_device(torch.device(dev), args, DEFAULT_DECAYS)


if __name__ == "__main__":
    main()
