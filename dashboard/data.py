"""Read emascope run directories (docs/run-format.md) into plain Python and pandas.

No Streamlit and no torch here. Every reader is tolerant: a torn or invalid line is skipped and
counted, a half-written or missing JSON file reads as "not there yet", never as a crash. Files are
re-read only when they changed (key: path + mtime_ns + size + inode); append-only JSONL files are
read incrementally from the last complete line when they grew and the bytes before that point
are unchanged.

Conventions: ``step`` is the optimizer step of a scoring stage; ``decay`` is the EMA decay ``d``
(0.9999), never ``1 - d``; ``variant`` is ``"raw"``, ``repr(float(d))`` or ``"bema"``.
"""

from __future__ import annotations

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

from emascope import runformat as rf
from emascope.runformat import FormatVersionError, check_format_version  # noqa: F401 (re-exported)

METRIC_COLUMNS = list(rf.METRIC_KEYS)
#: Columns of :attr:`RunData.synthesized`: the metric columns plus the synthesis's measured error.
SYNTH_COLUMNS = [*METRIC_COLUMNS, "profile_residual", "predicted_error", "error_bound"]
_PREFIX_CHECK = 64  # bytes before the read offset compared to detect a rewritten file
_SKIP_DIRS = {*rf.SUBDIRS, "__pycache__", "node_modules"}


