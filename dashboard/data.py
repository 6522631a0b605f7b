"""Read emascope run directories (docs/run-format.md) into plain Python and pandas.

No Streamlit and no torch here. Every reader is tolerant: a torn or invalid line is skipped and
counted, a half-written or missing JSON file reads as "not there yet", never as a crash. Files are
re-read only when they changed (key: path + mtime_ns + size + inode); append-only JSONL files are
read incrementally from the last complete line when they grew and the bytes before that point
are unchanged.

Hostile files (docs/dashboard.md, "Limits and threat model"): every file is opened through
:mod:`emascope.dashboard.files` (regular files only, never a FIFO or device, symlinks only when
they stay inside the run, a byte cap per read); JSON nested too deep, numbers out of range and
variants that are not decays make a record invalid (skipped and counted) or a file unreadable (a
per-file error of that run), never an exception out of :meth:`RunReader.load`. Discovery of runs
is bounded in depth and in folders scanned.

Conventions: ``step`` is the optimizer step of a scoring stage; ``decay`` is the EMA decay ``d``
(0.9999), never ``1 - d``; ``variant`` is ``"raw"``, ``repr(float(d))`` or ``"bema"``.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.lib import format as npy_format

from emascope import runformat as rf
from emascope.dashboard.files import (
    MAX_JSON_BYTES,
    MAX_JSONL_BYTES,
    MAX_LINE_BYTES,
    MAX_PREVIEW_BYTES,
    RefusedFile,
    open_regular,
    read_capped,
    resolved_root,
)
from emascope.runformat import FormatVersionError, check_format_version  # noqa: F401 (re-exported)

#: Columns of the metrics frame: the record keys, then the optional interval fields (NaN when a
#: record has none: runs written before them, metrics without an interval).
METRIC_COLUMNS = list(rf.METRIC_KEYS) + list(rf.METRIC_INTERVAL_KEYS)
#: Columns of :attr:`RunData.synthesized`: the record keys plus the synthesis's measured error.
SYNTH_COLUMNS = [*rf.METRIC_KEYS, "profile_residual", "predicted_error", "error_bound"]
_PREFIX_CHECK = 64  # bytes before the read offset compared to detect a rewritten file
_CHUNK = 4 * 1024 * 1024  # JSONL files are read in chunks of this many bytes
_SKIP_DIRS = {*rf.SUBDIRS, "__pycache__", "node_modules"}
#: Folder levels below the root searched for runs (``runs/project/sweep/run`` is 3).
MAX_DISCOVERY_DEPTH = 8
#: Folders scanned per discovery at most (a run's own sub-folders are never scanned).
MAX_DISCOVERY_FOLDERS = 20_000
#: Steps are int64 in the metrics frame: a record with a step outside [0, 2**63) is invalid.
MAX_STEP = 2**63 - 1
#: Longest metric name accepted (a longer one makes the record invalid).
MAX_METRIC_NAME = 200
#: Errors a JSON parser may raise on hostile input (bad syntax, huge numbers, deep nesting).
JSON_ERRORS = (ValueError, RecursionError, OverflowError, MemoryError)


@dataclass
class Discovery:
    """Runs found below a root, and what the bounded search left out (sentences for people)."""

    runs: list[Path]
    notes: list[str] = field(default_factory=list)


def find_runs(root: str | os.PathLike, *, max_depth: int = MAX_DISCOVERY_DEPTH,
              max_folders: int = MAX_DISCOVERY_FOLDERS) -> Discovery:
    """Run directories at or below ``root`` (folders holding a ``run.json``), sorted by path.

    ``root`` may itself be a run directory. The search never descends into a run's own
    sub-folders (samples/, banks/, ...), hidden folders or symlinked folders, goes at most
    ``max_depth`` folder levels below ``root`` and scans at most ``max_folders`` folders (an
    explicit stack: no recursion, whatever the depth of the tree). What it left out is said in
    ``notes``. A missing root is a ValueError.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"not a directory: {str(root)!r}")
    found: list[Path] = []
    stack: list[tuple[str, int]] = [(os.fspath(root), 0)]
    scanned = too_deep = 0
    while stack:
        if scanned >= max_folders:
            break
        folder, depth = stack.pop()
        scanned += 1
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            continue
        names = {e.name for e in entries}
        is_run = rf.RUN_JSON in names
        if is_run:
            found.append(Path(folder))
        subdirs = []
        for e in entries:
            if e.name.startswith(".") or (is_run and e.name in _SKIP_DIRS):
                continue
            try:
                if e.is_dir(follow_symlinks=False):
                    subdirs.append(e.path)
            except OSError:
                continue
        if subdirs and depth >= max_depth:
            too_deep += 1
            continue
        stack.extend((p, depth + 1) for p in sorted(subdirs, reverse=True))
    notes = []
    if too_deep:
        notes.append(f"folders more than {max_depth} levels below {str(root)!r} are not searched for runs")
    if stack:
        notes.append(f"the search for runs stopped after {max_folders:,} folders; open a smaller folder "
                     "to see the others")
    return Discovery(sorted(found), notes)


