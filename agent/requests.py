"""Export requests dropped into ``RUN_DIR/requests/`` (by the dashboard), fulfilled by a live agent.

Protocol (docs/run-format.md, "requests/ and exports/"; schema in :mod:`emascope.runformat`):
``requests/<id>.json`` holds ``{"id", "variant", "name", "dtype", "overwrite", "time"}``. At a step
boundary the agent exports the variant to ``exports/<name>.safetensors`` atomically, writes
``exports/<id>.status.json`` and removes the request. An existing ``exports/<name>.safetensors``
is replaced only when the request says ``"overwrite": true``; otherwise the request fails with an
error status and the file is left as it was. Ids and names are checked by the one shared
validation (:func:`emascope.runformat.parse_request`), so nothing is written outside ``exports/``.

Containment and limits (the run directory may be hostile):

- ``requests/`` and ``exports/`` must be real folders of the run (:func:`emascope.runformat.run_subdir`):
  a symlinked one is refused, said once in a ``notice``, and nothing in it is read, written or deleted;
- only files named ``<valid id>.json`` that are regular files (not symlinks, FIFOs, folders) of at
  most :data:`~emascope.runformat.MAX_REQUEST_BYTES` are read; only those are removed. Anything
  else is reported once (an ``export`` event with ``request_id: null``) and left in place;
- at most :data:`~emascope.runformat.REQUESTS_PER_POLL` requests per check and
  :data:`~emascope.runformat.REQUESTS_PER_MINUTE` per minute are fulfilled; the rest wait (a
  ``notice`` says so once per backlog). Beyond :data:`~emascope.runformat.MAX_PENDING_REQUESTS`
  waiting requests the newest are refused with an ``error`` status.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from emascope import runformat as rf
from emascope.atomic import atomic_write_json, pinned_folder

#: Directory entries looked at per check (a folder of a million files costs one bounded scan).
MAX_SCAN = 1024
#: Requests refused per check when too many wait (each refusal writes a status file).
REFUSALS_PER_POLL = 64
#: Problems reported once are remembered up to this many (then forgotten and reported again).
MAX_REMEMBERED = 4096
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
#: Where the OS can, ``requests/`` is opened once per check (never through a symlink) and every
#: entry is looked at, read and removed relative to that open folder: swapping ``requests/`` for a
#: symlink after the check changes nothing. Elsewhere the folder's identity is re-checked instead.
_USE_DIR_FD = (os.open in os.supports_dir_fd and os.unlink in os.supports_dir_fd
               and os.stat in os.supports_dir_fd and os.scandir in os.supports_fd)


class RequestPoller:
    """Fulfils what it finds in ``requests/`` when :meth:`poll` is called.

    ``export_fn(variant, path, dtype) -> bytes_written`` does the export (atomic write);
    ``resolve_variant`` checks the bank holds a (normalised) variant and raises ``ValueError``
    otherwise; ``on_result(record)`` receives each status record (for the events log);
    ``on_notice(message)`` receives what is reported once (a refused folder, a backlog).
    ``clock`` is a monotonic clock in seconds (the per-minute limit).
    ``synthesize(request, path) -> (bytes_written, report)`` writes a synthesised export (a request
    naming ``decay`` or ``sigma_rel``, docs/synthesis.md) from the run's snapshot files; it runs in
    a worker thread (it reads files only), so a long synthesis does not hold training; a decay the
    bank holds is exported directly. Synthesised exports count against the same rate limits.
    ``poll`` never raises; :meth:`join` waits for the workers.
    """

    def __init__(self, run_dir: str | os.PathLike, export_fn: Callable[[str, Path, str | None], int], *,
                 resolve_variant: Callable[[str], str],
                 on_result: Callable[[dict[str, Any]], None],
                 on_notice: Callable[[str], None] = lambda message: None,
                 clock: Callable[[], float] = time.monotonic,
                 synthesize: Callable[[rf.ExportRequest, Path], tuple[int, dict[str, Any]]] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.export_fn = export_fn
        self.resolve_variant = resolve_variant
        self.on_result = on_result
        self.on_notice = on_notice
        self.clock = clock
        self._recent: collections.deque[float] = collections.deque()  # times of exports in the last minute
        self._reported: set[Any] = set()
        self._backlog = False
        self.synthesize = synthesize
        self._workers: list[threading.Thread] = []

    def join(self, timeout: float | None = None) -> None:
        """Wait for synthesised exports still being written (at close)."""
        for t in list(self._workers):
            t.join(timeout)
        self._workers = [t for t in self._workers if t.is_alive()]

    # ------------------------------------------------------------------ reporting

    def _once(self, key: Any, report: Callable[[], None]) -> None:
        if key in self._reported:
            return
        if len(self._reported) >= MAX_REMEMBERED:
            self._reported.clear()
        self._reported.add(key)
        try:
            report()
        except Exception:  # noqa: BLE001 - never into the training loop
            pass

    def _notice_once(self, key: Any, message: str) -> None:
        self._once(key, lambda: self.on_notice(message))

    def _reject_once(self, name: str, why: str, step: int) -> None:
        """A file in requests/ that is not a request: reported once, left in place."""
        record = rf.status_record(request_id=None, state="error", variant=None, step=step, path=None,
                                  nbytes=None, time=time.time(), error=f"{name!r}: {why}; left in place")
        self._once(("file", name), lambda: self.on_result(record))

    # ------------------------------------------------------------------ polling

    def poll(self, step: int, *, final: bool = False) -> int:
        """Handle pending requests within the rate limits; returns how many were handled (fulfilled
        or refused). ``final=True`` (the run is closing): what cannot be handled now is refused."""
        try:
            return self._poll(step, final)
        except Exception:  # noqa: BLE001 - never into the training loop
            return 0

    def _poll(self, step: int, final: bool) -> int:
        try:
            rdir = rf.run_subdir(self.run_dir, rf.REQUESTS)
            dfd = os.open(rdir, _DIR_FLAGS) if _USE_DIR_FD else None  # ELOOP if swapped for a link since
        except FileNotFoundError:
            return 0
        except (ValueError, OSError) as exc:
            self._notice_once(("dir", rf.REQUESTS), f"export requests are ignored: {exc}")
            return 0
        try:
            return self._poll_folder(_Folder(rdir, dfd), step, final)
        finally:
            if dfd is not None:
                os.close(dfd)

    def _poll_folder(self, rdir: _Folder, step: int, final: bool) -> int:
        try:
            names = rdir.scan()
        except OSError as exc:
            self._notice_once(("dir", rf.REQUESTS), f"export requests are ignored: {exc}")
            return 0
        pending: list[str] = []
        for name in sorted(names):
            if not name.endswith(".json") or name.startswith("."):
                continue  # temp files of atomic writes, other files: not requests
            if not rf.ID_RE.fullmatch(name[:-len(".json")]):
                self._reject_once(name, "not a request file name (<id>.json, id [A-Za-z0-9_-]{1,64})", step)
                continue
            pending.append(name[:-len(".json")])
        if not pending:
            self._backlog = False
            return 0
        try:
            (self.run_dir / rf.EXPORTS).mkdir(exist_ok=True)  # (a symlink, even dangling, is kept)
            rf.run_subdir(self.run_dir, rf.EXPORTS)
        except (ValueError, OSError) as exc:  # nowhere safe to write exports and status files
            self._notice_once(("dir", rf.EXPORTS), f"export requests are not fulfilled: {exc}")
            return 0
        now = self.clock()
        while self._recent and now - self._recent[0] >= 60.0:
            self._recent.popleft()
        budget = max(0, min(rf.REQUESTS_PER_POLL, rf.REQUESTS_PER_MINUTE - len(self._recent)))
        handled = 0
        for rid in pending[:budget]:
            if self._handle(rdir, rid, step):
                handled += 1
        waiting = pending[budget:]
        if final:
            refuse, why = waiting, "the run closed before this request was handled (rate limit)"
        else:
            refuse = waiting[rf.MAX_PENDING_REQUESTS:][:REFUSALS_PER_POLL]
            why = f"more than {rf.MAX_PENDING_REQUESTS} export requests were waiting"
        for rid in refuse:
            if self._handle(rdir, rid, step, refuse=why):
                handled += 1
        left = len(waiting) - len(refuse)
        if refuse:
            self._call_notice(f"refused {len(refuse)} export request(s): {why}")
        if left > 0 and not self._backlog:
            self._call_notice(f"{len(pending)} export requests pending: at most {rf.REQUESTS_PER_POLL} per check "
                              f"and {rf.REQUESTS_PER_MINUTE} per minute are fulfilled; {left} deferred")
        self._backlog = left > 0
        return handled

    def _exports_ok(self) -> bool:
        """``exports/`` is still a real folder of the run (a notice says why not)."""
        with self._exports_folder() as folder:
            return folder is not None

    @contextlib.contextmanager
    def _exports_folder(self) -> Iterator[Path | None]:
        """``exports/`` for one write: checked, opened without following a symlink at it and yielded
        as a path through that open folder (:func:`emascope.atomic.pinned_folder`), so a folder swapped
        for a symlink after the check is never written through (where the OS has no such path, the
        checked path: then only the instant between check and write is open). ``None`` (and a
        notice) when ``exports/`` is not a real folder of the run."""
        with contextlib.ExitStack() as stack:
            try:  # OSError (ELOOP): swapped for a symlink since the check
                folder = stack.enter_context(pinned_folder(rf.run_subdir(self.run_dir, rf.EXPORTS)))
            except (ValueError, OSError) as exc:
                self._notice_once(("dir", rf.EXPORTS), f"export requests are not fulfilled: {exc}")
                folder = None
            yield folder

    def _call_notice(self, message: str) -> None:
        try:
            self.on_notice(message)
        except Exception:  # noqa: BLE001
            pass

    def _handle(self, rdir: _Folder, rid: str, step: int, refuse: str | None = None) -> bool:
        """Fulfil (or refuse) one request; False if the file was not ours to touch (left in place)."""
        name = f"{rid}.json"
        try:
            st = rdir.lstat(name)
        except OSError:
            return False  # gone meanwhile (the dashboard withdrew it)
        if not stat.S_ISREG(st.st_mode):
            self._reject_once(name, "not a regular file (symlink, folder or device)", step)
            return False
        if not self._exports_ok():  # swapped for a symlink since the check: leave the request
            return False
        variant = rel = nbytes = error = None
        try:
            if refuse is not None:
                raise RuntimeError(f"refused: {refuse}")
            if st.st_size > rf.MAX_REQUEST_BYTES:
                raise ValueError(f"request file is {st.st_size} bytes (at most {rf.MAX_REQUEST_BYTES})")
            req = rf.parse_request(json.loads(rdir.read_regular(name)), stem=rid)
            if req.synthesized and not self._bank_holds(req):
                if self.synthesize is None:
                    raise ValueError("this agent cannot synthesise decays (a sharded bank writes no "
                                     "stage snapshots to synthesise from)")
                self._check_overwrite(req)
                self._recent.append(self.clock())
                self._take(rdir, name)  # taken: a later poll must not start it again
                self._start_worker(req, rid, step)
                return True
            variant = self.resolve_variant(req.variant)
            rel = rf.export_file(req.name)
            self._check_overwrite(req)
            self._recent.append(self.clock())
            with self._exports_folder() as folder:
                if folder is None:
                    raise ValueError(f"{rf.EXPORTS}/ is not a real folder of the run")
                nbytes = int(self.export_fn(variant, folder / Path(rel).name, req.dtype))
        except Exception as exc:  # noqa: BLE001 - reported in the status file
            rel, error = None, f"{type(exc).__name__}: {exc}"
        record = self._status(rid, variant, step, rel, nbytes, error, None)
        self._take(rdir, name)
        self.on_result(record)
        return True

    def _check_overwrite(self, req: rf.ExportRequest) -> None:
        """``FileExistsError`` when ``exports/<name>.safetensors`` exists and the request did not ask
        to overwrite it (plain and synthesised exports alike)."""
        rel = rf.export_file(req.name)
        if not req.overwrite and os.path.lexists(self.run_dir / rel):
            raise FileExistsError(f"{rel} already exists and the request did not ask to overwrite it "
                                  '(set "overwrite": true to replace it); the file was left as it was')

    @staticmethod
    def _take(rdir: _Folder, name: str) -> None:
        """Remove a handled request file (relative to the checked folder, see :class:`_Folder`)."""
        try:
            rdir.unlink(name)
        except OSError:
            pass

    def _bank_holds(self, req: rf.ExportRequest) -> bool:
        if req.decay is None:
            return False
        try:
            self.resolve_variant(req.variant)
            return True
        except ValueError:
            return False

    def _start_worker(self, req: rf.ExportRequest, rid: str, step: int) -> None:
        rel = rf.export_file(req.name)

        def work() -> None:
            nbytes = report = error = None
            out_rel: str | None = rel
            try:
                with self._exports_folder() as folder:
                    if folder is None:
                        raise ValueError(f"{rf.EXPORTS}/ is not a real folder of the run")
                    nbytes, report = self.synthesize(req, folder / Path(rel).name)
            except Exception as exc:  # noqa: BLE001 - reported in the status file
                out_rel, error = None, f"{type(exc).__name__}: {exc}"
            try:
                at = int(report["step"]) if report else step
                self.on_result(self._status(rid, req.variant, at, out_rel, nbytes, error, report))
            except Exception:  # noqa: BLE001 - a worker never raises
                pass

        t = threading.Thread(target=work, name=f"emascope-synthesis-{rid}", daemon=True)
        self._workers.append(t)
        t.start()

    def _status(self, rid: str, variant: str | None, step: int, rel: str | None, nbytes: int | None,
                error: str | None, synthesis: dict[str, Any] | None) -> dict[str, Any]:
        """Write ``exports/<id>.status.json``; returns the record."""
        record = rf.status_record(request_id=rid, state="error" if error else "done", variant=variant,
                                  step=step, path=rel, nbytes=nbytes, time=time.time(), error=error,
                                  synthesis=synthesis)
        try:
            with self._exports_folder() as folder:
                if folder is not None:
                    atomic_write_json(folder / Path(rf.status_file(rid)).name, record)
        except OSError as exc:
            record["error"] = record["error"] or f"status file: {exc}"
        return record


class _Folder:
    """The checked ``requests/`` folder: entries are looked at, read and removed relative to the
    folder opened at the check (``fd``, never through a symlink) where the OS allows; otherwise by
    path, removing only while the folder is still the one that was checked (same device/inode)."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self.fd = path, fd
        self._identity = _identity(path) if fd is None else None

    def scan(self) -> list[str]:
        """Up to :data:`MAX_SCAN` entry names."""
        names: list[str] = []
        with os.scandir(self.path if self.fd is None else self.fd) as it:
            for entry in it:
                names.append(entry.name)
                if len(names) >= MAX_SCAN:
                    break
        return names

    def lstat(self, name: str) -> os.stat_result:
        if self.fd is None:
            return os.lstat(self.path / name)
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def read_regular(self, name: str) -> bytes:
        """The bytes of a regular file, never following a symlink or blocking on a FIFO; size-capped."""
        fd = os.open(self.path / name, _READ_FLAGS) if self.fd is None else os.open(name, _READ_FLAGS, dir_fd=self.fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            data = os.read(fd, rf.MAX_REQUEST_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) > rf.MAX_REQUEST_BYTES:
            raise ValueError(f"request file is larger than {rf.MAX_REQUEST_BYTES} bytes")
        return data

    def unlink(self, name: str) -> None:
        if self.fd is not None:
            os.unlink(name, dir_fd=self.fd)
        elif _identity(self.path) == self._identity:  # still the folder that was checked (not a link now)
            os.unlink(self.path / name)


def _identity(folder: Path) -> tuple[int, int]:
    """(device, inode) of ``folder`` itself (a symlink is its own identity, never its target's)."""
    st = os.lstat(folder)
    return st.st_dev, st.st_ino
