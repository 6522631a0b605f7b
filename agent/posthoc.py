"""Synthesised checkpoints from a run directory: any decay, or EDM2's sigma_rel, with its error report.

```python
from emascope.posthoc import synthesize, export_synthesized

state_dict, report = synthesize("runs/exp1", decay=0.9996)       # at the latest stage snapshot
print(report.summary())                                          # never without its error
path, report = export_synthesized("runs/exp1", "ema-0.9996.safetensors", sigma_rel=0.05)
```

The coefficients and the error come from :mod:`emascope.synthesis` (torch-free); this module
turns the float64 combination into the model's state dict (each entry in its own dtype, or a
floating ``dtype``) and writes it as a ``.safetensors`` checkpoint (atomic), loadable with
``model.load_state_dict(safetensors.torch.load_file(path))``. Averaged entries are combined tensor
by tensor from memory-mapped snapshots; entries the bank does not average (buffers, frozen
parameters) are copied from the latest full snapshot at or before the target step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from emascope import runformat as rf
from emascope.atomic import atomic_write_with
from emascope.bank import shared_with_training
from emascope.decay_search import SearchResult, search_between
from emascope.snapshot import ExportError, check_export_target, write_in_exports
from emascope.synthesis import (
    Plan,
    SynthesisError,
    SynthesisReport,
    Target,
    close_all,
    exponential_distance,
    open_snapshots,
    plan_synthesis,
    stream_combinations,
)
from emascope.version import __version__

_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def _stored_tensor(arr: np.ndarray, st_dtype: str) -> torch.Tensor:
    if st_dtype == "BF16":
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(arr.copy()).to(_TORCH[st_dtype])


def materialize(plan: Plan, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The synthesised state dict of ``plan`` (cpu tensors; tied names share one tensor).

    ``dtype=None``: each entry in the model's dtype; a floating dtype casts floating entries.
    Averaged entries are summed in float64, one entry (in column blocks) at a time.
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    layout = plan.fixed_from.layout
    want_of = {}
    for e in layout:
        model_dtype = _dtype(e.dtype)
        want_of[e.name] = dtype if (dtype is not None and model_dtype.is_floating_point) else model_dtype
    done: dict[str, torch.Tensor] = {}
    acc: np.ndarray | None = None
    for entry, first, y in stream_combinations(plan.basis, plan.coef[None, :]):
        if first == 0:
            acc = np.empty(entry.numel, dtype=np.float64)
        acc[first:first + y.shape[1]] = y[0]
        if first + y.shape[1] == entry.numel:  # entry complete: keep only its model-dtype copy
            done[entry.name] = torch.from_numpy(acc).to(want_of[entry.name]).reshape(entry.shape)
            acc = None
    out: dict[str, torch.Tensor] = {}
    for e in layout:
        if e.kind == "avg":
            t = done.pop(e.name)
        else:
            arr, st = plan.fixed_from.live_array(e.name)
            t = _stored_tensor(arr, st).to(want_of[e.name]).reshape(e.shape)
        for key in e.keys:
            out[key] = t
    return out


def synthesize(run_dir: str | os.PathLike, *, decay: float | None = None, sigma_rel: float | None = None,
               step: int | None = None, dtype: torch.dtype | str | None = None, force: bool = False,
               calibrate: bool = True) -> tuple[dict[str, torch.Tensor], SynthesisReport]:
    """The state dict of an EMA of ``decay`` (or EDM2's power-function EMA of ``sigma_rel``) at
    ``step`` (default: the latest stage snapshot), synthesised from the run's bank snapshots, and its
    error report (:class:`emascope.synthesis.SynthesisReport`). A decay the bank holds is
    reproduced (coefficient 1 on its row). Raises :class:`emascope.synthesis.SynthesisError`
    naming the problem (no snapshots, a step after the last snapshot, a target the snapshots cannot
    represent unless ``force``). ``calibrate``: run (or reuse the cached) leave-one-out pass.
    """
    target = Target(decay=decay, sigma_rel=sigma_rel, step=step)
    dt = _dtype(dtype) if isinstance(dtype, str) else dtype
    snaps = open_snapshots(run_dir)
    try:
        plan = plan_synthesis(run_dir, target, snaps=snaps, calibrate_loo=calibrate, force=force)
        return materialize(plan, dt), plan.report
    finally:
        close_all(snaps)


def _own(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each name its own contiguous storage (safetensors refuses shared tensors: tied names)."""
    seen: set[int] = set()
    out = {}
    for k, t in sd.items():
        t = t.contiguous()
        if id(t) in seen:
            t = t.clone()
        seen.add(id(t))
        out[k] = t
    return out


def save_checkpoint(sd: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write a state dict as .safetensors atomically (:func:`emascope.atomic.atomic_write_with`:
    temp file, fsync, ``os.replace``, the umask's file mode)."""
    owned = _own(sd)
    return atomic_write_with(path, lambda tmp: save_file(owned, str(tmp), metadata=metadata))


def export_synthesized(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                       decay: float | None = None, sigma_rel: float | None = None, step: int | None = None,
                       dtype: str | None = None, force: bool = False) -> tuple[Path, SynthesisReport]:
    """Synthesise (see :func:`synthesize`) and write the checkpoint; returns ``(path, report)``.

    Default ``out``: ``RUN_DIR/exports/ema-<decay>-synth-step<step>.safetensors`` (or
    ``phema-<sigma_rel>-step<step>``). Metadata: :func:`emascope.runformat.synthesized_export_metadata`
    (variant, decay, step, run_id, synthesized, sigma_rel, profile_residual, predicted_error,
    error_bound). A given ``out`` is checked first (:func:`emascope.snapshot.check_export_target`:
    not a folder, not a file of the run other than under ``exports/``; ``ExportError``); nothing is
    written when it is refused or the synthesis is refused.
    """
    rf.validate_export_dtype(dtype)
    if out is not None:
        out = check_export_target(run_dir, out)
    sd, report = synthesize(run_dir, decay=decay, sigma_rel=sigma_rel, step=step, dtype=dtype, force=force)
    if out is None:  # made only once the synthesis succeeded: a refusal leaves the run as it was
        try:
            (Path(run_dir) / rf.EXPORTS).mkdir(exist_ok=True)
            rf.run_subdir(run_dir, rf.EXPORTS)
        except (OSError, ValueError) as exc:
            raise ExportError(f"cannot export into the run: {exc}") from None
    filename = Path(rf.export_file(rf.default_synthesized_export_name(decay, sigma_rel, report.step))).name
    run_id = ""
    try:
        snaps = open_snapshots(run_dir)
        run_id = snaps[-1].run_id
        close_all(snaps)
    except ValueError:
        pass
    meta = rf.synthesized_export_metadata(
        decay=decay, sigma_rel=sigma_rel, step=report.step, run_id=run_id, emascope_version=__version__,
        profile_residual=report.profile_residual, predicted_error=report.predicted_error,
        error_bound=report.error_bound)
    path = Path(out) if out is not None else Path(run_dir) / rf.EXPORTS / filename
    try:
        if out is not None:
            return save_checkpoint(sd, path, meta), report
        return write_in_exports(run_dir, filename, lambda p: save_checkpoint(sd, p, meta)), report
    except OSError as exc:
        raise ExportError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


class StateSwap:
    """Named state dicts that can be swapped into a model like a bank's variants (``swap(model,
    name)``: load, yield, restore the live values bit-exactly), so a scoring sweep scores them."""

    def __init__(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        self.states = states

    @contextlib.contextmanager
    def swap(self, model: torch.nn.Module, variant: str) -> Iterator[torch.nn.Module]:
        new = self.states[variant]
        live = model.state_dict(keep_vars=True)
        missing = [k for k in new if k not in live]
        if missing:
            raise ValueError(f"the synthesised state has entries the model lacks: {missing[:5]}")
        targets: dict[int, tuple[torch.Tensor, str]] = {}
        leave = shared_with_training(model)  # an eval copy's shared frozen base: never written
        for k in new:
            if k in leave:
                continue
            t = live[k]
            targets.setdefault(id(t), (t, k))
        backup = {i: t.detach().clone() for i, (t, _) in targets.items()}
        try:
            with torch.no_grad():
                for t, k in targets.values():
                    t.copy_(new[k].to(device=t.device, dtype=t.dtype))
            yield model
        finally:
            with torch.no_grad():
                for i, (t, _) in targets.items():
                    t.copy_(backup[i])


def search_stage(run_dir: str | os.PathLike, *, step: int, grid: Mapping[float, float | None], direction: str,
                 max_evals: int, score: Callable[[str, dict[str, torch.Tensor], SynthesisReport], float | None],
                 noise: float | None = None) -> tuple[SearchResult, dict[float, SynthesisReport]]:
    """Golden-section search between the grid decays of one stage (:func:`emascope.decay_search.search_between`)
    with weights synthesised from the run's snapshots at ``step``.

    ``grid``: ``{decay: metric value}`` of the bank's decays at that stage; ``score(variant,
    state_dict, report)`` scores one synthesised decay (e.g. swap it into the model and run the
    sweep's metrics) and returns the metric's value (``None`` on failure). The bracket stops
    shrinking once its ends differ (in profile) by less than the probes' synthesis error, or by
    less than ``noise`` in value. The agent (``search_evals``) calls this after a sweep; an
    out-of-process scorer (``emascope score``) can call it the same way. Returns the search result
    and the error report of every synthesised decay.
    """
    snaps = open_snapshots(run_dir)
    m, bc = snaps[-1].update_every, snaps[-1].bias_correction
    close_all(snaps)
    reports: dict[float, SynthesisReport] = {}

    def evaluate(decay: float) -> float | None:
        try:
            sd, report = synthesize(run_dir, decay=decay, step=step)
        except SynthesisError:
            return None
        reports[decay] = report
        return score(rf.variant_name(decay), sd, report)

    def resolvable(d1: float, d2: float) -> bool:
        worst = max((r.profile_residual for r in reports.values()), default=0.0)
        return exponential_distance(d1, d2, step, m, bc) > max(worst, 1e-6)

    result = search_between(grid, evaluate, direction=direction, max_evals=max_evals, resolvable=resolvable,
                            noise=noise)
    return result, reports


def search_record(result: SearchResult, reports: Mapping[float, SynthesisReport]) -> dict[str, Any]:
    """The fields of the ``search`` event (docs/run-format.md) for a search result."""
    return {"evaluated": [{"decay": d, "value": v,
                           "profile_residual": getattr(reports.get(d), "profile_residual", None),
                           "predicted_error": getattr(reports.get(d), "predicted_error", None)}
                          for d, v in result.evaluated],
            "best_decay": result.best_decay, "best_value": result.best_value, "best_is_grid": result.best_is_grid,
            "stopped": result.stopped}


def search_metric(scorer: Any, names: set[str]) -> str | None:
    """The metric the search optimises: ``search_metric``, else fid, fd, else the first ranked one
    (sorted by name) among ``names`` (the metrics of the sweep). ``None``: none with a direction."""
    wanted = scorer.cfg.search_metric
    dirs = scorer.metric_directions
    if wanted is not None:
        return wanted if wanted in names and dirs.get(wanted) in rf.DIRECTIONS else None
    for m in ("fid", "fd", *sorted(names)):
        if m in names and dirs.get(m) in rf.DIRECTIONS:
            return m
    return None


def search_after_sweep(run_dir: str | os.PathLike, scorer: Any, model: torch.nn.Module, result: Any, *,
                       scorer_name: str, isolate_rng: bool, writer: Any,
                       on_progress: Callable[[], None] | None = None) -> None:
    """After a sweep (``result``: its :class:`emascope.scoring.SweepResult`): score up to
    ``scorer.cfg.search_evals`` synthesised decays between the grid's around the best one
    (:func:`search_stage`), each a one-variant sweep of ``scorer`` on ``model`` marked
    ``synthesized``, and write the ``search`` event with ``writer``. The noise that ends the search
    is :func:`emascope.decay_search.search_noise` (``search_tolerance``, else the best grid decay's
    standard error). Used by the agent (inline and background) and by ``emascope score``.
    ``isolate_rng``: fork the global random streams (the training thread's inline sweep only)."""
    from emascope.decay_search import search_noise

    step = result.step
    metric = search_metric(scorer, {m for s in result.scores.values() for m in s})
    if metric is None:
        return
    direction = scorer.metric_directions.get(metric)
    grid = {rf.decay_of(v): s.get(metric) for v, s in result.scores.items() if rf.decay_of(v) is not None}

    def score(name: str, sd: dict[str, torch.Tensor], report: SynthesisReport) -> float | None:
        mark = rf.synthesis_record(profile_residual=report.profile_residual,
                                   predicted_error=report.predicted_error, error_bound=report.error_bound)
        res = scorer.sweep(model, StateSwap({name: sd}), [name], step, synthesized=mark, scorer=scorer_name,
                           isolate_rng=isolate_rng, on_progress=on_progress)
        if on_progress is not None:
            on_progress()
        return res.scores.get(name, {}).get(metric)

    ses = {rf.decay_of(v): getattr(e.get(metric), "se", None) for v, e in result.estimates.items()
           if rf.decay_of(v) is not None}
    noise, source = search_noise(grid, ses, direction=direction, tolerance=scorer.cfg.search_tolerance)
    out, reports = search_stage(run_dir, step=step, grid=grid, direction=direction,
                                max_evals=scorer.cfg.search_evals, score=score, noise=noise)
    writer.event("search", step, metric=metric, direction=direction, tolerance=noise, tolerance_source=source,
                 scorer=scorer_name, **search_record(out, reports))
