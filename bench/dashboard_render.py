"""Time the dashboard's data + figure path on a large run: 100 stages x 11 variants x 8 metrics.

Side by side in one process: cold read vs incremental re-read after one appended stage, and the
figure path with downsampling (the app's default) vs drawing every stage. Figures are serialised
to JSON (what Streamlit sends to the browser). Prints medians and ratios; asserts nothing.

    .venv/bin/python bench/dashboard_render.py [--stages 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

from emascope.dashboard import plots, ranking
from emascope.dashboard.data import RunReader
from emascope.ema_math import DEFAULT_DECAYS
from emascope.metrics import METRIC_DIRECTIONS
from emascope.rundir import RunWriter
from emascope.runformat import RAW, variant_name

METRICS = ("fid", "precision", "recall", "density", "coverage", "kid_mean", "isc_mean", "fd")
VARIANTS = [RAW] + [variant_name(d) for d in DEFAULT_DECAYS]


def synthetic_value(metric: str, step: int, variant: str, total: int) -> float:
    """A decay sweep's shape: FID U-shaped in log10(1 - decay) with a drifting optimum."""
    frac = min(step / total, 1.0)
    x = 0.0 if variant == RAW else -math.log10(1.0 - float(variant))
    fid = 3.0 - frac + 0.2 * (x - 2.2 - 1.5 * frac) ** 2
    prec, rec = min(0.95, 0.55 + 0.06 * x), max(0.0, 0.75 - 0.035 * x * x)
    return {"fid": fid, "fd": fid / 100, "precision": prec, "recall": rec, "density": 1.1 * prec,
            "coverage": 0.9 * rec, "kid_mean": fid / 1000, "isc_mean": 10 - fid}[metric]


def write_stage(writer: RunWriter, step: int, total: int) -> None:
    for v in VARIANTS:
        for m in METRICS:
            writer.metric(step, v, m, synthetic_value(m, step, v, total))


def make_run(root: Path, steps: list[int]) -> tuple[Path, RunWriter]:
    """A run directory written by the agent's own RunWriter: run.json and every stage's metrics."""
    run_dir = root / "big"
    writer = RunWriter(run_dir)
    writer.write_run_json({"run_id": "bench", "name": "big", "decays": list(DEFAULT_DECAYS), "variants": VARIANTS,
                           "metric_directions": {m: METRIC_DIRECTIONS[m] for m in METRICS},
                           "sample_kind": "points"})
    for s in steps:
        write_stage(writer, s, steps[-1])
    return run_dir, writer


def render(run, metric: str, stage: int, max_lines: int) -> int:
    """Everything the app computes for one rerun; returns bytes of figure JSON."""
    rec = ranking.recommend(run.metrics, run.directions, metric, stage)
    d = run.directions.get(metric)
    figs = [
        plots.metric_vs_decay(run.metrics, metric, d, max_lines=max_lines),
        plots.heatmap(run.metrics, metric, d),
        plots.precision_recall(run.metrics, stage, metric),
        plots.best_decay_over_training(ranking.best_decay_drift(run.metrics, run.directions)),
    ]
    return len(rec.text) + sum(len(f.to_json()) for f in figs)


def timeit(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        steps = list(range(1000, 1000 * (a.stages + 1), 1000))
        run_dir, writer = make_run(Path(tmp), steps)
        n = len(RunReader(run_dir).load().metrics)
        print(f"run: {a.stages} stages x 11 variants x {len(METRICS)} metrics = {n} records")

        cold = timeit(lambda: RunReader(run_dir).load(), a.repeats)
        reader = RunReader(run_dir)
        reader.load()
        next_step = [steps[-1]]

        incs = []
        for _ in range(a.repeats):  # the agent appends one stage (not timed), the reader catches up (timed)
            next_step[0] += 1000
            write_stage(writer, next_step[0], steps[-1])
            t = time.perf_counter()
            reader.load()
            incs.append(time.perf_counter() - t)
        inc = statistics.median(incs)
        unchanged = timeit(reader.load, a.repeats)
        print(f"read: cold {cold * 1e3:.1f} ms | after one appended stage {inc * 1e3:.1f} ms "
              f"| unchanged {unchanged * 1e3:.2f} ms | cold/incremental = {cold / inc:.1f}x")

        run = reader.load()
        stage = int(run.metrics["step"].max())
        down = timeit(lambda: render(run, "fid", stage, plots.MAX_LINES), a.repeats)
        full = timeit(lambda: render(run, "fid", stage, 10_000), a.repeats)
        print(f"data+figures per rerun: downsampled ({plots.MAX_LINES} lines) {down * 1e3:.0f} ms | "
              f"all {a.stages + a.repeats} lines {full * 1e3:.0f} ms | all/downsampled = {full / down:.2f}x")
        total = inc + down
        print(f"one live refresh (incremental read + downsampled figures): {total * 1e3:.0f} ms "
              f"({'under' if total < 1 else 'OVER'} the 1 s budget)")


if __name__ == "__main__":
    main()
