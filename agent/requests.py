"""Export requests dropped into ``RUN_DIR/requests/`` (by the dashboard), fulfilled by a live agent.

Protocol (docs/run-format.md, "requests/ and exports/"): ``requests/<id>.json`` holds
``{"id", "variant", "name", "dtype", "time"}``. At a step boundary, at most once per
``min_interval`` seconds (``time.monotonic``), the agent exports the variant to
``exports/<name>.safetensors`` atomically, writes ``exports/<id>.status.json`` and removes the
request. Ids and names are checked against fixed character sets so nothing is written outside
``exports/``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.atomic import atomic_write_json

ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
DTYPES = (None, "float32")


@dataclass
class ExportRequest:
    """A validated request: export ``variant`` to ``exports/<name>.safetensors``."""

    id: str
    variant: str
    name: str
    dtype: str | None


def parse_request(body: Any, *, stem: str, parse_variant: Callable[[str], str]) -> ExportRequest:
    """Validate a request object; raises ``ValueError`` naming the bad field and value.

    ``stem`` is the request file's stem; the ``id`` field must equal it (or be absent).
    """
    if not isinstance(body, dict):
        raise ValueError(f"request must be a JSON object, got {type(body).__name__}")
    rid = body.get("id", stem)
    if not isinstance(rid, str) or not ID_RE.fullmatch(rid) or rid != stem:
        raise ValueError(f"bad request id {rid!r} (must match [A-Za-z0-9_-]{{1,64}} "
                         f"and the file name {stem!r})")
    variant = body.get("variant")
    if not isinstance(variant, (str, int, float)) or isinstance(variant, bool):
        raise ValueError(f"bad variant {variant!r}")
    variant = parse_variant(str(variant))
    name = body.get("name") or f"ema-{variant}"
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"bad name {name!r} (must match [A-Za-z0-9._-]{{1,128}})")
    dtype = body.get("dtype")
    if dtype not in DTYPES:
        raise ValueError(f"bad dtype {dtype!r} (allowed: null, 'float32')")
    return ExportRequest(rid, variant, name, dtype)


class RequestPoller:
    """Checks ``requests/`` at most every ``min_interval`` s and fulfils what it finds.

    ``export_fn(variant, path, dtype) -> bytes_written`` does the export (atomic write);
    ``parse_variant`` normalises/validates a variant string (raises ``ValueError``);
    ``on_result(record)`` receives one dict per handled request (for the events log).
    ``poll`` never raises.
    """

    def __init__(self, run_dir: str | os.PathLike, export_fn: Callable[[str, Path, str | None], int], *,
                 parse_variant: Callable[[str], str], on_result: Callable[[dict[str, Any]], None],
                 min_interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        if min_interval < 0:
            raise ValueError(f"min_interval must be >= 0 seconds, got {min_interval}")
        self.run_dir = Path(run_dir)
        self.export_fn = export_fn
        self.parse_variant = parse_variant
        self.on_result = on_result
        self.min_interval = float(min_interval)
        self.clock = clock
        self._last = -float("inf")

    def maybe_poll(self, step: int) -> int:
        """Poll if ``min_interval`` has passed since the last poll; returns requests handled."""
        now = self.clock()
        if now - self._last < self.min_interval:
            return 0
        self._last = now
        return self.poll(step)

    def poll(self, step: int) -> int:
        """Handle every pending request now; returns how many were handled."""
        try:
            found = (self.run_dir / "requests").glob("*.json")
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
        record: dict[str, Any] = {"id": stem if ID_RE.fullmatch(stem) else None, "state": "error",
                                  "variant": None, "step": int(step), "path": None, "bytes": None,
                                  "time": None, "error": None}
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            req = parse_request(body, stem=stem, parse_variant=self.parse_variant)
            record["variant"] = req.variant
            rel = Path("exports") / f"{req.name}.safetensors"
            nbytes = self.export_fn(req.variant, self.run_dir / rel, req.dtype)
            record.update(state="done", path=rel.as_posix(), bytes=int(nbytes))
        except Exception as exc:  # noqa: BLE001 - reported in the status file
            record["error"] = f"{type(exc).__name__}: {exc}"
        record["time"] = time.time()
        if record["id"] is not None:
            try:
                atomic_write_json(self.run_dir / "exports" / f"{record['id']}.status.json", record)
            except OSError as exc:
                record["error"] = record["error"] or f"status file: {exc}"
        try:
            path.unlink()
        except OSError:
            pass
        self.on_result(record)
