"""Plotly figures built from the metrics DataFrames of dashboard/data.py (no Streamlit here).

Decay axes: the fixed decays are evenly spaced in increasing order (so the longest averages sit on
the right and close decays such as 0.999, 0.9993, 0.9995, 0.9997 get as much room as 0.5 and 0.9:
their labels never overlap), each tick labelled with the decay itself (0.9999) and the hover giving
its horizon ``1 / (1 - decay)`` in steps. ``raw`` (the live weights, i.e. decay 0) is drawn apart
on the left, ``bema`` apart on the right; neither is joined to the line of fixed decays.

Uncertainty (when the run recorded it, docs/run-format.md): error bars from each value's
``lo``/``hi``, the noise floor as a dashed line with its interval as a band, and on the heatmap the
variants statistically tied with the best of each stage outlined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from emascope.dashboard.intervals import Floor, MetricComparison
from emascope.dashboard.ranking import (
    DEFAULT_DECAY_VARIANT,
    best_of_row,
    decay_of,
    format_step,
    format_value,
    metric_table,
    pick_stages,
    variant_order,
)

STAGE_SCALE = "Viridis"
MAX_LINES = 12  # stages drawn as lines in the metric-vs-decay view
MAX_HEATMAP_ROWS = 60
MAX_DECAY_TICKS = 16  # at most this many labelled decays on a decay axis (every k-th beyond)
#: Metrics offered a log-scale y axis (distances: positive, spanning decades when variants collapse).
LOG_METRICS = ("fd", "fid", "kid_mean")
FLOOR_COLOR = "#6c757d"
_LAYOUT = dict(
    template="plotly_white", margin=dict(l=60, r=20, t=50, b=60), height=500, hoverlabel=dict(namelength=-1)
)


def decay_positions(variants: Sequence[str]) -> dict[str, float]:
    """x position of each variant on a decay axis: the fixed decays at 1, 2, ... in increasing order,
    ``raw`` apart on the left (0 - a gap), ``bema`` apart on the right; other variants are left out."""
    fixed = sorted((d, v) for v in variants if (d := decay_of(v)) is not None)
    pos = {v: float(i + 1) for i, (_, v) in enumerate(fixed)}
    if "raw" in variants:
        pos["raw"] = -0.3
    if "bema" in variants:
        pos["bema"] = len(fixed) + 1.3
    return pos


def horizon_label(variant: str) -> str:
    """``"horizon 1,000 steps"`` for a decay (``1 / (1 - d)``), the variant's meaning otherwise."""
    d = decay_of(variant)
    if d is None:
        return {"raw": "live weights", "bema": "bias-corrected EMA"}.get(variant, variant)
    return f"horizon {1.0 / (1.0 - d):,.0f} steps"


def _decay_axis(pos: Mapping[str, float], title: str = "EMA decay") -> dict:
    order = sorted(pos, key=lambda v: pos[v])
    every = max(1, math.ceil(len(order) / MAX_DECAY_TICKS))
    shown = [v for i, v in enumerate(order) if i % every == 0 or v in ("raw", "bema")]
    lo, hi = min(pos.values(), default=0.0), max(pos.values(), default=1.0)
    return dict(
        type="linear",
        tickvals=[pos[v] for v in shown],
        ticktext=shown,
        tickangle=-45,
        range=[lo - 0.6, hi + 0.6],
        title=title,
        showgrid=False,
        zeroline=False,
    )


def _step_axis(steps: Sequence[int] | np.ndarray) -> dict:
    """An x axis of optimizer steps: whole numbers only; with few stages, a tick at each one (one
    stage alone would otherwise get ticks at fractional steps around it)."""
    axis: dict = dict(title="step", tickformat=",d")
    distinct = sorted({int(s) for s in steps})
    if 0 < len(distinct) <= 12:
        axis.update(tickmode="array", tickvals=distinct)
    return axis


