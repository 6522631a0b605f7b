"""Stage and lead-in bank snapshots: the schedule, what each holds, how many are kept, their disk cost.

Post-hoc synthesis (:mod:`emascope.synthesis`, docs/synthesis.md) builds any decay from bank
snapshots taken at several steps; out-of-process scoring needs the bank as it was at each
scoring stage. This module is the one place that writes those files (the agent calls it, and so
can an external-scoring mode):

- a **stage snapshot** ``banks/step_<step>.safetensors`` (:func:`emascope.runformat.stage_snapshot_file`)
  at every scoring stage: the whole bank and the live weights, the format of ``banks/latest.safetensors``,
  with the rows stored as ``float32`` (default), ``bfloat16`` or ``float16``;
- **lead-in snapshots** ``banks/lead_<step>.safetensors`` a few steps before each *scheduled*
  stage (``score_every`` multiples): only the rows of the short decays (window ``1/(1 - d)`` at
  most :data:`LEAD_WINDOW_FACTOR` times the longest lead-in age) and the live weights. Without
  them averages shorter than the stage spacing cannot be synthesised (measured in
  bench/synthesis.py: synthesis error above the snap-to-nearest error for decays below 0.99);
- **retention**: at most ``keep`` stage snapshots; beyond that the one whose removal leaves the
  smallest gap in log(age) (age relative to the newest stage) is deleted, so the kept ones stay
  spread geometrically in age (the newest and the oldest are always kept). Lead-ins are kept only
  for the newest :data:`LEAD_IN_STAGES` kept stages (and for the upcoming one): they cost more
  disk than the stage snapshot itself and matter for short decays near their own stage only.
  Steps in ``protected`` (e.g. stages an external scorer has not scored yet) are never deleted.

Steps are optimizer steps; a lead-in *age* ``a`` means the step ``stage - a`` (rounded up to a
multiple of ``update_every``, the only steps at which the bank changes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from emascope import runformat as rf
from emascope.bank import EMABank
from emascope.frozenfile import FrozenStore, frozen_names, remove_unreferenced
from emascope.snapshot import save_snapshot
from emascope.synthesis import read_safetensors_header

#: A lead-in snapshot keeps the decays whose window ``1/(1 - d)`` is at most this many times the
#: longest lead-in age (longer averages hardly change over a lead-in and add nothing).
LEAD_WINDOW_FACTOR = 16
#: Lead-in snapshots are kept for this many of the newest kept stages (short decays can be
#: synthesised at those stages; older stages keep their full stage snapshot only).
LEAD_IN_STAGES = 2
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def storage_dtype(name: str) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` -> torch dtype; ``ValueError`` otherwise."""
    if name not in _DTYPES:
        raise ValueError(f"snapshot dtype must be one of {rf.SNAPSHOT_DTYPES}, got {name!r}")
    return _DTYPES[name]


def lead_in_decays(decays: Sequence[float], lead_in: Sequence[int]) -> list[float]:
    """The decays a lead-in snapshot stores: window ``1/(1-d) <= LEAD_WINDOW_FACTOR * max(lead_in)``."""
    if not lead_in:
        return []
    limit = LEAD_WINDOW_FACTOR * max(lead_in)
    return [float(d) for d in decays if 1.0 / (1.0 - d) <= limit]


def lead_in_steps(stage: int, lead_in: Sequence[int], update_every: int = 1) -> list[int]:
    """Steps of the lead-in snapshots before ``stage``: ``stage - a`` for each age ``a``, ages rounded
    up to a multiple of ``update_every``, only steps > 0, ascending, without duplicates."""
    m = int(update_every)
    out = {stage - m * math.ceil(a / m) for a in lead_in}
    return sorted(s for s in out if 0 < s < stage)


