"""attach() and Scope: tee a training job's weights into an EMA bank, score it, write a run directory.

```python
scope = attach(model, optimizer, run_dir="runs/exp1", sampler=my_sampler, reference=real_data,
               score_every=5000)
...                      # the training loop, unchanged
scope.close()            # or: with attach(...) as scope: ...
```

With an optimizer, the bank is updated from ``optimizer.register_step_post_hook``: once per *real*
optimizer step (a step skipped by AMP's GradScaler never calls ``optimizer.step`` and is not
counted; gradient accumulation counts one step per ``optimizer.step``). Without one, call
``scope.step()`` after each optimizer step.

Failure behaviour: nothing the agent does may raise into training. Exceptions from the bank
update, sampler, extractor, metrics, ``evaluate``, ``sample_metrics``, snapshots, exports or file
writes are caught and recorded in ``events.jsonl``. If ``bank.update()`` raises, the bank is
*disabled* (its state may be half-updated): no more updates, EMA variants are no longer scored
or snapshotted, only ``raw`` is; a ``bank_disabled`` event says so.

Under ``torch.distributed`` only rank 0 builds a bank, scores and writes files; other ranks count
steps and do nothing else (``scope.bank`` is ``None`` there, ``score_now``/``export`` return
``None``). ``attach`` issues no collective, so it may be called on every rank or on rank 0 only.
Scoring runs on rank 0 alone with the unwrapped module (``ddp.module``): the sampler and
``evaluate`` must use the model they are given and must not call collectives (the other ranks wait
in their next collective meanwhile, so a sweep must finish within the process group's timeout).
Sharded parameters (FSDP2 ``fully_shard``, DTensor) raise ``NotImplementedError``.

Scoring forks the global random generators (``torch.random.fork_rng``) and restores them, so the
training job's random stream is the same with and without the agent.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agent import __version__
from agent import features as F
from agent.bank import DEFAULT_DECAYS, EMABank, unwrap_model
from agent.ema_math import BEMAConfig, validate_decays, validate_update_every
from agent.metrics import METRIC_DIRECTIONS
from agent.requests import RequestPoller
from agent.rundir import RunWriter, host_info, new_run_id, prepare_run_dir
from agent.scoring import (
    Evaluate,
    Reference,
    SampleMetrics,
    Sampler,
    ScoringConfig,
    SweepResult,
    run_sweep,
)

log = logging.getLogger(__name__)

_DIRECTIONS = ("lower", "higher")


def dist_rank() -> int:
    """Rank in the default process group; before ``init_process_group`` the launcher's ``RANK``
    environment variable (torchrun sets it), else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}, "
                         f"got {value!r}")