def stage_colors(steps: Sequence[int]) -> dict[int, str]:
    """An ordered colour (Viridis, early = dark) per stage."""
    steps = sorted(steps)
    if len(steps) == 1:
        return {steps[0]: sample_colorscale(STAGE_SCALE, [0.5])[0]}
    lo, hi = steps[0], steps[-1]
    fr = [(s - lo) / (hi - lo) for s in steps]
    return dict(zip(steps, sample_colorscale(STAGE_SCALE, fr), strict=False))


def _empty(msg: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(
        text=msg, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5, font=dict(size=14, color="gray")
    )
    fig.update_layout(**_LAYOUT)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _robust_range(values: np.ndarray) -> tuple[float, float] | None:
    """min/max of the values that are not far off the scale (median +- 10 robust sigmas)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return None
    med = float(np.median(v))
    mad = float(np.median(np.abs(v - med)))
    if mad > 0:
        v = v[np.abs(v - med) <= 10 * mad / 0.6745]
    return float(v.min()), float(v.max())


def interval_table(metrics: pd.DataFrame, metric: str, column: str) -> pd.DataFrame:
    """Stage x variant table of one interval column (``lo``/``hi``/``se``) of one metric; empty
    when the run recorded none."""
    if column not in metrics.columns:
        return pd.DataFrame()
    sub = metrics[metrics["metric"] == metric]
    if sub.empty or not np.isfinite(sub[column].to_numpy(dtype=float)).any():
        return pd.DataFrame()
    table = sub.pivot_table(index="step", columns="variant", values=column, aggfunc="last", dropna=False)
    table = table.reindex(columns=variant_order(table.columns)).sort_index()
    table.columns.name = None
    return table


def _error_bars(y: np.ndarray, lo: np.ndarray | None, hi: np.ndarray | None, color: str) -> dict | None:
    """Asymmetric plotly error bars from interval bounds (None where a bound is missing)."""
    if lo is None or hi is None:
        return None
    ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(y)
    if not ok.any():
        return None
    plus = np.where(ok, np.maximum(hi - y, 0.0), np.nan)
    minus = np.where(ok, np.maximum(y - lo, 0.0), np.nan)
    return dict(type="data", symmetric=False, array=[None if not np.isfinite(v) else float(v) for v in plus],
                arrayminus=[None if not np.isfinite(v) else float(v) for v in minus], thickness=1.2, width=3,
                color=color, visible=True)


def _row_of(table: pd.DataFrame, step: int, cols: Sequence[str]) -> np.ndarray | None:
    if table.empty or step not in table.index:
        return None
    return table.loc[step].reindex(list(cols)).to_numpy(dtype=float)


def log_scale_possible(metrics: pd.DataFrame, metric: str) -> bool:
    """Whether a log y axis can show ``metric``: a distance metric whose finite values are all > 0."""
    if metric not in LOG_METRICS:
        return False
    v = metrics.loc[metrics["metric"] == metric, "value"].to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    return bool(v.size) and bool((v > 0).all())


def add_noise_floor(fig: go.Figure, floor: Floor | None, *, log_y: bool = False) -> None:
    """The noise floor of the plotted metric: a dashed line at its value, its interval as a band."""
    if floor is None or (log_y and floor.value <= 0):
        return
    label = f"noise floor ({floor.label}): {format_value(floor.value)}"
    if floor.lo is not None and floor.hi is not None and floor.hi > floor.lo and not (log_y and floor.lo <= 0):
        fig.add_hrect(y0=floor.lo, y1=floor.hi, fillcolor=FLOOR_COLOR, opacity=0.12, line_width=0, layer="below")
    fig.add_hline(y=floor.value, line=dict(color=FLOOR_COLOR, dash="dash", width=1.5))
    # the label as a legend entry (a line annotation is misplaced on log axes)
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=label, hoverinfo="skip",
                             line=dict(color=FLOOR_COLOR, dash="dash", width=1.5)))


def metric_vs_decay(
    metrics: pd.DataFrame,
    metric: str,
    direction: str | None,
    max_lines: int = MAX_LINES,
    stages: Sequence[int] | None = None,
    *,
    floor: Floor | None = None,
    log_y: bool = False,
    synthesized: pd.DataFrame | None = None,
) -> go.Figure:
    """View 1: metric vs decay, one line per stage (ordered colours), best point of each stage starred.

    At most ``max_lines`` stages are drawn (evenly spaced, first and last kept) unless ``stages``
    names them. The y range ignores collapsed values (they are drawn at the edge, hover has the value).
    With recorded intervals every point has its error bar (stages offset a little apart so bars do
    not hide each other); ``floor`` draws the metric's noise floor; ``log_y`` a log y axis (only when
    :func:`log_scale_possible`; otherwise the axis stays linear and the title says why).
    ``synthesized``: decays scored on weights synthesised post hoc (dashboard/data.py's
    ``RunData.synthesized``), drawn as open circles in their stage's colour, apart from the lines,
    with their synthesis error in the hover (docs/synthesis.md).
    """
    table = metric_table(metrics, metric)
    if table.empty:
        return _empty(f"no scores for {metric} yet")
    steps = list(stages) if stages is not None else pick_stages(table.index, max_lines)
    table = table.loc[[s for s in steps if s in table.index]]
    lo_t, hi_t = interval_table(metrics, metric, "lo"), interval_table(metrics, metric, "hi")
    variants = list(table.columns)
    pos = decay_positions(variants)
    fixed = [v for v in variants if decay_of(v) is not None]
    apart = [v for v in variants if v in pos and decay_of(v) is None]
    colors = stage_colors(list(table.index))
    log_ok = log_y and log_scale_possible(metrics, metric)
    fig = go.Figure()
    best_x, best_y, best_text = [], [], []
    spread = 0.36 if len(table) > 1 else 0.0
    for i, (step, row) in enumerate(table.iterrows()):
        c = colors[step]
        dx = (i / (len(table) - 1) - 0.5) * spread if len(table) > 1 else 0.0
        name = f"step {format_step(step)}"
        hover = (f"{name}<br>%{{customdata[0]}} (%{{customdata[1]}})<br>{metric} %{{y:.4g}}"
                 "%{customdata[2]}<extra></extra>")
        for group, mode, extra in ((fixed, "lines+markers", dict(line=dict(color=c, width=2), marker=dict(size=6))),
                                   (apart, "markers", dict(marker=dict(color=c, size=9, symbol="diamond")))):
            if not group:
                continue
            y = row[group].to_numpy(dtype=float)
            lo, hi = _row_of(lo_t, step, group), _row_of(hi_t, step, group)
            ci = [f"<br>{format_value(a)} … {format_value(b)}" if lo is not None and np.isfinite(a) and
                  np.isfinite(b) else "" for a, b in zip(lo if lo is not None else [np.nan] * len(group),
                                                          hi if hi is not None else [np.nan] * len(group),
                                                          strict=True)]
            custom = [[("decay " if decay_of(v) is not None else "") + v, horizon_label(v), ci[k]]
                      for k, v in enumerate(group)]
            fig.add_trace(go.Scatter(x=[pos[v] + dx for v in group], y=y, mode=mode, name=name, legendgroup=name,
                                     showlegend=group is fixed or not fixed, customdata=custom,
                                     hovertemplate=hover, error_y=_error_bars(y, lo, hi, c), **extra))
        b, val = best_of_row(row, direction)
        if b is not None and b in pos:
            best_x.append(pos[b] + dx)
            best_y.append(val)
            best_text.append(f"best at {name}: {b} ({format_value(val)})")
    _add_synthesized(fig, synthesized, metric, list(table.index), colors, pos)
    if best_x:
        fig.add_trace(
            go.Scatter(
                x=best_x,
                y=best_y,
                mode="markers",
                name="best of stage",
                marker=dict(symbol="star", size=15, color="#e4572e", line=dict(color="black", width=1)),
                text=best_text,
                hovertemplate="%{text}<extra></extra>",
            )
        )
    add_noise_floor(fig, floor, log_y=log_ok)
    values = table.to_numpy(dtype=float)
    if log_ok:
        rng = _robust_range(np.log10(values[values > 0]))
        if rng is not None:
            lo, hi = rng
            if floor is not None and floor.value > 0:
                lo, hi = min(lo, math.log10(floor.value)), max(hi, math.log10(floor.value))
            pad = (hi - lo) * 0.08 or 0.3
            fig.update_yaxes(type="log", range=[lo - pad, hi + pad])
    else:
        rng = _robust_range(values)
        if rng is not None:
            lo, hi = rng
            if floor is not None:
                lo, hi = min(lo, floor.value), max(hi, floor.value)
            pad = (hi - lo) * 0.08 or abs(hi) * 0.05 or 1.0
            fig.update_yaxes(range=[lo - pad, hi + pad])
    note = " — log scale needs positive values" if log_y and not log_ok else ""
    fig.update_layout(
        **_LAYOUT,
        title=f"{metric} vs EMA decay" + (f" ({direction} is better)" if direction else "") + note,
        xaxis=_decay_axis(pos),
        yaxis_title=metric + (" (log scale)" if log_ok else ""),
        legend=dict(title="stage"),
    )
    return fig


def synthesized_positions(decays: Sequence[float], pos: Mapping[str, float]) -> np.ndarray:
    """x positions of decays the bank does not hold on the decay axis of :func:`decay_positions`:
    interpolated in ``log(1 - decay)`` between the neighbouring grid decays' positions, extended
    beyond the grid by the end segments' spacing (at most half a step past the end)."""
    grid = sorted((d, x) for v, x in pos.items() if (d := decay_of(v)) is not None)
    g = -np.log1p(-np.asarray(decays, dtype=float))
    if not grid:
        return np.ones_like(g)
    gx = -np.log1p(-np.array([d for d, _ in grid]))
    px = np.array([x for _, x in grid])
    out = np.interp(g, gx, px)
    if len(grid) > 1:
        lo_slope = (px[1] - px[0]) / max(gx[1] - gx[0], 1e-12)
        hi_slope = (px[-1] - px[-2]) / max(gx[-1] - gx[-2], 1e-12)
        out = np.where(g < gx[0], np.maximum(px[0] - 0.5, px[0] + (g - gx[0]) * lo_slope), out)
        out = np.where(g > gx[-1], np.minimum(px[-1] + 0.5, px[-1] + (g - gx[-1]) * hi_slope), out)
    return out


