"""Export a variant of a run as a checkpoint, from the dashboard (docs/run-format.md, requests/exports).

Two paths:

- a **live** run: :func:`request_export` writes ``requests/<id>.json`` atomically; the agent
  fulfils it at a step boundary and writes ``exports/<id>.status.json`` (poll
  :func:`export_status`);
- a **finished** (or stale) run: :func:`export_from_snapshot` rebuilds the variant from
  ``banks/latest.safetensors`` with ``agent.bank.EMABank.load_snapshot(...).export(...)``.

Names typed by a user never leave the run's ``exports/`` folder: :func:`export_path` validates the
name, resolves the path and checks containment, raising ValueError otherwise.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from agent.atomic import atomic_write_json

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
SNAPSHOT = Path("banks") / "latest.safetensors"
SUFFIX = ".safetensors"


def default_name(variant: str) -> str:
    """The default export stem of a variant: ``ema-0.9999``, ``raw``, ``bema``."""
    return f"ema-{variant}" if variant not in ("raw", "bema") else variant


def validate_variant(variant: str) -> str:
    """The variant string if it is well formed (``raw``, ``bema`` or a decay in [0, 1)); else ValueError."""
    if variant in ("raw", "bema"):
        return variant
    try:
        d = float(variant)
    except (TypeError, ValueError):
        raise ValueError(
            f"unknown variant {variant!r}: expected 'raw', 'bema' or a decay like '0.9999'"
        ) from None
    if not 0.0 <= d < 1.0:
        raise ValueError(f"variant {variant!r} is not a decay in [0, 1)")
    return repr(d)


def export_path(run_dir: str | os.PathLike, name: str) -> Path:
    """``RUN_DIR/exports/<name>.safetensors`` for a user-typed ``name``, guaranteed inside ``exports/``.

    ``name`` may end in ``.safetensors``; it must otherwise match ``[A-Za-z0-9._-]{1,128}``, must not
    start with a dot, and the resolved path (symlinks followed) must stay inside ``exports/``.
    Anything else is a ValueError naming the bad value.
    """
    if not isinstance(name, str):
        raise ValueError(f"export name must be a string, got {name!r}")
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    if not _NAME_RE.fullmatch(stem) or stem.startswith("."):
        raise ValueError(
            f"invalid export name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "not starting with '.' (files are always written inside the run's exports/)"
        )
    base = (Path(run_dir) / "exports").resolve()
    target = (base / f"{stem}{SUFFIX}").resolve()
    if target.parent != base:
        raise ValueError(f"export name {name!r} resolves outside {base}")
    return target


def new_request_id() -> str:
    """A fresh request id matching ``[A-Za-z0-9_-]{1,64}``."""
    return time.strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(4)


def request_export(run_dir: str | os.PathLike, variant: str, name: str, dtype: str | None = None) -> str:
    """Ask a live agent for a checkpoint: write ``requests/<id>.json`` atomically; returns the id."""
    variant = validate_variant(variant)
    path = export_path(run_dir, name)
    if dtype not in (None, "float32"):
        raise ValueError(f"dtype must be None or 'float32', got {dtype!r}")
    rid = new_request_id()
    atomic_write_json(
        Path(run_dir) / "requests" / f"{rid}.json",
        {"id": rid, "variant": variant, "name": path.stem, "dtype": dtype, "time": time.time()},
    )
    return rid


def export_status(run_dir: str | os.PathLike, request_id: str) -> dict[str, Any] | None:
    """The agent's ``exports/<id>.status.json`` for a request, or None while there is none (or it is torn)."""
    if not _ID_RE.fullmatch(request_id or ""):
        raise ValueError(f"invalid request id {request_id!r}")
    try:
        obj = json.loads((Path(run_dir) / "exports" / f"{request_id}.status.json").read_bytes())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def request_pending(run_dir: str | os.PathLike, request_id: str) -> bool:
    """True while the request file is still waiting in ``requests/``."""
    if not _ID_RE.fullmatch(request_id or ""):
        raise ValueError(f"invalid request id {request_id!r}")
    return (Path(run_dir) / "requests" / f"{request_id}.json").exists()


def resolve_status_path(run_dir: str | os.PathLike, status: dict[str, Any]) -> Path | None:
    """The exported file named by a status record (relative to the run dir), if it stays inside exports/."""
    rel = status.get("path")
    if not isinstance(rel, str) or not rel:
        return None
    base = (Path(run_dir) / "exports").resolve()
    p = (Path(run_dir) / rel).resolve()
    return p if p.parent == base else None


def has_snapshot(run_dir: str | os.PathLike) -> bool:
    """Whether the run has a bank snapshot to export from."""
    return (Path(run_dir) / SNAPSHOT).is_file()


def export_from_snapshot(
    run_dir: str | os.PathLike, variant: str, name: str, dtype: str | None = None
) -> Path:
    """Rebuild ``variant`` from ``banks/latest.safetensors`` and write ``exports/<name>.safetensors``.

    Imports the agent (and torch) lazily. Raises ValueError for a bad name/variant, FileNotFoundError
    when there is no snapshot; errors from the agent propagate (the UI shows them).
    """
    variant = validate_variant(variant)
    out = export_path(run_dir, name)
    snap = Path(run_dir) / SNAPSHOT
    if not snap.is_file():
        raise FileNotFoundError(f"no bank snapshot at {snap}")
    from agent.bank import EMABank  # lazy: torch is only needed for this path

    kwargs: dict[str, Any] = {}
    if dtype == "float32":
        import torch

        kwargs["dtype"] = torch.float32
    elif dtype is not None:
        raise ValueError(f"dtype must be None or 'float32', got {dtype!r}")
    bank = EMABank.load_snapshot(snap)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(bank.export(variant, out, **kwargs))
