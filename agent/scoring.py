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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from emascope import metrics as M
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
    """Reference features plus what every variant reuses: Gaussian statistics and k-NN radii."""

    features: Features
    stats: dict[str, Any]
    radii: torch.Tensor
    nearest_k: int

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
        ("sampling", "features", "metrics", "user_metrics", "sample_metrics"), 0.0))
    errors: int = 0
    num_samples: int = 0             # most samples drawn for one variant in this sweep
    kid_subset_size: int | None = None
    sample_kind: str | None = None
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
                     notes: list[str] | None = None) -> Drawn:
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
    ``timings["sampling"|"features"]`` are increased. Samples holding NaN/Inf are a sampler error
    (:func:`emascope.features.check_samples`); what is converted (integer points) is added to ``notes``.
    """
    device = model_device(model)
    keep = -1  # samples kept for the preview: decided from the first batch's kind
    head: list[torch.Tensor] = []
    everything: list[torch.Tensor] = []
    feats: list[Features] = []
    kept, remaining, error = 0, cfg.num_samples, None
    for b, n in enumerate(batch_sizes(cfg.num_samples, cfg.batch_size)):
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
            return Drawn(None, None, StageError("sampler", exc), cfg.num_samples - remaining, None)
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
    return Drawn(torch.cat(head) if head else None, features, error, cfg.num_samples - remaining, samples)


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
              prior_errors: int = 0) -> SweepResult:
    """Score every variant; write metrics/previews/events through ``writer``. Never raises.

    ``model`` is the unwrapped module the bank was built on. Generative metrics need
    ``sampler``, ``extractor`` and ``reference``; ``evaluate(model) -> {name: value}`` runs with
    each variant's weights loaded (eval mode, ``torch.no_grad``). ``sample_metrics(samples) ->
    {name: value}`` (needs ``sampler``) is called once per variant with all ``num_samples``
    samples the sampler drew for it, on CPU (the same samples the features and the preview come
    from); they are kept in memory for it (``num_samples`` x one sample's size). ``prior_errors``:
    failures of this sweep that happened before it (building the reference), counted in ``errors``.
    """
    res = SweepResult(step=step, errors=int(prior_errors))  # e.g. the reference failed just before
    t_start = time.perf_counter()
    writer.event("score_start", step, variants=list(variants))
    for variant in variants:
        res.scores[variant] = {}
        try:
            _score_variant(model, bank, variant, res, writer, cfg, sampler, extractor, reference,
                           evaluate, sample_metrics, fd_name)
        except Exception as exc:  # noqa: BLE001 - e.g. swap itself failed
            res.errors += 1
            writer.error("swap", step, exc, variant=variant)
    writer.event("score_done", step, seconds=time.perf_counter() - t_start, timings=dict(res.timings),
                 num_samples=res.num_samples, errors=res.errors)
    return res


def _score_variant(model: nn.Module, bank: Any, variant: str, res: SweepResult, writer: RunWriter,
                   cfg: ScoringConfig, sampler: Sampler | None,
                   extractor: Callable[[torch.Tensor], Features] | None, reference: Reference | None,
                   evaluate: Evaluate | None, sample_metrics: SampleMetrics | None, fd_name: str) -> None:
    step = res.step
    samples: torch.Tensor | None = None
    every: torch.Tensor | None = None
    feats: Features | None = None
    user: dict[str, Any] = {}
    # "raw" goes through swap too: its backup/restore undoes a sampler or evaluate that writes to
    # the weights in place (the live weights leave the sweep bit-identical whatever happens)
    swap = bank.swap(model, variant) if bank is not None else restored_state(model)
    with preserved_training_flags(model), swap, torch.no_grad():
        model.eval()
        if sampler is not None:
            samples, feats, err, drawn, every = draw_and_extract(
                model, sampler, cfg, extractor if reference is not None else None, res.timings,
                keep_all=sample_metrics is not None, notes=res.notes)
            res.num_samples = max(res.num_samples, drawn)
            if err is not None:
                res.errors += 1
                writer.error(err.where, step, err.exc, variant=variant)
        if evaluate is not None:
            user.update(_user_hook("evaluate", evaluate, model, res, writer, variant, "user_metrics"))
    if every is not None and sample_metrics is not None:
        with torch.no_grad():
            user.update(_user_hook("sample_metrics", sample_metrics, every, res, writer, variant,
                                   "sample_metrics"))
        del every  # free the variant's samples before the next one is drawn

    for name, value in user.items():
        _record(res, writer, variant, str(name), value)
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
    t = time.perf_counter()
    for group, job in feature_metric_jobs(feats, reference, cfg, fd_name):
        try:
            values = job()
        except Exception as exc:  # noqa: BLE001
            res.errors += 1
            writer.error(f"metric:{group}", step, exc, variant=variant)
            continue
        if group == "kid":
            res.kid_subset_size = int(values.pop("kid_subset_size"))
        for name, value in values.items():
            _record(res, writer, variant, name, value)
    res.timings["metrics"] += time.perf_counter() - t


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


def _record(res: SweepResult, writer: RunWriter, variant: str, name: str, value: Any) -> None:
    v = M.finite_or_none(value)
    res.scores[variant][name] = v
    writer.metric(res.step, variant, name, v)


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

    def sweep(self, model: nn.Module, bank: Any, variants: list[str], step: int, *,
              synthesized: dict[str, Any] | None = None) -> SweepResult:
        """Score ``variants`` at ``step`` (see :func:`run_sweep`). The training job's global random
        streams are forked and restored, so they are the same with and without the sweep.

        ``synthesized``: the variants are decays synthesised post hoc (``bank`` swaps their state
        dicts in); every metrics record gets this ``synthesized`` object (docs/synthesis.md)."""
        writer = self.writer if synthesized is None else _MarkedWriter(self.writer, synthesized)
        with torch.random.fork_rng(devices=cuda_devices(model)):
            reference = self._prepare_reference(model, step) if self.hooks.sampler is not None else None
            result = run_sweep(model=model, bank=bank, variants=variants, step=step, writer=writer,
                               cfg=self.cfg, sampler=self.hooks.sampler, extractor=self.extractor,
                               reference=reference, evaluate=self.hooks.evaluate,
                               sample_metrics=self.hooks.sample_metrics, fd_name=self.fd_name(),
                               prior_errors=self.reference_errors)
        self.reference_errors = 0
        self._note(result, reference, step)
        return result

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
        self.writer.event("reference", step, key=key, cached=hit, num=len(feats.features),
                          seconds=time.perf_counter() - t)
        if kind == "points" and not (self.run_dir / rf.REFERENCE_POINTS).exists():
            self.writer.save_points(rf.REFERENCE_POINTS, data[: cfg.preview_points].float().numpy())
        return Reference.build(feats, cfg.nearest_k)


class _MarkedWriter:
    """A :class:`RunWriter` whose metric records carry a ``synthesized`` object; all else delegated."""

    def __init__(self, writer: RunWriter, synthesized: dict[str, Any]) -> None:
        self._writer, self._synthesized = writer, synthesized

    def metric(self, step: int, variant: str, metric: str, value: float | None) -> None:
        self._writer.metric(step, variant, metric, value, synthesized=self._synthesized)

    def event(self, type: str, step: int, **fields: Any) -> None:
        if type in ("score_start", "score_done"):  # not a sweep of the bank: readers can tell them apart
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
