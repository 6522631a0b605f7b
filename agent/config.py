"""attach()'s settings, grouped into small validated dataclasses; defaults live here and only here.

``attach(model, optimizer, **kwargs)`` takes flat keyword arguments (like torch-fidelity's
``calculate_metrics``) and :func:`split_kwargs` maps each onto the one config that owns it:

- :class:`BankConfig`: the EMA bank (decays, where it lives, update_every, bias correction, BEMA,
  sharding over ranks);
- :class:`ScoringConfig`: how a sweep samples and scores (sample counts, seeds, extractor, metrics);
- :class:`RunConfig`: the run directory and the schedule (score/snapshot every, heartbeat);
- :class:`Hooks`: the user's objects (sampler, reference, evaluate, sample_metrics, directions).

run.json's ``settings`` are :func:`settings_of` the three configs (``dataclasses.asdict``). Units:
steps are optimizer steps, sample counts are numbers of samples, intervals are seconds; a decay is
``d`` in ``ema <- d * ema + (1 - d) * theta``. No torch import here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from emascope.ema_math import (
    DEFAULT_DECAYS,
    BEMAConfig,
    validate_bema_schedule,
    validate_decays,
    validate_update_every,
)
from emascope.runformat import BUSY_POLICIES, COPY_PLACEMENTS, DIRECTIONS, SCORING_MODES, SNAPSHOT_DTYPES

IMAGE_RANGES = ("auto", "-1,1", "0,1")


def check_int(name: str, value: Any, minimum: int, *, allow_none: bool = False) -> None:
    """``ValueError`` unless ``value`` is an int >= ``minimum`` (or ``None`` when allowed; no bools)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}, "
                         f"got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_seconds(name: str, value: Any, *, positive: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ValueError(f"{name} must be a number of seconds {'>' if positive else '>='} 0, got {value!r}")


@dataclass(frozen=True)
class BankConfig:
    """The EMA bank (:class:`emascope.bank.EMABank`, same meaning and defaults).

    ``decays``: decays ``d`` in [0, 1) (``None``: :data:`emascope.ema_math.DEFAULT_DECAYS`).
    ``device``: where the bank lives (``None``: the parameters' device; ``"cpu"``: the host placement,
    host memory updated by a background thread; ``"auto"``: chosen from the memory plan, refused
    with the numbers when nothing fits). ``update_every``: fold the weights in every m-th optimizer
    step with decay ``d**m``. ``bias_correction``: Adam-style zero-initialised EMAs (else
    initialised to the attach weights). ``bema``: ``True`` or a :class:`BEMAConfig` adds the
    ``"bema"`` variant. ``average_buffers``: average floating-point buffers too (else taken from
    the live model). ``shard``: split the bank over the ranks of torch.distributed (``None``: when
    there is more than one rank; FSDP2 models always; ``False``: rank 0 holds the whole bank).
    """

    decays: tuple[float, ...] | None = DEFAULT_DECAYS
    device: str | None = None
    update_every: int = 1
    bias_correction: bool = False
    bema: BEMAConfig | bool | None = False
    average_buffers: bool = False
    shard: bool | None = None

    def __post_init__(self) -> None:
        decays = DEFAULT_DECAYS if self.decays is None else self.decays
        object.__setattr__(self, "decays", validate_decays(decays))
        validate_update_every(self.update_every)
        check_bool("bias_correction", self.bias_correction)
        check_bool("average_buffers", self.average_buffers)
        bema = self.bema
        if bema is True:
            bema = BEMAConfig()
        elif bema is False:
            bema = None
        elif bema is not None and not isinstance(bema, BEMAConfig):
            raise ValueError(f"bema must be a bool or a BEMAConfig, got {bema!r}")
        validate_bema_schedule(bema, self.update_every)
        object.__setattr__(self, "bema", bema)
        if self.device is not None:
            object.__setattr__(self, "device", str(self.device))
        if self.shard not in (None, True, False):
            raise ValueError(f"shard must be True, False or None (auto), got {self.shard!r}")


