"""The emascope Streamlit app: draws only (data in data.py, ranking in ranking.py, figures in plots.py).

Started by ``emascope dashboard PATH`` (dashboard/launch.py). PATH comes from the script's argv
(``streamlit run app.py -- PATH [--poll]``) or from the ``EMASCOPE_DASHBOARD_PATH`` env var.
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import streamlit as st

from emascope import runformat as rf
from emascope.dashboard import exporting, plots, ranking
from emascope.dashboard.data import (
    RunData,
    RunReader,
    discover_runs,
    load_points,
    sample_files,
    sample_stages,
)
from emascope.dashboard.watch import RunWatcher, poll_requested

ENV_PATH = "EMASCOPE_DASHBOARD_PATH"
STATE_LABEL = {"live": "live", "finished": "finished", "stale": "stale", "unknown": "unknown"}
STATE_HELP = {
    "live": "the agent's heartbeat is fresh",
    "finished": "the agent closed the run",
    "stale": "no fresh heartbeat: the job crashed, was killed or is hung",
    "unknown": "no heartbeat file yet",
}


def cli_options() -> tuple[Path | None, bool]:
    """(root path, poll?) from argv after ``--`` or the environment."""
    ours = bool(sys.argv) and Path(sys.argv[0]).resolve() == Path(__file__).resolve()
    args = sys.argv[1:] if ours else []  # under `streamlit run app.py -- PATH`, not under a test runner
    poll = "--poll" in args
    paths = [a for a in args if not a.startswith("--")]
    root = paths[0] if paths else os.environ.get(ENV_PATH)
    return (Path(root).expanduser().resolve() if root else None), poll_requested(poll)


@st.cache_resource(show_spinner=False)
def get_watcher(root: str, poll: bool) -> RunWatcher | None:
    """One observer per root for the whole server (its thread only bumps a counter)."""
    try:
        return RunWatcher([root], poll=poll)
    except Exception:  # e.g. inotify limit reached: fall back to polling
        try:
            return RunWatcher([root], poll=True)
        except Exception:
            return None


@st.cache_resource(show_spinner=False)
def get_reader(path: str) -> RunReader:
    """One incremental reader per run directory, shared by all sessions."""
    return RunReader(path)


@st.fragment(run_every=1)
def live_poller(watcher: RunWatcher | None) -> None:
    """Reruns the whole app when the change counter moved (and live updates are not paused)."""
    if watcher is None or st.session_state.get("paused"):
        return
    seen = st.session_state.get("_seen_changes")
    now = watcher.value
    if seen is not None and now != seen:
        st.session_state["_seen_changes"] = now
        st.rerun(scope="app")


def _fmt_age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def sidebar(root: Path, runs: list[Path]) -> Path | None:
    st.sidebar.title("emascope")
    st.sidebar.caption("best EMA decay, live")
    if not runs:
        return None
    labels = {str(p): (str(p.relative_to(root)) if p != root else p.name) for p in runs}
    keys = list(labels)
    if st.session_state.get("run") not in keys:
        st.session_state["run"] = keys[-1]
    choice = st.sidebar.selectbox("Run", keys, format_func=lambda k: labels[k], key="run")
    return Path(choice)


def pick_metric(run: RunData, box) -> str | None:
    names = ranking.order_metrics(run.metrics["metric"].unique())
    if not names:
        return None
    if st.session_state.get("metric") not in names:
        st.session_state["metric"] = next((m for m in ("fid", "fd") if m in names), names[0])
    dirs = run.directions
    return box.selectbox(
        "Metric",
        names,
        key="metric",
        format_func=lambda m: (
            f"{m} ({'↓' if dirs.get(m) == 'lower' else '↑' if dirs.get(m) == 'higher' else '?'})"
        ),
    )


def pick_stage(steps: list[int], box) -> int | None:
    """Stage select_slider that follows the newest stage unless the user moved it back."""
    if not steps:
        return None
    latest, prev_latest = steps[-1], st.session_state.get("_latest_stage")
    cur = st.session_state.get("stage")
    if cur not in steps or cur == prev_latest:
        st.session_state["stage"] = latest
    st.session_state["_latest_stage"] = latest
    if len(steps) == 1:
        box.markdown(f"**Stage:** step {ranking.format_step(latest)}")
        return latest
    return box.select_slider(
        "Stage (optimizer step)", options=steps, key="stage", format_func=ranking.format_step
    )


def status_panel(run: RunData) -> None:
    now = time.time()
    state = run.state(now)
    hb = run.heartbeat or {}
    age = f" · heartbeat {_fmt_age(now - hb['time'])}" if isinstance(hb.get("time"), (int, float)) else ""
    last = run.last_step()
    done = [e for e in run.events_of("score_done") if not e.get("synthesized")]
    secs = [e["seconds"] for e in done if isinstance(e.get("seconds"), (int, float))]
    errors = run.events_of("error")
    skips = [e.get("count") for e in run.events_of("nonfinite_skip") if isinstance(e.get("count"), int)]
    c = st.columns(5)
    c[0].metric("Status", STATE_LABEL[state], help=STATE_HELP[state] + age)
    c[1].metric("Last step", "—" if last is None else ranking.format_step(last))
    c[2].metric("Stages scored", f"{run.metrics['step'].nunique()}")
    c[3].metric(
        "Scoring time / sweep",
        f"{secs[-1]:.1f} s" if secs else "—",
        help=(f"mean {sum(secs) / len(secs):.1f} s over {len(secs)} sweeps" if secs else None),
    )
    c[4].metric("Errors · skipped updates", f"{len(errors)} · {max(skips) if skips else 0}")
    if age:
        st.caption(
            f"{STATE_LABEL[state]}{age}"
            + (" · live updates paused" if st.session_state.get("paused") else "")
        )
    text = run.error_banner()
    if text:
        st.warning(text, icon="🛑")
    bad = {k: v for k, v in run.bad_lines.items() if v}
    if bad:
        st.caption("Skipped unreadable lines: " + ", ".join(f"{k}: {v}" for k, v in bad.items()))
    if errors:
        with st.expander(f"{len(errors)} error(s) reported by the agent"):
            st.dataframe(
                [
                    {
                        "step": e.get("step"),
                        "where": e.get("where"),
                        "variant": e.get("variant"),
                        "message": e.get("message"),
                    }
                    for e in errors[-200:]
                ],
                width="stretch",
            )


STAGE_ICONS = {"pending": "⏳", "scoring": "🔄", "done": "✅", "skipped": "⏭️", "failed": "❌"}


def stage_label(st: dict) -> str:
    """One stage as text: state, progress while scoring, who scored it, the reason of a skip/failure."""
    state = st["state"]
    text = state
    if state == "scoring" and st.get("total"):
        text += f" {st.get('done') or 0}/{st['total']}"
    if st.get("scorer"):
        text += f" · {st['scorer']}"
    if state == "done" and isinstance(st.get("seconds"), (int, float)):
        text += f" · {st['seconds']:.1f} s"
    if st.get("reason") and state in ("skipped", "failed"):
        text += f" · {st['reason']}"
    return text


def stages_panel(run: RunData) -> None:
    """Scoring stages: counts by state, the ones not done yet, and a table of all of them."""
    stages = run.stages()
    if not stages:
        return
    counts = {s: sum(1 for x in stages if x["state"] == s) for s in rf.STAGE_STATES}
    open_ = [x for x in stages if x["state"] in ("pending", "scoring")]
    summary = " · ".join(f"{STAGE_ICONS[s]} {n} {s}" for s, n in counts.items() if n)
    if open_:
        summary += " — " + ", ".join(
            f"step {ranking.format_step(x['step'])}: {stage_label(x)}" for x in open_[-3:])
    st.caption(f"Stages: {summary}")
    with st.expander(f"Scoring stages ({len(stages)})"):
        st.dataframe(
            [{"step": s["step"], "state": f"{STAGE_ICONS[s['state']]} {s['state']}",
              "progress": (f"{s.get('done') or 0}/{s['total']}" if s.get("total") else ""),
              "scorer": s.get("scorer") or "", "seconds": s.get("seconds"), "attempts": s.get("attempts"),
              "note": s.get("reason") or ""} for s in stages[-500:]],
            width="stretch", hide_index=True,
        )


def samples_view(run: RunData, stage: int | None) -> None:
    stages = sample_stages(run.path)
    if not stages or run.sample_kind is None:
        st.info("This run has no sample previews.")
        return
    at = stage if stage in stages else max([s for s in stages if stage is None or s <= stage] or stages[:1])
    if at != stage:
        st.caption(f"No previews at the chosen stage; showing step {ranking.format_step(at)}.")
    files = sample_files(run.path, at)
    names = ranking.variant_order(files)
    if run.sample_kind == "points" or all(files[v].suffix == ".npy" for v in names):
        ref_path = run.path / rf.REFERENCE_POINTS
        ref = load_points(ref_path) if ref_path.exists() else None
        pts = {v: a for v in names if files[v].suffix == ".npy" and (a := load_points(files[v])) is not None}
        st.plotly_chart(plots.points_gallery(ref, pts), width="stretch", key="gallery")
        return
    cols = st.columns(4)
    for i, v in enumerate(names):
        with cols[i % 4]:
            try:
                data = files[v].read_bytes()
                from PIL import Image

                Image.open(io.BytesIO(data)).verify()
                st.image(data, caption=v, width="stretch")
            except Exception:
                st.caption(f"{v}: preview not readable yet")


def search_caption(run: RunData, metric: str) -> None:
    """One line on the last search between grid decays for ``metric`` (``search_evals``)."""
    found = [e for e in run.events_of("search") if e.get("metric") == metric]
    if not found:
        return
    e = found[-1]
    best = e.get("best_decay")
    where = "a grid decay" if e.get("best_is_grid") else "synthesised post hoc"
    st.caption(
        f"Search between grid decays at step {e.get('step')}: best {metric} at decay {best!r} ({where}; "
        f"{len(e.get('evaluated') or [])} synthesised decays scored, open circles); stopped: {e.get('stopped')}."
    )


def compare_view(root: Path, runs: list[Path], metric: str, direction: str | None) -> None:
    if len(runs) < 2:
        st.info("Open a folder holding several runs (`emascope dashboard FOLDER`) to compare them.")
        return
    frames = {}
    for p in runs:
        d = get_reader(str(p)).load()
        if d.error is None and len(d.metrics):
            frames[d.name if d.name not in frames else str(p.relative_to(root))] = d.metrics
    comp = ranking.compare_runs(frames, metric, direction)
    st.plotly_chart(plots.compare_runs_figure(comp, metric), width="stretch", key="compare")
    if comp.empty:
        return
    last = comp[comp["step"] == comp["step"].max()].sort_values("best_rank")
    st.markdown(
        f"**Ranking at step {ranking.format_step(int(comp['step'].max()))}** "
        f"(at decay {ranking.DEFAULT_DECAY_VARIANT} vs at each run's best decay)"
    )
    st.dataframe(
        last.assign(
            fixed_value=last["fixed_value"].map(ranking.format_value),
            best_value=last["best_value"].map(ranking.format_value),
        ),
        hide_index=True,
        width="stretch",
    )
    flips = ranking.ranking_flips(comp)
    if flips:
        st.warning(
            "The ranking flips: "
            + "; ".join(
                f"at step {ranking.format_step(s)}, {a} beats {b} at {ranking.DEFAULT_DECAY_VARIANT} "
                f"but {b} wins "
                "at the best decays"
                for s, a, b in flips[-5:]
            )
        )
    else:
        st.success("No ranking flips: the fixed decay and the best decays order the runs the same way.")


def export_view(run: RunData) -> None:
    variants = ranking.variant_order(run.metrics["variant"].unique()) or ranking.variant_order(
        (run.info or {}).get("variants") or []
    )
    if not variants:
        st.info("No variants known yet.")
        return
    live = run.state() == "live"
    mode = st.radio(
        "Export",
        ["a variant of the bank", "any decay (synthesised post hoc)"],
        horizontal=True,
        key="export_mode",
        help="Any decay is built from the run's bank snapshots by least squares on the averaging profiles; "
        "its measured error is shown before exporting (docs/synthesis.md).",
    )
    decay = None
    force = False
    if mode == "a variant of the bank":
        c1, c2, c3 = st.columns([1, 2, 1])
        default = ranking.recommend(
            run.metrics, run.directions, st.session_state.get("metric") or ""
        ).best_variant
        if st.session_state.get("export_variant") not in variants:
            st.session_state["export_variant"] = default if default in variants else variants[-1]
        variant = c1.selectbox("Variant", variants, key="export_variant")
        name = c2.text_input(
            "File name (inside the run's exports/)",
            value=exporting.default_name(variant),
            key=f"export_name_{variant}",
        )
    else:
        c1, c2, c3 = st.columns([1, 2, 1])
        decay = synthesis_input(run, c1)
        if decay is None:
            return
        variant = rf.synthesized_name(decay, None)
        name = c2.text_input(
            "File name (inside the run's exports/)",
            value=rf.default_synthesized_export_name(decay, None),
            key=f"export_name_synth_{variant}",
        )
        report = synthesis_error(run, decay)
        if report is None:
            return
        force = bool(report.get("refused")) and st.checkbox(
            "Export anyway (the error above is large)", key="export_force"
        )
    dtype = c3.selectbox("dtype", ["model dtype", "float32"], key="export_dtype")
    dtype = None if dtype == "model dtype" else dtype
    how = "ask the live agent" if live else (
        "from the bank snapshots" if decay is not None else "from banks/latest.safetensors"
    )
    if st.button(f"Export ({how})", type="primary", key="export_button"):
        try:
            if live:
                rid = exporting.request_export(run.path, variant, name, dtype, decay=decay, force=force)
                st.session_state["export_request"] = (str(run.path), rid)
            else:
                out = exporting.export_from_snapshot(run.path, variant, name, dtype, decay=decay, force=force)
                st.session_state["export_done"] = (str(run.path), str(out))
        except ValueError as exc:
            st.error(f"Export refused: {exc}")
        except FileNotFoundError as exc:
            st.error(f"Cannot export: {exc}. Is the run still writing its first snapshot?")
        except Exception as exc:  # the agent's error, shown instead of crashing the page
            st.error(f"Export failed: {type(exc).__name__}: {exc}")
    req = st.session_state.get("export_request")
    if req and req[0] == str(run.path):
        status = exporting.export_status(run.path, req[1])
        if status is None:
            st.info(f"Waiting for the agent to write the checkpoint (request `{req[1]}`)…")
        elif status.get("state") == "done":
            p = exporting.resolve_status_path(run.path, status)
            size = p.stat().st_size if p and p.exists() else status.get("bytes")
            st.success(
                f"Exported **{status.get('variant')}** at step {status.get('step')}: `{p}` "
                f"({(size or 0) / 1e6:.2f} MB)"
            )
            synth = status.get("synthesis")
            if isinstance(synth, dict):
                st.caption(f"Synthesised: profile residual {_fmt_err(synth.get('profile_residual'))}, "
                           f"predicted weight error {_fmt_err(synth.get('predicted_error'))}")
        else:
            st.error(f"The agent could not export: {status.get('error')}")
    done = st.session_state.get("export_done")
    if done and done[0] == str(run.path) and Path(done[1]).exists():
        st.success(f"Exported `{done[1]}` ({Path(done[1]).stat().st_size / 1e6:.2f} MB)")
    exports = exporting.list_exports(run.path)
    if exports:
        st.caption(
            "Checkpoints in exports/: "
            + ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.2f} MB)" for p in exports if p.exists())
        )


def _fmt_err(x: object) -> str:
    return f"{x:.2e}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "n/a"


def synthesis_input(run: RunData, box) -> float | None:
    """A decay typed by the user (any value in (0, 1)); ``None`` when the run has nothing to
    synthesise from."""
    if not exporting.can_synthesize(run.path):
        st.info("This run has no bank snapshot yet: nothing to synthesise from.")
        return None
    decays = [d for d in ((run.info or {}).get("decays") or []) if isinstance(d, (int, float))]
    default = max(decays) if decays else 0.999
    rec = ranking.recommend(run.metrics, run.directions, st.session_state.get("metric") or "").best_variant
    if rf.decay_of(rec) is not None:
        default = rf.decay_of(rec)
    if not isinstance(st.session_state.get("export_decay"), float):
        st.session_state["export_decay"] = float(default)
    return float(box.number_input(
        "Decay (any value in (0, 1))",
        min_value=1e-6,
        max_value=1.0 - 1e-9,
        step=1e-4,
        format="%.7f",
        key="export_decay",
        help="The decay d of ema <- d ema + (1 - d) theta, also one between the bank's decays.",
    ))


def synthesis_error(run: RunData, decay: float) -> dict | None:
    """Compute and show the predicted error of synthesising ``decay`` (before exporting)."""
    try:
        with st.spinner("Measuring the synthesis error (leave-one-out over the bank snapshots, once per stage)…"):
            report = exporting.synthesis_preview(run.path, decay)
    except Exception as exc:  # no snapshots, unreadable files: say so, never crash the page
        st.warning(f"Cannot synthesise decay {decay!r}: {exc}")
        return None
    text = (
        f"**Decay {decay!r} at step {report.get('step')}**: profile residual "
        f"{_fmt_err(report.get('profile_residual'))} (snapping to the nearest bank decay "
        f"{report.get('nearest', {}).get('variant')}: {_fmt_err(report.get('nearest', {}).get('profile_residual'))}); "
        f"predicted weight-space error {_fmt_err(report.get('predicted_error'))} "
        f"(bound {_fmt_err(report.get('error_bound'))}), from {len(report.get('snapshots') or [])} snapshots, "
        f"condition number {_fmt_err(report.get('condition_number'))}."
    )
    if report.get("refused"):
        st.error(text + " The snapshots cannot represent this decay: " + str(report["refused"]))
    else:
        st.info(text)
    for w in report.get("warnings") or []:
        st.caption(f"⚠️ {w}")
    return report


_CSS = """<style>
.block-container {padding-top: 2.2rem; padding-bottom: 1rem;}
[data-testid="stMetricValue"] {font-size: 1.5rem;}
h1 {padding-top: 0 !important; padding-bottom: 0.1rem !important;}
</style>"""


def main() -> None:
    st.set_page_config(page_title="emascope", page_icon="📈", layout="wide")
    st.markdown(_CSS, unsafe_allow_html=True)
    root, poll = cli_options()
    if root is None or not root.is_dir():
        st.error(f"No run directory to show (got {str(root)!r}). Start with `emascope dashboard PATH`.")
        return
    watcher = get_watcher(str(root), poll)
    if watcher is not None:  # a full run reads everything: only changes after this point rerun it
        st.session_state["_seen_changes"] = watcher.value
    runs = discover_runs(root)
    path = sidebar(root, runs)
    controls = st.sidebar.container()
    st.sidebar.divider()
    st.sidebar.toggle(
        "Pause live updates",
        key="paused",
        help="Keep zoom and selection while exploring; new data shows when you resume.",
    )
    st.sidebar.caption(f"Watching `{root}`" + (" (polling)" if poll or (watcher and watcher.poll) else ""))
    live_poller(watcher)
    if path is None:
        st.info(
            f"No runs under `{root}` yet (a run is a folder with a run.json). This page updates "
            "when one appears."
        )
        return
    run = get_reader(str(path)).load()
    st.title(run.name)
    st.caption(f"`{run.path}`")
    if run.error:
        st.error(f"Cannot show this run: {run.error}")
        return
    metric = pick_metric(run, controls)
    steps = sorted(int(s) for s in run.metrics["step"].unique()) if len(run.metrics) else []
    stage = pick_stage(steps, controls)
    controls.slider(
        "Stages drawn in 'metric vs decay'",
        1,
        30,
        plots.MAX_LINES,
        key="max_lines",
        help="Evenly spaced stages, first and last always included.",
    )
    if metric is None:
        status_panel(run)
        stages_panel(run)
        st.info("No scores yet: the first scoring sweep has not finished. This page updates live.")
        return
    direction = run.directions.get(metric)
    rec = ranking.recommend(run.metrics, run.directions, metric, stage)
    (st.warning if rec.level == "warning" else st.info)(
        rec.text, icon="⚠️" if rec.level == "warning" else "🎯"
    )
    status_panel(run)
    stages_panel(run)
    tabs = st.tabs(
        [
            "Metric vs decay",
            "Heatmap",
            "Precision–recall",
            "Best decay over training",
            "Samples",
            "Compare runs",
            "Export",
        ]
    )
    with tabs[0]:
        max_lines = st.session_state.get("max_lines", plots.MAX_LINES)
        st.plotly_chart(
            plots.metric_vs_decay(run.metrics, metric, direction, max_lines=max_lines,
                                  synthesized=run.synthesized),
            width="stretch",
            key="vs_decay",
        )
        search_caption(run, metric)
    with tabs[1]:
        st.plotly_chart(plots.heatmap(run.metrics, metric, direction), width="stretch", key="heatmap")
    with tabs[2]:
        st.plotly_chart(plots.precision_recall(run.metrics, stage, metric), width="stretch", key="pr")
    with tabs[3]:
        drift = ranking.best_decay_drift(run.metrics, run.directions)
        st.plotly_chart(plots.best_decay_over_training(drift), width="stretch", key="drift")
    with tabs[4]:
        samples_view(run, stage)
    with tabs[5]:
        compare_view(root, runs, metric, direction)
    with tabs[6]:
        export_view(run)


main()
