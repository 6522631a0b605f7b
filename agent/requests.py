"""Export requests dropped into ``RUN_DIR/requests/`` (by the dashboard), fulfilled by a live agent.

Protocol (docs/run-format.md, "requests/ and exports/"; schema in :mod:`emascope.runformat`):
``requests/<id>.json`` holds ``{"id", "variant", "name", "dtype", "time"}``. At a step boundary
the agent exports the variant to ``exports/<name>.safetensors`` atomically, writes
``exports/<id>.status.json`` and removes the request. Ids and names are checked by the one shared
validation (:func:`emascope.runformat.parse_request`), so nothing is written outside ``exports/``.
"""

from __future__ import annotations

import json
import os
import threading
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
    ``synthesize(request, path) -> (bytes_written, report)`` writes a synthesised export (a request
    naming ``decay`` or ``sigma_rel``, docs/synthesis.md) from the run's snapshot files; it runs in
    a worker thread (it reads files only), so a long synthesis does not hold training; a decay the
    bank holds is exported directly. ``poll`` never raises; :meth:`join` waits for the workers.
    """

    def __init__(self, run_dir: str | os.PathLike, export_fn: Callable[[str, Path, str | None], int], *,
                 resolve_variant: Callable[[str], str],
                 on_result: Callable[[dict[str, Any]], None],
                 synthesize: Callable[[rf.ExportRequest, Path], tuple[int, dict[str, Any]]] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.export_fn = export_fn
        self.resolve_variant = resolve_variant
        self.on_result = on_result
        self.synthesize = synthesize
        self._workers: list[threading.Thread] = []

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

    def join(self, timeout: float | None = None) -> None:
        """Wait for synthesised exports still being written (at close)."""
        for t in list(self._workers):
            t.join(timeout)
        self._workers = [t for t in self._workers if t.is_alive()]

    def _handle(self, path: Path, step: int) -> None:
        stem = path.stem
        rid = stem if rf.ID_RE.fullmatch(stem) else None
        variant = rel = nbytes = error = None
        try:
            req = rf.parse_request(json.loads(path.read_text(encoding="utf-8")), stem=stem)
            if req.synthesized and not self._bank_holds(req):
                if self.synthesize is None:
                    raise ValueError("this agent cannot synthesise decays")
                self._start_worker(req, rid, path, step)
                return
            variant = self.resolve_variant(req.variant)
            rel = rf.export_file(req.name)
            nbytes = int(self.export_fn(variant, self.run_dir / rel, req.dtype))
        except Exception as exc:  # noqa: BLE001 - reported in the status file
            rel, error = None, f"{type(exc).__name__}: {exc}"
        self._finish(rid, path, variant, step, rel, nbytes, error, None)

    def _bank_holds(self, req: rf.ExportRequest) -> bool:
        if req.decay is None:
            return False
        try:
            self.resolve_variant(req.variant)
            return True
        except ValueError:
            return False

    def _start_worker(self, req: rf.ExportRequest, rid: str | None, path: Path, step: int) -> None:
        rel = rf.export_file(req.name)
        try:
            path.unlink()  # taken: a later poll must not start it again
        except OSError:
            pass

        def work() -> None:
            nbytes = report = error = None
            out_rel: str | None = rel
            try:
                nbytes, report = self.synthesize(req, self.run_dir / rel)
            except Exception as exc:  # noqa: BLE001 - reported in the status file
                out_rel, error = None, f"{type(exc).__name__}: {exc}"
            at = int(report["step"]) if report else step
            self._finish(rid, path, req.variant, at, out_rel, nbytes, error, report)

        t = threading.Thread(target=work, name=f"emascope-synthesis-{rid}", daemon=True)
        self._workers.append(t)
        t.start()

    def _finish(self, rid: str | None, path: Path, variant: str | None, step: int, rel: str | None,
                nbytes: int | None, error: str | None, synthesis: dict[str, Any] | None) -> None:
        record = rf.status_record(request_id=rid, state="error" if error else "done", variant=variant,
                                  step=step, path=rel, nbytes=nbytes, time=time.time(), error=error,
                                  synthesis=synthesis)
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
