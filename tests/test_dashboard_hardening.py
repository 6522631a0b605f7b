"""Issue 15, "the dashboard must survive any run directory": each attack of the issue, as written,
on real files (a real FIFO, real symlinks, real nested folders), first through the data layer, then
through the real app (Streamlit's AppTest): one bad run in a folder of runs never takes the page
down while a good run is shown, and each bad run shows its own short error.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from dashboard_fixtures import make_run, metric_lines, run_info, write_heartbeat, write_jsonl
from numpy.lib import format as npy_format
from streamlit.testing.v1 import AppTest

from emascope import runformat as rf
from emascope.dashboard import exporting, plots, ranking
from emascope.dashboard.data import JsonlReader, RunReader, find_runs, load_points, load_run
from emascope.dashboard.files import MAX_JSONL_BYTES, MAX_LINE_BYTES, RefusedFile, read_capped

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested 100,000 deep
MB = 1024 * 1024


def _append(path: Path, text: str | bytes) -> None:
    with open(path, "ab") as f:
        f.write(text.encode() if isinstance(text, str) else text)


def _load_in_thread(reader: RunReader, timeout: float = 20.0):
    """``reader.load()`` in a thread: a reader that blocks (the FIFO attack) fails the test, not the suite."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("run", reader.load()), daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "RunReader.load() blocked"
    return out["run"], time.monotonic() - t0


# ---------------------------------------------------------------- the data layer, attack by attack


@pytest.mark.parametrize("step", ["100000000000000000000000000", "1e26", "-5", "true"])
def test_step_1e26_is_a_skipped_record_not_an_overflow(tmp_path, step):
    run = make_run(tmp_path, "r", steps=(1000,), samples=False)
    _append(run / "metrics.jsonl", f'{{"step": {step}, "variant": "0.9", "metric": "fid", "value": 1.0}}\n')
    _append(run / "metrics.jsonl", '{"step": 2000, "variant": "0.9", "metric": "fid", "value": 1e999, '
                                   f'"time": 1{"0" * 400}}}\n')  # value inf, time a 401-digit int
    d = load_run(run)
    assert d.error is None and d.bad_lines["metrics.jsonl"] == 1
    assert sorted(d.metrics["step"].unique()) == [1000, 2000] and d.metrics["step"].dtype == "int64"
    row = d.metrics[d.metrics["step"] == 2000].iloc[0]
    assert pd.isna(row["value"]) and pd.isna(row["time"])


def test_huge_numbers_in_heartbeat_and_events_do_not_overflow(tmp_path, monkeypatch):
    run = make_run(tmp_path, "r", steps=(1000,), samples=False, state="running")
    big = "1" + "0" * 400
    (run / "heartbeat").write_text(f'{{"time": {big}, "step": {big}, "state": "running", "interval": {big}, '
                                   '"pid": 1}')
    _append(run / "events.jsonl", f'{{"time": 1, "step": {big}, "type": "score_done", "seconds": {big}}}\n')
    _append(run / "events.jsonl", f'{{"time": 1, "step": 5, "type": "nonfinite_skip", "count": {big}}}\n')
    d = load_run(run)
    assert d.heartbeat == {"state": "running", "pid": 1}  # the out-of-range fields are dropped
    assert d.state() == "stale" and d.last_step() == 1000
    at = _start(monkeypatch, tmp_path)
    assert at.title[0].value == "r" and not at.error


@pytest.mark.parametrize("name", ["run.json", "metrics.jsonl", "events.jsonl", "heartbeat"])
def test_json_nested_100000_deep_is_a_per_file_error(tmp_path, name):
    run = make_run(tmp_path, "r", steps=(1000,), samples=False)
    if name.endswith(".jsonl"):
        _append(run / name, DEEP + "\n")
    else:
        (run / name).write_text(DEEP)
    d = load_run(run)
    if name == "run.json":
        assert d.error == "run.json is unreadable: JSON nested too deep" and d.metrics.empty
    elif name == "heartbeat":
        assert d.error is None and d.heartbeat is None and "nested too deep" in d.file_errors["heartbeat"]
        assert len(d.metrics) == 33
    else:
        assert d.error is None and d.bad_lines[name] == 1
        assert len(d.metrics) == 33 and len(d.events) == 3  # every good record is still there


