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

Under ``torch.distributed`` with more than one rank the bank is *sharded* by default
(:mod:`emascope.shards`): ``attach`` is then a collective (call it on every rank), every rank
updates its 1/W of the bank from its own weights (DDP replicas or FSDP2 shards; no communication
per step), snapshots are written by every rank (:mod:`emascope.shardfiles`), exports, export
requests and scoring sweeps are collectives at step boundaries every rank reaches together, and
rank 0 alone writes the run directory's other files. ``shard=False`` keeps the former mode: only
rank 0 builds a (whole) bank, scores and writes; other ranks count steps (``scope.bank`` is
``None`` there) and ``attach`` issues no collective, so it may be called on rank 0 only.

Where sweeps run (``scoring=``): ``"background"`` (default) freezes a copy of the bank at each
scoring point and scores it on a worker thread (:mod:`emascope.background`); ``"inline"`` scores in
the step hook (training waits); ``"external"`` only writes the stage snapshot for ``emascope score``
(:mod:`emascope.external`). An inline sweep forks the global random generators
(``torch.random.fork_rng``) and restores them; a background sweep never touches them. Either way
the training job's random stream, the bank and the metrics are the same in every mode.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emascope import features as F
from emascope import runformat as rf
from emascope import shardfiles as SF
from emascope import stage_snapshots as stages
from emascope.background import (
    BackgroundScorer,
    choose_copy_placement,
    device_free_bytes,
    free_after_plan,
    freeze_stage,
    frozen_nbytes,
    host_available_bytes,
    shared_keys,
)
from emascope.bank import EMABank, unwrap_model
from emascope.claims import clear_stage, done_steps, mark_done
from emascope.collectives import all_gather_ints, broadcast_json, cpu_group, explained_barrier
from emascope.config import (
    BankConfig,
    Hooks,
    RunConfig,
    ScoringConfig,
    build_configs,
    check_together,
    settings_of,
)
from emascope.frozenfile import FrozenStore
from emascope.plan import format_bytes, format_plan
from emascope.pretrained import export_pretrained_from_bank, model_config_record, write_model_config
from emascope.requests import RequestPoller
from emascope.rundir import (
    RunWriter,
    check_run_dir,
    host_info,
    new_run_id,
    prepare_run_dir,
    remove_stale_temps,
    run_dir_state,
    undo_start,
)
from emascope.scoring import Scorer, SweepResult, attach_extractor, cuda_devices
from emascope.shards import is_dtensor
from emascope.snapshot import check_export_target, export_checkpoint, load_snapshot, save_snapshot, write_in_exports
from emascope.sweep_ranks import run_sweep_ranks
from emascope.version import __version__

log = logging.getLogger(__name__)

#: Seconds ``attach`` waits at its barrier for every rank when the bank is sharded (gloo groups name
#: the missing ranks after it).
ATTACH_TIMEOUT_S = 120.0


#: Run directories (real paths) written by a Scope of this process that is not closed yet: a second
#: attach to one of them (a notebook cell run again with ``overwrite=True``) is refused, since both
#: Scopes would write the same files.
_OPEN_RUNS: weakref.WeakValueDictionary[str, Scope] = weakref.WeakValueDictionary()
_OPEN_RUNS_LOCK = threading.Lock()


def _run_key(run_dir: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(run_dir))


def check_not_open(run_dir: str | os.PathLike) -> None:
    """``ValueError`` if an open :class:`Scope` of this process writes ``run_dir``."""
    with _OPEN_RUNS_LOCK:
        other = _OPEN_RUNS.get(_run_key(run_dir))
    if other is not None and not other.closed:
        raise ValueError(
            f"run_dir {str(run_dir)!r} is written by a Scope of this process that is still open (run "
            f"{other.run_id}, step {other.current_step}): call its close() first (or use `with attach(...) as "
            "scope:`), or pick another run_dir; two Scopes on one run directory would overwrite each other's files")