def _add_synthesized(fig: go.Figure, synthesized: pd.DataFrame | None, metric: str, steps: list[int],
                     colors: Mapping[int, str], pos: Mapping[str, float]) -> None:
    """Open circles for the synthesised decays of the drawn stages (one legend entry for all), placed
    between the grid decays they lie between (:func:`synthesized_positions`)."""
    if synthesized is None or synthesized.empty:
        return
    rows = synthesized[(synthesized["metric"] == metric) & synthesized["step"].isin(steps)]
    rows = rows[np.isfinite(rows["value"].to_numpy(dtype=float)) & (rows["decay"] < 1.0)]
    if rows.empty:
        return
    rows = rows.sort_values(["step", "decay"])

    def err(x: float) -> str:
        return "n/a" if not np.isfinite(x) else f"{x:.1e}"

    text = [f"step {format_step(int(r.step))}<br>decay {r.variant} (synthesised post hoc)<br>{metric} "
            f"{format_value(r.value)}<br>profile residual {err(r.profile_residual)}, predicted weight error "
            f"{err(r.predicted_error)}" for r in rows.itertuples()]
    fig.add_trace(go.Scatter(
        x=synthesized_positions(rows["decay"].to_numpy(dtype=float), pos), y=rows["value"].to_numpy(),
        mode="markers",
        name="synthesised decays", text=text, hovertemplate="%{text}<extra></extra>",
        marker=dict(symbol="circle-open", size=13, line=dict(width=2.5),
                    color=[colors.get(int(s), "#444") for s in rows["step"]])))


