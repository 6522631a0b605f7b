"""The bank's files: snapshots (the whole bank) and exports (one variant), safetensors, atomic.

This module depends on the bank in one direction only: the bank knows its ``state_dict()``,
``live_values()`` and the model-less constructor ``EMABank.from_state``; the file format is here.

Snapshot (:func:`save_snapshot`, ``banks/latest.safetensors`` of a run): tensors ``bank`` (fp32
``[R, N]``), ``applied`` (int64 ``[1]``, bank updates applied), ``bc_pow`` (float64 ``[K]``,
``(d**m)**n`` of the bias correction), ``theta0`` (fp32 ``[N]``, BEMA only) and ``live/<name>``
(every state entry's live value in its own dtype, tied names stored once); JSON under metadata key
:data:`emascope.runformat.SNAPSHOT_META_KEY`: format/version, decays, update_every,
bias_correction, average_buffers, bema settings, step and event counters, and the layout (per
entry: name, all state_dict keys, shape, dtype, kind avg/frozen/buffer/int, offset and numel in the
flat buffer). Caller metadata goes in other (string) keys.

Export (:func:`export_checkpoint`, the one export function behind ``scope.export``, live export
requests and ``emascope export``): a plain state_dict loadable with
``model.load_state_dict(safetensors.torch.load_file(path))``; string metadata from
:func:`emascope.runformat.export_metadata` plus the caller's keys. Nothing here unpickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from emascope import runformat as rf
from emascope.atomic import temp_path_for
from emascope.bank import EMABank
from emascope.version import __version__

_LIVE = "live/"


def _check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"metadata must map str to str; got {k!r}: {v!r}")
    if rf.SNAPSHOT_META_KEY in metadata:
        raise ValueError(f"metadata key {rf.SNAPSHOT_META_KEY!r} is reserved for the bank layout")
    return dict(metadata)


def _atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:  # durable before it becomes visible, like emascope.atomic
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous cpu tensor with its own storage (safetensors refuses shared/strided tensors).

    Tensors that already are one (e.g. the fresh ``[R, N]`` copy of the bank) are not copied again.
    """
    t = t.detach()
    owns = (t.device.type == "cpu" and t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())
    return t if owns else t.to("cpu", copy=True).contiguous()


