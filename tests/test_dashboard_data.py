"""Dashboard data layer and ranking, on crafted run directories (no Streamlit, no torch)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from dashboard_fixtures import DIRECTIONS, VARIANTS, make_run, metric_lines, run_info, write_jsonl

from emascope.dashboard import ranking
from emascope.dashboard.data import (
    FormatVersionError,
    JsonlReader,
    RunReader,
    check_format_version,
    discover_runs,
    load_points,
    load_run,
    metric_records_to_frame,
    run_state,
    sample_files,
    sample_stages,
)
from emascope.runformat import FORMAT_VERSION as KNOWN_FORMAT_VERSION

# The RAE sweep at 80 epochs from the seed article (FID, precision, recall per decay).
BLOG = {
    "raw": (4.46, 0.684, 0.607),
    "0.5": (4.38, 0.680, 0.611),
    "0.9": (3.88, 0.687, 0.615),
    "0.99": (3.33, 0.709, 0.604),
    "0.999": (3.20, 0.741, 0.585),
    "0.9993": (3.24, 0.744, 0.586),
    "0.9995": (3.28, 0.749, 0.579),
    "0.9997": (3.38, 0.758, 0.569),
    "0.9999": (4.16, 0.787, 0.531),
    "0.99999": (444.78, 0.000, 0.000),
    "0.999999": (328.03, 0.000, 0.000),
}


def blog_frame(step: int = 80) -> pd.DataFrame:
    rows = []
    for v, vals in BLOG.items():
        for m, x in zip(("fid", "precision", "recall"), vals, strict=True):
            rows.append(
                {
                    "step": step,
                    "variant": v,
                    "decay": ranking.decay_of(v),
                    "metric": m,
                    "value": x,
                    "time": 0.0,
                }
            )
    frame, invalid = metric_records_to_frame(rows)
    assert invalid == 0
    return frame


# ---------------------------------------------------------------- reading files


def test_data_layer_imports_neither_torch_nor_streamlit():
    code = (
        "import sys, emascope.dashboard.data, emascope.dashboard.ranking, emascope.dashboard.plots,"
        " emascope.dashboard.watch;"
        "bad = [m for m in ('torch', 'streamlit') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_torn_and_bad_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = metric_lines([100], metrics=("fid",))
    text = json.dumps(good[0]) + "\n" + "{not json\n" + "[1, 2]\n" + json.dumps(good[1]) + "\n"
    torn = json.dumps(good[2])
    path.write_text(text + torn[:20])
    r = JsonlReader(path)
    assert r.read()
    assert [x["variant"] for x in r.records] == [good[0]["variant"], good[1]["variant"]]
    assert r.bad_lines == 2 and r.torn_tail
    with open(path, "a") as f:  # the writer finishes the line
        f.write(torn[20:] + "\n")
    assert r.read()
    assert len(r.records) == 3 and r.records[2] == good[2] and not r.torn_tail and r.bad_lines == 2


def test_incremental_reread_reads_only_new_bytes(tmp_path):
    run = make_run(tmp_path, steps=(1000,), samples=False)
    reader = RunReader(run)
    first = reader.load()
    n0 = len(first.metrics)
    size0 = (run / "metrics.jsonl").stat().st_size
    assert reader._metrics.bytes_read == size0
    assert reader.load().metrics is first.metrics and reader.frame_builds == 1  # unchanged: no re-read
    new = metric_lines([2000])
    write_jsonl(run / "metrics.jsonl", new)
    second = reader.load()
    size1 = (run / "metrics.jsonl").stat().st_size
    assert reader._metrics.bytes_read == size1  # only the appended bytes were read again
    assert len(second.metrics) == n0 + len(new)
    assert sorted(second.metrics["step"].unique()) == [1000, 2000]
    # a rewritten (shorter) file is re-read from the start
    write_jsonl(run / "metrics.jsonl", metric_lines([5]), mode="w")
    third = reader.load()
    assert sorted(third.metrics["step"].unique()) == [5]


def test_rewritten_file_with_same_length_prefix_change_is_reread(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "start", "step": 0}\n')
    r = JsonlReader(path)
    r.read()
    path.write_text('{"type": "error", "step": 1}\n{"type": "close", "step": 2}\n')
    r.read()
    assert [e["type"] for e in r.records] == ["error", "close"]


def test_empty_run_and_missing_files(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    (run / "run.json").write_text(json.dumps(run_info("empty")))
    data = load_run(run)
    assert data.error is None and data.metrics.empty and data.events == [] and data.heartbeat is None
    assert data.state() == "unknown" and data.last_step() is None
    rec = ranking.recommend(data.metrics, data.directions, "fid")
    assert rec.best_variant is None and "No scores" in rec.text


def test_half_written_run_json_is_not_fatal(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "run.json").write_text('{"format": "emascope-run", "format_ver')
    data = load_run(run)
    assert data.error is not None and "run.json" in data.error and data.metrics.empty


def test_newer_format_version_is_refused_naming_both_numbers(tmp_path):
    run = make_run(tmp_path, info=run_info(format_version=KNOWN_FORMAT_VERSION + 6), samples=False)
    data = load_run(run)
    assert data.error is not None
    assert (
        str(KNOWN_FORMAT_VERSION + 6) in data.error and f"format_version {KNOWN_FORMAT_VERSION}" in data.error
    )
    assert data.metrics.empty
    with pytest.raises(FormatVersionError):
        check_format_version({"format_version": KNOWN_FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match="'one'"):
        check_format_version({"format_version": "one"})
    check_format_version({"format_version": KNOWN_FORMAT_VERSION})


def test_invalid_records_and_nonfinite_values(tmp_path):
    recs = [
        {"step": 1, "variant": "raw", "decay": None, "metric": "fid", "value": None, "time": 1.0},
        {"step": "x", "variant": "raw", "metric": "fid", "value": 1.0},
        {"step": 1, "variant": "0.9", "decay": 0.9, "metric": "fid", "value": 2.0, "time": 1.0},
        {"step": 1, "variant": "0.9", "decay": 0.9, "metric": "fid", "value": 1.5, "time": 2.0},
    ]
    frame, invalid = metric_records_to_frame(recs)
    assert invalid == 1
    assert len(frame) == 2  # the repeated (step, variant, metric) keeps the last record
    assert math.isnan(frame.loc[frame.variant == "raw", "value"].item())
    assert frame.loc[frame.variant == "0.9", "value"].item() == 1.5


def test_discover_runs_recursive_and_skips_run_internals(tmp_path):
    a = make_run(tmp_path / "group", "a", samples=False)
    b = make_run(tmp_path, "b", samples=False)
    (a / "exports" / "x").mkdir(parents=True)
    (a / "exports" / "x" / "run.json").write_text("{}")  # inside a run: not a run of its own
    (tmp_path / ".hidden" / "c").mkdir(parents=True)
    (tmp_path / ".hidden" / "c" / "run.json").write_text("{}")
    assert discover_runs(tmp_path) == sorted([a, b])
    assert discover_runs(a) == [a]
    with pytest.raises(ValueError, match="nope"):
        discover_runs(tmp_path / "nope")


def test_run_state_from_heartbeat():
    now = 1000.0
    assert run_state({"state": "running", "time": now - 1, "interval": 2.0}, now) == "live"
    assert run_state({"state": "running", "time": now - 7, "interval": 2.0}, now) == "stale"
    assert run_state({"state": "closed", "time": now - 1e6}, now) == "finished"
    assert run_state(None, now) == "unknown"


def test_samples_listing_and_points(tmp_path):
    run = make_run(tmp_path, steps=(1000, 2000))
    (run / "samples" / "step_000002000" / ".0.9.npy.tmp").write_bytes(b"partial")
    assert sample_stages(run) == [1000, 2000]
    files = sample_files(run, 2000)
    assert set(files) == set(VARIANTS)
    pts = load_points(files["raw"])
    assert pts.shape == (200, 2) and pts.dtype == np.float32
    bad = run / "half.npy"
    bad.write_bytes(b"\x93NUMPY\x01\x00")  # torn
    assert load_points(bad) is None
    obj = run / "obj.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert load_points(obj) is None  # never unpickled


# ---------------------------------------------------------------- ranking


def reference_best(records, metric, direction):
    """Independent float64 loop: best (variant, value) per step."""
    best = {}
    for r in records:
        if r["metric"] != metric or r["value"] is None:
            continue
        cur = best.get(r["step"])
        better = cur is None or (r["value"] < cur[1] if direction == "lower" else r["value"] > cur[1])
        if better:
            best[r["step"]] = (r["variant"], r["value"])
    return best


@pytest.mark.parametrize("metric", ["fid", "precision", "recall"])
def test_best_per_stage_matches_reference_loop(metric):
    recs = metric_lines(range(500, 10_001, 500))
    frame, _ = metric_records_to_frame(recs)
    got = ranking.best_per_stage(frame, metric, DIRECTIONS[metric])
    ref = reference_best(recs, metric, DIRECTIONS[metric])
    assert len(got) == len(ref) == 20
    for row in got.itertuples():
        assert ref[row.step][1] == row.value
        assert ref[row.step][0] == row.variant or ref[row.step][1] == row.value  # ties keep equal values


def test_best_decay_drifts_to_longer_averages():
    frame, _ = metric_records_to_frame(metric_lines(range(1000, 10_001, 1000)))
    drift = ranking.best_decay_drift(frame, DIRECTIONS)
    fid = drift[drift.metric == "fid"].sort_values("step")
    assert fid["decay"].iloc[0] < fid["decay"].iloc[-1]
    assert set(drift["metric"]) == {"fid", "precision", "recall"}


def test_gaps_to_default_and_raw_on_article_numbers():
    frame = blog_frame()
    rec = ranking.recommend(frame, DIRECTIONS, "fid")
    assert rec.best_variant == "0.999" and rec.best_value == pytest.approx(3.20)
    diff, rel = ranking.improvement(3.20, 4.16, "lower")
    assert diff == pytest.approx(0.96) and rel == pytest.approx(0.96 / 4.16)
    assert f"{rel * 100:.1f}%" in rec.text and "0.9999" in rec.text and "raw" in rec.text
    assert f"{(4.46 - 3.20) / 4.46 * 100:.1f}%" in rec.text
    diff_hi, _ = ranking.improvement(0.787, 0.684, "higher")
    assert diff_hi == pytest.approx(0.103)
    with pytest.raises(ValueError, match="'sideways'"):
        ranking.improvement(1.0, 2.0, "sideways")


def test_recommendation_says_when_precision_recall_and_fid_disagree():
    rec = ranking.recommend(blog_frame(), DIRECTIONS, "fid")
    assert "disagree" in rec.text
    assert "precision at decay 0.9999" in rec.text and "recall at decay 0.9" in rec.text
    assert "fid at decay 0.999" in rec.text


def test_collapse_detected_on_article_numbers_and_not_elsewhere():
    frame = blog_frame()
    coll = ranking.collapses(frame, DIRECTIONS, 80)
    assert set(coll) == {"0.99999", "0.999999"}
    assert any("recall ≈ 0" in r for r in coll["0.99999"])
    rec = ranking.recommend(frame, DIRECTIONS, "fid")
    assert rec.level == "warning" and "Collapse" in rec.text and "0.999999" in rec.text
    # a healthy sweep: nothing collapses
    healthy = frame[~frame.variant.isin(["0.99999", "0.999999"])]
    assert ranking.collapses(healthy, DIRECTIONS, 80) == {}
    assert ranking.recommend(healthy, DIRECTIONS, "fid").level == "info"


def test_collapse_rule_is_robust_and_directional():
    row = pd.Series({"a": 1.0, "b": 1.1, "c": 0.9, "d": 1.05, "e": 50.0})
    assert set(ranking.detect_collapse(row, "lower", "fid")) == {"e"}
    assert ranking.detect_collapse(row, "higher", "is") == {}  # 50 is *better* for a higher metric
    small = pd.Series({"a": 1.0, "b": 1.001, "c": 1.002, "d": 0.999, "e": 1.2})
    assert ranking.detect_collapse(small, "lower", "fid") == {}  # 20% worse is not off the scale
    nan = pd.Series({"a": 1.0, "b": float("nan"), "c": 1.0})
    assert "b" in ranking.detect_collapse(nan, "lower", "fid")


def test_unknown_direction_is_shown_but_never_ranked():
    recs = metric_lines([100, 200], metrics=("fid", "my_metric"))
    frame, _ = metric_records_to_frame(recs)
    directions = {"fid": "lower"}
    assert ranking.best_per_stage(frame, "my_metric", directions.get("my_metric")).empty
    assert not ranking.metric_table(frame, "my_metric").empty
    rec = ranking.recommend(frame, directions, "my_metric")
    assert rec.best_variant is None and "no known direction" in rec.text
    assert set(ranking.best_decay_drift(frame, directions)["metric"]) == {"fid"}


def test_missing_metrics_for_some_variants_and_single_stage():
    recs = [r for r in metric_lines([100]) if not (r["metric"] == "fid" and r["variant"] == "0.999")]
    frame, _ = metric_records_to_frame(recs)
    table = ranking.metric_table(frame, "fid")
    assert list(table.index) == [100] and "0.999" not in table.columns and "0.9993" in table.columns
    best = ranking.best_per_stage(frame, "fid", "lower")
    ref = reference_best(recs, "fid", "lower")
    assert best.variant.tolist() == [ref[100][0]]
    rec = ranking.recommend(frame, DIRECTIONS, "fid")
    assert rec.step == 100 and rec.best_variant == ref[100][0]


def test_variant_order_and_formatting():
    shuffled = ["0.9999", "bema", "raw", "0.5", "0.999999", "custom"]
    assert ranking.variant_order(shuffled) == ["raw", "0.5", "0.9999", "0.999999", "bema", "custom"]
    assert ranking.format_value(3.2049) == "3.205" and ranking.format_value(float("nan")) == "—"
    assert ranking.format_step(12500) == "12,500"
    assert ranking.pick_stages(range(100), 5) == [0, 25, 50, 74, 99]
    assert ranking.pick_stages([3, 1, 2], 10) == [1, 2, 3]
    with pytest.raises(ValueError, match="0"):
        ranking.pick_stages([1], 0)


def test_compare_runs_and_ranking_flip():
    # run A is better at 0.9999, run B is better at its own best decay
    def frame(values: dict[str, float]) -> pd.DataFrame:
        return metric_records_to_frame(
            [
                {
                    "step": 10,
                    "variant": v,
                    "decay": ranking.decay_of(v),
                    "metric": "fid",
                    "value": x,
                    "time": 0.0,
                }
                for v, x in values.items()
            ]
        )[0]

    a = frame({"raw": 5.0, "0.999": 3.5, "0.9999": 3.0})
    b = frame({"raw": 6.0, "0.999": 2.5, "0.9999": 4.0})
    comp = ranking.compare_runs({"A": a, "B": b}, "fid", "lower")
    row = comp.set_index("run")
    assert row.at["A", "fixed_rank"] == 1 and row.at["B", "fixed_rank"] == 2
    assert row.at["B", "best_rank"] == 1 and row.at["B", "best_variant"] == "0.999"
    assert ranking.ranking_flips(comp) == [(10, "A", "B")]
    same = ranking.compare_runs({"A": a, "C": frame({"0.999": 9.0, "0.9999": 9.5})}, "fid", "lower")
    assert ranking.ranking_flips(same) == []
    assert ranking.compare_runs({"A": a}, "fid", None).empty


def test_run_data_summary_fields(tmp_path):
    run = make_run(tmp_path, steps=(1000, 2000), state="running", samples=False)
    write_jsonl(
        run / "events.jsonl",
        [
            {"time": time.time(), "step": 2100, "type": "nonfinite_skip", "count": 3},
            {
                "time": time.time(),
                "step": 2200,
                "type": "error",
                "where": "sampler",
                "variant": "0.9",
                "message": "boom",
                "traceback": "",
            },
            {"time": time.time(), "step": 2300, "type": "some_future_event"},
        ],
    )
    data = load_run(run)
    assert data.state() == "live" and data.last_step() == 2300
    assert len(data.events_of("error")) == 1 and data.events_of("nonfinite_skip")[0]["count"] == 3
    assert data.sample_kind == "points" and data.directions["fid"] == "lower"
