"""Post-hoc synthesis of any decay from a run's bank snapshots, with a measured error (no torch).

Reads the run directory's bank snapshots (stage snapshots ``banks/step_*.safetensors``, lead-in
snapshots ``banks/lead_*.safetensors`` and ``banks/latest.safetensors``), writes the averaging
profile of every stored average (:mod:`emascope.profiles`), solves for the coefficients of a
target (an EMA of any decay, or EDM2's power-function EMA given ``sigma_rel``) at a target step,
and combines the stored weights tensor by tensor in float64. Every synthesis comes with its error
(:class:`SynthesisReport`):

1. the *profile residual*: relative L2 distance between the target and synthesised profiles;
2. a *leave-one-out* calibration in weight space: each bank decay is synthesised from the others
   and compared with the real row (relative L2 error, and the error of snapping to the nearest
   remaining decay); the ratio ``weight error / profile residual`` of the bank decays around the
   target turns the target's profile residual into a predicted weight-space error and a bound.
   The same pass picks the ridge (regularisation) with the smallest leave-one-out error.

Only snapshots at or before the target step are used. The file reader is a minimal safetensors
reader (safetensors' own numpy API has no bfloat16, which stage snapshots may use): a file is
opened once per synthesis (its content stays readable if the agent replaces or deletes it) and
read with ``os.pread`` one block of columns at a time, so memory holds one block of float64 per
stored average (:data:`BLOCK_BYTES` in all), never whole snapshots. Everything here is
torch-free: the dashboard computes the error report before it exports. Conventions: decays as in
:mod:`emascope.profiles` (``d``, never ``1 - d``), steps are optimizer steps, errors are relative.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emascope import profiles as P
from emascope import runformat as rf
from emascope.atomic import atomic_write_json

#: Largest profile residual accepted without ``force``: beyond it the snapshots cannot represent
#: the target (e.g. a short average at a step far from any snapshot) and synthesis is refused.
MAX_RESIDUAL = 0.2
#: Ridge values (lambda in units of the target's squared norm, Eq. LS) tried by the leave-one-out
#: calibration; the one with the smallest geometric-mean leave-one-out error is used.
RIDGES = (1e-10, 1e-8, 1e-6, 1e-4)
#: Ridge used when no calibration is available (measured best for float32 rows, bench/synthesis.py).
DEFAULT_RIDGE = 1e-8
#: Stored averages whose coefficient is below this (absolute; coefficients sum to 1) are not read.
PRUNE = 1e-9
#: Bytes of float64 per streamed block of columns (all stored averages together).
BLOCK_BYTES = 1 << 27
#: Safety factors of the error bound: ``bound = BOUND_K * kappa * residual + BOUND_F * floor``.
BOUND_K, BOUND_F = 2.0, 3.0
#: Unit roundoff of a stored dtype (half an ulp at 1).
ROUNDOFF = {"F64": 2.0 ** -53, "F32": 2.0 ** -24, "F16": 2.0 ** -11, "BF16": 2.0 ** -8}
CACHE_VERSION = 1

_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_MAX_HEADER = 256 << 20


class SynthesisError(ValueError):
    """A synthesis that cannot be done or was refused (message names the problem)."""


# ---------------------------------------------------------------------------------------------
# reading snapshots without torch


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], int, int]:
    """``(header, data_start, file_size)`` of a .safetensors file, validated: tensor entries have a
    known dtype and in-bounds, shape-consistent offsets, ``__metadata__`` (if any) maps strings to
    strings. ``ValueError`` naming the file otherwise."""
    fd = _open_regular(Path(path))
    try:
        return _header_of(fd, Path(path))
    finally:
        os.close(fd)


def _open_regular(path: Path) -> int:
    """A read-only descriptor of a regular file (never blocks on a FIFO; a device or folder is refused)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ValueError(f"{str(path)!r} is not readable: {exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{str(path)!r} is not a regular file")
    return fd


def _header_of(fd: int, path: Path) -> tuple[dict[str, Any], int, int]:
    try:
        size = os.fstat(fd).st_size
        n = int.from_bytes(os.pread(fd, 8, 0), "little")
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
        header = json.loads(os.pread(fd, n, 8))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable .safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r}: safetensors header is not an object")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise ValueError(f"{str(path)!r}: safetensors __metadata__ is not an object of strings")
    start = 8 + n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dt = _NP_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            a, b = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{str(path)!r}: bad safetensors entry {key!r}") from None
        numel = math.prod(shape)
        fits = 0 <= a <= b <= size - start and b - a == numel * np.dtype(dt).itemsize
        if min(shape, default=1) < 0 or not fits:
            raise ValueError(f"{str(path)!r}: entry {key!r} does not fit the file")
    return header, start, size