@pytest.mark.parametrize("bad", ["foo", "1.0", "nan", "-0.5", "inf"])
def test_best_variant_that_is_not_a_decay(tmp_path, bad):
    run = make_run(tmp_path, "r", steps=(1000,), samples=False)
    # the best fid of stage 2000 belongs to a "variant" that is not a decay
    write_jsonl(run / "metrics.jsonl", metric_lines([2000], metrics=("fid",)))
    write_jsonl(run / "metrics.jsonl", [{"step": 2000, "variant": bad, "decay": None, "metric": "fid",
                                         "value": -1.0, "time": 0.0}])
    d = load_run(run)
    assert bad not in set(d.metrics["variant"]) and d.bad_lines["metrics.jsonl"] == 1
    drift = ranking.best_decay_drift(d.metrics, d.directions)
    plots.best_decay_over_training(drift).to_json()
    # the figure itself never raises on such a variant (a frame built by other code)
    poisoned = pd.DataFrame({"metric": ["fid", "fid"], "step": [1000, 2000], "variant": ["0.9", bad],
                             "decay": [0.9, float("nan")], "value": [1.0, -1.0]})
    fig = plots.best_decay_over_training(poisoned)
    assert [list(t.x) for t in fig.data] == [[1000]]


def test_heartbeat_replaced_by_a_fifo_never_blocks_the_reader(tmp_path):
    run = make_run(tmp_path, "r", steps=(1000,), samples=False, state="running")
    (run / "heartbeat").unlink()
    os.mkfifo(run / "heartbeat")
    reader = RunReader(run)
    d, seconds = _load_in_thread(reader)
    assert seconds < 10 and d.error is None and len(d.metrics) == 33
    assert d.heartbeat is None and d.state() == "unknown"  # not "ok"/live: the heartbeat is not read
    assert d.file_errors["heartbeat"] == "refused: heartbeat: a FIFO, not a regular file"
    again, _ = _load_in_thread(reader)  # the shared lock was released
    assert again.file_errors == d.file_errors


def test_metrics_symlinked_to_dev_zero_and_out_of_the_run(tmp_path):
    run = make_run(tmp_path, "r", steps=(1000,), samples=False)
    other = make_run(tmp_path, "other", steps=(1000, 2000), samples=False)
    (run / "metrics.jsonl").rename(run / "kept.jsonl")
    os.symlink("/dev/zero", run / "metrics.jsonl")
    d, seconds = _load_in_thread(RunReader(run))
    assert seconds < 10 and d.metrics.empty
    assert d.file_errors["metrics.jsonl"] == "refused: metrics.jsonl: a symlink out of the run directory"
    (run / "metrics.jsonl").unlink()
    os.symlink(other / "metrics.jsonl", run / "metrics.jsonl")  # a regular file, but another run's
    assert "out of the run directory" in load_run(run).file_errors["metrics.jsonl"]
    (run / "metrics.jsonl").unlink()
    os.symlink("kept.jsonl", run / "metrics.jsonl")  # a symlink that stays inside the run is followed
    d = load_run(run)
    assert not d.file_errors and len(d.metrics) == 33
    # run.json as a symlink to /dev/zero, a folder named events.jsonl
    (run / "run.json").rename(run / "info.json")
    os.symlink("/dev/zero", run / "run.json")
    (run / "events.jsonl").unlink()
    (run / "events.jsonl").mkdir()
    d, _ = _load_in_thread(RunReader(run))
    assert d.error == "run.json is refused: run.json: a symlink out of the run directory"
    assert d.file_errors["events.jsonl"] == "refused: events.jsonl: a folder, not a regular file"


def test_read_capped_and_previews_refuse_devices_symlinks_and_oversize(tmp_path):
    run = make_run(tmp_path, "r", steps=(1000,))
    stage = run / "samples" / "step_000001000"
    root = os.path.realpath(run)
    with pytest.raises(RefusedFile, match="run.json: [0-9]+ bytes, more than the 10 bytes the dashboard reads"):
        read_capped(run / "run.json", root, 10)
    (stage / "0.9.npy").unlink()
    os.symlink("/dev/zero", stage / "0.9.npy")
    assert load_points(stage / "0.9.npy", run_dir=run) is None
    (stage / "0.99.npy").unlink()
    os.mkfifo(stage / "0.99.npy")
    assert load_points(stage / "0.99.npy", run_dir=run) is None
    # the samples/ folder itself symlinked to another run's: refused at every level
    elsewhere = make_run(tmp_path, "elsewhere", steps=(1000,))
    (run / "samples").rename(run / "old-samples")
    os.symlink(elsewhere / "samples", run / "samples")
    assert load_points(run / "samples" / "step_000001000" / "raw.npy", run_dir=run) is None
    assert load_points(elsewhere / "samples" / "step_000001000" / "raw.npy").shape == (200, 2)
    # a crafted header (10**12 rows) is refused before anything is allocated
    crafted = io.BytesIO()
    npy_format.write_array_header_1_0(crafted, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 2)})
    (run / "old-samples" / "step_000001000" / "crafted.npy").write_bytes(crafted.getvalue() + b"\0" * 64)
    assert load_points(run / "old-samples" / "step_000001000" / "crafted.npy", run_dir=run) is None


