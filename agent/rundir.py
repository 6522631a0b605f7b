"""RunWriter: everything the agent writes into a run directory (docs/run-format.md; names: emascope.runformat).

Every write goes through :meth:`RunWriter._guard`: an ``OSError`` (full disk, permissions, a
vanished folder) or any other exception raised while writing is caught, counted and logged, and
never propagates into the training job. Files that are replaced use ``emascope.atomic``; logs are
appended one whole line per write.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emascope import runformat as rf
from emascope.atomic import (
    append_jsonl,
    append_jsonl_lines,
    atomic_write_bytes,
    atomic_write_json,
    remove_stale_temp_files,
    terminate_torn_line,
)

log = logging.getLogger(__name__)


def check_run_dir(run_dir: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Check that ``run_dir`` may be used, writing nothing; returns it as a ``Path``.

    A folder that already holds a run (any of ``run.json``, ``metrics.jsonl``, ``events.jsonl``)
    is refused unless ``resume=True`` (append to it) or ``overwrite=True``. ``resume=True`` refuses
    a ``metrics.jsonl`` / ``events.jsonl`` that exists but is not a regular file. Raises ``ValueError``.
    """
    if overwrite and resume:
        raise ValueError("overwrite=True and resume=True exclude each other")
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"run_dir {str(path)!r} exists and is not a directory")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"run_dir {str(path)!r}: {str(parent)!r} is not a directory")
            break
    existing = [n for n in rf.RUN_MARKERS if (path / n).exists()]
    if existing and not (overwrite or resume):
        raise ValueError(f"run_dir {str(path)!r} already holds a run ({', '.join(existing)}); "
                         "pass resume=True to append to it or overwrite=True to replace it")
    if resume:
        for name in rf.APPENDED:  # appended to in place: a FIFO or device there would block or swallow records
            if (path / name).exists() and not (path / name).is_file():
                raise ValueError(f"resume=True: {name} of the run {str(path)!r} is not a regular file "
                                 "(a FIFO, device or folder); remove it, or pass overwrite=True to start afresh")
    return path


