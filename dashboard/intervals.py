"""The uncertainty a run recorded, as the dashboard uses it: comparisons with the best, ties, the noise
floor, samples needed to separate two variants, significant changes of the best decay.

Reads the ``comparison`` and ``noise_floor`` events of ``events.jsonl`` (docs/run-format.md,
"Intervals, comparisons and the noise floor"), tolerating anything malformed (a field of the wrong
type reads as missing). Pure functions; no Streamlit, no torch. Runs without these events (written
before them, or with intervals off) give empty results, and every caller falls back to the plain
values.

Conventions: ``diff`` is value(variant) - value(best) in the metric's units; a variant *ties* with
the best when it is not significantly worse at the recorded confidence level (``worse`` false).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from emascope import runformat as rf

#: Power used for "samples that would likely separate the top two".
SEPARATION_POWER = 0.8


_num = rf.finite_number


def _count(x: Any) -> int | None:
    v = _num(x)
    return int(v) if v is not None and v >= 1 and v == int(v) else None


def _level(x: Any) -> float | None:
    v = _num(x)
    return v if v is not None and 0.0 < v < 1.0 else None


@dataclass
class VariantComparison:
    """One variant against the stage's best (see module docstring)."""

    diff: float
    se: float | None
    lo: float | None
    hi: float | None
    n: int | None
    worse: bool | None


@dataclass
class MetricComparison:
    """The ``comparison`` of one metric at one stage."""

    metric: str
    step: int
    direction: str
    best: str
    level: float
    n: int | None
    variants: dict[str, VariantComparison] = field(default_factory=dict)

    def ties(self) -> list[str]:
        """Variants not significantly worse than the best (the best included), in record order."""
        return [v for v, c in self.variants.items() if c.worse is False]

    def significantly_worse(self, variant: str) -> bool | None:
        c = self.variants.get(variant)
        return None if c is None else c.worse

    def runner_up(self) -> tuple[str, VariantComparison] | None:
        """The variant closest to the best (smallest ``|diff|``) other than the best."""
        others = [(v, c) for v, c in self.variants.items() if v != self.best]
        return min(others, key=lambda vc: abs(vc[1].diff)) if others else None


def _comparison(step: int, metric: str, body: Any, level: float) -> MetricComparison | None:
    if not isinstance(body, Mapping):
        return None
    direction, best, variants = body.get("direction"), body.get("best"), body.get("variants")
    if direction not in rf.DIRECTIONS or not isinstance(best, str) or not isinstance(variants, Mapping):
        return None
    out = MetricComparison(metric, step, direction, best, level, _count(body.get("n")))
    for v, c in variants.items():
        if not isinstance(v, str) or not isinstance(c, Mapping) or _num(c.get("diff")) is None:
            continue
        worse = c.get("worse")
        out.variants[v] = VariantComparison(_num(c.get("diff")), _num(c.get("se")), _num(c.get("lo")),
                                            _num(c.get("hi")), _count(c.get("n")),
                                            worse if isinstance(worse, bool) else None)
    return out if best in out.variants else None


def comparisons(events: Iterable[Mapping[str, Any]]) -> dict[tuple[int, str], MetricComparison]:
    """``(step, metric) -> MetricComparison`` from the ``comparison`` events (the last one of a
    stage wins, as a re-scored stage replaces its metrics)."""
    out: dict[tuple[int, str], MetricComparison] = {}
    for e in events:
        if not isinstance(e, Mapping) or e.get("type") != rf.EVENT_COMPARISON:
            continue
        step, level, metrics = e.get("step"), _level(e.get("level")), e.get("metrics")
        if not isinstance(step, int) or isinstance(step, bool) or level is None or not isinstance(metrics, Mapping):
            continue
        for metric, body in metrics.items():
            if isinstance(metric, str) and (c := _comparison(step, metric, body, level)) is not None:
                out[(step, metric)] = c
    return out


@dataclass
class Floor:
    """The noise floor of one metric: what a perfect model scores at this sample size."""

    metric: str
    value: float
    lo: float | None
    hi: float | None
    source: str
    n: int | None
    level: float | None

    @property
    def label(self) -> str:
        return "exact samples" if self.source == "exact" else "reference vs reference"


def noise_floor(events: Iterable[Mapping[str, Any]]) -> dict[str, Floor]:
    """``metric -> Floor`` from the last ``noise_floor`` event (``{}`` without one)."""
    last = None
    for e in events:
        if isinstance(e, Mapping) and e.get("type") == rf.EVENT_NOISE_FLOOR and isinstance(e.get("metrics"), Mapping):
            last = e
    if last is None:
        return {}
    source = last.get("source") if last.get("source") in rf.FLOOR_SOURCES else "reference_split"
    out = {}
    for metric, body in last["metrics"].items():
        if not isinstance(metric, str) or not isinstance(body, Mapping) or _num(body.get("value")) is None:
            continue
        out[metric] = Floor(metric, _num(body["value"]), _num(body.get("lo")), _num(body.get("hi")), source,
                            _count(last.get("n")), _level(last.get("level")))
    return out


def samples_to_separate(diff: float, se: float | None, n: int | None, level: float,
                        power: float = SEPARATION_POWER) -> int | None:
    """Samples per variant at which a difference ``diff`` with standard error ``se`` at ``n`` samples
    would be significant at ``level`` with probability ``power``: ``n ((z_level + z_power) se / |diff|)^2``
    (the standard error shrinks as ``1 / sqrt(n)``; the difference is assumed to stay). ``None`` when
    it cannot be said (no standard error, no difference)."""
    if se is None or n is None or not se > 0 or not diff or not math.isfinite(diff) or not 0 < level < 1:
        return None
    z = NormalDist().inv_cdf(0.5 + level / 2) + NormalDist().inv_cdf(power)
    need = n * (z * se / abs(diff)) ** 2
    return int(math.ceil(need)) if math.isfinite(need) and need < 1e15 else None


@dataclass
class BestChange:
    """The best variant of a metric changed between two consecutive compared stages."""

    step_before: int
    step: int
    before: str
    after: str
    significant: bool   # each was significantly worse than the other where the other was best


def best_changes(comps: Mapping[tuple[int, str], MetricComparison], metric: str) -> list[BestChange]:
    """Every change of the best variant of ``metric`` between consecutive stages with a comparison;
    ``significant`` only when the old best is significantly worse at the new stage *and* the new
    best was significantly worse at the old one (a flip the noise cannot explain)."""
    series = sorted((s, c) for (s, m), c in comps.items() if m == metric)
    out = []
    for (s0, c0), (s1, c1) in zip(series, series[1:], strict=False):
        if c0.best == c1.best:
            continue
        sig = c1.significantly_worse(c0.best) is True and c0.significantly_worse(c1.best) is True
        out.append(BestChange(s0, s1, c0.best, c1.best, sig))
    return out


def at_floor(value: float, floor: Floor | None, direction: str | None) -> bool:
    """Whether ``value`` is as good as the noise floor or better (inside or beyond its interval)."""
    if floor is None or direction not in rf.DIRECTIONS:
        return False
    bound = floor.hi if direction == "lower" else floor.lo
    bound = floor.value if bound is None else bound
    return value <= bound if direction == "lower" else value >= bound
