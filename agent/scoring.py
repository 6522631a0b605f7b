"""One scoring sweep: for "raw" and every bank variant, swap it in, sample, extract features, score.

Common random numbers: every variant draws its samples from a ``torch.Generator`` seeded with the
same ``seed``, so differences between variants come from the weights, not from the noise.

Memory: samples are turned into features batch by batch and dropped; only the features and the
preview head are kept. The one exception is a ``sample_metrics`` hook: it receives all
``num_samples`` samples of a variant at once, so they are kept in host memory for that variant
(``num_samples`` x one sample's size, e.g. 2000 x 3x64x64 float32 = 98 MB).

Failure isolation: a sampler, extractor, metric, ``evaluate`` or ``sample_metrics`` that raises is
recorded as an ``error`` event (with traceback) and the sweep goes on with the next metric/variant. Whatever
happens, the model leaves the sweep with its live weights (the bank's ``swap`` context restores
them) and with every submodule's ``training`` flag exactly as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from emascope import estimates as E
from emascope import metrics as M
from emascope import racing
from emascope import runformat as rf
from emascope import uncertainty as U
from emascope.batched import BatchedSamplingUnsupported, sample_stacked, stack_weights
from emascope.config import Hooks, ScoringConfig
from emascope.features import (
    Features,
    auto_extractor,
    cache_key,
    check_finite_features,
    check_samples,
    images_to_uint8,
    load_cached,
    make_extractor,
    open_extractor,
    reference_identity,
    reference_sample_info,
    reference_tensor,
    resolve_image_range,
    sample_kind,
    save_cached,
)
from emascope.rundir import RunWriter

Sampler = Callable[[nn.Module, int, torch.Generator], torch.Tensor]
Evaluate = Callable[[nn.Module], dict[str, float]]
SampleMetrics = Callable[[torch.Tensor], dict[str, float]]


@dataclass
class Reference:
    """Reference features plus what every variant reuses: Gaussian statistics and k-NN radii."""

    features: Features
    stats: dict[str, Any]
    radii: torch.Tensor
    nearest_k: int
    kid_plans: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)  # reference-side structures of the intervals

    @classmethod
    def build(cls, features: Features, nearest_k: int = 5) -> Reference:
        return cls(features, M.frechet_statistics(features.features),
                   M.knn_radii(features.features, nearest_k), nearest_k)

    def kid_plan(self, n_gen: int, cfg: ScoringConfig, device: torch.device | str | None) -> Any:
        """The reference side of KID for ``n_gen`` samples (built once, shared by every variant)."""
        key = (n_gen, cfg.kid_subset_size, cfg.kid_subsets, cfg.seed, str(device))
        if key not in self.kid_plans:
            self.kid_plans[key] = M.kid_plan(self.features.features, n_gen, subset_size=cfg.kid_subset_size,
                                             subsets=cfg.kid_subsets, seed=cfg.seed, device=device)
        return self.kid_plans[key]

    def prc_radii(self, k: int) -> torch.Tensor:
        """The reference's precision/recall ball radii for ``k`` neighbours (built once, shared)."""
        key = ("prc_radii", int(k))
        if key not in self.cache:
            self.cache[key] = M.knn_radii(self.features.features, int(k))
        return self.cache[key]


@dataclass
class SweepResult:
    """Scores of one sweep: ``scores[variant][metric] = value`` (None if not finite)."""

    step: int
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("sampling", "features", "metrics", "user_metrics", "sample_metrics", "uncertainty", "racing"), 0.0))
    errors: int = 0
    num_samples: int = 0             # most samples drawn for one variant in this sweep
    kid_subset_size: int | None = None
    sample_kind: str | None = None
    seconds: float = 0.0             # wall time of the sweep
    #: ``estimates[variant][metric]``: values with their uncertainty (emascope.estimates)
    estimates: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples_drawn: int = 0           # samples drawn over all variants (racing draws fewer)
    racing: dict[str, Any] | None = None   # the race's summary (emascope.racing.race_summary)
    batched: bool = False            # samples drawn for all variants at once (emascope.batched)
    batched_failed: bool = False     # batched sampling was tried and fell back to one variant at a time
    notes: list[str] = field(default_factory=list)  # conversions of the samples (check_samples)