def discover_runs(root: str | os.PathLike) -> list[Path]:
    """Run directories at or below ``root``: folders holding a ``run.json``, sorted by path.

    ``root`` may itself be a run directory. The search does not descend into a run's own
    sub-folders (samples/, banks/, ...) nor into hidden folders. A missing root is a ValueError.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"not a directory: {str(root)!r}")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        if rf.RUN_JSON in filenames:
            found.append(Path(dirpath))
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        else:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found)


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class JsonFileCache:
    """A small JSON object file (run.json, heartbeat, status files) re-read only when it changed.

    A file that is missing, half-written or not a JSON object reads as ``None`` (and ``error``
    says why) without raising.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
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
            obj = json.loads(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            self._key, self.value, self.error = None, None, f"unreadable: {exc}"
            return True
        if not isinstance(obj, dict):
            self._key, self.value, self.error = key, None, "not a JSON object"
            return True
        self._key, self.value, self.error = key, obj, None
        return True


class JsonlReader:
    """Incremental reader of an append-only JSON Lines file.

    Only complete lines (ending in ``\\n``) are parsed; a torn last line is held back until it is
    completed (``torn_tail`` is True meanwhile). Lines that are not a JSON object are skipped and
    counted in ``bad_lines``. When the file grew and the bytes just before the last offset are
    unchanged, only the new bytes are read; if it shrank, was replaced or rewritten, it is re-read
    from the start.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        self.bad_lines = 0
        self.torn_tail = False
        self.bytes_read = 0  # total bytes read from disk (for tests of incrementality)
        self._key: tuple[int, int, int] | None = None
        self._offset = 0
        self._ino: int | None = None
        self._prefix = b""

    def _reset(self) -> None:
        self.records, self.bad_lines, self.torn_tail = [], 0, False
        self._offset, self._prefix, self._ino = 0, b"", None

    def read(self) -> bool:
        """Read what is new. Returns True if ``records`` (or counters) may have changed."""
        key = _stat_key(self.path)
        if key is not None and key == self._key:
            return False
        if key is None:
            changed = bool(self.records) or self._key is not None
            self._reset()
            self._key = None
            return changed
        _, size, ino = key
        try:
            with open(self.path, "rb") as f:
                start = 0
                if ino == self._ino and size >= self._offset and self._offset > 0:
                    n = min(_PREFIX_CHECK, self._offset)
                    f.seek(self._offset - n)
                    if f.read(n) == self._prefix:
                        start = self._offset
                if start == 0 and self._offset:
                    self._reset()
                f.seek(start)
                data = f.read()
        except OSError:
            return False
        self.bytes_read += len(data)
        end = data.rfind(b"\n") + 1
        complete = data[:end]
        for raw in complete.split(b"\n"):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                self.bad_lines += 1
                continue
            if isinstance(obj, dict):
                self.records.append(obj)
            else:
                self.bad_lines += 1
        self._offset = start + end
        self._ino = ino
        self.torn_tail = end < len(data)
        if end:
            tail = (self._prefix + complete)[-_PREFIX_CHECK:]
            self._prefix = tail
        self._key = key
        return True


def _finite_or_none(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def metric_records_to_frame(records: Iterable[dict[str, Any]]) -> tuple[pd.DataFrame, int]:
    """Validate metric records into a DataFrame with :data:`METRIC_COLUMNS`.

    Returns ``(frame, invalid)`` where ``invalid`` counts records without an integer ``step``,
    a string ``variant`` or a string ``metric``. ``value`` is float (NaN when null/non-finite),
    ``decay`` is float (NaN for raw/bema). A repeated (step, variant, metric) keeps the last one.
    Records scored on synthesised decays (a ``synthesized`` field) are left out (see
    :func:`synthesized_records_to_frame`).
    """
    rows = []
    invalid = 0
    for r in records:
        if rf.SYNTHESIZED in r:
            continue  # scored on synthesised weights: synthesized_records_to_frame
        step, variant, metric = r.get("step"), r.get("variant"), r.get("metric")
        if (
            not isinstance(step, int)
            or isinstance(step, bool)
            or not isinstance(variant, str)
            or not isinstance(metric, str)
            or not variant
            or not metric
        ):
            invalid += 1
            continue
        value = _finite_or_none(r.get("value"))
        decay = _finite_or_none(r.get("decay"))
        t = _finite_or_none(r.get("time"))
        rows.append((step, variant, decay, metric, value, t))
    frame = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    frame = frame.astype(
        {
            "step": "int64",
            "variant": "object",
            "decay": "float64",
            "metric": "object",
            "value": "float64",
            "time": "float64",
        }
    )
    if len(frame):
        frame = frame.drop_duplicates(["step", "variant", "metric"], keep="last").reset_index(drop=True)
    return frame, invalid


def synthesized_records_to_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The metric records scored on weights synthesised post hoc (docs/synthesis.md), with their
    error (:data:`SYNTH_COLUMNS`); invalid ones are skipped. These are kept out of the main frame:
    the grid's ranking stays the grid's, the dashboard draws them apart."""
    rows = []
    for r in records:
        mark = r.get(rf.SYNTHESIZED)
        step, variant, metric = r.get("step"), r.get("variant"), r.get("metric")
        if not isinstance(mark, dict) or not isinstance(step, int) or isinstance(step, bool) \
                or not isinstance(variant, str) or not isinstance(metric, str):
            continue
        decay = _finite_or_none(r.get("decay"))
        if decay is None:
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


def run_state(heartbeat: dict[str, Any] | None, now: float | None = None) -> str:
    """``"live"``, ``"finished"``, ``"stale"`` or ``"unknown"`` (:func:`emascope.runformat.run_state`)."""
    return rf.run_state(heartbeat, time.time() if now is None else now)


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
    #: metric records scored on synthesised decays (:func:`synthesized_records_to_frame`)
    synthesized: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SYNTH_COLUMNS))

    @property
    def name(self) -> str:
        if self.info and isinstance(self.info.get("name"), str):
            return self.info["name"]
        return self.path.name

    @property
    def directions(self) -> dict[str, str]:
        """Metric name -> ``"lower"``/``"higher"``; unknown directions are left out."""
        raw = (self.info or {}).get("metric_directions") or {}
        if not isinstance(raw, dict):
            return {}
        return {str(k): v for k, v in raw.items() if v in rf.DIRECTIONS}

    @property
    def sample_kind(self) -> str | None:
        kind = (self.info or {}).get("sample_kind")
        return kind if kind in rf.SAMPLE_KINDS else None

    def state(self, now: float | None = None) -> str:
        return run_state(self.heartbeat, now)

    def last_step(self) -> int | None:
        steps = []
        if self.heartbeat and isinstance(self.heartbeat.get("step"), int):
            steps.append(self.heartbeat["step"])
        steps += [e["step"] for e in self.events if isinstance(e.get("step"), int)]
        if len(self.metrics):
            steps.append(int(self.metrics["step"].max()))
        return max(steps) if steps else None

    def events_of(self, *types: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") in types]

    def stages(self) -> list[dict[str, Any]]:
        """Every scoring stage's state, by step: ``pending``, ``scoring`` (``done``/``total``
        variants), ``done``, ``skipped`` or ``failed``, and the ``scorer`` that took it
        (:func:`emascope.runformat.stage_states`; from events.jsonl only)."""
        return [st for _, st in sorted(rf.stage_states(self.events).items())]

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

    Thread-safe (one lock): several browser sessions may share one reader.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._run = JsonFileCache(self.path / rf.RUN_JSON)
        self._heartbeat = JsonFileCache(self.path / rf.HEARTBEAT)
        self._metrics = JsonlReader(self.path / rf.METRICS)
        self._events = JsonlReader(self.path / rf.EVENTS)
        self._frame = pd.DataFrame(columns=METRIC_COLUMNS)
        self._synth = pd.DataFrame(columns=SYNTH_COLUMNS)
        self._invalid = 0
        self._lock = threading.Lock()
        self.frame_builds = 0

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
                    error = str(exc)
            if error is None and self._metrics.read():
                self._frame, self._invalid = metric_records_to_frame(self._metrics.records)
                self._synth = synthesized_records_to_frame(self._metrics.records)
                self.frame_builds += 1
            return RunData(
                path=self.path,
                info=info,
                metrics=self._frame if error is None else pd.DataFrame(columns=METRIC_COLUMNS),
                events=list(self._events.records),
                heartbeat=self._heartbeat.value,
                error=error,
                bad_lines={
                    rf.METRICS: self._metrics.bad_lines + self._invalid,
                    rf.EVENTS: self._events.bad_lines,
                },
                torn_tail={rf.METRICS: self._metrics.torn_tail, rf.EVENTS: self._events.torn_tail},
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
        if step is not None and e.is_dir():
            steps.append(step)
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
        if e.name.startswith(".") or not e.is_file():
            continue
        stem, ext = os.path.splitext(e.name)
        if ext in rf.PREVIEW_EXTS:
            out[stem] = Path(e.path)
    return out


def load_points(path: str | os.PathLike, max_points: int = 5000) -> np.ndarray | None:
    """A float32 ``[n, d]`` point array (``allow_pickle=False``), or None if unreadable/half-written.

    At most ``max_points`` rows are returned (evenly strided) to keep scatter plots fast.
    """
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if arr.ndim != 2 or arr.shape[0] == 0 or not np.issubdtype(arr.dtype, np.number):
        return None
    if arr.shape[0] > max_points:
        arr = arr[:: int(math.ceil(arr.shape[0] / max_points))]
    return arr.astype(np.float32, copy=False)
