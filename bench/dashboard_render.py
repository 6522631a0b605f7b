"""Time the dashboard's data + figure path on a large run: 100 stages x 11 variants x 8 metrics.

Side by side in one process: cold read vs incremental re-read after one appended stage, the
hardened reader (regular files only, byte caps, records validated: emascope.dashboard.files) vs the
reader as it was before (``read_bytes`` + ``json.loads`` per line + a DataFrame, type checks only),
and the figure path with downsampling (the app's default) vs drawing every stage. Figures are
serialised to JSON (what Streamlit sends to the browser). With ``--runs N`` (default 3000) also a
folder of N small runs: one rerun of the page as it was (every run read, the Compare tab drawing
all of them) vs as it is (bounded discovery, the shown run, Compare over 8 chosen runs). Prints
medians and ratios; asserts nothing.

    .venv/bin/python bench/dashboard_render.py [--stages 100] [--repeats 5] [--runs 3000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

from emascope import runformat as rf
from emascope.dashboard import plots, ranking
from emascope.dashboard.data import RunReader, find_runs
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


def plain_load(run_dir: Path) -> pd.DataFrame:
    """The reader as it was before the hardening, on the same files: read each file whole, parse
    every complete line, keep records whose step is an int and variant/metric are strings, build
    the frame (last record per key). No caps, no file-kind checks, no range or variant checks."""
    json.loads((run_dir / rf.RUN_JSON).read_bytes())
    if (run_dir / rf.EVENTS).exists():
        [json.loads(x) for x in (run_dir / rf.EVENTS).read_bytes().splitlines() if x.strip()]
    rows = []
    for line in (run_dir / rf.METRICS).read_bytes().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if isinstance(r.get("step"), int) and isinstance(r.get("variant"), str) and isinstance(r.get("metric"), str):
            rows.append((r["step"], r["variant"], r.get("decay"), r["metric"], r.get("value"), r.get("time")))
    frame = pd.DataFrame(rows, columns=list(rf.METRIC_KEYS)).astype(
        {"step": "int64", "decay": "float64", "value": "float64", "time": "float64"})
    return frame.drop_duplicates(["step", "variant", "metric"], keep="last").reset_index(drop=True)


def make_folder(root: Path, n: int) -> Path:
    """``n`` small runs (2 stages x 11 variants x fid) in one folder, as written by the agent's RunWriter."""
    folder = root / "many"
    for i in range(n):
        w = RunWriter(folder / f"run{i:05d}")
        w.write_run_json({"run_id": f"r{i}", "name": f"run{i:05d}", "decays": list(DEFAULT_DECAYS),
                          "variants": VARIANTS, "metric_directions": {"fid": "lower"}})
        for step in (1000, 2000):
            for v in VARIANTS:
                w.metric(step, v, "fid", synthetic_value("fid", step, v, 2000) + 0.01 * (i % 7))
    return folder


def rerun_eager(folder: Path, readers: dict) -> int:
    """One rerun as the page was: walk the folder, read every run (cached readers), compare all of them."""
    runs = sorted(Path(d) for d, _, files in os.walk(folder) if rf.RUN_JSON in files)
    frames = {}
    for p in runs:
        d = readers.setdefault(p, RunReader(p)).load()
        frames[d.name] = d.metrics
    comp = ranking.compare_runs(frames, "fid", "lower")
    return len(plots.compare_runs_figure(comp, "fid").to_json())


def rerun_lazy(folder: Path, readers: dict, compared: int = 8) -> int:
    """One rerun as the page is: bounded discovery, the shown run, Compare over the chosen runs."""
    runs = find_runs(folder).runs
    readers.setdefault(runs[-1], RunReader(runs[-1])).load()
    frames = {}
    for p in runs[:compared]:
        d = readers.setdefault(p, RunReader(p)).load()
        frames[d.name] = d.metrics
    comp = ranking.compare_runs(frames, "fid", "lower")
    return len(plots.compare_runs_figure(comp, "fid").to_json())


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
    ap.add_argument("--runs", type=int, default=3000, help="runs in the folder scenario (0: skip it)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        steps = list(range(1000, 1000 * (a.stages + 1), 1000))
        run_dir, writer = make_run(Path(tmp), steps)
        n = len(RunReader(run_dir).load().metrics)
        print(f"run: {a.stages} stages x 11 variants x {len(METRICS)} metrics = {n} records")

        colds, plains = [], []
        for _ in range(a.repeats):  # interleaved: the hardened reader and a plain read of the same files
            t = time.perf_counter()
            RunReader(run_dir).load()
            colds.append(time.perf_counter() - t)
            t = time.perf_counter()
            plain_load(run_dir)
            plains.append(time.perf_counter() - t)
        cold, plain = statistics.median(colds), statistics.median(plains)
        print(f"cold read: hardened reader {cold * 1e3:.1f} ms | reader before hardening {plain * 1e3:.1f} ms "
              f"| hardened/before = {cold / plain:.2f}x")
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
        if a.runs:
            folder = make_folder(Path(tmp), a.runs)
            eager_readers: dict = {}
            lazy_readers: dict = {}
            rerun_eager(folder, eager_readers)  # first view (cold reads) not timed: reruns are
            rerun_lazy(folder, lazy_readers)
            eager, lazy = [], []
            for _ in range(max(1, a.repeats // 2)):
                t = time.perf_counter()
                rerun_eager(folder, eager_readers)
                eager.append(time.perf_counter() - t)
                t = time.perf_counter()
                rerun_lazy(folder, lazy_readers)
                lazy.append(time.perf_counter() - t)
            e, z = statistics.median(eager), statistics.median(lazy)
            print(f"folder of {a.runs} runs, one rerun: every run read + Compare of all ({2 * a.runs} traces) "
                  f"{e * 1e3:.0f} ms | bounded discovery + shown run + Compare of 8 (16 traces) {z * 1e3:.0f} ms "
                  f"| before/after = {e / z:.1f}x")


if __name__ == "__main__":
    main()