def _own_all(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`_own` for every tensor; a tensor met twice (tied weights) gets a copy the second time."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in tensors.items():
        o = _own(t)
        if o.numel() and o.data_ptr() in seen:
            o = o.clone()
        seen.add(o.data_ptr())
        out[k] = o
    return out


# ---------------------------------------------------------------------------------------------
# snapshots


def snapshot_tensors(bank: EMABank, *, dtype: torch.dtype | None = None,
                     decays: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the JSON state of a snapshot of ``bank``.

    ``dtype``: store the bank rows (``bank``, and BEMA's ``theta0``) in this floating dtype instead
    of float32 (``load_snapshot`` reads them back as float32). ``decays``: keep only these decays'
    rows (a subset of the bank's; BEMA is dropped): the snapshot is then the state of a smaller
    bank holding just those decays, readable like any other.
    """
    sd = bank.state_dict()
    if decays is not None:
        keep = [float(d) for d in decays]
        missing = [d for d in keep if d not in bank.decays]
        if missing or not keep:
            raise ValueError(f"decays {missing or keep} are not a non-empty subset of the bank's {list(bank.decays)}")
        rows = [bank.decays.index(d) for d in keep]
        sd.update(decays=keep, bank=sd["bank"][rows].contiguous(), bc_pow=sd["bc_pow"][rows].contiguous(),
                  bema=None)
        sd.pop("theta0", None)
    if dtype is not None and dtype != torch.float32:
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"snapshot dtype must be a floating torch.dtype, got {dtype!r}")
        sd["bank"] = sd["bank"].to(dtype)
        if "theta0" in sd:
            sd["theta0"] = sd["theta0"].to(dtype)
    tensors: dict[str, torch.Tensor] = {"bank": sd["bank"], "applied": sd["applied"].reshape(1),
                                        "bc_pow": sd["bc_pow"]}
    if "theta0" in sd:
        tensors["theta0"] = sd["theta0"]
    for name, t in bank.live_values().items():
        tensors[_LIVE + name] = t
    state = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
    return tensors, state


def save_snapshot(bank: EMABank, path: str | os.PathLike, metadata: dict[str, str] | None = None, *,
                  dtype: torch.dtype | None = None, decays: Any = None) -> int:
    """Write ``bank``'s whole state (bank rows + live weights) to ``path`` (.safetensors, atomic).

    ``metadata``: extra string keys (e.g. ``run_id``, ``step``). ``dtype`` / ``decays``: store the
    rows in a smaller floating dtype / only some decays' rows (see :func:`snapshot_tensors`; stage
    and lead-in snapshots use them). Returns the file size in bytes.
    """
    meta = _check_metadata(metadata)
    tensors, state = snapshot_tensors(bank, dtype=dtype, decays=decays)
    meta[rf.SNAPSHOT_META_KEY] = json.dumps(state, allow_nan=False, separators=(",", ":"))
    return _atomic_save(_own_all(tensors), path, meta).stat().st_size


def _read_header(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"no bank snapshot at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a truncated/corrupt header
        raise ValueError(f"{str(path)!r} is not a readable .safetensors file: {exc}") from None


def snapshot_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The caller metadata of a snapshot (``run_id``, ``step``, ...), without reading its tensors."""
    return {k: v for k, v in _read_header(Path(path)).items() if k != rf.SNAPSHOT_META_KEY}


def load_snapshot(path: str | os.PathLike) -> EMABank:
    """A model-less bank (cpu) from a snapshot written by :func:`save_snapshot`.

    ``materialize``/``swap``/:func:`export_checkpoint` work on it; ``update`` raises. A file that
    is not a bank snapshot, torn or malformed is a ``ValueError`` naming it.
    """
    path = Path(path)
    header = _read_header(path)
    if rf.SNAPSHOT_META_KEY not in header:
        raise ValueError(f"{str(path)!r} is not an emascope bank snapshot (no {rf.SNAPSHOT_META_KEY!r} metadata)")
    try:
        state: dict[str, Any] = json.loads(header[rf.SNAPSHOT_META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r}: bad {rf.SNAPSHOT_META_KEY!r} metadata: {exc}") from None
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{str(path)!r}: cannot read the snapshot tensors: {exc}") from None
    try:
        state = dict(state)
        state["applied"] = tensors["applied"].reshape(())
        state["bank"] = tensors["bank"].float()  # stage snapshots may store bf16/fp16 rows
        state["bc_pow"] = tensors["bc_pow"]
        if "theta0" in tensors:
            state["theta0"] = tensors["theta0"].float()
        live = {k[len(_LIVE):]: t for k, t in tensors.items() if k.startswith(_LIVE)}
        return EMABank.from_state(state, live)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{str(path)!r}: malformed bank snapshot ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:
        raise ValueError(f"{str(path)!r}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# exports


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, a floating ``torch.dtype``, or its name (``"float32"``, ``"bfloat16"``)."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str):
        dt = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(dt, torch.dtype) and dt.is_floating_point:
            return dt
    raise ValueError(f"dtype must be None, a floating torch.dtype or its name (e.g. 'float32'), got {dtype!r}")


def export_checkpoint(bank: EMABank, variant: str | float, path: str | os.PathLike, *,
                      dtype: torch.dtype | str | None = None, run_id: str = "",
                      metadata: dict[str, str] | None = None, prefix: str = "") -> Path:
    """Write one variant's full state_dict to ``path`` (.safetensors, atomic); returns the path.

    Metadata: :func:`emascope.runformat.export_metadata` (variant, decay, the bank's step, run_id,
    emascope_version), then the caller's ``metadata`` (str to str; may override those keys).
    ``dtype=None`` keeps each tensor's model dtype; a floating dtype casts floating tensors.
    ``prefix``: keep only the entries whose key starts with it, with it removed (a submodule's
    state dict, e.g. ``"unet."``); ``""`` keeps everything.
    """
    v = bank.resolve(variant)
    meta = rf.export_metadata(v, bank.step, run_id=run_id, emascope_version=__version__)
    meta.update(_check_metadata(metadata))
    sd = bank.materialize(v, dtype=parse_dtype(dtype), device="cpu")
    if prefix:
        sd = {k[len(prefix):]: t for k, t in sd.items() if k.startswith(prefix)}
        if not sd:
            raise ValueError(f"no entry of the model starts with {prefix!r}")
    return _atomic_save(_own_all(sd), path, meta)  # tied names share one tensor in sd: own storage each


class ExportError(ValueError):
    """A user-facing export error (``emascope export`` prints it and exits with code 2)."""


def export_from_run(run_dir: str | os.PathLike, variant: str, out: str | os.PathLike | None = None,
                    dtype: str | None = None) -> Path:
    """Export ``variant`` of the run in ``run_dir`` from its bank snapshot; returns the written path.

    Default ``out``: ``RUN_DIR/exports/ema-<variant>-step<step>.safetensors``. Raises
    :class:`ExportError` naming the problem (missing run or snapshot, unknown variant listing the
    available ones, bad dtype) before anything is written.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"run directory {str(run_dir)!r} does not exist")
    snapshot = run_dir / rf.SNAPSHOT
    if not snapshot.is_file():
        raise ExportError(f"{str(run_dir)!r} has no bank snapshot ({rf.SNAPSHOT}); "
                          "the run has not reached snapshot_every steps or close() yet")
    try:
        rf.validate_export_dtype(dtype)
    except ValueError as exc:
        raise ExportError(f"--dtype: {exc}") from None
    try:
        bank = load_snapshot(snapshot)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"cannot read bank snapshot {str(snapshot)!r}: {exc}") from exc
    try:
        name = bank.resolve(variant)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    path = Path(out) if out is not None else run_dir / rf.export_file(rf.default_export_name(name, bank.step))
    run_id = snapshot_metadata(snapshot).get("run_id", "")
    return export_checkpoint(bank, name, path, dtype=dtype, run_id=run_id)
