"""A sweep's metric values with their uncertainty: which half-sample statistic goes with which metric,
the conventions of user metrics, the noise floor and the comparison with the best variant.

The statistics themselves are the pure functions of :mod:`emascope.uncertainty`; this module only
wires them to the sweep (:mod:`emascope.scoring`): it takes a variant's features, the reference
(``emascope.scoring.Reference``: ``features``, ``stats``, ``radii``, ``nearest_k``, ``cache``) and
the :class:`~emascope.config.ScoringConfig`, and returns :class:`~emascope.uncertainty.Estimate` s.

User metric conventions (``evaluate`` and ``sample_metrics`` return ``{name: value}``):

- a number: the value. From ``sample_metrics`` it gets an interval by calling the hook again on
  random halves of the samples (at most ``bootstrap_calls`` calls, each on ``num_samples // 2``
  samples: about ``bootstrap_calls / 2`` times the cost of one call); from ``evaluate`` none;
- a pair ``(value, standard_error)``: the value and your own standard error (no extra calls);
- ``sample_metrics`` only: a 1-D array (numpy or torch) of one number per sample: the metric is its
  mean, and its interval costs nothing (means over the same halves as every other metric).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from emascope import metrics as M
from emascope import runformat as rf
from emascope import uncertainty as U
from emascope.config import ScoringConfig
from emascope.features import Features
from emascope.kid import KERNELS_KEY

#: Below this many samples no interval is computed (halves of fewer than 10 samples say little).
MIN_SAMPLES = 20


class Halves:
    """The half-sample masks of one sweep, one set per sample count ``n`` (shared by every variant
    with that ``n``: the pairing of :mod:`emascope.uncertainty`)."""

    def __init__(self, cfg: ScoringConfig) -> None:
        self.replicates, self.seed = cfg.bootstrap_replicates, cfg.seed
        self._masks: dict[int, torch.Tensor] = {}

    def __call__(self, n: int) -> torch.Tensor:
        if n not in self._masks:
            self._masks[n] = U.half_sample_masks(n, self.replicates, self.seed)
        return self._masks[n]


def _ref_cached(ref: Any, key: Any, build: Callable[[], Any]) -> Any:
    cache = ref.cache
    if key not in cache:
        cache[key] = build()
    return cache[key]


#: Key of a variant's :class:`~emascope.uncertainty.NeighbourStructure` in the per-variant cache.
STRUCTURE = "prdc_structure"


def neighbour_structure(feats: Features, ref: Any, cfg: ScoringConfig, masks: torch.Tensor) -> U.NeighbourStructure:
    """The k-NN structure of one variant (:func:`emascope.uncertainty.neighbour_structure`) with the
    reference's shared radii. Its :func:`~emascope.uncertainty.prdc_values` equal the four k-NN metrics
    bit for bit, so a sweep with intervals builds it first and takes the metric values from it."""
    k = cfg.prc_neighborhood
    return U.neighbour_structure(feats.features, ref.features.features, masks, prc_k=k,
                                 ref_radii_prc=ref.prc_radii(k), dc_k=ref.nearest_k, ref_radii_dc=ref.radii)


def group_replicates(group: str, feats: Features, ref: Any, cfg: ScoringConfig, masks: torch.Tensor,
                     cache: dict[str, Any]) -> dict[str, np.ndarray]:
    """Half-sample replicates of the metrics of one metric group (``fid``/``fd``, ``kid``, ``prc``,
    ``density_coverage``, ``isc``) for one variant; ``cache`` is per variant (precision/recall and
    density/coverage share one neighbour structure, built here unless ``cache[STRUCTURE]`` holds
    it). Unknown groups give ``{}``."""
    gen, real = feats.features, ref.features.features
    if group in ("fid", "fd"):
        root = _ref_cached(ref, "sqrt_sigma", lambda: U.sqrtm_psd(ref.stats["sigma"]))
        return {group: U.fd_replicates(gen, ref.stats, masks, sqrt_cov_ref=root)}
    if group == "kid":
        term = _ref_cached(ref, "kid_term", lambda: U.kid_reference_term(real))
        return {"kid_mean": U.kid_replicates(gen, real, masks, ref_term=term, kernels=cache.get(KERNELS_KEY))}
    if group in ("prc", "density_coverage"):
        if "prdc" not in cache:
            s = cache.get(STRUCTURE)
            if s is None:
                s = neighbour_structure(feats, ref, cfg, masks)
            cache["prdc"] = U.prdc_replicates(s, masks)
        names = ("precision", "recall") if group == "prc" else ("density", "coverage")
        return {k: cache["prdc"][k] for k in names}
    if group == "isc" and feats.logits is not None:
        return {"isc_mean": U.isc_replicates(feats.logits, masks, seed=cfg.seed)}
    return {}


def group_estimates(group: str, values: Mapping[str, Any], feats: Features, ref: Any, cfg: ScoringConfig,
                    halves: Halves | None, cache: dict[str, Any]) -> dict[str, U.Estimate]:
    """``values`` of one metric group (from :func:`emascope.scoring.feature_metric_jobs`) as estimates,
    with replicates when ``halves`` is given and there are enough samples. KID's ``kid_mean`` also
    carries the subset noise of torch-fidelity's estimator (``kid_std^2 / kid_subsets``)."""
    n = len(feats.features)
    reps: dict[str, np.ndarray] = {}
    if halves is not None and n >= MIN_SAMPLES:
        reps = group_replicates(group, feats, ref, cfg, halves(n), cache)
    out = {}
    for name, value in values.items():
        if name == "kid_subset_size":
            continue
        v = M.finite_or_none(value)
        extra = None
        if name == "kid_mean" and M.finite_or_none(values.get("kid_std")) is not None:
            extra = float(values["kid_std"]) ** 2 / max(1, cfg.kid_subsets)
        r = reps.get(name) if name not in U.SPREAD_METRICS else None
        kept = n - 1 if name in U.DELETE_ONE_METRICS else None
        out[name] = U.Estimate(math.nan if v is None else v, r, n, extra if r is not None else None, kept)
    return out


