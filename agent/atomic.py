"""Crash-safe file writes: atomic replace for whole files, flushed single-line appends for logs.

Permissions: files are created the way a plain ``open(path, "w")`` creates them, mode ``0o666``
minus the process umask (``tempfile.mkstemp`` would make them ``0o600``, unreadable by a teammate's
dashboard while the appended logs beside them are readable). Temp files are named
:func:`emascope.runformat.temp_file_name` (``.<name>.<random>.tmp``) beside their target, so a
writer killed mid-write leaves something :func:`remove_stale_temp_files` recognises.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from emascope.runformat import is_temp_file_name, temp_file_name

#: Mode a new file is created with before the umask applies (as ``open`` does).
FILE_MODE = 0o666
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _create_temp(path: Path) -> tuple[int, Path]:
    """Create a fresh temp file beside ``path`` (``O_EXCL``, mode 0o666 minus the umask): (fd, path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.parent / temp_file_name(path.name, secrets.token_hex(8))
        try:
            return os.open(tmp, _TEMP_FLAGS, FILE_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temp file beside {str(path)!r}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + ``os.replace``).

    A reader sees either the old file or the new one, never a half-written one. On error the
    temp file is removed and the old file is left untouched.
    """
    path = Path(path)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(tmp: str | os.PathLike) -> None:
    """Remove a temp file of a failed atomic write (already gone: nothing to do)."""
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Serialise ``obj`` as indented JSON and write it atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Atomically create ``path`` with a writer that needs a filename (e.g. safetensors' ``save_file``).

    ``write(tmp)`` writes the whole file at ``tmp`` (a fresh temp file beside ``path``); the temp file
    then gets the mode a plain ``open`` would have given it (some writers replace it with their own
    0600 file), is fsynced and replaces ``path``. On any error the temp file is removed and ``path``
    is left untouched. Returns ``path``.
    """
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 minus the umask, from the kernel
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        with open(tmp, "rb") as f:  # durable before it becomes visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return path


def temp_path_for(path: str | os.PathLike) -> Path:
    """A fresh temp-file path beside ``path`` for writers that need a filename (e.g. safetensors).

    The file exists (empty, mode 0o666 minus the umask). The caller writes it, then
    ``os.replace(tmp, path)``; on failure it must unlink it.
    """
    fd, tmp = _create_temp(Path(path))
    os.close(fd)
    return tmp


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON object as one line, in a single write, then flush.

    If the file does not end with a newline (an earlier append failed midway, e.g. on a full disk,
    or a writer was killed), the torn fragment is ended with a newline first, so this record is a
    line of its own and only the fragment is lost. Non-finite floats are not valid JSON: callers
    convert them to ``None`` first (``allow_nan`` is off so a stray NaN fails loudly here rather
    than producing a file other tools reject).
    """
    line = (json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n").encode("utf-8")
    with open(path, "ab+") as f:
        end = f.seek(0, os.SEEK_END)
        if end > 0:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)  # append mode: always at the end, whatever the read position
        f.flush()


def append_jsonl_lines(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Append several JSON objects, one per line, in a single ``write`` call, then flush.

    One write of an ``O_APPEND`` file lands in one piece among other appenders (local file
    systems); a writer killed mid-way leaves at most a torn last line, which readers skip. A torn
    fragment already at the end is ended with a newline first, as :func:`append_jsonl` does.
    """
    if not records:
        return
    data = "".join(json.dumps(r, allow_nan=False, separators=(",", ":")) + "\n" for r in records).encode("utf-8")
    with open(path, "ab+") as f:
        end = f.seek(0, os.SEEK_END)
        if end > 0:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                data = b"\n" + data
        f.write(data)  # append mode: always at the end, whatever the read position
        f.flush()


def terminate_torn_line(path: str | os.PathLike) -> bool:
    """End a JSONL file whose last line is torn (a killed writer) with a newline; True if it did.

    Without it the first record appended by a resumed run would be glued to the fragment and
    both would be lost to readers; with it only the fragment is (an invalid line, skipped).
    """
    try:
        with open(path, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            if end == 0:
                return False
            f.seek(end - 1)
            if f.read(1) == b"\n":
                return False
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
            return True
    except FileNotFoundError:
        return False


def remove_stale_temp_files(folder: str | os.PathLike, *, min_age_s: float = 0.0) -> list[tuple[Path, int]]:
    """Remove the temp files of atomic writes left in ``folder`` by a killed writer; returns
    ``(path, bytes)`` of each removed file.

    Only regular files (never a symlink, never a folder) directly in ``folder`` whose name is a
    temp-file name of this module (:func:`emascope.runformat.is_temp_file_name`), last modified at
    least ``min_age_s`` seconds ago (folders another process writes to keep young ones). The caller
    decides which folders are its own. Errors are skipped: nothing here raises.
    """
    removed: list[tuple[Path, int]] = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not is_temp_file_name(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < min_age_s:
                continue
            os.unlink(entry.path)
            removed.append((Path(entry.path), int(st.st_size)))
        except OSError:
            continue
    return removed


_PIN_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


@contextlib.contextmanager
def pinned_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Open ``folder`` without following a symlink at its last component (``OSError``, e.g. ELOOP,
    if it is one) and yield a path that names that open folder while the block runs, whatever is
    renamed or swapped meanwhile: ``/proc/self/fd/N`` on Linux. Writes under the yielded path (atomic
    ones included: temp file and rename stay in that folder) never go through a symlink put in the
    folder's place after the open. Where the OS has no such path, ``folder`` itself is yielded."""
    fd = os.open(folder, _PIN_FLAGS)
    try:
        via = Path(f"/proc/self/fd/{fd}")
        try:
            same = os.path.samestat(os.stat(via), os.fstat(fd))
        except OSError:
            same = False
        yield via if same else Path(folder)
    finally:
        os.close(fd)
