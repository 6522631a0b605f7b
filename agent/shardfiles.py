"""Sharded bank snapshots: one safetensors file per rank and a JSON index; reading them offline.

A sharded bank (:mod:`emascope.shards`) is snapshotted by every rank at once
(:func:`save_sharded_snapshot`): rank ``r`` writes its own file (atomic), one small all-gather
collects each rank's status, and rank 0 then replaces the index (atomic), so a reader always sees
a whole set: the previous one until the new index lands. File names are in
:mod:`emascope.runformat` (``banks/latest.index.json`` naming
``banks/latest.step_<step>.rank<r>-of-<W>.safetensors``; stage snapshots
``banks/step_<step>.index.json``); docs/run-format.md documents both formats.

Rank file: tensors ``bank`` (fp32 ``[R, n]``, the rank's local columns), ``applied`` (int64 ``[1]``),
``bc_pow`` (float64 ``[K]``), ``theta0`` (fp32 ``[n]``, BEMA only) and ``live/<name>/<a>`` (elements
``[a, b)`` of an entry's flattening, model dtype); metadata key ``emascope``: the bank's JSON state
(settings, step, global layout) with ``shard`` (``kind``, ``rank``, ``world_size``, ``numel``,
``segments``: ``[name, a, b, col]``) and ``live`` (``[name, a, b]`` per live piece). Index:
``{"format": "emascope-bank-shards", "version": 1, "step", "run_id", "world_size", "sharding",
"files": [{"rank", "file", "bytes", "numel"}], "bank": <the JSON state without shard>}``.

Readers (no process group, no model): :func:`open_snapshot` validates an index and its files (or
wraps a single-file snapshot the same way), :func:`export_variant` streams one variant entry by
entry (reading column slices, never the K rows at once), :func:`load_bank` consolidates a
model-less :class:`~emascope.bank.EMABank`, :func:`load_bank_state` fills a live bank of any
sharding (resume at the same world size, or re-shard at another) from either kind of snapshot.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from emascope import runformat as rf
from emascope import snapshot as single
from emascope.atomic import atomic_write_json
from emascope.bank import EMABank
from emascope.collectives import all_gather_ints
from emascope.ema_math import BEMAConfig, bema_alpha
from emascope.frozenfile import remove_unreferenced
from emascope.snapshot import (
    ExportError,
    FrozenSide,
    _atomic_save,
    _check_metadata,
    _own_all,
    frozen_side,
    load_snapshot,
    parse_dtype,
    snapshot_metadata,
)
from emascope.version import __version__

_LIVE = "live/"


# ---------------------------------------------------------------------------------------------
# writing (every rank)


def shard_tensors(bank: EMABank) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and JSON state of this rank's file of a sharded snapshot of ``bank``."""
    if not bank.sharded:
        raise ValueError("the bank is not sharded: write a single-file snapshot (emascope.snapshot.save_snapshot)")
    sd = bank.state_dict()
    tensors = {"bank": sd["bank"], "applied": sd["applied"].reshape(1), "bc_pow": sd["bc_pow"]}
    if "theta0" in sd:
        tensors["theta0"] = sd["theta0"]
    live = []
    for name, a, b, t in bank.live_pieces():
        tensors[f"{_LIVE}{name}/{a}"] = t
        live.append([name, a, b])
    state = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
    state["live"] = live
    return tensors, state


