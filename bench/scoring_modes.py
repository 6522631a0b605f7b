"""Scoring off the critical path, measured side by side in one run (issue 11's goals).

Part 1, training time blocked per sweep: the same training loop (the shipped tree2d sample's model
and sampler, and the digits sample's conv net) runs with ``scoring="inline"`` and
``scoring="background"``, interleaved stage by stage in one process; printed per workload: the
inline sweep (what a scoring step costs training today), the training-thread time of a background
scoring point (the bank copy, plus the eval copy of the model and the extractor the first time;
what ``stage_pending.blocked_seconds`` records), their ratio (goal <= 2 %), and the step-time ratio of steps
taken while a background sweep runs vs steps with no sweep (on a 2-core CPU the sweep competes
with training for the cores; on a GPU it runs on its own stream).

Part 2, batched vs per-variant sampling: the same bank of 11 variants sampled one variant at a
time (``bank.swap`` + sampler) and all at once (:mod:`emascope.batched`: stacked weights +
``functional_call`` + ``vmap``), interleaved repetitions, median; for the tree2d and conv-net
samplers at their shipped sample batch sizes and at a small one (goal >= 3x on CPU).

Part 3, KID on the same features: torch-fidelity's ``kid_features_to_metric`` (numpy, 100 subsets)
vs emascope's (:mod:`emascope.kid`, same subsets, reference side shared by the 11 variants) vs
torchmetrics' ``KernelInceptionDistance`` fed the features through an identity module (goal >= 10x
faster than torch-fidelity). Values agree with torch-fidelity's (printed).

    .venv/bin/python bench/scoring_modes.py [--quick] [--threads 1]

Asserts nothing; the numbers depend on the (shared, noisy) machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emascope import EMABank, attach  # noqa: E402
from emascope import metrics as M  # noqa: E402
from emascope.batched import sample_stacked, stack_weights  # noqa: E402
from emascope.samples import digits, tree2d  # noqa: E402
from emascope.samples.flow import flow_matching_loss  # noqa: E402
from emascope.samples.tree_mixture import make_tree  # noqa: E402


def workloads(quick: bool) -> dict[str, dict]:
    """The shipped samples' models and samplers (sizes of the shipped runs unless ``quick``)."""
    tree = make_tree()
    images, _ = digits.load_digit_images()
    tcfg = tree2d.Tree2DConfig(hidden=32, layers=2) if quick else tree2d.Tree2DConfig()
    # the first shipped digits run's conv net (the digits defaults are now an MLP): what the figures measure
    conv = {"model": "conv", "lr": 2e-3, "schedule": "constant", "sample_batch": 500}
    dcfg = digits.DigitsConfig(channels=8, blocks=2, **conv) if quick else digits.DigitsConfig(**conv)
    return {
        "tree2d": {"model": lambda: tree2d.build_model(tcfg), "sampler": tree2d.make_sampler(4 if quick else 16),
                   "reference": tree.sample(500, torch.Generator().manual_seed(2)),
                   "data": lambda g: tree.sample(tcfg.batch_size, g), "extra": {},
                   "num_samples": 128 if quick else 1000, "sample_batch": 64 if quick else tcfg.sample_batch,
                   "lr": tcfg.lr},
        "conv": {"model": lambda: digits.build_model(dcfg), "sampler": digits.make_sampler(2 if quick else 8),
                 "reference": images[:500], "image_range": "-1,1",
                 "data": lambda g: images[torch.randint(len(images), (dcfg.batch_size,), generator=g)],
                 "extra": {"feature_extractor": lambda x: nn.functional.avg_pool2d(x.float(), 2).flatten(1),
                           "image_range": "-1,1"},
                 "num_samples": 64 if quick else 500, "sample_batch": 64 if quick else dcfg.sample_batch,
                 "lr": dcfg.lr},
    }


# ------------------------------------------------------------------------------------------- part 1


class Arm:
    """One training run with the agent attached in one scoring mode."""

    def __init__(self, w: dict, mode: str, run_dir: Path, score_every: int) -> None:
        torch.manual_seed(0)
        self.model = w["model"]()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=w["lr"])
        self.g = torch.Generator().manual_seed(1)
        self.w, self.mode, self.run_dir = w, mode, run_dir
        self.scope = attach(self.model, self.opt, run_dir=run_dir, sampler=w["sampler"], reference=w["reference"],
                            score_every=None, num_samples=w["num_samples"], batch_size=w["sample_batch"],
                            scoring=mode, score_at_close=False, **w["extra"])
        self.scoring_points: list[float] = []
        self.steps_during_sweep: list[float] = []
        self.steps_idle: list[float] = []

    def step(self) -> None:
        bg = self.scope._background
        sweeping = bg is not None and bg.busy
        t = time.perf_counter()
        loss = flow_matching_loss(self.model, self.w["data"](self.g), self.g)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        dt = time.perf_counter() - t
        (self.steps_during_sweep if sweeping else self.steps_idle).append(dt)

    def scoring_point(self) -> None:
        """What the step hook does at a scoring step: an inline sweep, or freezing + queueing."""
        t = time.perf_counter()
        self.scope.score_now(wait=False)
        self.scoring_points.append(time.perf_counter() - t)

    def events(self, type_: str) -> list[dict]:
        lines = (self.run_dir / "events.jsonl").read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["type"] == type_]


