"""Dashboard watcher, export helpers, launcher command line and figures."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from dashboard_fixtures import DIRECTIONS, make_run, metric_lines, write_jsonl

from emascope.dashboard import exporting, launch, plots, ranking
from emascope.dashboard.data import load_run, metric_records_to_frame
from emascope.dashboard.watch import RunWatcher, is_relevant, poll_requested

# ---------------------------------------------------------------- watcher


@pytest.mark.parametrize(
    ("event", "path", "expected"),
    [
        ("modified", "/r/metrics.jsonl", True),
        ("created", "/r/run.json", True),
        ("moved", "/r/heartbeat", True),
        ("modified", "/r/samples/step_000000100/0.9.png", True),
        ("created", "/r/exports/abc.status.json", True),
        ("opened", "/r/metrics.jsonl", False),
        ("closed", "/r/metrics.jsonl", False),
        ("closed_no_write", "/r/run.json", False),
        ("deleted", "/r/metrics.jsonl", False),
        ("modified", "/r/.heartbeat.abc.tmp", False),
        ("modified", "/r/banks/latest.safetensors", False),
        ("modified", "/r/requests/x.json", False),
        ("modified", "/r/notes.txt", False),
    ],
)
def test_event_whitelist(event, path, expected):
    assert is_relevant(event, path) is expected


def test_directory_events_are_ignored():
    assert not is_relevant("modified", "/r/samples", is_directory=True)


def _wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.mark.parametrize("poll", [False, True])
def test_watcher_counts_writes_but_not_reads(tmp_path, poll):
    run = make_run(tmp_path, samples=False)
    w = RunWatcher([tmp_path], poll=poll, poll_interval=0.2)
    try:
        time.sleep(0.5)
        base = w.value
        for _ in range(3):  # the app's own reads must not count
            load_run(run)
            (run / "metrics.jsonl").read_bytes()
        time.sleep(0.6)
        assert w.value == base
        write_jsonl(run / "metrics.jsonl", metric_lines([9000]))
        assert _wait_for(lambda: w.value > base, 2.0), "append not seen within 2 s"
        base = w.value
        tmp = run / ".heartbeat.x.tmp"
        tmp.write_text(json.dumps({"state": "running"}))
        os.replace(tmp, run / "heartbeat")  # atomic replace: a move onto a watched name
        assert _wait_for(lambda: w.value > base, 2.0)
    finally:
        w.stop()
    assert not w.alive()


def test_poll_requested_by_env(monkeypatch):
    monkeypatch.delenv("EMASCOPE_POLL", raising=False)
    assert not poll_requested() and poll_requested(True)
    monkeypatch.setenv("EMASCOPE_POLL", "1")
    assert poll_requested()


# ---------------------------------------------------------------- export helpers


@pytest.mark.parametrize(
    "name",
    [
        "../evil",
        "../../etc/passwd",
        "/etc/passwd",
        "a/b",
        ".hidden",
        "",
        "x" * 129,
        "name with space",
        "..",
        "ok\n",
    ],
)
def test_export_names_never_leave_exports(tmp_path, name):
    with pytest.raises(ValueError, match="invalid export name"):
        exporting.export_path(tmp_path, name)


def test_export_path_contained_and_symlink_escape_rejected(tmp_path):
    p = exporting.export_path(tmp_path, "ema-0.9999")
    assert p == (tmp_path / "exports" / "ema-0.9999.safetensors").resolve()
    assert exporting.export_path(tmp_path, "m.safetensors").name == "m.safetensors"
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "exports").mkdir(exist_ok=True)
    os.symlink(outside / "target.safetensors", tmp_path / "exports" / "link.safetensors")
    with pytest.raises(ValueError, match="outside"):
        exporting.export_path(tmp_path, "link")


def test_request_export_writes_contract_request(tmp_path):
    rid = exporting.request_export(tmp_path, "0.99990", "ema-best")
    req = json.loads((tmp_path / "requests" / f"{rid}.json").read_text())
    assert req["id"] == rid and req["variant"] == "0.9999" and req["name"] == "ema-best"
    assert req["dtype"] is None and isinstance(req["time"], float)
    assert exporting.request_pending(tmp_path, rid)
    assert exporting.export_status(tmp_path, rid) is None
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / f"{rid}.status.json").write_text('{"id": "')  # torn
    assert exporting.export_status(tmp_path, rid) is None
    (tmp_path / "exports" / f"{rid}.status.json").write_text(
        json.dumps({"id": rid, "state": "done", "path": "exports/ema-best.safetensors"})
    )
    st = exporting.export_status(tmp_path, rid)
    assert st["state"] == "done"
    assert (
        exporting.resolve_status_path(tmp_path, st)
        == (tmp_path / "exports" / "ema-best.safetensors").resolve()
    )
    assert exporting.resolve_status_path(tmp_path, {"path": "../x.safetensors"}) is None
    with pytest.raises(ValueError, match="'bogus'"):
        exporting.request_export(tmp_path, "bogus", "x")
    with pytest.raises(ValueError, match="'1.5'"):
        exporting.request_export(tmp_path, "1.5", "x")
    with pytest.raises(ValueError, match="'float16'"):
        exporting.request_export(tmp_path, "raw", "x", dtype="float16")
    with pytest.raises(ValueError, match="request id"):
        exporting.export_status(tmp_path, "../x")


def test_export_from_snapshot_without_snapshot_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="latest.safetensors"):
        exporting.export_from_snapshot(tmp_path, "0.9", "x")


# ---------------------------------------------------------------- launcher


def test_launch_command_security_defaults(tmp_path):
    cmd = launch.build_command(tmp_path, port=8765)
    joined = " ".join(cmd)
    assert cmd[1:4] == ["-m", "emascope.dashboard.server", "run"] and cmd[4].endswith("app.py")

    def opt(name):
        return [cmd[i + 1] for i, c in enumerate(cmd) if c == name]

    assert opt("--server.address") == ["127.0.0.1"] and opt("--server.port") == ["8765"]
    assert opt("--server.headless") == ["true"] and opt("--browser.gatherUsageStats") == ["false"]
    hosts = opt("--server.allowedHosts")
    assert hosts == ["localhost", "127.0.0.1", "::1"]  # one flag per host, never the comma form
    assert all("," not in h for h in hosts)
    assert opt("--server.enableXsrfProtection") == ["true"] and opt("--server.enableCORS") == ["true"]
    assert opt("--client.showErrorDetails") == ["type"]  # no message, traceback or path in the browser
    assert cmd[-2:] == ["--", str(tmp_path)] and "--poll" not in joined
    assert launch.build_command(tmp_path, poll=True)[-1] == "--poll"
    wide = launch.build_command(tmp_path, host="0.0.0.0", extra_hosts=["box.lan"])
    assert "box.lan" in wide and "*" not in wide


def test_launch_rejects_bad_input(tmp_path, capsys):
    assert launch.main([str(tmp_path / "missing"), "--no-browser"]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch.parse_args([str(tmp_path), "--port", "70000"])
    assert "70000" in capsys.readouterr().err


def test_probe_url():
    assert launch.probe_url("0.0.0.0", 1) == "http://127.0.0.1:1"
    assert launch.probe_url("::", 2) == "http://[::1]:2"


# ---------------------------------------------------------------- figures


def _frame(steps):
    return metric_records_to_frame(metric_lines(steps))[0]


def test_metric_vs_decay_axis_lines_and_best_markers():
    frame = _frame(range(1000, 10_001, 1000))
    fig = plots.metric_vs_decay(frame, "fid", "lower", max_lines=4)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(lines) == 4  # downsampled: 4 stages of 10
    assert all("raw" not in [c[0] for c in t.customdata] for t in lines)  # raw is drawn apart, not on the line
    # decays evenly spaced in increasing order (longest averages on the right), raw apart on the left
    axis = fig.layout.xaxis
    assert axis.type == "linear" and "0.9999" in axis.ticktext and "raw" in axis.ticktext
    ticks = dict(zip(axis.ticktext, axis.tickvals, strict=True))
    fixed = [v for v in axis.ticktext if v != "raw"]
    assert [float(v) for v in fixed] == sorted(float(v) for v in fixed)
    assert np.allclose(np.diff([ticks[v] for v in fixed]), 1.0) and ticks["raw"] < ticks[fixed[0]] - 1
    stars = [t for t in fig.data if t.name == "best of stage"][0]
    best = ranking.best_per_stage(frame, "fid", "lower").set_index("step")
    assert sorted(stars.y) == sorted(best.loc[ranking.pick_stages(best.index, 4), "value"])
    lo, hi = fig.layout.yaxis.range
    assert hi < 100  # collapsed values (~450) do not squash the scale


def test_heatmap_is_categorical_with_values():
    frame = _frame([1000, 2000])
    fig = plots.heatmap(frame, "fid", "lower")
    hm = fig.data[0]
    assert fig.layout.xaxis.type == "category" and fig.layout.yaxis.type == "category"
    assert list(hm.x)[:3] == ["raw", "0.5", "0.9"] and list(hm.y) == ["1,000", "2,000"]
    assert hm.text[0][0] == ranking.format_value(hm.z[0][0])


def test_precision_recall_joined_in_decay_order_and_hover_has_metric():
    frame = _frame([5000])
    fig = plots.precision_recall(frame, 5000, "fid")
    line = fig.data[0]
    assert list(line.text) == ranking.variant_order([v for v in line.text])
    assert "fid" in line.hovertext[0]
    assert any(t.name == "raw" for t in fig.data)
    empty = plots.precision_recall(metric_records_to_frame(metric_lines([1], metrics=("fid",)))[0], 1)
    assert "not scored" in empty.layout.annotations[0].text


def test_drift_and_compare_figures():
    frame = _frame(range(1000, 5001, 1000))
    drift = ranking.best_decay_drift(frame, DIRECTIONS)
    fig = plots.best_decay_over_training(drift)
    assert {t.name for t in fig.data} == {"fid", "precision", "recall"}
    comp = ranking.compare_runs({"a": frame, "b": _frame(range(1000, 5001, 1000))}, "fid", "lower")
    assert len(plots.compare_runs_figure(comp, "fid").data) == 4
    assert list(fig.layout.xaxis.tickvals) == [1000, 2000, 3000, 4000, 5000] and fig.layout.xaxis.tickformat == ",d"


def test_a_single_shared_stage_gets_one_whole_step_tick():
    """Two runs sharing one stage: the step axis shows that step, not fractional steps around it."""
    comp = ranking.compare_runs({"a": _frame([5000]), "b": _frame([5000, 6000])}, "fid", "lower")
    axis = plots.compare_runs_figure(comp, "fid").layout.xaxis
    assert list(axis.tickvals) == [5000] and axis.tickformat == ",d" and axis.title.text == "step"
    many = plots.best_decay_over_training(ranking.best_decay_drift(_frame(range(1000, 30001, 1000)), DIRECTIONS))
    assert many.layout.xaxis.tickvals is None and many.layout.xaxis.tickformat == ",d"  # plotly's own ticks


def test_points_gallery_panels(tmp_path):
    import numpy as np

    pts = {v: np.zeros((10, 2), np.float32) for v in ["0.9", "raw"]}
    fig = plots.points_gallery(np.ones((20, 2), np.float32), pts)
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["raw", "0.9"] and len(fig.data) == 4