def save_shard(bank: EMABank, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> int:
    """Write this rank's file of a sharded snapshot to ``path`` (atomic); returns its size in bytes."""
    meta = _check_metadata(metadata)
    tensors, state = shard_tensors(bank)
    meta[rf.SNAPSHOT_META_KEY] = json.dumps(state, allow_nan=False, separators=(",", ":"))
    owned = _own_all(tensors)
    meta[rf.SNAPSHOT_CHECKSUM_KEY] = single.snapshot_checksum(owned, meta)  # as in a single-file snapshot
    return _atomic_save(owned, path, meta).stat().st_size


def verify_rank_files(snap: Snapshot, ranks: list[int] | None = None) -> list[int]:
    """Check the checksum (:func:`emascope.snapshot.snapshot_checksum`) of each rank file of ``snap``
    (``ranks``: these only), one file in memory at a time. ``ValueError`` naming the first file whose
    contents do not match; returns the ranks whose files have no checksum (written before rank files
    had one: not verified)."""
    unverified = []
    for k in range(len(snap.files)) if ranks is None else ranks:
        path = snap.files[k].path
        if snap.files[k].side is not None:
            snap.files[k].side.verify()
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get(rf.SNAPSHOT_CHECKSUM_KEY)
            if stored is None:
                unverified.append(k)
                continue
            meta = dict(f.metadata())
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if single.snapshot_checksum(tensors, meta) != stored:
            raise ValueError(f"{str(path)!r}: checksum mismatch (the rank file is corrupt: changed after it "
                             "was written)")
        del tensors
    return unverified


def save_sharded_snapshot(bank: EMABank, run_dir: str | os.PathLike, index: str,
                          shard_file: Callable[[int, int], str], *, step: int, run_id: str = "",
                          group: Any = None) -> int:
    """Snapshot a sharded bank: a collective over its ranks. Returns the bytes of all rank files.

    ``index``: the index path relative to ``run_dir`` (e.g. :data:`emascope.runformat.SNAPSHOT_INDEX`);
    ``shard_file(rank, world)``: a rank file's path relative to ``run_dir``, in the index's folder.
    Every rank writes its file; one all-gather of ``(ok, bytes, columns)``; rank 0 replaces the index
    only when every rank succeeded. ``RuntimeError`` on every rank naming the ranks that failed.
    ``group``: a CPU-capable group of the bank's ranks (default: the bank's own).
    """
    plan = bank.shard_plan
    if plan is None:
        raise ValueError("the bank is not sharded: write a single-file snapshot (emascope.snapshot.save_snapshot)")
    run_dir = Path(run_dir)
    rel = shard_file(plan.rank, plan.world)
    if Path(rel).parent != Path(index).parent:
        raise ValueError(f"rank files must lie in the index's folder: {rel!r} vs {index!r}")
    ok, nbytes, error = 1, 0, ""
    try:
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        nbytes = save_shard(bank, run_dir / rel, {"run_id": str(run_id), "step": str(int(step))})
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        ok, error = 0, f"{type(exc).__name__}: {exc}"
    status = all_gather_ints([ok, nbytes, bank.local_numel], group if group is not None else plan.group)
    failed = [r for r, s in enumerate(status) if not s[0]]
    if failed:
        raise RuntimeError(f"rank(s) {failed} could not write their bank snapshot files"
                           + (f" ({error})" if error else ""))
    if plan.rank == 0:
        state = {k: v for k, v in bank.state_dict().items() if not isinstance(v, torch.Tensor) and k != "shard"}
        body = {"format": rf.SHARD_INDEX_FORMAT, "version": rf.SHARD_INDEX_VERSION, "step": int(step),
                "run_id": str(run_id), "world_size": plan.world, "sharding": plan.kind,
                "files": [{"rank": r, "file": Path(shard_file(r, plan.world)).name, "bytes": s[1], "numel": s[2]}
                          for r, s in enumerate(status)],
                "bank": state, "time": time.time()}
        atomic_write_json(run_dir / index, body)
    return sum(s[1] for s in status)


def prune_latest(run_dir: str | os.PathLike, keep: Path | None) -> list[str]:
    """Remove the latest-snapshot files that ``keep`` (the snapshot just written, a single file or an
    index) does not use: the other kind of latest snapshot and rank files of earlier sets. Returns
    the names removed, with the frozen side files no snapshot references any more
    (:func:`emascope.frozenfile.remove_unreferenced`). Only files named by :mod:`emascope.runformat`
    are touched."""
    banks = Path(run_dir) / rf.BANKS
    used: set[str] = set()
    if keep is not None:
        used.add(keep.name)
        if keep.name.endswith(".json"):
            try:
                used |= {f["file"] for f in json.loads(keep.read_text(encoding="utf-8"))["files"]}
            except (OSError, ValueError, KeyError, TypeError):
                return []  # unreadable: delete nothing
    latest_stem = Path(rf.snapshot_shard_file(0, 0, 1)).name.split(".")[0]
    removed = []
    try:
        names = [p.name for p in banks.iterdir()]
    except OSError:
        return []
    candidates = [Path(p).name for p in rf.LATEST_SNAPSHOTS]
    for n in names:
        parsed = rf.parse_shard_file_name(n)
        if parsed is not None and parsed[0].split(".")[0] == latest_stem:
            candidates.append(n)
    for name in candidates:
        if name in used or name not in names:
            continue
        with contextlib.suppress(OSError):
            (banks / name).unlink()
            removed.append(name)
    return removed + [Path(p).name for p in remove_unreferenced(run_dir)]


# ---------------------------------------------------------------------------------------------
# reading (no process group)


@dataclass
class _File:
    path: Path
    state: dict[str, Any]
    segments: list[tuple[str, int, int, int]]            # (name, a, b, local col)
    live: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)  # name -> (a, b, tensor key)
    side: FrozenSide | None = None  # a single-file snapshot's frozen side file: the keys it holds are there