def part1(a: argparse.Namespace, root: Path) -> None:
    print("part 1: training time blocked per scoring point (inline sweep vs background scoring point)")
    print(f"  {'workload':<8} {'inline sweep':>13} {'bg blocked (median)':>20} {'bg first':>10} "
          f"{'blocked/inline':>15} {'step ratio during bg sweep':>28}")
    for name, w in workloads(a.quick).items():
        every = a.score_every
        arms = {m: Arm(w, m, root / f"{name}-{m}", every) for m in ("inline", "background")}
        for stage in range(a.stages):
            for mode in (("inline", "background") if stage % 2 == 0 else ("background", "inline")):
                arm = arms[mode]
                for _ in range(every):
                    arm.step()
                arm.scoring_point()
                if mode == "background":  # steps while its sweep runs (at most 4x the stage's steps)
                    for _ in range(4 * every):
                        if not arm.scope._background.busy:
                            break
                        arm.step()
                    arm.scope.wait()
        inline = statistics.median(arms["inline"].scoring_points)
        bg = arms["background"]
        blocked = bg.scoring_points  # the training thread's time at each scoring point
        steady = statistics.median(blocked[1:]) if len(blocked) > 1 else blocked[0]
        ratio_steps = (statistics.median(bg.steps_during_sweep) / statistics.median(bg.steps_idle)
                       if bg.steps_during_sweep and bg.steps_idle else float("nan"))
        print(f"  {name:<8} {inline:12.3f}s {steady * 1e3:18.2f}ms {blocked[0] * 1e3:8.1f}ms "
              f"{100 * steady / inline:14.3f}% {ratio_steps:27.2f}x")
        for arm in arms.values():
            arm.scope.close()
        done = {m: len(arms[m].events("score_done")) for m in arms}
        if done["inline"] != done["background"]:
            print(f"    (stages scored: {done})")


# ------------------------------------------------------------------------------------------- part 2


def sample_per_variant(model: nn.Module, bank: EMABank, variants: list[str], sampler, n: int) -> torch.Tensor:
    """One batch of ``n`` samples of every variant, one variant at a time (``bank.swap``)."""
    out = []
    with torch.no_grad():
        for v in variants:
            with bank.swap(model, v):
                out.append(sampler(model, n, torch.Generator().manual_seed(7)))
    return torch.stack(out)


def sample_batched(model: nn.Module, bank: EMABank, variants: list[str], sampler, n: int) -> torch.Tensor:
    """The same batch of every variant in one vmapped call (stacking the weights included)."""
    with torch.no_grad():
        weights, shared = stack_weights(model, [functools.partial(bank.variant_state, v) for v in variants],
                                        bank.frozen_keys())
        return sample_stacked(model, weights, sampler, n, torch.Generator().manual_seed(7), shared)


def part2(a: argparse.Namespace) -> None:
    print()
    print("part 2: sampling all variants of a bank: one variant at a time vs batched (vmap), median of "
          f"{a.reps} interleaved repetitions")
    print(f"  {'sampler':<22} {'variants x batch':>17} {'per-variant':>12} {'batched':>10} {'speed-up':>9} "
          f"{'max |diff|':>11}")
    for name, w in workloads(a.quick).items():
        model = w["model"]().eval()
        bank = EMABank(model)  # raw + the 10 default decays
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _ in range(3):
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
                bank.update()
        variants = list(bank.variants)
        for n in sorted({w["sample_batch"], 64}, reverse=True):
            per_variant = functools.partial(sample_per_variant, model, bank, variants, w["sampler"], n)
            batched = functools.partial(sample_batched, model, bank, variants, w["sampler"], n)
            times: dict[str, list[float]] = {"per": [], "bat": []}
            outs = {}
            for r in range(a.reps):
                for key, fn in ((("per", per_variant), ("bat", batched)) if r % 2 == 0
                                else (("bat", batched), ("per", per_variant))):
                    t = time.perf_counter()
                    outs[key] = fn()
                    times[key].append(time.perf_counter() - t)
            tp, tb = statistics.median(times["per"]), statistics.median(times["bat"])
            diff = (outs["per"] - outs["bat"]).abs().max().item()
            print(f"  {name + ' (shipped)' if n == w['sample_batch'] else name:<22} {len(variants):>8} x {n:<6} "
                  f"{tp:11.3f}s {tb:9.3f}s {tp / tb:8.2f}x {diff:11.1e}")


