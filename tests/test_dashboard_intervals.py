"""The dashboard's view of the recorded uncertainty: parsing comparison / noise-floor events (hostile
content tolerated), ties, samples to separate, significant changes of the best decay, the
recommendation's sentences and the figures' error bars, floor, log axis and tie marks."""

from __future__ import annotations

import math

import pytest
from dashboard_fixtures import metric_lines

from emascope.dashboard import intervals, plots, ranking
from emascope.dashboard.data import metric_records_to_frame

VARIANTS = ["raw", "0.9", "0.99", "0.999", "0.9999"]


def _comparison(step, best, diffs, *, metric="fd", direction="lower", n=1000, level=0.95):
    """A comparison event: ``diffs[v] = (diff, se)``; worse decided as the agent does."""
    z = 1.959963984540054
    variants = {}
    for v, (d, se) in diffs.items():
        worse = (d - z * se > 0) if direction == "lower" else (d + z * se < 0)
        variants[v] = {"diff": d, "se": se, "lo": d - z * se, "hi": d + z * se, "n": n, "worse": worse,
                       "paired": True}
    variants[best] = {"diff": 0.0, "se": 0.0, "lo": 0.0, "hi": 0.0, "n": n, "worse": False, "paired": True}
    return {"time": 1.0, "step": step, "type": "comparison", "level": level, "method": "half_sample",
            "replicates": 100, "metrics": {metric: {"direction": direction, "best": best, "n": n,
                                                    "variants": variants}}}


def _frame(step=1000, values=None, se=0.01):
    values = values or {"raw": 0.30, "0.9": 0.20, "0.99": 0.105, "0.999": 0.10, "0.9999": 0.9}
    recs = []
    for v, x in values.items():
        recs.append({"step": step, "variant": v, "decay": None if v == "raw" else float(v), "metric": "fd",
                     "value": x, "time": 1.0, "se": se, "lo": max(0.0, x - 1.96 * se), "hi": x + 1.96 * se,
                     "n": 1000})
    return metric_records_to_frame(recs)[0]


def test_comparisons_ties_runner_up_and_hostile_events():
    good = _comparison(1000, "0.999", {"raw": (0.2, 0.01), "0.9": (0.1, 0.01), "0.99": (0.005, 0.01),
                                       "0.9999": (0.8, 0.05)})
    hostile = [
        "not a dict", {"type": "comparison"}, {"type": "comparison", "step": "1", "level": 0.95, "metrics": {}},
        {"type": "comparison", "step": 5, "level": 2.0, "metrics": {"fd": {}}},
        {"type": "comparison", "step": 5, "level": 0.95, "metrics": {"fd": {"direction": "sideways"}}},
        {"type": "comparison", "step": 5, "level": 0.95,
         "metrics": {"fd": {"direction": "lower", "best": "x", "variants": {"y": {"diff": "0"}}}}},
        {"type": "comparison", "step": True, "level": 0.95, "metrics": []},
    ]
    comps = intervals.comparisons([*hostile, good])
    assert list(comps) == [(1000, "fd")]
    c = comps[(1000, "fd")]
    assert c.best == "0.999" and sorted(c.ties()) == ["0.99", "0.999"] and c.level == 0.95 and c.n == 1000
    assert c.runner_up()[0] == "0.99" and c.significantly_worse("raw") is True
    # a later comparison of the same stage replaces it (a re-scored stage)
    again = _comparison(1000, "0.99", {"0.999": (0.001, 0.01)})
    assert intervals.comparisons([good, again])[(1000, "fd")].best == "0.99"


def test_samples_to_separate_and_noise_floor():
    z = 1.959963984540054 + 0.8416212335729143
    assert intervals.samples_to_separate(0.01, 0.01, 1000, 0.95) == math.ceil(1000 * z * z)
    assert intervals.samples_to_separate(0.0, 0.01, 1000, 0.95) is None
    assert intervals.samples_to_separate(0.01, None, 1000, 0.95) is None
    floor = intervals.noise_floor([
        {"type": "noise_floor", "step": 1, "source": "exact", "n": 4000, "level": 0.95,
         "metrics": {"fd": {"value": 0.002, "lo": 0.001, "hi": 0.003}, "bad": {"value": "x"}, "x": 3}},
    ])
    assert set(floor) == {"fd"} and floor["fd"].label == "exact samples" and floor["fd"].n == 4000
    assert intervals.at_floor(0.0025, floor["fd"], "lower") and not intervals.at_floor(0.004, floor["fd"], "lower")
    assert intervals.noise_floor([{"type": "noise_floor", "metrics": "nope"}]) == {}


def test_best_changes_are_significant_only_both_ways():
    a = _comparison(1000, "0.99", {"0.999": (0.05, 0.01)})     # 0.999 significantly worse at 1000
    b = _comparison(2000, "0.999", {"0.99": (0.05, 0.01)})     # 0.99 significantly worse at 2000
    c = _comparison(3000, "0.99", {"0.999": (0.001, 0.01)})    # back, but within the noise
    changes = intervals.best_changes(intervals.comparisons([a, b, c]), "fd")
    assert [(x.step, x.before, x.after, x.significant) for x in changes] == [
        (2000, "0.99", "0.999", True), (3000, "0.999", "0.99", False)]
    assert "Significant rank flip" in ranking.change_sentence(changes, 3000)
    assert ranking.change_sentence(changes[1:], 3000) is None


