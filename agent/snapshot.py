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
Format 2 (``save_snapshot(..., frozen=store)``, the agent): the ``live/<name>`` of the frozen
entries are in a side file of the same folder (:mod:`emascope.frozenfile`) that the metadata keys
:data:`~emascope.runformat.SNAPSHOT_FROZEN_FILE_KEY` / :data:`~emascope.runformat.SNAPSHOT_FROZEN_SHA_KEY`
name; every reader here resolves and checks it (:func:`frozen_side`).

Export (:func:`export_checkpoint`, the one export function behind ``scope.export``, live export
requests and ``emascope export``): a plain state_dict loadable with
``model.load_state_dict(safetensors.torch.load_file(path))``; string metadata from
:func:`emascope.runformat.export_metadata` plus the caller's keys. Nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from emascope import runformat as rf
from emascope.atomic import atomic_write_with, pinned_folder
from emascope.bank import EMABank
from emascope.version import __version__

_LIVE = "live/"


class FrozenFiles(Protocol):
    """Where a snapshot's frozen entries go (:class:`emascope.frozenfile.FrozenStore`): a side file
    of ``folder`` whose ``(name, checksum)`` :meth:`reference` returns (``None``: keep them inline)."""

    folder: Path

    def reference(self, bank: EMABank) -> tuple[str, str] | None: ...


#: Metadata keys the snapshot format owns (not caller metadata).
_RESERVED = (rf.SNAPSHOT_META_KEY, rf.SNAPSHOT_CHECKSUM_KEY, rf.SNAPSHOT_FROZEN_FILE_KEY, rf.SNAPSHOT_FROZEN_SHA_KEY)


def _check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"metadata must map str to str; got {k!r}: {v!r}")
    for key in _RESERVED:
        if key in metadata:
            raise ValueError(f"metadata key {key!r} is reserved (bank layout, checksum, frozen side file)")
    return dict(metadata)


def _atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    return atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


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

#: safetensors' dtype names of the torch dtypes a snapshot may hold.
_ST_DTYPES: dict[str, str] = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL", "complex64": "C64",
}
_KINDS = ("avg", "frozen", "buffer", "int")
_CHECKSUM_TAG = b"emascope-snapshot-sha256/1"


class UnverifiedSnapshotWarning(UserWarning):
    """A snapshot written before checksums existed was loaded without verification."""


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


def snapshot_checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """``"sha256:<hex>"`` over a snapshot's metadata and tensors, in a fixed order.

    Hashed: a version tag; every metadata item but :data:`~emascope.runformat.SNAPSHOT_CHECKSUM_KEY`
    (sorted by key: key, value); every tensor (sorted by name: name, dtype, shape, raw bytes in
    the machine's byte order, which is what safetensors stores on little-endian machines).
    """
    return _digest(metadata, sorted(tensors), tensors.__getitem__)