@dataclass(frozen=True)
class ScoringConfig:
    """How a scoring sweep samples and scores each variant (counts are numbers of samples).

    Every variant draws ``num_samples`` samples from one generator seeded with ``seed`` (common
    random numbers), ``batch_size`` per sampler call. ``feature_extractor``: ``"auto"`` (identity
    for points, Inception-v3 for images), ``"identity"``, a torch-fidelity extractor name, or a
    callable ``samples -> features [n, d]`` (or ``(features, logits)``).
    ``feature_extractor_weights_path``: a local weights file for it (no download).
    ``feature_device``: where features are computed (``None``: the model's device).
    ``image_range``: float images in ``"-1,1"`` or ``"0,1"`` (``"auto"``: from the reference).
    ``reference_size``: use only the first reference items (``None``: all).
    ``kid_subset_size`` (``None``: min(1000, num_samples, num_reference)) and ``kid_subsets``: KID.
    ``nearest_k``: k of density/coverage; ``prc_neighborhood``: k of precision/recall.
    ``preview``: images in each PNG grid; ``preview_points``: points in each ``.npy`` preview.
    ``search_evals``: after each sweep, score up to this many decays *between* the grid's, synthesised
    post hoc from the stage snapshots, by golden-section search on ``log(1 - decay)`` around the
    best grid decay of ``search_metric`` (``None``: fid, else fd, else the first ranked metric); 0: off
    (docs/synthesis.md). Needs stage snapshots (``stage_snapshots`` != 0); with ``scoring="external"``
    ``emascope score`` runs it.
    ``search_tolerance``: the metric's uncertainty, in the metric's own units (absolute): the search
    stops once the values in its bracket differ by less than this (``None``: the standard error of the
    best grid decay's value at that stage, from the sweep's intervals, or no such stop without one; it
    still stops at the budget or when the bracket is within the synthesis error).

    Uncertainty (:mod:`emascope.uncertainty`): ``uncertainty`` turns the intervals on;
    ``confidence_level`` is their level (0.95: 95% intervals); ``bootstrap_replicates`` half-samples
    per variant and stage; ``bootstrap_calls``: at most this many extra calls of a ``sample_metrics``
    hook per variant for the metrics it returns as plain numbers (each call gets a random half of the
    samples; 0: no interval for them); ``noise_floor``: score the reference against a disjoint part
    of itself (or the ``exact_samples`` hook) once per run.
    Racing (:mod:`emascope.racing`): ``racing`` draws the samples in rounds and stops drawing for the
    variants already significantly worse than the best on ``racing_metric`` (``None``: ``fid``/``fd``);
    ``racing_first`` is the fraction of the ``num_samples`` drawn in the first round (it doubles each
    round).
    ``batched_sampling``: the sampler is a pure function of the model (the contract of
    :mod:`emascope.batched`): draw all variants in one vmapped call per batch (same samples),
    falling back to one variant at a time if that fails.
    """

    num_samples: int = 2000
    batch_size: int = 500
    seed: int = 0
    preview: int = 64
    preview_points: int = 2000
    feature_extractor: str | Callable[..., Any] | None = "auto"
    feature_extractor_weights_path: str | None = None
    feature_device: str | None = None
    feature_batch_size: int = 64
    image_range: str = "auto"
    reference_size: int | None = None
    nearest_k: int = 5
    prc_neighborhood: int = 3
    kid_subset_size: int | None = None
    kid_subsets: int = 100
    search_evals: int = 0
    search_metric: str | None = None
    search_tolerance: float | None = None
    uncertainty: bool = True
    confidence_level: float = 0.95
    bootstrap_replicates: int = 100
    bootstrap_calls: int = 16
    noise_floor: bool = True
    racing: bool = False
    racing_metric: str | None = None
    racing_first: float = 0.0625
    batched_sampling: bool = False

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size", "feature_batch_size", "kid_subsets", "nearest_k",
                     "prc_neighborhood"):
            check_int(name, getattr(self, name), 1)
        check_int("search_evals", self.search_evals, 0)
        if self.search_metric is not None and (not isinstance(self.search_metric, str) or not self.search_metric):
            raise ValueError(f"search_metric must be a metric name or None, got {self.search_metric!r}")
        tol = self.search_tolerance
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float))
                                or not math.isfinite(tol) or tol < 0):
            raise ValueError(f"search_tolerance must be a finite number >= 0 (the metric's uncertainty) or None, "
                             f"got {tol!r}")
        check_int("num_samples", self.num_samples, 2)
        check_int("seed", self.seed, 0)
        check_int("preview", self.preview, 0)
        check_int("preview_points", self.preview_points, 0)
        check_int("reference_size", self.reference_size, 2, allow_none=True)
        check_int("kid_subset_size", self.kid_subset_size, 2, allow_none=True)
        for name in ("uncertainty", "noise_floor", "racing"):
            check_bool(name, getattr(self, name))
        level = self.confidence_level
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.5 <= level < 1.0:
            raise ValueError(f"confidence_level must be a number in [0.5, 1), got {level!r}")
        check_int("bootstrap_replicates", self.bootstrap_replicates, 10)
        check_int("bootstrap_calls", self.bootstrap_calls, 0)
        first = self.racing_first
        if isinstance(first, bool) or not isinstance(first, (int, float)) or not 0.0 < first <= 1.0:
            raise ValueError(f"racing_first must be a fraction in (0, 1], got {first!r}")
        if self.racing_metric is not None and (not isinstance(self.racing_metric, str) or not self.racing_metric):
            raise ValueError(f"racing_metric must be a metric name or None, got {self.racing_metric!r}")
        check_bool("batched_sampling", self.batched_sampling)
        if self.image_range not in IMAGE_RANGES:
            raise ValueError(f"image_range must be one of {IMAGE_RANGES}, got {self.image_range!r}")
        fe = self.feature_extractor
        if not (fe is None or isinstance(fe, str) or callable(fe)):
            raise ValueError("feature_extractor must be 'auto', 'identity', a torch-fidelity name or a callable, "
                             f"got {fe!r}")
        path = self.feature_extractor_weights_path
        if path is not None:
            if not os.path.isfile(path):
                raise ValueError(f"feature_extractor_weights_path {str(path)!r} is not a file")
            object.__setattr__(self, "feature_extractor_weights_path", os.fspath(path))
        if self.feature_device is not None:
            object.__setattr__(self, "feature_device", str(self.feature_device))

    def extractor_label(self) -> str:
        """The extractor as run.json names it: its name, or a callable's ``__name__``."""
        fe = self.feature_extractor
        if callable(fe) and not isinstance(fe, str):
            return getattr(fe, "__name__", type(fe).__name__)
        return "auto" if fe is None else str(fe)


