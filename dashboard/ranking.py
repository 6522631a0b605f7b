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

from emascope.dashboard.intervals import (
    BestChange,
    Floor,
    MetricComparison,
    at_floor,
    samples_to_separate,
)
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
    ties: list[str] = field(default_factory=list)  # variants statistically tied with the best (best included)
    samples_to_separate: int | None = None  # per variant, to likely separate the best from the runner-up


def tie_phrase(tied: Iterable[str], variants: Iterable[str]) -> str:
    """The tied variants as runs of consecutive variants (in :func:`variant_order` of ``variants``):
    ``"0.999–0.9995"``, ``"raw, 0.9–0.99"``."""
    order = variant_order(variants)
    tied = set(tied)
    runs: list[list[str]] = []
    for v in order:
        if v in tied:
            if runs and runs[-1][-1] == order[order.index(v) - 1]:
                runs[-1].append(v)
            else:
                runs.append([v])
    return ", ".join(r[0] if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs)


def _fmt_count(n: int) -> str:
    return f"{n:,}" if n < 10_000_000 else f"{n:.1e}"


def uncertainty_sentences(comp: MetricComparison, value: float, variants: Iterable[str], metric: str,
                          floor: Floor | None = None) -> tuple[list[str], list[str], int | None]:
    """What the recorded intervals say about the best of one stage: the tie set, how many samples per
    variant would likely separate the top two, and the noise floor. Returns (sentences, ties, samples)."""
    out: list[str] = []
    ties = [v for v in variant_order(comp.ties()) if v in comp.variants]
    level = f"{comp.level:.0%}"
    n = f"{_fmt_count(comp.n)} samples per variant" if comp.n else "this sample size"
    best = comp.best
    if len(ties) > 1:
        out.append(f"**{tie_phrase(ties, variants)} tie** at {n} ({level} paired intervals): the differences "
                   f"between them are within the noise")
    elif comp.variants:
        out.append(f"{_decay_label(best)} is significantly better than every other variant ({level}, {n})")
    need = None
    ru = comp.runner_up()
    if ru is not None:
        other, c = ru
        need = samples_to_separate(c.diff, c.se, c.n or comp.n, comp.level)
        if c.worse is False and need is not None:
            out.append(f"about {_fmt_count(need)} samples per variant would likely separate {best} from "
                       f"{other} (80% power, if their difference stays {format_value(abs(c.diff))})")
        elif c.worse is False:
            out.append(f"{best} and {other} cannot be told apart at this sample size")
    if floor is not None and at_floor(value, floor, comp.direction):
        rng = f" [{format_value(floor.lo)}, {format_value(floor.hi)}]" if floor.lo is not None else ""
        out.append(f"the best {metric} is within the noise floor ({floor.label}: {format_value(floor.value)}{rng}): "
                   "as good as a perfect model at this sample size")
    return out, ties, need


def change_sentence(changes: Iterable[BestChange], step: int) -> str | None:
    """The latest change of the best decay up to ``step``, said only when it is significant."""
    sig = [c for c in changes if c.significant and c.step <= step]
    if not sig:
        return None
    c = sig[-1]
    return (f"Significant rank flip: {_decay_label(c.before)} was the best at step {format_step(c.step_before)}, "
            f"{_decay_label(c.after)} at step {format_step(c.step)}, each significantly better than the other "
            "at its own stage.")


def _disagreement(metrics: pd.DataFrame, directions: Mapping[str, str], step: int, metric: str,
                  comparisons: Mapping[tuple[int, str], MetricComparison] | None = None) -> str | None:
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
    comps = [(comparisons or {}).get((int(step), m)) for m in names]
    if all(c is not None and c.best == bests[m] for c, m in zip(comps, names, strict=True)):
        common = set.intersection(*(set(c.ties()) for c in comps))
        if common:  # one decay is statistically tied with the best on all three: no real trade-off here
            return (f"Precision, recall and {quality} agree within the noise: "
                    f"{tie_phrase(common, metrics['variant'].unique())} ties with the best of all three.")
    parts = [f"{m} at {_decay_label(v)}" for m, v in bests.items()]
    return (
        "Precision, recall and "
        + quality
        + " disagree on the best decay ("
        + ", ".join(parts)
        + "): choosing a decay trades fidelity against coverage."
    )