def model_info(model: nn.Module) -> dict[str, Any]:
    """``model`` block of run.json: class name, parameter counts, parameter count per dtype."""
    dtypes: dict[str, int] = {}
    for p in model.parameters():
        key = str(p.dtype).removeprefix("torch.")
        dtypes[key] = dtypes.get(key, 0) + p.numel()
    return {"class": type(model).__name__, "num_params": sum(p.numel() for p in model.parameters()),
            "num_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "dtypes": dtypes}


class Scope:
    """A training job with an EMA bank attached. Build it with :func:`attach` (same arguments).

    Main arguments (steps are optimizer steps, sample counts are numbers of samples):

    - ``model``, ``optimizer``: the training model (DDP / ``torch.compile`` wrappers are unwrapped)
      and its optimizer (``None``: call :meth:`step` after every optimizer step).
    - ``run_dir``: the run directory (docs/run-format.md). A folder that already holds a run is
      refused unless ``resume=True`` (continue it: the bank is reloaded from
      ``banks/latest.safetensors`` and the step count continues from it) or ``overwrite=True``.
    - ``sampler(model, n, generator) -> samples``: ``[n, d]`` points or ``[n, C, H, W]`` images;
      called in eval mode under ``torch.no_grad`` with one ``torch.Generator`` on the model's
      device, seeded with ``seed`` afresh for every variant (pass ``generator=generator,
      device=generator.device`` to ``torch.randn``). ``reference``: real data (tensor, ndarray,
      dataset) or precomputed :class:`agent.features.Features`.
    - ``evaluate(model) -> {name: value}``: user metrics; ``metric_directions={name: "lower" |
      "higher"}`` declares which way is better (built-in metrics have theirs).
    - ``sample_metrics(samples) -> {name: value}``: user metrics over the agent's own samples,
      called once per variant per sweep with all ``num_samples`` samples the sampler drew for that
      variant (on CPU, as the sampler returned them, concatenated; the preview and the features
      come from the same samples). Needs ``sampler``. Recorded like ``evaluate``'s (directions
      from ``metric_directions``); a raise is an ``error`` event ``where: "sample_metrics"``. Memory:
      only with this hook are a variant's samples all kept at once (``num_samples`` x one sample's
      size on the host); without it they are turned into features batch by batch and dropped.
    - ``score_every`` (``None``: only at close / :meth:`score_now`), ``score_at_close``,
      ``snapshot_every`` (default: ``score_every``), ``num_samples``, ``batch_size`` (per sampler
      call), ``seed``, ``preview`` (images in the PNG grid), ``feature_extractor`` (``"auto"``:
      identity for points, ``inception-v3-compat`` for images; a torch-fidelity name or a callable),
      ``feature_extractor_weights_path``, ``feature_device``, ``kid_subset_size``, ``nearest_k``.
    - ``decays``, ``device``, ``update_every``, ``bias_correction``, ``bema``, ``average_buffers``:
      passed to :class:`agent.bank.EMABank`, same defaults (``decays=None``: the default sweep
      :data:`agent.bank.DEFAULT_DECAYS`).
    - ``heartbeat_interval`` (s), ``request_interval`` (s between checks of ``requests/`` and of the
      bank's non-finite skip counter).

    Put :meth:`state_dict` in the training checkpoint and call :meth:`load_state_dict` after
    ``attach(..., resume=True)`` to restart exactly at the checkpoint's step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        run_dir: str | os.PathLike,
        sampler: Sampler | None = None,
        reference: Any = None,
        evaluate: Evaluate | None = None,
        sample_metrics: SampleMetrics | None = None,
        metric_directions: dict[str, str] | None = None,
        score_every: int | None = 1000,
        score_at_close: bool = True,
        snapshot_every: int | None = None,
        num_samples: int = 2000,
        batch_size: int = 500,
        seed: int = 0,
        preview: int = 64,
        feature_extractor: str | Callable[[torch.Tensor], Any] | None = "auto",
        feature_extractor_weights_path: str | os.PathLike | None = None,
        feature_device: str | torch.device | None = None,
        feature_batch_size: int = 64,
        image_range: str = "auto",
        reference_size: int | None = None,
        kid_subset_size: int | None = None,
        nearest_k: int = 5,
        decays: Sequence[float] | None = DEFAULT_DECAYS,
        device: str | torch.device | None = None,
        update_every: int = 1,
        bias_correction: bool = False,
        bema: bool | BEMAConfig = False,
        average_buffers: bool = False,
        name: str | None = None,
        overwrite: bool = False,
        resume: bool = False,
        heartbeat_interval: float = 2.0,
        request_interval: float = 1.0,
    ) -> None:
        # ---- validation (clear errors before anything is written) ----
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError("optimizer must be a torch.optim.Optimizer or None, "
                             f"got {type(optimizer).__name__}")
        if optimizer is not None:
            own = {id(p) for p in model.parameters()}
            if not any(id(p) in own for group in optimizer.param_groups for p in group["params"]):
                raise ValueError("optimizer does not update any parameter of model: pass the optimizer that "
                                 "trains this model (its steps drive the EMA bank)")
        if sampler is not None and not callable(sampler):
            raise ValueError(f"sampler must be callable (model, n, generator) -> samples, got {sampler!r}")
        if evaluate is not None and not callable(evaluate):
            raise ValueError(f"evaluate must be callable (model) -> dict[str, float], got {evaluate!r}")
        if sample_metrics is not None and not callable(sample_metrics):
            raise ValueError("sample_metrics must be callable (samples) -> dict[str, float], "
                             f"got {sample_metrics!r}")
        if sample_metrics is not None and sampler is None:
            raise ValueError("sample_metrics was given but sampler is None: there are no samples to pass it")
        if reference is not None and sampler is None:
            raise ValueError("reference was given but sampler is None: nothing to compare it with")
        _check_int("score_every", score_every, 1, allow_none=True)
        _check_int("snapshot_every", snapshot_every, 1, allow_none=True)
        _check_int("reference_size", reference_size, 2, allow_none=True)
        _check_int("seed", seed, 0)
        for key, value in (("heartbeat_interval", heartbeat_interval),
                           ("request_interval", request_interval)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{key} must be a number of seconds >= 0, got {value!r}")
        if heartbeat_interval == 0:
            raise ValueError("heartbeat_interval must be > 0 seconds, got 0")
        directions = dict(metric_directions or {})
        for key, value in directions.items():
            if value not in _DIRECTIONS:
                raise ValueError(f"metric_directions[{key!r}] must be 'lower' or 'higher', got {value!r}")
        if isinstance(reference, F.Features) and feature_extractor in (None, "auto"):
            raise ValueError("reference holds precomputed features: pass feature_extractor= naming the "
                             "extractor that produced them ('identity', a torch-fidelity name or a callable)")
        if isinstance(feature_extractor, str) and feature_extractor not in ("auto", "identity"):
            from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
            if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
                raise ValueError(f"feature_extractor {feature_extractor!r} is not 'auto', 'identity' or a "
                                 f"torch-fidelity extractor ({sorted(FEATURE_EXTRACTORS_REGISTRY)})")
        if feature_extractor_weights_path is not None and not Path(feature_extractor_weights_path).is_file():
            raise ValueError(f"feature_extractor_weights_path {str(feature_extractor_weights_path)!r} "
                             "is not a file")
        # validates the value; "auto" is decided from the reference images when they are seen
        fixed_range = F.resolve_image_range(image_range, None)
        if reference is not None and not isinstance(reference, F.Features):
            F.reference_identity(reference, max_items=2)  # validates the type early
        # the bank's settings are checked on every rank, so a bad value fails everywhere alike
        if decays is None:
            decays = DEFAULT_DECAYS
        validate_decays(decays)
        validate_update_every(update_every)
        _refuse_sharded_params(model)
        self.cfg = ScoringConfig(num_samples=num_samples, batch_size=batch_size, seed=seed, preview=preview,
                                 nearest_k=nearest_k, kid_subset_size=kid_subset_size,
                                 feature_batch_size=feature_batch_size, image_range=fixed_range)

        self.model = unwrap_model(model)
        self.optimizer = optimizer
        self.sampler, self.reference_input, self.evaluate = sampler, reference, evaluate
        self.sample_metrics = sample_metrics
        self.score_every = score_every
        self.snapshot_every = snapshot_every if snapshot_every is not None else score_every
        self.score_at_close = bool(score_at_close)
        self.feature_extractor_spec = feature_extractor
        self.feature_extractor_weights_path = feature_extractor_weights_path
        self.feature_device = feature_device
        self.image_range = image_range
        self.reference_size = reference_size
        self.rank = dist_rank()
        self.is_writer = self.rank == 0
        self.bank: Any = None
        self.closed = False
        self.last_scores: SweepResult | None = None
        self._step = 0
        self._last_scored: int | None = None
        self._last_snapshot: int | None = None
        self._bank_ok = True
        self._skipped_seen = 0
        self._housekeeping_at = -float("inf")
        self.request_interval = float(request_interval)
        self._reference: Reference | None = None
        self._extractor: Any = None
        self._reference_failed = False
        self._kid_noted = False
        self._hook = None
        self.metric_directions: dict[str, str] = {}
        self.user_directions = directions
        self.writer: RunWriter | None = None
        self.requests: RequestPoller | None = None
        self.t0 = time.time()
        self.start_time = self.t0

        if self.is_writer:
            self.bank = EMABank(self.model, decays, device=device, update_every=update_every,
                                bias_correction=bias_correction, bema=bema, average_buffers=average_buffers)
            self.run_dir = prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
            resumed_from = self._resume_bank() if resume else None
            previous = self._previous_run() if resume else {}
            self.run_id = str(previous.get("run_id") or new_run_id())
            if isinstance(previous.get("start_time"), (int, float)):
                self.start_time = float(previous["start_time"])
            old_dirs = previous.get("metric_directions")
            if isinstance(old_dirs, dict):  # keep the directions of metrics already written
                self.metric_directions = {str(k): self.user_directions.get(k, v) for k, v in old_dirs.items()
                                          if v in _DIRECTIONS}
            self.name = name or self.run_dir.resolve().name
            self.writer = RunWriter(self.run_dir, step_fn=lambda: self._step,
                                    heartbeat_interval=heartbeat_interval)
            self.settings = {"device": str(self.bank.device),
                             "update_every": update_every, "bias_correction": bool(bias_correction),
                             "bema": None if self.bank.bema is None else self.bank.bema.as_dict(),
                             "average_buffers": bool(average_buffers), "score_every": score_every,
                             "snapshot_every": self.snapshot_every, "num_samples": num_samples,
                             "batch_size": batch_size, "seed": seed, "nearest_k": nearest_k,
                             "feature_extractor": self._extractor_label(), "image_range": image_range}
            self.sample_kind: str | None = self._reference_kind()
            self._write_run_json()
            self.writer.event("start", self._step)
            if resumed_from is not None:
                self.writer.event("resume", self._step, snapshot_step=resumed_from)
            self.writer.start_heartbeat()
            self.requests = RequestPoller(self.run_dir, self._export_for_request,
                                          parse_variant=self._parse_variant, on_result=self._export_event,
                                          min_interval=request_interval)
        else:
            self.run_dir = Path(run_dir)
            self.run_id, self.name = None, name
        if optimizer is not None:
            self._hook = optimizer.register_step_post_hook(self._optimizer_hook)

    # ------------------------------------------------------------------ public API

    @property
    def current_step(self) -> int:
        """Optimizer steps seen since attach."""
        return self._step

    def step(self) -> None:
        """Advance the agent by one optimizer step (only when attached without an optimizer)."""
        if self._hook is not None:
            raise RuntimeError("this Scope follows the optimizer through a step hook; do not call step() too")
        self._after_step()

    def score_now(self) -> SweepResult | None:
        """Score every variant at the current step now (rank 0; ``None`` elsewhere or if closed)."""
        if not self.is_writer or self.closed:
            return None
        return self._score()

    def export(self, variant: str | float, path: str | os.PathLike | None = None, *,
               dtype: str | torch.dtype | None = None) -> Path | None:
        """Write ``variant`` as a ``.safetensors`` checkpoint; returns its path (``None`` off rank 0).

        Default path: ``RUN_DIR/exports/ema-<variant>-step<step>.safetensors``. ``dtype``: ``None``
        (the model's dtypes) or ``"float32"``/``torch.float32``.
        """
        if not self.is_writer:
            return None
        variant = self._parse_variant(variant)
        if path is None:
            path = self.run_dir / "exports" / f"ema-{variant}-step{self._step}.safetensors"
        out = self._export(variant, Path(path), dtype)
        try:  # relative to the run directory when inside it, as in export requests
            shown = out.resolve().relative_to(self.run_dir.resolve()).as_posix()
        except ValueError:
            shown = str(out.resolve())
        self.writer.event("export", self._step, request_id=None, variant=variant, path=shown,
                          bytes=out.stat().st_size, ok=True, error=None)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The agent's state for the training checkpoint: ``{"step", "bank"}`` (``bank`` is
        ``EMABank.state_dict()``, copies; ``None`` off rank 0). Saves and loads with ``torch.save`` /
        ``torch.load(weights_only=True)``.

        Putting it in the training checkpoint makes a restart exact: ``attach(..., resume=True)``
        then ``scope.load_state_dict(ckpt["emascope"])`` continues from the checkpoint's step even
        when the run directory's snapshot is newer or older than the checkpoint.
        """
        bank = self.bank.state_dict() if self.bank is not None and self._bank_ok else None
        return {"format": "emascope.Scope", "step": self._step, "bank": bank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (step count and bank); ``ValueError`` if it does not fit."""
        if not isinstance(state, dict) or state.get("format") != "emascope.Scope":
            raise ValueError("not a Scope state dict (expected the dict returned by Scope.state_dict())")
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"Scope state dict has a bad step {step!r}")
        if self.bank is not None:
            if state.get("bank") is None:
                raise ValueError("Scope state dict holds no bank (saved off rank 0 or after a bank error)")
            self.bank.load_state_dict(state["bank"])
            self._skipped_seen = int(self.bank.num_skipped)
        self._step = step
        self._last_scored = self._last_snapshot = None
        if self.writer is not None:
            self.writer.event("resume", step, snapshot_step=None, source="state_dict")

    def close(self, *, score: bool | None = None) -> None:
        """Final score (if due), final snapshot, ``close`` event, heartbeat ``closed``. Idempotent.

        ``score``: run the final sweep (default ``score_at_close``); the context manager passes
        ``False`` when the training loop raised, so a crash or Ctrl-C does not wait for a sweep.
        """
        if self.closed:
            return
        self.closed = True
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if not self.is_writer:
            return
        try:
            self._check_skipped()
            final = self.score_at_close if score is None else bool(score)
            if final and self._last_scored != self._step and (self.sampler or self.evaluate):
                self._score()
            if self._last_snapshot != self._step:
                self._snapshot()
            self.requests.poll(self._step)
        except Exception as exc:  # noqa: BLE001
            self.writer.error("close", self._step, exc)
        self.writer.event("close", self._step, seconds_alive=time.time() - self.t0)
        self.writer.stop_heartbeat()

    def __enter__(self) -> Scope:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and self.is_writer and not self.closed:
            self.writer.error("training", self._step, exc)
        self.close(score=False if exc is not None else None)

    # ------------------------------------------------------------------ per step

    def _optimizer_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._after_step()

    def _after_step(self) -> None:
        if self.closed:
            return
        self._step += 1
        if not self.is_writer:
            return
        try:
            self._update_bank()
            step = self._step
            if self.snapshot_every and step % self.snapshot_every == 0:
                self._snapshot()
            if self.score_every and step % self.score_every == 0:
                self._score()
            now = time.monotonic()
            if now - self._housekeeping_at >= self.request_interval:
                # at most about once a second: reading the skip counter syncs a GPU bank
                self._housekeeping_at = now
                self._check_skipped()
                self.requests.poll(step)
        except Exception as exc:  # noqa: BLE001 - never into optimizer.step
            self.writer.error("agent", self._step, exc)

    def _update_bank(self) -> None:
        if not self._bank_ok:
            return
        try:
            self.bank.update()
        except Exception as exc:  # noqa: BLE001
            self._bank_ok = False
            self.writer.error("bank", self._step, exc)
            self.writer.event("bank_disabled", self._step,
                              message="bank.update() raised; EMA updates stopped, only 'raw' is scored")

    def _check_skipped(self) -> None:
        """Write a ``nonfinite_skip`` event if the bank skipped updates since the last check."""
        if not self._bank_ok:
            return
        skipped = int(self.bank.num_skipped)
        if skipped != self._skipped_seen:
            self._skipped_seen = skipped
            self.writer.event("nonfinite_skip", self._step, count=skipped)

    # ------------------------------------------------------------------ scoring

    def _variants(self) -> list[str]:
        return list(self.bank.variants) if self._bank_ok else ["raw"]

    def _score(self) -> SweepResult:
        step = self._step
        self._last_scored = step
        # the sweep must not move the training job's random streams (a sampler or evaluate that
        # uses the global generators, dropout, ...): fork them and restore them afterwards
        with torch.random.fork_rng(devices=_cuda_devices(self.model)):
            reference = self._prepare_reference() if self.sampler is not None else None
            result = run_sweep(model=self.model, bank=self.bank if self._bank_ok else None,
                               variants=self._variants(), step=step,
                               writer=self.writer, cfg=self.cfg, sampler=self.sampler,
                               extractor=self._extractor, reference=reference, evaluate=self.evaluate,
                               sample_metrics=self.sample_metrics, fd_name=self._fd_name())
        self.last_scores = result
        if result.kid_subset_size is not None and not self._kid_noted:
            self._kid_noted = True
            n_ref = len(reference.features.features) if reference is not None else None
            self.writer.event("notice", step, where="metric:kid", kid_subset_size=result.kid_subset_size,
                              message=f"KID subset size {result.kid_subset_size} "
                                      f"(num_samples={self.cfg.num_samples}, num_reference={n_ref})")
        seen = {m for scores in result.scores.values() for m in scores}
        changed = False
        if result.sample_kind and result.sample_kind != self.sample_kind:
            self.sample_kind, changed = result.sample_kind, True
        for m in sorted(seen - set(self.metric_directions)):
            direction = METRIC_DIRECTIONS.get(m) if m not in self.user_directions else self.user_directions[m]
            if direction is None:
                self.writer.event("notice", step, where="evaluate", message=f"metric {m!r} has no declared "
                                  "direction (pass metric_directions={...}); it is shown but never ranked")
                self.metric_directions[m] = None  # type: ignore[assignment]
            else:
                self.metric_directions[m] = direction
            changed = True
        if changed:
            self._write_run_json()
        return result

    def _fd_name(self) -> str:
        spec = self.feature_extractor_spec
        if isinstance(spec, str) and spec.startswith("inception"):
            return "fid"
        if spec in (None, "auto") and self.sample_kind == "images":
            return "fid"
        return "fd"

    def _prepare_reference(self) -> Reference | None:
        if self._reference is not None or self._reference_failed or self.reference_input is None:
            return self._reference
        try:
            self._reference = self._build_reference()
        except Exception as exc:  # noqa: BLE001
            self._reference_failed = True
            self.writer.error("reference", self._step, exc)
        return self._reference

    def _build_reference(self) -> Reference:
        ref = self.reference_input
        device = self.feature_device if self.feature_device is not None else _model_device(self.model)
        if isinstance(ref, F.Features):
            kind = self.sample_kind or "points"
            self._extractor = F.make_extractor(self.feature_extractor_spec, kind,
                                               weights_path=self.feature_extractor_weights_path,
                                               device=device, batch_size=self.cfg.feature_batch_size,
                                               image_range=self.cfg.image_range)
            return Reference.build(ref, self.cfg.nearest_k)
        data = F.reference_tensor(ref, self.reference_size)
        kind = F.sample_kind(data) if torch.is_tensor(data) else None
        image_range = F.resolve_image_range(self.image_range, data if kind == "images" else None)
        self.cfg.image_range = image_range
        self._extractor = F.make_extractor(self.feature_extractor_spec, kind or "points",
                                           weights_path=self.feature_extractor_weights_path, device=device,
                                           batch_size=self.cfg.feature_batch_size, image_range=image_range)
        key = F.cache_key(self._extractor.name, self._extractor.weights_hash,
                          F.reference_identity(ref, self.reference_size))
        cache = self.run_dir / "reference" / f"{key}.npz"
        feats = F.load_cached(cache)
        hit = feats is not None
        t = time.perf_counter()
        if feats is None:
            feats = self._extractor(data)
            self.writer._guard("reference cache", lambda: F.save_cached(cache, feats))
        self.writer.event("reference", self._step, key=key, cached=hit, num=len(feats.features),
                          seconds=time.perf_counter() - t)
        if kind == "points" and not (self.run_dir / "samples" / "reference.npy").exists():
            self.writer.save_points("samples/reference.npy", data[: self.cfg.preview_points].float().numpy())
        return Reference.build(feats, self.cfg.nearest_k)

    # ------------------------------------------------------------------ snapshots and exports

    def _snapshot(self) -> None:
        if not self._bank_ok:
            return
        t = time.perf_counter()
        path = self.run_dir / "banks" / "latest.safetensors"
        try:
            nbytes = self.bank.save_snapshot(path, metadata={"run_id": self.run_id, "step": str(self._step)})
        except Exception as exc:  # noqa: BLE001 (OSError: full disk, ...)
            self.writer.error("snapshot", self._step, exc)
            return
        self._last_snapshot = self._step
        self.writer.event("snapshot", self._step, path="banks/latest.safetensors", bytes=int(nbytes),
                          seconds=time.perf_counter() - t)

    def _parse_variant(self, variant: str | float) -> str:
        return self.bank.resolve(variant)

    def _export(self, variant: str, path: Path, dtype: str | torch.dtype | None) -> Path:
        if dtype == "float32":
            dtype = torch.float32
        elif dtype is not None and not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be None or 'float32', got {dtype!r}")
        if variant != "raw" and not self._bank_ok:
            raise RuntimeError("the bank is disabled after an update error; only 'raw' can be exported")
        decay = variant if variant not in ("raw", "bema") else ""
        meta = {"variant": variant, "decay": decay, "step": str(self._step), "run_id": str(self.run_id),
                "emascope_version": __version__}
        return Path(self.bank.export(variant, path, dtype=dtype, metadata=meta))

    def _export_for_request(self, variant: str, path: Path, dtype: str | None) -> int:
        return self._export(variant, path, dtype).stat().st_size

    def _export_event(self, record: dict[str, Any]) -> None:
        self.writer.event("export", self._step, request_id=record.get("id"), variant=record.get("variant"),
                          path=record.get("path"), bytes=record.get("bytes"),
                          ok=record.get("state") == "done", error=record.get("error"))

    # ------------------------------------------------------------------ run.json

    def _extractor_label(self) -> str:
        spec = self.feature_extractor_spec
        if callable(spec) and not isinstance(spec, str):
            return getattr(spec, "__name__", type(spec).__name__)
        if spec in (None, "auto"):
            kind = self._reference_kind()
            return {"points": "identity", "images": "inception-v3-compat"}.get(kind or "", "auto")
        return str(spec)

    def _reference_kind(self) -> str | None:
        ref = self.reference_input
        try:
            if isinstance(ref, (torch.Tensor,)) or hasattr(ref, "shape"):
                return F.sample_kind(torch.as_tensor(ref[:1]))
            if ref is not None and not isinstance(ref, F.Features):
                return F.sample_kind(F.reference_tensor(ref, 1))
        except ValueError:
            return None
        return None

    def _resume_bank(self) -> int | None:
        """Load ``banks/latest.safetensors`` into the new bank and continue its step count.

        Returns the snapshot's step, or ``None`` when the run has no snapshot yet (the bank then
        starts from the current weights at step 0). Raises ``ValueError`` if the snapshot belongs
        to another model or other bank settings.
        """
        path = self.run_dir / "banks" / "latest.safetensors"
        if not path.is_file():
            return None
        try:
            saved = EMABank.load_snapshot(path)
            self.bank.load_state_dict(saved.state_dict())
        except (ValueError, OSError) as exc:
            raise ValueError(f"resume=True: cannot continue the bank snapshot {str(path)!r}: {exc}") from exc
        self._step = int(self.bank.step)
        self._skipped_seen = int(self.bank.num_skipped)
        return self._step

    def _previous_run(self) -> dict[str, Any]:
        """The run.json of the run being resumed (``{}`` if missing or unreadable)."""
        import json
        try:
            info = json.loads((self.run_dir / "run.json").read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001
            return {}
        return info if isinstance(info, dict) else {}

    def _write_run_json(self) -> None:
        directions = {k: v for k, v in self.metric_directions.items() if v in _DIRECTIONS}
        self.writer.write_run_json({
            "run_id": self.run_id, "name": self.name, "start_time": self.start_time, **host_info(),
            "emascope_version": __version__, "decays": [float(d) for d in self.bank.decays],
            "variants": list(self.bank.variants), "model": model_info(self.model),
            "settings": self.settings, "metric_directions": directions, "sample_kind": self.sample_kind,
        })


def _refuse_sharded_params(model: nn.Module) -> None:
    """FSDP2 (``fully_shard``) and other DTensor-sharded models are not supported yet."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise NotImplementedError(
            "attach() does not support sharded parameters (DTensor, e.g. FSDP2 fully_shard) yet: the "
            "EMA bank needs each rank to hold full weights (plain or DistributedDataParallel models)")


def _cuda_devices(model: nn.Module) -> list[int]:
    """CUDA device indices the model lives on (for ``torch.random.fork_rng``)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})


def _model_device(model: nn.Module) -> torch.device:
    from agent.scoring import model_device
    return model_device(model)


def attach(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> Scope:
    """Attach an EMA bank and scorer to a training job; see :class:`Scope` for the arguments.

    Keyword arguments are those of :class:`Scope` (``run_dir`` is required).
    """
    return Scope(model, optimizer, **kwargs)


attach.__signature__ = inspect.signature(Scope.__init__).replace(  # type: ignore[attr-defined]
    parameters=list(inspect.signature(Scope.__init__).parameters.values())[1:],
    return_annotation="Scope")
