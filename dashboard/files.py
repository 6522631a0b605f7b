"""Bounded reads of run-directory files for the dashboard: regular files only, inside the run, capped.

A file the dashboard reads may be half-written, huge, hostile or a symlink. Every read here:

- opens with ``O_NOFOLLOW | O_NONBLOCK``: a FIFO, socket or device is never waited on (``open``
  of a FIFO returns at once, ``fstat`` then refuses it), and a symlink is followed only after its
  target was resolved and found **inside the run directory** (a symlink to ``/dev/zero``, to
  ``~/.ssh`` or to another run is refused);
- refuses anything that ``fstat`` does not call a regular file (folders, FIFOs, devices);
- reads at most a fixed number of bytes (the caps below; a larger file is refused, or for the
  append-only logs read up to the cap).

Refusals raise :class:`RefusedFile` (a ``ValueError``) with a short reason naming the file; I/O
failures stay ``OSError``. Standard library only (no torch, no Streamlit).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

#: Cap of a JSON object file the dashboard reads whole (run.json; heartbeat and status files are
#: far smaller). A real run.json is a few kB.
MAX_JSON_BYTES = 4 * 1024 * 1024
#: Cap of one preview file (a PNG grid or a float32 ``[n, d]`` .npy).
MAX_PREVIEW_BYTES = 8 * 1024 * 1024
#: Cap of what is read of one append-only JSONL file (metrics.jsonl, events.jsonl) in total;
#: a 1,000-stage x 20-variant x 10-metric run writes about 26 MB.
MAX_JSONL_BYTES = 64 * 1024 * 1024
#: Longest JSONL line parsed; a longer line (or a torn tail longer than this) is skipped unread.
MAX_LINE_BYTES = 1024 * 1024

_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


class RefusedFile(ValueError):
    """A run-directory file the dashboard will not read (not regular, outside the run, too large)."""


def _size(n: int) -> str:
    """A byte count for people: ``64 MB``, ``12 kB``, ``10 bytes``."""
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.0f} MB"
    return f"{n / 1024:.0f} kB" if n >= 1024 else f"{n} bytes"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def open_regular(path: str | os.PathLike, root: str | os.PathLike) -> tuple[BinaryIO, os.stat_result]:
    """Open ``path`` (a file at or below the run directory ``root``) for reading, safely.

    Returns ``(binary file, fstat result)``; the caller closes the file. Raises
    :class:`RefusedFile` when the path leaves ``root`` (through ``..`` or a symlink at any
    level), or is not a regular file; ``OSError`` (e.g. ``FileNotFoundError``) otherwise.
    ``root`` should already be resolved (``os.path.realpath``); the common case, a plain file
    directly in ``root``, costs one ``open`` and one ``fstat``.
    """
    path, root = os.fspath(path), os.fspath(root)
    name = os.path.basename(path)
    if os.path.dirname(path) != root:  # a file in a sub-folder: every component must stay inside
        real = os.path.realpath(path)
        if not _inside(real, root):
            raise RefusedFile(f"{name}: resolves outside the run directory (symlink or '..')")
        path = real
    try:
        fd = os.open(path, _FLAGS)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        real = os.path.realpath(path)  # a symlink: followed only when it stays inside the run
        if not _inside(real, root):
            raise RefusedFile(f"{name}: a symlink out of the run directory") from None
        fd = os.open(real, _FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise RefusedFile(f"{name}: {kind}, not a regular file")
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def read_capped(path: str | os.PathLike, root: str | os.PathLike, max_bytes: int) -> bytes:
    """The whole content of a regular file at or below ``root``, at most ``max_bytes`` long.

    A larger file is refused (:class:`RefusedFile`), as are the cases of :func:`open_regular`.
    """
    f, st = open_regular(path, root)
    with f:
        if st.st_size > max_bytes:
            raise RefusedFile(f"{os.path.basename(os.fspath(path))}: {_size(st.st_size)}, "
                              f"more than the {_size(max_bytes)} the dashboard reads")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while being read
        raise RefusedFile(f"{os.path.basename(os.fspath(path))}: more than the {_size(max_bytes)} "
                          "the dashboard reads")
    return data


def resolved_root(path: str | os.PathLike) -> str:
    """``os.path.realpath`` of a run directory (the ``root`` the functions above expect)."""
    return os.path.realpath(os.fspath(Path(path).expanduser()))
