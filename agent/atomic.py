"""Crash-safe file writes: atomic replace for whole files, flushed single-line appends for logs."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + ``os.replace``).

    A reader sees either the old file or the new one, never a half-written one. On error the
    temp file is removed and the old file is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Serialise ``obj`` as indented JSON and write it atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def temp_path_for(path: str | os.PathLike) -> Path:
    """A fresh temp-file path beside ``path`` for writers that need a filename (e.g. safetensors).

    The caller writes it, then ``os.replace(tmp, path)``; on failure it must unlink it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON object as one line, in a single write, then flush.

    Non-finite floats are not valid JSON: callers convert them to ``None`` first (``allow_nan``
    is off so a stray NaN fails loudly here rather than producing a file other tools reject).
    """
    line = json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


def append_jsonl_lines(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Append several JSON objects, one per line, in a single ``write`` call, then flush.

    One write of an ``O_APPEND`` file lands in one piece among other appenders (local file
    systems); a writer killed mid-way leaves at most a torn last line, which readers skip.
    """
    if not records:
        return
    data = "".join(json.dumps(r, allow_nan=False, separators=(",", ":")) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