def next_stage_for_lead_in(step: int, score_every: int | None, lead_in: Sequence[int],
                           update_every: int = 1) -> int | None:
    """The scheduled stage (next multiple of ``score_every``) whose lead-in ``step`` is, else ``None``."""
    if not score_every or not lead_in:
        return None
    stage = (step // score_every + 1) * score_every
    return stage if step in lead_in_steps(stage, lead_in, update_every) else None


def _metadata(run_id: str, step: int, role: str, stage: int) -> dict[str, str]:
    return {"run_id": str(run_id), "step": str(int(step)), rf.SNAPSHOT_ROLE_KEY: role,
            rf.SNAPSHOT_STAGE_KEY: str(int(stage))}


def write_stage_snapshot(bank: EMABank, run_dir: str | os.PathLike, step: int, *, run_id: str = "",
                         dtype: str = "float32", frozen: FrozenStore | None = None) -> tuple[str, int]:
    """Write ``banks/step_<step>.safetensors`` (atomic); returns ``(relative path, bytes)``.
    ``frozen``: the run's frozen side-file store (:func:`emascope.snapshot.save_snapshot`)."""
    rel = rf.stage_snapshot_file(step)
    nbytes = save_snapshot(bank, Path(run_dir) / rel, _metadata(run_id, step, rf.ROLE_STAGE, step),
                           dtype=storage_dtype(dtype), frozen=frozen)
    return rel, nbytes


def write_lead_in_snapshot(bank: EMABank, run_dir: str | os.PathLike, step: int, stage: int, *,
                           lead_in: Sequence[int], run_id: str = "", dtype: str = "float32",
                           frozen: FrozenStore | None = None) -> tuple[str, int] | None:
    """Write ``banks/lead_<step>.safetensors`` with the short decays' rows (atomic); ``None`` when the
    bank has no decay short enough. Returns ``(relative path, bytes)``. ``frozen``: as for stages."""
    decays = lead_in_decays(bank.decays, lead_in)
    if not decays:
        return None
    rel = rf.lead_in_snapshot_file(step)
    nbytes = save_snapshot(bank, Path(run_dir) / rel, _metadata(run_id, step, rf.ROLE_LEAD_IN, stage),
                           dtype=storage_dtype(dtype), decays=decays, frozen=frozen)
    return rel, nbytes


def _listing(run_dir: Path) -> tuple[dict[int, Path], dict[int, Path]]:
    stages: dict[int, Path] = {}
    leads: dict[int, Path] = {}
    try:
        entries = list((run_dir / rf.BANKS).iterdir())
    except OSError:
        return stages, leads
    for p in entries:
        s = rf.parse_stage_snapshot_name(p.name)
        if s is not None:
            stages[s] = p
            continue
        s = rf.parse_lead_in_snapshot_name(p.name)
        if s is not None:
            leads[s] = p
    return stages, leads


def stage_snapshot_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps of the stage snapshots in a run directory, ascending."""
    return sorted(_listing(Path(run_dir))[0])


def thin(steps: Sequence[int], keep: int, protected: Iterable[int] = ()) -> list[int]:
    """The steps kept by the retention policy (see the module docstring): while more than ``keep``
    remain, drop the unprotected step (not the newest, not the oldest) whose removal leaves the
    smallest gap in ``log(age + spacing)`` between its neighbours (ages from the newest step;
    ``spacing`` is the newest gap, so the newest step has a finite log-age)."""
    kept = sorted(set(int(s) for s in steps))
    fixed = set(int(s) for s in protected)
    while len(kept) > max(int(keep), 0):
        if len(kept) <= 2:
            if keep <= 0:
                cand = [s for s in kept if s not in fixed]
                if not cand:
                    break
                kept.remove(cand[0])
                continue
            cand = [s for s in kept[:-1] if s not in fixed]  # keep 1: the newest
            if not cand:
                break
            kept.remove(cand[0])
            continue
        newest = kept[-1]
        spacing = max(newest - kept[-2], 1)
        la = [math.log(newest - s + spacing) for s in kept]
        choices = [i for i in range(1, len(kept) - 1) if kept[i] not in fixed]
        if not choices:
            break
        i = min(choices, key=lambda i: (la[i - 1] - la[i + 1], -kept[i]))
        kept.pop(i)
    return kept


def stage_steps(run_dir: str | os.PathLike) -> list[int]:
    """The steps of the stage snapshots under ``banks/`` (sorted)."""
    return sorted(_listing(Path(run_dir))[0])


def retain(run_dir: str | os.PathLike, keep: int | None, *, protected: Iterable[int] = (),
           upcoming: int | None = None) -> list[str]:
    """Apply the retention policy to ``banks/``: keep at most ``keep`` stage snapshots (``None``: all)
    and the lead-ins of the newest :data:`LEAD_IN_STAGES` kept stages (and of the ``upcoming``
    stage), then the frozen side files no snapshot references any more; returns the deleted paths
    (relative). Deletion failures are ignored (the next call retries)."""
    run_dir = Path(run_dir)
    stages, leads = _listing(run_dir)
    protected = set(int(s) for s in protected)
    kept = set(stages) if keep is None else set(thin(list(stages), keep, protected))
    gone = []
    for s, p in stages.items():
        if s not in kept:
            try:
                p.unlink()
                gone.append(rf.stage_snapshot_file(s))
            except OSError:
                pass
    if leads:
        newest = max(stages, default=-1)
        with_leads = set(sorted(kept)[-LEAD_IN_STAGES:])
        for s, p in leads.items():
            owner = _lead_owner(p)
            keep_it = owner is None or owner in with_leads or owner > newest or owner == upcoming or s in protected
            if not keep_it:
                try:
                    p.unlink()
                    gone.append(rf.lead_in_snapshot_file(s))
                except OSError:
                    pass
    return gone + (remove_unreferenced(run_dir) if gone else [])


def _lead_owner(path: Path) -> int | None:
    """The stage a lead-in snapshot belongs to (its metadata), without torch; ``None`` if unreadable."""
    try:
        header, _, _ = read_safetensors_header(path)
        return int((header.get("__metadata__") or {})[rf.SNAPSHOT_STAGE_KEY])
    except Exception:  # noqa: BLE001 - a torn or foreign file: leave it alone
        return None


def drop_after(run_dir: str | os.PathLike, step: int) -> list[str]:
    """Delete stage and lead-in snapshots taken after ``step`` (a rewind to an older training
    checkpoint: they belong to an abandoned trajectory), then the frozen side files no snapshot
    references any more. Returns the deleted relative paths."""
    stages, leads = _listing(Path(run_dir))
    gone = []
    for table, name in ((stages, rf.stage_snapshot_file), (leads, rf.lead_in_snapshot_file)):
        for s, p in table.items():
            if s > step:
                try:
                    p.unlink()
                    gone.append(name(s))
                except OSError:
                    pass
    return gone + (remove_unreferenced(run_dir) if gone else [])


def disk_cost(bank: EMABank, *, keep: int | None, lead_in: Sequence[int], dtype: str = "float32",
              num_stages: int | None = None, side_file: bool = True) -> dict[str, Any]:
    """Bytes of one stage snapshot and of one stage's lead-ins, and the most kept at once
    (``keep`` stages and the lead-ins of :data:`LEAD_IN_STAGES` of them, or ``num_stages`` stages
    when ``keep`` is None and the count of stages is known).

    Estimated from the bank's shape: rows x averaged scalars x the storage dtype's size, plus the
    live weights (each entry in its own dtype), which every snapshot stores once; with
    ``side_file`` the frozen parameters are counted once (``frozen_bytes``, their side file
    ``banks/frozen-*.safetensors`` shared by every snapshot), not per snapshot.
    """
    item = torch.empty(0, dtype=storage_dtype(dtype)).element_size()
    values = bank.live_values()
    shared = set(frozen_names(bank)) if side_file else set()
    frozen = sum(t.numel() * t.element_size() for n, t in values.items() if n in shared)
    live = sum(t.numel() * t.element_size() for n, t in values.items() if n not in shared)
    rows = len(bank.decays)
    stage = rows * bank.numel * item + live
    lead_rows = len(lead_in_decays(bank.decays, lead_in))
    leads = len(lead_in) * (lead_rows * bank.numel * item + live) if lead_rows else 0
    count = keep if keep is not None else num_stages
    total = None if count is None else count * stage + min(count, LEAD_IN_STAGES) * leads + frozen
    return {"stage_bytes": int(stage), "lead_in_bytes": int(leads), "frozen_bytes": int(frozen),
            "max_stages": count, "max_bytes": None if total is None else int(total), "dtype": dtype}


def describe_cost(cost: dict[str, Any]) -> str:
    """A one-line account of :func:`disk_cost` for the attach notice."""
    def mb(x: float) -> str:
        return f"{x / 1e6:.1f} MB" if x < 1e9 else f"{x / 1e9:.2f} GB"

    per = cost["stage_bytes"] + cost["lead_in_bytes"]
    head = (f"stage snapshots ({cost['dtype']}): {mb(cost['stage_bytes'])} each"
            + (f" + {mb(cost['lead_in_bytes'])} of lead-ins" if cost["lead_in_bytes"] else ""))
    frozen = cost.get("frozen_bytes") or 0
    if cost["max_bytes"] is None:
        return head + f" = {mb(per)} per scoring stage, all stages kept (stage_snapshots=None)" + (
            f", + {mb(frozen)} of frozen parameters once" if frozen else "")
    return head + (f"; at most {cost['max_stages']} stages kept (lead-ins for the newest {LEAD_IN_STAGES}): up to "
                   f"{mb(cost['max_bytes'])} under banks/"
                   + (f" (the {mb(frozen)} of frozen parameters written once)" if frozen else ""))