def part2_layers(a: argparse.Namespace) -> None:
    """Why batching does not pay on a CPU core: one linear layer of the tree2d MLP (its three shapes),
    11 variants x the shipped batch, as 11 ``F.linear`` calls vs one ``vmap(F.linear)`` call (what a
    vmapped sampler runs), median of interleaved repetitions. Same arithmetic either way."""
    b, n = 11, 64 if a.quick else 1000
    print()
    print(f"part 2, per layer: {b} variants x {n} rows, F.linear one variant at a time vs vmap(F.linear)")
    print(f"  {'layer (in -> out)':<20} {'11 x F.linear':>14} {'vmap':>10} {'vmap / loop':>12}")
    g = torch.Generator().manual_seed(0)
    for fan_in, fan_out in ((18, 128), (128, 128), (128, 2)):
        x, w = torch.randn(b, n, fan_in, generator=g), torch.randn(b, fan_out, fan_in, generator=g)
        bias = torch.randn(b, fan_out, generator=g)
        batched = torch.func.vmap(nn.functional.linear)

        def loop(x=x, w=w, bias=bias) -> list:
            return [nn.functional.linear(x[i], w[i], bias[i]) for i in range(b)]

        def stacked(x=x, w=w, bias=bias, batched=batched) -> torch.Tensor:
            return batched(x, w, bias)

        times: dict[str, list[float]] = {"loop": [], "vmap": []}
        for r in range(20 if not a.quick else 3):
            for key, fn in ((("loop", loop), ("vmap", stacked)) if r % 2 == 0 else (("vmap", stacked), ("loop", loop))):
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
        tl, tv = statistics.median(times["loop"]), statistics.median(times["vmap"])
        print(f"  {f'{fan_in} -> {fan_out}':<20} {tl * 1e3:12.2f}ms {tv * 1e3:8.2f}ms {tv / tl:11.2f}x")


# ------------------------------------------------------------------------------------------- part 3


def part3(a: argparse.Namespace) -> None:
    from torch_fidelity.metric_kid import kid_features_to_metric

    n, d, variants, subsets = (100, 48, 11, 3) if a.quick else (1000, 48, 11, 100)
    size = min(1000, n)
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(n, d, generator=g, dtype=torch.float64)
    gens = [torch.randn(n, d, generator=g, dtype=torch.float64) * (1 + 0.02 * i) for i in range(variants)]
    print()
    print(f"part 3: KID of {variants} variants, {n} samples each, {d}-d features, {subsets} subsets of {size}")

    t = time.perf_counter()
    tf = [kid_features_to_metric(x, ref, kid_subset_size=size, kid_subsets=subsets, rng_seed=0, verbose=False)
          for x in gens]
    t_tf = time.perf_counter() - t
    t = time.perf_counter()
    plan = M.kid_plan(ref, n, subset_size=size, subsets=subsets, seed=0)
    ours = [plan(x) for x in gens]
    t_ours = time.perf_counter() - t
    err = max(abs(o["kid_mean"] - r["kernel_inception_distance_mean"]) for o, r in zip(ours, tf, strict=True))
    rows = [("torch-fidelity kid_features_to_metric", t_tf), ("emascope.kid (torch, shared reference)", t_ours)]
    try:
        from torchmetrics.image.kid import KernelInceptionDistance

        t = time.perf_counter()
        for x in gens:  # the reference side is recomputed for every subset of every variant
            kid = KernelInceptionDistance(feature=nn.Identity(), subsets=subsets, subset_size=size,
                                          reset_real_features=False)
            kid.update(ref, real=True)
            kid.update(x, real=False)
            kid.compute()
        rows.append(("torchmetrics KernelInceptionDistance", time.perf_counter() - t))
    except Exception as exc:  # noqa: BLE001
        print(f"  (torchmetrics not timed: {type(exc).__name__}: {exc})")
    for label, sec in rows:
        print(f"  {label:<42} {sec:8.3f} s   {t_tf / sec:7.1f}x torch-fidelity's speed")
    print(f"  max |kid_mean - torch-fidelity's| = {err:.1e} (same subsets); torchmetrics draws other subsets "
          "from the global generator")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: small models and counts")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--stages", type=int, default=4, help="scoring stages per arm (part 1)")
    ap.add_argument("--score-every", type=int, default=20, help="steps between scoring points (part 1)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per contender (part 2)")
    ap.add_argument("--parts", default="123", help="which parts to run, e.g. 23")
    a = ap.parse_args()
    if a.quick:
        a.stages, a.score_every, a.reps = 2, 5, 1
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if "1" in a.parts:
            part1(a, Path(tmp))
        if "2" in a.parts:
            part2(a)
            part2_layers(a)
        if "3" in a.parts:
            part3(a)


if __name__ == "__main__":
    main()
