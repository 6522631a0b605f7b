"""Plotly figures built from the metrics DataFrames of dashboard/data.py (no Streamlit here).

Decay axes: the position of a fixed-decay variant is ``1 - decay`` on a reversed log axis (so the
longest averages sit on the right) and the ticks are labelled with the decay itself (0.9999).
``raw`` (the live weights, i.e. decay 0) is drawn apart on the left, ``bema`` apart on the right;
neither is joined to the line of fixed decays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

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
_LAYOUT = dict(
    template="plotly_white", margin=dict(l=60, r=20, t=50, b=60), height=500, hoverlabel=dict(namelength=-1)
)


def decay_positions(variants: Sequence[str]) -> dict[str, float]:
    """x position (``1 - decay``, log axis) of each variant; raw and bema are placed apart."""
    ds = [decay_of(v) for v in variants]
    gaps = [1.0 - d for d in ds if d is not None]
    lo = min(gaps) if gaps else 1e-4
    hi = max(gaps) if gaps else 1.0
    pos = {}
    for v, d in zip(variants, ds, strict=False):
        if d is not None:
            pos[v] = 1.0 - d
        elif v == "raw":
            pos[v] = hi * 4.0
        elif v == "bema":
            pos[v] = lo / 4.0
    return pos


def _decay_axis(pos: Mapping[str, float], title: str = "EMA decay") -> dict:
    order = sorted(pos, key=lambda v: -pos[v])
    return dict(
        type="log",
        autorange="reversed",
        tickvals=[pos[v] for v in order],
        ticktext=order,
        tickangle=-45,
        title=title,
        showgrid=False,
    )


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


def metric_vs_decay(
    metrics: pd.DataFrame,
    metric: str,
    direction: str | None,
    max_lines: int = MAX_LINES,
    stages: Sequence[int] | None = None,
    synthesized: pd.DataFrame | None = None,
) -> go.Figure:
    """View 1: metric vs decay, one line per stage (ordered colours), best point of each stage starred.

    At most ``max_lines`` stages are drawn (evenly spaced, first and last kept) unless ``stages``
    names them. The y range ignores collapsed values (they are drawn at the edge, hover has the value).
    ``synthesized``: decays scored on weights synthesised post hoc (dashboard/data.py's
    ``RunData.synthesized``), drawn as open circles in their stage's colour, apart from the lines,
    with their synthesis error in the hover (docs/synthesis.md).
    """
    table = metric_table(metrics, metric)
    if table.empty:
        return _empty(f"no scores for {metric} yet")
    steps = list(stages) if stages is not None else pick_stages(table.index, max_lines)
    table = table.loc[[s for s in steps if s in table.index]]
    variants = list(table.columns)
    pos = decay_positions(variants)
    fixed = [v for v in variants if decay_of(v) is not None]
    apart = [v for v in variants if v in pos and decay_of(v) is None]
    colors = stage_colors(list(table.index))
    fig = go.Figure()
    best_x, best_y, best_text = [], [], []
    for step, row in table.iterrows():
        c = colors[step]
        name = f"step {format_step(step)}"
        hover = f"{name}<br>%{{customdata}}<br>{metric} %{{y:.4g}}<extra></extra>"
        fig.add_trace(go.Scatter(x=[pos[v] for v in fixed], y=row[fixed].to_numpy(), mode="lines+markers",
                                 name=name, legendgroup=name, line=dict(color=c, width=2), marker=dict(size=6),
                                 customdata=fixed, hovertemplate=hover.replace("<br>%", "<br>decay %", 1)))
        if apart:
            fig.add_trace(go.Scatter(x=[pos[v] for v in apart], y=row[apart].to_numpy(), mode="markers",
                                     legendgroup=name, showlegend=False,
                                     marker=dict(color=c, size=9, symbol="diamond"), customdata=apart,
                                     hovertemplate=hover))
        b, val = best_of_row(row, direction)
        if b is not None and b in pos:
            best_x.append(pos[b])
            best_y.append(val)
            best_text.append(f"best at {name}: {b} ({format_value(val)})")
    _add_synthesized(fig, synthesized, metric, list(table.index), colors)
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
    rng = _robust_range(table.to_numpy(dtype=float))
    if rng is not None:
        lo, hi = rng
        pad = (hi - lo) * 0.08 or abs(hi) * 0.05 or 1.0
        fig.update_yaxes(range=[lo - pad, hi + pad])
    fig.update_layout(
        **_LAYOUT,
        title=f"{metric} vs EMA decay" + (f" ({direction} is better)" if direction else ""),
        xaxis=_decay_axis(pos),
        yaxis_title=metric,
        legend=dict(title="stage"),
    )
    return fig


def _add_synthesized(fig: go.Figure, synthesized: pd.DataFrame | None, metric: str, steps: list[int],
                     colors: Mapping[int, str]) -> None:
    """Open circles for the synthesised decays of the drawn stages (one legend entry for all)."""
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
        x=(1.0 - rows["decay"]).to_numpy(), y=rows["value"].to_numpy(), mode="markers",
        name="synthesised decays", text=text, hovertemplate="%{text}<extra></extra>",
        marker=dict(symbol="circle-open", size=13, line=dict(width=2.5),
                    color=[colors.get(int(s), "#444") for s in rows["step"]])))


def heatmap(
    metrics: pd.DataFrame, metric: str, direction: str | None, max_rows: int = MAX_HEATMAP_ROWS
) -> go.Figure:
    """View 2: stage x variant heatmap with the values written in (categorical axes).

    Colours run from worse to better ("better" is bright); off-scale (collapsed) values are clipped
    in colour only.
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
    fig.update_layout(
        **_LAYOUT,
        title=f"{metric} by stage and decay",
        xaxis=dict(type="category", title="variant (EMA decay)", tickangle=-45),
        yaxis=dict(type="category", title="step", autorange="reversed"),
    )
    fig.update_layout(height=max(300, min(900, 120 + 26 * len(table))))
    return fig


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
    fig.update_layout(**_LAYOUT, title="best decay over training, per metric", xaxis_title="step", yaxis=axis)
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
        xaxis_title="step",
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
