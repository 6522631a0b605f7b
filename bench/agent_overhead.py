"""Cost of the agent on a compute-bound CPU training loop, and of one full scoring sweep.

Part 1, per-step overhead (scoring off): two identical models and optimizers train on the same
batches in one process, one plain and one with ``attach(...)`` (default 10 decays, ``score_every``
None, so no sweep runs; the heartbeat thread and the request poll run as in a real job). Blocks of
steps alternate A B B A ... so drift on a shared machine hits both arms alike. Printed: median step
time per arm, the ratio, and the spread of per-block paired ratios; plus the bank update alone
(``EMABank.update()`` on a bank of the same model) and the bytes it moves per step.

Part 2, one full sweep: ``scope.score_now()`` on the attached model (raw + 10 decays), broken down
with the timings the scoring code records in ``events.jsonl`` (``score_done``: sampling, features,
metrics; "other" = swaps, previews, file writes). Features come from a small callable extractor
(4x4 average pool, 48-d) so the sweep runs in seconds on a CPU; ``--inception-samples N`` adds a
sweep through torch-fidelity's Inception-v3 (random weights built locally, no download: timing only).

    .venv/bin/python bench/agent_overhead.py [--quick] [--model conv|mlp] [--blocks 10] [--threads 1]

Asserts nothing; the numbers depend on the machine. The bank update is memory-bound (about
``20 * K`` bytes per parameter for K decays) while a training step costs ``~6 * batch * (uses per
weight)`` flops per parameter, so the relative overhead is smallest for conv nets and large batches
and largest for small-batch MLPs on a CPU (``--model mlp`` shows that case).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emascope import DEFAULT_DECAYS, EMABank, attach  # noqa: E402
from emascope.features import make_extractor  # noqa: E402
from emascope.scoring import Reference, ScoringConfig, feature_metric_jobs  # noqa: E402


class ConvNet(nn.Module):
    """A small image-to-image conv net (32x32 RGB), ~0.03 M parameters at width 32."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 3, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLP(nn.Module):
    """A 64 -> width -> width -> width -> 64 MLP (SiLU)."""

    def __init__(self, width: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_model(kind: str, width: int | None) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv":
        return ConvNet(width or 32)
    return MLP(width or 512)


def make_batches(kind: str, batch: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shape = (batch, 3, 32, 32) if kind == "conv" else (batch, 64)
    out = []
    for _ in range(count):
        x = torch.randn(shape, generator=g)
        out.append((x, x.flip(-1) * 0.5))  # a fixed target map: something to learn
    return out


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batches, steps: int, start: int,
                opt_times: list[float] | None = None) -> list[float]:
    """``steps`` training steps; returns each step's wall time in seconds (``opt_times`` gets the
    time of each ``optimizer.step()`` call, which includes the agent's post-step hook)."""
    times = []
    for i in range(steps):
        x, y = batches[(start + i) % len(batches)]
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        t_opt = time.perf_counter()
        opt.step()  # the agent's bank update runs here, in the optimizer's post-step hook
        t_end = time.perf_counter()
        times.append(t_end - t)
        if opt_times is not None:
            opt_times.append(t_end - t_opt)
    return times


def sampler_for(kind: str):
    def sampler(model: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor:
        shape = (n, 3, 32, 32) if kind == "conv" else (n, 64)
        z = torch.randn(shape, generator=generator, device=generator.device)
        out = model(z)
        return out.tanh() if kind == "conv" else out
    return sampler


def pool_features(x: torch.Tensor) -> torch.Tensor:
    """Images [n, 3, 32, 32] -> 4x4 average-pooled features [n, 48]."""
    return nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)


def reference_data(kind: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if kind == "conv":
        return (torch.randn(n, 3, 32, 32, generator=g) * 0.5).tanh()
    return torch.randn(n, 64, generator=g)


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:8.2f} ms"


def part1(a: argparse.Namespace, run_dir: Path):
    batches = make_batches(a.model, a.batch, 8)
    plain, agent_model = make_model(a.model, a.width), make_model(a.model, a.width)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    opt_agent = torch.optim.AdamW(agent_model.parameters(), lr=1e-3)
    sampler = sampler_for(a.model)
    scope = attach(agent_model, opt_agent, run_dir=run_dir, sampler=sampler,
                   reference=reference_data(a.model, a.num_samples), score_every=None,
                   num_samples=a.num_samples, update_every=a.update_every,
                   feature_extractor=pool_features if a.model == "conv" else "auto")
    n_params = sum(p.numel() for p in plain.parameters())
    print(f"model: {a.model}, {n_params / 1e6:.3f} M parameters, batch {a.batch}, "
          f"torch threads {torch.get_num_threads()}, decays {len(scope.bank.decays)} "
          f"(+raw), update_every {a.update_every}, "
          f"bank {scope.bank.numel * 4 * len(scope.bank.decays) / 2**20:.1f} MiB fp32")

    # warm-up (allocator, AdamW state)
    train_steps(plain, opt_plain, batches, a.warmup, 0)
    train_steps(agent_model, opt_agent, batches, a.warmup, 0)
    # blocks alternate A B / B A; each block's ratio compares steps taken seconds apart
    all_plain, all_agent, paired = [], [], []
    opt_times: dict[str, list[float]] = {"plain": [], "agent": []}
    step = a.warmup
    for b in range(a.blocks):
        order = ("plain", "agent") if b % 2 == 0 else ("agent", "plain")
        res = {}
        for arm in order:
            model, opt = (plain, opt_plain) if arm == "plain" else (agent_model, opt_agent)
            res[arm] = train_steps(model, opt, batches, a.steps, step, opt_times[arm])
        step += a.steps
        all_plain += res["plain"]
        all_agent += res["agent"]
        # block means, not medians: with update_every > 1 only some steps update the bank
        paired.append(statistics.fmean(res["agent"]) / statistics.fmean(res["plain"]))
    t_plain, t_agent = statistics.median(all_plain), statistics.median(all_agent)
    ratio = statistics.median(paired)
    q = statistics.quantiles(paired, n=4) if len(paired) >= 2 else [ratio, ratio, ratio]
    p10_plain, p10_agent = (statistics.quantiles(x, n=10)[0] for x in (all_plain, all_agent))
    opt_plain_t, opt_agent_t = (statistics.fmean(opt_times[k]) for k in ("plain", "agent"))

    # the bank update alone, on a separate bank of the same model (same decays)
    bank = EMABank(agent_model, DEFAULT_DECAYS, update_every=a.update_every)
    for _ in range(3):
        bank.update()
    upd = []
    for _ in range(5):  # mean per optimizer step over whole update_every cycles; median of 5 rounds
        t = time.perf_counter()
        for _ in range(4 * a.update_every):
            bank.update()
        upd.append((time.perf_counter() - t) / (4 * a.update_every))
    t_update = statistics.median(upd)

    print()
    print(f"part 1: step time, scoring off ({a.blocks} blocks x {a.steps} steps per arm, interleaved)")
    print(f"  {'plain loop (median step)':<34}{fmt_ms(t_plain)}")
    print(f"  {'with agent attached (median step)':<34}{fmt_ms(t_agent)}")
    print(f"  {'ratio agent / plain':<34}{ratio:8.3f}   (median of per-block ratios of means; overhead "
          f"{100 * (ratio - 1):+.1f} %; quartiles {q[0]:.3f} .. {q[2]:.3f}, "
          f"min {min(paired):.3f}, max {max(paired):.3f})")
    if a.update_every == 1:  # with m > 1 the fastest steps are the ones without an update
        print(f"  {'ratio of 10th-percentile steps':<34}{p10_agent / p10_plain:8.3f}   "
              f"({fmt_ms(p10_agent).strip()} / {fmt_ms(p10_plain).strip()}: least disturbed steps)")
    print(f"  {'optimizer.step(), plain (mean)':<34}{fmt_ms(opt_plain_t)}")
    print(f"  {'optimizer.step() + agent hook':<34}{fmt_ms(opt_agent_t)}   (agent work per step "
          f"{fmt_ms(opt_agent_t - opt_plain_t).strip()} = "
          f"{100 * (opt_agent_t - opt_plain_t) / t_plain:.1f} % "
          "of a plain step)")
    print(f"  {'bank.update() alone':<34}{fmt_ms(t_update)}   "
          f"({100 * t_update / t_plain:.1f} % of a plain step; moves ~{bank_bytes(scope.bank) / 2**20:.0f} "
          "MiB per update)")
    return scope, t_plain


def bank_bytes(bank: EMABank) -> int:
    """Bytes the fused lerp reads + writes per update: K rows read and written, one staging row read,
    plus the gather (read the live weights, write the staging row)."""
    k = len(bank.decays)
    return bank.numel * 4 * (2 * k + 1 + 2)


def sweep_breakdown(scope, label: str, t_plain: float) -> None:
    t = time.perf_counter()
    scope.score_now()
    wall = time.perf_counter() - t
    events = [json.loads(line) for line in (scope.run_dir / "events.jsonl").read_text().splitlines()]
    done = [e for e in events if e["type"] == "score_done"][-1]
    errors = [e for e in events if e["type"] == "error"]
    timings, total = done["timings"], done["seconds"]
    n_var = len(scope.bank.variants)
    print()
    print(f"part 2: one full scoring sweep, {label}: {n_var} variants x {done['num_samples']} samples "
          f"(from events.jsonl score_done)")
    for part in ("sampling", "features", "metrics", "user_metrics"):
        v = timings.get(part, 0.0)
        print(f"  {part:<34}{v:8.2f} s   ({100 * v / total:5.1f} %)")
    other = total - sum(timings.values())
    print(f"  {'other (swaps, previews, files)':<34}{other:8.2f} s   ({100 * other / total:5.1f} %)")
    print(f"  {'total':<34}{total:8.2f} s   (= {total / t_plain:,.0f} plain steps; "
          f"score_now wall incl. reference features: {wall:.2f} s)")
    if errors:
        print(f"  ERRORS during the sweep: {[(e['where'], e['message']) for e in errors]}")


def metric_groups(a: argparse.Namespace, model: nn.Module, n_variants: int) -> None:
    """Time each metric group once on one variant's features (same functions and settings as a sweep)."""
    cfg = ScoringConfig(num_samples=a.num_samples)
    ext = make_extractor(pool_features if a.model == "conv" else "identity", "points")
    was_training = model.training
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        model.eval()
        samples = torch.cat([sampler_for(a.model)(model, len(chunk), gen)
                             for chunk in torch.arange(cfg.num_samples).split(cfg.batch_size)])
        model.train(was_training)
    t = time.perf_counter()
    ref = Reference.build(ext(reference_data(a.model, a.num_samples)), cfg.nearest_k)
    t_ref = time.perf_counter() - t
    print(f"  metrics per variant, by group ({a.num_samples} samples, {ref.features.features.shape[1]}-d "
          f"features; x{n_variants} variants per sweep):")
    for name, job in feature_metric_jobs(ext(samples), ref, cfg, "fd"):
        t = time.perf_counter()
        job()
        dt = time.perf_counter() - t
        print(f"    {name:<32}{dt:8.3f} s   (x{n_variants}: {dt * n_variants:6.2f} s)")
    print(f"    {'reference stats + k-NN radii':<32}{t_ref:8.3f} s   (once per run)")


def inception_weights(folder: Path) -> Path:
    """torch-fidelity's Inception-v3 with random weights, saved locally (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    orig_url, orig_load = tfi.load_state_dict_from_url, tfi.FeatureExtractorInceptionV3.load_state_dict
    tfi.load_state_dict_from_url = lambda *args, **kwargs: None
    tfi.FeatureExtractorInceptionV3.load_state_dict = lambda self, *args, **kwargs: None
    try:
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        tfi.load_state_dict_from_url, tfi.FeatureExtractorInceptionV3.load_state_dict = orig_url, orig_load
    path = folder / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def part2_inception(a: argparse.Namespace, folder: Path, t_plain: float) -> None:
    model = make_model("conv", a.width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with attach(model, opt, run_dir=folder / "run-inception", sampler=sampler_for("conv"),
                reference=reference_data("conv", a.inception_samples), score_every=None, score_at_close=False,
                num_samples=a.inception_samples, feature_extractor="inception-v3-compat",
                feature_extractor_weights_path=inception_weights(folder)) as scope:
        train_steps(model, opt, make_batches("conv", 8, 2), 2, 0)
        sweep_breakdown(scope, "Inception-v3 features (random weights)", t_plain)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny model, few steps")
    ap.add_argument("--model", choices=("conv", "mlp"), default="conv")
    ap.add_argument("--width", type=int, default=None, help="channels (conv, default 32) / units (mlp, 512)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default conv 8, mlp 256)")
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--steps", type=int, default=5, help="steps per block per arm")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--update-every", type=int, default=1,
                    help="bank update every m optimizer steps (attach's update_every; default 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the dev box has 2 shared cores)")
    ap.add_argument("--num-samples", type=int, default=1000, help="samples per variant in the sweep")
    ap.add_argument("--inception-samples", type=int, default=0,
                    help="also time a sweep through Inception-v3 with this many samples per variant")
    a = ap.parse_args()
    if a.batch is None:
        a.batch = 8 if a.model == "conv" else 256
    if a.update_every < 1:
        ap.error("--update-every must be >= 1")
    if a.quick:
        a.width = a.width or (8 if a.model == "conv" else 32)
        a.batch, a.blocks, a.steps, a.warmup, a.num_samples = 4, 2, 3, 1, 64
    a.steps = -(-a.steps // a.update_every) * a.update_every  # whole update cycles per block
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        scope, t_plain = part1(a, Path(tmp) / "run")
        try:
            sweep_breakdown(scope, "pooled 48-d features" if a.model == "conv" else "identity features",
                            t_plain)
            metric_groups(a, scope.model, len(scope.bank.variants))
        finally:
            scope.close()
        if a.inception_samples > 0:
            part2_inception(a, Path(tmp), t_plain)


if __name__ == "__main__":
    main()