def _digest(metadata: dict[str, str], names: list[str], get: Callable[[str], torch.Tensor]) -> str:
    """:func:`snapshot_checksum` with the tensors fetched one at a time by ``get(name)``, in the
    sorted order of ``names`` (a file is hashed holding one tensor in memory at a time)."""
    h = hashlib.sha256(_CHECKSUM_TAG)
    for key in sorted(metadata):
        if key != rf.SNAPSHOT_CHECKSUM_KEY:
            h.update(b"\0m" + key.encode() + b"\0" + metadata[key].encode())
    for name in sorted(names):
        t = get(name).detach()
        h.update(f"\0t{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        if t.numel():
            flat = t.to("cpu").contiguous().reshape(-1)
            h.update(memoryview(flat.view(torch.uint8).numpy()))
    return "sha256:" + h.hexdigest()


def save_snapshot(bank: EMABank, path: str | os.PathLike, metadata: dict[str, str] | None = None, *,
                  dtype: torch.dtype | None = None, decays: Any = None, frozen: FrozenFiles | None = None) -> int:
    """Write ``bank``'s whole state (bank rows + live weights) to ``path`` (.safetensors, atomic).

    ``metadata``: extra string keys (e.g. ``run_id``, ``step``). ``dtype`` / ``decays``: store the
    rows in a smaller floating dtype / only some decays' rows (see :func:`snapshot_tensors`; stage
    and lead-in snapshots use them). The metadata key
    :data:`~emascope.runformat.SNAPSHOT_CHECKSUM_KEY` holds :func:`snapshot_checksum` of what is
    written, verified by :func:`load_snapshot`. ``frozen``: a
    :class:`~emascope.frozenfile.FrozenStore` of ``path``'s folder: the frozen parameters go to its
    side file (written only when they changed) and the snapshot names it instead of holding them;
    ``None``: every live value inline (a self-contained file). Returns the snapshot's size in bytes
    (without the side file).
    """
    meta = _check_metadata(metadata)
    tensors, state = snapshot_tensors(bank, dtype=dtype, decays=decays)
    meta[rf.SNAPSHOT_META_KEY] = json.dumps(state, allow_nan=False, separators=(",", ":"))
    if frozen is not None:
        if Path(os.path.abspath(frozen.folder)) != Path(os.path.abspath(Path(path).parent)):
            raise ValueError(f"the frozen side-file store writes into {str(frozen.folder)!r}, not the snapshot's "
                             f"folder {str(Path(path).parent)!r}")
        ref = frozen.reference(bank)
        if ref is not None:
            for name, kind in bank.entry_kinds().items():
                if kind == "frozen":
                    del tensors[_LIVE + name]
            meta[rf.SNAPSHOT_FROZEN_FILE_KEY], meta[rf.SNAPSHOT_FROZEN_SHA_KEY] = ref
    owned = _own_all(tensors)
    meta[rf.SNAPSHOT_CHECKSUM_KEY] = snapshot_checksum(owned, meta)
    return _atomic_save(owned, path, meta).stat().st_size


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """The metadata and ``{tensor name: (safetensors dtype, shape)}`` of a file, without its data."""
    if not path.is_file():
        raise FileNotFoundError(f"no bank snapshot at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            infos = {}
            for k in f.keys():
                sl = f.get_slice(k)
                infos[k] = (str(sl.get_dtype()), tuple(int(s) for s in sl.get_shape()))
            return dict(f.metadata() or {}), infos
    except Exception as exc:  # safetensors raises its own error types for a truncated/corrupt header
        raise ValueError(f"{str(path)!r} is not a readable .safetensors file: {exc}") from None


def snapshot_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The caller metadata of a snapshot (``run_id``, ``step``, ...), without reading its tensors."""
    meta, _ = _read_header(Path(path))
    return {k: v for k, v in meta.items() if k not in _RESERVED}


def _int(state: dict[str, Any], key: str, minimum: int = 0) -> int:
    v = state.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {v!r}")
    return v


#: safetensors dtypes of the bank rows (``bank``, ``theta0``): float32, or a stage snapshot's
#: reduced-precision storage (``stage_snapshot_dtype``).
_ROW_DTYPES = ("F32", "F16", "BF16")


def _expect(infos: dict[str, tuple[str, tuple[int, ...]]], name: str, dtype: str | tuple[str, ...],
            shape: tuple[int, ...]) -> None:
    got = infos.get(name)
    if got is None:
        raise ValueError(f"tensor {name!r} is missing")
    dtypes = (dtype,) if isinstance(dtype, str) else dtype
    if got[0] not in dtypes or got[1] != shape:
        want = dtypes[0] if len(dtypes) == 1 else "/".join(dtypes)
        raise ValueError(f"tensor {name!r} is {got[0]} {list(got[1])}, the snapshot state says {want} {list(shape)}")


def validate_snapshot_header(state: Any, infos: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Check a snapshot's JSON state against the real sizes of its tensors, before anything is
    allocated: ``ValueError`` naming the first problem.

    ``infos`` maps each tensor name to its (safetensors dtype, shape) as the file's header states
    them (safetensors has checked those against the file's length). Checked: at most
    :data:`~emascope.runformat.MAX_DECAYS` decays; ``bank`` is F32 ``[R, numel]`` with R the
    decays (+1 for BEMA; F16/BF16 in a reduced-precision stage snapshot, as is ``theta0``);
    ``applied``, ``bc_pow`` and ``theta0`` have their shapes; every layout entry has a
    ``live/<name>`` tensor of its shape and dtype; averaged entries tile ``[0, numel)`` in order;
    no other tensor is present. So a crafted header cannot make a load allocate more than a few
    times the file's own size.
    """
    if not isinstance(state, dict):
        raise ValueError(f"the snapshot state is {type(state).__name__}, not a JSON object")
    decays = state.get("decays")
    if not isinstance(decays, list) or not 1 <= len(decays) <= rf.MAX_DECAYS:
        size = len(decays) if isinstance(decays, list) else type(decays).__name__
        raise ValueError(f"decays must be a list of 1 to {rf.MAX_DECAYS} decays, got {size}")
    bema = state.get("bema")
    if bema is not None and not isinstance(bema, dict):
        raise ValueError(f"bema must be null or an object, got {type(bema).__name__}")
    numel = _int(state, "numel", 1)
    for key in ("step", "events", "update_every"):
        _int(state, key, 1 if key == "update_every" else 0)
    k = len(decays)
    rows = k + (1 if bema is not None else 0)
    _expect(infos, "bank", _ROW_DTYPES, (rows, numel))
    _expect(infos, "applied", "I64", (1,))
    _expect(infos, "bc_pow", "F64", (k,))
    expected = {"bank", "applied", "bc_pow"}
    if bema is not None:
        _expect(infos, "theta0", _ROW_DTYPES, (numel,))
        expected.add("theta0")
    layout = state.get("layout")
    if not isinstance(layout, list) or not layout:
        raise ValueError("layout must be a non-empty list")
    if len(layout) > len(infos):
        raise ValueError(f"layout has {len(layout)} entries but the file holds {len(infos)} tensors")
    offset = 0
    for e in layout:
        if not isinstance(e, dict):
            raise ValueError(f"layout entry {e!r} is not an object")
        name, shape, dtype, kind = e.get("name"), e.get("shape"), e.get("dtype"), e.get("kind")
        if not isinstance(name, str) or not isinstance(e.get("keys"), list) or kind not in _KINDS:
            raise ValueError(f"layout entry {str(e)[:200]!r} is malformed")
        if (not isinstance(shape, list) or len(shape) > 64
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape)):
            raise ValueError(f"layout entry {name!r} has a bad shape {str(shape)[:200]}")
        if dtype not in _ST_DTYPES:
            raise ValueError(f"layout entry {name!r} has an unsupported dtype {str(dtype)[:50]!r}")
        _expect(infos, _LIVE + name, _ST_DTYPES[dtype], tuple(shape))
        expected.add(_LIVE + name)
        if kind == "avg":
            n = math.prod(shape)
            if e.get("offset") != offset or e.get("numel") != n:
                raise ValueError(f"layout entry {name!r}: offset {e.get('offset')!r} / numel {e.get('numel')!r}, "
                                 f"expected {offset} / {n}")
            offset += n
    if offset != numel:
        raise ValueError(f"the averaged entries hold {offset} values, numel says {numel}")
    extra = sorted(set(infos) - expected)
    if extra:
        raise ValueError(f"unexpected tensors {extra[:5]}")


class FrozenSide:
    """A snapshot's frozen side file, its header checked against the snapshot's reference."""

    def __init__(self, path: Path, meta: dict[str, str], infos: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        self.path, self.meta, self.infos = path, meta, infos

    def verify(self, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Check its checksum (over ``tensors`` when already read, else one tensor at a time from
        the file); :class:`~emascope.runformat.FrozenFileError` naming it on a mismatch."""
        try:
            if tensors is not None:
                digest = snapshot_checksum(tensors, self.meta)
            else:
                with safe_open(str(self.path), framework="pt") as f:
                    digest = _digest(self.meta, list(f.keys()), f.get_tensor)
        except Exception as exc:  # noqa: BLE001 - safetensors' own error types for a torn file
            raise rf.FrozenFileError(f"{str(self.path)!r}: cannot read the frozen side file: {exc}") from None
        if digest != self.meta.get(rf.SNAPSHOT_CHECKSUM_KEY):
            raise rf.FrozenFileError(f"{str(self.path)!r} is corrupt: its contents do not match its checksum "
                                     f"(the frozen side file was damaged after it was written)")

    def load(self) -> dict[str, torch.Tensor]:
        """Its tensors (``live/<name>``), verified."""
        try:
            tensors = load_file(str(self.path))
        except Exception as exc:  # noqa: BLE001
            raise rf.FrozenFileError(f"{str(self.path)!r}: cannot read the frozen side file: {exc}") from None
        self.verify(tensors)
        return tensors


def frozen_side(path: str | os.PathLike, meta: dict[str, str]) -> FrozenSide | None:
    """The frozen side file the snapshot at ``path`` (metadata ``meta``) references, header checked:
    ``None`` when its values are all inline. :class:`~emascope.runformat.FrozenFileError` naming the
    file when the reference is malformed (a name outside the pattern, e.g. with ``../``), the side
    file is missing or unreadable, or its stated checksum is not the one the snapshot references."""
    path = Path(path)
    ref = rf.frozen_reference(meta, repr(str(path)))
    if ref is None:
        return None
    side = path.parent / ref[0]
    if not side.is_file():
        raise rf.frozen_file_missing(path, side)
    try:
        side_meta, infos = _read_header(side)
    except (ValueError, OSError) as exc:
        raise rf.FrozenFileError(f"{str(path)!r}: frozen side file: {exc}") from None
    if side_meta.get(rf.FROZEN_FORMAT_KEY) != rf.FROZEN_FORMAT or side_meta.get(rf.SNAPSHOT_CHECKSUM_KEY) != ref[1]:
        raise rf.FrozenFileError(f"{str(side)!r} is not the frozen side file {str(path)!r} references (its "
                                 f"checksum {side_meta.get(rf.SNAPSHOT_CHECKSUM_KEY)!r}, the snapshot's {ref[1]!r})")
    return FrozenSide(side, side_meta, infos)


def _checked_header(path: Path) -> tuple[dict[str, str], dict[str, Any], FrozenSide | None]:
    """(metadata, JSON state, frozen side file or ``None``) of a snapshot whose header (with its side
    file's) passed :func:`validate_snapshot_header`; ``ValueError`` naming the file otherwise. Reads
    no tensor data."""
    header, infos = _read_header(path)
    if rf.SNAPSHOT_META_KEY not in header:
        raise ValueError(f"{str(path)!r} is not an emascope bank snapshot (no {rf.SNAPSHOT_META_KEY!r} metadata)")
    try:
        state: dict[str, Any] = json.loads(header[rf.SNAPSHOT_META_KEY])
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{str(path)!r}: bad {rf.SNAPSHOT_META_KEY!r} metadata: {type(exc).__name__}") from None
    side = frozen_side(path, header)
    if side is not None:
        layout = state.get("layout") if isinstance(state, dict) else None
        frozen = {_LIVE + e["name"] for e in layout if isinstance(e, dict) and e.get("kind") == "frozen"
                  and isinstance(e.get("name"), str)} if isinstance(layout, list) else set()
        if set(side.infos) != frozen or set(side.infos) & set(infos):
            raise rf.FrozenFileError(f"{str(side.path)!r} does not hold exactly the frozen entries of {str(path)!r}")
        infos = {**infos, **side.infos}
    try:
        validate_snapshot_header(state, infos)
    except ValueError as exc:
        raise ValueError(f"{str(path)!r}: malformed bank snapshot: {exc}") from None
    return header, state, side


def _unverified(path: Path, notice: Callable[[str], None] | None, what: str) -> None:
    message = (f"{str(path)!r} has no checksum (written by an emascope before checksums existed): "
               f"{what} without verifying its contents")
    if notice is None:
        warnings.warn(message, UnverifiedSnapshotWarning, stacklevel=3)
    else:
        notice(message)


def _corrupt(path: Path) -> str:
    return (f"{str(path)!r} is corrupt: its contents do not match the checksum stored in it "
            f"({rf.SNAPSHOT_CHECKSUM_KEY}); the file was damaged after it was written")


def verify_snapshot(path: str | os.PathLike, *, notice: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Check a bank snapshot file without building a bank; returns its JSON state (decays,
    layout, step, ...). For readers that use the file's tensors in place (memory-mapped, one at a
    time): call it first and the file they read is the one :func:`save_snapshot` wrote.

    The same checks as :func:`load_snapshot`: the header (:func:`validate_snapshot_header`) before
    any tensor is read, then the checksum, hashing one tensor at a time (memory: the largest
    tensor, the ``bank`` rows), and that of its frozen side file if it has one
    (:func:`frozen_side`). ``ValueError`` naming the file when malformed or corrupt; a
    snapshot without a checksum gives ``notice(message)`` (or an :class:`UnverifiedSnapshotWarning`).
    """
    path = Path(path)
    header, state, side = _checked_header(path)
    stored = header.get(rf.SNAPSHOT_CHECKSUM_KEY)
    if stored is None:
        _unverified(path, notice, "used")
        return state
    try:
        with safe_open(str(path), framework="pt") as f:
            digest = _digest(header, list(f.keys()), f.get_tensor)
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types for a torn file
        raise ValueError(f"{str(path)!r}: cannot read the snapshot tensors: {exc}") from None
    if digest != stored:
        raise ValueError(_corrupt(path))
    if side is not None:
        side.verify()
    return state


def load_snapshot(path: str | os.PathLike, *, notice: Callable[[str], None] | None = None,
                  frozen: dict[str, torch.Tensor] | None = None) -> EMABank:
    """A model-less bank (cpu) from a snapshot written by :func:`save_snapshot`.

    ``frozen``: ``{entry name: tensor}`` of frozen parameters, used as they are instead of the
    snapshot's frozen side file (the caller holds the very values it was written from, e.g. the
    training model's frozen base for a background stage); names, shapes and dtypes are checked
    against the side file's header, and the side file is read only for the ones not given.
    Ignored for a snapshot whose values are all inline.

    ``materialize``/``swap``/:func:`export_checkpoint` work on it; ``update`` raises. Before any
    tensor is read the header is checked (:func:`validate_snapshot_header`, with the frozen side
    file's header when the snapshot references one: :func:`frozen_side`); after reading, the
    checksums (:func:`snapshot_checksum`, the side file's too) must match. A file that is not a bank snapshot, torn,
    malformed or corrupt is a ``ValueError`` naming it. A snapshot without a checksum (written
    before checksums existed) still loads: ``notice(message)`` is called, or an
    :class:`UnverifiedSnapshotWarning` is issued when ``notice`` is None.
    """
    path = Path(path)
    header, state, side = _checked_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{str(path)!r}: cannot read the snapshot tensors: {exc}") from None
    stored = header.get(rf.SNAPSHOT_CHECKSUM_KEY)
    if stored is None:
        _unverified(path, notice, "loaded")
    elif snapshot_checksum(tensors, header) != stored:
        raise ValueError(_corrupt(path))
    if side is not None:
        given = {_LIVE + k: t for k, t in (frozen or {}).items()}
        seen = {k: (_ST_DTYPES.get(str(t.dtype).removeprefix("torch.")), tuple(t.shape)) for k, t in given.items()}
        if any(k not in side.infos or (side.infos[k][0], tuple(side.infos[k][1])) != v for k, v in seen.items()):
            raise ValueError(f"{str(path)!r}: the frozen values given do not match its frozen side file")
        if set(given) != set(side.infos):  # some (or all) frozen values from the side file, verified
            tensors.update(side.load())  # (keys checked disjoint from the snapshot's)
        tensors.update(given)
    try:
        state = dict(state)
        state["applied"] = tensors["applied"].reshape(())
        state["bank"] = tensors["bank"].float()  # stage snapshots may store bf16/fp16 rows
        state["bc_pow"] = tensors["bc_pow"]
        if "theta0" in tensors:
            state["theta0"] = tensors["theta0"].float()
        live = {k[len(_LIVE):]: t for k, t in tensors.items() if k.startswith(_LIVE)}
        return EMABank.from_state(state, live)
    except (KeyError, TypeError, AttributeError, OverflowError) as exc:
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


def export_checkpoint(bank: EMABank, variant: str | float, path: str | os.PathLike | None, *,
                      dtype: torch.dtype | str | None = None, run_id: str = "",
                      metadata: dict[str, str] | None = None, prefix: str = "") -> Path | None:
    """Write one variant's full state_dict to ``path`` (.safetensors, atomic); returns the path.

    Metadata: :func:`emascope.runformat.export_metadata` (variant, decay, the bank's step, run_id,
    emascope_version), then the caller's ``metadata`` (str to str; may override those keys).
    ``dtype=None`` keeps each tensor's model dtype; a floating dtype casts floating tensors.
    ``prefix``: keep only the entries whose key starts with it, with it removed (a submodule's
    state dict, e.g. ``"unet."``); ``""`` keeps everything.

    A sharded bank: a collective (every rank calls it); the entries stream to rank 0 one at a time
    (:meth:`EMABank.stream_variant`), rank 0 writes ``path`` and the other ranks return ``None``
    (their ``path`` is not used).
    """
    v = bank.resolve(variant)
    meta = rf.export_metadata(v, bank.step, run_id=run_id, emascope_version=__version__)
    meta.update(_check_metadata(metadata))
    sd: dict[str, torch.Tensor] = {}
    for keys, t in bank.stream_variant(v, dtype=parse_dtype(dtype), dst=0):
        if t is not None:
            for key in keys:
                sd[key] = t
    plan = bank.shard_plan
    if plan is not None and plan.rank != 0:
        return None
    if path is None:
        raise ValueError("export_checkpoint: path is required on the writing rank")
    if prefix:
        sd = {k[len(prefix):]: t for k, t in sd.items() if k.startswith(prefix)}
        if not sd:
            raise ValueError(f"no entry of the model starts with {prefix!r}")
    return _atomic_save(_own_all(sd), path, meta)  # tied names share one tensor in sd: own storage each


def write_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write a state_dict as ``.safetensors`` atomically (tied tensors stored once each name); returns ``path``."""
    return _atomic_save(_own_all(state), path, dict(metadata))


class ExportError(ValueError):
    """A user-facing export error (``emascope export`` prints it and exits with code 2)."""


def export_target(run_dir: Path, out: str | os.PathLike | None) -> Path | None:
    """``out`` checked (:func:`check_export_target`), or, when ``None``, the run's ``exports/``
    folder made sure of (created, never through a symlink); ``ExportError`` naming the problem."""
    if out is not None:
        return check_export_target(run_dir, out)
    try:
        (run_dir / rf.EXPORTS).mkdir(exist_ok=True)
        rf.run_subdir(run_dir, rf.EXPORTS)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot export into the run: {exc}") from None
    return None


def write_in_exports(run_dir: str | os.PathLike, filename: str, write: Callable[[Path], Any]) -> Path:
    """``write(path)`` a file of the run's ``exports/`` folder, through the folder opened at its check
    (:func:`emascope.atomic.pinned_folder`: ``exports/`` swapped for a symlink meanwhile is never
    written through); returns ``RUN_DIR/exports/filename``. ``ExportError`` when ``exports/`` is not
    a real folder of the run."""
    with contextlib.ExitStack() as stack:
        try:  # OSError (ELOOP): exports/ became a symlink since it was checked
            folder = stack.enter_context(pinned_folder(rf.run_subdir(run_dir, rf.EXPORTS)))
        except (ValueError, OSError) as exc:
            raise ExportError(f"cannot export into the run: {exc}") from None
        write(folder / filename)
    return Path(run_dir) / rf.EXPORTS / filename


def check_export_target(run_dir: str | os.PathLike, out: str | os.PathLike, *, folder: bool = False,
                        option: str = "--out") -> Path:
    """``out`` as a checked output path for an export of the run in ``run_dir``; :class:`ExportError`
    naming the problem.

    Refused: a folder (``folder=False``, a file export) or an existing file (``folder=True``, a
    ``from_pretrained`` folder export); a path whose parent is not a folder; any path inside the
    run directory other than under its ``exports/`` (``--out RUN/run.json`` would replace a file
    of the run itself). ``out`` may otherwise point anywhere: the user named it. Symlinks in the
    parent folders are followed (the file is replaced where they lead); a symlink at ``out``
    itself is replaced, never written through. ``option``: the flag named in the messages.
    """
    out = Path(out)
    if folder and out.exists() and not out.is_dir():
        raise ExportError(f"{option} {str(out)!r} exists and is not a folder (this export is a folder)")
    if not folder and out.is_dir():
        raise ExportError(f"{option} {str(out)!r} is a folder; give a file path such as "
                          f"{str(out / 'ema.safetensors')!r}")
    parent = out.parent
    for p in (parent, *parent.parents):  # the nearest existing ancestor must be a folder
        if p.exists():
            if not p.is_dir():
                raise ExportError(f"{option} {str(out)!r}: {str(p)!r} is not a folder")
            break
    try:
        target = parent.resolve() / out.name
        base = Path(run_dir).resolve()
    except (OSError, RuntimeError) as exc:
        raise ExportError(f"{option} {str(out)!r}: cannot resolve the path: {exc}") from None
    if (target == base or base in target.parents) and (base / rf.EXPORTS) not in target.parents:
        rel = target.relative_to(base).as_posix() if target != base else "."
        raise ExportError(f"{option} {str(out)!r} would replace {rel!r}, a file of the run itself; exports go "
                          f"under the run's {rf.EXPORTS}/ or outside the run directory")
    return out


def export_from_run(run_dir: str | os.PathLike, variant: str, out: str | os.PathLike | None = None,
                    dtype: str | None = None, *, notice: Callable[[str], None] | None = None) -> Path:
    """Export ``variant`` of the run in ``run_dir`` from its bank snapshot; returns the written path.

    Default ``out``: ``RUN_DIR/exports/ema-<variant>-step<step>.safetensors`` (``exports/`` must
    be a real folder of the run, not a symlink). A given ``out`` is checked by
    :func:`check_export_target`. Raises :class:`ExportError` naming the problem (missing run or
    snapshot, unknown variant listing the available ones, bad dtype, a refused or unwritable
    ``out``, a corrupt snapshot) before anything is written. ``notice``: see :func:`load_snapshot`.
    """
    try:
        run_dir = rf.check_readable_run_dir(run_dir)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    snapshot = run_dir / rf.SNAPSHOT
    if not snapshot.is_file():
        raise ExportError(f"{str(run_dir)!r} has no bank snapshot ({rf.SNAPSHOT}); "
                          "the run has not reached snapshot_every steps or close() yet")
    try:
        rf.validate_export_dtype(dtype)
    except ValueError as exc:
        raise ExportError(f"--dtype: {exc}") from None
    if out is not None:
        out = check_export_target(run_dir, out)
    try:
        bank = load_snapshot(snapshot, notice=notice)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"cannot read the bank snapshot: {exc}") from exc  # exc names the file
    try:
        name = bank.resolve(variant)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    out = export_target(run_dir, out)  # exports/ is made only for a variant the bank holds
    run_id = snapshot_metadata(snapshot).get("run_id", "")
    filename = Path(rf.export_file(rf.default_export_name(name, bank.step))).name
    path = Path(out) if out is not None else run_dir / rf.EXPORTS / filename
    try:
        if out is not None:
            return export_checkpoint(bank, name, path, dtype=dtype, run_id=run_id)
        return write_in_exports(run_dir, filename, lambda p: export_checkpoint(bank, name, p, dtype=dtype,
                                                                               run_id=run_id))
    except OSError as exc:
        raise ExportError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