@dataclass(frozen=True)
class RunConfig:
    """The run directory and the schedule (steps are optimizer steps, intervals seconds).

    ``run_dir`` (required): a folder that already holds a run is refused unless ``resume=True``
    (continue it from ``banks/latest.safetensors``) or ``overwrite=True``. ``name``: shown by the
    dashboard (default: the folder's name). ``score_every``: steps between sweeps (``None``: only
    at close / ``score_now``); ``score_at_close``: a last sweep at close; ``snapshot_every``: steps
    between bank snapshots (``None``: ``score_every``). ``heartbeat_interval``: seconds between
    heartbeats; ``request_interval``: seconds between checks of ``requests/`` and of the bank's
    non-finite skip counter.

    Where sweeps run (docs/agent.md, "Where scoring runs"): ``scoring`` is ``"background"`` (a
    worker thread scores a frozen copy of the bank while training goes on), ``"inline"`` (in the
    step hook; training waits) or ``"external"`` (the training process only writes a stage
    snapshot; ``emascope score`` scores it elsewhere). ``score_busy``: a scoring point reached
    while a background sweep runs is ``"queue"``-d (one waits; a newer one replaces it),
    ``"skip"``-ped, or ``"wait"``-s (training blocks while another stage already waits).
    ``score_copy``: where the frozen copy lives (``"auto"``: device if it fits, else pinned host
    memory, else the stage snapshot on disk; see
    :func:`emascope.background.choose_copy_placement`). ``score_share_frozen``: background sweeps
    read the frozen parameters (``requires_grad`` False at attach: a LoRA base) in place instead of
    copying them, for jobs that never change frozen weights while a sweep runs (see
    :mod:`emascope.background`). ``score_timeout``: seconds a background
    sweep may go without progress (a sample batch, a variant, a metric) before it is declared hung,
    abandoned and recorded (``None``: never). ``close_timeout``: seconds ``close()`` waits for
    background sweeps in all (``None``: as long as they make progress).
    """

    run_dir: str
    name: str | None = None
    overwrite: bool = False
    resume: bool = False
    score_every: int | None = 1000
    score_at_close: bool = True
    snapshot_every: int | None = None
    heartbeat_interval: float = 2.0
    request_interval: float = 1.0
    stage_snapshots: int | None = 8
    stage_lead_in: tuple[int, ...] = (4, 16, 64)
    stage_snapshot_dtype: str = "float32"
    scoring: str = "background"
    score_busy: str = "queue"
    score_copy: str = "auto"
    score_share_frozen: bool = False
    score_timeout: float | None = 1800.0
    close_timeout: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.run_dir, (str, os.PathLike)) or not os.fspath(self.run_dir):
            raise ValueError(f"run_dir must be a path, got {self.run_dir!r}")
        object.__setattr__(self, "run_dir", os.fspath(self.run_dir))
        if self.name is not None and not isinstance(self.name, str):
            raise ValueError(f"name must be a string or None, got {self.name!r}")
        check_bool("overwrite", self.overwrite)
        check_bool("resume", self.resume)
        check_bool("score_at_close", self.score_at_close)
        check_bool("score_share_frozen", self.score_share_frozen)
        if self.overwrite and self.resume:
            raise ValueError("overwrite=True and resume=True exclude each other")
        check_int("score_every", self.score_every, 1, allow_none=True)
        check_int("snapshot_every", self.snapshot_every, 1, allow_none=True)
        check_seconds("heartbeat_interval", self.heartbeat_interval, positive=True)
        check_seconds("request_interval", self.request_interval)
        check_int("stage_snapshots", self.stage_snapshots, 0, allow_none=True)
        lead = self.stage_lead_in
        if isinstance(lead, (str, bytes)) or not isinstance(lead, Sequence) or any(
                isinstance(a, bool) or not isinstance(a, int) or a < 1 for a in lead):
            raise ValueError(f"stage_lead_in must be a sequence of integers >= 1 (steps), got {lead!r}")
        object.__setattr__(self, "stage_lead_in", tuple(sorted(set(lead))))
        if self.stage_snapshot_dtype not in SNAPSHOT_DTYPES:
            raise ValueError(f"stage_snapshot_dtype must be one of {SNAPSHOT_DTYPES}, "
                             f"got {self.stage_snapshot_dtype!r}")
        for name, allowed in (("scoring", SCORING_MODES), ("score_busy", BUSY_POLICIES),
                              ("score_copy", COPY_PLACEMENTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("score_timeout", "close_timeout"):
            if getattr(self, name) is not None:
                check_seconds(name, getattr(self, name), positive=True)

    @property
    def snapshot_interval(self) -> int | None:
        """Steps between snapshots: ``snapshot_every``, else ``score_every``."""
        return self.snapshot_every if self.snapshot_every is not None else self.score_every


@dataclass(frozen=True)
class Hooks:
    """The user's objects (not settings: never written to run.json).

    ``sampler(model, n, generator) -> samples`` (``[n, d]`` points or ``[n, C, H, W]`` images, all
    randomness from ``generator``); ``reference``: real data (tensor, ndarray, dataset) or
    precomputed ``emascope.features.Features``; ``evaluate(model) -> {name: value}``;
    ``sample_metrics(samples) -> {name: value}`` over each variant's samples;
    ``metric_directions``: ``{name: "lower" | "higher"}`` for user metrics;
    ``exact_samples``: exact samples of the data distribution (a tensor of the sampler's kind), used
    for the noise floor instead of a split of the reference (the first ``num_samples`` are used).
    """

    sampler: Callable[..., Any] | None = None
    reference: Any = None
    evaluate: Callable[..., Any] | None = None
    sample_metrics: Callable[..., Any] | None = None
    metric_directions: Mapping[str, str] = field(default_factory=dict)
    exact_samples: Any = None

    def __post_init__(self) -> None:
        for name, what in (("sampler", "(model, n, generator) -> samples"), ("evaluate", "(model) -> dict"),
                           ("sample_metrics", "(samples) -> dict")):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"{name} must be callable {what}, got {value!r}")
        if self.sample_metrics is not None and self.sampler is None:
            raise ValueError("sample_metrics was given but sampler is None: there are no samples to pass it")
        if self.reference is not None and self.sampler is None:
            raise ValueError("reference was given but sampler is None: nothing to compare it with")
        if self.exact_samples is not None:
            shape = getattr(self.exact_samples, "shape", None)
            if shape is None or len(shape) < 2 or shape[0] < 4:
                raise ValueError("exact_samples must be a tensor of at least 4 samples ([n, d] points or "
                                 f"[n, C, H, W] images), got {type(self.exact_samples).__name__} {shape}")
            if self.reference is None:
                raise ValueError("exact_samples was given but reference is None: they are scored against it")
        directions = dict(self.metric_directions or {})
        for key, value in directions.items():
            if value not in DIRECTIONS:
                raise ValueError(f"metric_directions[{key!r}] must be 'lower' or 'higher', got {value!r}")
        object.__setattr__(self, "metric_directions", directions)


CONFIGS: tuple[type, ...] = (RunConfig, BankConfig, ScoringConfig, Hooks)


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def split_kwargs(kwargs: Mapping[str, Any], *, caller: str = "attach") -> dict[type, dict[str, Any]]:
    """Map flat keyword arguments onto the config that owns each; ``TypeError`` for an unknown one
    (naming the closest known argument)."""
    owner = {name: cls for cls in CONFIGS for name in _fields(cls)}
    out: dict[type, dict[str, Any]] = {cls: {} for cls in CONFIGS}
    for key, value in kwargs.items():
        cls = owner.get(key)
        if cls is None:
            close = difflib.get_close_matches(key, owner, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}{hint}")
        out[cls][key] = value
    if "run_dir" not in out[RunConfig]:
        raise TypeError(f"{caller}() missing required keyword argument 'run_dir'")
    return out


def build_configs(kwargs: Mapping[str, Any]) -> tuple[RunConfig, BankConfig, ScoringConfig, Hooks]:
    """The four configs of ``attach(**kwargs)`` (validated: ``ValueError`` naming a bad value)."""
    parts = split_kwargs(kwargs)
    run, scoring = RunConfig(**parts[RunConfig]), ScoringConfig(**parts[ScoringConfig])
    check_together(run, scoring)
    return run, BankConfig(**parts[BankConfig]), scoring, Hooks(**parts[Hooks])


def check_together(run: RunConfig, scoring: ScoringConfig) -> None:
    """Settings that only make sense together: the search between grid decays synthesises from
    stage snapshots, so ``search_evals > 0`` needs ``stage_snapshots != 0`` (it runs after inline and
    background sweeps, and in ``emascope score`` after each stage it scores)."""
    if scoring.search_evals > 0 and run.stage_snapshots == 0:
        raise ValueError("search_evals > 0 synthesises decays from the stage snapshots, but stage_snapshots=0 "
                         "writes none: keep stage_snapshots >= 1 (or None) or set search_evals=0")


def settings_of(run: RunConfig, bank: BankConfig, scoring: ScoringConfig) -> dict[str, Any]:
    """run.json's flat ``settings``: every field of the three configs (JSON values only).

    ``run_dir``, ``name`` and ``decays`` are left out (run.json holds the name and the decays; the
    folder is where it lies), ``snapshot_every`` is the effective interval, ``bema`` is ``null`` or
    its hyperparameters, and ``feature_extractor`` is the extractor's label.
    """
    out: dict[str, Any] = {}
    for cfg in (bank, scoring, run):
        for f in dataclasses.fields(cfg):
            out[f.name] = getattr(cfg, f.name)
    for key in ("run_dir", "name", "decays"):
        out.pop(key)
    out["bema"] = None if bank.bema is None else dataclasses.asdict(bank.bema)
    out["snapshot_every"] = run.snapshot_interval
    out["feature_extractor"] = scoring.extractor_label()
    return out


def describe_arguments(classes: Sequence[type] = CONFIGS) -> list[tuple[str, str, Any]]:
    """``(argument, config class name, default)`` of every ``attach`` keyword argument, for docs."""
    rows = []
    for cls in classes:
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            rows.append((f.name, cls.__name__, default))
    return rows
