"""Frozen side files: a run's frozen parameters written once per run, not once per bank snapshot.

A LoRA fine-tune freezes its whole base model; the bank averages only the adapters, yet every
snapshot used to store the live value of every entry, so each one rewrote the base (14 GB for a
7B bf16 model). With a :class:`FrozenStore` the entries of kind ``"frozen"`` go to a
content-addressed side file ``banks/frozen-<16 hex>.safetensors``
(:func:`emascope.runformat.frozen_file_name`, tensors ``live/<name>``, metadata
:data:`~emascope.runformat.FROZEN_FORMAT_KEY` and its own checksum), and each snapshot names it and
its checksum in its metadata (:data:`~emascope.runformat.SNAPSHOT_FROZEN_FILE_KEY`,
:data:`~emascope.runformat.SNAPSHOT_FROZEN_SHA_KEY`). Readers: :mod:`emascope.snapshot`.

The store hashes and writes the side file only when a frozen tensor may have changed since its
last write in this process: each tensor's autograd version counter (``_version``, bumped by
in-place ops such as ``copy_`` under ``no_grad`` or ``load_state_dict``) and ``data_ptr()`` are
compared with those of the last write. Not seen: in-place writes through ``.data`` (a separate
version counter), which a snapshot then records as the previous side file's values.

:func:`remove_unreferenced` deletes the side files no snapshot of ``banks/`` references (called
whenever snapshots are removed or replaced).
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import torch

from emascope import runformat as rf
from emascope.bank import EMABank
from emascope.snapshot import _atomic_save, _own_all, snapshot_checksum
from emascope.synthesis import read_safetensors_header


def frozen_names(bank: EMABank) -> list[str]:
    """The entries a side file holds: those of kind ``"frozen"``, in layout order."""
    return [n for n, k in bank.entry_kinds().items() if k == "frozen"]


class FrozenStore:
    """Writes and remembers the frozen side file of one ``banks/`` folder (one per run and process).

    :meth:`reference` returns ``(file name, checksum)`` of the side file holding the bank's current
    frozen values, writing it first when needed. Thread-safe.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._sig: list[tuple[str, int, int, str, tuple[int, ...], str]] | None = None
        self._ref: tuple[str, str] | None = None
        self.writes = 0  # side files hashed (and written unless already there): for tests and events

    def reference(self, bank: EMABank) -> tuple[str, str] | None:
        """``(name, checksum)`` of the side file of ``bank``'s frozen entries (``None``: it has none,
        or it is sharded: rank files keep every value inline)."""
        if bank.sharded:
            return None
        names = frozen_names(bank)
        if not names:
            return None
        live = bank.live_values()
        tensors = {n: live[n] for n in names}
        sig = [(n, int(t._version), int(t.data_ptr()), str(t.device), tuple(t.shape), str(t.dtype))
               for n, t in tensors.items()]
        with self._lock:
            if sig == self._sig and self._ref is not None and (self.folder / self._ref[0]).is_file():
                return self._ref
            self._ref = self._write(tensors)
            self._sig = sig
            return self._ref

    def _write(self, tensors: dict[str, torch.Tensor]) -> tuple[str, str]:
        owned = _own_all({f"live/{n}": t for n, t in tensors.items()})
        meta = {rf.FROZEN_FORMAT_KEY: rf.FROZEN_FORMAT}
        checksum = snapshot_checksum(owned, meta)
        meta[rf.SNAPSHOT_CHECKSUM_KEY] = checksum
        name = rf.frozen_file_name(checksum)
        self.writes += 1
        path = self.folder / name
        if not _holds(path, checksum):  # content-addressed: the same values are already there
            _atomic_save(owned, path, meta)
        return name, checksum


def _holds(path: Path, checksum: str) -> bool:
    """Whether ``path`` is a side file whose header states ``checksum`` (a regular file, not read further)."""
    try:
        header, _, _ = read_safetensors_header(path)
    except (ValueError, OSError):
        return False
    meta = header.get("__metadata__") or {}
    return meta.get(rf.SNAPSHOT_CHECKSUM_KEY) == checksum and meta.get(rf.FROZEN_FORMAT_KEY) == rf.FROZEN_FORMAT


def referenced(banks: str | os.PathLike) -> set[str] | None:
    """Names of the side files the snapshots of the ``banks`` folder (``latest.safetensors``, stage
    and lead-in snapshots: the names :mod:`emascope.runformat` gives them) reference, from their
    headers only; ``None`` when a snapshot's header cannot be read (then nothing may be deleted)."""
    out: set[str] = set()
    try:
        entries = list(Path(banks).iterdir())
    except OSError:
        return None
    for p in entries:
        name = p.name
        if name != Path(rf.SNAPSHOT).name and rf.parse_stage_snapshot_name(name) is None \
                and rf.parse_lead_in_snapshot_name(name) is None:
            continue
        try:
            header, _, _ = read_safetensors_header(p)
            ref = rf.frozen_reference(header.get("__metadata__") or {}, str(p))
        except FileNotFoundError:
            continue
        except (ValueError, OSError):
            if not p.exists():
                continue  # removed meanwhile
            return None
        if ref is not None:
            out.add(ref[0])
    return out


def remove_unreferenced(run_dir: str | os.PathLike) -> list[str]:
    """Delete the side files of ``RUN_DIR/banks/`` that no snapshot there references; returns their
    run-relative paths. Only names matching the side-file pattern, only inside ``banks/``; nothing
    when a snapshot header there is unreadable. Deletion failures are ignored (the next call retries)."""
    banks = Path(run_dir) / rf.BANKS
    used = referenced(banks)
    if used is None:
        return []
    gone = []
    try:
        names = [p.name for p in banks.iterdir()]
    except OSError:
        return []
    for name in names:
        if rf.is_frozen_file_name(name) and name not in used:
            with contextlib.suppress(OSError):
                (banks / name).unlink()
                gone.append(f"{rf.BANKS}/{name}")
    return gone