def heatmap(
    metrics: pd.DataFrame,
    metric: str,
    direction: str | None,
    max_rows: int = MAX_HEATMAP_ROWS,
    *,
    comparisons: Mapping[tuple[int, str], MetricComparison] | None = None,
) -> go.Figure:
    """View 2: stage x variant heatmap with the values written in (categorical axes).

    Colours run from worse to better ("better" is bright); off-scale (collapsed) values are clipped
    in colour only. With the run's ``comparisons`` (:func:`emascope.dashboard.intervals.comparisons`)
    every stage's best is starred and the variants statistically tied with it are outlined.
    """
    table = metric_table(metrics, metric)
    if table.empty:
        return _empty(f"no scores for {metric} yet")
    table = table.loc[pick_stages(table.index, max_rows)]
    z = table.to_numpy(dtype=float)
    rng = _robust_range(z)
    text = [[format_value(x) for x in r] for r in z]
    scale = "Viridis_r" if direction == "lower" else "Viridis"
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(table.columns),
            y=[format_step(s) for s in table.index],
            text=text,
            texttemplate="%{text}" if z.size <= 900 else None,
            colorscale=scale,
            zmin=rng[0] if rng else None,
            zmax=rng[1] if rng else None,
            hovertemplate="step %{y}<br>%{x}<br>" + metric + " %{text}<extra></extra>",
            colorbar=dict(title=metric),
        )
    )
    _mark_ties(fig, table, metric, comparisons or {})
    fig.update_layout(
        **_LAYOUT,
        title=f"{metric} by stage and decay",
        xaxis=dict(type="category", title="variant (EMA decay)", tickangle=-45),
        yaxis=dict(type="category", title="step", autorange="reversed"),
    )
    fig.update_layout(height=max(300, min(900, 120 + 26 * len(table))))
    return fig