def test_torn_200MB_tail_is_read_once_and_never_again(tmp_path):
    run = make_run(tmp_path, "r", steps=(1000,), samples=False)
    path = run / "metrics.jsonl"
    _append(path, b'{"step": 3000, "variant": "0.9", "metric": "fid", "note": "' + b"x" * (200 * MB))
    reader = JsonlReader(path)
    assert reader.read()
    first = reader.bytes_read
    assert first <= MAX_JSONL_BYTES and len(reader.records) == 33 and reader.bad_lines == 1
    assert reader.truncated  # the rest of a file past the cap is never read
    for _ in range(3):  # the writer keeps appending to the torn line: nothing is re-read
        _append(path, b"y" * 1000)
        reader.read()
    assert reader.bytes_read == first
    assert "later records are not shown" in load_run(run).file_errors["metrics.jsonl"]


def test_torn_tail_longer_than_a_line_is_skipped_then_reading_goes_on(tmp_path):
    run = make_run(tmp_path, "r", steps=(1000,), samples=False)
    path = run / "metrics.jsonl"
    _append(path, b'{"step": 3000, "note": "' + b"x" * (5 * MB))
    reader = JsonlReader(path)
    reader.read()
    first = reader.bytes_read
    assert len(reader.records) == 33 and reader.bad_lines == 1 and not reader.torn_tail
    _append(path, b"y" * 1000)
    reader.read()
    assert reader.bytes_read - first == 1000  # only the new bytes: the long tail is not re-read
    _append(path, b'"}\n')
    write_jsonl(path, metric_lines([2000], metrics=("fid",)))
    reader.read()
    assert len(reader.records) == 44 and reader.bad_lines == 1 and not reader.truncated
    assert reader.bytes_read - first < MAX_LINE_BYTES


def _deep_chain(base: Path, depth: int) -> Path:
    d = base
    for _ in range(depth):
        d = d / "d"
        os.mkdir(d)  # os.makedirs recurses once per level: it fails at this depth itself
    return d


def _remove_chain(base: Path, depth: int) -> None:
    """Remove a folder chain deepest first, iteratively (shutil.rmtree recurses once per level)."""
    chain = [base / "d"]
    for _ in range(depth - 1):
        chain.append(chain[-1] / "d")
    for p in reversed(chain):
        for child in p.iterdir():
            if child.name != "d":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        p.rmdir()


def test_discovery_of_1100_nested_folders_is_bounded(tmp_path, monkeypatch):
    top = make_run(tmp_path, "top", steps=(1000,), samples=False)
    bottom = _deep_chain(tmp_path, 1100)
    make_run(bottom, "bottom", steps=(1000,), samples=False)
    try:
        found = find_runs(tmp_path)
        assert found.runs == [top]
        assert found.notes == [f"folders more than 8 levels below {str(tmp_path)!r} are not searched for runs"]
        near = make_run(tmp_path / "a" / "b" / "c" / "d" / "e" / "f" / "g", "near", samples=False)  # 8 levels
        far = make_run(tmp_path / "a" / "b" / "c" / "d" / "e" / "f" / "g" / "h", "far", samples=False)  # 9
        assert find_runs(tmp_path).runs == [near, top] and far.is_dir()
        at = _start(monkeypatch, tmp_path)  # the page: no RecursionError, in the app or in the file watcher
        assert at.title[0].value == "top"
        assert any("not searched for runs" in c.value for c in at.sidebar.caption)
        assert any("poll the files of the shown run" in c.value for c in at.sidebar.caption)
    finally:
        _remove_chain(tmp_path, 1100)


