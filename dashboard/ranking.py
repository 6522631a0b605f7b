"""Pure functions that rank EMA variants from a metrics DataFrame (see dashboard/data.py).

Input frames have the columns of ``data.METRIC_COLUMNS``: ``step`` (scoring stage, optimizer
steps), ``variant`` (``"raw"``, ``repr(float(d))``, ``"bema"``), ``decay`` (the EMA decay ``d``,
NaN for raw/bema), ``metric``, ``value`` (NaN when not finite). ``direction`` is ``"lower"`` or
``"higher"`` (which way is better) or None (unknown: shown, never ranked).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from emascope.runformat import BEMA, RAW, decay_of

DEFAULT_DECAY_VARIANT = "0.9999"  # the community default the recommendation compares against
MAD_Z_THRESHOLD = 5.0  # robust z (0.6745 * |x - median| / MAD) above which a value is off the scale
MIN_GAP_LOWER = 2.0  # ...and, for lower-is-better metrics, at least this x |median| above it (3x)
MIN_GAP_HIGHER = 0.75  # ...for higher-is-better ones, this x |median| below it (a quarter of it)
RECALL_COLLAPSE = 0.02  # recall at or below this is "recall ~ 0"


def variant_order(variants: Iterable[str]) -> list[str]:
    """Variants in display order: raw, fixed decays ascending, bema, then others by name."""
    uniq = list(dict.fromkeys(variants))

    def key(v: str) -> tuple[int, float, str]:
        if v == RAW:
            return (0, 0.0, v)
        d = decay_of(v)
        if d is not None:
            return (1, d, v)
        return (2, 0.0, v) if v == BEMA else (3, 0.0, v)

    return sorted(uniq, key=key)


def format_value(v: float | None) -> str:
    """A metric value with 4 significant digits (``"3.204"``, ``"0.0213"``, ``"444.8"``); ``—`` for NaN."""
    if v is None or not math.isfinite(v):
        return "—"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4g}"


def format_step(step: int) -> str:
    """A step with thousands separators: ``12,500``."""
    return f"{int(step):,}"


def pick_stages(steps: Sequence[int], max_n: int) -> list[int]:
    """At most ``max_n`` stages of ``steps`` (sorted, unique), evenly spaced, first and last kept."""
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n!r}")
    s = sorted(set(int(x) for x in steps))
    if len(s) <= max_n:
        return s
    if max_n == 1:
        return [s[-1]]
    idx = np.unique(np.round(np.linspace(0, len(s) - 1, max_n)).astype(int))
    return [s[i] for i in idx]


def metric_table(metrics: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Stage x variant table of one metric (index: step ascending; columns: variant_order)."""
    sub = metrics[metrics["metric"] == metric]
    if sub.empty:
        return pd.DataFrame()
    try:  # frames from data.metric_records_to_frame hold one row per (step, variant, metric)
        table = sub.pivot(index="step", columns="variant", values="value")
    except ValueError:
        table = sub.pivot_table(index="step", columns="variant", values="value", aggfunc="last", dropna=False)
    table = table.reindex(columns=variant_order(table.columns)).sort_index()
    table.columns.name = None
    return table


def best_of_row(row: pd.Series, direction: str | None) -> tuple[str | None, float]:
    """(variant, value) of the best finite entry of one stage's row; (None, NaN) if none/unknown.

    Ties go to the first variant in :func:`variant_order` (the smaller decay), whatever the row's order.
    """
    if direction not in ("lower", "higher"):
        return None, math.nan
    vals = row.dropna()
    vals = vals[~vals.index.duplicated(keep="last")]
    vals = vals.reindex(variant_order(vals.index))
    if vals.empty:
        return None, math.nan
    v = vals.idxmin() if direction == "lower" else vals.idxmax()
    return str(v), float(vals[v])