def discover_runs(root: str | os.PathLike) -> list[Path]:
    """Run directories at or below ``root`` (:func:`find_runs` without its notes)."""
    return find_runs(root).runs


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _root_of(path: Path, root: str | os.PathLike | None) -> str:
    return resolved_root(root if root is not None else path.parent)


class JsonFileCache:
    """A small JSON object file (run.json, heartbeat, status files) re-read only when it changed.

    A file that is missing, half-written, not a JSON object, nested too deep, larger than
    ``max_bytes``, not a regular file or a symlink out of ``root`` (default: its folder) reads as
    ``None`` (and ``error`` says why) without raising.
    """

    def __init__(self, path: str | os.PathLike, root: str | os.PathLike | None = None,
                 max_bytes: int = MAX_JSON_BYTES):
        self.path = Path(path)
        self.root = _root_of(self.path, root)
        self.max_bytes = max_bytes
        self._key: tuple[int, int, int] | None = None
        self.value: dict[str, Any] | None = None
        self.error: str | None = None
        self.reads = 0

    def read(self) -> bool:
        """Refresh from disk if the file changed. Returns True if the value may have changed."""
        key = _stat_key(self.path)
        if key is not None and key == self._key:
            return False
        if key is None:
            changed = self.value is not None or self._key is not None
            self._key, self.value, self.error = None, None, "missing"
            return changed
        self.reads += 1
        try:
            obj = json.loads(read_capped(self.path, self.root, self.max_bytes))
        except RefusedFile as exc:  # not retried until the file changes
            self._key, self.value, self.error = key, None, f"refused: {exc}"
            return True
        except OSError as exc:
            self._key, self.value, self.error = None, None, f"unreadable: {exc.strerror or exc}"
            return True
        except RecursionError:
            self._key, self.value, self.error = key, None, "unreadable: JSON nested too deep"
            return True
        except JSON_ERRORS as exc:  # half-written: retried on the next read
            self._key, self.value, self.error = None, None, f"unreadable: {str(exc)[:200]}"
            return True
        if not isinstance(obj, dict):
            self._key, self.value, self.error = key, None, "not a JSON object"
            return True
        self._key, self.value, self.error = key, obj, None
        return True