# ---------------------------------------------------------------- the page (AppTest)


def _start(monkeypatch, root: Path) -> AppTest:
    monkeypatch.setenv("EMASCOPE_DASHBOARD_PATH", str(root))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _texts(at: AppTest) -> list[str]:
    return [e.value for kind in (at.error, at.warning, at.info, at.caption, at.success, at.markdown) for e in kind]


@pytest.fixture
def poisoned_folder(tmp_path):
    """A folder of runs: one good run ("good") and one run per attack of the issue."""
    root = tmp_path / "runs"
    good = make_run(root, "good", steps=(1000, 2000))
    bad = {}
    r = bad["step_1e26"] = make_run(root, "step_1e26", samples=False)
    _append(r / "metrics.jsonl", '{"step": 100000000000000000000000000, "variant": "0.9", "metric": "fid", '
                                 '"value": 1.0, "time": 1.0}\n')
    for name in ("run.json", "metrics.jsonl", "events.jsonl", "heartbeat"):
        r = bad[f"deep_{name}"] = make_run(root, f"deep_{name.replace('.', '_')}", samples=False)
        if name.endswith(".jsonl"):
            _append(r / name, DEEP + "\n")
        else:
            (r / name).write_text(DEEP)
    for v in ("foo", "1.0", "nan"):
        r = bad[f"variant_{v}"] = make_run(root, f"variant_{v}", samples=False)
        write_jsonl(r / "metrics.jsonl", [{"step": 3000, "variant": v, "metric": "fid", "value": -9.0, "time": 0}])
    r = bad["fifo"] = make_run(root, "fifo", samples=False)
    (r / "heartbeat").unlink()
    os.mkfifo(r / "heartbeat")
    r = bad["dev_zero"] = make_run(root, "dev_zero", samples=False)
    (r / "metrics.jsonl").unlink()
    os.symlink("/dev/zero", r / "metrics.jsonl")
    r = bad["torn"] = make_run(root, "torn", samples=False)
    _append(r / "metrics.jsonl", b'{"step": 3000, "note": "' + b"x" * (3 * MB))
    r = bad["long_error"] = make_run(root, "long_error", samples=False,
                                     info=run_info("long_error", format_version="v" * (3 * MB)))
    r = bad["long_event"] = make_run(root, "long_event", samples=False)
    write_jsonl(r / "events.jsonl", [{"time": 1.0, "step": 5, "type": "error", "where": "sampler",
                                      "message": "boom " * 150_000}])
    return root, good, bad


def test_one_bad_run_never_takes_the_page_down(monkeypatch, poisoned_folder):
    root, good, bad = poisoned_folder
    at = _start(monkeypatch, root)
    at.sidebar.selectbox(key="run").set_value(str(good)).run()
    assert not at.exception and at.title[0].value == "good"
    assert not at.error, [e.value for e in at.error]
    banner = [t for t in _texts(at) if t.startswith("At step 2,000, the best **fid**")]
    assert banner  # the good run is drawn in full
    # Compare: at most 8 runs, chosen by the user, bad ones among them
    chosen = [str(good), str(bad["deep_run.json"]), str(bad["fifo"]), str(bad["dev_zero"]), str(bad["torn"]),
              str(bad["variant_foo"]), str(bad["step_1e26"]), str(bad["long_error"])]
    at.multiselect(key="compare_runs").set_value(chosen).run()
    assert not at.exception
    warning = next(w.value for w in at.warning if w.value.startswith("Not compared:"))
    assert "deep_run_json (run.json is unreadable: JSON nested too deep)" in warning
    assert "long_error (run.json has an invalid format_version 'vvv" in warning and len(warning) < 1000
    for text in _texts(at):
        assert len(text) < 2000, text[:200]
    # each bad run, shown on its own: its own short message, never an exception
    expect = {
        "step_1e26": "Skipped unreadable lines: metrics.jsonl: 1",
        "deep_run.json": "Cannot show this run: run.json is unreadable: JSON nested too deep",
        "deep_metrics.jsonl": "Skipped unreadable lines: metrics.jsonl: 1",
        "deep_events.jsonl": "Skipped unreadable lines: events.jsonl: 1",
        "deep_heartbeat": "heartbeat: unreadable: JSON nested too deep",
        "variant_foo": "Skipped unreadable lines: metrics.jsonl: 1",
        "variant_1.0": "Skipped unreadable lines: metrics.jsonl: 1",
        "variant_nan": "Skipped unreadable lines: metrics.jsonl: 1",
        "fifo": "heartbeat: refused: heartbeat: a FIFO, not a regular file",
        "dev_zero": "metrics.jsonl: refused: metrics.jsonl: a symlink out of the run directory",
        "torn": "Skipped unreadable lines: metrics.jsonl: 1",
        "long_error": "Cannot show this run: run.json has an invalid format_version 'vvvv",
        "long_event": "1 error(s) reported by the agent",
    }
    for key, needle in expect.items():
        at.sidebar.selectbox(key="run").set_value(str(bad[key])).run()
        assert not at.exception, (key, [e.value for e in at.exception])
        texts = _texts(at) + [e.label for e in at.expander]
        assert any(needle in t for t in texts), (key, [t[:120] for t in texts])
        assert all(len(t) < 2000 for t in texts), key  # a 3 MB message is cut to a line
    # and back to the good run: still drawn in full
    at.sidebar.selectbox(key="run").set_value(str(good)).run()
    assert not at.exception and any(t.startswith("At step 2,000, the best **fid**") for t in _texts(at))


