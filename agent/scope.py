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
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emascope import features as F
from emascope import runformat as rf
from emascope import stage_snapshots as stages
from emascope.bank import EMABank, unwrap_model
from emascope.config import (
    BankConfig,
    Hooks,
    RunConfig,
    ScoringConfig,
    build_configs,
    check_together,
    settings_of,
)
from emascope.requests import RequestPoller
from emascope.rundir import RunWriter, host_info, new_run_id, prepare_run_dir
from emascope.scoring import Scorer, SweepResult
from emascope.snapshot import export_checkpoint, load_snapshot, save_snapshot
from emascope.version import __version__


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


def check_attachable(model: Any, optimizer: Any, scoring: ScoringConfig, hooks: Hooks) -> None:
    """The checks of :func:`attach` that need torch (the configs check the rest); ``ValueError``
    naming the problem, raised before anything is written."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        own = {id(p) for p in model.parameters()}
        if not any(id(p) in own for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("optimizer does not update any parameter of model: pass the optimizer that "
                             "trains this model (its steps drive the EMA bank)")
    spec, reference = scoring.feature_extractor, hooks.reference
    if isinstance(reference, F.Features) and spec in (None, "auto"):
        raise ValueError("reference holds precomputed features: pass feature_extractor= naming the "
                         "extractor that produced them ('identity', a torch-fidelity name or a callable)")
    if isinstance(spec, str) and spec not in ("auto", "identity"):
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
        if spec not in FEATURE_EXTRACTORS_REGISTRY:
            raise ValueError(f"feature_extractor {spec!r} is not 'auto', 'identity' or a "
                             f"torch-fidelity extractor ({sorted(FEATURE_EXTRACTORS_REGISTRY)})")
    if reference is not None and not isinstance(reference, F.Features):
        F.reference_identity(reference, max_items=2)  # validates the type early
    _refuse_sharded_params(model)


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
        check_attachable(model, optimizer, scoring, hooks)
        check_together(run, scoring)
        self.run_cfg, self.bank_cfg = run, bank
        self.model, self.optimizer = unwrap_model(model), optimizer
        self.rank = dist_rank()
        self.is_writer = self.rank == 0
        self.run_dir = Path(run.run_dir)
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
        self._housekeeping_at = -float("inf")
        self._hook = None
        self.t0 = self.start_time = time.time()
        if self.is_writer:
            self._open_run(scoring, hooks)
        if optimizer is not None:
            self._hook = optimizer.register_step_post_hook(self._optimizer_hook)

    def _open_run(self, scoring: ScoringConfig, hooks: Hooks) -> None:
        """Rank 0: build the bank, prepare the run directory, write run.json and start the heartbeat."""
        run, b = self.run_cfg, self.bank_cfg
        self.bank = EMABank(self.model, b.decays, device=b.device, update_every=b.update_every,
                            bias_correction=b.bias_correction, bema=b.bema or False,
                            average_buffers=b.average_buffers)
        self.run_dir = prepare_run_dir(run.run_dir, overwrite=run.overwrite, resume=run.resume)
        resumed_from = self._resume_bank() if run.resume else None
        previous = self._previous_run() if run.resume else {}
        self.run_id = str(previous.get("run_id") or new_run_id())
        if isinstance(previous.get("start_time"), (int, float)):
            self.start_time = float(previous["start_time"])
        old = previous.get("metric_directions")
        known = {str(k): v for k, v in old.items() if v in rf.DIRECTIONS} if isinstance(old, dict) else {}
        self.name = run.name or self.run_dir.resolve().name
        self.writer = RunWriter(self.run_dir, step_fn=lambda: self._step, heartbeat_interval=run.heartbeat_interval)
        self.scorer = Scorer(scoring, hooks, self.writer, self.run_dir, on_info_change=self._write_run_json,
                             known_directions=known)
        self.settings = settings_of(run, b, scoring)
        self.settings.update(device=str(self.bank.device), feature_extractor=self.scorer.extractor_label(),
                             sample_seeding=rf.SAMPLE_SEEDING)
        self._write_run_json()
        self.writer.event("start", self._step)
        if resumed_from is not None:
            self.writer.event("resume", self._step, snapshot_step=resumed_from)
        self.writer.start_heartbeat()
        self.requests = RequestPoller(self.run_dir, self._export_for_request, resolve_variant=self.bank.resolve,
                                      on_result=self._export_event, synthesize=self._synthesize_for_request)
        self._note_stage_snapshot_cost()

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
        variant = self.bank.resolve(variant)
        if path is None:
            path = self.run_dir / rf.export_file(rf.default_export_name(variant, self._step))
        out = self._export(variant, Path(path), dtype)
        try:  # relative to the run directory when inside it, as in export requests
            shown = out.resolve().relative_to(self.run_dir.resolve()).as_posix()
        except ValueError:
            shown = str(out.resolve())
        self.writer.event("export", self._step, request_id=None, variant=variant, path=shown,
                          bytes=out.stat().st_size, ok=True, error=None)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The agent's state for the training checkpoint: ``{"format", "step", "bank"}`` (``bank`` is
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
            gone = stages.drop_after(self.run_dir, step)
            if gone:  # taken on a trajectory the restart abandons: synthesis must not mix them in
                self.writer.event("snapshot_pruned", step, paths=gone)

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
            final = self.run_cfg.score_at_close if score is None else bool(score)
            if final and self._last_scored != self._step and self.scorer.active:
                self._score()
            if self._last_snapshot != self._step:
                self._snapshot()
            self.requests.poll(self._step)
            self.requests.join()
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
            step, run = self._step, self.run_cfg
            if run.stage_snapshots != 0 and self._bank_ok:
                stage = stages.next_stage_for_lead_in(step, run.score_every, run.stage_lead_in, self.bank.update_every)
                if stage is not None:
                    self._lead_in_snapshot(stage)
            if run.snapshot_interval and step % run.snapshot_interval == 0:
                self._snapshot()
            if run.score_every and step % run.score_every == 0:
                self._score()
            now = time.monotonic()
            if now - self._housekeeping_at >= run.request_interval:
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

    def _score(self) -> SweepResult:
        self._last_scored = self._step
        self.write_stage_snapshot()
        variants = list(self.bank.variants) if self._bank_ok else [rf.RAW]
        self.last_scores = self.scorer.sweep(self.model, self.bank if self._bank_ok else None, variants,
                                             self._step)
        if self.scorer.cfg.search_evals > 0 and self._bank_ok:
            self._search_between(self.last_scores)
        return self.last_scores

    # ------------------------------------------------------------------ post-hoc synthesis

    def write_stage_snapshot(self, protected: tuple[int, ...] = ()) -> str | None:
        """Write the stage snapshot of the current step (``banks/step_<step>.safetensors``) and apply
        the retention policy (``stage_snapshots``; ``protected`` steps are never deleted). Called at
        every scoring stage; returns the relative path, ``None`` when off or on failure (an ``error``
        event, ``where: "snapshot"``). See :mod:`emascope.stage_snapshots`."""
        run = self.run_cfg
        if run.stage_snapshots == 0 or not self._bank_ok or not self.is_writer:
            return None
        t = time.perf_counter()
        try:
            rel, nbytes = stages.write_stage_snapshot(self.bank, self.run_dir, self._step, run_id=str(self.run_id),
                                                      dtype=run.stage_snapshot_dtype)
        except Exception as exc:  # noqa: BLE001 (full disk, ...)
            self.writer.error("snapshot", self._step, exc)
            return None
        self.writer.event("stage_snapshot", self._step, path=rel, bytes=int(nbytes), seconds=time.perf_counter() - t,
                          role=rf.ROLE_STAGE)
        upcoming = None
        if run.score_every:
            upcoming = (self._step // run.score_every + 1) * run.score_every
        gone = stages.retain(self.run_dir, run.stage_snapshots, protected=protected, upcoming=upcoming)
        if gone:
            self.writer.event("snapshot_pruned", self._step, paths=gone)
        return rel

    def _lead_in_snapshot(self, stage: int) -> None:
        run = self.run_cfg
        t = time.perf_counter()
        try:
            out = stages.write_lead_in_snapshot(self.bank, self.run_dir, self._step, stage, lead_in=run.stage_lead_in,
                                                run_id=str(self.run_id), dtype=run.stage_snapshot_dtype)
        except Exception as exc:  # noqa: BLE001
            self.writer.error("snapshot", self._step, exc)
            return
        if out is not None:
            self.writer.event("stage_snapshot", self._step, path=out[0], bytes=int(out[1]),
                              seconds=time.perf_counter() - t, role=rf.ROLE_LEAD_IN, stage=stage)

    def _note_stage_snapshot_cost(self) -> None:
        """Print and record (``notice`` event, ``where: "stage_snapshots"``) their disk cost, when a
        schedule of stages is set (``score_every``; without one only close / ``score_now`` make stages)."""
        run = self.run_cfg
        if run.stage_snapshots == 0 or not run.score_every:
            return
        cost = stages.disk_cost(self.bank, keep=run.stage_snapshots, lead_in=run.stage_lead_in,
                                dtype=run.stage_snapshot_dtype)
        text = stages.describe_cost(cost)
        print(f"emascope: {text} (stage_snapshots=, stage_lead_in=, stage_snapshot_dtype= set this)",
              file=sys.stderr)
        self.writer.event("notice", self._step, where="stage_snapshots", message=text, **cost)

    def _synthesize_for_request(self, request: rf.ExportRequest, path: Path) -> tuple[int, dict[str, Any]]:
        """Write a synthesised export for a request (runs in a worker thread: reads files only)."""
        from emascope.posthoc import export_synthesized

        out, report = export_synthesized(self.run_dir, path, decay=request.decay, sigma_rel=request.sigma_rel,
                                         dtype=request.dtype, force=request.force)
        return out.stat().st_size, report.as_json()

    def _search_between(self, result: SweepResult) -> None:
        """Score synthesised decays between the grid's around the best one (``search_evals``)."""
        try:
            self._run_search(result)
        except Exception as exc:  # noqa: BLE001 - never into training
            self.writer.error("search", self._step, exc)

    def _run_search(self, result: SweepResult) -> None:
        from emascope.posthoc import StateSwap, search_record, search_stage

        step = self._step
        metric = self._search_metric(result)
        if metric is None:
            return
        direction = self.scorer.metric_directions.get(metric)
        grid = {rf.decay_of(v): s.get(metric) for v, s in result.scores.items() if rf.decay_of(v) is not None}

        def score(name: str, sd: dict[str, torch.Tensor], report: Any) -> float | None:
            mark = rf.synthesis_record(profile_residual=report.profile_residual,
                                       predicted_error=report.predicted_error, error_bound=report.error_bound)
            res = self.scorer.sweep(self.model, StateSwap({name: sd}), [name], step, synthesized=mark)
            return res.scores.get(name, {}).get(metric)

        out, reports = search_stage(self.run_dir, step=step, grid=grid, direction=direction,
                                    max_evals=self.scorer.cfg.search_evals, score=score)
        self.writer.event("search", step, metric=metric, direction=direction, **search_record(out, reports))

    def _search_metric(self, result: SweepResult) -> str | None:
        """The metric the search optimises: ``search_metric``, else fid, fd, else the first with a direction."""
        names = {m for s in result.scores.values() for m in s}
        wanted = self.scorer.cfg.search_metric
        dirs = self.scorer.metric_directions
        if wanted is not None:
            return wanted if wanted in names and dirs.get(wanted) in rf.DIRECTIONS else None
        for m in ("fid", "fd", *sorted(names)):
            if m in names and dirs.get(m) in rf.DIRECTIONS:
                return m
        return None

    # ------------------------------------------------------------------ snapshots and exports

    def _snapshot(self) -> None:
        if not self._bank_ok:
            return
        t = time.perf_counter()
        try:
            nbytes = save_snapshot(self.bank, self.run_dir / rf.SNAPSHOT,
                                   metadata={"run_id": self.run_id, "step": str(self._step)})
        except Exception as exc:  # noqa: BLE001 (OSError: full disk, ...)
            self.writer.error("snapshot", self._step, exc)
            return
        self._last_snapshot = self._step
        self.writer.event("snapshot", self._step, path=rf.SNAPSHOT, bytes=int(nbytes),
                          seconds=time.perf_counter() - t)

    def _export(self, variant: str, path: Path, dtype: str | torch.dtype | None) -> Path:
        if dtype not in (None, "float32", torch.float32):
            raise ValueError(f"dtype must be None or 'float32', got {dtype!r}")
        if variant != rf.RAW and not self._bank_ok:
            raise RuntimeError("the bank is disabled after an update error; only 'raw' can be exported")
        return export_checkpoint(self.bank, variant, path, dtype=dtype, run_id=str(self.run_id))

    def _export_for_request(self, variant: str, path: Path, dtype: str | None) -> int:
        return self._export(variant, path, dtype).stat().st_size

    def _export_event(self, record: dict[str, Any]) -> None:
        self.writer.event("export", self._step, request_id=record.get("id"), variant=record.get("variant"),
                          path=record.get("path"), bytes=record.get("bytes"),
                          ok=record.get("state") == "done", error=record.get("error"))

    # ------------------------------------------------------------------ run.json and resume

    def _resume_bank(self) -> int | None:
        """Load ``banks/latest.safetensors`` into the new bank and continue its step count.

        Returns the snapshot's step, or ``None`` when the run has no snapshot yet (the bank then
        starts from the current weights at step 0). Raises ``ValueError`` if the snapshot belongs
        to another model or other bank settings.
        """
        path = self.run_dir / rf.SNAPSHOT
        if not path.is_file():
            return None
        try:
            self.bank.load_state_dict(load_snapshot(path).state_dict())
        except (ValueError, OSError) as exc:
            raise ValueError(f"resume=True: cannot continue the bank snapshot {str(path)!r}: {exc}") from exc
        self._step = int(self.bank.step)
        self._skipped_seen = int(self.bank.num_skipped)
        return self._step

    def _previous_run(self) -> dict[str, Any]:
        """The run.json of the run being resumed (``{}`` if missing or unreadable)."""
        try:
            info = json.loads((self.run_dir / rf.RUN_JSON).read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001
            return {}
        return info if isinstance(info, dict) else {}

    def _write_run_json(self) -> None:
        directions = {k: v for k, v in self.scorer.metric_directions.items() if v in rf.DIRECTIONS}
        self.writer.write_run_json({
            "run_id": self.run_id, "name": self.name, "start_time": self.start_time, **host_info(),
            "emascope_version": __version__, "decays": [float(d) for d in self.bank.decays],
            "variants": list(self.bank.variants), "model": model_info(self.model),
            "settings": self.settings, "metric_directions": directions, "sample_kind": self.scorer.sample_kind,
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


def attach(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> Scope:
    """Attach an EMA bank and scorer to a training job; returns the :class:`Scope`.

    ``model``: the training model (DDP / DataParallel / ``torch.compile`` wrappers are unwrapped).
    ``optimizer``: its optimizer; the bank updates from its step hook (``None``: call
    ``scope.step()`` after every optimizer step). Keyword arguments are flat (``run_dir`` is
    required) and each belongs to one config of :mod:`emascope.config`, where its unit and default
    are documented: :class:`~emascope.config.RunConfig` (run_dir, name, overwrite, resume,
    score_every, score_at_close, snapshot_every, heartbeat_interval, request_interval),
    :class:`~emascope.config.BankConfig` (decays, device, update_every, bias_correction, bema,
    average_buffers), :class:`~emascope.config.ScoringConfig` (num_samples, batch_size, seed,
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