class JsonlReader:
    """Incremental reader of an append-only JSON Lines file.

    Only complete lines (ending in ``\\n``) are parsed; a torn last line is held back until it is
    completed (``torn_tail`` is True meanwhile). Lines that are not a JSON object (bad syntax,
    nested too deep, longer than :data:`~emascope.dashboard.files.MAX_LINE_BYTES`) are skipped
    and counted in ``bad_lines``; a torn tail longer than that cap is skipped too (up to its
    newline, whenever it comes) instead of being re-read on every change. When the file grew and
    the bytes just before the last offset are unchanged, only the new bytes are read; if it
    shrank, was replaced or rewritten, it is re-read from the start. At most ``max_bytes`` of the
    file are ever read (``truncated`` then); a file that is not a regular file or a symlink out
    of ``root`` (default: its folder) is refused (``error`` says why, no records).
    """

    def __init__(self, path: str | os.PathLike, root: str | os.PathLike | None = None,
                 max_bytes: int = MAX_JSONL_BYTES, max_line: int = MAX_LINE_BYTES):
        self.path = Path(path)
        self.root = _root_of(self.path, root)
        self.max_bytes, self.max_line = max_bytes, max_line
        self.records: list[dict[str, Any]] = []
        self.bad_lines = 0
        self.torn_tail = False
        self.truncated = False
        self.error: str | None = None
        self.bytes_read = 0  # total bytes read from disk (for tests of incrementality)
        self._key: tuple[int, int, int] | None = None
        self._offset = 0
        self._ino: int | None = None
        self._prefix = b""
        self._skipping = False  # inside an over-long line: drop bytes up to its newline

    def _reset(self) -> None:
        self.records, self.bad_lines, self.torn_tail, self.truncated = [], 0, False, False
        self._offset, self._prefix, self._ino, self._skipping = 0, b"", None, False

    def read(self) -> bool:
        """Read what is new. Returns True if ``records`` (or counters) may have changed."""
        key = _stat_key(self.path)
        if key is not None and key == self._key:
            return False
        if key is None:
            changed = bool(self.records) or self._key is not None or self.error is not None
            self._reset()
            self._key, self.error = None, None
            return changed
        _, size, ino = key
        try:
            f, _ = open_regular(self.path, self.root)
        except RefusedFile as exc:
            changed = bool(self.records) or self.error != str(exc)
            self._reset()
            self._key, self.error = key, str(exc)
            return changed
        except OSError:
            return False
        self.error = None
        with f:
            try:
                self._read_from(f, size, ino)
            except OSError:
                return False
        self._key = key
        return True

    def _read_from(self, f: io.BufferedReader, size: int, ino: int) -> None:
        start = 0
        if ino == self._ino and size >= self._offset and self._offset > 0:
            n = min(_PREFIX_CHECK, self._offset)
            f.seek(self._offset - n)
            if f.read(n) == self._prefix:
                start = self._offset
        if start == 0 and (self._offset or self._skipping):
            self._reset()
        f.seek(start)
        consumed, pending = start, b""
        while consumed + len(pending) < self.max_bytes:
            chunk = f.read(min(_CHUNK, self.max_bytes - consumed - len(pending)))
            if not chunk:
                break
            self.bytes_read += len(chunk)
            if self._skipping:
                i = chunk.find(b"\n")
                if i < 0:
                    consumed += len(chunk)
                    continue
                consumed += i + 1
                chunk, self._skipping = chunk[i + 1:], False
            pending += chunk
            end = pending.rfind(b"\n") + 1
            if end:
                self._parse(pending[:end])
                consumed += end
                pending = pending[end:]
            if len(pending) > self.max_line:  # an over-long line: skipped, never re-read
                self.bad_lines += 1
                consumed += len(pending)
                pending, self._skipping = b"", True
        self.truncated = consumed + len(pending) >= self.max_bytes and size > self.max_bytes
        self.torn_tail = bool(pending)
        self._offset, self._ino = consumed, ino
        n = min(_PREFIX_CHECK, consumed)
        f.seek(consumed - n)
        self._prefix = f.read(n)

    def _parse(self, complete: bytes) -> None:
        for raw in complete.split(b"\n"):
            if not raw.strip():
                continue
            if len(raw) > self.max_line:
                self.bad_lines += 1
                continue
            try:
                obj = json.loads(raw)
            except JSON_ERRORS:
                self.bad_lines += 1
                continue
            if isinstance(obj, dict):
                self.records.append(obj)
            else:
                self.bad_lines += 1


#: Longest text from a run (an error message, a name) the page shows; the rest is cut.
MAX_SHOWN_CHARS = 300


def short_text(text: Any, limit: int = MAX_SHOWN_CHARS) -> str:
    """``str(text)`` cut to ``limit`` characters (with a note of how much was cut)."""
    s = text if isinstance(text, str) else str(text)
    if len(s) <= limit:
        return s
    return s[:limit] + f"… ({len(s) - limit:,} more characters not shown)"


def finite_or_none(x: Any) -> float | None:
    """``float(x)`` if ``x`` is a finite real number (not a bool), else None (never raises)."""
    return _finite_or_none(x)


def _finite_or_none(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError, OverflowError):
        return None
    return v if math.isfinite(v) else None


def valid_step(x: Any) -> int | None:
    """``x`` if it is an int step in [0, 2**63) (what the int64 frame holds), else None."""
    if isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_STEP:
        return x
    return None


_NOT_A_VARIANT = (None, None)