def _mark_ties(fig: go.Figure, table: pd.DataFrame, metric: str,
               comparisons: Mapping[tuple[int, str], MetricComparison]) -> None:
    """Outline, on a heatmap, the cells tied with their stage's best, and star the best cells."""
    tx, ty, tt, bx, by = [], [], [], [], []
    level = None
    for step in table.index:
        comp = comparisons.get((int(step), metric))
        if comp is None:
            continue
        level = comp.level
        for v in comp.ties():
            if v not in table.columns:
                continue
            if v == comp.best:
                bx.append(v)
                by.append(format_step(step))
            else:
                tx.append(v)
                ty.append(format_step(step))
                c = comp.variants[v]
                tt.append(f"{v} at step {format_step(step)}: tied with {comp.best} "
                          f"(difference {format_value(c.diff)}" +
                          (f", interval {format_value(c.lo)} … {format_value(c.hi)})" if c.lo is not None else ")"))
    if level is None:
        return
    size = max(14, min(34, 500 // max(1, len(table))))
    if tx:
        fig.add_trace(go.Scatter(x=tx, y=ty, mode="markers", name=f"tied with the best ({level:.0%})",
                                 marker=dict(symbol="square-open", size=size, color="black",
                                             line=dict(width=2.5, color="black")),
                                 text=tt, hovertemplate="%{text}<extra></extra>"))
    if bx:
        fig.add_trace(go.Scatter(x=bx, y=by, mode="markers", name="best of stage",
                                 marker=dict(symbol="square-open", size=size, color="#e4572e",
                                             line=dict(width=3.5, color="#e4572e")),
                                 hovertemplate="best at step %{y}: %{x}<extra></extra>"))
    fig.update_layout(legend=dict(orientation="h", y=-0.22))


def precision_recall(metrics: pd.DataFrame, step: int, hover_metric: str | None = None) -> go.Figure:
    """View 3: precision vs recall at one stage, one point per variant joined in decay order."""
    sub = metrics[metrics["step"] == step]
    wide = sub.pivot_table(index="variant", columns="metric", values="value", aggfunc="last", dropna=False)
    if "precision" not in wide.columns or "recall" not in wide.columns:
        return _empty("precision/recall not scored in this run")
    wide = wide.reindex(variant_order(wide.index))
    extra = (
        hover_metric if hover_metric in wide.columns and hover_metric not in ("precision", "recall") else None
    )

    def hover(vs: list[str]) -> list[str]:
        out = []
        for v in vs:
            p, r = format_value(wide.at[v, "precision"]), format_value(wide.at[v, "recall"])
            s = f"{v}<br>precision {p}<br>recall {r}"
            if extra:
                s += f"<br>{extra} {format_value(wide.at[v, extra])}"
            out.append(s)
        return out

    bounds = {}
    for col in ("lo", "hi"):
        if col in sub.columns:
            bounds[col] = sub.pivot_table(index="variant", columns="metric", values=col, aggfunc="last",
                                          dropna=False).reindex(wide.index)

    def bars(vs: list[str], name: str) -> dict | None:
        if "lo" not in bounds or name not in bounds["lo"].columns:
            return None
        y = wide.loc[vs, name].to_numpy(dtype=float)
        return _error_bars(y, bounds["lo"].loc[vs, name].to_numpy(dtype=float),
                           bounds["hi"].loc[vs, name].to_numpy(dtype=float), "#6c757d")

    fixed = [v for v in wide.index if decay_of(v) is not None]
    gaps = np.array([1.0 - decay_of(v) for v in fixed])
    exps = -np.log10(gaps) if len(fixed) else np.array([])
    # colour-bar ticks at the decays 0.9, 0.99, ... (plus the ends) so close decays do not overlap
    ticks = [i for i, e in enumerate(exps) if abs(e - round(e)) < 0.02 or i in (0, len(exps) - 1)]
    fig = go.Figure()
    if fixed:
        fig.add_trace(
            go.Scatter(
                x=wide.loc[fixed, "recall"],
                y=wide.loc[fixed, "precision"],
                mode="lines+markers+text",
                text=fixed,
                textposition="top center",
                name="EMA decays (joined in decay order)",
                line=dict(color="#9aa5b1"),
                marker=dict(
                    size=11,
                    color=-np.log10(gaps),
                    colorscale="Plasma",
                    colorbar=dict(title="decay", tickvals=exps[ticks], ticktext=[fixed[i] for i in ticks]),
                ),
                hovertext=hover(fixed),
                hovertemplate="%{hovertext}<extra></extra>",
                error_x=bars(fixed, "recall"),
                error_y=bars(fixed, "precision"),
            )
        )
    for v, sym in (("raw", "diamond"), ("bema", "square")):
        if v in wide.index:
            fig.add_trace(
                go.Scatter(
                    x=[wide.at[v, "recall"]],
                    y=[wide.at[v, "precision"]],
                    mode="markers+text",
                    text=[v],
                    textposition="bottom center",
                    name=v,
                    marker=dict(size=12, symbol=sym, color="black"),
                    hovertext=hover([v]),
                    hovertemplate="%{hovertext}<extra></extra>",
                )
            )
    fig.update_layout(
        **_LAYOUT,
        title=f"precision vs recall at step {format_step(step)}",
        xaxis_title="recall (coverage of the data)",
        yaxis_title="precision (fidelity)",
        legend=dict(orientation="h", y=-0.2),
    )
    return fig


def best_decay_over_training(drift: pd.DataFrame, metrics_shown: Sequence[str] | None = None) -> go.Figure:
    """View 4: best variant per stage for each metric (step on x, decay axis on y)."""
    if drift.empty:
        return _empty("no ranked metric yet (metric_directions)")
    if metrics_shown:
        drift = drift[drift["metric"].isin(list(metrics_shown))]
    pos = decay_positions(variant_order(drift["variant"]))
    drift = drift[drift["variant"].isin(list(pos))]  # a variant that is not a decay has no place
    if drift.empty:
        return _empty("no best decay to draw")
    fig = go.Figure()
    for metric, g in drift.groupby("metric"):
        g = g.sort_values("step")
        fig.add_trace(
            go.Scatter(
                x=g["step"],
                y=[pos[v] for v in g["variant"]],
                mode="lines+markers",
                name=str(metric),
                line=dict(shape="hv"),
                customdata=np.stack([g["variant"], [format_value(x) for x in g["value"]]], 1),
                hovertemplate=f"{metric}<br>step %{{x:,}}<br>best %{{customdata[0]}} "
                "(%{customdata[1]})<extra></extra>",
            )
        )
    axis = _decay_axis(pos, "best EMA decay")
    axis["tickangle"] = 0
    fig.update_layout(**_LAYOUT, title="best decay over training, per metric", xaxis=_step_axis(drift["step"]),
                      yaxis=axis)
    return fig


def compare_runs_figure(
    comparison: pd.DataFrame, metric: str, fixed: str = DEFAULT_DECAY_VARIANT
) -> go.Figure:
    """View 6: each run's metric at the fixed decay (dashed) and at its best decay (solid) over stages."""
    if comparison.empty:
        return _empty("the runs share no scored stage for this metric")
    fig = go.Figure()
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for i, (run, g) in enumerate(comparison.groupby("run", sort=False)):
        c = palette[i % len(palette)]
        g = g.sort_values("step")
        where = f"{run}<br>step %{{x:,}}<br>"
        fig.add_trace(go.Scatter(x=g["step"], y=g["best_value"], name=f"{run} @ best decay", mode="lines+markers",
                                 line=dict(color=c), customdata=g["best_variant"],
                                 hovertemplate=where + "best %{customdata}: %{y:.4g}<extra></extra>"))
        fig.add_trace(go.Scatter(x=g["step"], y=g["fixed_value"], name=f"{run} @ {fixed}", mode="lines+markers",
                                 line=dict(color=c, dash="dash"), marker=dict(symbol="x"),
                                 hovertemplate=where + f"{fixed}: %{{y:.4g}}<extra></extra>"))
    rng = _robust_range(comparison[["fixed_value", "best_value"]].to_numpy(dtype=float).ravel())
    if rng is not None:
        pad = (rng[1] - rng[0]) * 0.08 or abs(rng[1]) * 0.05 or 1.0
        fig.update_yaxes(range=[rng[0] - pad, rng[1] + pad])
    fig.update_layout(
        **_LAYOUT,
        title=f"{metric}: runs at decay {fixed} (dashed) vs at their best decay (solid)",
        xaxis=_step_axis(comparison["step"]),
        yaxis_title=metric,
    )
    return fig


def points_gallery(
    reference: np.ndarray | None, samples: Mapping[str, np.ndarray], cols: int = 4, max_points: int = 1500
) -> go.Figure:
    """View 5 for low-dimensional runs: one scatter panel per variant over the reference points."""
    if not samples:
        return _empty("no previews for this stage")
    names = variant_order(samples)
    rows = math.ceil(len(names) / cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=names,
        horizontal_spacing=0.03,
        vertical_spacing=0.08 / max(rows, 1) + 0.04,
    )
    ref = None
    if reference is not None and reference.ndim == 2 and reference.shape[1] >= 2:
        ref = reference[:: max(1, len(reference) // max_points)]

    def scatter(pts: np.ndarray, name: str, group: str, color: str, first: bool) -> go.Scatter:
        return go.Scatter(x=pts[:, 0], y=pts[:, 1], mode="markers", showlegend=first, name=name,
                          legendgroup=group, marker=dict(size=2, color=color), hoverinfo="skip")

    for i, v in enumerate(names):
        r, c = i // cols + 1, i % cols + 1
        if ref is not None:
            fig.add_trace(scatter(ref, "reference", "ref", "#c8ccd0", i == 0), row=r, col=c)
        pts = samples[v]
        if pts.ndim == 2 and pts.shape[1] >= 2:
            pts = pts[:: max(1, len(pts) // max_points)]
            fig.add_trace(scatter(pts, "samples", "samples", "#d62728", i == 0), row=r, col=c)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(
        template="plotly_white",
        height=260 * rows,
        margin=dict(l=10, r=10, t=40, b=10),
        legend=dict(orientation="h", y=1.06),
    )
    return fig
