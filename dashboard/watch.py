"""File watching for live refresh: a watchdog observer (or a polling one) bumps a change counter.

The observer threads never touch Streamlit: they only increment :class:`ChangeCounter`. The app
polls the counter from a small ``st.fragment(run_every=1)`` and reruns when it moved.

Only writes that matter are counted (:func:`is_relevant`): modified / created / moved-to events
of ``run.json``, ``metrics.jsonl``, ``events.jsonl``, ``heartbeat``, and files under ``samples/``
and ``exports/``. Opened/closed/deleted events are ignored (the app's own reads fire those, which
would otherwise make a refresh loop), and so are hidden temp files (``.name.xxx.tmp``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from emascope import runformat as rf

WATCHED_FILES = frozenset(rf.WATCHED_FILES)
WATCHED_DIRS = frozenset(rf.WATCHED_DIRS)
WATCHED_EVENT_TYPES = frozenset({"modified", "created", "moved"})


def poll_requested(flag: bool = False) -> bool:
    """Whether to poll instead of using OS notifications: ``--poll`` or ``EMASCOPE_POLL=1``."""
    return flag or os.environ.get("EMASCOPE_POLL", "").strip().lower() in ("1", "true", "yes", "on")


def is_relevant(event_type: str, path: str | os.PathLike, is_directory: bool = False) -> bool:
    """Whether a file event under a run directory should trigger a refresh (pure; see module doc)."""
    if event_type not in WATCHED_EVENT_TYPES or is_directory:
        return False
    p = Path(path)
    if not p.name or p.name.startswith("."):
        return False
    if p.name in WATCHED_FILES:
        return True
    return any(part in WATCHED_DIRS for part in p.parts[-4:-1])


def run_fingerprint(run_dirs: Iterable[str | os.PathLike]) -> tuple:
    """``(mtime_ns, size, inode)`` of each run's watched files and folders (None when missing).

    The fallback when no observer watches the folder (a folder too deep or too large to watch
    whole, or an observer that could not start): the page compares this every second for the
    run it shows. A handful of ``stat`` calls per run; a new stage folder or export changes its
    folder's mtime.
    """
    out = []
    for run in run_dirs:
        for name in (*rf.WATCHED_FILES, *rf.WATCHED_DIRS, ""):
            try:
                st = os.stat(os.path.join(run, name) if name else run)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except (OSError, ValueError):
                out.append(None)
    return tuple(out)


class ChangeCounter:
    """A thread-safe counter of relevant changes (the only thing observer threads touch)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    def bump(self) -> None:
        with self._lock:
            self._value += 1

    @property
    def value(self) -> int:
        with self._lock:
            return self._value


class _Handler(FileSystemEventHandler):
    def __init__(self, counter: ChangeCounter):
        self.counter = counter

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = getattr(event, "dest_path", "") if event.event_type == "moved" else event.src_path
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if is_relevant(event.event_type, path, event.is_directory):
            self.counter.bump()


class RunWatcher:
    """Watches folders (run directories or a folder of runs) recursively and counts relevant changes.

    ``poll=True`` uses watchdog's PollingObserver (stat every ``poll_interval`` seconds) for network
    file systems where OS notifications do not arrive. Call :meth:`stop` to end the thread.
    """

    def __init__(self, paths: Iterable[str | os.PathLike], poll: bool = False, poll_interval: float = 1.0):
        self.counter = ChangeCounter()
        self.poll = poll
        self._observer = PollingObserver(timeout=poll_interval) if poll else Observer()
        self._observer.daemon = True
        handler = _Handler(self.counter)
        self.paths = [Path(p) for p in paths]
        for p in self.paths:
            self._observer.schedule(handler, str(p), recursive=True)
        self._observer.start()

    @property
    def value(self) -> int:
        return self.counter.value

    def alive(self) -> bool:
        return self._observer.is_alive()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
