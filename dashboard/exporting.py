"""Export a variant of a run as a checkpoint, from the dashboard (docs/run-format.md, requests/exports).

The dashboard process never imports torch. Two paths:

- a **live** run: :func:`request_export` writes ``requests/<id>.json`` atomically; the agent
  fulfils it at a step boundary and writes ``exports/<id>.status.json`` (poll :func:`export_status`);
- a **finished** (or stale) run: :func:`export_from_snapshot` runs ``emascope export`` in a child
  process (``python -m emascope.cli export RUN --variant V --out exports/<name>.safetensors``),
  which rebuilds the variant from ``banks/latest.safetensors``.

Names typed by a user never leave the run's ``exports/`` folder: :func:`export_path` validates the
name with the one shared check (:func:`emascope.runformat.validate_export_name`), resolves the path
and checks containment, raising ValueError otherwise. An existing checkpoint is never replaced
unless the caller says ``overwrite=True`` (the page asks for a confirmation first): without it
:func:`export_from_snapshot` raises :class:`ExportExists` before starting anything, and a live
request goes out with ``"overwrite": false``, which the agent refuses for an existing file. The
same rule holds for synthesised exports.

Any decay (docs/synthesis.md): :func:`synthesis_preview` computes the error report of a decay the
bank does not hold (torch-free, :mod:`emascope.synthesis`) *before* anything is exported; the
export itself is a request naming ``decay`` (live run) or ``emascope export --decay`` in a child
process (finished run).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from emascope import runformat as rf
from emascope.atomic import atomic_write_json
from emascope.dashboard.files import RefusedFile, read_capped, resolved_root

#: Seconds a finished-run export may take before the child process is stopped.
EXPORT_TIMEOUT_S = 900.0
#: Cap of a status file read back from the agent (a real one is a few hundred bytes).
MAX_STATUS_BYTES = 64 * 1024


class ExportExists(FileExistsError):
    """The export's target file exists and the caller did not confirm overwriting it."""


def default_name(variant: str) -> str:
    """The default export stem of a variant: ``ema-0.9999``, ``raw``, ``bema``."""
    return rf.default_export_name(variant)


def export_path(run_dir: str | os.PathLike, name: str) -> Path:
    """``RUN_DIR/exports/<name>.safetensors`` for a user-typed ``name``, guaranteed inside ``exports/``.

    ``name`` may end in ``.safetensors``; see :func:`emascope.runformat.validate_export_name`. The
    resolved path (symlinks followed) must stay inside ``exports/``; anything else is a ValueError.
    """
    rel = rf.export_file(name)
    base = rf.inside_run(run_dir, rf.EXPORTS)
    target = rf.inside_run(run_dir, rel)
    if target.parent != base:
        raise ValueError(f"export name {name!r} resolves outside {base}")
    return target


def new_request_id() -> str:
    """A fresh request id matching ``[A-Za-z0-9_-]{1,64}``."""
    return time.strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(4)


def existing_export(run_dir: str | os.PathLike, name: str) -> Path | None:
    """The checkpoint ``exports/<name>.safetensors`` if something already exists there, else None
    (ValueError for a bad name, as :func:`export_path`)."""
    target = export_path(run_dir, name)
    return target if os.path.lexists(target) else None


def request_export(run_dir: str | os.PathLike, variant: str | None, name: str, dtype: str | None = None, *,
                   decay: float | None = None, force: bool = False, overwrite: bool = False) -> str:
    """Ask a live agent for a checkpoint: write ``requests/<id>.json`` atomically; returns the id.

    ``decay``: any decay in (0, 1), synthesised by the agent if the bank does not hold it
    (``variant`` is then ignored); ``force``: write it even when its error is large.
    ``overwrite=False`` raises :class:`ExportExists` when the target exists already (the agent
    would refuse it too: it checks again when it fulfils the request).
    """
    target = export_path(run_dir, name)
    if decay is not None:
        d, _ = rf.check_synthesis_target(decay, None)
    else:
        variant = rf.parse_variant(variant)
    dtype = rf.validate_export_dtype(dtype)
    if not overwrite and os.path.lexists(target):
        raise ExportExists(f"{rf.export_file(target.stem)} already exists")
    if decay is not None:
        request = rf.ExportRequest(id=new_request_id(), variant=rf.synthesized_name(d, None), name=target.stem,
                                   dtype=dtype, overwrite=bool(overwrite), decay=d, force=bool(force))
    else:
        request = rf.ExportRequest(id=new_request_id(), variant=variant, name=target.stem, dtype=dtype,
                                   overwrite=bool(overwrite))
    atomic_write_json(Path(run_dir) / rf.request_file(request.id), rf.request_body(request, time.time()))
    return request.id