def test_3000_runs_compare_is_lazy_and_capped(tmp_path, monkeypatch):
    root = tmp_path / "many"
    info = json.dumps(run_info("x"))
    lines = "".join(json.dumps(r) + "\n" for r in metric_lines([1000, 2000], metrics=("fid",)))
    for i in range(3000):
        d = root / f"run{i:04d}"
        d.mkdir(parents=True)
        (d / "run.json").write_text(info)
        (d / "metrics.jsonl").write_text(lines)
    loads = []
    real_load = RunReader.load
    monkeypatch.setattr(RunReader, "load", lambda self: loads.append(self.path.name) or real_load(self))
    at = _start(monkeypatch, root)
    assert loads == ["run2999"]  # the shown run only: Compare reads nothing until runs are chosen
    assert any("3,000 runs in this folder" in c.value for c in at.caption)
    assert any("Choose at least two runs" in i.value for i in at.info)
    compare = at.multiselect(key="compare_runs")
    assert compare.value == [] and len(compare.options) == 3000
    loads.clear()
    at.multiselect(key="compare_runs").set_value([str(root / f"run{i:04d}") for i in range(8)]).run()
    assert not at.exception and sorted(set(loads) - {"run2999"}) == [f"run{i:04d}" for i in range(8)]
    figures = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    (compare,) = [f for f in figures if "at their best decay" in f["layout"].get("title", {}).get("text", "")]
    assert len(compare["data"]) == 16  # two traces per compared run, not 6,000


def test_thousands_of_variants_metrics_and_stages_are_capped(tmp_path, monkeypatch):
    """A run that is valid record by record but huge in what the page would draw."""
    run = make_run(tmp_path, "wide", steps=(1000,), samples=False)
    rec = {"variant": "0.9", "metric": "fid", "value": 1.0, "time": 0.0}
    write_jsonl(run / "metrics.jsonl", [{**rec, "step": 1000, "variant": repr(0.6 + i * 1e-4)} for i in range(400)])
    write_jsonl(run / "metrics.jsonl", [{**rec, "step": 1000, "metric": f"m{i}"} for i in range(400)])
    write_jsonl(run / "metrics.jsonl", [{**rec, "step": 2000 + i} for i in range(3000)])
    d = load_run(run)
    assert d.metrics["variant"].nunique() == 256 and d.metrics["metric"].nunique() == 256
    assert set(run_info()["variants"]) <= set(d.metrics["variant"])  # run.json's variants are kept first
    assert d.file_errors["metrics.jsonl"] == ("411 variants: only 256 are shown; "
                                              "403 metric names: only the first 256 are shown")
    at = _start(monkeypatch, tmp_path)
    assert not at.error, [e.value for e in at.error]
    assert len(at.sidebar.select_slider(key="stage").options) <= 1001
    assert any("411 variants: only 256 are shown" in w.value for w in at.warning)


