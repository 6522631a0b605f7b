"""HostFeed: keep a bank in host memory, fed by asynchronous copies and updated by a background thread.

The pattern of NeMo's EMA (``EMAOptimizer`` with a CPU EMA): after an optimizer step the weights
are copied out (on CUDA: cast into an fp32 device staging vector and copied device-to-host into
page-locked memory with ``non_blocking=True``, both on a side stream), and a worker thread folds
the copy into the bank while training goes on. The training thread only pays for starting the copy.

Exactness. Every update is applied, in order, with its own step number (``update_every`` stays
exact: with ``m > 1`` the worker has ``m`` optimizer steps to finish each update). Two host
buffers alternate; when both are still waiting for the worker, :meth:`HostFeed.submit` blocks
until one is free (counted in ``waits``) instead of dropping an update. On CUDA the training
stream waits (on the device, no host sync) for the gather kernel only, so the next optimizer step
cannot overwrite weights that are still being read; the device-to-host copy overlaps the next
forward/backward. Readers call :meth:`flush` first: it waits until every submitted copy is folded
in and re-raises an error of the worker (every later call raises it too: the bank missed an update).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

#: Seconds an idle worker waits for the next copy before it exits (the next submit starts another).
IDLE_EXIT_S = 10.0


class HostFeed:
    """Double-buffered host staging and one worker thread that folds each copy into a host bank.

    Args:
        numel: length of a staging vector (the bank's padded local column count).
        source_device: where the weights live (CUDA: pinned buffers, a side stream, a device staging
            vector; CPU: the copy is a plain host memcpy on the training thread).
        gather: ``gather(dst)`` copies (and casts to fp32) the live weights into ``dst``.
        apply: ``apply(staging, step)`` folds a host staging vector of optimizer step ``step`` into
            the bank; runs on the worker thread.
    """

    def __init__(self, numel: int, source_device: torch.device, gather: Callable[[torch.Tensor], None],
                 apply: Callable[[torch.Tensor, int], None], buffers: int = 2) -> None:
        self._cuda = source_device.type == "cuda"
        self._device = source_device
        self._gather, self._apply = gather, apply
        self.buffers = [torch.zeros(numel, dtype=torch.float32, pin_memory=self._cuda) for _ in range(buffers)]
        self._dev_staging = torch.zeros(numel, dtype=torch.float32, device=source_device) if self._cuda else None
        self._stream = torch.cuda.Stream(source_device) if self._cuda else None
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(buffers):
            self._free.put(i)
        self._work: queue.Queue[tuple[int, object, int] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.copies = 0   # updates handed to the worker
        self.waits = 0    # submits that waited for a free buffer (the worker was behind)

    def submit(self, step: int) -> None:
        """Copy the live weights of optimizer step ``step`` out and queue them for the worker."""
        self._raise()
        try:
            i = self._free.get_nowait()
        except queue.Empty:
            self.waits += 1
            i = self._free.get()
        buf, done = self.buffers[i], None
        if self._cuda:
            assert self._stream is not None and self._dev_staging is not None
            current = torch.cuda.current_stream(self._device)
            self._stream.wait_stream(current)  # the optimizer's writes are done
            with torch.cuda.stream(self._stream):
                self._gather(self._dev_staging)
                gathered = torch.cuda.Event()
                gathered.record(self._stream)
                buf.copy_(self._dev_staging, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._stream)
            current.wait_event(gathered)  # the next optimizer step waits for the read, on the device
        else:
            self._gather(buf)
        self.copies += 1
        with self._lock:  # the worker may be leaving after an idle spell: it checks the queue under this lock
            self._work.put((i, done, step))
            self._start()

    def flush(self) -> None:
        """Wait until every submitted copy is folded in; re-raise the worker's error, if any."""
        if self._thread is not None:
            self._work.join()
        self._raise()

    def close(self) -> None:
        """Fold in what is queued and stop the worker (idempotent; a later submit starts a new one)."""
        with self._lock:
            thread = self._thread
            if thread is not None:
                self._work.put(None)
        if thread is not None:
            thread.join()

    @property
    def busy(self) -> bool:
        """Whether copies are still waiting for the worker."""
        return self._work.unfinished_tasks > 0

    def _raise(self) -> None:
        """Raise the worker's error (it sticks: the bank missed that update, so it is not usable)."""
        err = self._error
        if err is not None:
            raise RuntimeError(f"the host bank's update thread failed: {type(err).__name__}: {err}") from err

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="emascope-host-bank", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                item = self._work.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:  # idle: leave (a bank nobody closes does not keep a thread forever)
                    if self._work.empty():
                        self._thread = None
                        return
                continue
            if item is None:
                with self._lock:
                    self._thread = None
                self._work.task_done()
                return
            i, done, step = item
            try:
                if done is not None:
                    done.synchronize()  # type: ignore[attr-defined]
                if self._error is None:
                    self._apply(self.buffers[i], step)
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread at its next call
                self._error = exc
            finally:
                self._free.put(i)
                self._work.task_done()
