"""Racing (successive halving) over a sweep's variants: draw the samples in rounds, and stop drawing for
the variants that are already significantly worse than the best on the metric the user ranks by.

Round ``t`` brings every variant still in the race to ``b_t`` sample batches, with
``b_0 = ceil(racing_first * num_batches)`` and ``b_t`` doubling until the last round draws all of
them (:func:`schedule`). After every round but the last, the variants are compared with the round's
best on the racing metric, paired on the same half-samples (:func:`emascope.uncertainty.compare_to_best`;
every variant holds the same batches, so the same noise), and a variant whose difference to the best
is significantly on the bad side is dropped: it keeps the samples it has and draws no more. Collapsed
decays (the default sweep's 0.9999 ... 0.999999 early in training) are hopeless from the first round,
so they are the first to go.

Error control: a drop needs the difference to exceed ``z`` standard errors with ``z`` at the
Bonferroni level ``1 - (1 - level) / decisions`` over the ``decisions`` rounds that can drop, so the
chance of ever dropping a variant that is not worse stays below ``1 - level`` per comparison. The
variants still in the race at the end have drawn exactly the samples of a full sweep (same batches,
same seeds), so their values and intervals, and the final best, are those a full sweep reports.

This module is a driver only: :func:`race` calls back into the sweep, which draws a batch range for
one variant (``emascope.scoring.draw_and_extract(batches=...)``) and scores it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from emascope.uncertainty import Comparison, Estimate, compare_to_best, z_value


def schedule(num_batches: int, first: float) -> list[int]:
    """Cumulative batch counts of the rounds: ``ceil(first * num_batches)`` (at least 1), doubling,
    the last one ``num_batches``. ``[num_batches]`` when there is nothing to race."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    if not 0.0 < first <= 1.0:
        raise ValueError(f"first must be a fraction in (0, 1], got {first}")
    b = max(1, math.ceil(first * num_batches))
    rounds = []
    while b < num_batches:
        rounds.append(b)
        b *= 2
    return rounds + [num_batches]


def drop_z(level: float, decisions: int) -> float:
    """Normal quantile of a drop: two-sided level ``1 - (1 - level) / decisions`` (Bonferroni)."""
    return z_value(1.0 - (1.0 - level) / max(1, decisions))


@dataclass
class RoundResult:
    """One round: the batches every racing variant holds after it (``batches``), their samples
    (``n``), the variants that took part, the round's best and the variants dropped after it
    (with their comparison to the best)."""

    batches: int
    n: int | None
    variants: list[str]
    best: str | None
    dropped: dict[str, Comparison] = field(default_factory=dict)


@dataclass
class RaceResult:
    """The rounds, and per variant the batches it drew (``batches[v]``)."""

    rounds: list[RoundResult]
    batches: dict[str, int]

    @property
    def survivors(self) -> list[str]:
        return list(self.rounds[-1].variants) if self.rounds else []

    def dropped(self) -> dict[str, tuple[int, Comparison]]:
        """Variant -> (round index, comparison with that round's best) for every dropped variant."""
        return {v: (i, c) for i, r in enumerate(self.rounds) for v, c in r.dropped.items()}


def race(variants: Sequence[str], rounds: Sequence[int],
         score_round: Callable[[list[str], int], Mapping[str, Estimate]], direction: str, level: float) -> RaceResult:
    """Run the race. ``score_round(alive, batches)`` must bring every variant of ``alive`` to
    ``batches`` sample batches and return the racing metric's estimate of each (with half-sample
    replicates for the pairing; a variant it leaves out, e.g. after a sampler error, is kept).
    ``rounds``: :func:`schedule`. Returns the rounds and how many batches each variant drew."""
    if direction not in ("lower", "higher"):
        raise ValueError(f"racing needs a metric with a known direction, got {direction!r}")
    if not rounds:
        raise ValueError("rounds must not be empty")
    z = drop_z(level, len(rounds) - 1)
    alive = list(variants)
    drew = dict.fromkeys(alive, 0)
    out: list[RoundResult] = []
    for i, upto in enumerate(rounds):
        estimates = score_round(list(alive), int(upto))
        for v in alive:
            drew[v] = int(upto)
        last = i == len(rounds) - 1
        best, comps = compare_to_best(estimates, direction, level, z=z) if estimates else (None, {})
        n = estimates[best].n if best is not None else None
        result = RoundResult(int(upto), n, list(alive), best)
        if not last:
            result.dropped = {v: comps[v] for v in alive if v in comps and comps[v].worse}
            alive = [v for v in alive if v not in result.dropped]
        out.append(result)
    return RaceResult(out, drew)


def race_summary(result: RaceResult, metric: str, batch_size: int, num_samples: int) -> dict[str, Any]:
    """The ``racing`` object of a ``score_done`` event: the metric, and per round the samples per
    variant, the variants in it and the ones dropped after it."""
    return {"metric": metric,
            "rounds": [{"n": min(r.batches * batch_size, num_samples), "variants": r.variants, "best": r.best,
                        "dropped": sorted(r.dropped)} for r in result.rounds]}
