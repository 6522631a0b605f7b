"""Export requests dropped into ``RUN_DIR/requests/`` (by the dashboard), fulfilled by a live agent.

Protocol (docs/run-format.md, "requests/ and exports/"; schema in :mod:`emascope.runformat`):
``requests/<id>.json`` holds ``{"id", "variant", "name", "dtype", "overwrite", "time"}``. At a step
boundary the agent exports the variant to ``exports/<name>.safetensors`` atomically, writes
``exports/<id>.status.json`` and removes the request. An existing ``exports/<name>.safetensors``
is replaced only when the request says ``"overwrite": true``; otherwise the request fails with an
error status and the file is left as it was. Ids and names are checked by the one shared
validation (:func:`emascope.runformat.parse_request`), so nothing is written outside ``exports/``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emascope import runformat as rf
from emascope.atomic import atomic_write_json


class RequestPoller:
    """Fulfils what it finds in ``requests/`` when :meth:`poll` is called.

    ``export_fn(variant, path, dtype) -> bytes_written`` does the export (atomic write);
    ``resolve_variant`` checks the bank holds a (normalised) variant and raises ``ValueError``
    otherwise; ``on_result(record)`` receives each status record (for the events log).
    ``poll`` never raises.
    """

    def __init__(self, run_dir: str | os.PathLike, export_fn: Callable[[str, Path, str | None], int], *,
                 resolve_variant: Callable[[str], str],
                 on_result: Callable[[dict[str, Any]], None]) -> None:
        self.run_dir = Path(run_dir)
        self.export_fn = export_fn
        self.resolve_variant = resolve_variant
        self.on_result = on_result

    def poll(self, step: int) -> int:
        """Handle every pending request now; returns how many were handled."""
        try:
            found = (self.run_dir / rf.REQUESTS).glob("*.json")
            pending = sorted(p for p in found if not p.name.startswith("."))
        except OSError:
            return 0
        handled = 0
        for path in pending:
            try:
                self._handle(path, step)
                handled += 1
            except Exception:  # noqa: BLE001 - never into the training loop
                pass
        return handled

    def _handle(self, path: Path, step: int) -> None:
        stem = path.stem
        rid = stem if rf.ID_RE.fullmatch(stem) else None
        variant = rel = nbytes = error = None
        try:
            req = rf.parse_request(json.loads(path.read_text(encoding="utf-8")), stem=stem)
            variant = self.resolve_variant(req.variant)
            rel = rf.export_file(req.name)
            if not req.overwrite and os.path.lexists(self.run_dir / rel):
                raise FileExistsError(f"{rel} already exists and the request did not ask to overwrite it "
                                      '(set "overwrite": true to replace it); the file was left as it was')
            nbytes = int(self.export_fn(variant, self.run_dir / rel, req.dtype))
        except Exception as exc:  # noqa: BLE001 - reported in the status file
            rel, error = None, f"{type(exc).__name__}: {exc}"
        record = rf.status_record(request_id=rid, state="error" if error else "done", variant=variant,
                                  step=step, path=rel, nbytes=nbytes, time=time.time(), error=error)
        if rid is not None:
            try:
                atomic_write_json(self.run_dir / rf.status_file(rid), record)
            except OSError as exc:
                record["error"] = record["error"] or f"status file: {exc}"
        try:
            path.unlink()
        except OSError:
            pass
        self.on_result(record)