def best_per_stage(metrics: pd.DataFrame, metric: str, direction: str | None) -> pd.DataFrame:
    """Best variant of each stage for one metric: columns step, variant, decay, value.

    Empty when the direction is unknown (a metric missing from ``metric_directions`` is never
    ranked). Ties go to the first variant in :func:`variant_order` (the smaller decay).
    """
    cols = ["step", "variant", "decay", "value"]
    table = metric_table(metrics, metric)
    if table.empty or direction not in ("lower", "higher"):
        return pd.DataFrame(columns=cols)
    arr = table.to_numpy(dtype=float)
    ok = np.isfinite(arr)
    has = ok.any(axis=1)
    fill = np.inf if direction == "lower" else -np.inf
    masked = np.where(ok, arr, fill)
    idx = masked.argmin(axis=1) if direction == "lower" else masked.argmax(axis=1)  # first = smaller decay
    variants = np.asarray(table.columns, dtype=object)[idx][has]
    return pd.DataFrame(
        {
            "step": table.index.to_numpy(dtype="int64")[has],
            "variant": variants,
            "decay": [math.nan if (d := decay_of(v)) is None else d for v in variants],
            "value": masked[np.arange(len(arr)), idx][has],
        },
        columns=cols,
    )


def best_decay_drift(metrics: pd.DataFrame, directions: Mapping[str, str]) -> pd.DataFrame:
    """Best variant per (metric, stage) of every ranked metric.

    Columns: metric, step, variant, decay, value.
    """
    parts = []
    for metric in sorted(set(metrics["metric"])):
        b = best_per_stage(metrics, metric, directions.get(metric))
        if not b.empty:
            parts.append(b.assign(metric=metric))
    if not parts:
        return pd.DataFrame(columns=["metric", "step", "variant", "decay", "value"])
    return pd.concat(parts, ignore_index=True)[["metric", "step", "variant", "decay", "value"]]


def improvement(best: float, other: float, direction: str) -> tuple[float, float]:
    """How much better ``best`` is than ``other``: (absolute, relative to |other|), both >= 0 when better.

    For ``"lower"`` metrics that is ``other - best``; for ``"higher"``, ``best - other``.
    The relative gap is NaN when ``other`` is 0 or not finite.
    """
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be 'lower' or 'higher', got {direction!r}")
    diff = (other - best) if direction == "lower" else (best - other)
    rel = diff / abs(other) if other and math.isfinite(other) else math.nan
    return diff, rel


def detect_collapse(row: pd.Series, direction: str | None, metric: str = "") -> dict[str, str]:
    """Variants of one stage whose value is off the scale of the rest: variant -> reason.

    Robust rule: robust z = 0.6745 * |x - median| / MAD above :data:`MAD_Z_THRESHOLD`, on the
    bad side (above the median for "lower" metrics, below for "higher"; either side when the
    direction is unknown), and far from the median in relative terms: at least 3x the median
    for "lower" metrics, at most a quarter of it for "higher" ones (:data:`MIN_GAP_LOWER`,
    :data:`MIN_GAP_HIGHER`).
    A recall at or below :data:`RECALL_COLLAPSE` is always a collapse ("recall ~ 0"). A non-finite
    value among finite ones is reported as "non-finite".
    """
    out: dict[str, str] = {}
    vals = row.astype(float)
    finite = vals[np.isfinite(vals.to_numpy())]
    if metric == "recall":
        for v, x in finite.items():
            if x <= RECALL_COLLAPSE:
                out[str(v)] = "recall ≈ 0"
    if len(finite) and len(finite) < len(vals):
        for v in vals.index.difference(finite.index):
            out.setdefault(str(v), f"{metric or 'metric'} not finite")
    if len(finite) < 4:
        return out
    med = float(np.median(finite))
    mad = float(np.median(np.abs(finite - med)))
    for v, x in finite.items():
        dev = x - med
        bad_side = dev > 0 if direction == "lower" else dev < 0 if direction == "higher" else dev != 0
        min_gap = MIN_GAP_HIGHER if direction == "higher" else MIN_GAP_LOWER
        if not bad_side or abs(dev) < min_gap * abs(med) or abs(dev) == 0:
            continue
        z = math.inf if mad == 0 else 0.6745 * abs(dev) / mad
        if z > MAD_Z_THRESHOLD:
            out.setdefault(str(v), f"{metric or 'metric'} off the scale")
    return out