@dataclass
class Snapshot:
    """A bank snapshot opened for reading: a sharded set (``kind`` ``"ddp"``/``"fsdp"``, one
    :class:`_File` per rank) or a single file (``kind`` ``"single"``). ``state`` is the bank's JSON
    state (settings, step, events, layout, numel)."""

    path: Path
    kind: str
    state: dict[str, Any]
    files: list[_File]
    run_id: str
    step: int

    @property
    def world_size(self) -> int:
        return len(self.files)

    @property
    def variants(self) -> list[str]:
        names = [rf.variant_name(d) for d in self.state["decays"]]
        return [rf.RAW, *names] + ([rf.BEMA] if self.state.get("bema") else [])

    def resolve(self, variant: str | float) -> str:
        v = rf.parse_variant(variant)
        if v not in self.variants:
            raise ValueError(f"unknown variant {variant!r}; this bank has: {', '.join(self.variants)}")
        return v

    def layout(self) -> list[dict[str, Any]]:
        return list(self.state["layout"])


def _header(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no bank snapshot file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own types for a torn/corrupt header
        raise ValueError(f"{str(path)!r} is not a readable .safetensors file: {exc}") from None
    if rf.SNAPSHOT_META_KEY not in meta:
        raise ValueError(f"{str(path)!r} is not an emascope bank snapshot (no {rf.SNAPSHOT_META_KEY!r} metadata)")
    try:
        state = json.loads(meta[rf.SNAPSHOT_META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r}: bad {rf.SNAPSHOT_META_KEY!r} metadata: {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r}: the {rf.SNAPSHOT_META_KEY!r} metadata is not a JSON object")
    state["_meta"] = {k: v for k, v in meta.items() if k != rf.SNAPSHOT_META_KEY}
    return state


def _entry_size(e: dict[str, Any]) -> int:
    n = 1
    for s in e["shape"]:
        n *= int(s)
    return n


_SETTINGS = ("format", "version", "decays", "update_every", "bias_correction", "average_buffers", "bema",
             "numel", "layout", "step")


def open_snapshot(path: str | os.PathLike) -> Snapshot:
    """Open a sharded snapshot's index (``*.index.json``) or a single-file snapshot for reading.

    ``ValueError`` naming the problem for anything that is not a whole, consistent snapshot: an
    index that is not one, a missing or foreign rank file, a rank file of another step or another
    bank, columns or live values not covered exactly once.
    """
    path = Path(path)
    if not path.name.endswith(".json"):
        state = _header(path)
        if state.get("shard") is not None:
            raise ValueError(f"{str(path)!r} is one rank's file of a sharded snapshot: open its index "
                             f"({Path(rf.SNAPSHOT_INDEX).name} or step_<step>.index.json)")
        layout = state.get("layout") or []
        segs = [(e["name"], 0, int(e["numel"]), int(e["offset"])) for e in layout if e["kind"] == "avg"]
        live = {e["name"]: [(0, _entry_size(e), _LIVE + e["name"])] for e in layout}
        meta = state.pop("_meta")
        side = frozen_side(path, meta)
        if side is not None:
            frozen = {_LIVE + e["name"] for e in layout if e["kind"] == "frozen"}
            if set(side.infos) != frozen:
                raise rf.FrozenFileError(f"{str(side.path)!r} does not hold exactly the frozen entries of "
                                         f"{str(path)!r}")
        return Snapshot(path, "single", state, [_File(path, state, segs, live, side)], str(meta.get("run_id", "")),
                        int(state.get("step", 0)))
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no sharded snapshot index at {str(path)!r}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable index: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != rf.SHARD_INDEX_FORMAT:
        raise ValueError(f"{str(path)!r} is not a sharded bank snapshot index (format {rf.SHARD_INDEX_FORMAT!r})")
    version = index.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > rf.SHARD_INDEX_VERSION:
        raise ValueError(f"{str(path)!r}: index version {version!r} is not supported (this emascope reads "
                         f"up to {rf.SHARD_INDEX_VERSION})")
    world, files, state = index.get("world_size"), index.get("files"), index.get("bank")
    if not isinstance(world, int) or world < 1 or not isinstance(files, list) or len(files) != world \
            or not isinstance(state, dict):
        raise ValueError(f"{str(path)!r}: malformed index (world_size, files or bank)")
    step = int(index.get("step", -1))
    layout = state.get("layout") or []
    by_name = {e["name"]: e for e in layout}
    out = []
    for r, f in enumerate(files):
        name = f.get("file") if isinstance(f, dict) else None
        parsed = rf.parse_shard_file_name(name) if isinstance(name, str) else None
        if parsed is None or parsed[1:] != (r, world) or "/" in name or "\\" in name or f.get("rank") != r:
            raise ValueError(f"{str(path)!r}: file entry {r} ({name!r}) is not rank {r} of {world}")
        fp = path.parent / name
        fstate = _header(fp)
        fstate.pop("_meta")
        shard = fstate.get("shard") or {}
        if shard.get("rank") != r or shard.get("world_size") != world:
            raise ValueError(f"{str(fp)!r} holds rank {shard.get('rank')!r} of {shard.get('world_size')!r}, "
                             f"the index says rank {r} of {world}")
        for key in _SETTINGS:
            if fstate.get(key) != state.get(key):
                raise ValueError(f"{str(fp)!r} differs from its index in {key!r} (a file of another snapshot?)")
        segs = [(str(n), int(a), int(b), int(c)) for n, a, b, c in shard.get("segments", [])]
        live: dict[str, list[tuple[int, int, str]]] = {}
        for n, a, b in fstate.get("live", []):
            live.setdefault(str(n), []).append((int(a), int(b), f"{_LIVE}{n}/{int(a)}"))
        out.append(_File(fp, fstate, segs, live))
    snap = Snapshot(path, str(index.get("sharding", "")), state, out, str(index.get("run_id", "")), step)
    _check_coverage(snap, by_name)
    return snap


def _check_coverage(snap: Snapshot, by_name: dict[str, dict[str, Any]]) -> None:
    """Every averaged column in exactly one rank file, every entry's live values exactly once."""
    spans = []
    for f in snap.files:
        for n, a, b, _ in f.segments:
            e = by_name.get(n)
            if e is None or e["kind"] != "avg" or not 0 <= a < b <= int(e["numel"]):
                raise ValueError(f"{str(f.path)!r}: bad segment {n!r} [{a}, {b})")
            spans.append((int(e["offset"]) + a, int(e["offset"]) + b))
    spans.sort()
    end = 0
    for lo, hi in spans:
        if lo != end:
            raise ValueError(f"{str(snap.path)!r}: bank columns [{end}, {lo}) are missing or overlap")
        end = hi
    if end != int(snap.state.get("numel", -1)):
        raise ValueError(f"{str(snap.path)!r}: the rank files hold {end} columns, the bank has "
                         f"{snap.state.get('numel')}")
    for n, e in by_name.items():
        pieces = sorted((a, b) for f in snap.files for a, b, _ in f.live.get(n, []))
        end = 0
        for a, b in pieces:
            if a != end:
                raise ValueError(f"{str(snap.path)!r}: live values of {n!r} miss or repeat [{end}, {a})")
            end = b
        if end != _entry_size(e):
            raise ValueError(f"{str(snap.path)!r}: live values of {n!r} cover {end} of {_entry_size(e)} elements")


class _Reader:
    """Column and live-value reads over a :class:`Snapshot`'s files (safetensors slices, files
    opened once)."""

    def __init__(self, snap: Snapshot, stack: contextlib.ExitStack) -> None:
        self.snap = snap
        self._stack = stack
        self._handles: dict[int | tuple[int], Any] = {}
        offs = {e["name"]: int(e["offset"]) for e in snap.layout()}
        spans = sorted((offs[n] + a, offs[n] + b, k, col) for k, f in enumerate(snap.files)
                       for n, a, b, col in f.segments)
        self._starts = [s[0] for s in spans]
        self._spans = spans

    def _h(self, k: int) -> Any:
        if k not in self._handles:
            self._handles[k] = self._stack.enter_context(safe_open(str(self.snap.files[k].path), framework="pt"))
        return self._handles[k]

    def _live_h(self, k: int, key: str) -> Any:
        """The handle holding live tensor ``key`` of file ``k``: the file, or its frozen side file."""
        side = self.snap.files[k].side
        if side is None or key not in side.infos:
            return self._h(k)
        if (k,) not in self._handles:
            self._handles[(k,)] = self._stack.enter_context(safe_open(str(side.path), framework="pt"))
        return self._handles[(k,)]

    def columns(self, key: str, g0: int, g1: int, row: int | None = None) -> torch.Tensor:
        """Global columns ``[g0, g1)`` of ``bank`` (all rows, or ``row``) or of ``theta0``."""
        parts = []
        i = max(0, bisect.bisect_right(self._starts, g0) - 1)
        pos = g0
        while pos < g1:
            lo, hi, k, col = self._spans[i]
            if not lo <= pos < hi:
                raise ValueError(f"{str(self.snap.path)!r}: no rank file holds bank column {pos}")
            take = min(hi, g1) - pos
            c0 = col + pos - lo
            sl = self._h(k).get_slice(key)
            if key == "theta0":
                parts.append(sl[c0:c0 + take])
            elif row is None:
                parts.append(sl[:, c0:c0 + take])
            else:
                parts.append(sl[row:row + 1, c0:c0 + take][0])
            pos += take
            i += 1
        return torch.cat(parts, dim=-1) if parts else torch.empty(0)

    def live(self, entry: dict[str, Any]) -> torch.Tensor:
        """An entry's whole live value (its dtype, full shape)."""
        name = entry["name"]
        pieces = sorted((a, b, k, key) for k, f in enumerate(self.snap.files) for a, b, key in f.live.get(name, []))
        flat = torch.cat([self._live_h(k, key).get_tensor(key).reshape(-1) for _, _, k, key in pieces]) \
            if pieces else None
        shape = tuple(int(s) for s in entry["shape"])
        if flat is None:
            raise ValueError(f"{str(self.snap.path)!r}: no live value of {name!r}")
        return flat.view(shape)

    def counters(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = self._h(k)
        return h.get_tensor("applied").reshape(()), h.get_tensor("bc_pow")


def _variant_entry(reader: _Reader, e: dict[str, Any], v: str, alpha: float | None,
                   dtype: torch.dtype | None) -> torch.Tensor:
    """Entry ``e`` of variant ``v`` exactly as ``EMABank.materialize(v, dtype=dtype)`` computes it
    (one cast, from fp32 bank values or the live value, to ``dtype`` or the entry's own dtype).
    ``alpha``: BEMA's correction weight at the bank's step (``None`` during BEMA's burn-in)."""
    own = getattr(torch, e["dtype"])
    final = dtype if (dtype is not None and own.is_floating_point) else own
    if e["kind"] != "avg" or v == rf.RAW:
        return reader.live(e).to(final)
    off, n = int(e["offset"]), int(e["numel"])
    state = reader.snap.state
    names = [rf.variant_name(d) for d in state["decays"]]
    row = len(names) if v == rf.BEMA else names.index(v)
    if v == rf.BEMA and alpha is None:  # BEMA Eq. tau: the live weights during the burn-in
        flat = reader.live(e).reshape(-1).to(torch.float32)
    else:
        flat = reader.columns("bank", off, off + n, row)
    if v == rf.BEMA and alpha is not None:
        raw = reader.live(e).reshape(-1).to(torch.float32)
        flat = flat + alpha * (raw - reader.columns("theta0", off, off + n))
    return flat.view(tuple(int(s) for s in e["shape"])).to(final)


def iter_variant(snap: Snapshot, variant: str | float, dtype: torch.dtype | None = None
                 ) -> Iterator[tuple[list[str], torch.Tensor]]:
    """``(state_dict keys, tensor)`` of every entry of ``variant``, one entry at a time (CPU)."""
    v = snap.resolve(variant)
    bema = BEMAConfig(**snap.state["bema"]) if snap.state.get("bema") else None
    step = int(snap.state["step"])
    # alpha of the BEMA correction; None: the burn-in (before step tau the variant is the live weights)
    alpha = bema_alpha(step, bema) if (bema is not None and v == rf.BEMA and step >= bema.tau) else None
    with contextlib.ExitStack() as stack:
        reader = _Reader(snap, stack)
        for e in snap.layout():
            yield list(e["keys"]), _variant_entry(reader, e, v, alpha, dtype)


def export_variant(snap: Snapshot, variant: str | float, path: str | os.PathLike, *,
                   dtype: torch.dtype | str | None = None, run_id: str | None = None) -> Path:
    """Write one variant of a snapshot as a ``.safetensors`` state_dict (atomic), like
    :func:`emascope.snapshot.export_checkpoint` on the consolidated bank: same tensors, same metadata.
    Reads the rank files entry by entry; holds one variant, never the K rows."""
    v = snap.resolve(variant)
    dt = parse_dtype(dtype)
    verify_rank_files(snap)
    meta = rf.export_metadata(v, int(snap.state["step"]), run_id=snap.run_id if run_id is None else run_id,
                              emascope_version=__version__)
    out: dict[str, torch.Tensor] = {}
    for keys, t in iter_variant(snap, v, dt):
        for k in keys:
            out[k] = t
    return _atomic_save(_own_all(out), path, meta)


def load_bank(path: str | os.PathLike, *, notice: Callable[[str], None] | None = None) -> EMABank:
    """A model-less, whole :class:`~emascope.bank.EMABank` (cpu) from a sharded snapshot's index or
    a single-file snapshot (all K rows in memory; for exports of one variant use :func:`export_variant`).
    Counters (updates applied) are rank 0's. ``notice``: for a single file, see
    :func:`~emascope.snapshot.load_snapshot`."""
    path = Path(path)
    if not path.name.endswith(".json"):
        return load_snapshot(path, notice=notice)
    snap = open_snapshot(path)
    verify_rank_files(snap)
    n = int(snap.state["numel"])
    with contextlib.ExitStack() as stack:
        reader = _Reader(snap, stack)
        state = dict(snap.state)
        state["bank"] = reader.columns("bank", 0, n)
        if snap.state.get("bema"):
            state["theta0"] = reader.columns("theta0", 0, n)
        state["applied"], state["bc_pow"] = reader.counters(0)
        live = {e["name"]: reader.live(e) for e in snap.layout()}
    return EMABank.from_state(state, live)


def load_bank_state(bank: EMABank, path: str | os.PathLike) -> int:
    """Fill ``bank`` (a live bank, sharded or not) from a snapshot: a sharded set's index or a single
    file. Each rank reads only the columns it holds. Returns the snapshot's step.

    Same world size and same columns: rank ``r`` loads rank ``r``'s file as it is (bit-exact,
    counters included). Otherwise the bank is re-sharded; the counters (updates applied, bias
    correction powers) must then agree across the rank files (they differ only when non-finite
    weights were skipped by some ranks and not others), else ``ValueError``. Settings and layout
    must fit the bank (``ValueError`` naming what differs), checked before any tensor is read.
    """
    snap = open_snapshot(path)
    bank.check_state_meta(snap.state)
    mine = bank.segments()
    plan = bank.shard_plan
    same = None
    for k, f in enumerate(snap.files):
        if f.segments == mine and (plan is None or (f.state.get("shard") or {}).get("kind") == plan.kind):
            same = k
    with contextlib.ExitStack() as stack:
        reader = _Reader(snap, stack)
        offs = {e["name"]: int(e["offset"]) for e in snap.layout()}
        ranges = [(offs[n] + a, offs[n] + b) for n, a, b, _ in mine]
        rows = [reader.columns("bank", lo, hi) for lo, hi in ranges]
        nrows = len(snap.state["decays"]) + (1 if snap.state.get("bema") else 0)
        sd: dict[str, Any] = {k: v for k, v in snap.state.items() if k != "live"}
        sd["bank"] = torch.cat(rows, dim=1) if rows else torch.empty(nrows, 0)
        if snap.state.get("bema"):
            th = [reader.columns("theta0", lo, hi) for lo, hi in ranges]
            sd["theta0"] = torch.cat(th) if th else torch.empty(0)
        if same is not None:
            verify_rank_files(snap, [same])  # the file this rank resumes from as it is
            sd["applied"], sd["bc_pow"] = reader.counters(same)
        else:
            counts = [reader.counters(k) for k in range(len(snap.files))]
            if any(int(a) != int(counts[0][0]) or not torch.equal(b, counts[0][1]) for a, b in counts):
                raise ValueError(
                    f"{str(snap.path)!r}: its {len(counts)} rank files applied different numbers of updates "
                    f"({[int(a) for a, _ in counts]}: non-finite weights skipped on some ranks only), so it "
                    "cannot be re-sharded exactly; resume at the same world size")
            sd["applied"], sd["bc_pow"] = counts[0]
    sd["shard"] = None
    if plan is not None:
        sd["shard"] = {**plan.as_json(), "numel": bank.local_numel, "segments": [list(s) for s in mine]}
        sd["bank"] = sd["bank"].contiguous()
        bank.load_state_dict(sd)
    else:
        sd.pop("shard")
        bank.load_state_dict(sd)
    return snap.step


def latest_snapshot(run_dir: str | os.PathLike) -> Path | None:
    """The run's latest bank snapshot: ``banks/latest.safetensors`` or ``banks/latest.index.json``
    (when both exist, the one with the larger step, then the newer file); ``None`` if neither."""
    found = []
    for rel in rf.LATEST_SNAPSHOTS:
        p = Path(run_dir) / rel
        if not p.is_file():
            continue
        try:
            if p.name.endswith(".json"):
                step = int(json.loads(p.read_text(encoding="utf-8")).get("step", -1))
            else:
                step = int(snapshot_metadata(p).get("step", -1))
        except (OSError, ValueError, TypeError, AttributeError):
            step = -1
        found.append((step, p.stat().st_mtime_ns, p))
    return max(found)[2] if found else None


def export_from_run(run_dir: str | os.PathLike, variant: str, out: str | os.PathLike | None = None,
                    dtype: str | None = None, *, notice: Callable[[str], None] | None = None) -> Path:
    """``emascope export``: one variant of a run from its latest snapshot, single-file
    (:func:`emascope.snapshot.export_from_run`, ``notice`` as there) or sharded (consolidated here,
    offline, no process group). Default ``out``: ``RUN_DIR/exports/ema-<variant>-step<step>.safetensors``;
    a given ``out`` is checked by :func:`~emascope.snapshot.check_export_target`.
    :class:`~emascope.snapshot.ExportError` naming the problem before anything is written."""
    run_dir = Path(run_dir)
    latest = latest_snapshot(run_dir) if run_dir.is_dir() else None
    if latest is None or not latest.name.endswith(".json"):
        return single.export_from_run(run_dir, variant, out, dtype, notice=notice)
    try:
        rf.validate_export_dtype(dtype)
    except ValueError as exc:
        raise ExportError(f"--dtype: {exc}") from None
    if out is not None:
        out = single.check_export_target(run_dir, out)
    try:
        snap = open_snapshot(latest)
        name = snap.resolve(variant)
    except FileNotFoundError as exc:
        raise ExportError(f"cannot read sharded bank snapshot {str(latest)!r}: {exc}") from exc
    except ValueError as exc:
        msg = str(exc)
        raise ExportError(msg if msg.startswith("unknown variant") else
                          f"cannot read sharded bank snapshot {str(latest)!r}: {msg}") from None
    out = single.export_target(run_dir, out)  # exports/ is made only for a variant the bank holds
    if out is not None:
        return export_variant(snap, name, Path(out), dtype=dtype)
    filename = Path(rf.export_file(rf.default_export_name(name, snap.step))).name
    return single.write_in_exports(run_dir, filename, lambda p: export_variant(snap, name, p, dtype=dtype))