def prepare_run_dir(run_dir: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create ``run_dir`` or check it may be used (:func:`check_run_dir`); returns it as a ``Path``.

    With ``overwrite=True`` the old run's files are deleted (the reference-feature cache and
    ``exports/`` are kept); with ``resume=True`` a torn last line of a JSONL file is terminated.
    """
    path = check_run_dir(run_dir, overwrite=overwrite, resume=resume)
    if overwrite and any((path / n).exists() for n in rf.RUN_MARKERS):
        for name in rf.RUN_FILES:
            (path / name).unlink(missing_ok=True)
        for name in rf.RUN_DIRS:
            shutil.rmtree(path / name, ignore_errors=True)
    for sub in rf.SUBDIRS:
        (path / sub).mkdir(parents=True, exist_ok=True)
    if resume:
        for name in rf.APPENDED:
            terminate_torn_line(path / name)
    return path


@dataclass(frozen=True)
class RunDirState:
    """What a run directory held before ``attach`` wrote anything, to undo a failed start.

    ``created``: the topmost folder that did not exist (``None`` if ``run_dir`` existed); undoing
    removes it whole. Otherwise ``sizes`` (append-only files: bytes before) and ``contents`` (the
    other top-level run files: their bytes, ``None`` if absent) restore the files, and ``subdirs``
    lists the run's folders that existed (the others are removed).
    """

    created: Path | None
    sizes: dict[str, int | None]
    contents: dict[str, bytes | None]
    subdirs: frozenset[str]


def run_dir_state(run_dir: str | os.PathLike, *, overwrite: bool = False) -> RunDirState:
    """Record :class:`RunDirState` (reads only). With ``overwrite`` the old run's files are about to be
    deleted: undoing then removes the new ones, it cannot bring the old ones back.

    Top-level run files are small; one larger than :data:`emascope.runformat.MAX_RUN_FILE_BYTES` is
    refused unread (``ValueError`` naming it, before anything is written), and only regular files
    are read (a FIFO or device is recorded as absent)."""
    path = Path(run_dir).absolute()
    if not path.exists():
        created = path
        while not created.parent.exists() and created.parent != created:
            created = created.parent
        return RunDirState(created, {}, {}, frozenset())
    sizes: dict[str, int | None] = {}
    contents: dict[str, bytes | None] = {}
    for name in rf.RUN_FILES:
        f = path / name
        if overwrite:
            (sizes if name in rf.APPENDED else contents)[name] = None
            continue
        if name in rf.APPENDED:
            sizes[name] = f.stat().st_size if f.is_file() else None
        else:
            contents[name] = _read_run_file(f)
    return RunDirState(None, sizes, contents, frozenset(n for n in rf.SUBDIRS if (path / n).is_dir()))


def _read_run_file(f: Path) -> bytes | None:
    """A top-level run file's bytes (``None``: absent, unreadable or not a regular file); ``ValueError``
    when it is larger than :data:`emascope.runformat.MAX_RUN_FILE_BYTES` (read at most that plus one)."""
    limit = rf.MAX_RUN_FILE_BYTES
    too_big = ValueError(f"{str(f)!r} is larger than {limit // 2**20} MiB, which no run file of emascope's is: "
                         "it is not a run of this package (move it away, or pass overwrite=True)")
    try:
        if not f.is_file():
            return None
        if f.stat().st_size > limit:
            raise too_big
        with open(f, "rb") as fh:
            body = fh.read(limit + 1)
    except OSError:
        return None
    if len(body) > limit:
        raise too_big
    return body


def undo_start(run_dir: str | os.PathLike, state: RunDirState) -> None:
    """Undo what a failed start wrote into ``run_dir`` (see :class:`RunDirState`). Never raises."""
    path = Path(run_dir).absolute()
    try:
        if state.created is not None:
            shutil.rmtree(state.created, ignore_errors=True)
            return
        for name, size in state.sizes.items():
            f = path / name
            if size is None:
                f.unlink(missing_ok=True)
            elif f.is_file() and f.stat().st_size > size:
                os.truncate(f, size)
        for name, body in state.contents.items():
            if body is None:
                (path / name).unlink(missing_ok=True)
            else:
                atomic_write_bytes(path / name, body)
        for name in rf.SUBDIRS:
            if name not in state.subdirs:
                shutil.rmtree(path / name, ignore_errors=True)
    except Exception as exc:  # noqa: BLE001 - the original error is the one to report
        log.warning("emascope: could not undo the failed start in %s: %s", path, exc)


def remove_stale_temps(run_dir: str | os.PathLike) -> list[tuple[str, int]]:
    """Remove temp files of atomic writes left in the run by a killed writer (``kill -9`` during a
    snapshot leaves ``banks/.latest.safetensors.<random>.tmp``, as large as the bank).

    Only this package's temp-file pattern (:func:`emascope.runformat.is_temp_file_name`), only
    regular files, only in the run's own folders (the run directory, its real subfolders and the
    stage folders under ``samples/``; a symlinked folder is skipped). In folders other processes
    write to (:data:`~emascope.runformat.SHARED_DIRS`) only files older than
    :data:`~emascope.runformat.STALE_TEMP_AGE_S` go. Returns ``(path relative to the run, bytes)``.
    """
    base = Path(run_dir)
    folders: list[tuple[Path, float]] = [(base, 0.0)]
    for name in rf.SUBDIRS:
        try:
            sub = rf.run_subdir(base, name)
        except (OSError, ValueError):
            continue
        folders.append((sub, rf.STALE_TEMP_AGE_S if name in rf.SHARED_DIRS else 0.0))
        if name == rf.SAMPLES:
            try:
                stages = [e for e in os.scandir(sub) if rf.parse_stage_dir_name(e.name) is not None
                          and e.is_dir(follow_symlinks=False)]
            except OSError:
                stages = []
            folders += [(Path(e.path), 0.0) for e in stages]
    removed = []
    for folder, age in folders:
        for path, size in remove_stale_temp_files(folder, min_age_s=age):
            removed.append((path.relative_to(base).as_posix(), size))
    return removed


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxxxx`` (UTC time + 6 random hex digits)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + os.urandom(3).hex()


class RunWriter:
    """Writes run.json, metrics.jsonl, events.jsonl, heartbeat and samples/ of one run.

    ``step_fn`` returns the current optimizer step (read by the heartbeat thread). Writes never
    raise: failures are counted in ``num_write_errors`` and the last one kept in ``last_error``.
    """

    def __init__(self, run_dir: str | os.PathLike, *, step_fn: Callable[[], int] = lambda: 0,
                 heartbeat_interval: float = 2.0) -> None:
        if heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be > 0 seconds, got {heartbeat_interval}")
        self.run_dir = Path(run_dir)
        self.step_fn = step_fn
        self.heartbeat_interval = float(heartbeat_interval)
        self.num_write_errors = 0
        self.last_error: str | None = None
        self.num_errors = 0                # error events recorded
        self._told: set[str] = set()       # ``where`` values already logged to the console
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- failure isolation ---------------------------------------------------------------------

    def _guard(self, where: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a write must never reach the training loop
            self.num_write_errors += 1
            self.last_error = f"{where}: {type(exc).__name__}: {exc}"
            if self.num_write_errors <= 3 or self.num_write_errors % 100 == 0:
                log.warning("emascope: could not write %s (%s); training continues", where, exc)
            return None

    # -- files ---------------------------------------------------------------------------------

    def write_run_json(self, info: dict[str, Any], *, strict: bool = False) -> None:
        """Replace run.json atomically (``format``/``format_version`` are filled in).

        ``strict`` (at attach): a write error raises instead of being logged."""
        body = {**rf.run_json_header(), **info}
        if strict:
            atomic_write_json(self.run_dir / rf.RUN_JSON, body)
            return
        self._guard(rf.RUN_JSON, lambda: atomic_write_json(self.run_dir / rf.RUN_JSON, body))

    def metric(self, step: int, variant: str, metric: str, value: float | None, *,
               synthesized: dict[str, Any] | None = None, **interval: Any) -> None:
        """Append one metrics.jsonl line (``value`` must already be finite or None; ``interval``:
        the optional ``se``, ``lo``, ``hi``, ``n`` of :func:`emascope.runformat.metric_record`;
        ``synthesized``: the error of a post-hoc synthesised variant
        (:func:`emascope.runformat.synthesis_record`))."""
        self._append(rf.METRICS, rf.metric_record(step, variant, metric, value, time.time(),
                                                  synthesized=synthesized, **interval))

    def metrics(self, records: list[dict[str, Any]]) -> None:
        """Append metrics.jsonl records (:func:`emascope.runformat.metric_record`) in one write."""
        def write() -> None:
            with self._lock:
                append_jsonl_lines(self.run_dir / rf.METRICS, [_json_safe(r) for r in records])
        self._guard(rf.METRICS, write)

    def event(self, type: str, step: int, **fields: Any) -> None:
        """Append one events.jsonl line ``{"time", "step", "type", **fields}``."""
        self._append(rf.EVENTS, rf.event_record(type, step, time.time(), **fields))

    def error(self, where: str, step: int, exc: BaseException, variant: str | None = None, *,
              tell: bool = True) -> None:
        """Record an ``error`` event with the exception's message and traceback.

        The first error of each ``where`` is also logged (a ``logging`` warning of the
        ``emascope`` logger, shown on the training console by default) with the message and where
        to read the rest; later errors of the same kind are only recorded and counted. ``tell=False``
        records without logging (the training job's own exception, which the user sees anyway)."""
        message = f"{type(exc).__name__}: {exc}"
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.event("error", step, where=where, variant=variant, message=message, traceback=tb[-8000:])
        self.num_errors += 1
        if tell and where not in self._told:
            self._told.add(where)
            on = f" ({variant})" if variant else ""
            log.warning("emascope: %s failed at step %d%s: %s -- recorded in %s (traceback) and shown on the "
                        "dashboard; later %s errors are only recorded; training continues",
                        where, step, on, _one_line(message), self.run_dir / rf.EVENTS, where)

    def _append(self, name: str, rec: dict[str, Any]) -> None:
        def write() -> None:
            with self._lock:
                append_jsonl(self.run_dir / name, _json_safe(rec))
        self._guard(name, write)

    def save_points(self, relpath: str, points: np.ndarray) -> None:
        """Save float32 ``[n, d]`` points as ``.npy`` atomically (``relpath`` inside the run dir)."""
        def write() -> None:
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(points, dtype=np.float32), allow_pickle=False)
            atomic_write_bytes(self.run_dir / relpath, buf.getvalue())
        self._guard(relpath, write)

    def save_image_grid(self, relpath: str, images_uint8: np.ndarray) -> None:
        """Save uint8 ``[n, C, H, W]`` images as one PNG grid atomically."""
        def write() -> None:
            atomic_write_bytes(self.run_dir / relpath, png_grid(images_uint8))
        self._guard(relpath, write)

    # -- heartbeat -----------------------------------------------------------------------------

    def beat(self, state: str = rf.STATE_RUNNING) -> None:
        """Rewrite the heartbeat file once."""
        body = rf.heartbeat_record(step=self.step_fn(), pid=os.getpid(), state=state,
                                   interval=self.heartbeat_interval, time=time.time())
        self._guard(rf.HEARTBEAT, lambda: atomic_write_json(self.run_dir / rf.HEARTBEAT, body))

    def start_heartbeat(self) -> None:
        """Start the daemon thread that rewrites the heartbeat every ``heartbeat_interval`` s."""
        if self._thread is not None:
            return
        self.beat()

        def loop() -> None:
            while not self._stop.wait(self.heartbeat_interval):
                self.beat()

        self._thread = threading.Thread(target=loop, name="emascope-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self, *, final: bool = True) -> None:
        """Stop the thread and (``final``) write the last heartbeat, state ``"closed"``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        if final:
            self.beat(rf.STATE_CLOSED)


class StageWriter:
    """What one sweep writes when it runs off the training thread (background or external).

    Same methods as :class:`RunWriter` for what a sweep writes. Metric records are buffered and
    written by :meth:`commit` in one append, so a sweep that is abandoned (hung, killed) leaves no
    half stage in metrics.jsonl; events and previews (atomic files, rewritten identically when the
    stage is scored again) go through at once. After :meth:`mute` nothing more is written (an
    abandoned sweep that wakes up later). ``on_write()`` is called on every write (liveness).
    ``score_done`` and ``comparison`` events are held back and written after the records
    (:meth:`commit`): an abandoned sweep leaves no comparison of records that were never written.
    """

    HELD = ("score_done", rf.EVENT_COMPARISON)

    def __init__(self, base: RunWriter, on_write: Callable[[], None] | None = None) -> None:
        self.base = base
        self.run_dir = base.run_dir
        self.on_write = on_write or (lambda: None)
        self.pending: list[dict[str, Any]] = []
        self.held: list[tuple[str, int, dict[str, Any]]] = []  # events written after the records
        self.muted = False
        self._lock = threading.Lock()

    def mute(self) -> None:
        """Drop everything from now on (the buffered records too)."""
        with self._lock:
            self.muted = True
            self.pending, self.held = [], []

    def metric(self, step: int, variant: str, metric: str, value: float | None, **interval: Any) -> None:
        with self._lock:
            if not self.muted:
                self.pending.append(rf.metric_record(step, variant, metric, value, time.time(), **interval))
        self.on_write()

    def commit(self, before: Callable[[], bool] = lambda: True,
               then: Callable[[int], Any] = lambda n: None) -> int | None:
        """Write the buffered records in one append (unless muted or ``before()`` is false), call
        ``then(count)`` (e.g. write the done marker), then the held-back ``score_done`` event.
        Returns how many records were written, ``None`` when nothing was."""
        with self._lock:
            if self.muted or not before():
                return None
            records, self.pending = self.pending, []
            held, self.held = self.held, []
            self.base.metrics(records)
            then(len(records))
            for type_, step, fields in held:
                self.base.event(type_, step, **fields)
            return len(records)

    def _through(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if self.muted:
                return None
        self.on_write()
        return fn()

    def event(self, type: str, step: int, **fields: Any) -> None:
        if type in self.HELD:
            with self._lock:
                if not self.muted:
                    self.held.append((type, step, fields))
            return
        self._through(lambda: self.base.event(type, step, **fields))

    def error(self, where: str, step: int, exc: BaseException, variant: str | None = None, *,
              tell: bool = True) -> None:
        self._through(lambda: self.base.error(where, step, exc, variant=variant, tell=tell))

    def save_points(self, relpath: str, points: np.ndarray) -> None:
        self._through(lambda: self.base.save_points(relpath, points))

    def save_image_grid(self, relpath: str, images_uint8: np.ndarray) -> None:
        self._through(lambda: self.base.save_image_grid(relpath, images_uint8))

    def _guard(self, where: str, fn: Callable[[], Any]) -> Any:
        return self._through(lambda: self.base._guard(where, fn))


def png_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> bytes:
    """Tile uint8 images ``[n, C, H, W]`` (C = 1 or 3) into one PNG (PIL), ``pad`` px apart."""
    from PIL import Image

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"png_grid takes uint8 [n, C, H, W] with C in (1, 3), got {images.dtype} "
                         f"{images.shape}")
    n, c, h, w = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[i].transpose(1, 2, 0)
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _one_line(text: str, limit: int = 300) -> str:
    """The first line of a message, at most ``limit`` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def host_info() -> dict[str, Any]:
    """``host`` and ``pid`` fields of run.json."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _json_safe(obj: Any) -> Any:
    """Replace non-finite floats by None (JSON has no NaN) and numpy scalars by Python ones."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
