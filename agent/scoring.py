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
import hashlib
import time
from collections.abc import Callable, Iterator, Mapping
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
    """Reference features plus what every variant reuses: Gaussian statistics and k-NN radii
    (``cache``: what :mod:`emascope.estimates` derives from them once, e.g. the k-NN radii of
    precision/recall and KID's reference term)."""

    features: Features
    stats: dict[str, Any]
    radii: torch.Tensor
    nearest_k: int
    cache: dict[Any, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, features: Features, nearest_k: int = 5) -> Reference:
        return cls(features, M.frechet_statistics(features.features),
                   M.knn_radii(features.features, nearest_k), nearest_k)


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
    #: ``estimates[variant][metric]``: values with their uncertainty (emascope.estimates)
    estimates: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples_drawn: int = 0           # samples drawn over all variants (racing draws fewer)
    racing: dict[str, Any] | None = None   # the race's summary (emascope.racing.race_summary)
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


def draw_and_extract(model: nn.Module, sampler: Sampler, cfg: ScoringConfig,
                     extractor: Callable[[torch.Tensor], Features] | None,
                     timings: dict[str, float], *, keep_all: bool = False,
                     batches: range | None = None, notes: list[str] | None = None) -> Drawn:
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
    ``timings["sampling"|"features"]`` are increased. ``batches``: draw only these batches (a range
    of batch indices, e.g. a racing round's; each drawn exactly as in a full sweep); the preview
    head then comes from the first batches drawn. Samples holding NaN/Inf are a sampler error
    (:func:`emascope.features.check_samples`); what is converted (integer points) is added to ``notes``.
    """
    device = model_device(model)
    keep = -1  # samples kept for the preview: decided from the first batch's kind
    head: list[torch.Tensor] = []
    everything: list[torch.Tensor] = []
    feats: list[Features] = []
    sizes = batch_sizes(cfg.num_samples, cfg.batch_size)
    todo = range(len(sizes)) if batches is None else range(max(0, batches.start), min(len(sizes), batches.stop))
    kept, error = 0, None
    remaining = total = sum(sizes[b] for b in todo)
    for b in todo:
        n = sizes[b]
        gen = torch.Generator(device=device).manual_seed(batch_seed(cfg.seed, b))
        t = time.perf_counter()
        try:
            out = sampler(model, n, gen)
            if not torch.is_tensor(out) or out.dim() < 1 or len(out) != n:
                raise ValueError(f"sampler must return a tensor with {n} samples on dim 0, got "
                                 f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
            out = out.detach().cpu()
            note = check_samples(out)  # ValueError: NaN/Inf samples are not scored
            if note is not None and notes is not None and note not in notes:
                notes.append(note)
        except Exception as exc:  # noqa: BLE001
            return Drawn(None, None, StageError("sampler", exc), total - remaining, None)
        finally:
            timings["sampling"] += time.perf_counter() - t
        remaining -= n
        if keep_all:
            everything.append(out)
        if keep < 0:
            try:
                keep = cfg.preview if sample_kind(out) == "images" else cfg.preview_points
            except ValueError:
                keep = 0  # a custom sample type: no preview
        if kept < keep:
            head.append(out[: keep - kept])
            kept += len(head[-1])
        if extractor is not None:
            t = time.perf_counter()
            try:
                feats.append(extractor(out))
            except Exception as exc:  # noqa: BLE001
                error, extractor, feats = StageError("features", exc), None, []
            finally:
                timings["features"] += time.perf_counter() - t
        if extractor is None and not keep_all and kept >= keep:
            break  # nothing more to keep: the preview head is full and no features are wanted
    features = None
    if feats:
        logits = [f.logits for f in feats]
        features = Features(torch.cat([f.features for f in feats]),
                            torch.cat(logits) if all(x is not None for x in logits) else None)  # type: ignore[arg-type]
    # the only place all samples are concatenated: only when a sample_metrics hook asked for them
    samples = torch.cat(everything) if keep_all else None
    return Drawn(torch.cat(head) if head else None, features, error, total - remaining, samples)


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


def feature_metric_jobs(feats: Features, ref: Reference, cfg: ScoringConfig,
                        fd_name: str) -> list[tuple[str, Callable[[], dict[str, float]]]]:
    """The metric groups to compute for one variant, as ``(name, thunk)`` pairs."""
    gen, real = feats.features, ref.features.features

    def fd() -> dict[str, float]:
        return {fd_name: M.frechet_distance_from_statistics(M.frechet_statistics(gen), ref.stats)}

    jobs: list[tuple[str, Callable[[], dict[str, float]]]] = [
        (fd_name, fd),
        ("kid", lambda: M.kid(gen, real, subset_size=cfg.kid_subset_size, subsets=cfg.kid_subsets,
                              seed=cfg.seed)),
        ("prc", lambda: M.precision_recall(gen, real, neighborhood=cfg.prc_neighborhood)),
        ("density_coverage", lambda: M.density_coverage(gen, real, k=ref.nearest_k, ref_radii=ref.radii)),
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
              directions: Mapping[str, str | None] | None = None, prior_errors: int = 0) -> SweepResult:
    """Score every variant; write metrics/previews/events through ``writer``. Never raises.

    ``model`` is the unwrapped module the bank was built on. Generative metrics need
    ``sampler``, ``extractor`` and ``reference``; ``evaluate(model) -> {name: value}`` runs with
    each variant's weights loaded (eval mode, ``torch.no_grad``). ``sample_metrics(samples) ->
    {name: value}`` (needs ``sampler``) is called once per variant with all ``num_samples``
    samples the sampler drew for it, on CPU (the same samples the features and the preview come
    from); they are kept in memory for it (``num_samples`` x one sample's size). ``prior_errors``:
    failures of this sweep that happened before it (building the reference), counted in ``errors``.

    With ``cfg.uncertainty`` every value gets its half-sample standard error and interval
    (:mod:`emascope.estimates`) and, once all variants are scored, a ``comparison`` event holds each
    ranked metric's best variant and every variant's paired difference to it (``directions``:
    metric name -> ``"lower"``/``"higher"``). With ``cfg.racing`` the samples are drawn in rounds and
    the variants significantly worse on the racing metric stop drawing (:mod:`emascope.racing`).
    """
    res = SweepResult(step=step, errors=int(prior_errors))  # e.g. the reference failed just before
    t_start = time.perf_counter()
    halves = E.Halves(cfg) if cfg.uncertainty else None
    directions = {**M.METRIC_DIRECTIONS, **(directions or {})}
    writer.event("score_start", step, variants=list(variants))
    drawn: dict[str, Drawn] = {}
    race: racing.RaceResult | None = None
    if cfg.racing and sampler is not None and reference is not None and extractor is not None and len(variants) > 2:
        try:
            race, drawn = _race(model, bank, variants, res, writer, cfg, sampler, extractor, reference,
                                sample_metrics, fd_name, directions, halves)
        except Exception as exc:  # noqa: BLE001 - fall back to a full sweep
            res.errors += 1
            writer.error("racing", step, exc)
            race, drawn = None, {}
    for variant in variants:
        res.scores[variant] = {}
        try:
            _score_variant(model, bank, variant, res, writer, cfg, sampler, extractor, reference,
                           evaluate, sample_metrics, fd_name, halves, drawn.pop(variant, None))
        except Exception as exc:  # noqa: BLE001 - e.g. swap itself failed
            res.errors += 1
            writer.error("swap", step, exc, variant=variant)
    if halves is not None:
        t = time.perf_counter()
        try:
            compared = E.comparison_metrics(res.estimates, directions, cfg.confidence_level)
            if race is not None:
                _keep_race_decisions(compared, race, res.racing["metric"] if res.racing else None)
            if compared:
                writer.event(rf.EVENT_COMPARISON, step, level=cfg.confidence_level, method="half_sample",
                             replicates=cfg.bootstrap_replicates, metrics=compared)
        except Exception as exc:  # noqa: BLE001
            res.errors += 1
            writer.error("uncertainty", step, exc)
        res.timings["uncertainty"] += time.perf_counter() - t
    full = cfg.num_samples * len(variants) if sampler is not None and res.samples_drawn else 0
    extra = {"racing": res.racing} if res.racing else {}
    writer.event("score_done", step, seconds=time.perf_counter() - t_start, timings=dict(res.timings),
                 num_samples=res.num_samples, errors=res.errors, samples_drawn=res.samples_drawn,
                 samples_full=full, **extra)
    return res


def _race(model: nn.Module, bank: Any, variants: list[str], res: SweepResult, writer: RunWriter,
          cfg: ScoringConfig, sampler: Sampler, extractor: Callable[[torch.Tensor], Features],
          reference: Reference, sample_metrics: SampleMetrics | None, fd_name: str,
          directions: Mapping[str, str | None],
          halves: E.Halves | None) -> tuple[racing.RaceResult | None, dict[str, Drawn]]:
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
                                        batches=range(have[v], upto), notes=res.notes)
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
                   halves: E.Halves | None = None, drawn: Drawn | None = None) -> None:
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
        swap = contextlib.nullcontext(model)  # samples drawn already (racing rounds) and no evaluate
    with preserved_training_flags(model), swap, torch.no_grad():
        model.eval()
        if sampler is not None:
            if drawn is None:
                drawn = draw_and_extract(model, sampler, cfg, extractor if reference is not None else None,
                                         res.timings, keep_all=sample_metrics is not None, notes=res.notes)
            samples, feats, err, n_drawn, every = drawn
            res.num_samples = max(res.num_samples, n_drawn)
            res.samples_drawn += n_drawn
            if err is not None:
                res.errors += 1
                writer.error(err.where, step, err.exc, variant=variant)
        if evaluate is not None:
            user.update(_user_hook("evaluate", evaluate, model, res, writer, variant, "user_metrics"))
    drawn = None
    estimates: dict[str, Any] = res.estimates.setdefault(variant, {})
    if evaluate is not None or sample_metrics is not None:
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
    except ValueError as exc:  # one error for the variant, no metric values
        res.errors += 1
        writer.error("features", step, exc, variant=variant)
        return
    cache: dict[str, Any] = {}
    for group, job in feature_metric_jobs(feats, reference, cfg, fd_name):
        t = time.perf_counter()
        try:
            values = job()
        except Exception as exc:  # noqa: BLE001
            res.errors += 1
            writer.error(f"metric:{group}", step, exc, variant=variant)
            continue
        finally:
            res.timings["metrics"] += time.perf_counter() - t
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


def _uncertainty_error(res: SweepResult, writer: RunWriter, variant: str, group: str, exc: BaseException) -> None:
    res.errors += 1
    writer.error(f"uncertainty:{group}", res.step, exc, variant=variant)


def _user_hook(where: str, hook: Callable[[Any], Any], arg: Any, res: SweepResult, writer: RunWriter,
               variant: str, timing: str) -> dict[str, Any]:
    """Call ``evaluate(model)`` or ``sample_metrics(samples)``; a raise or a non-dict result is an
    ``error`` event named ``where`` and gives ``{}``. Time goes to ``res.timings[timing]``."""
    t = time.perf_counter()
    try:
        out = hook(arg)
        if not isinstance(out, dict):
            raise ValueError(f"{where} must return dict[str, float], got {type(out).__name__}")
        return dict(out)
    except Exception as exc:  # noqa: BLE001
        res.errors += 1
        writer.error(where, res.step, exc, variant=variant)
        return {}
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
        self._kid_noted = False
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

    def sweep(self, model: nn.Module, bank: Any, variants: list[str], step: int) -> SweepResult:
        """Score ``variants`` at ``step`` (see :func:`run_sweep`). The training job's global random
        streams are forked and restored, so they are the same with and without the sweep."""
        with torch.random.fork_rng(devices=cuda_devices(model)):
            reference = self._prepare_reference(model, step) if self.hooks.sampler is not None else None
            if reference is not None and self.cfg.noise_floor and not self._floor_done:
                self._floor_done = True
                self.noise_floor(reference, step)
            result = run_sweep(model=model, bank=bank, variants=variants, step=step, writer=self.writer,
                               cfg=self.cfg, sampler=self.hooks.sampler, extractor=self.extractor,
                               reference=reference, evaluate=self.hooks.evaluate,
                               sample_metrics=self.hooks.sample_metrics, fd_name=self.fd_name(),
                               directions=self.directions(), prior_errors=self.reference_errors)
        self.reference_errors = 0
        self._note(result, reference, step)
        return result

    def directions(self) -> dict[str, str | None]:
        """Direction of every metric known now: built-in ones, the run's, the user's."""
        return {**M.METRIC_DIRECTIONS, **self.metric_directions, **self.user_directions}

    def noise_floor(self, reference: Reference, step: int) -> dict[str, Any] | None:
        """Score what a perfect model would get at this sample size and write a ``noise_floor`` event:
        the ``exact_samples`` hook against the reference, else a disjoint split of the reference
        (``min(num_samples, m // 2)`` of its ``m`` items, chosen with ``seed``, scored against the
        rest). Every feature metric and ``sample_metrics`` (on the exact samples, or on the split's
        reference items when the reference was given as data) are scored with their intervals.
        Returns the event's ``metrics`` (``None`` on failure: an ``error`` event ``where: "noise_floor"``)."""
        cfg, t = self.cfg, time.perf_counter()
        try:
            exact = self.hooks.exact_samples
            if exact is not None:
                samples = torch.as_tensor(exact)[: cfg.num_samples].detach().cpu()
                feats, ref, source = self.extractor(samples), reference, "exact"
            else:
                real = reference.features
                m = len(real.features)
                n_a = min(cfg.num_samples, m // 2)
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
            for group, job in feature_metric_jobs(feats, ref, cfg, self.fd_name()):
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
            self.writer.error("noise_floor", step, exc)
            return None
        self.writer.event(rf.EVENT_NOISE_FLOOR, step, source=source, n=len(feats.features),
                          n_reference=len(ref.features.features), level=cfg.confidence_level,
                          seconds=time.perf_counter() - t, metrics=fields)
        return fields

    def _note(self, result: SweepResult, reference: Reference | None, step: int) -> None:
        for note in result.notes:
            self._notice_once("samples", note, step)
        if result.kid_subset_size is not None and not self._kid_noted:
            self._kid_noted = True
            n_ref = len(reference.features.features) if reference is not None else None
            self.writer.event("notice", step, where="metric:kid", kid_subset_size=result.kid_subset_size,
                              message=f"KID subset size {result.kid_subset_size} "
                                      f"(num_samples={self.cfg.num_samples}, num_reference={n_ref})")
        changed = False
        if result.sample_kind and result.sample_kind != self.sample_kind:
            self.sample_kind, changed = result.sample_kind, True
        seen = {m for scores in result.scores.values() for m in scores}
        for m in sorted(seen - set(self.metric_directions)):
            direction = self.user_directions.get(m, M.METRIC_DIRECTIONS.get(m))
            if direction is None:
                self.writer.event("notice", step, where="evaluate", message=f"metric {m!r} has no declared "
                                  "direction (pass metric_directions={...}); it is shown but never ranked")
            self.metric_directions[m] = direction
            changed = True
        if changed:
            self.on_info_change()

    def _notice_once(self, where: str, message: str, step: int) -> None:
        if message not in self._noted:
            self._noted.add(message)
            self.writer.event("notice", step, where=where, message=message)

    def _prepare_reference(self, model: nn.Module, step: int) -> Reference | None:
        if self.reference is not None or self._reference_failed or self.hooks.reference is None:
            return self.reference
        try:
            self.reference = self._build_reference(model, step)
        except Exception as exc:  # noqa: BLE001
            self._reference_failed = True
            self.reference_errors += 1
            self.writer.error("reference", step, exc)
        return self.reference

    def _build_reference(self, model: nn.Module, step: int) -> Reference:
        ref, cfg = self.hooks.reference, self.cfg
        device = cfg.feature_device if cfg.feature_device is not None else model_device(model)
        if isinstance(ref, Features):
            if self.extractor is None:
                self.extractor = make_extractor(cfg.feature_extractor, self.sample_kind or "points",
                                                weights_path=cfg.feature_extractor_weights_path, device=device,
                                                batch_size=cfg.feature_batch_size,
                                                image_range=resolve_image_range(cfg.image_range, None))
            check_finite_features(ref, "reference features")
            return Reference.build(ref, cfg.nearest_k)
        data = reference_tensor(ref, cfg.reference_size)
        note = check_samples(data, "reference samples")  # ValueError: NaN/Inf in the reference
        if note is not None:
            self._notice_once("reference", note, step)
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
        cache = self.run_dir / rf.reference_cache_file(key)
        feats = load_cached(cache)
        hit = feats is not None
        t = time.perf_counter()
        if feats is None:
            feats = self.extractor(data)
            check_finite_features(feats, "reference features")  # NaN/Inf features are never cached
            self.writer._guard("reference cache", lambda: save_cached(cache, feats))
        else:
            check_finite_features(feats, "reference features")
        if self.hooks.sample_metrics is not None and self.hooks.exact_samples is None and torch.is_tensor(data):
            # the reference items of the noise floor's split, for sample_metrics (same rule as noise_floor)
            m = len(feats.features)
            perm = torch.randperm(m, generator=torch.Generator().manual_seed(cfg.seed))
            self._floor_rows = data[perm[: min(cfg.num_samples, m // 2)]].clone()
        self.writer.event("reference", step, key=key, cached=hit, num=len(feats.features),
                          seconds=time.perf_counter() - t)
        if kind == "points" and not (self.run_dir / rf.REFERENCE_POINTS).exists():
            self.writer.save_points(rf.REFERENCE_POINTS, data[: cfg.preview_points].float().numpy())
        return Reference.build(feats, cfg.nearest_k)


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