def _to_float64(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored elements as float64 (bfloat16 is the top half of a float32)."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return raw.astype(np.float64)


@dataclass
class Entry:
    """One model state entry of the bank layout (see :mod:`emascope.bank`): ``kind`` avg/frozen/
    buffer/int, columns ``[offset, offset + numel)`` of the bank rows when averaged."""

    name: str
    keys: list[str]
    shape: tuple[int, ...]
    dtype: str
    kind: str
    offset: int
    numel: int


class Snapshot:
    """A bank snapshot file opened for reading (one file handle, kept until :meth:`close`).

    ``role``: ``"stage"``, ``"lead_in"`` or ``"latest"``; ``step`` the optimizer step of the
    snapshot, ``stage`` the stage a lead-in precedes; ``decays``, ``update_every``,
    ``bias_correction``, ``layout`` from its JSON state. Opening a file keeps its content readable
    even if the agent replaces or deletes it meanwhile.
    """

    def __init__(self, path: str | os.PathLike, role: str, rel: str) -> None:
        self.path, self.role, self.rel = Path(path), role, rel
        self._side_fd: int | None = None
        self._fd: int | None = _open_regular(self.path)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        assert self._fd is not None
        header, self._start, self.size = _header_of(self._fd, self.path)
        meta = header.get("__metadata__") or {}
        try:
            state = json.loads(meta[rf.SNAPSHOT_META_KEY])
            self.decays: tuple[float, ...] = tuple(float(d) for d in state["decays"])
            self.update_every = int(state["update_every"])
            self.bias_correction = bool(state["bias_correction"])
            self.numel = int(state["numel"])
            self.bank_step = int(state["step"])
            self.events = int(state.get("events", 0))
            self.layout = [Entry(str(e["name"]), [str(k) for k in e["keys"]], tuple(int(s) for s in e["shape"]),
                                 str(e["dtype"]), str(e["kind"]), int(e["offset"]), int(e["numel"]))
                           for e in state["layout"]]
            self.step = int(meta.get("step", self.bank_step))
            self.stage = int(meta.get(rf.SNAPSHOT_STAGE_KEY, self.step))
            self.run_id = str(meta.get("run_id", ""))
            bank = header["bank"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{str(self.path)!r} is not an emascope bank snapshot ({type(exc).__name__}: {exc})") \
                from None
        shape = list(bank.get("shape") or [])
        if len(shape) != 2 or shape[1] != self.numel or shape[0] < len(self.decays) or bank["dtype"] not in ROUNDOFF:
            raise ValueError(f"{str(self.path)!r}: bank tensor {shape} {bank.get('dtype')} does not match its state")
        self.bank_dtype = str(bank["dtype"])
        self._bank_at = self._start + int(bank["data_offsets"][0])
        self._live = {k[len("live/"):]: v for k, v in header.items() if k.startswith("live/")}
        self._open_side(meta)
        for e in self.layout:
            live = self._live.get(e.name)
            if live is None or tuple(live["shape"]) != e.shape:
                raise ValueError(f"{str(self.path)!r}: the live value of {e.name!r} is missing or misshapen")
            if e.kind == "avg" and not (0 <= e.offset and e.numel == math.prod(e.shape)
                                        and e.offset + e.numel <= self.numel):
                raise ValueError(f"{str(self.path)!r}: entry {e.name!r} lies outside the bank")
        self.applied = None
        if "applied" in header:
            self.applied = int(self._read(header["applied"], 0, 1)[0])

    def _open_side(self, meta: dict[str, Any]) -> None:
        """Open the frozen side file the snapshot references (if any; its header only, checked
        against the reference): its ``live/<name>`` entries join :attr:`_live`, marked ``"side"``.
        :class:`~emascope.runformat.FrozenFileError` naming it when missing or not the one referenced.
        Its checksum is not verified here (as for the snapshot itself: docs/synthesis.md#limits)."""
        ref = rf.frozen_reference(meta, repr(str(self.path)))
        if ref is None:
            return
        side = self.path.parent / ref[0]
        if not side.is_file():
            raise rf.frozen_file_missing(self.path, side)
        try:
            self._side_fd = _open_regular(side)
            header, self._side_start, _ = _header_of(self._side_fd, side)
        except ValueError as exc:
            raise rf.FrozenFileError(f"{str(self.path)!r}: its frozen side file cannot be read: {exc}") from None
        smeta = header.get("__metadata__") or {}
        if smeta.get(rf.FROZEN_FORMAT_KEY) != rf.FROZEN_FORMAT or smeta.get(rf.SNAPSHOT_CHECKSUM_KEY) != ref[1]:
            raise rf.FrozenFileError(f"{str(side)!r} is not the frozen side file {str(self.path)!r} references")
        frozen = {e.name for e in self.layout if e.kind == "frozen"}
        names = {k[len("live/"):] for k in header if k.startswith("live/")}
        if names != frozen or names & set(self._live):
            raise rf.FrozenFileError(f"{str(side)!r} does not hold exactly the frozen entries of {str(self.path)!r}")
        for k, v in header.items():
            if k.startswith("live/"):
                self._live[k[len("live/"):]] = {**v, "side": True}

    def _raw(self, at: int, dtype: str, count: int, side: bool = False) -> np.ndarray:
        """``count`` elements of safetensors dtype ``dtype`` at byte ``at`` of the file (``side``: of
        its frozen side file), a fresh buffer."""
        dt = np.dtype(_NP_DTYPES[dtype])
        nbytes = count * dt.itemsize
        fd = self._side_fd if side else self._fd
        if fd is None or self._fd is None:
            raise ValueError(f"{str(self.path)!r} is closed")
        buf = bytearray(nbytes)
        view, done = memoryview(buf), 0
        while done < nbytes:
            chunk = os.preadv(fd, [view[done:]], at + done)
            if chunk <= 0:
                raise ValueError(f"{str(self.path)!r} ended early (truncated?)")
            done += chunk
        return np.frombuffer(buf, dtype=dt, count=count)

    def _read(self, info: dict[str, Any], first: int, count: int) -> np.ndarray:
        item = np.dtype(_NP_DTYPES[info["dtype"]]).itemsize
        side = bool(info.get("side"))
        at = (self._side_start if side else self._start) + int(info["data_offsets"][0]) + first * item
        return _to_float64(self._raw(at, info["dtype"], count, side), info["dtype"])

    def row(self, r: int, first: int, count: int) -> np.ndarray:
        """Columns ``[first, first + count)`` of bank row ``r`` (decay ``decays[r]``) as float64."""
        item = np.dtype(_NP_DTYPES[self.bank_dtype]).itemsize
        at = self._bank_at + (r * self.numel + first) * item
        return _to_float64(self._raw(at, self.bank_dtype, count), self.bank_dtype)

    def live(self, name: str, first: int = 0, count: int | None = None) -> np.ndarray:
        """Elements ``[first, first + count)`` of the live (raw) value of entry ``name``, float64."""
        info = self._live.get(name)
        if info is None:
            raise ValueError(f"{str(self.path)!r} has no live value of {name!r}")
        n = math.prod(info["shape"])
        return self._read(info, first, n - first if count is None else count)

    def live_array(self, name: str) -> tuple[np.ndarray, str]:
        """The stored live value of ``name`` as raw elements (bfloat16 as uint16) and its safetensors
        dtype (``"F32"``, ``"BF16"``, ``"I64"``, ...), for copying it exactly."""
        info = self._live.get(name)
        if info is None:
            raise ValueError(f"{str(self.path)!r} has no live value of {name!r}")
        n = math.prod(info["shape"])
        side = bool(info.get("side"))
        at = (self._side_start if side else self._start) + int(info["data_offsets"][0])
        return self._raw(at, info["dtype"], n, side).reshape(info["shape"]), str(info["dtype"])

    def live_roundoff(self) -> float:
        """Unit roundoff of the raw weights' storage (the coarsest averaged entry's dtype)."""
        out = 0.0
        for e in self.layout:
            if e.kind == "avg":
                out = max(out, ROUNDOFF.get(self._live.get(e.name, {}).get("dtype", "F32"), 2.0 ** -24))
        return out

    def fingerprint(self) -> list[Any]:
        st = self.path.stat() if self.path.exists() else None
        return [self.rel, self.size, st.st_mtime_ns if st else 0, self.step]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if getattr(self, "_side_fd", None) is not None:
            os.close(self._side_fd)
            self._side_fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def open_snapshots(run_dir: str | os.PathLike) -> list[Snapshot]:
    """Every readable bank snapshot of a run, sorted by step (stage snapshots before lead-ins and
    the latest one at the same step). Unreadable files are skipped (a torn or foreign file must not
    stop a synthesis from the others); ``SynthesisError`` when the run has none or the snapshots
    disagree on ``update_every``/``bias_correction``/layout."""
    run_dir = Path(run_dir)
    found: list[tuple[str, str]] = []
    try:
        names = sorted(p.name for p in (run_dir / rf.BANKS).iterdir())
    except OSError:
        names = []
    for name in names:
        if rf.parse_stage_snapshot_name(name) is not None:
            found.append((f"{rf.BANKS}/{name}", rf.ROLE_STAGE))
        elif rf.parse_lead_in_snapshot_name(name) is not None:
            found.append((f"{rf.BANKS}/{name}", rf.ROLE_LEAD_IN))
    if (run_dir / rf.SNAPSHOT).is_file():
        found.append((rf.SNAPSHOT, "latest"))
    snaps = []
    for rel, role in found:
        for attempt in (0, 1):
            try:
                snaps.append(Snapshot(run_dir / rel, role, rel))
            except rf.FrozenFileError as exc:  # the run's frozen parameters gone or damaged, or a race:
                if not (run_dir / rel).exists():  # the training run removed this snapshot (and its side file)
                    break
                if attempt == 0:  # latest replaced (its old side file removed) meanwhile: open the new one
                    continue
                close_all(snaps)
                raise SynthesisError(str(exc)) from None
            except (ValueError, OSError):
                pass
            break
    if not snaps and (run_dir / rf.SNAPSHOT_INDEX).exists():
        raise SynthesisError(f"{str(run_dir)!r} has a sharded bank ({rf.SNAPSHOT_INDEX}, per-rank files): post-hoc "
                             "synthesis reads one-process stage snapshots only, which a sharded run does not write "
                             "(a limit, docs/synthesis.md); export the decays the bank holds with --variant")
    if not snaps:
        raise SynthesisError(f"{str(run_dir)!r} has no readable bank snapshot under {rf.BANKS}/: nothing to "
                             "synthesise from (stage snapshots are written at every scoring stage; see "
                             "docs/synthesis.md)")
    first = snaps[0]
    for s in snaps[1:]:
        if (s.update_every, s.bias_correction, s.numel) != (first.update_every, first.bias_correction, first.numel):
            raise SynthesisError(f"snapshots {first.rel} and {s.rel} disagree on update_every/bias_correction/size")
    order = {rf.ROLE_STAGE: 0, "latest": 1, rf.ROLE_LEAD_IN: 2}
    snaps.sort(key=lambda s: (s.step, order[s.role]))
    return snaps


# ---------------------------------------------------------------------------------------------
# targets, bases, plans


@dataclass(frozen=True)
class Target:
    """What to synthesise: an EMA of ``decay`` (in (0, 1)) or EDM2's power-function EMA of
    ``sigma_rel``, as it would be at optimizer ``step`` with the bank's ``update_every`` and
    initialisation/bias-correction convention. ``step=None``: the latest stage snapshot's step
    (else the latest snapshot's), see :func:`default_step`."""

    decay: float | None = None
    sigma_rel: float | None = None
    step: int | None = None

    def __post_init__(self) -> None:
        rf.check_synthesis_target(self.decay, self.sigma_rel)
        if self.step is not None and (isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0):
            raise ValueError(f"step must be an integer >= 0 or None, got {self.step!r}")

    @property
    def name(self) -> str:
        return rf.synthesized_name(self.decay, self.sigma_rel)

    def as_json(self, step: int) -> dict[str, Any]:
        gamma = None if self.sigma_rel is None else P.sigma_rel_to_gamma(self.sigma_rel)
        return {"decay": self.decay, "sigma_rel": self.sigma_rel, "gamma": gamma, "step": int(step)}


@dataclass(frozen=True)
class Stored:
    """One stored average: bank row ``row`` of a snapshot (``row=None``: its raw weights)."""

    snap: int
    row: int | None
    step: int
    decay: float | None

    @property
    def variant(self) -> str:
        return rf.RAW if self.decay is None else rf.variant_name(self.decay)


@dataclass
class Basis:
    """The stored averages usable for a target step: snapshots at or before it, their profiles."""

    snaps: list[Snapshot]
    items: list[Stored]
    profiles: P.Profiles
    step: int
    gram: np.ndarray = field(repr=False)

    @property
    def decays(self) -> tuple[float, ...]:
        """The bank's decays (those of its stage/latest snapshots)."""
        full = [s for s in self.snaps if s.role != rf.ROLE_LEAD_IN] or self.snaps
        return full[-1].decays


def build_basis(snaps: Sequence[Snapshot], step: int, exclude_decay: float | None = None) -> Basis:
    """Stored averages for target ``step``: every stage/latest snapshot at or before ``step`` (one
    per step, float32 ``latest`` preferred) and the lead-in snapshots at or before ``step`` of the
    last stage at or before it and of the next stage, each bank row and the raw weights.
    ``exclude_decay``: leave that decay's rows out (leave-one-out)."""
    chosen: dict[int, int] = {}
    for i, s in enumerate(snaps):
        if s.step > step or s.role == rf.ROLE_LEAD_IN:
            continue
        j = chosen.get(s.step)
        if j is None or (s.role == "latest" and snaps[j].bank_dtype != "F32"):
            chosen[s.step] = i
    last_stage = max((s.step for s in snaps if s.role == rf.ROLE_STAGE and s.step <= step), default=None)
    for i, s in enumerate(snaps):
        near = s.stage >= step or s.stage == last_stage  # lead-ins of the stage at/before the step, or the next
        if s.role == rf.ROLE_LEAD_IN and s.step <= step and near and s.step not in chosen:
            chosen[s.step] = i
    if not chosen:
        raise SynthesisError(f"no bank snapshot at or before step {step} (the first is at step "
                             f"{min(s.step for s in snaps)}): synthesis uses only snapshots taken up to the "
                             "target step")
    use = [snaps[i] for _, i in sorted(chosen.items())]
    items: list[Stored] = []
    for si, s in enumerate(use):
        for r, d in enumerate(s.decays):
            if exclude_decay is None or d != exclude_decay:
                items.append(Stored(si, r, s.step, d))
        items.append(Stored(si, None, s.step, None))
    m, bc = use[0].update_every, use[0].bias_correction
    exp = [k for k, it in enumerate(items) if it.decay is not None]
    raw = [k for k, it in enumerate(items) if it.decay is None]
    pe = P.exponential_profiles([items[k].decay for k in exp], [items[k].step for k in exp], m, bc)
    pr = P.raw_profiles([items[k].step for k in raw], m)
    both = P.concat(pe, pr)
    order = np.argsort(np.array(exp + raw), kind="stable")
    profiles = both.take(order)
    return Basis(use, items, profiles, int(step), P.gram(profiles))


def target_products(basis: Basis, target: Target, step: int) -> tuple[np.ndarray, float, Any]:
    """``(cross, norm2, profile)``: inner products of the stored profiles with the target's, and its norm."""
    m, bc = basis.profiles.m, basis.snaps[0].bias_correction
    if target.decay is not None:
        tp = P.exponential_profiles([target.decay], [step], m, bc)
        return P.gram(basis.profiles, tp)[:, 0], float(P.gram(tp)[0, 0]), tp
    tp = P.PowerProfile(P.sigma_rel_to_gamma(target.sigma_rel), step, m)
    if tp.n == 0:
        raise SynthesisError(f"a power-function EMA needs at least one bank update; step {step} has none")
    return P.power_cross(basis.profiles, tp), P.power_norm2(tp), tp


def profile_distances(basis: Basis, target: Target, step: int) -> dict[float, float]:
    """Relative profile distance ``||p_d - p*|| / ||p*||`` of each bank decay ``d`` at ``step`` to the target."""
    cross, n2, tp = target_products(basis, target, step)
    decays = np.array(basis.decays)
    pd = P.exponential_profiles(decays, np.full(len(decays), step), basis.profiles.m, basis.snaps[0].bias_correction)
    if isinstance(tp, P.Profiles):
        cr = P.gram(pd, tp)[:, 0]
    else:
        cr = P.power_cross(pd, tp)
    self2 = np.diag(P.gram(pd))
    dist = np.sqrt(np.maximum(self2 - 2 * cr + n2, 0.0) / n2)
    return {float(d): float(x) for d, x in zip(decays, dist, strict=True)}


def exponential_distance(d1: float, d2: float, step: int, update_every: int = 1,
                         bias_correction: bool = False) -> float:
    """Relative profile distance ``||p_d1 - p_d2|| / min(||p_d1||, ||p_d2||)`` of two EMAs at ``step``."""
    pr = P.exponential_profiles([d1, d2], [step, step], update_every, bias_correction)
    g = P.gram(pr)
    return math.sqrt(max(g[0, 0] + g[1, 1] - 2 * g[0, 1], 0.0) / min(g[0, 0], g[1, 1]))


def nearest_decay(decays: Sequence[float], decay: float) -> float:
    """The bank decay nearest to ``decay`` in ``log(1 - d)`` (how a grid is snapped)."""
    return min(decays, key=lambda d: abs(math.log1p(-d) - math.log1p(-decay)))


# ---------------------------------------------------------------------------------------------
# reports


@dataclass
class LeaveOneOut:
    """One bank decay synthesised from the others at the calibration step (relative errors)."""

    decay: float
    profile_residual: float
    weight_error: float
    snap_error: float
    kappa: float


@dataclass
class Calibration:
    """Leave-one-out calibration at ``step`` with the chosen ``ridge`` (see the module docstring)."""

    step: int
    ridge: float
    loo: list[LeaveOneOut]
    ridges: dict[str, float] = field(default_factory=dict)  # ridge -> geometric-mean LOO error

    def kappa_for(self, distances: dict[float, float]) -> float | None:
        """The calibration ratio for a target: the larger of the two bank decays nearest to it (by
        profile distance); ``None`` without leave-one-out data."""
        usable = [x for x in self.loo if math.isfinite(x.kappa)]
        if not usable:
            return None
        near = sorted(usable, key=lambda x: distances.get(x.decay, math.inf))[:2]
        return max(x.kappa for x in near)


@dataclass
class SynthesisReport:
    """The measured error of one synthesis (all errors relative; JSON with :meth:`as_json`).

    ``profile_residual``: ``||p_synth - p*|| / ||p*||``. ``nearest``: the bank decay whose profile
    is closest and its own profile distance (what snapping to it would give). ``predicted_error`` /
    ``error_bound``: weight-space error relative to the weights' norm, ``kappa * residual + floor``
    / ``2 kappa residual + 3 floor``, with ``kappa`` from the leave-one-out calibration of the bank
    decays nearest to the target and ``floor`` the rounding of the stored averages (dtype of the
    stored rows, float32 accumulation of long decays). ``ok``: False when refused.
    """

    target: dict[str, Any]
    step: int
    snapshots: list[int]
    num_averages: int
    coefficients: list[dict[str, Any]]
    ridge: float
    condition_number: float
    condition_number_gram: float
    profile_residual: float
    nearest: dict[str, Any]
    rounding_floor: float
    calibration: Calibration | None
    predicted_error: float | None
    error_bound: float | None
    warnings: list[str]
    ok: bool = True

    def as_json(self) -> dict[str, Any]:
        return _json_clean(asdict(self))

    def summary(self) -> str:
        """One human line: target, residual, predicted error/bound, nearest decay."""
        t = self.target
        what = f"decay {t['decay']!r}" if t.get("decay") is not None else f"sigma_rel {t['sigma_rel']!r}"
        pred = "not calibrated" if self.predicted_error is None else \
            f"predicted weight error {self.predicted_error:.2e} (bound {self.error_bound:.2e})"
        return (f"{what} at step {self.step}: profile residual {self.profile_residual:.2e} "
                f"(nearest bank decay {self.nearest['variant']}: {self.nearest['profile_residual']:.2e}), {pred}, "
                f"{len(self.snapshots)} snapshots, condition number {self.condition_number:.1e}")


def _json_clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def rounding_floor(basis: Basis, coef: np.ndarray) -> float:
    """Relative rounding error of ``sum c_i x_i`` from how each stored average was kept: storage
    dtype (``u``) and, for float32 bank rows, the accumulated rounding of the lerp, about
    ``u min(sqrt(n), 1 / sqrt(1 - b**2))`` after ``n`` updates with ``b = d**m``."""
    total = 0.0
    for c, it in zip(coef, basis.items, strict=True):
        s = basis.snaps[it.snap]
        if it.decay is None:
            u = s.live_roundoff()
        else:
            n = max(1, it.step // s.update_every)
            b = it.decay ** s.update_every
            acc = min(math.sqrt(n), 1.0 / math.sqrt(max(1.0 - b * b, 1e-300)))
            u = max(ROUNDOFF[s.bank_dtype], ROUNDOFF["F32"] * acc)
        total += (float(c) * u) ** 2
    return math.sqrt(total)


# ---------------------------------------------------------------------------------------------
# streaming weight-space combinations


def averaged_entries(snap: Snapshot) -> list[Entry]:
    return [e for e in snap.layout if e.kind == "avg"]


def _read_item(basis: Basis, k: int, entry: Entry, first: int, count: int) -> np.ndarray:
    it = basis.items[k]
    s = basis.snaps[it.snap]
    if it.row is None:
        return s.live(entry.name, first, count)
    return s.row(it.row, entry.offset + first, count)


def stream_combinations(basis: Basis, coefs: np.ndarray, *, block_bytes: int = BLOCK_BYTES
                        ) -> Iterator[tuple[Entry, int, np.ndarray]]:
    """For every averaged entry, in column blocks: ``(entry, first, C @ X_block)`` where ``coefs``
    is ``[n_combos, n_items]`` and ``X_block`` the stored averages' elements ``[first, first + count)``
    of that entry (float64). Items whose coefficients are all below :data:`PRUNE` are not read.
    Memory: about ``block_bytes`` plus the output block."""
    coefs = np.atleast_2d(np.asarray(coefs, dtype=np.float64))
    used = np.nonzero(np.abs(coefs).max(axis=0) >= PRUNE)[0]
    c = coefs[:, used]
    cols = max(1024, block_bytes // (8 * max(1, len(used))))
    for entry in averaged_entries(basis.snaps[-1]):
        for first in range(0, entry.numel, cols):
            count = min(cols, entry.numel - first)
            x = np.empty((len(used), count), dtype=np.float64)
            for j, k in enumerate(used):
                x[j] = _read_item(basis, int(k), entry, first, count)
            yield entry, first, c @ x


def loo_solutions(basis_for: Any, snaps: Sequence[Snapshot], step: int, ridges: Sequence[float]
                  ) -> tuple[Basis, list[tuple[float, float, np.ndarray, float, int]]]:
    """Leave-one-out problems at ``step``: for each bank decay ``d`` and ridge, the coefficients (on
    the full basis, zero on ``d``'s rows) synthesising ``d`` from the others. Returns the full basis
    and ``[(decay, ridge, coef, profile_residual, index of the real row), ...]``."""
    full = basis_for(snaps, step)
    at_step = [k for k, it in enumerate(full.items) if it.step == step and it.decay is not None
               and full.snaps[it.snap].role != rf.ROLE_LEAD_IN]
    out = []
    for d in full.decays:
        keep = np.array([it.decay != d for it in full.items])
        real = [k for k in at_step if full.items[k].decay == d]
        if not real or keep.sum() == 0:
            continue
        sub = full.profiles.take(keep)
        g = full.gram[np.ix_(keep, keep)]
        tp = P.exponential_profiles([d], [step], full.profiles.m, full.snaps[0].bias_correction)
        cross, n2 = P.gram(sub, tp)[:, 0], float(P.gram(tp)[0, 0])
        for ridge in ridges:
            sol = P.solve(g, cross, n2, ridge)
            coef = np.zeros(len(full.items))
            coef[keep] = sol.coef
            out.append((float(d), float(ridge), coef, sol.residual, real[0]))
    return full, out


def calibrate(snaps: Sequence[Snapshot], step: int, ridges: Sequence[float] = RIDGES) -> Calibration | None:
    """Leave-one-out calibration at ``step`` (a step with a full snapshot): one streaming pass over
    the stored weights computes, for every bank decay and ridge, the relative weight-space error
    of synthesising that decay from the others, and the error of snapping it to the nearest other
    decay. ``None`` when the bank has fewer than two decays."""
    full, probs = loo_solutions(build_basis, snaps, step, ridges)
    if not probs:
        return None
    decays = full.decays
    n_items = len(full.items)
    combos = [p[2] - np.eye(n_items)[p[4]] for p in probs]
    snaps_of = {}
    for d in decays:
        others = [x for x in decays if x != d]
        if not others:
            continue
        near = nearest_decay(others, d)
        real = next(p[4] for p in probs if p[0] == d)
        other = next((k for k, it in enumerate(full.items) if it.decay == near and it.step == step
                      and full.snaps[it.snap].role != rf.ROLE_LEAD_IN), None)
        if other is not None:
            snaps_of[d] = len(combos)
            combos.append(np.eye(n_items)[other] - np.eye(n_items)[real])
    norms_of = {}
    for p in probs:
        if p[0] not in norms_of:
            norms_of[p[0]] = len(combos)
            combos.append(np.eye(n_items)[p[4]])
    sq = np.zeros(len(combos))
    for _, _, y in stream_combinations(full, np.stack(combos)):
        sq += np.einsum("ij,ij->i", y, y)
    err = np.sqrt(sq)
    table: dict[float, list[LeaveOneOut]] = {}
    for i, (d, ridge, _, resid, _) in enumerate(probs):
        norm = err[norms_of[d]] or 1.0
        w = err[i] / norm
        snap = err[snaps_of[d]] / norm if d in snaps_of else math.nan
        kappa = w / resid if resid > 0 else math.inf
        table.setdefault(ridge, []).append(LeaveOneOut(d, resid, float(w), float(snap), float(kappa)))
    score = {r: float(np.exp(np.mean(np.log([max(x.weight_error, 1e-300) for x in rows]))))
             for r, rows in table.items()}
    best = min(score, key=score.get)
    return Calibration(step=int(step), ridge=best, loo=table[best], ridges={repr(r): v for r, v in score.items()})


# ---------------------------------------------------------------------------------------------
# the run-directory level


def _fingerprint(basis: Basis) -> list[Any]:
    return [s.fingerprint() for s in basis.snaps]


def _calibration_from_json(obj: Any) -> Calibration | None:
    try:
        return Calibration(step=int(obj["step"]), ridge=float(obj["ridge"]),
                           loo=[LeaveOneOut(**{k: float(x[k]) for k in ("decay", "profile_residual", "weight_error",
                                                                           "snap_error", "kappa")})
                                for x in obj["loo"]],
                           ridges={str(k): float(v) for k, v in (obj.get("ridges") or {}).items()})
    except (KeyError, TypeError, ValueError):
        return None


def cached_calibration(run_dir: str | os.PathLike, snaps: Sequence[Snapshot], step: int, *, compute: bool = True,
                       write: bool = True) -> Calibration | None:
    """The leave-one-out calibration at ``step`` from ``banks/synthesis.json`` when it matches the
    snapshots on disk, else computed (``compute``) and stored there (``write``, atomic)."""
    basis = build_basis(snaps, step)
    key = str(int(step))
    path = Path(run_dir) / rf.SYNTHESIS_CACHE
    fp = _fingerprint(basis)
    cache: dict[str, Any] = {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
        good = isinstance(loaded, dict) and loaded.get("version") == CACHE_VERSION
        if good and isinstance(loaded.get("steps"), dict):
            cache = loaded
            hit = cache["steps"].get(key)
            if isinstance(hit, dict) and hit.get("fingerprint") == json.loads(json.dumps(fp)):
                cal = _calibration_from_json(hit.get("calibration"))
                if cal is not None:
                    return cal
    except (OSError, ValueError):
        pass
    if not compute:
        return None
    cal = calibrate(snaps, step)
    if cal is not None and write:
        steps = cache.get("steps") if isinstance(cache.get("steps"), dict) else {}
        steps[key] = {"fingerprint": fp, "calibration": _json_clean(asdict(cal))}
        try:
            atomic_write_json(path, {"version": CACHE_VERSION, "steps": steps})
        except OSError:
            pass  # a cache: the report is still complete
    return cal


@dataclass
class Plan:
    """A synthesis ready to run: the basis, the coefficients and the report."""

    basis: Basis
    coef: np.ndarray
    report: SynthesisReport
    fixed_from: Snapshot


def default_step(snaps: Sequence[Snapshot]) -> int:
    """The step a synthesis targets by default: the latest stage snapshot's (where the scores, the
    lead-ins and the calibration are), else the latest snapshot's."""
    stage = [s.step for s in snaps if s.role == rf.ROLE_STAGE]
    return max(stage) if stage else max(s.step for s in snaps)


def calibration_step(snaps: Sequence[Snapshot], step: int) -> int | None:
    """The step whose full snapshot calibrates a target at ``step``: the latest stage/latest
    snapshot at or before it holding more than one decay."""
    steps = [s.step for s in snaps if s.role != rf.ROLE_LEAD_IN and s.step <= step and len(s.decays) > 1]
    return max(steps) if steps else None


def plan_synthesis(run_dir: str | os.PathLike, target: Target, *, snaps: Sequence[Snapshot] | None = None,
                   calibrate_loo: bool = True, force: bool = False, ridge: float | None = None,
                   write_cache: bool = True, calibration: Calibration | None = None) -> Plan:
    """Coefficients and error report of ``target`` from the run's snapshots (no weights combined yet,
    except for the leave-one-out calibration's pass, cached in ``banks/synthesis.json``).

    ``calibrate_loo=False``: use only a cached calibration (the report then may lack the
    weight-space prediction); ``calibration``: use this one (e.g. computed once by
    :func:`calibrate` for many targets). ``ridge``: override the calibrated one. Raises
    :class:`SynthesisError` when nothing at or before the step exists, or when the profile residual
    exceeds :data:`MAX_RESIDUAL` and ``force`` is False (the message carries the report's summary).
    """
    snaps = list(snaps) if snaps is not None else open_snapshots(run_dir)
    full = [s for s in snaps if s.role != rf.ROLE_LEAD_IN]
    latest = max(s.step for s in (full or snaps))
    step = default_step(snaps) if target.step is None else int(target.step)
    if step > latest:
        raise SynthesisError(f"target step {step} is after the latest snapshot (step {latest}): the weights "
                             "after it were never stored")
    basis = build_basis(snaps, step)
    warnings: list[str] = []
    if any(s.applied is not None and s.applied != s.events for s in basis.snaps if s.role != rf.ROLE_LEAD_IN):
        warnings.append("the bank skipped non-finite updates: the profiles assume it did not (the leave-one-out "
                        "error still measures the result)")
    cstep = calibration_step(snaps, step)
    cal = calibration
    if cal is None and cstep is not None:
        cal = cached_calibration(run_dir, snaps, cstep, compute=calibrate_loo, write=write_cache)
    if cal is None:
        warnings.append("no leave-one-out calibration (needs a snapshot with two or more decays, or was not "
                        "computed): only the profile residual is reported")
    lam = ridge if ridge is not None else (cal.ridge if cal is not None else DEFAULT_RIDGE)
    cross, n2, _ = target_products(basis, target, step)
    sol = P.solve(basis.gram, cross, n2, lam)
    dist = profile_distances(basis, target, step)
    if target.decay is not None:
        near = nearest_decay(basis.decays, target.decay)
    else:
        near = min(dist, key=dist.get)
    floor = rounding_floor(basis, sol.coef)
    kappa = cal.kappa_for(dist) if cal is not None else None
    predicted = None if kappa is None else kappa * sol.residual + floor
    bound = None if kappa is None else BOUND_K * kappa * sol.residual + BOUND_F * floor
    order = np.argsort(-np.abs(sol.coef))
    coefs = [{"step": basis.items[k].step, "variant": basis.items[k].variant,
              "file": basis.snaps[basis.items[k].snap].rel, "coef": float(sol.coef[k])}
             for k in order if abs(sol.coef[k]) >= PRUNE]
    ok = sol.residual <= MAX_RESIDUAL
    if not ok:
        warnings.append(f"profile residual {sol.residual:.3f} > {MAX_RESIDUAL}: the snapshots cannot represent this "
                        "target")
    report = SynthesisReport(
        target=target.as_json(step), step=step, snapshots=sorted({s.step for s in basis.snaps}),
        num_averages=len(basis.items), coefficients=coefs, ridge=lam, condition_number=sol.cond,
        condition_number_gram=sol.cond_gram, profile_residual=sol.residual,
        nearest={"variant": rf.variant_name(near), "profile_residual": dist[near]}, rounding_floor=floor,
        calibration=cal, predicted_error=predicted, error_bound=bound, warnings=warnings, ok=ok)
    if not ok and not force:
        raise SynthesisError(f"refused: {report.summary()}. The snapshots cannot represent this target "
                             f"(profile residual > {MAX_RESIDUAL}); pick a decay near the bank's, a stage step, or "
                             "pass force to write it anyway with its error")
    fixed_from = [s for s in basis.snaps if s.role != rf.ROLE_LEAD_IN][-1] if full else basis.snaps[-1]
    return Plan(basis, sol.coef, report, fixed_from)


def close_all(snaps: Sequence[Snapshot]) -> None:
    for s in snaps:
        s.close()