def recommend(
    metrics: pd.DataFrame,
    directions: Mapping[str, str],
    metric: str,
    step: int | None = None,
    *,
    comparisons: Mapping[tuple[int, str], MetricComparison] | None = None,
    floor: Mapping[str, Floor] | None = None,
    changes: Iterable[BestChange] | None = None,
) -> Recommendation:
    """The recommendation for ``metric`` at ``step`` (default: the latest stage with that metric).

    Says which variant is best and its value, how much better it is than the community default
    0.9999 and than raw, one sentence when the precision-, recall- and quality-optimal decays
    differ, and a warning for collapsed variants. With the run's recorded uncertainty
    (``comparisons``/``floor``/``changes`` from :mod:`emascope.dashboard.intervals`) it also names
    the variants statistically tied with the best, the samples per variant that would likely
    separate the top two, whether the best is at the noise floor, whether the comparisons with
    0.9999 and raw are significant, and the latest *significant* change of the best decay.
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
    comp = (comparisons or {}).get((int(step), metric))
    if comp is not None and comp.best != best:
        # the recorded best is chosen among the variants with the most samples (a racing sweep's
        # dropped variants have fewer): trust it when it names a value of this stage, else ignore it
        other = row.get(comp.best)
        if other is not None and math.isfinite(float(other)):
            best, value = comp.best, float(other)
        else:
            comp = None
    word = "lower" if direction == "lower" else "higher"
    pm = ""
    se = _se_of(metrics, step, best, metric)
    if se is not None:
        pm = f" ± {format_value(se)} (s.e.)"
    sentences = [f"{where}, the best **{metric}** is **{format_value(value)}**{pm} at **{_decay_label(best)}**"]
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
        sig = ""
        if comp is not None and ref in comp.variants:
            w = comp.variants[ref].worse
            sig = ", significant" if w is True else ", within the noise" if w is False else ""
        if diff > 0:
            comps.append(f"{format_value(diff)}{pct} {word} than {label} ({format_value(other)}{sig})")
        else:
            comps.append(f"equal to {label} ({format_value(other)})")
    if best == DEFAULT_DECAY_VARIANT:
        comps.append("the community default 0.9999 is the best here")
    text = sentences[0] + (": " + "; ".join(comps) if comps else "") + "."
    ties: list[str] = []
    need = None
    if comp is not None:
        more, ties, need = uncertainty_sentences(comp, value, row.index, metric, (floor or {}).get(metric))
        if more:
            text += " " + " ".join(f"{s[0].upper()}{s[1:]}." for s in more)
    flip = change_sentence(changes or [], int(step))
    if flip:
        text += "\n\n" + flip
    extra = _disagreement(metrics, directions, step, metric, comparisons)
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
    return Recommendation(text, level=level, step=step, best_variant=best, best_value=value, collapsed=coll,
                          ties=ties, samples_to_separate=need)


def _se_of(metrics: pd.DataFrame, step: int, variant: str, metric: str) -> float | None:
    """The recorded standard error of one value (``None``: none recorded)."""
    if "se" not in metrics.columns:
        return None
    sel = metrics[(metrics["step"] == step) & (metrics["variant"] == variant) & (metrics["metric"] == metric)]
    if sel.empty:
        return None
    v = float(sel["se"].iloc[-1])
    return v if math.isfinite(v) else None


def compare_runs(
    runs: Mapping[str, pd.DataFrame], metric: str, direction: str | None, fixed: str = DEFAULT_DECAY_VARIANT
) -> pd.DataFrame:
    """Rank runs at a fixed decay and at each run's own best decay, at every stage they share.

    Returns columns step, run, fixed_value, fixed_rank, best_variant, best_value, best_rank
    (rank 1 = best; ranks are NaN where a run lacks the value), and fixed_se, best_se (the values'
    recorded standard errors, NaN when none). Empty for an unknown direction or when the runs share
    no stage.
    """
    cols = ["step", "run", "fixed_value", "fixed_rank", "best_variant", "best_value", "best_rank",
            "fixed_se", "best_se"]
    if direction not in ("lower", "higher") or len(runs) < 1:
        return pd.DataFrame(columns=cols)
    tables = {name: metric_table(df, metric) for name, df in runs.items()}
    tables = {k: t for k, t in tables.items() if not t.empty}
    if not tables:
        return pd.DataFrame(columns=cols)
    ses = {name: _se_table(runs[name], metric) for name in tables}
    common = sorted(set.intersection(*(set(t.index) for t in tables.values())))
    rows = []
    for step in common:
        for name, t in tables.items():
            r = t.loc[step]
            fv = float(r[fixed]) if fixed in r.index else math.nan
            bv_name, bv = best_of_row(r, direction)
            se = ses[name]
            rows.append((int(step), name, fv, bv_name, bv, _cell(se, step, fixed), _cell(se, step, bv_name)))
    df = pd.DataFrame(rows, columns=["step", "run", "fixed_value", "best_variant", "best_value", "fixed_se",
                                     "best_se"])
    asc = direction == "lower"
    df["fixed_rank"] = df.groupby("step")["fixed_value"].rank(ascending=asc, method="min")
    df["best_rank"] = df.groupby("step")["best_value"].rank(ascending=asc, method="min")
    return df[cols]


def _se_table(metrics: pd.DataFrame, metric: str) -> pd.DataFrame:
    if "se" not in metrics.columns:
        return pd.DataFrame()
    sub = metrics[metrics["metric"] == metric]
    if sub.empty:
        return pd.DataFrame()
    return sub.pivot_table(index="step", columns="variant", values="se", aggfunc="last", dropna=False)


def _cell(table: pd.DataFrame, step: int, variant: str | None) -> float:
    if table.empty or variant is None or step not in table.index or variant not in table.columns:
        return math.nan
    return float(table.at[step, variant])


def significant_ranking_flips(comparison: pd.DataFrame, level: float = 0.95) -> list[tuple[int, str, str, bool | None]]:
    """:func:`ranking_flips` with whether each flip is significant: both orderings (run_a ahead at
    the fixed decay, run_b ahead at the best decays) exceed ``z sqrt(se_a^2 + se_b^2)`` (the runs
    are different models: unpaired). ``None`` when a standard error is missing."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    out = []
    for step, a, b in ranking_flips(comparison):
        g = comparison[comparison["step"] == step].set_index("run")
        sig: bool | None = True
        for value, se in (("fixed_value", "fixed_se"), ("best_value", "best_se")):
            sa, sb = g.at[a, se] if se in g.columns else math.nan, g.at[b, se] if se in g.columns else math.nan
            if not (math.isfinite(sa) and math.isfinite(sb)):
                sig = None
                break
            if abs(g.at[a, value] - g.at[b, value]) <= z * math.hypot(sa, sb):
                sig = False
        out.append((step, a, b, sig))
    return out


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
