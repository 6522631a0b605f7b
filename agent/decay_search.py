"""Find the best decay between grid points: golden-section search on ``x = log(1 - decay)``.

A sweep scores a grid of decays; the best one is the best of the grid, not the best. Given the
grid's values at one stage and a way to score any decay (weights synthesised post hoc, see
:mod:`emascope.synthesis`), :func:`search_between` narrows the bracket around the best grid decay
(its two grid neighbours) by golden-section steps on ``log(1 - decay)`` (the axis on which decays
are spread: 0.999 -> 0.9999 is one step like 0.99 -> 0.999). It stops when

- the evaluation budget ``max_evals`` is spent;
- the bracket's ends can no longer be told apart by synthesis: ``resolvable(d1, d2)`` is False
  (their averaging profiles differ by less than the synthesis error);
- the values in the bracket differ by less than the metric's uncertainty ``noise`` (when known);
- an evaluation fails (``evaluate`` returns ``None``: e.g. synthesis refused).

Pure Python, no torch: the agent and ``emascope score`` pass their own ``evaluate``.
Conventions: decays ``d`` (never ``1 - d``); ``direction`` is ``"lower"`` or ``"higher"`` (better).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

#: 1 - 1/golden ratio: where the next probe goes inside the larger half of the bracket.
GOLDEN = (3.0 - math.sqrt(5.0)) / 2.0


def to_x(decay: float) -> float:
    """``log(1 - decay)`` (the search axis)."""
    return math.log1p(-decay)


def to_decay(x: float) -> float:
    """Inverse of :func:`to_x`."""
    return -math.expm1(x)


def round_decay(decay: float, digits: int = 3) -> float:
    """``decay`` with ``1 - decay`` kept to ``digits`` significant digits, as a short decimal
    (0.99961234 -> 0.999612): the variant names of searched decays stay readable."""
    gap = 1.0 - decay
    if gap <= 0 or decay <= 0:
        return decay
    places = max(digits, math.ceil(-math.log10(gap)) + digits - 1)
    return float(f"{decay:.{places}f}")


def search_noise(grid: Mapping[float, float | None], ses: Mapping[float, float | None], *, direction: str,
                 tolerance: float | None) -> tuple[float | None, str | None]:
    """The ``noise`` of :func:`search_between` and where it came from.

    ``tolerance`` (the user's ``search_tolerance``, in the metric's units) wins: ``(tolerance,
    "search_tolerance")``. Else the standard error of the best grid decay's value at this stage
    (``ses[decay]``, from the sweep's intervals): ``(se, "standard_error")``, so the search stops
    once its bracket's values are within the measurement's own noise. Else ``(None, None)``.
    """
    if tolerance is not None:
        return float(tolerance), "search_tolerance"
    sign = 1.0 if direction == "lower" else -1.0
    scored = [(sign * v, d) for d, v in grid.items() if v is not None and math.isfinite(v)]
    if not scored:
        return None, None
    se = ses.get(min(scored)[1])
    if se is None or not math.isfinite(se) or se < 0:
        return None, None
    return float(se), "standard_error"


@dataclass
class SearchResult:
    """Outcome of :func:`search_between`: every evaluated decay with its value (in order), the best
    decay overall (grid or searched) and why the search stopped."""

    evaluated: list[tuple[float, float | None]] = field(default_factory=list)
    best_decay: float | None = None
    best_value: float | None = None
    best_is_grid: bool = True
    stopped: str = ""
    bracket: tuple[float, float] | None = None


def search_between(grid: Mapping[float, float | None], evaluate: Callable[[float], float | None], *,
                   direction: str, max_evals: int,
                   resolvable: Callable[[float, float], bool] = lambda a, b: True,
                   noise: float | None = None, digits: int = 3) -> SearchResult:
    """Golden-section search around the best grid decay (see the module docstring).

    ``grid``: ``{decay: value}`` of the fixed-decay variants at one stage (``None`` values are
    ignored). ``evaluate(decay)`` scores a decay between them and returns its value (``None`` on
    failure). Probes are rounded with :func:`round_decay`; a probe equal to a point already known
    ends the search.
    """
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be 'lower' or 'higher', got {direction!r}")
    sign = 1.0 if direction == "lower" else -1.0
    pts = sorted((d, v) for d, v in grid.items() if v is not None and math.isfinite(v) and 0.0 < d < 1.0)
    res = SearchResult()
    if len(pts) < 2:
        res.stopped = "fewer than two scored grid decays"
        return res
    known: dict[float, float] = {d: sign * v for d, v in pts}
    best = min(known, key=known.get)
    res.best_decay, res.best_value = best, sign * known[best]
    ds = [d for d, _ in pts]
    i = ds.index(best)
    if i == 0 or i == len(ds) - 1:
        res.stopped = "the best grid decay is at the end of the grid: nothing to search between"
        return res
    a, b, c = ds[i - 1], best, ds[i + 1]  # decays; x = log(1 - d) decreases as d grows
    for _ in range(max_evals):
        res.bracket = (a, c)
        if not resolvable(a, c):
            res.stopped = "the bracket is within the synthesis error"
            break
        if noise is not None and max(known[a], known[c]) - known[b] <= noise:
            res.stopped = "the values in the bracket differ by less than the metric's uncertainty"
            break
        xa, xb, xc = to_x(a), to_x(b), to_x(c)
        left_wider = abs(xa - xb) > abs(xc - xb)
        xn = xb + GOLDEN * ((xa if left_wider else xc) - xb)
        dn = round_decay(to_decay(xn), digits)
        if dn in known or not (min(a, c) < dn < max(a, c)):
            res.stopped = "the bracket cannot be split further at this precision"
            break
        value = evaluate(dn)
        res.evaluated.append((dn, value))
        if value is None or not math.isfinite(value):
            res.stopped = f"evaluating decay {dn!r} failed"
            break
        known[dn] = sign * value
        # keep the three points bracketing the minimum: (a, b, c) with b the best
        if known[dn] < known[b]:
            if (dn < b) == (a < b):
                a, b, c = a, dn, b
            else:
                a, b, c = b, dn, c
        else:
            if (dn < b) == (a < b):
                a = dn
            else:
                c = dn
    else:
        res.stopped = f"evaluation budget ({max_evals}) spent"
    best = min(known, key=known.get)
    res.best_decay, res.best_value = best, sign * known[best]
    res.best_is_grid = best in grid
    res.bracket = (a, c)
    return res
