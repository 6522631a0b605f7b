"""Bank files: bank snapshots and single-variant exports, both .safetensors, both written atomically.

Snapshot (``EMABank.save_snapshot``): tensors ``bank`` (fp32 ``[R, N]``), ``applied`` (int64 ``[1]``,
bank updates applied), ``bc_pow`` (float64 ``[K]``, ``(d**m)**n`` of the bias correction),
``theta0`` (fp32 ``[N]``, BEMA only) and ``live/<name>`` (every state entry's live value in its own
dtype, tied names stored once); JSON under metadata key ``"emascope"``: format/version, decays,
update_every, bias_correction, average_buffers, bema settings, step and event counters, and the
layout (per entry: name, all state_dict keys, shape, dtype, kind avg/frozen/buffer/int, offset and
numel in the flat buffer). Caller metadata goes in other (string) keys.

Export (``EMABank.export``): a plain state_dict loadable with
``model.load_state_dict(safetensors.torch.load_file(path))``; metadata ``variant``, ``decay``, ``step``
and caller keys, all strings. Nothing here unpickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from agent.atomic import temp_path_for
from agent.ema_math import BEMA, RAW

if TYPE_CHECKING:
    from agent.bank import EMABank

META_KEY = "emascope"


def _check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"metadata must map str to str; got {k!r}: {v!r}")
    if META_KEY in metadata:
        raise ValueError(f"metadata key {META_KEY!r} is reserved for the bank layout")
    return dict(metadata)


def _atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:  # durable before it becomes visible, like agent.atomic
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


def save_bank_snapshot(bank: EMABank, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> int:
    """Write ``bank``'s whole state to ``path`` (.safetensors, atomic). Returns the file size in bytes."""
    meta = _check_metadata(metadata)
    tensors, state = bank.snapshot_tensors()
    meta[META_KEY] = json.dumps(state, allow_nan=False, separators=(",", ":"))
    out = _atomic_save(_own_all(tensors), path, meta)
    return out.stat().st_size


def load_bank_snapshot(cls: type[EMABank], path: str | os.PathLike) -> EMABank:
    """Read a snapshot written by :func:`save_bank_snapshot` into a model-less bank (cpu)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no bank snapshot at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            file_meta: dict[str, str] = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a truncated/corrupt header
        raise ValueError(f"{str(path)!r} is not a readable .safetensors file: {exc}") from None
    if META_KEY not in file_meta:
        raise ValueError(f"{str(path)!r} is not an emascope bank snapshot (no {META_KEY!r} metadata)")
    try:
        state: dict[str, Any] = json.loads(file_meta[META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r}: bad {META_KEY!r} metadata: {exc}") from None
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{str(path)!r}: cannot read the snapshot tensors: {exc}") from None
    try:
        bank = cls.from_snapshot_tensors(tensors, state)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{str(path)!r}: malformed bank snapshot ({type(exc).__name__}: {exc})") from None
    bank.snapshot_metadata = {k: v for k, v in file_meta.items() if k != META_KEY}
    return bank


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        dt = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(dt, torch.dtype) and dt.is_floating_point:
            return dt
    raise ValueError(f"dtype must be None, a floating torch.dtype or its name (e.g. 'float32'), "
                     f"got {dtype!r}")


def export_variant(bank: EMABank, variant: str | float, path: str | os.PathLike, *,
                   dtype: torch.dtype | str | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write one variant's full state_dict to ``path`` (.safetensors, atomic); returns the path.

    Metadata: ``variant``, ``decay`` (the decay as a string, ``""`` for raw/bema), ``step`` (the bank's
    optimizer step), then the caller's ``metadata`` (str to str; may override those three).
    """
    v = bank.resolve(variant)
    meta = {"variant": v, "decay": "" if v in (RAW, BEMA) else v, "step": str(bank.step)}
    meta.update(_check_metadata(metadata))
    sd = bank.materialize(v, dtype=_parse_dtype(dtype), device="cpu")
    # tied names share one tensor in sd: give each key its own storage
    return _atomic_save(_own_all(sd), path, meta)