def _variant_or_none(v: Any, cache: dict[str, tuple[str | None, float | None]]) -> tuple[str | None, float | None]:
    """``(canonical variant, decay)`` of a record's ``variant`` string (decay None for raw/bema);
    ``(None, None)`` for anything that is not ``raw``, ``bema`` or a decay in [0, 1) (``"foo"``,
    ``"1.0"``, ``"nan"``). ``cache`` holds the answer per distinct string (a run has a few dozen)."""
    if not isinstance(v, str):
        return _NOT_A_VARIANT
    got = cache.get(v)
    if got is None:
        try:
            name = rf.parse_variant(v) if 0 < len(v) <= 64 else None
        except ValueError:
            name = None
        got = cache[v] = _NOT_A_VARIANT if name is None else (name, rf.decay_of(name))
    return got


def metric_records_to_frame(records: Iterable[dict[str, Any]]) -> tuple[pd.DataFrame, int]:
    """Validate metric records into a DataFrame with :data:`METRIC_COLUMNS`.

    Returns ``(frame, invalid)`` where ``invalid`` counts records skipped: without an integer
    ``step`` in [0, 2**63), with a ``variant`` that is not ``raw``, ``bema`` or a decay in [0, 1)
    (a decay is normalised: ``"0.99990"`` -> ``"0.9999"``), or without a metric name of 1 to
    :data:`MAX_METRIC_NAME` characters. ``value`` is float (NaN when null/non-finite/out of
    range), ``decay`` is the variant's decay (NaN for raw/bema). A repeated (step, variant,
    metric) keeps the last one. The optional ``se``, ``lo``, ``hi``, ``n`` are float columns, NaN
    when absent or not finite.
    Records scored on synthesised decays (a ``synthesized`` field) are left out (see
    :func:`synthesized_records_to_frame`).
    """
    rows = []
    invalid = 0
    variants: dict[str, tuple[str | None, float | None]] = {}
    for r in records:
        if rf.SYNTHESIZED in r:
            continue  # scored on synthesised weights: synthesized_records_to_frame
        step, metric = r.get("step"), r.get("metric")
        variant, decay = _variant_or_none(r.get("variant"), variants)
        if (
            type(step) is not int  # noqa: E721 - exactly int: bool is refused too
            or not 0 <= step <= MAX_STEP
            or variant is None
            or not isinstance(metric, str)
            or not 0 < len(metric) <= MAX_METRIC_NAME
        ):
            invalid += 1
            continue
        rows.append((step, variant, decay, metric, _finite_or_none(r.get("value")), _finite_or_none(r.get("time")),
                     *(_finite_or_none(r.get(k)) for k in rf.METRIC_INTERVAL_KEYS)))
    frame = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    frame = frame.astype(
        {
            "step": "int64",
            "variant": "object",
            "decay": "float64",
            "metric": "object",
            "value": "float64",
            "time": "float64",
            **dict.fromkeys(rf.METRIC_INTERVAL_KEYS, "float64"),
        }
    )
    if len(frame):
        frame = frame.drop_duplicates(["step", "variant", "metric"], keep="last").reset_index(drop=True)
    return frame, invalid


