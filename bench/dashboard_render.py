"""Time the dashboard's data + figure path on a large run: 100 stages x 11 variants x 8 metrics.

Side by side in one process: cold read vs incremental re-read after one appended stage, and the
figure path with downsampling (the app's default) vs drawing every stage. Figures are serialised
to JSON (what Streamlit sends to the browser). Prints medians and ratios; asserts nothing.

    .venv/bin/python bench/dashboard_render.py [--stages 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dashboard_fixtures import make_run, metric_lines, write_jsonl  # noqa: E402

from dashboard import plots, ranking  # noqa: E402
from dashboard.data import RunReader  # noqa: E402

METRICS = ("fid", "precision", "recall", "density", "coverage", "kid_mean", "isc_mean", "fd")


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
        run_dir = make_run(Path(tmp), "big", steps=steps, metrics=METRICS, samples=False)
        n = sum(1 for _ in open(run_dir / "metrics.jsonl"))
        print(f"run: {a.stages} stages x 11 variants x {len(METRICS)} metrics = {n} records")

        cold = timeit(lambda: RunReader(run_dir).load(), a.repeats)
        reader = RunReader(run_dir)
        reader.load()
        next_step = [steps[-1]]

        def incremental():
            next_step[0] += 1000
            write_jsonl(run_dir / "metrics.jsonl", metric_lines([next_step[0]], metrics=METRICS))
            reader.load()

        inc = timeit(incremental, a.repeats)
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
