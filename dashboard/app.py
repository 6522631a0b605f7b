"""The emascope Streamlit app: draws only (data in data.py, ranking in ranking.py, figures in plots.py).

Started by ``emascope dashboard PATH`` (dashboard/launch.py). PATH comes from the script's argv
(``streamlit run app.py -- PATH [--poll]``) or from the ``EMASCOPE_DASHBOARD_PATH`` env var.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import streamlit as st

from emascope import runformat as rf
from emascope.dashboard import exporting, intervals, plots, ranking
from emascope.dashboard.data import (
    Discovery,
    RunData,
    RunReader,
    find_runs,
    finite_or_none,
    load_points,
    read_preview,
    sample_files,
    sample_stages,
    short_text,
    valid_step,
)
from emascope.dashboard.watch import RunWatcher, poll_requested, run_fingerprint

ENV_PATH = "EMASCOPE_DASHBOARD_PATH"
#: Runs the Compare tab reads and draws at most (only the chosen ones are read).
MAX_COMPARE_RUNS = 8
#: Agent error events listed at most (the newest ones).
MAX_ERRORS_SHOWN = 50
#: Metrics offered in the picker at most (the standard ones first).
MAX_METRICS_SHOWN = 100
#: Stages offered by the stage slider at most.
MAX_STAGE_OPTIONS = 1000
_LOG = logging.getLogger("emascope.dashboard")
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


#: Folders holding more runs than this are not watched whole (inotify watches one folder per
#: watch, a polling observer stats every file every second): the page then polls the files of
#: the run it shows (:func:`emascope.dashboard.watch.run_fingerprint`).
MAX_WATCHED_RUNS = 200


@st.cache_resource(show_spinner=False)
def get_watcher(root: str, poll: bool) -> RunWatcher | None:
    """One observer per root for the whole server (its thread only bumps a counter); None when
    it cannot start (inotify limits, a tree deeper than watchdog's recursive walk)."""
    try:
        return RunWatcher([root], poll=poll)
    except Exception as exc:  # noqa: BLE001 - the page falls back to polling the shown run's files
        _LOG.warning("cannot watch %s (%s): polling the shown run's files instead", root, type(exc).__name__)
        return None


@st.cache_resource(show_spinner=False, ttl=2)
def discover(root: str) -> Discovery:
    """The runs below ``root`` (bounded search), shared by all sessions for 2 s: a folder of
    thousands of runs is not walked again on every rerun of every session."""
    return find_runs(root)


@st.cache_resource(show_spinner=False)
def get_reader(path: str) -> RunReader:
    """One incremental reader per run directory, shared by all sessions."""
    return RunReader(path)


@st.fragment(run_every=1)
def live_poller(watcher: RunWatcher | None) -> None:
    """Reruns the whole app when the change counter moved (and live updates are not paused).

    Without a (live) observer it compares the stat fingerprint of the shown run's files instead.
    """
    if st.session_state.get("paused"):
        return
    if watcher is not None and watcher.alive():
        seen = st.session_state.get("_seen_changes")
        now = watcher.value
        if seen is not None and now != seen:
            st.session_state["_seen_changes"] = now
            st.rerun(scope="app")
        return
    run = st.session_state.get("run")
    if not run:
        return
    seen, now = st.session_state.get("_seen_fingerprint"), run_fingerprint([run])
    st.session_state["_seen_fingerprint"] = now
    if seen is not None and now != seen:
        st.rerun(scope="app")


def failed(what: str, exc: BaseException) -> None:
    """Log the details of a failure (traceback, paths) and show a one-line message in the page."""
    _LOG.error("%s", what, exc_info=exc)
    st.error(f"{what} ({type(exc).__name__}). The details are in the dashboard's log.")


@contextmanager
def guarded(what: str) -> Iterator[None]:
    """Run a part of the page; an exception in it becomes a short error there, the rest still draws.

    Streamlit's own control flow (rerun, stop) derives from BaseException and passes through.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - any run directory must not take the page down
        failed(what, exc)


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
    labels = _run_labels(root, runs)
    keys = list(labels)
    if st.session_state.get("run") not in keys:
        st.session_state["run"] = keys[-1]
    choice = st.sidebar.selectbox("Run", keys, format_func=lambda k: labels[k], key="run")
    return Path(choice)


def pick_metric(run: RunData, box) -> str | None:
    names = ranking.order_metrics(run.metrics["metric"].unique())
    if not names:
        return None
    if len(names) > MAX_METRICS_SHOWN:
        box.caption(f"{len(names):,} metrics in this run: the first {MAX_METRICS_SHOWN} are offered.")
        names = names[:MAX_METRICS_SHOWN]
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
    """Stage select_slider that follows the newest stage unless the user moved it back.

    At most :data:`MAX_STAGE_OPTIONS` stages are offered (evenly spaced, first, last and the
    chosen one kept).
    """
    if not steps:
        return None
    latest, prev_latest = steps[-1], st.session_state.get("_latest_stage")
    cur = st.session_state.get("stage")
    if len(steps) > MAX_STAGE_OPTIONS:
        steps = sorted(set(ranking.pick_stages(steps, MAX_STAGE_OPTIONS)) | ({cur} & set(steps)))
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
    beat = finite_or_none(hb.get("time"))
    age = f" · heartbeat {_fmt_age(now - beat)}" if beat is not None else ""
    last = run.last_step()
    done = [e for e in run.events_of("score_done") if not e.get("synthesized")]
    secs = [x for e in done if (x := finite_or_none(e.get("seconds"))) is not None]
    errors = run.events_of("error")
    skips = [x for e in run.events_of("nonfinite_skip") if (x := valid_step(e.get("count"))) is not None]
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
    if run.file_errors:
        st.warning("Some files of this run were not read: "
                   + "; ".join(short_text(f"{k}: {v}") for k, v in run.file_errors.items()))
    if errors:
        with st.expander(f"{len(errors)} error(s) reported by the agent"):
            if len(errors) > MAX_ERRORS_SHOWN:
                st.caption(f"the newest {MAX_ERRORS_SHOWN} are listed")

            def text(x):
                return None if x is None else short_text(x, 120)

            st.dataframe(
                [
                    {
                        "step": valid_step(e.get("step")),
                        "where": text(e.get("where")),
                        "variant": text(e.get("variant")),
                        "message": text(e.get("message")),
                    }
                    for e in errors[-MAX_ERRORS_SHOWN:]
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
        text += f" · {short_text(st['scorer'], 120)}"
    if state == "done" and isinstance(st.get("seconds"), (int, float)):
        text += f" · {st['seconds']:.1f} s"
    if st.get("reason") and state in ("skipped", "failed"):
        text += f" · {short_text(st['reason'], 200)}"
    return short_text(text)


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
              "scorer": short_text(s.get("scorer") or "", 120), "seconds": s.get("seconds"),
              "attempts": s.get("attempts"), "note": short_text(s.get("reason") or "", 120)} for s in stages[-500:]],
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
        ref = load_points(ref_path, run_dir=run.path) if ref_path.exists() else None
        pts = {v: a for v in names
               if files[v].suffix == ".npy" and (a := load_points(files[v], run_dir=run.path)) is not None}
        st.plotly_chart(plots.points_gallery(ref, pts), width="stretch", key="gallery")
        return
    cols = st.columns(4)
    for i, v in enumerate(names):
        with cols[i % 4]:
            try:
                data = read_preview(files[v], run.path)
                if data is None:
                    raise ValueError("refused or unreadable")
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
    evaluated = e.get("evaluated")
    n = len(evaluated) if isinstance(evaluated, list) else 0
    st.caption(short_text(
        f"Search between grid decays at step {valid_step(e.get('step'))}: best {metric} at decay {best!r} "
        f"({where}; {n} synthesised decays scored, open circles); stopped: {e.get('stopped')}.", 1000
    ))


def _run_labels(root: Path, runs: list[Path]) -> dict[str, str]:
    return {str(p): (str(p.relative_to(root)) if p != root else p.name) for p in runs}


def compare_view(root: Path, runs: list[Path], metric: str, direction: str | None) -> None:
    """Compare up to :data:`MAX_COMPARE_RUNS` runs the user chose (all of them in a small folder).

    Lazy: only the chosen runs are read; a run that cannot be read is named, the others drawn.
    """
    if len(runs) < 2:
        st.info("Open a folder holding several runs (`emascope dashboard FOLDER`) to compare them.")
        return
    labels = _run_labels(root, runs)
    chosen = [k for k in st.session_state.get("compare_runs", []) if k in labels][:MAX_COMPARE_RUNS]
    if "compare_runs" not in st.session_state:
        chosen = list(labels) if len(labels) <= MAX_COMPARE_RUNS else []
    st.session_state["compare_runs"] = chosen
    st.multiselect(
        f"Runs to compare (up to {MAX_COMPARE_RUNS})",
        list(labels),
        key="compare_runs",
        format_func=lambda k: labels.get(k, k),
        max_selections=MAX_COMPARE_RUNS,
    )
    if len(runs) > MAX_COMPARE_RUNS:
        st.caption(f"{len(runs):,} runs in this folder: only the runs chosen here are read and drawn.")
    if len(chosen) < 2:
        st.info("Choose at least two runs to compare.")
        return
    frames = {}
    skipped = []
    for key in chosen:
        try:
            d = get_reader(key).load()
        except Exception as exc:  # noqa: BLE001 - one bad run must not hide the others
            _LOG.error("cannot read run %s", key, exc_info=exc)
            skipped.append(f"{labels[key]} ({type(exc).__name__})")
            continue
        if d.error is not None:
            skipped.append(f"{labels[key]} ({short_text(d.error, 120)})")
        elif len(d.metrics):
            frames[d.name if d.name not in frames else labels[key]] = d.metrics
    if skipped:
        st.warning("Not compared: " + "; ".join(skipped))
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
    flips = significant_flips(comp)
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
    overwrite = False
    try:
        existing = exporting.existing_export(run.path, name)
    except ValueError:
        existing = None  # a bad name: refused with its message when Export is pressed
    if existing is not None:
        st.warning(f"`{rf.export_file(existing.stem)}` already exists. Exporting again replaces it: "
                   "tick the box to confirm.")
        overwrite = st.checkbox(f"Overwrite {existing.name}", value=False, key=f"export_overwrite_{existing.name}")
    how = "ask the live agent" if live else (
        "from the bank snapshots" if decay is not None else "from banks/latest.safetensors"
    )
    if st.button(f"Export ({how})", type="primary", key="export_button"):
        try:
            if live:
                rid = exporting.request_export(run.path, variant, name, dtype, decay=decay, force=force,
                                               overwrite=overwrite)
                st.session_state["export_request"] = (str(run.path), rid)
            else:
                out = exporting.export_from_snapshot(run.path, variant, name, dtype, decay=decay, force=force,
                                                     overwrite=overwrite)
                st.session_state["export_done"] = (str(run.path), str(out))
        except exporting.ExportExists as exc:
            st.error(f"Export refused: {exc}; tick **Overwrite** to replace it.")
        except ValueError as exc:
            st.error(f"Export refused: {short_text(exc)}")
        except FileNotFoundError as exc:
            st.error(f"Cannot export: {short_text(exc)}. Is the run still writing its first snapshot?")
        except Exception as exc:  # the agent's error, shown instead of crashing the page
            _LOG.error("export failed", exc_info=exc)
            st.error(f"Export failed: {type(exc).__name__}: {short_text(exc)}")
    req = st.session_state.get("export_request")
    if req and req[0] == str(run.path):
        status = exporting.export_status(run.path, req[1])
        if status is None:
            st.info(f"Waiting for the agent to write the checkpoint (request `{req[1]}`)…")
        elif status.get("state") == "done":
            p = exporting.resolve_status_path(run.path, status)
            size = p.stat().st_size if p and p.exists() else status.get("bytes")
            size = size if isinstance(size, int) and not isinstance(size, bool) else 0
            st.success(
                f"Exported **{short_text(status.get('variant'), 40)}** at step {valid_step(status.get('step'))}: "
                f"`{p}` ({size / 1e6:.2f} MB)"
            )
            synth = status.get("synthesis")
            if isinstance(synth, dict):
                st.caption(f"Synthesised: profile residual {_fmt_err(synth.get('profile_residual'))}, "
                           f"predicted weight error {_fmt_err(synth.get('predicted_error'))}")
        else:
            st.error(f"The agent could not export: {short_text(status.get('error'))}")
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
        st.warning(f"Cannot synthesise decay {decay!r}: {short_text(exc)}")
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
        st.error(text + " The snapshots cannot represent this decay: " + short_text(report["refused"]))
    else:
        st.info(text)
    for w in report.get("warnings") or []:
        st.caption(f"⚠️ {w}")
    return report


def significant_flips(comp) -> list[tuple[int, str, str]]:
    """The ranking flips between runs worth a warning: significant ones when the runs recorded
    standard errors (a caption counts the others), all of them for runs without."""
    flips = ranking.significant_ranking_flips(comp)
    noise = [f for f in flips if f[3] is False]
    if noise:
        st.caption(f"{len(noise)} ranking flip(s) between runs are within the noise (95% intervals) and not shown.")
    return [(s, a, b) for s, a, b, sig in flips if sig is not False]


class Uncertainty:
    """What the run recorded about its uncertainty, parsed once per rerun (empty for runs without it)."""

    def __init__(self, run: RunData, metric: str | None) -> None:
        self.error: str | None = None
        try:
            self.comparisons = intervals.comparisons(run.events)
            self.floor = intervals.noise_floor(run.events)
            self.changes = intervals.best_changes(self.comparisons, metric) if metric else []
        except Exception as exc:  # noqa: BLE001 - a hostile events.jsonl: the run is drawn without intervals
            _LOG.error("the recorded intervals could not be read", exc_info=exc)
            self.comparisons, self.floor, self.changes = {}, {}, []
            self.error = f"The recorded intervals could not be read ({type(exc).__name__}); drawn without them."

    def floor_of(self, metric: str) -> intervals.Floor | None:
        return self.floor.get(metric)


def log_y_toggle(run: RunData, metric: str) -> bool:
    """The 'log y' checkbox of the metric-vs-decay view, offered for distance metrics only."""
    if metric not in plots.LOG_METRICS:
        return False
    return st.checkbox(
        "log scale y",
        key=f"log_y_{metric}",
        value=plots.log_scale_possible(run.metrics, metric),
        help="Distances span decades once long decays collapse; a log axis keeps the good variants apart.",
    )


def best_changes_caption(unc: Uncertainty, metric: str) -> None:
    """Under 'best decay over training': which changes of the best decay the noise cannot explain."""
    if not unc.comparisons:
        return
    sig = [c for c in unc.changes if c.significant]
    noise = len(unc.changes) - len(sig)
    parts = [
        f"step {ranking.format_step(c.step_before)} → {ranking.format_step(c.step)}: {c.before} → {c.after}"
        for c in sig
    ]
    found = "significant changes of the best decay: " + "; ".join(parts)
    text = f"**{metric}**: " + (found if parts else "no significant change of the best decay")
    if noise:
        text += f" ({noise} other change(s) of the best decay are within the noise)"
    st.caption(short_text(text, 1000))


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
        st.error(f"No run directory to show (got {short_text(str(root))!r}). Start with `emascope dashboard PATH`.")
        return
    try:
        found = discover(str(root))
    except Exception as exc:  # noqa: BLE001 - e.g. the folder vanished
        failed(f"Cannot search {root} for runs", exc)
        return
    runs = found.runs
    watchable = not found.notes and len(runs) <= MAX_WATCHED_RUNS
    watcher = get_watcher(str(root), poll) if watchable else None
    if watcher is not None:  # a full run reads everything: only changes after this point rerun it
        st.session_state["_seen_changes"] = watcher.value
    path = sidebar(root, runs)
    controls = st.sidebar.container()
    for note in found.notes:
        st.sidebar.caption(note)
    st.sidebar.divider()
    st.sidebar.toggle(
        "Pause live updates",
        key="paused",
        help="Keep zoom and selection while exploring; new data shows when you resume.",
    )
    if watcher is not None:
        st.sidebar.caption(f"Watching `{root}`" + (" (polling)" if poll or watcher.poll else ""))
    else:
        st.sidebar.caption(f"`{root}`: live updates poll the files of the shown run every second"
                           + ("" if watchable else " (a folder this large or deep is not watched whole)"))
    live_poller(watcher)
    if path is None:
        st.info(
            f"No runs under `{root}` yet (a run is a folder with a run.json). This page updates "
            "when one appears."
        )
        return
    try:
        run = get_reader(str(path)).load()
    except Exception as exc:  # noqa: BLE001 - a per-run error; the other runs stay reachable
        st.title(path.name)
        failed("This run cannot be read", exc)
        return
    st.title(run.name)
    st.caption(f"`{run.path}`")
    if run.error:
        st.error(f"Cannot show this run: {short_text(run.error)}")
        if run.file_errors:
            st.warning("Files not read: " + "; ".join(short_text(f"{k}: {v}") for k, v in run.file_errors.items()))
        return
    with guarded("This run could not be drawn"):
        draw_run(root, runs, run, controls)


def draw_run(root: Path, runs: list[Path], run: RunData, controls) -> None:
    """Everything shown for one readable run: pickers, banner, status, the views in tabs."""
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
    unc = Uncertainty(run, metric)
    if unc.error:
        st.warning(unc.error)
    with guarded("The recommendation could not be computed"):
        rec = ranking.recommend(run.metrics, run.directions, metric, stage, comparisons=unc.comparisons,
                                floor=unc.floor, changes=unc.changes)
        (st.warning if rec.level == "warning" else st.info)(
            rec.text, icon="⚠️" if rec.level == "warning" else "🎯"
        )
    with guarded("The run status could not be drawn"):
        status_panel(run)
    with guarded("The stage states could not be drawn"):
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
    with tabs[0], guarded("This view could not be drawn"):
        max_lines = st.session_state.get("max_lines", plots.MAX_LINES)
        log_y = log_y_toggle(run, metric)
        st.plotly_chart(
            plots.metric_vs_decay(run.metrics, metric, direction, max_lines=max_lines,
                                  floor=unc.floor_of(metric), log_y=log_y, synthesized=run.synthesized),
            width="stretch",
            key="vs_decay",
        )
        search_caption(run, metric)
    with tabs[1], guarded("This view could not be drawn"):
        st.plotly_chart(plots.heatmap(run.metrics, metric, direction, comparisons=unc.comparisons),
                        width="stretch", key="heatmap")
    with tabs[2], guarded("This view could not be drawn"):
        st.plotly_chart(plots.precision_recall(run.metrics, stage, metric), width="stretch", key="pr")
    with tabs[3], guarded("This view could not be drawn"):
        drift = ranking.best_decay_drift(run.metrics, run.directions)
        st.plotly_chart(plots.best_decay_over_training(drift), width="stretch", key="drift")
        best_changes_caption(unc, metric)
    with tabs[4], guarded("The previews could not be drawn"):
        samples_view(run, stage)
    with tabs[5], guarded("The comparison could not be drawn"):
        compare_view(root, runs, metric, direction)
    with tabs[6], guarded("The export panel could not be drawn"):
        export_view(run)


main()