def test_recommendation_names_the_tie_and_the_samples_needed():
    frame = _frame()
    comps = intervals.comparisons([_comparison(1000, "0.999", {
        "raw": (0.2, 0.01), "0.9": (0.1, 0.01), "0.99": (0.005, 0.01), "0.9999": (0.8, 0.05)})])
    floor = intervals.noise_floor([{"type": "noise_floor", "source": "reference_split", "n": 900,
                                    "metrics": {"fd": {"value": 0.11, "lo": 0.09, "hi": 0.13}}}])
    rec = ranking.recommend(frame, {"fd": "lower"}, "fd", comparisons=comps, floor=floor)
    assert rec.best_variant == "0.999" and rec.ties == ["0.99", "0.999"]
    assert "**0.99–0.999 tie** at 1,000 samples per variant" in rec.text
    z = 1.959963984540054 + 0.8416212335729143
    assert rec.samples_to_separate == math.ceil(1000 * (z * 0.01 / 0.005) ** 2)
    assert f"About {rec.samples_to_separate:,} samples per variant would likely separate 0.999 from 0.99" in rec.text
    assert "(0.9, significant)" in rec.text and "± 0.01 (s.e.)" in rec.text
    assert "within the noise floor (reference vs reference" in rec.text
    # without recorded comparisons: the plain recommendation, no tie language
    plain = ranking.recommend(frame, {"fd": "lower"}, "fd")
    assert "tie" not in plain.text and plain.best_variant == "0.999"
    # the recorded best wins over the plain minimum (a racing sweep's dropped variants have fewer
    # samples and are never the best); one naming no value of the stage is ignored
    raced = intervals.comparisons([_comparison(1000, "0.99", {"0.999": (-0.005, 0.01)})])
    assert ranking.recommend(frame, {"fd": "lower"}, "fd", comparisons=raced).best_variant == "0.99"
    wrong = intervals.comparisons([_comparison(1000, "0.5", {"0.999": (-0.2, 0.01)})])
    assert "tie" not in ranking.recommend(frame, {"fd": "lower"}, "fd", comparisons=wrong).text
    assert ranking.tie_phrase(["raw", "0.9", "0.999"], VARIANTS) == "raw–0.9, 0.999"


def test_figures_draw_intervals_floor_log_axis_and_ties():
    frame = _frame()
    floor = intervals.Floor("fd", 0.11, 0.09, 0.13, "exact", 1000, 0.95)
    fig = plots.metric_vs_decay(frame, "fd", "lower", floor=floor, log_y=True)
    line = next(t for t in fig.data if t.mode == "lines+markers")
    assert line.error_y.visible and len(line.error_y.array) == 4  # the four fixed decays
    assert line.error_y.array[0] == pytest.approx(1.96 * 0.01)
    assert any(t.name and t.name.startswith("noise floor (exact samples)") for t in fig.data)
    assert fig.layout.yaxis.type == "log" and any(s.type == "rect" for s in fig.layout.shapes)
    # KID can be negative: no log axis then, and the title says why
    neg = metric_records_to_frame(metric_lines([1000], metrics=("kid_mean",)))[0]
    neg.loc[0, "value"] = -0.5
    assert not plots.log_scale_possible(neg, "kid_mean")
    f2 = plots.metric_vs_decay(neg, "kid_mean", "lower", log_y=True)
    assert f2.layout.yaxis.type != "log" and "log scale needs positive values" in f2.layout.title.text
    comps = intervals.comparisons([_comparison(1000, "0.999", {"raw": (0.2, 0.01), "0.99": (0.005, 0.01)})])
    hm = plots.heatmap(frame, "fd", "lower", comparisons=comps)
    tied = next(t for t in hm.data if t.name == "tied with the best (95%)")
    best = next(t for t in hm.data if t.name == "best of stage")
    assert list(tied.x) == ["0.99"] and list(best.x) == ["0.999"] and list(tied.y) == ["1,000"]
    # precision-recall: error bars from the recorded intervals
    pr = metric_records_to_frame([
        {"step": 1, "variant": v, "metric": m, "value": 0.5, "lo": 0.4, "hi": 0.7, "se": 0.1}
        for v in VARIANTS for m in ("precision", "recall")])[0]
    trace = plots.precision_recall(pr, 1).data[0]
    assert trace.error_y.array[0] == pytest.approx(0.2) and trace.error_x.arrayminus[0] == pytest.approx(0.1)


def test_decay_axis_labels_do_not_overlap():
    """0.999, 0.9993, 0.9995 and 0.9997 get their own evenly spaced ticks: at the plot's width (~700 px
    for 12 ticks) every label has at least 50 px, more than one rotated label needs."""
    frame = metric_records_to_frame(metric_lines([1000, 2000], metrics=("fid",)))[0]
    axis = plots.metric_vs_decay(frame, "fid", "lower").layout.xaxis
    ticks = dict(zip(axis.ticktext, axis.tickvals, strict=True))
    close = [ticks[v] for v in ("0.999", "0.9993", "0.9995", "0.9997")]
    span = axis.range[1] - axis.range[0]
    assert min(b - a for a, b in zip(close, close[1:], strict=False)) / span * 700 > 50


def test_ranking_flips_between_runs_are_flagged_only_when_significant():
    """Run a beats b at 0.9999, b beats a at each run's best decay: a flip. With small standard
    errors it is significant; with large ones it is within the noise; without any it is unknown."""
    def run(fixed, best, se):
        recs = [{"step": 1, "variant": "0.9999", "metric": "fd", "value": fixed},
                {"step": 1, "variant": "0.99", "metric": "fd", "value": best}]
        if se is not None:
            for r in recs:
                r["se"] = se
        return metric_records_to_frame(recs)[0]

    for se, want in ((0.01, True), (1.0, False), (None, None)):
        comp = ranking.compare_runs({"a": run(1.0, 0.6, se), "b": run(1.5, 0.4, se)}, "fd", "lower")
        assert ranking.significant_ranking_flips(comp) == [(1, "a", "b", want)], se