@contextlib.contextmanager
def preserved_training_flags(model: nn.Module) -> Iterator[None]:
    """Record every submodule's ``training`` flag and restore each exactly on exit."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def restored_state(model: nn.Module) -> Iterator[nn.Module]:
    """Back up every tensor of ``model.state_dict()`` and copy it back on exit (bank-less sweeps)."""
    live = model.state_dict(keep_vars=True)
    backup = {k: t.detach().clone() for k, t in live.items() if torch.is_tensor(t)}
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, t in backup.items():
                live[k].copy_(t)


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (or buffer); CPU for a model without tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class StageError(Exception):
    """A sampler or feature-extractor failure inside :func:`draw_and_extract` (``where`` names it)."""

    def __init__(self, where: str, exc: BaseException) -> None:
        super().__init__(f"{where}: {type(exc).__name__}: {exc}")
        self.where, self.exc = where, exc


class Drawn(NamedTuple):
    """What :func:`draw_and_extract` returns for one variant."""

    head: torch.Tensor | None          # the first preview images / points (CPU)
    features: Features | None          # features of all drawn samples (None: no extractor / error)
    error: StageError | None           # a sampler or extractor failure
    num_drawn: int                     # samples drawn
    samples: torch.Tensor | None       # all samples (CPU), only with keep_all=True and no sampler error


def batch_seed(seed: int, batch: int) -> int:
    """The seed of sample batch ``batch`` (0, 1, ...) of a sweep seeded with ``seed``.

    Every variant draws batch ``b`` (samples ``[b * batch_size, (b + 1) * batch_size)``) from a fresh
    generator seeded with ``batch_seed(seed, b)``: common random numbers across variants, and any
    subset of batches (one rank's share, a racing round's extra batches) is drawn exactly as in a
    full sweep. The first 8 bytes of ``sha256(f"{seed}:{batch}")``, little-endian, top bit cleared.
    """
    digest = hashlib.sha256(f"{int(seed)}:{int(batch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    """Sizes of the sample batches of a sweep: ``batch_size`` each, the last one the remainder."""
    return [min(batch_size, num_samples - i) for i in range(0, num_samples, batch_size)]


class _Collector:
    """What :func:`draw_and_extract` keeps of one variant's sample batches: the preview head,
    the features (extracted batch by batch), and, with ``keep_all``, every sample."""

    def __init__(self, cfg: ScoringConfig, extractor: Callable[[torch.Tensor], Features] | None,
                 keep_all: bool) -> None:
        self.cfg, self.extractor, self.keep_all = cfg, extractor, keep_all
        self.keep = -1  # samples kept for the preview: decided from the first batch's kind
        self.head: list[torch.Tensor] = []
        self.everything: list[torch.Tensor] = []
        self.feats: list[Features] = []
        self.kept = self.drawn = 0
        self.error: StageError | None = None

    def add(self, out: torch.Tensor, timings: dict[str, float], start: int | None = None) -> None:
        """Take one batch (already checked and on the CPU). ``start``: the batch's first sample's
        index in the whole sweep (default: the batches so far, drawn in order); a rank drawing its
        share of the batches keeps the parts of its batches below the preview size."""
        pos = self.drawn if start is None else start
        self.drawn += len(out)
        if self.keep_all:
            self.everything.append(out)
        if self.keep < 0:
            try:
                self.keep = self.cfg.preview if sample_kind(out) == "images" else self.cfg.preview_points
            except ValueError:
                self.keep = 0  # a custom sample type: no preview
        if pos < self.keep:
            self.head.append(out[: self.keep - pos])
            self.kept += len(self.head[-1])
        if self.extractor is not None:
            t = time.perf_counter()
            try:
                self.feats.append(self.extractor(out))
            except Exception as exc:  # noqa: BLE001
                self.error, self.extractor, self.feats = StageError("features", exc), None, []
            finally:
                timings["features"] += time.perf_counter() - t

    @property
    def wants_more(self) -> bool:
        """False once nothing more would be kept: no features wanted, no keep_all, head full."""
        return self.extractor is not None or self.keep_all or self.kept < self.keep

    def wants_batch_at(self, start: int) -> bool:
        """Whether a batch whose first sample has index ``start`` in the sweep would be kept."""
        return self.extractor is not None or self.keep_all or start < self.keep

    def result(self) -> Drawn:
        features = None
        if self.feats:
            logits = [f.logits for f in self.feats]
            features = Features(torch.cat([f.features for f in self.feats]),
                                torch.cat(logits) if all(x is not None for x in logits) else None)  # type: ignore[arg-type]
        # the only place all samples are concatenated: only when a sample_metrics hook asked for them
        samples = torch.cat(self.everything) if self.keep_all else None
        return Drawn(torch.cat(self.head) if self.head else None, features, self.error, self.drawn, samples)


def _checked(out: Any, n: int, notes: list[str] | None = None) -> torch.Tensor:
    """One sampler batch as a CPU tensor of ``n`` samples; ``ValueError`` for anything else and for
    NaN/Inf samples (:func:`emascope.features.check_samples`), whose conversion notes go to ``notes``."""
    if not torch.is_tensor(out) or out.dim() < 1 or len(out) != n:
        raise ValueError(f"sampler must return a tensor with {n} samples on dim 0, got "
                         f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
    out = out.detach().cpu()
    note = check_samples(out)  # ValueError: NaN/Inf samples are not scored
    if note is not None and notes is not None and note not in notes:
        notes.append(note)
    return out


def draw_and_extract(model: nn.Module, sampler: Sampler, cfg: ScoringConfig,
                     extractor: Callable[[torch.Tensor], Features] | None,
                     timings: dict[str, float], *, keep_all: bool = False,
                     on_batch: Callable[[], None] | None = None,
                     notes: list[str] | None = None, batches: range | None = None,
                     share: Sequence[int] | None = None, calls: int | None = None) -> Drawn:
    """Draw ``cfg.num_samples`` samples in batches of ``cfg.batch_size``, batch ``b`` from a generator
    (on the model's device) seeded with :func:`batch_seed` ``(cfg.seed, b)``, and turn each batch into
    features as it arrives.

    Only the features and the first ``preview`` images or ``preview_points`` points (CPU) are
    kept, so a sweep over many large images never holds all samples in memory. ``keep_all=True``
    (a ``sample_metrics`` hook wants them) also keeps every batch and returns them concatenated as
    ``samples``: ``num_samples`` x one sample's size of host memory. A sampler error leaves
    ``head``, ``features`` and ``samples`` ``None``; an extractor error keeps the head (for the
    preview) and ``samples`` and stops extracting. Without an extractor and without ``keep_all``,
    drawing stops once the head is full (nothing else would use the samples).
    ``timings["sampling"|"features"]`` are increased; ``on_batch()`` is called after each batch.
    Samples holding NaN/Inf are a sampler error (:func:`emascope.features.check_samples`); what
    is converted (integer points) is added to ``notes``. ``batches``: draw only these batches (a
    range of batch indices, e.g. a racing round's; each drawn exactly as in a full sweep); the
    preview head then comes from the first batches drawn.

    ``share``: draw only these batch indices, in this (ascending) order: one rank's share of a
    sweep on every rank (each batch exactly as in the whole sweep; ``head`` then holds the rank's
    part of the preview, the samples of its batches below the preview size). ``calls``: make exactly
    this many sampler calls, the ones beyond ``share`` throwaway draws (a sharded model's sampler
    runs collectively: every rank must call it as often as the others).
    """
    device = model_device(model)
    col = _Collector(cfg, extractor, keep_all)
    sizes = batch_sizes(cfg.num_samples, cfg.batch_size)
    todo = range(len(sizes)) if batches is None else range(max(0, batches.start), min(len(sizes), batches.stop))
    order = list(todo) if share is None else list(share)
    for pos, b in enumerate(order):
        n = sizes[b]
        gen = torch.Generator(device=device).manual_seed(batch_seed(cfg.seed, b))
        t = time.perf_counter()
        try:
            out = _checked(sampler(model, n, gen), n, notes)
        except Exception as exc:  # noqa: BLE001
            return Drawn(None, None, StageError("sampler", exc), col.drawn, None)
        finally:
            timings["sampling"] += time.perf_counter() - t
        col.add(out, timings, start=None if share is None else b * cfg.batch_size)
        if on_batch is not None:
            on_batch()
        if calls is not None:
            continue  # a collective sampler: every call is made
        if share is None and not col.wants_more:
            break
        if share is not None and (pos + 1 == len(order) or not col.wants_batch_at(order[pos + 1] * cfg.batch_size)):
            break  # nothing more to keep: the preview head is full and no features are wanted
    for j in range(max(0, (calls or 0) - len(order))):  # throwaway draws: keep collective samplers in step
        gen = torch.Generator(device=device).manual_seed(batch_seed(cfg.seed, len(sizes) + j))
        t = time.perf_counter()
        try:
            sampler(model, sizes[-1], gen)
        except Exception as exc:  # noqa: BLE001
            col.error = col.error or StageError("sampler", exc)
        finally:
            timings["sampling"] += time.perf_counter() - t
    return col.result()


def merge_drawn(parts: list[Drawn], cfg: ScoringConfig) -> Drawn:
    """Consecutive batch ranges of one variant (racing rounds) as one :class:`Drawn`: heads, features
    and samples concatenated in batch order (the head cut at the preview size), the first error kept."""
    if len(parts) == 1:
        return parts[0]
    error = next((p.error for p in parts if p.error is not None), None)
    heads = [p.head for p in parts if p.head is not None]
    feats = [p.features for p in parts]
    features = None
    if feats and all(f is not None for f in feats):
        logits = [f.logits for f in feats]
        features = Features(torch.cat([f.features for f in feats]),
                            torch.cat(logits) if all(x is not None for x in logits) else None)  # type: ignore[arg-type]
    samples = [p.samples for p in parts]
    every = torch.cat(samples) if samples and all(x is not None for x in samples) else None
    head = None
    if heads:
        try:
            keep = cfg.preview if sample_kind(heads[0]) == "images" else cfg.preview_points
        except ValueError:
            keep = 0
        head = torch.cat(heads)[:keep]
    return Drawn(head, features, error, sum(p.num_drawn for p in parts), every)


def draw_variants_batched(model: nn.Module, bank: Any, variants: list[str], sampler: Sampler,
                          cfg: ScoringConfig, extractor: Callable[[torch.Tensor], Features] | None,
                          timings: dict[str, float], *, keep_all: bool = False,
                          on_batch: Callable[[], None] | None = None,
                          notes: list[str] | None = None) -> dict[str, Drawn]:
    """:func:`draw_and_extract` for every variant at once: each batch ``b`` is drawn for all
    variants in one vmapped sampler call (:mod:`emascope.batched`) from one generator seeded with
    ``batch_seed(cfg.seed, b)``, whose draws all variants share. Same samples, same features, same
    previews as drawing one variant at a time. Raises if the sampler cannot be batched (the caller
    falls back); extractor errors and refused samples (NaN/Inf) are kept per variant as in
    :func:`draw_and_extract`.
    """
    device = model_device(model)
    t = time.perf_counter()
    # frozen parameters (a LoRA base) once, unstacked; a one-process bank gives them without copies
    state_of = bank.materialize if bank.sharded else bank.variant_state
    weights, shared = stack_weights(model, [functools.partial(state_of, v) for v in variants], bank.frozen_keys())
    timings["sampling"] += time.perf_counter() - t
    cols = [_Collector(cfg, extractor, keep_all) for _ in variants]
    failed: dict[int, Drawn] = {}  # variants whose samples were refused, as draw_and_extract returns them
    for b, n in enumerate(batch_sizes(cfg.num_samples, cfg.batch_size)):
        gen = torch.Generator(device=device).manual_seed(batch_seed(cfg.seed, b))
        t = time.perf_counter()
        try:
            out = sample_stacked(model, weights, sampler, n, gen, shared)
            if out.dim() < 2 or out.shape[0] != len(variants):
                raise BatchedSamplingUnsupported(f"batched sampler output has shape {tuple(out.shape)}")
            outs: list[torch.Tensor | None] = []
            for i, o in enumerate(out.unbind(0)):
                if i in failed:
                    outs.append(None)
                    continue
                try:  # a variant's bad samples (NaN/Inf) fail that variant only, as one at a time
                    outs.append(_checked(o, n, notes))
                except ValueError as exc:
                    failed[i] = Drawn(None, None, StageError("sampler", exc), cols[i].drawn, None)
                    outs.append(None)
        finally:
            timings["sampling"] += time.perf_counter() - t
        for col, o in zip(cols, outs, strict=True):
            if o is not None:
                col.add(o, timings)
        if on_batch is not None:
            on_batch()
        if not any(c.wants_more for i, c in enumerate(cols) if i not in failed):
            break
    return {v: failed[i] if i in failed else c.result() for i, (v, c) in enumerate(zip(variants, cols, strict=True))}


def feature_metric_jobs(feats: Features, ref: Reference, cfg: ScoringConfig, fd_name: str,
                        kid_device: torch.device | str | None = None, cache: dict[str, Any] | None = None,
                        ) -> list[tuple[str, Callable[[], dict[str, float]]]]:
    """The metric groups to compute for one variant, as ``(name, thunk)`` pairs. KID runs with
    torch on ``kid_device`` (the feature device) and shares the reference side between variants.
    ``cache``: the variant's intervals cache (:func:`emascope.estimates.group_replicates`), given when
    the sweep computes intervals. KID then leaves its kernel values there for KID's interval, and when
    the cache holds the variant's k-NN structure (:func:`emascope.estimates.neighbour_structure`) the
    four k-NN metrics are read from it (:func:`emascope.uncertainty.prdc_values`, equal bit for bit)
    instead of computed again."""
    gen, real = feats.features, ref.features.features
    structure = None if cache is None else cache.get(E.STRUCTURE)
    prdc = U.prdc_values(structure) if structure is not None else None

    def fd() -> dict[str, float]:
        return {fd_name: M.frechet_distance_from_statistics(M.frechet_statistics(gen), ref.stats)}

    def kid() -> dict[str, float]:
        return M.kid(gen, real, plan=ref.kid_plan(len(gen), cfg, kid_device), keep=cache)

    jobs: list[tuple[str, Callable[[], dict[str, float]]]] = [
        (fd_name, fd),
        ("kid", kid),
        ("prc", (lambda: {k: prdc[k] for k in ("precision", "recall")}) if prdc is not None else
         (lambda: M.precision_recall(gen, real, neighborhood=cfg.prc_neighborhood,
                                     ref_radii=ref.prc_radii(cfg.prc_neighborhood)))),
        ("density_coverage", (lambda: {k: prdc[k] for k in ("density", "coverage")}) if prdc is not None else
         (lambda: M.density_coverage(gen, real, k=ref.nearest_k, ref_radii=ref.radii))),
    ]
    if feats.logits is not None:
        logits = feats.logits
        jobs.append(("isc", lambda: M.inception_score(logits, seed=cfg.seed)))
    return jobs


def run_sweep(*, model: nn.Module, bank: Any, variants: list[str], step: int, writer: RunWriter,
              cfg: ScoringConfig, sampler: Sampler | None = None,
              extractor: Callable[[torch.Tensor], Features] | None = None,
              reference: Reference | None = None, evaluate: Evaluate | None = None,
              sample_metrics: SampleMetrics | None = None, fd_name: str = "fid",
              directions: Mapping[str, str | None] | None = None,
              scorer: str = rf.SCORER_INLINE, batched: bool = False,
              kid_device: torch.device | str | None = None,
              on_progress: Callable[[], None] | None = None, prior_errors: int = 0) -> SweepResult:
    """Score every variant; write metrics/previews/events through ``writer``. Never raises.

    ``model`` is the unwrapped module the bank was built on. Generative metrics need
    ``sampler``, ``extractor`` and ``reference``; ``evaluate(model) -> {name: value}`` runs with
    each variant's weights loaded (eval mode, ``torch.no_grad``). ``sample_metrics(samples) ->
    {name: value}`` (needs ``sampler``) is called once per variant with all ``num_samples``
    samples the sampler drew for it, on CPU (the same samples the features and the preview come
    from); they are kept in memory for it (``num_samples`` x one sample's size).

    ``scorer`` names who runs the sweep in its events (:func:`emascope.runformat.scorer_name`).
    ``batched``: draw all variants in one vmapped sampler call per batch (:mod:`emascope.batched`);
    if that raises, a ``notice`` event says so, ``result.batched_failed`` is set and the variants
    are drawn one at a time. ``on_progress()`` is called after every sample batch, variant and
    metric group (a liveness signal for watchdogs). ``prior_errors``: failures of this sweep that
    happened before it (building the reference), counted in ``errors``.

    With ``cfg.uncertainty`` every value gets its half-sample standard error and interval
    (:mod:`emascope.estimates`) and, once all variants are scored, a ``comparison`` event holds each
    ranked metric's best variant and every variant's paired difference to it (``directions``:
    metric name -> ``"lower"``/``"higher"``). With ``cfg.racing`` the samples are drawn in rounds and
    the variants significantly worse on the racing metric stop drawing (:mod:`emascope.racing`;
    a racing sweep draws one variant at a time, not batched).
    """
    res = SweepResult(step=step, errors=int(prior_errors))  # e.g. the reference failed just before
    tick = on_progress or (lambda: None)
    t_start = time.perf_counter()
    halves = E.Halves(cfg) if cfg.uncertainty else None
    directions = {**M.METRIC_DIRECTIONS, **(directions or {})}
    writer.event("score_start", step, variants=list(variants), scorer=scorer)
    drawn: dict[str, Drawn] = {}
    race: racing.RaceResult | None = None
    if cfg.racing and sampler is not None and reference is not None and extractor is not None and len(variants) > 2:
        try:
            race, drawn = _race(model, bank, variants, res, writer, cfg, sampler, extractor, reference,
                                sample_metrics, fd_name, directions, halves, tick)
        except Exception as exc:  # noqa: BLE001 - fall back to a full sweep
            res.errors += 1
            writer.error("racing", step, exc)
            race, drawn = None, {}
    elif batched and sampler is not None and bank is not None and len(variants) > 1:
        try:
            with preserved_training_flags(model), torch.no_grad():
                model.eval()
                drawn = draw_variants_batched(model, bank, list(variants), sampler, cfg,
                                              extractor if reference is not None else None, res.timings,
                                              keep_all=sample_metrics is not None, on_batch=tick,
                                              notes=res.notes)
            res.batched = True
        except Exception as exc:  # noqa: BLE001 - fall back to one variant at a time
            drawn, res.batched_failed = {}, True
            writer.event("notice", step, where="batched_sampling", scorer=scorer,
                         message=f"batched sampling failed, drawing one variant at a time: "
                                 f"{type(exc).__name__}: {exc}")
    for i, variant in enumerate(variants):
        res.scores[variant] = {}
        try:
            _score_variant(model, bank, variant, res, writer, cfg, sampler, extractor, reference,
                           evaluate, sample_metrics, fd_name, drawn.pop(variant, None), kid_device, tick, halves)
        except Exception as exc:  # noqa: BLE001 - e.g. swap itself failed
            res.errors += 1
            writer.error("swap", step, exc, variant=variant)
        tick()
        writer.event("score_progress", step, scorer=scorer, variant=variant, done=i + 1, total=len(variants))
    if halves is not None:
        t = time.perf_counter()
        try:
            compared = E.comparison_metrics(res.estimates, directions, cfg.confidence_level)
            if race is not None:
                _keep_race_decisions(compared, race, res.racing["metric"] if res.racing else None)
            if compared:
                writer.event(rf.EVENT_COMPARISON, step, level=cfg.confidence_level, method="half_sample",
                             replicates=cfg.bootstrap_replicates, metrics=compared, scorer=scorer)
        except Exception as exc:  # noqa: BLE001
            res.errors += 1
            writer.error("uncertainty", step, exc)
        res.timings["uncertainty"] += time.perf_counter() - t
    full = cfg.num_samples * len(variants) if sampler is not None and res.samples_drawn else 0
    extra = {"racing": res.racing} if res.racing else {}
    res.seconds = time.perf_counter() - t_start
    writer.event("score_done", step, seconds=res.seconds, timings=dict(res.timings),
                 num_samples=res.num_samples, errors=res.errors, samples_drawn=res.samples_drawn,
                 samples_full=full, scorer=scorer, **extra)
    return res


def _race(model: nn.Module, bank: Any, variants: list[str], res: SweepResult, writer: RunWriter,
          cfg: ScoringConfig, sampler: Sampler, extractor: Callable[[torch.Tensor], Features],
          reference: Reference, sample_metrics: SampleMetrics | None, fd_name: str,
          directions: Mapping[str, str | None], halves: E.Halves | None,
          tick: Callable[[], None] = lambda: None) -> tuple[racing.RaceResult | None, dict[str, Drawn]]:
    """Draw the samples in racing rounds (:mod:`emascope.racing`); returns the race and each variant's
    samples (merged over its rounds) for :func:`_score_variant`. ``(None, {})`` when the racing metric
    has no direction or cannot be computed from features or ``sample_metrics`` (a ``notice`` says so)."""
    metric = cfg.racing_metric or fd_name
    group = racing_group(metric, fd_name)
    direction = directions.get(metric)
    if direction not in rf.DIRECTIONS or (group is None and sample_metrics is None):
        writer.event("notice", res.step, where="racing", message=f"racing metric {metric!r} has no known "
                     "direction or is not computed from the samples: full sweep")
        return None, {}
    halves = halves or E.Halves(cfg)
    parts: dict[str, list[Drawn]] = {v: [] for v in variants}
    have: dict[str, int] = dict.fromkeys(variants, 0)
    keep_all = sample_metrics is not None

    def score_round(alive: list[str], upto: int) -> dict[str, Any]:
        out = {}
        for v in alive:
            with preserved_training_flags(model), bank.swap(model, v), torch.no_grad():
                model.eval()
                part = draw_and_extract(model, sampler, cfg, extractor, res.timings, keep_all=keep_all,
                                        batches=range(have[v], upto), notes=res.notes, on_batch=tick)
            have[v] = upto
            parts[v].append(part)
            if part.error is not None:
                continue
            got = merge_drawn(parts[v], cfg)
            t = time.perf_counter()
            try:
                if group is not None:
                    values = dict(feature_metric_jobs(got.features, reference, cfg, fd_name))[group]()
                    est = E.group_estimates(group, values, got.features, reference, cfg, halves, {})
                else:
                    est = E.user_estimates(sample_metrics(got.samples), n=len(got.samples), halves=halves,
                                           hook=sample_metrics, samples=got.samples, max_calls=cfg.bootstrap_calls)
            finally:
                res.timings["racing"] += time.perf_counter() - t
            if metric in est and np.isfinite(est[metric].value):
                out[v] = est[metric]
        return out

    rounds = racing.schedule(len(batch_sizes(cfg.num_samples, cfg.batch_size)), cfg.racing_first)
    result = racing.race(variants, rounds, score_round, direction, cfg.confidence_level)
    res.racing = racing.race_summary(result, metric, cfg.batch_size, cfg.num_samples)
    return result, {v: merge_drawn(p, cfg) for v, p in parts.items() if p}


def racing_group(metric: str, fd_name: str) -> str | None:
    """The metric group of :func:`feature_metric_jobs` that computes ``metric`` (``None``: not a
    feature metric, e.g. a ``sample_metrics`` one)."""
    return {fd_name: fd_name, "fid": fd_name, "fd": fd_name, "kid_mean": "kid", "precision": "prc",
            "recall": "prc", "density": "density_coverage", "coverage": "density_coverage",
            "isc_mean": "isc"}.get(metric)


def _keep_race_decisions(compared: dict[str, Any], race: racing.RaceResult, metric: str | None) -> None:
    """In the final comparison of the racing metric, a dropped variant keeps the paired comparison of
    the round that dropped it (it has fewer samples than the survivors, so no paired one now)."""
    entry = compared.get(metric or "")
    if entry is None:
        return
    for v, (_, c) in race.dropped().items():
        entry["variants"][v] = rf.comparison_entry(diff=c.diff, se=c.se, lo=c.lo, hi=c.hi, n=c.n,
                                                   worse=c.worse, paired=c.paired)




def _score_variant(model: nn.Module, bank: Any, variant: str, res: SweepResult, writer: RunWriter,
                   cfg: ScoringConfig, sampler: Sampler | None,
                   extractor: Callable[[torch.Tensor], Features] | None, reference: Reference | None,
                   evaluate: Evaluate | None, sample_metrics: SampleMetrics | None, fd_name: str,
                   drawn: Drawn | None = None, kid_device: torch.device | str | None = None,
                   tick: Callable[[], None] = lambda: None, halves: E.Halves | None = None) -> None:
    step = res.step
    samples: torch.Tensor | None = None
    every: torch.Tensor | None = None
    feats: Features | None = None
    user: dict[str, Any] = {}
    if (sampler is not None and drawn is None) or evaluate is not None:
        # "raw" goes through swap too: its backup/restore undoes a sampler or evaluate that writes to
        # the weights in place (the live weights leave the sweep bit-identical whatever happens)
        swap = bank.swap(model, variant) if bank is not None else restored_state(model)
    else:
        swap = contextlib.nullcontext(model)  # samples drawn already (batched, racing) and no evaluate
    with preserved_training_flags(model), swap, torch.no_grad():
        model.eval()
        if sampler is not None:
            if drawn is None:
                drawn = draw_and_extract(model, sampler, cfg, extractor if reference is not None else None,
                                         res.timings, keep_all=sample_metrics is not None, on_batch=tick,
                                         notes=res.notes)
            samples, feats, err, n_drawn, every = drawn
            res.num_samples = max(res.num_samples, n_drawn)
            res.samples_drawn += n_drawn
            if err is not None:
                res.errors += 1
                writer.error(err.where, step, err.exc, variant=variant)
        if evaluate is not None:
            user.update(_user_hook("evaluate", evaluate, model, res, writer, variant, "user_metrics"))
    drawn = None
    finish_variant(res, writer, variant, cfg, reference, fd_name, samples, feats, every, user, sample_metrics,
                   kid_device, tick, halves, evaluate is not None)


def finish_variant(res: SweepResult, writer: RunWriter, variant: str, cfg: ScoringConfig,
                   reference: Reference | None, fd_name: str, samples: torch.Tensor | None,
                   feats: Features | None, every: torch.Tensor | None, user: dict[str, Any],
                   sample_metrics: SampleMetrics | None, kid_device: torch.device | str | None = None,
                   tick: Callable[[], None] = lambda: None, halves: E.Halves | None = None,
                   evaluated: bool = False) -> None:
    """After a variant was drawn: ``sample_metrics`` over all its samples, the user metrics, the
    preview and the feature metrics with their intervals, recorded through ``writer`` (the writing
    rank's half of a variant's scoring: a sweep on every rank gathers the samples' features here
    first). ``evaluated``: ``user`` holds an ``evaluate`` hook's values."""
    step = res.step
    estimates: dict[str, Any] = res.estimates.setdefault(variant, {})
    if evaluated or sample_metrics is not None:
        estimates.update(E.user_estimates({k: v for k, v in user.items()}))
    if every is not None and sample_metrics is not None:
        with torch.no_grad():
            out = _user_hook("sample_metrics", sample_metrics, every, res, writer, variant, "sample_metrics")
            t = time.perf_counter()
            estimates.update(E.user_estimates(
                out, n=len(every), halves=halves, hook=sample_metrics, samples=every, max_calls=cfg.bootstrap_calls,
                on_error=lambda exc: _uncertainty_error(res, writer, variant, "sample_metrics", exc)))
            res.timings["uncertainty"] += time.perf_counter() - t
        user.update(out)
        del every  # free the variant's samples before the next one is drawn

    for name in user:
        _record(res, writer, variant, str(name), estimates.get(str(name)), cfg.confidence_level)
    if samples is not None:
        _save_preview(writer, step, variant, samples, cfg, res)
    if feats is None or reference is None:
        return
    try:
        check_finite_features(feats)
        d, d_ref = feats.features.shape[-1], reference.features.features.shape[-1]
        if d != d_ref:
            shape = "" if samples is None else f" (samples of shape {tuple(samples.shape[1:])})"
            raise ValueError(f"the samples give {d}-dimensional features{shape} but the reference gives {d_ref}: "
                             "the sampler's output does not match the reference data")
    except ValueError as exc:  # one error for the variant, no metric values
        res.errors += 1
        writer.error("features", step, exc, variant=variant)
        return
    cache: dict[str, Any] = {}
    metric_s, interval_s, exc = _knn_structure(feats, reference, cfg, halves, cache)
    res.timings["metrics"] += metric_s
    res.timings["uncertainty"] += interval_s
    if exc is not None:  # the k-NN metrics are then computed on their own
        _uncertainty_error(res, writer, variant, "prc", exc)
    for group, job in feature_metric_jobs(feats, reference, cfg, fd_name, kid_device,
                                          cache if halves is not None else None):
        t = time.perf_counter()
        try:
            values = job()
        except Exception as exc:  # noqa: BLE001
            res.errors += 1
            writer.error(f"metric:{group}", step, exc, variant=variant)
            continue
        finally:
            res.timings["metrics"] += time.perf_counter() - t
            tick()
        if group == "kid":
            res.kid_subset_size = int(values.pop("kid_subset_size"))
        t = time.perf_counter()
        try:
            group_est = E.group_estimates(group, values, feats, reference, cfg, halves, cache)
        except Exception as exc:  # noqa: BLE001 - the values stay, without intervals
            _uncertainty_error(res, writer, variant, group, exc)
            group_est = E.group_estimates(group, values, feats, reference, cfg, None, cache)
        res.timings["uncertainty"] += time.perf_counter() - t
        estimates.update(group_est)
        for name in values:
            _record(res, writer, variant, name, group_est.get(name), cfg.confidence_level, values[name])


def _knn_structure(feats: Features, reference: Reference, cfg: ScoringConfig, halves: E.Halves | None,
                   cache: dict[str, Any]) -> tuple[float, float, BaseException | None]:
    """With intervals on, build the variant's k-NN structure into ``cache`` (the k-NN metrics' values
    are then read from it). Returns ``(metric seconds, interval seconds, error)``: the structure's
    lists and ball memberships are the metrics' own work, its replicate radii the intervals'."""
    n = len(feats.features)
    if halves is None or n < E.MIN_SAMPLES:
        return 0.0, 0.0, None
    t = time.perf_counter()
    try:
        cache[E.STRUCTURE] = E.neighbour_structure(feats, reference, cfg, halves(n))
    except Exception as exc:  # noqa: BLE001 - reported by the caller
        return 0.0, time.perf_counter() - t, exc
    built, only_intervals = time.perf_counter() - t, cache[E.STRUCTURE].replicate_seconds
    return built - only_intervals, only_intervals, None


def _uncertainty_error(res: SweepResult, writer: RunWriter, variant: str, group: str, exc: BaseException) -> None:
    res.errors += 1
    writer.error(f"uncertainty:{group}", res.step, exc, variant=variant)




def _user_hook(where: str, hook: Callable[[Any], Any], arg: Any, res: SweepResult, writer: RunWriter,
               variant: str, timing: str) -> dict[str, Any]:
    """Call ``evaluate(model)`` or ``sample_metrics(samples)``; a raise or a non-dict result is an
    ``error`` event named ``where`` and gives ``{}``; values that are not numbers (nor the other
    conventions of :mod:`emascope.estimates`) are one ``error`` event naming them, and are kept
    (written as null). Time goes to ``res.timings[timing]``."""
    t = time.perf_counter()
    try:
        out = hook(arg)
        if not isinstance(out, dict):
            raise ValueError(f"{where} must return dict[str, float], got {type(out).__name__}")
    except Exception as exc:  # noqa: BLE001
        res.errors += 1
        writer.error(where, res.step, exc, variant=variant)
        return {}
    else:
        bad = E.unusable_values(out, len(arg) if where == "sample_metrics" else None)
        if bad:  # recorded as null, said once per variant
            res.errors += 1
            writer.error(where, res.step, ValueError(
                f"{where} returned values that are not numbers, written as null: {', '.join(bad)}; a value must be "
                "a number, a (value, standard_error) pair or, from sample_metrics, one number per sample"),
                variant=variant)
        return dict(out)
    finally:
        res.timings[timing] += time.perf_counter() - t


def _record(res: SweepResult, writer: RunWriter, variant: str, name: str, est: Any, level: float,
            value: Any = None) -> None:
    """Record one value (``est.value``, else ``value``) with the interval fields of ``est``."""
    v = M.finite_or_none(est.value if est is not None else value)
    res.scores[variant][name] = v
    fields = E.interval_fields(est, level, name) if est is not None and v is not None else (
        {"n": est.n} if est is not None and est.n is not None else {})
    writer.metric(res.step, variant, name, v, **fields)


def _save_preview(writer: RunWriter, step: int, variant: str, samples: torch.Tensor, cfg: ScoringConfig,
                  res: SweepResult) -> None:
    try:
        kind = sample_kind(samples)
    except ValueError:
        return  # custom sample types: scored by a custom extractor, no preview
    res.sample_kind = kind
    if kind == "points" and cfg.preview_points > 0:
        writer.save_points(rf.preview_file(step, variant, ".npy"), samples[: cfg.preview_points].float().numpy())
    elif kind == "images" and cfg.preview > 0:
        try:
            grid = images_to_uint8(samples[: cfg.preview], resolve_image_range(cfg.image_range, None)).numpy()
        except ValueError:
            return
        if samples.shape[1] == 1:
            grid = grid[:, :1]
        writer.save_image_grid(rf.preview_file(step, variant, ".png"), grid)


class Scorer:
    """The scoring side of a run: the reference (built once, cached on disk), the extractor, the
    metrics' directions and the sample kind, and :meth:`sweep`, which scores every variant.

    ``on_info_change()`` is called when something run.json shows changed (a metric seen for the
    first time, the sample kind). ``known_directions``: directions of metrics already written by
    the run being resumed. Nothing here raises into training: failures become ``error`` events.
    """

    def __init__(self, cfg: ScoringConfig, hooks: Hooks, writer: RunWriter, run_dir: Path, *,
                 on_info_change: Callable[[], None] = lambda: None,
                 known_directions: dict[str, str] | None = None, extractor: Any = None) -> None:
        self.cfg, self.hooks, self.writer, self.run_dir = cfg, hooks, writer, Path(run_dir)
        self.on_info_change = on_info_change
        self.user_directions = dict(hooks.metric_directions)
        self.metric_directions: dict[str, str | None] = {
            k: self.user_directions.get(k, v) for k, v in (known_directions or {}).items()}
        self.sample_kind: str | None = reference_kind(hooks.reference)
        self.reference: Reference | None = None
        self.extractor: Any = extractor  # built at attach (attach_extractor), else at the first sweep
        self._reference_failed = False
        self.reference_errors = 0  # counted into the errors of the sweep that hit them
        self._pending: _PendingReference | None = None
        self._kid_noted = False
        self._batched_ok = True
        self._lock = threading.Lock()
        self._floor_done = False
        self._floor_rows: torch.Tensor | None = None  # reference samples of the floor's split (sample_metrics)
        self._noted: set[str] = set()

    @property
    def active(self) -> bool:
        """Whether a sweep has anything to do (a sampler or an ``evaluate`` hook)."""
        return self.hooks.sampler is not None or self.hooks.evaluate is not None

    def extractor_label(self) -> str:
        """The extractor's name for run.json (``"auto"`` resolved from the reference's kind and size)."""
        if self.cfg.feature_extractor in (None, "auto"):
            if self.extractor is not None:
                return str(self.extractor.name)
            kind, size = reference_sample_info(self.hooks.reference) if self.hooks.reference is not None \
                else (None, None)
            return auto_extractor(kind, size) if kind is not None else "auto"
        return self.cfg.extractor_label()

    def fd_name(self) -> str:
        """``"fid"`` on Inception features (a torch-fidelity Inception extractor), ``"fd"`` on any other."""
        spec = self.cfg.feature_extractor
        if callable(spec) and not isinstance(spec, str):
            return "fd"
        return "fid" if self.extractor_label().startswith("inception") else "fd"

    def prepare(self, model: nn.Module, step: int) -> None:
        """The part of the reference set-up that may draw from the global random generators: build
        the feature extractor (module initialisation) and read the reference data (a dataset's
        transforms) when the feature cache misses. An inline sweep does it inside its forked
        generators; a background sweep's caller runs it in the training thread, under
        ``torch.random.fork_rng``, so the worker thread never touches the training job's random
        stream. Idempotent; failures are an ``error`` event (``where: "reference"``)."""
        if (self.hooks.sampler is None or self.hooks.reference is None or self.reference is not None
                or self._reference_failed or self._pending is not None):
            return
        try:
            self._pending = self._start_reference(model)
        except Exception as exc:  # noqa: BLE001
            self._reference_failed = True
            self.reference_errors += 1
            self.writer.error("reference", step, exc)

    def sweep(self, model: nn.Module, bank: Any, variants: list[str], step: int, *,
              writer: Any = None, scorer: str = rf.SCORER_INLINE, isolate_rng: bool = True,
              on_progress: Callable[[], None] | None = None,
              synthesized: dict[str, Any] | None = None) -> SweepResult:
        """Score ``variants`` at ``step`` (see :func:`run_sweep`).

        ``isolate_rng=True`` (inline): the global random streams are forked and restored, so the
        training job's stream is the same with and without the sweep. A sweep on another thread
        must not fork them (that would rewind the training thread's draws): it passes ``False``
        after :meth:`prepare` ran in the training thread. ``writer``: where this sweep writes
        (default the run's writer; background and external sweeps pass a
        :class:`emascope.rundir.StageWriter`). ``scorer``: named in the sweep's events.
        ``synthesized``: the variants are decays synthesised post hoc (``bank`` swaps their state
        dicts in); every metrics record gets this ``synthesized`` object (docs/synthesis.md).
        """
        writer = writer if writer is not None else self.writer
        if synthesized is not None:
            writer = _MarkedWriter(writer, synthesized)
        rng = torch.random.fork_rng(devices=cuda_devices(model)) if isolate_rng else contextlib.nullcontext()
        with rng:
            reference = self._prepare_reference(model, step, writer) if self.hooks.sampler is not None else None
            with self._lock:
                floor_due = reference is not None and self.cfg.noise_floor and not self._floor_done
                self._floor_done = self._floor_done or floor_due
            if floor_due:
                self.noise_floor(reference, step, writer)
            result = run_sweep(model=model, bank=bank, variants=variants, step=step, writer=writer,
                               cfg=self.cfg, sampler=self.hooks.sampler, extractor=self.extractor,
                               reference=reference, evaluate=self.hooks.evaluate,
                               sample_metrics=self.hooks.sample_metrics, fd_name=self.fd_name(),
                               directions=self.directions(), scorer=scorer,
                               batched=self.cfg.batched_sampling and self._batched_ok,
                               kid_device=self.feature_device(model), on_progress=on_progress,
                               prior_errors=self.reference_errors)
        self.reference_errors = 0
        if result.batched_failed:
            self._batched_ok = False  # recorded once: later sweeps draw one variant at a time
        self._note(result, reference, step, writer)
        return result

    def reference_for(self, model: nn.Module, step: int) -> Reference | None:
        """The reference (built, cached on disk, at the first call; ``None`` without a sampler or
        after it failed); builds :attr:`extractor` too. For sweeps on every rank of a sharded bank
        (:mod:`emascope.sweep_ranks`), called by rank 0 in the training thread."""
        return self._prepare_reference(model, step, self.writer) if self.hooks.sampler is not None else None

    def note(self, result: SweepResult, reference: Reference | None, step: int) -> None:
        """After a sweep run elsewhere (every rank): the KID subset notice, new metrics' directions,
        the sample kind, the samples' conversion notes."""
        self._note(result, reference, step, self.writer)

    def directions(self) -> dict[str, str | None]:
        """Direction of every metric known now: built-in ones, the run's, the user's."""
        return {**M.METRIC_DIRECTIONS, **self.metric_directions, **self.user_directions}

    def noise_floor(self, reference: Reference, step: int, writer: Any = None) -> dict[str, Any] | None:
        """Score what a perfect model would get at this sample size and write a ``noise_floor`` event:
        the ``exact_samples`` hook against the reference, else a disjoint split of the reference
        (``min(num_samples, m // 2)`` of its ``m`` items, chosen with ``seed``, scored against the
        rest). Every feature metric and ``sample_metrics`` (on the exact samples, or on the split's
        reference items when the reference was given as data) are scored with their intervals.
        Returns the event's ``metrics`` (``None`` on failure: an ``error`` event ``where: "noise_floor"``).
        ``writer``: where the event goes (default the run's writer)."""
        cfg, t = self.cfg, time.perf_counter()
        writer = writer if writer is not None else self.writer
        try:
            exact = self.hooks.exact_samples
            if exact is not None:
                samples = torch.as_tensor(exact)[: cfg.num_samples].detach().cpu()
                feats, ref, source = self.extractor(samples), reference, "exact"
            else:
                real = reference.features
                m = len(real.features)
                n_a = min(cfg.num_samples, m // 2)
                if m - n_a <= reference.nearest_k:
                    writer.event("notice", step, where="noise_floor", message=(
                        f"no noise floor: a reference of {m} items is too small to split into {n_a} samples "
                        f"and a k-NN reference of more than nearest_k={reference.nearest_k} items; give "
                        "exact_samples or a larger reference"))
                    self._floor_done = True
                    return None
                perm = torch.randperm(m, generator=torch.Generator().manual_seed(cfg.seed))
                a, b = perm[:n_a], perm[n_a:]
                logits = real.logits
                feats = Features(real.features[a], None if logits is None else logits[a])
                ref = Reference.build(Features(real.features[b], None if logits is None else logits[b]),
                                      reference.nearest_k)
                samples, source = self._floor_rows, "reference_split"
            halves = E.Halves(cfg) if cfg.uncertainty else None
            estimates: dict[str, Any] = {}
            cache: dict[str, Any] = {}
            _knn_structure(feats, ref, cfg, halves, cache)  # on failure the metrics are computed on their own
            for group, job in feature_metric_jobs(feats, ref, cfg, self.fd_name(),
                                                  cache=cache if halves is not None else None):
                try:
                    values = job()
                except Exception:  # noqa: BLE001 - no floor for it; the variants' own errors say why
                    continue
                values.pop("kid_subset_size", None)
                estimates.update(E.group_estimates(group, values, feats, ref, cfg, halves, cache))
            hook = self.hooks.sample_metrics
            if hook is not None and samples is not None and len(samples) == len(feats.features):
                with torch.no_grad():
                    estimates.update(E.user_estimates(hook(samples), n=len(samples), halves=halves, hook=hook,
                                                      samples=samples, max_calls=cfg.bootstrap_calls))
            fields = E.floor_fields(estimates, cfg.confidence_level)
        except Exception as exc:  # noqa: BLE001
            writer.error("noise_floor", step, exc)
            return None
        writer.event(rf.EVENT_NOISE_FLOOR, step, source=source, n=len(feats.features),
                     n_reference=len(ref.features.features), level=cfg.confidence_level,
                     seconds=time.perf_counter() - t, metrics=fields)
        return fields

    def feature_device(self, model: nn.Module) -> torch.device:
        """Where features (and KID) are computed: ``feature_device``, else the model's device."""
        return torch.device(self.cfg.feature_device) if self.cfg.feature_device else model_device(model)

    def _note(self, result: SweepResult, reference: Reference | None, step: int, writer: Any) -> None:
        changed = False
        for note in result.notes:
            self._notice_once("samples", note, step, writer)
        with self._lock:
            if result.kid_subset_size is not None and not self._kid_noted:
                self._kid_noted = True
                n_ref = len(reference.features.features) if reference is not None else None
                writer.event("notice", step, where="metric:kid", kid_subset_size=result.kid_subset_size,
                             message=f"KID subset size {result.kid_subset_size} "
                                     f"(num_samples={self.cfg.num_samples}, num_reference={n_ref})")
            if result.sample_kind and result.sample_kind != self.sample_kind:
                self.sample_kind, changed = result.sample_kind, True
            seen = {m for scores in result.scores.values() for m in scores}
            for m in sorted(seen - set(self.metric_directions)):
                direction = self.user_directions.get(m, M.METRIC_DIRECTIONS.get(m))
                if direction is None:
                    writer.event("notice", step, where="evaluate", message=f"metric {m!r} has no declared "
                                 "direction (pass metric_directions={...}); it is shown but never ranked")
                self.metric_directions[m] = direction
                changed = True
        if changed:
            self.on_info_change()

    def _notice_once(self, where: str, message: str, step: int, writer: Any) -> None:
        """A ``notice`` event, once per message for the life of this scorer."""
        with self._lock:
            if message in self._noted:
                return
            self._noted.add(message)
        writer.event("notice", step, where=where, message=message)

    def _prepare_reference(self, model: nn.Module, step: int, writer: Any) -> Reference | None:
        self.prepare(model, step)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                self.reference = self._finish_reference(pending, step, writer)
            except Exception as exc:  # noqa: BLE001
                self._reference_failed = True
                self.reference_errors += 1
                writer.error("reference", step, exc)
        return self.reference

    def _start_reference(self, model: nn.Module) -> _PendingReference:
        """Build the extractor; read the cached reference features, or the reference data to extract."""
        ref, cfg = self.hooks.reference, self.cfg
        device = self.feature_device(model)
        if isinstance(ref, Features):
            if self.extractor is None:
                self.extractor = make_extractor(cfg.feature_extractor, self.sample_kind or "points",
                                                weights_path=cfg.feature_extractor_weights_path, device=device,
                                                batch_size=cfg.feature_batch_size,
                                                image_range=resolve_image_range(cfg.image_range, None))
            check_finite_features(ref, "reference features")
            return _PendingReference(features=ref)
        data = reference_tensor(ref, cfg.reference_size)
        note = check_samples(data, "reference samples")  # ValueError: NaN/Inf in the reference
        kind = sample_kind(data) if torch.is_tensor(data) else None
        image_range = resolve_image_range(cfg.image_range, data if kind == "images" else None)
        self.cfg = cfg = dataclasses.replace(cfg, image_range=image_range)
        if self.extractor is None:
            self.extractor = make_extractor(cfg.feature_extractor, kind or "points",
                                            weights_path=cfg.feature_extractor_weights_path, device=device,
                                            batch_size=cfg.feature_batch_size, image_range=image_range,
                                            image_size=tuple(data.shape[-2:]) if kind == "images" else None)
        elif hasattr(self.extractor, "image_range"):
            self.extractor.image_range = image_range
        key = cache_key(self.extractor.name, self.extractor.weights_hash,
                        reference_identity(ref, cfg.reference_size))
        return _PendingReference(features=load_cached(self.run_dir / rf.reference_cache_file(key)), data=data,
                                 key=key, kind=kind, note=note)

    def _finish_reference(self, p: _PendingReference, step: int, writer: Any) -> Reference:
        """Extract the reference features on a cache miss (deterministic compute), cache them, build."""
        if p.key is None:  # precomputed features handed to attach
            return Reference.build(p.features, self.cfg.nearest_k)
        feats, hit = p.features, p.features is not None
        t = time.perf_counter()
        if feats is None:
            feats = self.extractor(p.data)
            check_finite_features(feats, "reference features")  # NaN/Inf features are never cached
            cache = self.run_dir / rf.reference_cache_file(p.key)
            writer._guard("reference cache", lambda: save_cached(cache, feats))
        else:
            check_finite_features(feats, "reference features")
        if self.hooks.sample_metrics is not None and self.hooks.exact_samples is None and torch.is_tensor(p.data):
            # the reference items of the noise floor's split, for sample_metrics (same rule as noise_floor)
            m = len(feats.features)
            perm = torch.randperm(m, generator=torch.Generator().manual_seed(self.cfg.seed))
            self._floor_rows = p.data[perm[: min(self.cfg.num_samples, m // 2)]].clone()
        if p.note is not None:
            self._notice_once("reference", p.note, step, writer)
        writer.event("reference", step, key=p.key, cached=hit, num=len(feats.features),
                     seconds=time.perf_counter() - t)
        if p.kind == "points" and not (self.run_dir / rf.REFERENCE_POINTS).exists():
            writer.save_points(rf.REFERENCE_POINTS, p.data[: self.cfg.preview_points].float().numpy())
        return Reference.build(feats, self.cfg.nearest_k)


@dataclass
class _PendingReference:
    """The reference between :meth:`Scorer.prepare` and the features: cached features, or the data."""

    features: Features | None
    data: Any = None
    key: str | None = None
    kind: str | None = None
    note: str | None = None  # what check_samples converted in the reference data


class _MarkedWriter:
    """A :class:`RunWriter` whose metric records carry a ``synthesized`` object; all else delegated."""

    def __init__(self, writer: RunWriter, synthesized: dict[str, Any]) -> None:
        self._writer, self._synthesized = writer, synthesized

    def metric(self, step: int, variant: str, metric: str, value: float | None, **interval: Any) -> None:
        self._writer.metric(step, variant, metric, value, synthesized=self._synthesized, **interval)

    def event(self, type: str, step: int, **fields: Any) -> None:
        if type == rf.EVENT_COMPARISON:
            return  # a comparison among the synthesised variants alone would replace the grid's at this step
        if type in ("score_start", "score_progress", "score_done"):  # not a sweep of the bank: marked apart
            fields["synthesized"] = True
        self._writer.event(type, step, **fields)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


def attach_extractor(cfg: ScoringConfig, hooks: Hooks, model: nn.Module) -> Any:
    """The feature extractor, built at attach so that a missing weights file or a failed download is
    a ``ValueError`` there (naming the file and the offline options), not a silent gap in the metrics.

    ``None`` when there is nothing to extract (no sampler or no reference). The image range is set
    from the reference at the first sweep."""
    ref = hooks.reference
    if ref is None or hooks.sampler is None:
        return None
    kind, size = (None, None) if isinstance(ref, Features) else reference_sample_info(ref)
    device = cfg.feature_device if cfg.feature_device is not None else model_device(model)
    return open_extractor(cfg.feature_extractor, kind or "points", weights_path=cfg.feature_extractor_weights_path,
                          device=device, batch_size=cfg.feature_batch_size,
                          image_range=resolve_image_range(cfg.image_range, None), image_size=size)


def reference_kind(reference: Any) -> str | None:
    """``"points"``/``"images"`` of a reference given as data (``None`` for features or unknown)."""
    try:
        if isinstance(reference, torch.Tensor) or hasattr(reference, "shape"):
            return sample_kind(torch.as_tensor(reference[:1]))
        if reference is not None and not isinstance(reference, Features):
            return sample_kind(reference_tensor(reference, 1))
    except (ValueError, TypeError):
        return None
    return None


def cuda_devices(model: nn.Module) -> list[int]:
    """CUDA device indices the model lives on (for ``torch.random.fork_rng``)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