def synthesized_records_to_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The metric records scored on weights synthesised post hoc (docs/synthesis.md), with their
    error (:data:`SYNTH_COLUMNS`); invalid ones are skipped (the same checks as
    :func:`metric_records_to_frame`; a decay is required). These are kept out of the main frame:
    the grid's ranking stays the grid's, the dashboard draws them apart."""
    rows = []
    variants: dict[str, tuple[str | None, float | None]] = {}
    for r in records:
        mark = r.get(rf.SYNTHESIZED)
        if not isinstance(mark, dict):
            continue
        step, metric = r.get("step"), r.get("metric")
        variant, decay = _variant_or_none(r.get("variant"), variants)
        if (type(step) is not int or not 0 <= step <= MAX_STEP or variant is None  # noqa: E721
                or decay is None or not isinstance(metric, str) or not 0 < len(metric) <= MAX_METRIC_NAME):
            continue
        rows.append((step, variant, decay, metric, _finite_or_none(r.get("value")), _finite_or_none(r.get("time")),
                     _finite_or_none(mark.get("profile_residual")), _finite_or_none(mark.get("predicted_error")),
                     _finite_or_none(mark.get("error_bound"))))
    frame = pd.DataFrame(rows, columns=SYNTH_COLUMNS)
    frame = frame.astype({"step": "int64", "variant": "object", "decay": "float64", "metric": "object",
                          "value": "float64", "time": "float64", "profile_residual": "float64",
                          "predicted_error": "float64", "error_bound": "float64"})
    if len(frame):
        frame = frame.drop_duplicates(["step", "variant", "metric"], keep="last").reset_index(drop=True)
    return frame


#: Distinct variants and metric names of one run the dashboard keeps (a bank holds a few dozen).
MAX_VARIANTS = 256
MAX_METRICS = 256


def cap_frame(frame: pd.DataFrame, listed: Any = None, max_variants: int = MAX_VARIANTS,
              max_metrics: int = MAX_METRICS) -> tuple[pd.DataFrame, str | None]:
    """Keep at most ``max_variants`` variants and ``max_metrics`` metric names of a metrics frame.

    Variants named in run.json's ``variants`` (``listed``) come first, then the others in the order
    they first appear; metric names in first-appearance order. Returns ``(frame, note)`` where
    ``note`` says what was left out (None when nothing was).
    """
    notes = []
    variants = pd.unique(frame["variant"])
    if len(variants) > max_variants:
        first = [v for v in (listed if isinstance(listed, list) else []) if isinstance(v, str)]
        order = list(dict.fromkeys([v for v in first if v in set(variants)] + list(variants)))
        frame = frame[frame["variant"].isin(order[:max_variants])]
        notes.append(f"{len(variants):,} variants: only {max_variants} are shown")
    metrics = pd.unique(frame["metric"])
    if len(metrics) > max_metrics:
        frame = frame[frame["metric"].isin(metrics[:max_metrics])]
        notes.append(f"{len(metrics):,} metric names: only the first {max_metrics} are shown")
    if not notes:
        return frame, None
    return frame.reset_index(drop=True), "; ".join(notes)


def run_state(heartbeat: dict[str, Any] | None, now: float | None = None) -> str:
    """``"live"``, ``"finished"``, ``"stale"`` or ``"unknown"`` (:func:`emascope.runformat.run_state`)."""
    return rf.run_state(heartbeat, time.time() if now is None else now)


def clean_heartbeat(obj: dict[str, Any] | None) -> dict[str, Any] | None:
    """The heartbeat with its known fields checked: ``time`` and ``interval`` finite floats,
    ``step`` and ``pid`` ints in range, ``state`` a short string; a field that is not is dropped
    (other fields are kept as they are)."""
    if obj is None:
        return None
    out = dict(obj)
    for key in ("time", "interval"):
        if key in out and _finite_or_none(out[key]) is None:
            del out[key]
    for key in ("step", "pid"):
        if key in out and valid_step(out[key]) is None:
            del out[key]
    if "state" in out and not (isinstance(out["state"], str) and len(out["state"]) <= 32):
        del out["state"]
    return out


#: Longest run name shown (a longer ``name`` in run.json is cut).
MAX_NAME_CHARS = 120


@dataclass
class RunData:
    """A snapshot of one run directory, as the dashboard shows it."""

    path: Path
    info: dict[str, Any] | None
    metrics: pd.DataFrame
    events: list[dict[str, Any]]
    heartbeat: dict[str, Any] | None
    error: str | None = None  # set when the run cannot be shown (newer format, no run.json ...)
    bad_lines: dict[str, int] = field(default_factory=dict)  # per file: skipped lines/records
    torn_tail: dict[str, bool] = field(default_factory=dict)
    file_errors: dict[str, str] = field(default_factory=dict)  # per file: refused or cut short, and why
    #: metric records scored on synthesised decays (:func:`synthesized_records_to_frame`)
    synthesized: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SYNTH_COLUMNS))

    @property
    def name(self) -> str:
        name = (self.info or {}).get("name")
        name = name if isinstance(name, str) and name.strip() else self.path.name
        return name if len(name) <= MAX_NAME_CHARS else name[: MAX_NAME_CHARS - 1] + "…"

    @property
    def directions(self) -> dict[str, str]:
        """Metric name -> ``"lower"``/``"higher"``; unknown directions are left out."""
        raw = (self.info or {}).get("metric_directions") or {}
        if not isinstance(raw, dict):
            return {}
        return {str(k): v for k, v in raw.items() if isinstance(v, str) and v in rf.DIRECTIONS}

    @property
    def sample_kind(self) -> str | None:
        kind = (self.info or {}).get("sample_kind")
        return kind if isinstance(kind, str) and kind in rf.SAMPLE_KINDS else None

    def state(self, now: float | None = None) -> str:
        return run_state(self.heartbeat, now)

    def last_step(self) -> int | None:
        steps = []
        if self.heartbeat and valid_step(self.heartbeat.get("step")) is not None:
            steps.append(self.heartbeat["step"])
        steps += [e["step"] for e in self.events if valid_step(e.get("step")) is not None]
        if len(self.metrics):
            steps.append(int(self.metrics["step"].max()))
        return max(steps) if steps else None

    def events_of(self, *types: str) -> list[dict[str, Any]]:
        return [e for e in self.events if isinstance(e.get("type"), str) and e["type"] in types]

    def stages(self) -> list[dict[str, Any]]:
        """Every scoring stage's state, by step: ``pending``, ``scoring`` (``done``/``total``
        variants), ``done``, ``skipped`` or ``failed``, and the ``scorer`` that took it
        (:func:`emascope.runformat.stage_states`; from events.jsonl only). A stage whose step is
        not in [0, 2^63) is left out; the page cuts scorer names and reasons (``short_text``)."""
        return [st for step, st in sorted(rf.stage_states(self.events).items()) if valid_step(step) is not None]

    def error_banner(self) -> str | None:
        """One line saying the agent reported errors (how many, of which kinds, the last one), or
        ``None``. The training job's own exception (``where: "training"``) is named as such."""
        errors = self.events_of("error")
        if not errors:
            return None
        kinds = sorted({str(e.get("where")) for e in errors})
        last = errors[-1]
        message = str(last.get("message") or "").strip().splitlines()
        first = message[0] if message else "no message"
        first = first if len(first) <= 200 else first[:197] + "..."
        step = last.get("step")
        at = f"step {step:,}" if isinstance(step, int) else "an unknown step"
        return (f"The agent reported {len(errors)} error{'s' if len(errors) != 1 else ''} "
                f"({', '.join(kinds)}); some scores may be missing. Last, at {at} in "
                f"{last.get('where')}{' (' + str(last['variant']) + ')' if last.get('variant') else ''}: {first}")