def collapses(metrics: pd.DataFrame, directions: Mapping[str, str], step: int) -> dict[str, list[str]]:
    """All collapse findings of one stage over every metric: variant -> reasons."""
    out: dict[str, list[str]] = {}
    sub = metrics[metrics["step"] == step]
    for metric, g in sub.groupby("metric"):
        row = g.set_index("variant")["value"]
        for v, reason in detect_collapse(row, directions.get(metric), str(metric)).items():
            out.setdefault(v, []).append(reason)
    return {v: out[v] for v in variant_order(out)}


def _decay_label(variant: str) -> str:
    return f"decay {variant}" if decay_of(variant) is not None else variant


@dataclass
class Recommendation:
    """What the banner says: the text (Markdown) plus the numbers behind it."""

    text: str
    level: str = "info"  # "info", "warning" or "error"
    step: int | None = None
    best_variant: str | None = None
    best_value: float | None = None
    collapsed: dict[str, list[str]] = field(default_factory=dict)


def _disagreement(metrics: pd.DataFrame, directions: Mapping[str, str], step: int, metric: str) -> str | None:
    quality = (
        metric
        if metric not in ("precision", "recall")
        else next((m for m in ("fid", "fd") if m in set(metrics["metric"])), None)
    )
    names = [m for m in ("precision", "recall", quality) if m]
    if len(set(names)) < 3:
        return None
    sub = metrics[metrics["step"] == step]
    bests: dict[str, str] = {}
    for m in names:
        row = sub[sub["metric"] == m].set_index("variant")["value"]
        v, _ = best_of_row(row, directions.get(m))
        if v is None:
            return None
        bests[m] = v
    if len(set(bests.values())) == 1:
        return None
    parts = [f"{m} at {_decay_label(v)}" for m, v in bests.items()]
    return (
        "Precision, recall and "
        + quality
        + " disagree on the best decay ("
        + ", ".join(parts)
        + "): choosing a decay trades fidelity against coverage."
    )


def recommend(
    metrics: pd.DataFrame, directions: Mapping[str, str], metric: str, step: int | None = None
) -> Recommendation:
    """The recommendation for ``metric`` at ``step`` (default: the latest stage with that metric).

    Says which variant is best and its value, how much better it is than the community default
    0.9999 and than raw, one sentence when the precision-, recall- and quality-optimal decays
    differ, and a warning for collapsed variants.
    """
    sub = metrics[metrics["metric"] == metric]
    if sub.empty:
        return Recommendation(f"No scores for **{metric}** yet.", level="info")
    if step is None:
        step = int(sub["step"].max())
    row = sub[sub["step"] == step].set_index("variant")["value"]
    if row.empty:
        return Recommendation(f"No scores for **{metric}** at step {format_step(step)}.", step=step)
    direction = directions.get(metric)
    where = f"At step {format_step(step)}"
    if direction not in ("lower", "higher"):
        return Recommendation(
            f"{where}: **{metric}** has no known direction (not in run.json's metric_directions), "
            "so no variant is ranked best.",
            step=step,
        )
    best, value = best_of_row(row, direction)
    if best is None:
        return Recommendation(
            f"{where}: every variant's **{metric}** is non-finite.", level="warning", step=step
        )
    word = "lower" if direction == "lower" else "higher"
    sentences = [f"{where}, the best **{metric}** is **{format_value(value)}** at **{_decay_label(best)}**"]
    comps = []
    for ref, label in ((DEFAULT_DECAY_VARIANT, "the community default 0.9999"), (RAW, "raw weights")):
        if ref == best or ref not in row.index:
            continue
        other = float(row[ref])
        if not math.isfinite(other):
            comps.append(f"{label} is non-finite")
            continue
        diff, rel = improvement(value, other, direction)
        pct = f" ({abs(rel) * 100:.1f}%)" if math.isfinite(rel) else ""
        if diff > 0:
            comps.append(f"{format_value(diff)}{pct} {word} than {label} ({format_value(other)})")
        else:
            comps.append(f"equal to {label} ({format_value(other)})")
    if best == DEFAULT_DECAY_VARIANT:
        comps.append("the community default 0.9999 is the best here")
    text = sentences[0] + (": " + "; ".join(comps) if comps else "") + "."
    extra = _disagreement(metrics, directions, step, metric)
    if extra:
        text += "\n\n" + extra
    coll = collapses(metrics, directions, step)
    level = "info"
    if coll:
        level = "warning"
        text += (
            "\n\n**Collapse** (ignore these variants): "
            + "; ".join(f"{_decay_label(v)} ({', '.join(r)})" for v, r in coll.items())
            + "."
        )
    return Recommendation(text, level=level, step=step, best_variant=best, best_value=value, collapsed=coll)