def synthesis_preview(run_dir: str | os.PathLike, decay: float) -> dict[str, Any]:
    """The error report of synthesising ``decay`` from the run's snapshots, without exporting:
    :meth:`emascope.synthesis.SynthesisReport.as_json`, plus ``refused`` (the message) when the
    snapshots cannot represent it. Computes the leave-one-out calibration once (cached in
    ``banks/synthesis.json``). Raises :class:`emascope.synthesis.SynthesisError` when there is
    nothing to synthesise from."""
    from emascope.synthesis import SynthesisError, Target, close_all, open_snapshots, plan_synthesis

    snaps = open_snapshots(run_dir)
    try:
        try:
            plan = plan_synthesis(run_dir, Target(decay=float(decay)), snaps=snaps)
            return plan.report.as_json()
        except SynthesisError as exc:
            if "refused" not in str(exc):
                raise
            plan = plan_synthesis(run_dir, Target(decay=float(decay)), snaps=snaps, force=True)
            return {**plan.report.as_json(), "refused": str(exc)}
    finally:
        close_all(snaps)


def can_synthesize(run_dir: str | os.PathLike) -> bool:
    """Whether the run has a bank snapshot to synthesise from (a cheap file check)."""
    banks = Path(run_dir) / rf.BANKS
    try:
        return any(rf.parse_stage_snapshot_name(p.name) is not None for p in banks.iterdir()) or \
            (Path(run_dir) / rf.SNAPSHOT).is_file()
    except OSError:
        return False


def export_status(run_dir: str | os.PathLike, request_id: str) -> dict[str, Any] | None:
    """The agent's ``exports/<id>.status.json`` for a request, or None while there is none (or it is
    torn, or refused: not a regular file, a symlink out of the run, larger than 64 kB)."""
    root = resolved_root(run_dir)
    path = Path(root) / rf.status_file(request_id)  # ValueError for a bad id
    try:
        obj = json.loads(read_capped(path, root, MAX_STATUS_BYTES))
    except (OSError, RefusedFile, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def request_pending(run_dir: str | os.PathLike, request_id: str) -> bool:
    """True while the request file is still waiting in ``requests/``."""
    return (Path(run_dir) / rf.request_file(request_id)).exists()


def resolve_status_path(run_dir: str | os.PathLike, status: dict[str, Any]) -> Path | None:
    """The exported file named by a status record (relative to the run dir), if it stays inside exports/."""
    rel = status.get("path")
    if not isinstance(rel, str) or not rel:
        return None
    try:
        p = rf.inside_run(run_dir, rel)
        return p if p.parent == rf.inside_run(run_dir, rf.EXPORTS) else None
    except (ValueError, OSError):
        return None


def list_exports(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints in the run's ``exports/`` (sorted by name)."""
    try:
        return sorted((Path(run_dir) / rf.EXPORTS).glob(f"*{rf.EXPORT_SUFFIX}"))
    except OSError:
        return []


def export_command(run_dir: str | os.PathLike, variant: str | None, out: Path, dtype: str | None, *,
                   decay: float | None = None, force: bool = False) -> list[str]:
    """The ``emascope export`` command line run in a child process (pure; tested): ``--variant V``,
    or ``--decay D`` (synthesised, ``--force`` to accept a large error)."""
    what = ["--decay", repr(float(decay))] + (["--force"] if force else []) if decay is not None \
        else ["--variant", str(variant)]
    cmd = [sys.executable, "-m", "emascope.cli", "export", str(run_dir), *what, "--out", str(out)]
    return cmd + (["--dtype", dtype] if dtype else [])


def export_from_snapshot(run_dir: str | os.PathLike, variant: str | None, name: str, dtype: str | None = None, *,
                         decay: float | None = None, force: bool = False, overwrite: bool = False) -> Path:
    """Rebuild ``variant`` from the latest bank snapshot (``banks/latest.safetensors`` or a sharded
    run's ``banks/latest.index.json``) into ``exports/<name>.safetensors``, or synthesise ``decay``
    from the run's snapshots (docs/synthesis.md; not from a sharded run's).

    Runs ``emascope export`` in a child process (torch is imported there, never here). Raises
    ValueError for a bad name/variant/dtype, :class:`ExportExists` when the target exists and
    ``overwrite`` is False, FileNotFoundError when there is no snapshot, and RuntimeError with the
    command's own message when the export fails (or a synthesis is refused).
    """
    if decay is not None:
        decay, _ = rf.check_synthesis_target(decay, None)
    else:
        variant = rf.parse_variant(variant)
    out = export_path(run_dir, name)
    rf.validate_export_dtype(dtype)
    if not overwrite and os.path.lexists(out):
        raise ExportExists(f"{rf.export_file(out.stem)} already exists")
    if decay is not None and not can_synthesize(run_dir):
        if (Path(run_dir) / rf.SNAPSHOT_INDEX).is_file():
            raise FileNotFoundError("this run's bank is sharded: post-hoc synthesis reads one-process stage "
                                    "snapshots only (export a decay the bank holds)")
        raise FileNotFoundError(f"no bank snapshot at {Path(run_dir) / rf.SNAPSHOT} to synthesise from")
    if decay is None and not any((Path(run_dir) / rel).is_file() for rel in rf.LATEST_SNAPSHOTS):
        raise FileNotFoundError(f"no bank snapshot at {Path(run_dir) / rf.SNAPSHOT} (nor a sharded one)")
    try:
        done = subprocess.run(export_command(run_dir, variant, out, dtype, decay=decay, force=force),
                              capture_output=True, text=True,
                              timeout=EXPORT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"emascope export took more than {EXPORT_TIMEOUT_S:.0f} s and was stopped") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(message[-1] if message else f"emascope export exited with {done.returncode}")
    return out
