"""Markdown tables of a finished run, read with the dashboard's data layer (no torch).

```bash
python -m emascope.samples.report sample_runs/runs/tree2d --step 8000
```

Prints, for one stage, a table in the form the field uses (one row per variant, one column per
metric, the best value of each column in bold), then the best variant per metric at every stage.
Used to write sample_runs/README.md from the shipped runs.

With the uncertainty the run recorded (docs/run-format.md, "Intervals"): every value is followed by
``± z se`` (the half-width of its interval at the run's level), a value statistically tied with its
column's best is marked ``≈`` (its paired difference to the best has an interval containing 0), a
last row gives the noise floor, and the best-per-stage table says how many variants tie with the best.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist

import pandas as pd

from emascope.dashboard import intervals
from emascope.dashboard.data import load_run
from emascope.dashboard.ranking import best_per_stage, variant_order

DEFAULT_METRICS = {
    "points": ["fd", "precision", "recall", "coverage", "tail_coverage", "log_likelihood"],
    "images": ["fd", "isc_mean", "kid_mean", "precision", "recall", "coverage"],
}


def _fmt(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    if v != 0 and abs(v) < 0.01:
        return f"{v:.2e}"
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"


def _pm(v: float, se: float | None, z: float) -> str:
    if se is None or not math.isfinite(se) or not math.isfinite(v):
        return _fmt(v)
    return f"{_fmt(v)} ± {_fmt(z * se)}"


def stage_table(metrics: pd.DataFrame, directions: dict[str, str], step: int, names: Sequence[str],
                events: Sequence[dict] = ()) -> str:
    """Markdown table of ``names`` for every variant at ``step``; best of each column in bold; with the
    run's recorded intervals (``events``): ``± z se``, ``≈`` on the variants tied with the best, and
    the noise floor as the last row."""
    sub = metrics[metrics["step"] == step]
    table = sub.pivot_table(index="variant", columns="metric", values="value", aggfunc="last")
    se = (sub.pivot_table(index="variant", columns="metric", values="se", aggfunc="last")
          if "se" in sub.columns and sub["se"].notna().any() else pd.DataFrame())
    names = [n for n in names if n in table.columns]
    table = table.reindex(variant_order(table.index))
    comps = intervals.comparisons(events)
    floor = intervals.noise_floor(events)
    level = next((c.level for (s, _), c in comps.items() if s == step), 0.95)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    best, tied = {}, {}
    for n in names:
        comp = comps.get((step, n))
        col = table[n].dropna()
        if comp is not None and comp.best in col.index:
            best[n], tied[n] = comp.best, set(comp.ties())
        elif len(col) and directions.get(n) in ("lower", "higher"):
            best[n] = col.idxmin() if directions[n] == "lower" else col.idxmax()
    arrows = {n: {"lower": " ↓", "higher": " ↑"}.get(directions.get(n, ""), "") for n in names}
    lines = ["| variant | " + " | ".join(f"{n}{arrows[n]}" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for variant, row in table.iterrows():
        cells = []
        for n in names:
            e = se.at[variant, n] if not se.empty and n in se.columns and variant in se.index else None
            text = _pm(row[n], None if e is None or pd.isna(e) else float(e), z)
            if best.get(n) == variant:
                text = f"**{text}**"
            elif variant in tied.get(n, ()):
                text = f"≈ {text}"
            cells.append(text)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    if floor:
        src = next(iter(floor.values()))
        label = f"*noise floor ({src.label}, n = {src.n:,})*" if src.n else f"*noise floor ({src.label})*"
        cells = []
        for n in names:
            f = floor.get(n)
            if f is None:
                cells.append("")
            elif f.lo is not None and f.hi is not None:
                cells.append(f"*{_fmt(f.value)} [{_fmt(f.lo)}, {_fmt(f.hi)}]*")
            else:
                cells.append(f"*{_fmt(f.value)}*")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_table(metrics: pd.DataFrame, directions: dict[str, str], names: Sequence[str],
               events: Sequence[dict] = ()) -> str:
    """Markdown table: best variant per metric (columns) at every stage (rows), with ``(+k tied)``
    when ``k`` other variants are statistically tied with it (recorded comparisons)."""
    names = [n for n in names if directions.get(n) in ("lower", "higher") and n in set(metrics["metric"])]
    per = {n: best_per_stage(metrics, n, directions[n]).set_index("step")["variant"] for n in names}
    comps = intervals.comparisons(events)
    steps = sorted(metrics["step"].unique())
    lines = ["| step | " + " | ".join(names) + " |", "|---:|" + "---|" * len(names)]
    for s in steps:
        cells = []
        for n in names:
            comp = comps.get((int(s), n))
            if comp is not None:
                k = len(comp.ties()) - 1
                cells.append(comp.best + (f" (+{k} tied)" if k else ""))
            else:
                cells.append(str(per[n].get(s, "—")))
        lines.append(f"| {int(s)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emascope.samples.report", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, default=None, help="stage of the table (default: the last)")
    p.add_argument("--metrics", default=None, help="comma-separated metric names")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    run = load_run(Path(args.run_dir))
    if run.error:
        print(f"report: {args.run_dir}: {run.error}", file=sys.stderr)
        return 2
    if run.metrics.empty:
        print(f"report: {args.run_dir}: no metrics yet", file=sys.stderr)
        return 2
    steps = sorted(int(s) for s in run.metrics["step"].unique())
    step = args.step if args.step is not None else steps[-1]
    if step not in steps:
        print(f"report: no stage at step {step}; stages: {steps}", file=sys.stderr)
        return 2
    names = args.metrics.split(",") if args.metrics else DEFAULT_METRICS.get(run.sample_kind or "", [])
    print(f"Stage {step} of {run.name} ({len(steps)} stages: {', '.join(map(str, steps))})\n")
    print(stage_table(run.metrics, run.directions, step, names, run.events))
    print("\nBest variant per metric and stage\n")
    print(best_table(run.metrics, run.directions, names, run.events))
    return 0


if __name__ == "__main__":
    sys.exit(main())