def compare_runs(
    runs: Mapping[str, pd.DataFrame], metric: str, direction: str | None, fixed: str = DEFAULT_DECAY_VARIANT
) -> pd.DataFrame:
    """Rank runs at a fixed decay and at each run's own best decay, at every stage they share.

    Returns columns step, run, fixed_value, fixed_rank, best_variant, best_value, best_rank
    (rank 1 = best; ranks are NaN where a run lacks the value). Empty for an unknown direction
    or when the runs share no stage.
    """
    cols = ["step", "run", "fixed_value", "fixed_rank", "best_variant", "best_value", "best_rank"]
    if direction not in ("lower", "higher") or len(runs) < 1:
        return pd.DataFrame(columns=cols)
    tables = {name: metric_table(df, metric) for name, df in runs.items()}
    tables = {k: t for k, t in tables.items() if not t.empty}
    if not tables:
        return pd.DataFrame(columns=cols)
    common = sorted(set.intersection(*(set(t.index) for t in tables.values())))
    rows = []
    for step in common:
        for name, t in tables.items():
            r = t.loc[step]
            fv = float(r[fixed]) if fixed in r.index else math.nan
            bv_name, bv = best_of_row(r, direction)
            rows.append((int(step), name, fv, bv_name, bv))
    df = pd.DataFrame(rows, columns=["step", "run", "fixed_value", "best_variant", "best_value"])
    asc = direction == "lower"
    df["fixed_rank"] = df.groupby("step")["fixed_value"].rank(ascending=asc, method="min")
    df["best_rank"] = df.groupby("step")["best_value"].rank(ascending=asc, method="min")
    return df[cols]


def ranking_flips(comparison: pd.DataFrame) -> list[tuple[int, str, str]]:
    """Stages where two runs swap order between the fixed-decay and the best-decay ranking.

    Returns (step, run_a, run_b) with run_a ahead at the fixed decay and run_b ahead at the
    best decays.
    """
    flips = []
    for step, g in comparison.groupby("step"):
        g = g.dropna(subset=["fixed_rank", "best_rank"])
        recs = list(g.itertuples(index=False))
        for a in recs:
            for b in recs:
                if a.fixed_rank < b.fixed_rank and a.best_rank > b.best_rank:
                    flips.append((int(step), a.run, b.run))
    return flips


_METRIC_ORDER = ("fid", "fd", "kid_mean", "isc_mean", "precision", "recall", "density", "coverage")


def order_metrics(names: Iterable[str]) -> list[str]:
    """Metric names for the picker: the standard ones in a fixed order, then the rest by name."""
    names = list(dict.fromkeys(names))
    known = [m for m in _METRIC_ORDER if m in names]
    return known + sorted(m for m in names if m not in _METRIC_ORDER)