def unusable_values(out: Mapping[str, Any], n: int | None = None) -> list[str]:
    """The entries of a hook's result that follow none of the conventions above (and are not
    ``None``, recorded as null like NaN), each as ``"'name' (what it is)"``; they are recorded as
    null. ``n``: the number of samples (``sample_metrics``), for per-sample arrays."""
    bad = []
    for name, value in out.items():
        if value is None or _pair(value) is not None or _per_sample(value, n) is not None:
            continue
        try:
            float(value)
            continue
        except (TypeError, ValueError, RuntimeError):
            pass
        if isinstance(value, (np.ndarray, torch.Tensor)):
            what = f"{type(value).__name__} of shape {tuple(value.shape)}"
            if value.ndim == 1 and n is not None:
                what += f"; a per-sample array needs {n} values, one per sample"
        else:
            what = type(value).__name__
        bad.append(f"{name!r} ({what})")
    return bad


def _pair(value: Any) -> tuple[float, float] | None:
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(x, numbers.Real) and not isinstance(x, bool) for x in value):
        return float(value[0]), float(value[1])
    return None


def _per_sample(value: Any, n: int | None) -> np.ndarray | None:
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 1 and n is not None and len(value) == n:
        arr = value.detach().cpu().double().numpy() if isinstance(value, torch.Tensor) else value
        return np.asarray(arr, dtype=np.float64)
    return None


