"""Who scores a stage: atomic claims and done markers under ``RUN_DIR/scoring/`` (torch-free).

Several external scorers (``emascope score``) may watch one run; each stage must be scored
exactly once, and a scorer that dies mid-sweep must not leave its stage unscored. Protocol (names
from :mod:`emascope.runformat`):

- **claim**: create ``scoring/step_<step>.claim.<g>`` with ``O_CREAT | O_EXCL`` (exactly one
  creator wins), ``g`` = 0 for an unclaimed stage. The body names the scorer, host and pid.
- **heartbeat**: the holder touches its claim file's mtime every few seconds (a thread,
  :class:`ClaimHeartbeat`) while it scores.
- **stale**: a claim is stale when its holder is on this host and its pid is gone (detected at
  once, e.g. after SIGKILL), or when its mtime is older than ``stale_after`` seconds (a holder on
  another host that died, or a frozen process). A stale generation ``g`` is taken over by creating
  generation ``g + 1``, again with ``O_EXCL``: of several scorers that judge it stale, one wins.
- **commit**: the holder checks it still holds the newest generation (:meth:`Claim.still_mine`),
  appends the stage's metric records in one write, then writes the done marker
  ``scoring/step_<step>.done.json`` atomically and removes its claim files. A stage with a done
  marker is never claimed again.

A scorer killed before the append leaves no metric record of the stage (they are buffered:
:class:`emascope.rundir.StageWriter`), and the stage is scored again. Killed between the append and
the done marker (a few microseconds), it is scored again and its lines repeat with identical
values (readers keep the last of a repeated ``(step, variant, metric)``). A holder frozen for
longer than ``stale_after`` (SIGSTOP) can lose its claim; it notices at commit and writes nothing.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emascope import runformat as rf
from emascope.atomic import atomic_write_json

#: Seconds without a heartbeat after which another scorer may take a claim over.
DEFAULT_STALE_AFTER = 60.0


def _scoring_dir(run_dir: Path) -> Path:
    return Path(run_dir) / rf.SCORING


def is_done(run_dir: str | os.PathLike, step: int) -> bool:
    """Whether the stage's done marker exists (its metrics are in metrics.jsonl)."""
    return (Path(run_dir) / rf.stage_done_file(step)).is_file()


def done_steps(run_dir: str | os.PathLike) -> set[int]:
    """Steps of every done marker under ``scoring/``."""
    try:
        names = os.listdir(_scoring_dir(Path(run_dir)))
    except OSError:
        return set()
    return {s for s in map(rf.parse_stage_done_name, names) if s is not None}


def mark_done(run_dir: str | os.PathLike, step: int, record: dict[str, Any]) -> None:
    """Write the stage's done marker atomically (:func:`emascope.runformat.done_record`)."""
    atomic_write_json(Path(run_dir) / rf.stage_done_file(step), record)


def clear_stage(run_dir: str | os.PathLike, step: int) -> None:
    """Forget a stage's done marker and claims (a new stage snapshot replaces an old one at this
    step, e.g. after a restart from an earlier training checkpoint)."""
    run_dir = Path(run_dir)
    (run_dir / rf.stage_done_file(step)).unlink(missing_ok=True)
    for gen in claim_generations(run_dir, step):
        (run_dir / rf.stage_claim_file(step, gen)).unlink(missing_ok=True)


def claim_generations(run_dir: str | os.PathLike, step: int) -> list[int]:
    """Generations of the claims on ``step``, ascending."""
    try:
        names = os.listdir(_scoring_dir(Path(run_dir)))
    except OSError:
        return []
    return sorted(g for s, g in filter(None, map(rf.parse_stage_claim_name, names)) if s == step)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts as alive)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def claim_is_stale(path: Path, *, stale_after: float, now: float | None = None,
                   host: str | None = None) -> bool:
    """Whether the claim file at ``path`` is stale (see the module docstring). A claim being
    written (empty or half a JSON body) is judged by its mtime only; a vanished one is stale."""
    try:
        mtime = path.stat().st_mtime
        body = path.read_bytes()
    except FileNotFoundError:
        return True
    try:
        rec = json.loads(body)
    except ValueError:
        rec = None
    if isinstance(rec, dict) and rec.get("host") == (host or socket.gethostname()):
        pid = rec.get("pid")
        if isinstance(pid, int) and not isinstance(pid, bool) and not pid_alive(pid):
            return True
    return (time.time() if now is None else now) - mtime > stale_after


@dataclass
class Claim:
    """A stage this scorer holds (generation ``generation`` of its claims)."""

    run_dir: Path
    step: int
    generation: int
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.run_dir / rf.stage_claim_file(self.step, self.generation)

    def touch(self) -> None:
        """Heartbeat: bump the claim file's mtime."""
        try:
            os.utime(self.path)
        except OSError:
            pass

    def still_mine(self) -> bool:
        """True while no newer generation exists, the claim file is there and no done marker."""
        if is_done(self.run_dir, self.step) or not self.path.exists():
            return False
        return max(claim_generations(self.run_dir, self.step), default=-1) == self.generation

    def release(self) -> None:
        """Remove this claim and the older generations it took over."""
        for gen in claim_generations(self.run_dir, self.step):
            if gen <= self.generation:
                (self.run_dir / rf.stage_claim_file(self.step, gen)).unlink(missing_ok=True)


def try_claim(run_dir: str | os.PathLike, step: int, *, scorer: str,
              stale_after: float = DEFAULT_STALE_AFTER) -> Claim | None:
    """Claim ``step`` for ``scorer``, or ``None`` when it is done or held by a live claim.

    Atomic: of several scorers calling this at once, at most one gets the claim.
    """
    run_dir = Path(run_dir)
    if is_done(run_dir, step):
        return None
    gens = claim_generations(run_dir, step)
    if gens:
        top = gens[-1]
        if not claim_is_stale(run_dir / rf.stage_claim_file(step, top), stale_after=stale_after):
            return None
        gen = top + 1
    else:
        gen = 0
    record = rf.claim_record(scorer=scorer, host=socket.gethostname(), pid=os.getpid(), time=time.time())
    claim = Claim(run_dir, step, gen, record)
    claim.path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(claim.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(record))
    if is_done(run_dir, step):  # finished by the previous holder between our checks
        claim.release()
        return None
    return claim


class ClaimHeartbeat:
    """Touch a claim every ``interval`` seconds from a daemon thread while a stage is scored."""

    def __init__(self, claim: Claim, interval: float) -> None:
        self.claim, self.interval = claim, max(0.05, float(interval))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="emascope-claim", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.claim.touch()

    def __enter__(self) -> ClaimHeartbeat:
        self.claim.touch()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