def test_a_failing_view_shows_a_short_message_and_logs_the_details(tmp_path, monkeypatch, caplog):
    make_run(tmp_path, "r", steps=(1000, 2000), samples=False)
    secret = str(tmp_path / "some" / "private" / "path.py")

    def broken(*_args, **_kwargs):
        raise RuntimeError(f"bug while reading {secret}")

    monkeypatch.setattr(ranking, "best_decay_drift", broken)
    with caplog.at_level(logging.ERROR, logger="emascope.dashboard"):
        at = _start(monkeypatch, tmp_path)
    errors = [e.value for e in at.error]
    assert errors == ["This view could not be drawn (RuntimeError). The details are in the dashboard's log."]
    assert not any(secret in t for t in _texts(at))  # no path, no traceback in the page
    assert any(t.startswith("At step 2,000") for t in _texts(at))  # the other views are drawn
    logged = [r for r in caplog.records if r.name == "emascope.dashboard"]
    assert logged and logged[0].exc_info and secret in str(logged[0].exc_info[1])


def test_unreadable_intervals_draw_the_run_without_them(tmp_path, monkeypatch, caplog):
    """A failure reading the recorded intervals (comparisons, noise floor) is one short warning; the
    recommendation and every view are still drawn."""
    from emascope.dashboard import intervals

    make_run(tmp_path, "r", steps=(1000, 2000), samples=False)
    secret = str(tmp_path / "private" / "x.py")

    def broken(*_args, **_kwargs):
        raise RuntimeError(f"bug in {secret}")

    monkeypatch.setattr(intervals, "comparisons", broken)
    with caplog.at_level(logging.ERROR, logger="emascope.dashboard"):
        at = _start(monkeypatch, tmp_path)
    assert not at.error, [e.value for e in at.error]
    assert [w.value for w in at.warning if "intervals" in w.value] == [
        "The recorded intervals could not be read (RuntimeError); drawn without them."]
    assert not any(secret in t for t in _texts(at))
    assert any(t.startswith("At step 2,000") for t in _texts(at))
    assert len(at.get("plotly_chart")) >= 4  # the views are drawn
    assert any(r.exc_info and secret in str(r.exc_info[1]) for r in caplog.records)


def test_stage_states_from_hostile_events_are_bounded(tmp_path, monkeypatch):
    """The scoring-stage panel (events.jsonl): a stage step past int64 is left out, a 600 kB scorer
    name and skip reason are cut, the page draws with no exception."""
    run = make_run(tmp_path, "r", steps=(1000, 2000), samples=False)
    _append(run / "events.jsonl", "".join(json.dumps(e) + "\n" for e in [
        {"time": 1.0, "step": 10**26, "type": "score_start", "scorer": "x", "variants": ["0.9"]},
        {"time": 1.0, "step": 3000, "type": "score_start", "scorer": "s" * 300_000, "variants": ["0.9"]},
        {"time": 2.0, "step": 3000, "type": "score_skipped", "reason": "why " * 150_000},
    ]))
    stages = load_run(run).stages()
    assert 10**26 not in [s["step"] for s in stages] and 3000 in [s["step"] for s in stages]
    at = _start(monkeypatch, tmp_path)
    assert not at.error, [e.value[:200] for e in at.error]
    caption = next(t for t in _texts(at) if t.startswith("Stages:"))
    assert "skipped" in caption and len(caption) < 2000
    assert all(len(t) < 2000 for t in _texts(at))
    table = next(d.value for d in at.dataframe if "scorer" in d.value.columns)
    assert table["step"].max() == 3000
    assert table["scorer"].str.len().max() < 200 and table["note"].str.len().max() < 200


# ---------------------------------------------------------------- export never overwrites silently


def test_dashboard_asks_before_overwriting_an_export(tmp_path, monkeypatch):
    run = make_run(tmp_path, "live", steps=(1000, 2000), state="running", samples=False)
    (run / "exports").mkdir()
    first = run / "exports" / "ema-0.999.safetensors"
    first.write_bytes(b"the first export")
    at = _start(monkeypatch, tmp_path)
    at.selectbox(key="export_variant").set_value("0.999").run()
    assert any("exports/ema-0.999.safetensors` already exists" in w.value for w in at.warning)
    box = at.checkbox(key="export_overwrite_ema-0.999.safetensors")
    assert box.value is False
    write_heartbeat(run, "running", 2000)
    at.button(key="export_button").click().run()
    assert any("Export refused: exports/ema-0.999.safetensors already exists; tick **Overwrite**" in e.value
               for e in at.error)
    assert not (run / "requests").exists() or not list((run / "requests").iterdir())
    assert first.read_bytes() == b"the first export"
    at.checkbox(key="export_overwrite_ema-0.999.safetensors").check().run()
    write_heartbeat(run, "running", 2000)
    at.button(key="export_button").click().run()
    (req,) = list((run / "requests").glob("*.json"))
    body = json.loads(req.read_text())
    assert body["overwrite"] is True and body["name"] == "ema-0.999" and body["variant"] == "0.999"
    # a finished run: the child process is never started without the confirmation
    with pytest.raises(exporting.ExportExists, match="exports/ema-0.999.safetensors already exists"):
        exporting.export_from_snapshot(run, "0.999", "ema-0.999")
    assert first.read_bytes() == b"the first export"