def user_estimates(out: Mapping[str, Any], *, n: int | None = None, halves: Halves | None = None,
                   hook: Callable[[torch.Tensor], Mapping[str, Any]] | None = None,
                   samples: torch.Tensor | None = None, max_calls: int = 0,
                   on_error: Callable[[BaseException], None] | None = None) -> dict[str, U.Estimate]:
    """The values an ``evaluate`` / ``sample_metrics`` hook returned, under the module's conventions.

    ``n``, ``samples``, ``hook``: the samples the hook got (``sample_metrics`` only); numbers get
    black-box replicates from ``max_calls`` more calls of ``hook`` on halves (an exception there is
    passed to ``on_error`` and leaves them without an interval). A value that is none of the
    conventions is passed on as is (the caller records it as a number or null).
    """
    est: dict[str, U.Estimate] = {}
    plain = []
    for name, value in out.items():
        pair = _pair(value)
        arr = _per_sample(value, n)
        if pair is not None:
            v, se = pair
            est[name] = U.Estimate(v, None, n, se * se if math.isfinite(se) and se >= 0 else None)
        elif arr is not None:
            mean = float(arr.mean())
            reps = U.mean_replicates(arr, halves(n)) if halves is not None and n >= MIN_SAMPLES else None
            est[name] = U.Estimate(mean, reps, n)
        else:
            f = M.finite_or_none(value)
            est[name] = U.Estimate(math.nan if f is None else f, None, n)
            plain.append(name)
    if plain and hook is not None and samples is not None and halves is not None and max_calls >= 2 \
            and n is not None and n >= MIN_SAMPLES:
        try:
            reps = U.black_box_replicates(hook, samples, halves(n), max_calls=max_calls)
        except Exception as exc:  # noqa: BLE001 - the value stays, without an interval
            reps = {}
            if on_error is not None:
                on_error(exc)
        for name in plain:
            if name in reps and math.isfinite(est[name].value):
                est[name].replicates = reps[name]
    return est


def interval_fields(est: U.Estimate | None, level: float, metric: str) -> dict[str, Any]:
    """The optional ``se``/``lo``/``hi``/``n`` of a metrics.jsonl record for one estimate."""
    if est is None:
        return {}
    fields: dict[str, Any] = {}
    if est.n is not None:
        fields["n"] = int(est.n)
    se = est.se if math.isfinite(est.value) else None
    ci = est.interval(level, metric) if se is not None else None
    if se is not None and ci is not None:
        fields.update(se=se, lo=ci[0], hi=ci[1])
    return fields


def comparison_metrics(estimates: Mapping[str, Mapping[str, U.Estimate]], directions: Mapping[str, str | None],
                       level: float, *, metrics: Iterable[str] | None = None) -> dict[str, Any]:
    """The ``metrics`` object of a ``comparison`` event: for every ranked metric with at least two
    variants, the best variant and each variant's difference to it (:func:`emascope.uncertainty.compare_to_best`)."""
    by_metric: dict[str, dict[str, U.Estimate]] = {}
    for variant, per in estimates.items():
        for name, e in per.items():
            by_metric.setdefault(name, {})[variant] = e
    out = {}
    for name in sorted(by_metric if metrics is None else set(metrics) & set(by_metric)):
        direction = directions.get(name)
        if direction not in rf.DIRECTIONS or name in U.SPREAD_METRICS or len(by_metric[name]) < 2:
            continue
        best, comps = U.compare_to_best(by_metric[name], direction, level)
        if best is None:
            continue
        out[name] = {"direction": direction, "best": best, "n": by_metric[name][best].n,
                     "variants": {v: rf.comparison_entry(diff=c.diff, se=c.se, lo=c.lo, hi=c.hi, n=c.n,
                                                         worse=c.worse, paired=c.paired)
                                  for v, c in comps.items()}}
    return out


def floor_fields(estimates: Mapping[str, U.Estimate], level: float) -> dict[str, Any]:
    """The ``metrics`` object of a ``noise_floor`` event: ``{name: {"value", "se", "lo", "hi"}}``."""
    out = {}
    for name, e in estimates.items():
        if name in U.SPREAD_METRICS or not math.isfinite(e.value):
            continue
        f = interval_fields(e, level, name)
        out[name] = {"value": e.value, "se": f.get("se"), "lo": f.get("lo"), "hi": f.get("hi")}
    return out
