"""What the intervals cost, what racing saves, and how well the intervals are calibrated.

```bash
OMP_NUM_THREADS=1 python bench/uncertainty.py                    # cost + racing on the shipped runs
OMP_NUM_THREADS=1 python bench/uncertainty.py --calibration      # coverage of the 95% intervals
OMP_NUM_THREADS=1 python bench/uncertainty.py --fresh-racing 4000 --racing-metrics log_likelihood,fd,tail_coverage
OMP_NUM_THREADS=1 python bench/uncertainty.py --fresh --runs tree2d,digits --no-racing   # cost, side by side
OMP_NUM_THREADS=1 python bench/uncertainty.py --scale 5000                      # FD/KID half values at d = 2048
```

The shipped runs under ``sample_runs/runs`` were written with intervals: every sweep recorded its
interval timings, its paired comparison and the run its noise floor, which the default command
reads back; ``--fresh`` and ``--fresh-racing`` score their last-stage banks again, here, with the
current agent (``Scorer.sweep``).

1. **Cost of the intervals** (goal <= 10% of sweep time): every sweep of the shipped runs
   (``sample_runs/runs/tree2d`` and ``digits``) timed its intervals (``timings.uncertainty``:
   half-sample replicates of every metric of every variant and the paired comparisons) inside the
   sweep, side by side with everything else; printed as a share of the sweep's wall time, per stage.
   The k-NN metrics' values are read from the neighbour structure their intervals build; only its
   replicate radii count as the intervals' time, its lists and ball memberships as the metrics'.
   The noise floor is scored once per run, so its time is also shown per stage. ``--fresh`` scores
   the last stage again from the bank snapshot, with and without intervals, interleaved
   (``--repeats``), and prints both wall times and their difference as a share of the sweep with
   intervals (the cost without any attribution, but as noisy as the machine).
2. **Racing** (goal >= 3x fewer samples for the default 11-variant sweep on tree2d, at equal final
   confidence): the last stage of the shipped tree2d run raced again from its bank on each racing
   metric (the rounds: draws and the racing metric); the shipped run is the full sweep it is
   compared with. Printed: samples drawn against the full sweep, the rounds, and whether the race's
   final best is the full sweep's (or tied with it). The survivors of a race hold exactly the
   samples of the full sweep, so their values, intervals and comparisons are the full sweep's: equal
   final confidence by construction.
3. **Calibration** (``--calibration``): a fixed reference, generated sets drawn again and again
   from a known distribution; for every metric the share of 95% intervals that cover the mean of
   the full-sample value over many draws, and the mean standard error over the true spread.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emascope import metrics as M
from emascope import uncertainty as U
from emascope.config import Hooks, ScoringConfig
from emascope.rundir import RunWriter, prepare_run_dir
from emascope.scoring import Scorer
from emascope.snapshot import load_snapshot

RUNS = Path(__file__).resolve().parents[1] / "sample_runs" / "runs"
SETTING_FIELDS = ("num_samples", "batch_size", "seed", "feature_extractor", "kid_subset_size", "kid_subsets",
                  "nearest_k", "prc_neighborhood", "bootstrap_replicates", "confidence_level", "image_range")


def _events(run_dir: Path, type_: str) -> list[dict[str, Any]]:
    out = []
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("type") == type_:
            out.append(e)
    return out


def shipped_setup(name: str) -> tuple[Any, Any, dict[str, Any], Hooks, int]:
    """(model, bank, scoring settings, hooks, last step) of a shipped run, rebuilt from its files."""
    run = RUNS / name
    info = json.loads((run / "run.json").read_text())
    settings = {k: info["settings"][k] for k in SETTING_FIELDS if k in info["settings"]}
    bank = load_snapshot(run / "banks" / "latest.safetensors")
    step = max(e["step"] for e in _events(run, "score_done"))
    if name == "tree2d":
        from emascope.samples import tree2d
        from emascope.samples.tree_mixture import make_tree

        cfg = tree2d.Tree2DConfig()
        tree = make_tree()
        model = tree2d.build_model(cfg)
        reference = tree.sample(cfg.reference_size, torch.Generator().manual_seed(cfg.seed + 2))
        exact = tree.sample(settings["num_samples"], torch.Generator().manual_seed(cfg.seed + 4))
        settings.setdefault("kid_subset_size", cfg.kid_subset_size)  # runs before intervals did not record it
        hooks = Hooks(sampler=tree2d.make_sampler(cfg.sample_steps), reference=reference, exact_samples=exact,
                      sample_metrics=tree2d.TreeMetrics(tree, cfg), metric_directions=tree2d.TREE_METRIC_DIRECTIONS)
    else:
        from emascope.samples import digits

        cfg = digits.DigitsConfig()
        model = digits.build_model(cfg)
        digits.register_extractor()
        images, _ = digits.load_digit_images()
        settings["feature_extractor_weights_path"] = str(digits.SHIPPED_CLASSIFIER)
        hooks = Hooks(sampler=digits.make_sampler(cfg.sample_steps), reference=images)
    model.eval()
    return model, bank, settings, hooks, step


def sweep(name: str, tmp: Path, **overrides: Any) -> dict[str, Any]:
    """Score the last stage of a shipped run again; returns its score_done, comparison and floor events."""
    model, bank, settings, hooks, step = shipped_setup(name)
    cfg = ScoringConfig(**{**settings, **overrides})
    run_dir = prepare_run_dir(tmp / f"{name}-{time.time_ns()}", overwrite=True)
    writer = RunWriter(run_dir)
    scorer = Scorer(cfg, hooks, writer, run_dir)
    t = time.perf_counter()
    scorer.sweep(model, bank, list(bank.variants), step)
    wall = time.perf_counter() - t
    out = {"wall": wall, "done": _events(run_dir, "score_done")[-1],
           "comparison": (_events(run_dir, "comparison") or [None])[-1],
           "floor": (_events(run_dir, "noise_floor") or [None])[-1]}
    out["values"] = {(r["variant"], r["metric"]): r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text()
                                                                  .splitlines())}
    return out


def _decay_key(variant: str) -> float:
    return -1.0 if variant == "raw" else float(variant)


def cost(names: list[str], repeats: int, tmp: Path, **overrides: Any) -> None:
    print("## Cost of the intervals (last stage of each shipped run, its own settings)\n")
    print("| run | variants x samples | sweep without intervals | sweep with | intervals inside the sweep "
          "| share of the sweep | (with - without) / with | noise floor (once per run) | per stage of the run |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    tables: list[tuple[str, dict[str, Any]]] = []
    for name in names:
        stages = len(_events(RUNS / name, "score_done"))
        offs, ons = [], []
        for _ in range(repeats):  # interleaved: off, on, off, on ...
            offs.append(sweep(name, tmp, uncertainty=False, noise_floor=False, **overrides))
            ons.append(sweep(name, tmp, uncertainty=True, noise_floor=True, **overrides))
        on = ons[-1]
        unc = [o["done"]["timings"]["uncertainty"] for o in ons]
        secs = [o["done"]["seconds"] for o in ons]
        floor = [o["floor"]["seconds"] for o in ons if o["floor"]]
        share = [u / s for u, s in zip(unc, secs, strict=True)]
        n = on["done"]["num_samples"]
        variants = on["done"]["samples_full"] // max(1, n)
        off_s, on_s = np.median([o["done"]["seconds"] for o in offs]), np.median(secs)
        print(f"| {name} | {variants} x {n:,} | {off_s:.2f} s "
              f"| {on_s:.2f} s | {np.median(unc):.2f} s | **{np.median(share):.1%}** | {(on_s - off_s) / on_s:.1%} "
              f"| {np.median(floor):.2f} s | {np.median(floor) / max(1, stages):.2f} s |")
        print(f"<!-- {name}: timings of the last sweep with intervals: {json.dumps(on['done']['timings'])} -->")
        tables.append((name, on))
    print()
    for name, on in tables:  # what the intervals say on that stage
        comp, floor = on["comparison"], (on["floor"] or {}).get("metrics", {})
        print(f"### {name}: step {on['done'].get('step')}, {on['done']['num_samples']:,} samples per variant, "
              f"{comp['level']:.0%} intervals\n")
        print("| metric | best | value [interval] | tied with the best | noise floor [interval] |")
        print("|---|---|---|---|---|")
        for metric, c in comp["metrics"].items():
            v = on["values"].get((c["best"], metric), {})
            tied = sorted((x for x, d in c["variants"].items() if d["worse"] is False), key=_decay_key)
            f = floor.get(metric) or {}
            fl = f"{f['value']:.4g} [{f.get('lo') or float('nan'):.4g}, {f.get('hi') or float('nan'):.4g}]" \
                if f else ""
            print(f"| {metric} | {c['best']} | {v.get('value', float('nan')):.4g} [{v.get('lo') or float('nan'):.4g}, "
                  f"{v.get('hi') or float('nan'):.4g}] | {', '.join(tied)} | {fl} |")
        print()


def recorded_cost(names: list[str]) -> None:
    """The cost the shipped runs recorded themselves: every sweep's ``timings.uncertainty`` against its
    wall time (``score_done``), and the noise floor (``noise_floor.seconds``) spread over the stages."""
    print("## Cost of the intervals, as recorded by the shipped runs (every stage, measured in the sweep)\n")
    print("| run | stages | variants x samples | sweep (median) | intervals inside it (median) "
          "| share of the sweep: median (min .. max) | noise floor, once | per stage |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        done = [e for e in _events(RUNS / name, "score_done") if "uncertainty" in e.get("timings", {})]
        if not done:
            print(f"| {name} | (no intervals recorded) | | | | | | |")
            continue
        share = [e["timings"]["uncertainty"] / e["seconds"] for e in done]
        floor = sum(e.get("seconds", 0.0) for e in _events(RUNS / name, "noise_floor"))
        n = done[-1]["num_samples"]
        print(f"| {name} | {len(done)} | {done[-1]['samples_full'] // max(1, n)} x {n:,} "
              f"| {np.median([e['seconds'] for e in done]):.1f} s "
              f"| {np.median([e['timings']['uncertainty'] for e in done]):.2f} s | **{np.median(share):.1%}** "
              f"({min(share):.1%} .. {max(share):.1%}) | {floor:.1f} s | {floor / len(done):.2f} s |")
    print()


def _ties(comparison: dict[str, Any] | None, metric: str) -> tuple[str | None, list[str]]:
    if not comparison or metric not in comparison["metrics"]:
        return None, []
    c = comparison["metrics"][metric]
    return c["best"], sorted(v for v, x in c["variants"].items() if x["worse"] is False)


def race_shipped(metric: str, tmp: Path, racing_first: float | None = None) -> dict[str, Any]:
    """Race the last stage of the shipped tree2d run on ``metric`` with the run's own settings: the
    rounds only (the race's draws and its metric), which is what racing changes; the shipped run
    itself is the full sweep it is compared with."""
    from emascope import estimates as E
    from emascope.features import make_extractor
    from emascope.scoring import Reference, SweepResult, _race

    model, bank, settings, hooks, step = shipped_setup("tree2d")
    extra = {} if racing_first is None else {"racing_first": racing_first}
    cfg = ScoringConfig(**settings, racing=True, racing_metric=metric, **extra)
    extractor = make_extractor("identity", "points")
    reference = Reference.build(extractor(hooks.reference), cfg.nearest_k)
    res = SweepResult(step=step)
    writer = RunWriter(prepare_run_dir(tmp / f"race-{time.time_ns()}", overwrite=True))
    info = json.loads((RUNS / "tree2d" / "run.json").read_text())
    t = time.perf_counter()
    race, drawn = _race(model, bank, list(bank.variants), res, writer, cfg, hooks.sampler, extractor, reference,
                        hooks.sample_metrics, "fd", {**M.METRIC_DIRECTIONS, **info["metric_directions"]},
                        E.Halves(cfg))
    return {"race": race, "seconds": time.perf_counter() - t, "cfg": cfg, "variants": len(bank.variants),
            "step": step}


def racing_bench(metrics: list[str], tmp: Path, racing_first: float | None) -> None:
    print("## Racing on tree2d (default 11-variant sweep, last stage of the shipped run)\n")
    full = [e for e in _events(RUNS / "tree2d", "comparison")]
    print("| racing metric | samples drawn | full sweep | fewer samples | rounds (samples per variant: variants) "
          "| full sweep: best, tied | racing: best, still in the race | same best / in the tie |")
    print("|---|---:|---:|---:|---|---|---|---|")
    for metric in metrics:
        out = race_shipped(metric, tmp, racing_first)
        race, cfg = out["race"], out["cfg"]
        comparison = next((e for e in reversed(full) if e["step"] == out["step"]), None)
        drawn = sum(race.batches.values()) * cfg.batch_size
        total = cfg.num_samples * out["variants"]
        rounds = ", ".join(f"{min(r.batches * cfg.batch_size, cfg.num_samples):,}: {len(r.variants)}"
                           for r in race.rounds)
        fb, ft = _ties(comparison, metric)
        rb = race.rounds[-1].best
        same = "yes" if rb == fb else ("tie" if rb in ft else "NO")
        print(f"| {metric} | {drawn:,} | {total:,} | **{total / drawn:.2f}x** | {rounds} "
              f"| {fb}, {{{', '.join(ft)}}} | {rb}, {{{', '.join(race.survivors)}}} | {same} |")
    print()


def fresh_racing(metrics: list[str], num_samples: int, batch_size: int, tmp: Path,
                 racing_first: float | None = None) -> None:
    """Race the last stage of the shipped tree2d run from its bank, on each metric, against a full
    sweep of the same stage scored in the same process with the same settings (the agent's own
    ``Scorer.sweep``, with and without ``racing``): samples drawn, wall times, the final best and the
    full sweep's tie with its best. For shipped runs that recorded no comparison (written before
    intervals), and to choose the sample size."""
    over = {"num_samples": num_samples, "batch_size": batch_size, "noise_floor": False}
    race_over = {} if racing_first is None else {"racing_first": racing_first}
    print(f"## Racing on tree2d against a full sweep (default 11-variant sweep, bank of the shipped run's "
          f"last stage, {num_samples:,} samples per variant in batches of {batch_size})\n")
    print("| racing metric | samples drawn | full sweep | fewer samples | wall: race / full sweep "
          "| full sweep: best, tied | racing: best | same best / in the tie |")
    print("|---|---:|---:|---:|---:|---|---|---|", flush=True)
    full = sweep("tree2d", tmp, **over)
    t = full["done"]["timings"]
    print(f"<!-- full sweep: {full['wall']:.1f} s, intervals inside it {t['uncertainty']:.1f} s "
          f"({t['uncertainty'] / full['done']['seconds']:.1%}); timings {json.dumps(t)} -->", flush=True)
    for metric in metrics:
        out = sweep("tree2d", tmp, racing=True, racing_metric=metric, **over, **race_over)
        done = out["done"]
        drawn, total = done["samples_drawn"], full["done"]["samples_full"]
        fb, ft = _ties(full["comparison"], metric)
        rb, _ = _ties(out["comparison"], metric)
        same = "yes" if rb == fb else ("tie" if rb in ft else "NO")
        rounds = ", ".join(f"{r['n']:,}: {len(r['variants'])}" for r in (done.get("racing") or {}).get("rounds", []))
        print(f"| {metric} | {drawn:,} | {total:,} | **{total / max(1, drawn):.2f}x** "
              f"| {out['wall']:.0f} s / {full['wall']:.0f} s | {fb}, {{{', '.join(ft)}}} | {rb} | {same} |",
              flush=True)
        print(f"<!-- {metric}: rounds (samples per variant: variants) {rounds} -->", flush=True)
    print()


def _calibrate(d: int, reps: int, n: int) -> dict[str, tuple[float, float]]:
    """metric -> (coverage of the 95% interval, mean se / true sd) for one dimension."""
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(n, d, generator=g, dtype=torch.float64)
    rp, rd = M.knn_radii(ref, 3), M.knn_radii(ref, 5)
    stats = M.frechet_statistics(ref)
    root = U.sqrtm_psd(stats["sigma"])
    term = U.kid_reference_term(ref)
    masks = U.half_sample_masks(n, 100, 0)
    full = torch.ones(2, n, dtype=torch.bool)

    def draw() -> torch.Tensor:
        return torch.randn(n, d, generator=g, dtype=torch.float64) * 1.15 + 0.25

    def stat(x: torch.Tensor, mk: torch.Tensor) -> dict[str, np.ndarray]:
        s = U.neighbour_structure(x, ref, mk, ref_radii_prc=rp, ref_radii_dc=rd)
        out = U.prdc_replicates(s, mk)
        if mk is full:  # coverage's replicates delete one sample each: its full value comes apart
            out["coverage"] = np.array([U.prdc_values(s)["coverage"]])
        out["fd"] = U.fd_replicates(x, stats, mk, sqrt_cov_ref=root)
        out["kid_mean"] = U.kid_replicates(x, ref, mk, ref_term=term)
        return out

    values = [{k: v[0] for k, v in stat(draw(), full).items()} for _ in range(2 * reps)]
    truth = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
    sd = {k: float(np.std([v[k] for v in values])) for k in values[0]}
    hits = dict.fromkeys(truth, 0)
    ratio: dict[str, list[float]] = {k: [] for k in truth}
    for _ in range(reps):
        x = draw()
        v = {k: a[0] for k, a in stat(x, full).items()}
        r = stat(x, masks)
        for k in truth:
            est = U.Estimate(v[k], r[k], n, kept=n - 1 if k in U.DELETE_ONE_METRICS else None)
            lo, hi = est.interval(0.95, k)
            hits[k] += lo <= truth[k] <= hi
            ratio[k].append(est.se / sd[k])
    return {k: (hits[k] / reps, float(np.mean(ratio[k]))) for k in truth}


def calibration(reps: int, dims: list[int], n: int) -> None:
    print(f"## Calibration of the 95% intervals ({reps} repetitions, n = m = {n}, fixed reference)\n")
    print("| d | metric | coverage | mean se / true sd |")
    print("|---:|---|---:|---:|")
    for d in dims:
        res = _calibrate(d, reps, n)
        for k in ("fd", "kid_mean", "precision", "recall", "density", "coverage"):
            print(f"| {d} | {k} | {res[k][0]:.1%} | {res[k][1]:.2f} |")
    half = 3.29 * math.sqrt(reps * 0.95 * 0.05)
    lo, hi = (reps * 0.95 - half) / reps, min(reps, reps * 0.95 + half) / reps
    print(f"\n(99.9% binomial band for {reps} repetitions at 95%: about {lo:.1%} .. {hi:.1%})\n")


def scale(n: int, d: int, exact_reps: int) -> None:
    """FD and KID half values at feature scale (Gaussian features, one CPU thread): Eq. U-4 against the
    FD recomputed on each half (timed on ``exact_reps`` halves, scaled to 100), side by side."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.1
    stats = M.frechet_statistics(ref)
    root = U.sqrtm_psd(stats["sigma"])
    masks = U.half_sample_masks(n, U.DEFAULT_REPLICATES, 0)

    def timed(fn: Any) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    one = timed(lambda: M.frechet_distance_from_statistics(M.frechet_statistics(x), stats))
    linear = timed(lambda: U.fd_replicates(x, stats, masks, sqrt_cov_ref=root, method="linear"))
    exact = timed(lambda: U.fd_replicates(x, stats, masks[:exact_reps], sqrt_cov_ref=root, method="exact"))
    exact *= len(masks) / exact_reps
    term = U.kid_reference_term(ref)
    kid = timed(lambda: U.kid_replicates(x, ref, masks, ref_term=term))
    print(f"## Half values at scale: n = m = {n:,}, d = {d}, {len(masks)} halves, one CPU thread\n")
    print("| one FD | FD halves, Eq. U-4 | FD halves recomputed (from "
          f"{exact_reps}, scaled) | ratio | KID halves |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {one:.1f} s | {linear:.1f} s | {exact:.0f} s | **{exact / linear:.0f}x** | {kid:.1f} s |\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="tree2d,digits", help="shipped runs for the cost table")
    p.add_argument("--repeats", type=int, default=1, help="interleaved sweeps with / without intervals")
    p.add_argument("--racing-metrics", default="fd,log_likelihood,tail_coverage,precision",
                   help="racing metrics for tree2d")
    p.add_argument("--racing-first", type=float, default=None, help="racing_first (default: the agent's)")
    p.add_argument("--no-cost", action="store_true")
    p.add_argument("--fresh", action="store_true",
                   help="also score the last stage again with and without intervals, interleaved")
    p.add_argument("--no-racing", action="store_true")
    p.add_argument("--num-samples", type=int, default=0, help="--fresh: samples per variant (default: the run's)")
    p.add_argument("--calibration", action="store_true", help="only the calibration table")
    p.add_argument("--calibration-reps", type=int, default=200)
    p.add_argument("--calibration-n", type=int, default=500)
    p.add_argument("--calibration-dims", default="2,16,64", help="feature dimensions of the calibration table")
    p.add_argument("--fresh-racing", type=int, default=0, metavar="N",
                   help="race tree2d's last stage against a full sweep scored here, N samples per variant")
    p.add_argument("--fresh-batch", type=int, default=250, help="batch size of --fresh-racing")
    p.add_argument("--scale", type=int, default=0, metavar="N",
                   help="only the FD/KID half values at N samples and --scale-dim features (Inception: 2048)")
    p.add_argument("--scale-dim", type=int, default=2048)
    p.add_argument("--scale-exact", type=int, default=4, help="halves recomputed exactly under --scale")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.scale:
        scale(args.scale, args.scale_dim, args.scale_exact)
        return 0
    if args.calibration:
        calibration(args.calibration_reps, [int(d) for d in args.calibration_dims.split(",") if d],
                    args.calibration_n)
        return 0
    with tempfile.TemporaryDirectory(prefix="emascope-bench-unc-") as tmp:
        if args.fresh_racing:
            fresh_racing([m for m in args.racing_metrics.split(",") if m], args.fresh_racing, args.fresh_batch,
                         Path(tmp), args.racing_first)
            return 0
        names = [r for r in args.runs.split(",") if r]
        if not args.no_cost:
            recorded_cost(names)
            if args.fresh:
                cost(names, args.repeats, Path(tmp),
                     **({"num_samples": args.num_samples} if args.num_samples else {}))
        if not args.no_racing:
            racing_bench([m for m in args.racing_metrics.split(",") if m], Path(tmp), args.racing_first)
    return 0


if __name__ == "__main__":
    sys.exit(main())