class RunReader:
    """Holds the per-file caches of one run directory; :meth:`load` returns a fresh RunData.

    Thread-safe (one lock): several browser sessions may share one reader. No read blocks (FIFOs
    and devices are refused), so the lock is never held waiting on a file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.root = resolved_root(self.path)
        base = Path(self.root)
        self._run = JsonFileCache(base / rf.RUN_JSON, self.root)
        self._heartbeat = JsonFileCache(base / rf.HEARTBEAT, self.root)
        self._metrics = JsonlReader(base / rf.METRICS, self.root)
        self._events = JsonlReader(base / rf.EVENTS, self.root)
        self._frame = pd.DataFrame(columns=METRIC_COLUMNS)
        self._synth = pd.DataFrame(columns=SYNTH_COLUMNS)
        self._invalid = 0
        self._capped: str | None = None
        self._lock = threading.Lock()
        self.frame_builds = 0

    def _file_errors(self) -> dict[str, str]:
        out = {}
        if self._heartbeat.error and self._heartbeat.error != "missing":
            out[rf.HEARTBEAT] = self._heartbeat.error
        for name, r in ((rf.METRICS, self._metrics), (rf.EVENTS, self._events)):
            if r.error:
                out[name] = f"refused: {r.error}"
            elif r.truncated:
                out[name] = (f"larger than the {r.max_bytes // (1024 * 1024)} MB the dashboard reads: "
                             "later records are not shown")
        if self._capped and rf.METRICS not in out:
            out[rf.METRICS] = self._capped
        return out

    def load(self) -> RunData:
        """Re-read what changed and return the current state of the run (never raises on data)."""
        with self._lock:
            self._run.read()
            self._heartbeat.read()
            self._events.read()
            info = self._run.value
            error = None
            if info is None:
                error = f"run.json is {self._run.error or 'missing'}"
            else:
                try:
                    check_format_version(info)
                except ValueError as exc:
                    error = short_text(exc)
            if error is None and self._metrics.read():
                frame, self._invalid = metric_records_to_frame(self._metrics.records)
                self._frame, self._capped = cap_frame(frame, info.get("variants"))
                self._synth = synthesized_records_to_frame(self._metrics.records)
                self.frame_builds += 1
            return RunData(
                path=self.path,
                info=info,
                metrics=self._frame if error is None else pd.DataFrame(columns=METRIC_COLUMNS),
                events=list(self._events.records),
                heartbeat=clean_heartbeat(self._heartbeat.value),
                error=error,
                bad_lines={
                    rf.METRICS: self._metrics.bad_lines + self._invalid,
                    rf.EVENTS: self._events.bad_lines,
                },
                torn_tail={rf.METRICS: self._metrics.torn_tail, rf.EVENTS: self._events.torn_tail},
                file_errors=self._file_errors(),
                synthesized=self._synth if error is None else pd.DataFrame(columns=SYNTH_COLUMNS),
            )


def load_run(path: str | os.PathLike) -> RunData:
    """One-shot read of a run directory (no caching across calls)."""
    return RunReader(path).load()


def sample_stages(run_dir: str | os.PathLike) -> list[int]:
    """Steps that have a ``samples/step_<step:09d>/`` folder, ascending."""
    base = Path(run_dir) / rf.SAMPLES
    steps = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return []
    for e in entries:
        step = rf.parse_stage_dir_name(e.name)
        try:
            if step is not None and e.is_dir(follow_symlinks=False):
                steps.append(step)
        except OSError:
            continue
    return sorted(steps)


def sample_files(run_dir: str | os.PathLike, step: int) -> dict[str, Path]:
    """Variant -> preview file (``.png`` or ``.npy``) of one stage; temp/hidden files are ignored."""
    folder = Path(run_dir) / rf.stage_dir(step)
    out: dict[str, Path] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return out
    for e in entries:
        try:
            if e.name.startswith(".") or not e.is_file():
                continue
        except OSError:
            continue
        stem, ext = os.path.splitext(e.name)
        if ext in rf.PREVIEW_EXTS:
            out[stem] = Path(e.path)
    return out


def read_preview(path: str | os.PathLike, run_dir: str | os.PathLike,
                 max_bytes: int = MAX_PREVIEW_BYTES) -> bytes | None:
    """The bytes of a preview file of the run (regular, inside the run, at most ``max_bytes``),
    or None when it is refused or unreadable."""
    try:
        return read_capped(os.path.join(resolved_root(run_dir), os.path.relpath(path, run_dir)),
                           resolved_root(run_dir), max_bytes)
    except (OSError, ValueError):
        return None


def _npy_from_bytes(data: bytes) -> np.ndarray:
    """Parse an .npy held in memory, checking that the header's shape fits the bytes before
    allocating anything (``allow_pickle=False``: object arrays are refused)."""
    f = io.BytesIO(data)
    version = npy_format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = npy_format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if dtype.hasobject:
        raise ValueError("object arrays are not read")
    count = math.prod(shape)
    if count * dtype.itemsize != len(data) - f.tell():
        raise ValueError("the .npy header does not match its data (half-written or crafted)")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=f.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def load_points(path: str | os.PathLike, max_points: int = 5000,
                run_dir: str | os.PathLike | None = None) -> np.ndarray | None:
    """A float32 ``[n, d]`` point array (``allow_pickle=False``), or None if unreadable/half-written.

    The file is read through :func:`read_preview` (regular, inside ``run_dir`` — default: its
    folder —, at most :data:`~emascope.dashboard.files.MAX_PREVIEW_BYTES`), and its header is
    checked against its size before anything is allocated. At most ``max_points`` rows are
    returned (evenly strided) to keep scatter plots fast.
    """
    data = read_preview(path, run_dir if run_dir is not None else Path(path).parent)
    if data is None:
        return None
    try:
        arr = _npy_from_bytes(data)
    except (ValueError, EOFError, SyntaxError, TypeError, OverflowError, MemoryError):
        return None
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0 or not np.issubdtype(arr.dtype, np.number):
        return None
    if arr.shape[0] > max_points:
        arr = arr[:: int(math.ceil(arr.shape[0] / max_points))]
    return arr.astype(np.float32, copy=True)