def test_status_file_fifo_or_huge_is_not_read(tmp_path):
    run = make_run(tmp_path, "r", samples=False)
    (run / "exports").mkdir()
    os.mkfifo(run / "exports" / "a.status.json")
    assert exporting.export_status(run, "a") is None  # returns at once: no writer on the FIFO
    (run / "exports" / "b.status.json").write_text(json.dumps({"state": "error", "error": "x" * 100_000}))
    assert exporting.export_status(run, "b") is None
    (run / "exports" / "c.status.json").write_text(DEEP)
    assert exporting.export_status(run, "c") is None


def test_request_overwrite_field_is_a_boolean_defaulting_to_false():
    assert rf.parse_request({"variant": "0.9"}, stem="a").overwrite is False
    assert rf.parse_request({"variant": "0.9", "overwrite": True}, stem="a").overwrite is True
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="bad overwrite"):
            rf.parse_request({"variant": "0.9", "overwrite": bad}, stem="a")
    body = rf.request_body(rf.ExportRequest("a", "0.9", "x", None), 1.0)
    assert body["overwrite"] is False and rf.parse_request(body, stem="a") == rf.ExportRequest("a", "0.9", "x", None)


def test_a_second_request_never_overwrites_an_export_silently(tmp_path):
    """The attack as written: a second request for the same name, with raw weights, silently replaced
    the first export. Now it fails with a clear status, the first file intact; only an explicit
    ``"overwrite": true`` replaces it."""
    import torch
    from safetensors.torch import load_file
    from scope_helpers import Denoiser, mixture, train_step

    from emascope import attach

    torch.manual_seed(0)
    run_dir = tmp_path / "run"
    model = Denoiser()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data, g = mixture(500, seed=1), torch.Generator().manual_seed(0)
    target = run_dir / "exports" / "best.safetensors"
    with attach(model, opt, run_dir=run_dir, score_every=None, decays=(0.9,), request_interval=0.0) as scope:
        for _ in range(3):
            train_step(model, opt, data, g)
        first_id = exporting.request_export(run_dir, "0.9", "best")  # what the page writes
        train_step(model, opt, data, g)  # fulfilled at this step boundary
        assert json.loads((run_dir / rf.status_file(first_id)).read_text())["state"] == "done"
        first_bytes, first_inode = target.read_bytes(), target.stat().st_ino
        ema = load_file(target)
        # the second request, written as any client would (no "overwrite"): raw weights, same name
        (run_dir / "requests" / "second.json").write_text(json.dumps({"id": "second", "variant": "raw",
                                                                     "name": "best"}))
        train_step(model, opt, data, g)
        status = json.loads((run_dir / rf.status_file("second")).read_text())
        assert status["state"] == "error" and status["path"] is None
        assert status["error"] == ("FileExistsError: exports/best.safetensors already exists and the request did "
                                   'not ask to overwrite it (set "overwrite": true to replace it); the file was '
                                   "left as it was")
        assert target.read_bytes() == first_bytes and target.stat().st_ino == first_inode
        assert not list((run_dir / "requests").glob("*.json"))
        # the page's own pre-check refuses too, before writing any request
        with pytest.raises(exporting.ExportExists):
            exporting.request_export(run_dir, "raw", "best")
        # an explicit confirmation replaces it
        third = exporting.request_export(run_dir, "raw", "best", overwrite=True)
        train_step(model, opt, data, g)
        assert json.loads((run_dir / rf.status_file(third)).read_text())["state"] == "done"
        raw = scope.bank.materialize("raw")
    got = load_file(target)
    assert all(torch.equal(got[k], raw[k]) for k in raw)
    assert any(not torch.equal(got[k], ema[k]) for k in raw)
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["ok"] for e in events if e["type"] == "export"] == [True, False, True]