def dist_world() -> int:
    """World size of the default process group; before ``init_process_group`` the launcher's
    ``WORLD_SIZE`` environment variable, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_world_size())
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1




def dist_rank() -> int:
    """Rank in the default process group; before ``init_process_group`` the launcher's ``RANK``
    environment variable (torchrun sets it), else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def model_info(model: nn.Module) -> dict[str, Any]:
    """``model`` block of run.json: class name, parameter counts, parameter count per dtype."""
    dtypes: dict[str, int] = {}
    for p in model.parameters():
        key = str(p.dtype).removeprefix("torch.")
        dtypes[key] = dtypes.get(key, 0) + p.numel()
    return {"class": type(model).__name__, "num_params": sum(p.numel() for p in model.parameters()),
            "num_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "dtypes": dtypes}


#: Attributes through which optimizer wrappers expose the optimizer they drive: accelerate's
#: ``AcceleratedOptimizer.optimizer``, Lightning's ``LightningOptimizer._optimizer`` (and
#: ``.optimizer``), DeepSpeed's engine/ZeRO wrappers ``.optimizer``.
OPTIMIZER_WRAPPER_ATTRS = ("optimizer", "_optimizer")


def _has_step_hook(optimizer: Any) -> bool:
    """A torch optimizer whose ``Optimizer.__init__`` ran, so ``register_step_post_hook`` works
    (accelerate's ``AcceleratedOptimizer`` subclasses ``Optimizer`` without running it): tried with
    a hook that is removed at once."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return False
    try:
        optimizer.register_step_post_hook(lambda *args: None).remove()
    except (AttributeError, TypeError, RuntimeError):
        return False
    return True


#: Packages whose optimizer wrappers only delegate ``step`` (and skip it on accumulation or AMP
#: overflow): always unwrapped, even if a future version made them hookable themselves.
DELEGATING_PACKAGES = ("accelerate", "lightning", "pytorch_lightning", "deepspeed")


def unwrap_optimizer(optimizer: Any) -> tuple[torch.optim.Optimizer, list[str]]:
    """The torch optimizer whose step hook drives the bank, and the chain of class names to it.

    A wrapper exposes its inner optimizer as ``.optimizer`` or ``._optimizer`` (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``, DeepSpeed's wrappers). The
    outermost object that is a torch optimizer with a working step hook is used, except that
    wrappers from :data:`DELEGATING_PACKAGES` are always unwrapped: their inner optimizer's
    ``step`` runs exactly once per real optimizer step (accelerate calls it only on
    gradient-synchronising micro-batches and not at all when AMP's GradScaler skips a step).
    A hookable optimizer that wraps another (e.g. a Lookahead that moves the weights after its
    inner step) is hooked itself, so the bank sees the weights after all of its step.
    ``ValueError`` when no torch optimizer with a step hook is found.
    """
    chain, seen, current = [], set(), optimizer
    while id(current) not in seen:
        seen.add(id(current))
        chain.append(type(current).__name__)
        delegating = type(current).__module__.split(".", 1)[0] in DELEGATING_PACKAGES
        if _has_step_hook(current) and not delegating:
            break
        inner = None
        for attr in OPTIMIZER_WRAPPER_ATTRS:
            try:
                candidate = getattr(current, attr, None)
            except Exception:  # noqa: BLE001 - a property of a half-built wrapper
                candidate = None
            if candidate is not None and candidate is not current and not isinstance(candidate, (str, bytes)):
                inner = candidate
                break
        if inner is None:
            break
        current = inner
    if not _has_step_hook(current):
        raise ValueError(
            f"optimizer {' -> '.join(chain)} has no step hook: attach() follows a torch.optim.Optimizer "
            "through register_step_post_hook (wrappers exposing .optimizer or ._optimizer are unwrapped). "
            "Pass the torch optimizer, or optimizer=None and call scope.step() after every optimizer step")
    return current, chain


def check_attachable(model: Any, optimizer: Any, scoring: ScoringConfig,
                     hooks: Hooks) -> torch.optim.Optimizer | None:
    """The checks of :func:`attach` that need torch (the configs check the rest); ``ValueError``
    naming the problem, raised before anything is written. Returns the (unwrapped) optimizer."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = None
    if optimizer is not None:
        inner, chain = unwrap_optimizer(optimizer)
        own = {id(p) for p in unwrap_model(model).parameters()}
        if not any(id(p) in own for group in inner.param_groups for p in group["params"]):
            via = f" ({' -> '.join(chain)})" if len(chain) > 1 else ""
            raise ValueError(
                f"optimizer{via} does not update any parameter of model: pass the optimizer that trains this "
                "model (its steps drive the EMA bank). A wrapper that steps copies of the parameters (fp32 "
                "master weights, DeepSpeed ZeRO partitions) cannot drive it: attach with optimizer=None and call "
                "scope.step() after every optimizer step")
    spec, reference = scoring.feature_extractor, hooks.reference
    if isinstance(reference, F.Features) and spec in (None, "auto"):
        raise ValueError("reference holds precomputed features: pass feature_extractor= naming the "
                         "extractor that produced them ('identity', a torch-fidelity name or a callable)")
    if isinstance(spec, str) and spec not in (None, "auto", "identity", *F.BUILTIN_EXTRACTORS):
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
        if spec not in FEATURE_EXTRACTORS_REGISTRY:
            raise ValueError(f"feature_extractor {spec!r} is not 'auto', 'identity', a built-in extractor "
                             f"({', '.join(F.BUILTIN_EXTRACTORS)}) or a torch-fidelity extractor "
                             f"({sorted(FEATURE_EXTRACTORS_REGISTRY)})")
    if reference is not None and not isinstance(reference, F.Features):
        F.reference_identity(reference, max_items=2)  # validates the type early
        F.check_reference_kind(reference, spec)
    return inner


class Scope:
    """A training job with an EMA bank attached. Build it with :func:`attach`, which takes the
    settings as flat keyword arguments (see :mod:`emascope.config` for each one, its unit and its
    default). Put :meth:`state_dict` in the training checkpoint and call :meth:`load_state_dict`
    after ``attach(..., resume=True)`` to restart exactly at the checkpoint's step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, run: RunConfig,
                 bank: BankConfig | None = None, scoring: ScoringConfig | None = None,
                 hooks: Hooks | None = None) -> None:
        bank, scoring, hooks = bank or BankConfig(), scoring or ScoringConfig(), hooks or Hooks()
        inner = check_attachable(model, optimizer, scoring, hooks)
        check_together(run, scoring)
        self.run_cfg, self.bank_cfg = run, bank
        self._wrapped = model
        self.model, self.optimizer = unwrap_model(model), inner
        self.optimizer_chain = unwrap_optimizer(optimizer)[1] if optimizer is not None else []
        self.rank = dist_rank()
        self.world_size = dist_world()
        self.is_writer = self.rank == 0
        dtensors = any(is_dtensor(p) for p in self.model.parameters())
        initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
        if bank.shard is True and not initialized:
            raise ValueError("shard=True needs torch.distributed's process group: call init_process_group "
                             "before attach()")
        #: every rank holds a shard of the bank (collective attach, sweeps, snapshots, exports)
        self.sharded = dtensors or (initialized and self.world_size > 1 and bank.shard is not False)
        if self.sharded and run.scoring == "external":  # the same verdict on every rank, nothing written
            raise ValueError("scoring='external' is not available with a sharded bank (its stage snapshots "
                             "would be per-rank sets emascope score does not read yet): use scoring='inline' "
                             "or 'background' (both score on every rank at the step), or shard=False")
        if self.sharded and scoring.search_evals > 0:  # same verdict on every rank, nothing written
            raise ValueError("search_evals is not available with a sharded bank (post-hoc synthesis reads "
                             "one-process stage snapshots; a sharded bank writes per-rank files): set "
                             "search_evals=0, or shard=False")
        self._cpu_group = None
        self._hooks, self._scoring = hooks, scoring
        self._extractor: Any = None
        self.run_dir = Path(run.run_dir)
        self._frozen_files: FrozenStore | None = None
        self.bank: EMABank | None = None
        self.writer: RunWriter | None = None
        self.scorer: Scorer | None = None
        self.requests: RequestPoller | None = None
        self.run_id: str | None = None
        self.name = run.name
        self.closed = False
        self.last_scores: SweepResult | None = None
        self._step = 0
        self._last_scored: int | None = None
        self._last_snapshot: int | None = None
        self._bank_ok, self._skipped_seen = True, 0
        self._unaveraged_told: set[str] = set()
        self._housekeeping_at = -float("inf")
        self._hook = None
        self._failed = False
        self._background: BackgroundScorer | None = None
        self.t0 = self.start_time = time.time()
        if self.sharded:
            self._open_sharded(scoring, hooks, inner)
        elif self.is_writer:
            plan = self._prepare_run(scoring, hooks)  # reads and checks only: nothing written yet
            self._start_run(plan)                     # writes; a failure undoes what it wrote
        elif inner is not None:
            self._hook = inner.register_step_post_hook(self._optimizer_hook)

    def _build_bank(self) -> EMABank:
        b = self.bank_cfg
        return EMABank(self._wrapped, b.decays, device=b.device, update_every=b.update_every,
                       bias_correction=b.bias_correction, bema=b.bema or False,
                       average_buffers=b.average_buffers, shard=self.sharded)

    def _open_sharded(self, scoring: ScoringConfig, hooks: Hooks, inner: torch.optim.Optimizer | None) -> None:
        """Every rank: build its shard of the bank and check (rank 0: the run directory, the run being
        resumed, the extractor; every rank: its columns of the snapshot to resume), meet the others
        (a barrier that names missing ranks), and agree; then rank 0 writes and every rank is hooked.
        A failure on any rank raises on every rank, before anything is written."""
        error: BaseException | None = None
        prepared: dict[str, Any] | None = None
        try:
            if self.is_writer:
                prepared = self._prepare_run(scoring, hooks)  # builds the bank, resumes rank 0's shard
            else:
                self.bank = self._build_bank()
                if self.run_cfg.resume:
                    self._resume_bank()
                self._extractor = attach_extractor(scoring, hooks, self.model)
        except Exception as exc:  # noqa: BLE001 - raised below on every rank, after the others know
            error = exc
        plan = self.bank.shard_plan if self.bank is not None else None
        self._cpu_group = cpu_group(plan.group if plan is not None else None)
        try:
            explained_barrier(self._cpu_group, ATTACH_TIMEOUT_S, "attach() with a sharded bank")
        except RuntimeError as exc:
            raise ValueError(f"{exc}; or pass shard=False to keep the whole bank on rank 0 (attach on rank "
                             "0 only)") from exc
        self._agree_or_raise(error, "checking the settings, the run directory and the bank")
        error = None
        if self.is_writer:
            assert prepared is not None
            try:
                self._start_run(prepared)  # hooks rank 0's optimizer
            except BaseException as exc:  # noqa: BLE001 - _start_run undid its writes
                error = exc
        self._agree_or_raise(error, "starting the run")
        if not self.is_writer and inner is not None:
            self._hook = inner.register_step_post_hook(self._optimizer_hook)
        self.run_id = broadcast_json(self.run_id, 0, self._cpu_group)

    def _agree_or_raise(self, error: BaseException | None, what: str) -> None:
        """All ranks learn whether ``what`` worked everywhere; every rank raises if one failed."""
        oks = all_gather_ints([error is None], self._cpu_group)
        failed = [r for r, (ok,) in enumerate(oks) if not ok]
        if error is not None:
            raise error
        if failed:
            raise ValueError(f"attach() failed on rank(s) {failed} while {what} (see their error)")

    def _prepare_run(self, scoring: ScoringConfig, hooks: Hooks) -> dict[str, Any]:
        """Rank 0, before anything is written: build the bank, check the run directory, read the run
        being resumed, build the feature extractor and read the model's config. Raises ``ValueError``
        naming a problem; writes nothing."""
        run = self.run_cfg
        check_not_open(run.run_dir)
        if self.bank is None:
            self.bank = self._build_bank()
        check_run_dir(run.run_dir, overwrite=run.overwrite, resume=run.resume)
        notices: list[str] = []
        resumed_from = self._resume_bank(notices.append) if run.resume else None
        previous = self._previous_run() if run.resume else {}
        extractor = attach_extractor(scoring, hooks, self.model)
        return {"scoring": scoring, "hooks": hooks, "resumed_from": resumed_from, "previous": previous,
                "notices": notices, "extractor": extractor, "model_config": model_config_record(self.model),
                "before": run_dir_state(run.run_dir, overwrite=run.overwrite)}

    def _start_run(self, plan: dict[str, Any]) -> None:
        """Rank 0: prepare the run directory, write run.json (and the model's config), start the
        heartbeat, hook the optimizer. If anything here raises, what it wrote is removed (or, for a
        resumed run, restored), the heartbeat thread is stopped, and the error propagates."""
        run, b, previous = self.run_cfg, self.bank_cfg, plan["previous"]
        try:
            self.run_dir = prepare_run_dir(run.run_dir, overwrite=run.overwrite, resume=run.resume)
            stale = remove_stale_temps(self.run_dir)  # left by a killed writer (kill -9 mid-snapshot)
            self.run_id = str(previous.get("run_id") or new_run_id())
            if isinstance(previous.get("start_time"), (int, float)):
                self.start_time = float(previous["start_time"])
            old = previous.get("metric_directions")
            known = {str(k): v for k, v in old.items() if v in rf.DIRECTIONS} if isinstance(old, dict) else {}
            self.name = run.name or self.run_dir.resolve().name
            self.writer = RunWriter(self.run_dir, step_fn=lambda: self._step,
                                    heartbeat_interval=run.heartbeat_interval)
            self.scorer = Scorer(plan["scoring"], plan["hooks"], self.writer, self.run_dir,
                                 on_info_change=self._write_run_json, known_directions=known,
                                 extractor=plan["extractor"])
            self.settings = settings_of(run, b, plan["scoring"])
            shard = self.bank.shard_plan
            self.settings.update(device=str(self.bank.device), feature_extractor=self.scorer.extractor_label(),
                                 sample_seeding=rf.SAMPLE_SEEDING, placement=self.bank.placement,
                                 world_size=self.world_size, sharding=None if shard is None else shard.kind)
            self._write_run_json(strict=True)
            if plan["model_config"] is not None:
                write_model_config(self.run_dir, plan["model_config"])
            self.writer.event("start", self._step, optimizer=" -> ".join(self.optimizer_chain) or None)
            log.info("emascope: bank placement %r (%s per rank)\n%s", self.bank.placement,
                     format_bytes(self.bank.nbytes), format_plan(self.bank.memory_plan))
            if plan["resumed_from"] is not None:
                self.writer.event("resume", self._step, snapshot_step=plan["resumed_from"])
            for message in plan["notices"]:
                self.writer.event("notice", self._step, where="resume", message=message)
            if stale:
                self.writer.event("notice", self._step, where="start", removed=[p for p, _ in stale],
                                  message=f"removed {len(stale)} stale temp file(s) of "
                                          f"{sum(n for _, n in stale)} bytes left by a writer that was killed")
            self.requests = RequestPoller(self.run_dir, self._export_for_request, resolve_variant=self.bank.resolve,
                                          on_result=self._export_event, on_notice=self._requests_notice,
                                          synthesize=None if self.sharded else self._synthesize_for_request)
            if self.sharded and run.scoring == "background":
                self.writer.event("notice", self._step, where="background", message=(
                    "a sharded bank is scored on every rank at its scoring steps (training waits for each "
                    "sweep): background scoring applies to one-process banks"))
            if self.sharded and run.stage_snapshots != 0:
                self.writer.event("notice", self._step, where="snapshot", message=(
                    "stage snapshots for post-hoc synthesis are not written for a sharded bank (synthesis "
                    "reads one-process snapshots): synthesised exports of this run are refused"))
            if run.scoring == "background" and not self.sharded:
                search = self.scorer is not None and self.scorer.cfg.search_evals > 0
                self._background = BackgroundScorer(self.scorer, self.writer, self.run_dir, policy=run.score_busy,
                                                    stall_timeout=run.score_timeout, on_result=self._on_result,
                                                    after=self._search_between if search else None)
            if self.optimizer is not None:
                self._hook = self.optimizer.register_step_post_hook(self._optimizer_hook)
            self.writer.start_heartbeat()
            self._note_stage_snapshot_cost()
            with _OPEN_RUNS_LOCK:
                _OPEN_RUNS[_run_key(self.run_dir)] = self
        except BaseException:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            if self.writer is not None:
                self.writer.stop_heartbeat(final=False)
            undo_start(run.run_dir, plan["before"])
            self.closed = True
            raise

    # ------------------------------------------------------------------ public API

    @property
    def current_step(self) -> int:
        """Optimizer steps seen since attach."""
        return self._step

    @property
    def metric_directions(self) -> dict[str, str | None]:
        """Direction of every metric seen so far (``None``: not declared, never ranked)."""
        return dict(self.scorer.metric_directions) if self.scorer is not None else {}

    @property
    def sample_kind(self) -> str | None:
        return self.scorer.sample_kind if self.scorer is not None else None

    def step(self) -> None:
        """Advance the agent by one optimizer step (only when attached without an optimizer)."""
        if self._hook is not None:
            raise RuntimeError("this Scope follows the optimizer through a step hook; do not call step() too")
        self._after_step()

    def score_now(self, *, wait: bool = True) -> SweepResult | None:
        """Score every variant at the current step now (rank 0; ``None`` elsewhere or if closed).

        Inline: returns the sweep's result. Background: the stage is frozen and queued (never
        skipped); with ``wait=True`` (default) this waits for it and returns its result (``None`` if
        it did not finish). External: writes the stage snapshot for ``emascope score``; ``None``.
        Sharded bank: a sweep on every rank (a collective: call it on every rank at the same step).
        """
        if self.closed or not (self.is_writer or self.sharded):
            return None
        return self._score(force=True, wait=wait)

    def wait(self, timeout: float | None = None) -> SweepResult | None:
        """Wait until no background sweep runs or waits (up to ``timeout`` s; hung sweeps are
        abandoned after ``score_timeout``) and return :attr:`last_scores`. Immediate when inline."""
        if self._background is not None:
            self._background.wait(timeout)
        return self.last_scores

    def export(self, variant: str | float, path: str | os.PathLike | None = None, *,
               dtype: str | torch.dtype | None = None, format: str = "safetensors") -> Path | None:
        """Write ``variant`` as a checkpoint; returns its path (``None`` off rank 0).

        ``format="safetensors"`` (default): one ``.safetensors`` state dict, default path
        ``RUN_DIR/exports/ema-<variant>-step<step>.safetensors``. ``"transformers"`` /
        ``"diffusers"`` (a model whose config was recorded at attach): a folder that the library's
        ``from_pretrained`` loads, default ``RUN_DIR/exports/ema-<variant>-step<step>/`` (a peft
        ``PeftModel``: the merged model); ``"peft"``: the adapter folder (``...-adapter/``) that
        ``PeftModel.from_pretrained(base, folder)`` loads.
        ``dtype``: ``None`` (the model's dtypes) or ``"float32"``/``torch.float32``. Sharded bank: a
        collective (call it on every rank); the entries stream to rank 0 one at a time and rank 0
        writes.
        """
        if not self.is_writer and not self.sharded:
            return None
        if format not in rf.EXPORT_FORMATS:
            raise ValueError(f"format must be one of {rf.EXPORT_FORMATS}, got {format!r}")
        if self.sharded and format != "safetensors":  # raised on every rank, before any collective
            raise ValueError(f"format={format!r} exports of a sharded bank are written offline: "
                             f"`emascope export RUN_DIR --variant V --format {format}` reads the sharded snapshot")
        variant = self.bank.resolve(variant)
        refused: ValueError | None = None
        if self.is_writer:
            try:
                if path is None:
                    rf.run_subdir(self.run_dir, rf.EXPORTS)  # ValueError: a symlinked exports/
                else:  # never a file of the run itself
                    path = check_export_target(self.run_dir, path, folder=format != "safetensors")
            except ValueError as exc:
                refused = exc
        if self.sharded:  # every rank learns rank 0's verdict on the path before the collective export
            message = broadcast_json(None if refused is None else str(refused), 0, self._cpu_group)
            if refused is None and message is not None:
                raise ValueError(f"export refused on rank 0: {message}")
        if refused is not None:
            raise refused
        if not self.is_writer:  # a sharded bank's other ranks send their pieces to rank 0
            self._export(variant, None, dtype)
            return None
        name = rf.default_export_name(variant, self._step)
        if format == "safetensors":
            if path is not None:
                out = self._export(variant, Path(path), dtype)
            else:  # through exports/ as opened at its check: a symlink swapped in is not written through
                out = write_in_exports(self.run_dir, Path(rf.export_file(name)).name,
                                       lambda p: self._export(variant, p, dtype))
        else:
            record = model_config_record(self.model)
            if record is None:
                raise ValueError(f"format={format!r} needs a transformers or diffusers model; "
                                 f"{type(self.model).__name__} is neither (use format='safetensors')")
            self._check_export(variant, dtype)
            out = export_pretrained_from_bank(self.bank, variant, record,
                                              path or self.run_dir / rf.export_dir(name, format),
                                              fmt=format, dtype=None if dtype is None else "float32",
                                              run_id=str(self.run_id), model=self.model)
        assert out is not None
        try:  # relative to the run directory when inside it, as in export requests
            shown = out.resolve().relative_to(self.run_dir.resolve()).as_posix()
        except ValueError:
            shown = str(out.resolve())
        nbytes = sum(f.stat().st_size for f in out.iterdir()) if out.is_dir() else out.stat().st_size
        self.writer.event("export", self._step, request_id=None, variant=variant, path=shown,
                          bytes=nbytes, ok=True, error=None, format=format)
        return out

    def notice(self, where: str, message: str) -> None:
        """Say something the user should know on the console (a ``logging`` warning) and, on rank 0,
        in the run (a ``notice`` event with ``where`` and ``message``). Used by the integrations."""
        log.warning("emascope: %s", message)
        if self.writer is not None and not self.closed:
            self.writer.event("notice", self._step, where=where, message=message)

    def state_dict(self) -> dict[str, Any]:
        """The agent's state for the training checkpoint: ``{"format", "step", "bank"}`` (``bank`` is
        ``EMABank.state_dict()``, copies; ``None`` off rank 0). Saves and loads with ``torch.save`` /
        ``torch.load(weights_only=True)``. Sharded bank: each rank's own shard (no communication);
        save it from every rank, like a sharded model checkpoint, and load it at the same world size
        (``attach(..., resume=True)`` re-shards from the run's snapshot at another world size).

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
            gone = stages.drop_after(self.run_dir, step)
            if gone:  # taken on a trajectory the restart abandons: synthesis must not mix them in
                self.writer.event("snapshot_pruned", step, paths=gone)

    def close(self, *, score: bool | None = None, wait: bool = True) -> None:
        """Final score (if due), final snapshot, wait for background sweeps, ``close`` event,
        heartbeat ``closed``. Idempotent.

        ``score``: run the final sweep (default ``score_at_close``). ``wait``: wait for the running
        and queued background sweeps (up to ``close_timeout``); ``False`` abandons them at once
        (recorded; finished sweeps are written already). The context manager passes
        ``score=False, wait=False`` when the training loop raised, so a crash or Ctrl-C does not
        wait for a sweep; a Ctrl-C while close() waits stops the waiting the same way, then raises.
        """
        if self.closed:
            return
        self.closed = True
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if not self.is_writer and not self.sharded:
            return
        try:
            if self.sharded and self._failed:
                pass  # the training loop raised here: other ranks may be gone; no collective
            else:
                if self.is_writer:
                    self._check_skipped()
                final = self.run_cfg.score_at_close if score is None else bool(score)
                wanted = self._scoring_active() or self.run_cfg.scoring == "external"
                if final and self._last_scored != self._step and wanted:
                    self._score(force=True, wait=False)
                if self._last_snapshot != self._step:
                    self._snapshot()
                self._serve_requests(final=True)  # what still waits is refused
                if self.requests is not None:
                    self.requests.join()  # synthesised exports still being written
        except Exception as exc:  # noqa: BLE001
            if self.writer is not None:
                self.writer.error("close", self._step, exc)
        interrupted = None
        if self._background is not None:
            try:  # finished sweeps are already written; this waits for the running and queued ones
                self._background.close(self.run_cfg.close_timeout if wait else 0.0)
            except KeyboardInterrupt as exc:
                interrupted = exc
                self._background.close(0.0)
            except Exception as exc:  # noqa: BLE001
                self.writer.error("close", self._step, exc)
        if self.bank is not None:
            with contextlib.suppress(Exception):
                self.bank.close()  # the host placement's worker thread
        if self.writer is not None:
            self.writer.event("close", self._step, seconds_alive=time.time() - self.t0)
            self.writer.stop_heartbeat()
        with _OPEN_RUNS_LOCK:
            if _OPEN_RUNS.get(_run_key(self.run_dir)) is self:
                del _OPEN_RUNS[_run_key(self.run_dir)]
        if interrupted is not None:
            raise interrupted

    def __enter__(self) -> Scope:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.abort(exc)
        else:
            self.close()

    def abort(self, exc: BaseException) -> None:
        """Close after the training job failed with ``exc``: an ``error`` event (``where:
        "training"``), then :meth:`close` without the final sweep and without waiting for running
        background sweeps (the bank is still snapshotted, except a sharded one: the other ranks may be
        gone, so nothing collective runs). What the context manager and the Lightning / HF callbacks
        do on an exception."""
        if not self.closed:
            self._failed = True
            if self.writer is not None:
                self.writer.error("training", self._step, exc, tell=False)
        self.close(score=False, wait=False)

    # ------------------------------------------------------------------ per step

    def _optimizer_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._after_step()

    def _after_step(self) -> None:
        if self.closed:
            return
        self._step += 1
        if not self.is_writer and not self.sharded:
            return
        try:
            self._update_bank()
            step, run = self._step, self.run_cfg
            if run.stage_snapshots != 0 and self._bank_ok and not self.sharded:
                stage = stages.next_stage_for_lead_in(step, run.score_every, run.stage_lead_in, self.bank.update_every)
                if stage is not None:
                    self._lead_in_snapshot(stage)
            if run.snapshot_interval and step % run.snapshot_interval == 0:
                self._snapshot()
                if self.sharded:
                    self._serve_requests()  # at a step every rank reaches: export requests are collectives
            if run.score_every and step % run.score_every == 0:
                self._score()
            now = time.monotonic()
            if self.is_writer and now - self._housekeeping_at >= run.request_interval:
                # at most about once a second: reading the skip counter syncs a GPU bank
                self._housekeeping_at = now
                self._check_skipped()
                self._check_unfrozen()
                if not self.sharded:
                    self.requests.poll(step)
                if self._background is not None:
                    self._background.check()  # abandons a sweep without progress for score_timeout s
        except Exception as exc:  # noqa: BLE001 - never into optimizer.step
            if self.writer is not None:
                self.writer.error("agent", self._step, exc)

    def _update_bank(self) -> None:
        if not self._bank_ok:
            return
        try:
            self.bank.update()
        except Exception as exc:  # noqa: BLE001
            self._bank_failed(exc)

    def _bank_failed(self, exc: BaseException) -> None:
        """The bank raised (its update, or the host placement's worker): stop using it."""
        self._bank_ok = False
        if self.writer is not None:
            self.writer.error("bank", self._step, exc)
            self._bank_disabled_event()

    def _bank_disabled_event(self, ranks: list[int] | None = None) -> None:
        where = "" if ranks is None else f" on rank(s) {ranks}"
        self.writer.event("bank_disabled", self._step,
                          message=f"bank.update() raised{where}; EMA updates stopped, only 'raw' is scored")

    def _agree_bank_ok(self) -> bool:
        """Sharded banks: every rank learns whether every shard is still updating (a tiny all-gather
        at snapshot/score steps, never per update); a failure on any rank disables the bank everywhere."""
        if not self.sharded:
            return self._bank_ok
        oks = all_gather_ints([int(self._bank_ok)], self._cpu_group)
        failed = [r for r, (ok,) in enumerate(oks) if not ok]
        if failed and self._bank_ok:
            self._bank_ok = False
            if self.writer is not None:
                self._bank_disabled_event(failed)
        return self._bank_ok

    def _scoring_active(self) -> bool:
        return self.scorer.active if self.scorer is not None else bool(
            self._hooks.sampler is not None or self._hooks.evaluate is not None)

    def _check_skipped(self) -> None:
        """Write a ``nonfinite_skip`` event if the bank skipped updates since the last check."""
        if not self._bank_ok:
            return
        try:
            skipped = int(self.bank.num_skipped)
        except Exception as exc:  # noqa: BLE001 - the host placement's worker failed
            self._bank_failed(exc)
            return
        if skipped != self._skipped_seen:
            self._skipped_seen = skipped
            self.writer.event("nonfinite_skip", self._step, count=skipped)

    def _check_unfrozen(self) -> None:
        """Say once (``notice``, ``where: "bank"``) which parameters frozen at attach are trainable now:
        the bank does not average them (its layout is fixed at attach)."""
        if not self._bank_ok:
            return
        new = [k for k in self.bank.unaveraged_trainable() if k not in self._unaveraged_told]
        if not new:
            return
        self._unaveraged_told.update(new)
        shown = ", ".join(new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
        message = (f"{len(new)} parameter(s) frozen at attach are trainable now ({shown}): the bank does not "
                   "average them, every variant holds their live values; attach after unfreezing to average them")
        log.warning("emascope: %s", message)
        self.writer.event("notice", self._step, where="bank", entries=new, message=message)

    def _score(self, *, force: bool = False, wait: bool = False) -> SweepResult | None:
        """A scoring point: score inline, freeze for the background worker, or write the stage
        snapshot for an external scorer (``scoring=``). ``force``: never skipped by ``score_busy``.
        Sharded bank: a sweep on every rank, at the step (whatever ``scoring`` says)."""
        if self.sharded:
            return self._score_sharded()
        self._last_scored = self._step
        mode = self.run_cfg.scoring
        if mode != "external":  # (an external scorer's stage snapshot is written by _write_stage)
            self.write_stage_snapshot()  # for post-hoc synthesis (stage_snapshots=, docs/synthesis.md)
        if mode == "external":
            self._write_stage()
            return None
        if mode == "background" and self._background is not None:
            try:
                return self._score_background(force=force, wait=wait)
            except Exception as exc:  # noqa: BLE001 - e.g. the model cannot be deep-copied
                self.writer.error("background", self._step, exc)
                self.writer.event("notice", self._step, where="background", message="background scoring is "
                                  f"unavailable ({type(exc).__name__}: {exc}); scoring inline from now on")
                self._background = None
        return self._score_inline()

    def _score_inline(self) -> SweepResult:
        step = self._step
        variants = list(self.bank.variants) if self._bank_ok else [rf.RAW]
        self.last_scores = res = self.scorer.sweep(self.model, self.bank if self._bank_ok else None, variants, step)
        self.writer._guard("done marker", lambda: mark_done(self.run_dir, step, rf.done_record(
            step=step, scorer=rf.SCORER_INLINE, seconds=res.seconds, records=sum(map(len, res.scores.values())),
            time=time.time())))
        if self.scorer.cfg.search_evals > 0:
            self._search_between(res)
        return res

    def _score_background(self, *, force: bool, wait: bool) -> SweepResult | None:
        """Freeze the stage in this (training) thread and hand it to the worker."""
        bg, step = self._background, self._step
        assert bg is not None
        if not force and not bg.accepts():
            self.writer.event("score_skipped", step, reason="busy", policy=bg.policy, scorer=rf.SCORER_BACKGROUND)
            return None
        t = time.perf_counter()
        waited = bg.wait_for_slot() if bg.policy == "wait" else 0.0
        with torch.random.fork_rng(devices=cuda_devices(self.model)):
            self.scorer.prepare(self.model, step)  # extractor + reference data: may draw random numbers
        bank = self.bank if self._bank_ok else None
        share = self.run_cfg.score_share_frozen and bank is not None
        twin = bg.model_copy(self.model, shared_keys(bank, self.model) if share else frozenset())
        placement = "device"
        if bank is not None:
            auto = self.run_cfg.score_copy == "auto"
            free_d, free_h = free_after_plan(
                getattr(bank, "memory_plan", None), bank.placement,
                device_now=device_free_bytes(bank.device) if auto else None,
                host_now=host_available_bytes() if auto and bank.device.type != "cpu" else None)
            placement = choose_copy_placement(frozen_nbytes(bank, share_frozen=share), bank.device,
                                              requested=self.run_cfg.score_copy,
                                              free_device=free_d, free_host=free_h)
        frozen = freeze_stage(bank, self.model, step, placement=placement, run_dir=self.run_dir, share_frozen=share,
                              run_id=str(self.run_id), frozen_files=self._frozen())
        blocked = time.perf_counter() - t
        self.writer.event("stage_pending", step, mode=rf.SCORER_BACKGROUND, copy=placement,
                          bytes=int(frozen.nbytes), blocked_seconds=blocked, freeze_seconds=frozen.blocked,
                          waited_seconds=waited)
        bg.submit(frozen, twin, force_queue=force)
        if not wait:
            return None
        bg.wait()
        return self.last_scores if self.last_scores is not None and self.last_scores.step == step else None

    def _on_result(self, result: SweepResult) -> None:
        """Called by the background worker with each finished sweep."""
        self.last_scores = result

    def _write_stage(self) -> None:
        """External scoring: write the stage snapshot (``banks/step_<step>.safetensors``) and a
        ``stage_pending`` event; an external scorer scores it and writes its done marker."""
        step = self._step
        if not self._bank_ok:
            self.writer.event("score_skipped", step, reason="bank_disabled", scorer=rf.SCORER_EXTERNAL)
            return
        t = time.perf_counter()
        rel = rf.stage_snapshot_file(step)
        try:
            clear_stage(self.run_dir, step)  # a stage written again (restart from an older checkpoint)
            nbytes = save_snapshot(self.bank, self.run_dir / rel,
                                   metadata={"run_id": str(self.run_id), "step": str(step)}, frozen=self._frozen())
        except Exception as exc:  # noqa: BLE001 (OSError: full disk, ...)
            self.writer.error("snapshot", step, exc)
            return
        self.writer.event("stage_pending", step, mode=rf.SCORER_EXTERNAL, copy="disk", path=rel,
                          bytes=int(nbytes), blocked_seconds=time.perf_counter() - t)
        if self.run_cfg.stage_snapshots != 0:
            upcoming = (step // self.run_cfg.score_every + 1) * self.run_cfg.score_every \
                if self.run_cfg.score_every else None
            try:
                self._retain_stages((), upcoming)
            except Exception as exc:  # noqa: BLE001 - never into training
                self.writer.error("snapshot", step, exc)

    def _frozen(self) -> FrozenStore | None:
        """The run's frozen side-file store (``banks/frozen-*.safetensors``: the frozen parameters
        written once, not in every snapshot); ``None`` for a sharded bank (rank files keep them inline)."""
        if self.sharded:
            return None
        folder = self.run_dir / rf.BANKS
        if self._frozen_files is None or self._frozen_files.folder != folder:
            self._frozen_files = FrozenStore(folder)
        return self._frozen_files

    # ------------------------------------------------------------------ post-hoc synthesis

    def write_stage_snapshot(self, protected: tuple[int, ...] = ()) -> str | None:
        """Write the stage snapshot of the current step (``banks/step_<step>.safetensors``) and apply
        the retention policy (``stage_snapshots``; ``protected`` steps are never deleted). Called at
        every scoring stage; returns the relative path, ``None`` when off or on failure (an ``error``
        event, ``where: "snapshot"``). See :mod:`emascope.stage_snapshots`."""
        run = self.run_cfg
        if run.stage_snapshots == 0 or not self._bank_ok or not self.is_writer or self.sharded:
            return None
        t = time.perf_counter()
        try:
            rel, nbytes = stages.write_stage_snapshot(self.bank, self.run_dir, self._step, run_id=str(self.run_id),
                                                      dtype=run.stage_snapshot_dtype, frozen=self._frozen())
        except Exception as exc:  # noqa: BLE001 (full disk, ...)
            self.writer.error("snapshot", self._step, exc)
            return None
        self.writer.event("stage_snapshot", self._step, path=rel, bytes=int(nbytes), seconds=time.perf_counter() - t,
                          role=rf.ROLE_STAGE)
        upcoming = None
        if run.score_every:
            upcoming = (self._step // run.score_every + 1) * run.score_every
        self._retain_stages(protected, upcoming)
        return rel

    def _retain_stages(self, protected: tuple[int, ...] = (), upcoming: int | None = None) -> None:
        """Apply the stage snapshot retention policy, never deleting a stage snapshot still in use:
        one an external scorer has not scored yet (no done marker), or one the background worker
        reads (a ``"disk"`` copy, running or queued)."""
        run = self.run_cfg
        keep = set(protected)
        if run.scoring == "external":
            done = done_steps(self.run_dir)
            keep |= {s for s in stages.stage_steps(self.run_dir) if s not in done}
        if self._background is not None:
            keep |= self._background.steps_in_use()
        gone = stages.retain(self.run_dir, run.stage_snapshots, protected=tuple(sorted(keep)), upcoming=upcoming)
        if gone:
            self.writer.event("snapshot_pruned", self._step, paths=gone)

    def _lead_in_snapshot(self, stage: int) -> None:
        run = self.run_cfg
        t = time.perf_counter()
        try:
            out = stages.write_lead_in_snapshot(self.bank, self.run_dir, self._step, stage, lead_in=run.stage_lead_in,
                                                run_id=str(self.run_id), dtype=run.stage_snapshot_dtype,
                                                frozen=self._frozen())
        except Exception as exc:  # noqa: BLE001
            self.writer.error("snapshot", self._step, exc)
            return
        if out is not None:
            self.writer.event("stage_snapshot", self._step, path=out[0], bytes=int(out[1]),
                              seconds=time.perf_counter() - t, role=rf.ROLE_LEAD_IN, stage=stage)

    def _note_stage_snapshot_cost(self) -> None:
        """Print and record (a ``stage_snapshot_plan`` event) their disk cost, when a
        schedule of stages is set (``score_every``; without one only close / ``score_now`` make stages)."""
        run = self.run_cfg
        if run.stage_snapshots == 0 or not run.score_every or self.sharded:
            return
        cost = stages.disk_cost(self.bank, keep=run.stage_snapshots, lead_in=run.stage_lead_in,
                                dtype=run.stage_snapshot_dtype)
        text = stages.describe_cost(cost)
        print(f"emascope: {text} (stage_snapshots=, stage_lead_in=, stage_snapshot_dtype= set this)",
              file=sys.stderr)
        self.writer.event("stage_snapshot_plan", self._step, message=text, keep=run.stage_snapshots,
                          lead_in=list(run.stage_lead_in), **cost)

    def _synthesize_for_request(self, request: rf.ExportRequest, path: Path) -> tuple[int, dict[str, Any]]:
        """Write a synthesised export for a request (runs in a worker thread: reads files only)."""
        from emascope.posthoc import export_synthesized

        out, report = export_synthesized(self.run_dir, path, decay=request.decay, sigma_rel=request.sigma_rel,
                                         dtype=request.dtype, force=request.force)
        return out.stat().st_size, report.as_json()

    def _search_between(self, result: SweepResult, model: nn.Module | None = None,
                        tick: Callable[[], None] | None = None) -> None:
        """Score synthesised decays between the grid's around the best one (``search_evals``), at
        the sweep's stage. Inline: on the training model, in the training thread. Background: from
        the worker, on its eval copy ``model``, ticking the job's progress (``tick``)."""
        if not self._bank_ok:
            return
        try:
            self._run_search(result, model, tick)
        except Exception as exc:  # noqa: BLE001 - never into training
            self.writer.error("search", result.step, exc)

    def _run_search(self, result: SweepResult, model: nn.Module | None, tick: Callable[[], None] | None) -> None:
        from emascope.posthoc import search_after_sweep

        inline = model is None
        search_after_sweep(self.run_dir, self.scorer, self.model if inline else model, result,
                           scorer_name=rf.SCORER_INLINE if inline else rf.SCORER_BACKGROUND, isolate_rng=inline,
                           writer=self.writer, on_progress=tick)

    def _score_sharded(self) -> SweepResult | None:
        """A sweep on every rank (:mod:`emascope.sweep_ranks`): each draws its share of the batches,
        rank 0 gathers the features, computes the metrics and writes."""
        self._last_scored = step = self._step
        ok = self._agree_bank_ok()
        variants = list(self.bank.variants) if ok else [rf.RAW]
        hooks, cfg = self._hooks, self._scoring
        with torch.random.fork_rng(devices=cuda_devices(self.model)):
            reference, info = None, None
            if self.is_writer:
                reference = self.scorer.reference_for(self.model, step)
                info = ({"image_range": self.scorer.cfg.image_range}
                        if reference is not None and self.scorer.extractor is not None else None)
            info = broadcast_json(info, 0, self._cpu_group)
            extractor, extractor_error = self._rank_extractor(info)
            result = run_sweep_ranks(
                model=self.model, bank=self.bank if ok else None, variants=variants, step=step,
                writer=self.writer, cfg=self.scorer.cfg if self.scorer is not None else cfg,
                sampler=hooks.sampler, extractor=extractor, reference=reference, evaluate=hooks.evaluate,
                sample_metrics=hooks.sample_metrics, fd_name=self.scorer.fd_name() if self.scorer else "fd",
                group=self._cpu_group, collective_sampler=any(is_dtensor(p) for p in self.model.parameters()),
                extractor_error=extractor_error,
                prior_errors=self.scorer.reference_errors if self.scorer is not None else 0,
                directions=self.scorer.directions() if self.scorer is not None else None)
        if self.is_writer and result is not None:
            self.scorer.reference_errors = 0
            self.scorer.note(result, reference, step)
            self.last_scores = res = result
            self.writer._guard("done marker", lambda: mark_done(self.run_dir, step, rf.done_record(
                step=step, scorer=rf.SCORER_INLINE, seconds=res.seconds, records=sum(map(len, res.scores.values())),
                time=time.time())))
        return result

    def _rank_extractor(self, info: dict[str, Any] | None) -> tuple[Any, BaseException | None]:
        """The extractor of this rank this sweep: rank 0's own; the others' were built at attach
        the same way (``attach_extractor``) and take the image range rank 0 set from the reference
        (``info``; ``None``: no features this sweep)."""
        if info is None:
            return None, None
        if self.is_writer:
            return self.scorer.extractor, None
        if self._extractor is None:
            return None, RuntimeError("this rank has no feature extractor (no sampler or reference given to it)")
        if hasattr(self._extractor, "image_range"):
            self._extractor.image_range = info["image_range"]
        return self._extractor, None

    # ------------------------------------------------------------------ snapshots and exports

    def _snapshot(self) -> None:
        if not self._agree_bank_ok():
            return
        t = time.perf_counter()
        rel = rf.SNAPSHOT_INDEX if self.sharded else rf.SNAPSHOT
        if self.sharded:  # every rank marks it attempted: close() must not retry on some ranks only
            self._last_snapshot = self._step
        try:
            if self.sharded:
                step = self._step
                nbytes = SF.save_sharded_snapshot(self.bank, self.run_dir, rf.SNAPSHOT_INDEX,
                                                  lambda r, w: rf.snapshot_shard_file(step, r, w), step=step,
                                                  run_id=str(self.run_id), group=self._cpu_group)
            else:
                nbytes = save_snapshot(self.bank, self.run_dir / rf.SNAPSHOT,
                                       metadata={"run_id": self.run_id, "step": str(self._step)},
                                       frozen=self._frozen())
        except Exception as exc:  # noqa: BLE001 (OSError: full disk, a rank that failed, ...)
            if self.writer is not None:
                self.writer.error("snapshot", self._step, exc)
            return
        self._last_snapshot = self._step
        if self.writer is not None:
            SF.prune_latest(self.run_dir, self.run_dir / rel)  # the other kind, and earlier rank files
            extra = {"world_size": self.world_size} if self.sharded else {}
            self.writer.event("snapshot", self._step, path=rel, bytes=int(nbytes),
                              seconds=time.perf_counter() - t, **extra)

    def _check_export(self, variant: str, dtype: str | torch.dtype | None) -> None:
        if dtype not in (None, "float32", torch.float32):
            raise ValueError(f"dtype must be None or 'float32', got {dtype!r}")
        if variant != rf.RAW and not self._bank_ok:
            raise RuntimeError("the bank is disabled after an update error; only 'raw' can be exported")

    def _export(self, variant: str, path: Path | None, dtype: str | torch.dtype | None) -> Path | None:
        """Write the export (rank 0; a sharded bank's other ranks send their pieces, ``path`` None)."""
        self._check_export(variant, dtype)
        return export_checkpoint(self.bank, variant, path, dtype=dtype, run_id=str(self.run_id))

    def _export_for_request(self, variant: str, path: Path, dtype: str | None) -> int:
        if self.sharded:  # the other ranks wait in _serve_requests for this job
            self._check_export(variant, dtype)
            broadcast_json({"variant": variant, "dtype": dtype}, 0, self._cpu_group)
        out = self._export(variant, path, dtype)
        assert out is not None
        return out.stat().st_size

    def _serve_requests(self, final: bool = False) -> None:
        """Fulfil pending export requests (``final``: at close, refuse what still waits). Sharded
        bank: at a step every rank reaches, rank 0 polls and announces each export (a small JSON
        broadcast); the others join it; ``None`` ends."""
        if not self.sharded:
            if self.requests is not None:
                self.requests.poll(self._step, final=final)
            return
        if self.is_writer:
            try:
                self.requests.poll(self._step, final=final)
            finally:
                broadcast_json(None, 0, self._cpu_group)
            return
        while (job := broadcast_json(None, 0, self._cpu_group)) is not None:
            with contextlib.suppress(Exception):
                self._export(job["variant"], None, job["dtype"])

    def _requests_notice(self, message: str) -> None:
        self.writer.event("notice", self._step, where=rf.REQUESTS, message=message)

    def _export_event(self, record: dict[str, Any]) -> None:
        self.writer.event("export", self._step, request_id=record.get("id"), variant=record.get("variant"),
                          path=record.get("path"), bytes=record.get("bytes"),
                          ok=record.get("state") == "done", error=record.get("error"))

    # ------------------------------------------------------------------ run.json and resume

    def _resume_bank(self, notice: Callable[[str], None] | None = None) -> int | None:
        """Load the run's latest snapshot (``banks/latest.safetensors`` or a sharded set's
        ``banks/latest.index.json``) into the new bank and continue its step count. Each rank reads
        the columns it holds: bit-exact at the same world size, re-sharded at another. A one-process
        bank resuming from ``latest.safetensors`` reads it whole and verifies its checksum; a rank
        resuming at the same world size verifies its own rank file's checksum.

        Returns the snapshot's step, or ``None`` when the run has no snapshot yet (the bank then
        starts from the current weights at step 0). Raises ``ValueError`` if the snapshot belongs
        to another model or other bank settings, or is malformed or corrupt (checksum). ``notice``
        receives a message when the snapshot predates checksums (loaded unverified).
        """
        path = SF.latest_snapshot(Path(self.run_cfg.run_dir))
        if path is None:
            return None
        try:
            if self.bank.sharded or path.name.endswith(".json"):
                SF.load_bank_state(self.bank, path)
            else:
                self.bank.load_state_dict(load_snapshot(path, notice=notice).state_dict())
        except (ValueError, OSError) as exc:
            raise ValueError(f"resume=True: cannot continue the bank snapshot {str(path)!r}: {exc}") from exc
        self._step = int(self.bank.step)
        self._skipped_seen = int(self.bank.num_skipped)
        return self._step

    def _previous_run(self) -> dict[str, Any]:
        """The run.json of the run being resumed (``{}`` if missing, unreadable, not a regular file
        or larger than :data:`~emascope.runformat.MAX_RUN_JSON_BYTES`: never an unbounded read)."""
        path = self.run_dir / rf.RUN_JSON
        try:
            if not path.is_file():
                return {}
            with open(path, "rb") as f:
                data = f.read(rf.MAX_RUN_JSON_BYTES + 1)
            if len(data) > rf.MAX_RUN_JSON_BYTES:
                return {}
            info = json.loads(data.decode("utf-8"))
        except Exception:  # noqa: BLE001 - RecursionError, bad JSON, OSError: start a fresh record
            return {}
        return info if isinstance(info, dict) else {}

    def _write_run_json(self, strict: bool = False) -> None:
        """Replace run.json; ``strict`` (at attach): raise a write error instead of logging it."""
        directions = {k: v for k, v in self.scorer.metric_directions.items() if v in rf.DIRECTIONS}
        self.writer.write_run_json(strict=strict, info={
            "run_id": self.run_id, "name": self.name, "start_time": self.start_time, **host_info(),
            "emascope_version": __version__, "decays": [float(d) for d in self.bank.decays],
            "variants": list(self.bank.variants), "model": model_info(self.model),
            "settings": self.settings, "metric_directions": directions, "sample_kind": self.scorer.sample_kind,
            "memory_plan": {**self.bank.memory_plan.as_json(), "placement": self.bank.placement,
                            "bank_bytes_rank0": self.bank.nbytes},
        })


def attach(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> Scope:
    """Attach an EMA bank and scorer to a training job; returns the :class:`Scope`.

    ``model``: the training model (DDP / DataParallel / ``torch.compile`` wrappers are unwrapped).
    ``optimizer``: its optimizer; the bank updates from its step hook (``None``: call
    ``scope.step()`` after every optimizer step). Keyword arguments are flat (``run_dir`` is
    required) and each belongs to one config of :mod:`emascope.config`, where its unit and default
    are documented: :class:`~emascope.config.RunConfig` (run_dir, name, overwrite, resume,
    score_every, score_at_close, snapshot_every, heartbeat_interval, request_interval),
    :class:`~emascope.config.BankConfig` (decays, device, update_every, bias_correction, bema,
    average_buffers, shard), :class:`~emascope.config.ScoringConfig` (num_samples, batch_size, seed,
    preview, feature_extractor, ...) and :class:`~emascope.config.Hooks` (sampler, reference,
    evaluate, sample_metrics, metric_directions). Every value is checked before anything is
    written: a bad one is a ``ValueError`` naming it, an unknown argument a ``TypeError``.
    """
    run, bank, scoring, hooks = build_configs(kwargs)
    return Scope(model, optimizer, run=run, bank=bank, scoring=scoring, hooks=hooks)


def _attach_signature() -> inspect.Signature:
    """attach's signature as introspection shows it: model, optimizer, then every config field."""
    from emascope.config import describe_arguments

    params = [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("optimizer", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
    for name, _, default in describe_arguments():
        kw = {} if default == "required" else {"default": default}
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, **kw))
    return inspect.Signature(params, return_annotation="Scope")


attach.__signature__ = _attach_signature()  # type: ignore[attr-defined]
