"""Background scoring: freeze what a sweep needs at a scoring point, score it on a worker thread.

At a scoring point the training thread only *freezes* the stage (:func:`freeze_stage`): a copy of
the bank's rows and of the live weights (``EMABank.state_dict()`` and ``live_values()``, the bank's
public copy API), placed by :func:`choose_copy_placement`, and hands it to the
:class:`BackgroundScorer`. Its worker thread turns the copy into a model-less bank
(``EMABank.from_state``), loads each variant into its own eval copy of the model (on GPU, on its
own CUDA stream) and runs the same sweep as an inline one (:meth:`emascope.scoring.Scorer.sweep`),
writing the records with the stage's step.

Rules:

- **One sweep at a time.** A scoring point reached while a sweep runs is queued (``"queue"``, the
  default: at most one stage waits; a newer one replaces it and the replaced one is recorded as
  ``score_skipped`` with ``reason: "superseded"``), skipped (``"skip"``: ``score_skipped`` with
  ``reason: "busy"``, and nothing is copied), or waits (``"wait"``: a scoring point that finds a
  stage already waiting blocks training until the worker takes that one; no stage is lost).
- **Nothing stalls training.** Exceptions of the sampler, metrics or hooks are ``error`` events as
  in an inline sweep. A sweep that makes no progress (no sample batch, variant or metric) for
  ``score_timeout`` seconds is *abandoned*: a ``score_timeout`` event, its buffered records are
  dropped and it can write nothing more (Python cannot kill a thread; the hung one is left to
  finish or hang as a daemon), and the next stage gets a fresh worker and eval copy.
- **A finished sweep is never lost.** Its records are appended as soon as it ends (one write,
  :class:`emascope.rundir.StageWriter`), then its done marker is written. ``close()`` waits for the
  running and the queued sweep, up to ``close_timeout`` seconds.
- **Same numbers as inline.** The worker never touches the global random generators: the
  reference's extractor is built (and the reference data read) in the training thread first
  (:meth:`~emascope.scoring.Scorer.prepare`, under ``torch.random.fork_rng``), and samplers take all
  randomness from the generator they are given (their contract).

Memory: the frozen copy is ``4 * numel * (rows) + live weights`` bytes (:func:`frozen_nbytes`);
the worker's model-less bank holds it again in host memory while the sweep runs, plus the eval copy
of the model.

**Sharing the frozen base** (``attach(score_share_frozen=True)``, off by default): the frozen
parameters the bank does not average and that are still frozen (:meth:`EMABank.still_frozen`, a
LoRA fine-tune's base) are then not copied: the stage holds the training model's own tensors and
the eval copy shares the very ``Parameter`` objects, which nothing writes (the copy names them in
:data:`emascope.bank.SHARED_ATTR`; ``EMABank.swap``, post-hoc ``StateSwap`` and a disabled bank's
load leave them alone). The job must not change frozen weights in place while a sweep runs. What
can be seen is checked when the sweep ends: a version counter that moved (an in-place op,
``load_state_dict``, a layer unfrozen and trained) or a tensor swapped under a ``Parameter``
(``p.data = ...``) drops the stage (``score_skipped``, ``reason: "frozen_changed"``); after the
search between grid decays it is an ``error`` event (``where: "search"``: its records are written
by then). The eval copy is rebuilt when the parameters to share change (a layer unfrozen, a
``Parameter`` replaced). Not seen: in-place writes through ``.data`` (e.g. peft's
``merge_adapter``/``unmerge``, which TRL's vLLM weight sync runs around generation): keep the
default there.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emascope import runformat as rf
from emascope.bank import SHARED_ATTR, EMABank, same_tensor, shared_with_training, unwrap_model
from emascope.claims import mark_done
from emascope.frozenfile import FrozenStore
from emascope.rundir import RunWriter, StageWriter
from emascope.scoring import Scorer, SweepResult, cuda_devices, model_device
from emascope.snapshot import load_snapshot, save_snapshot

#: A frozen copy goes to a memory only when it takes at most this share of that memory's free bytes.
HEADROOM = 0.5


def frozen_nbytes(bank: EMABank, *, share_frozen: bool = False) -> int:
    """Bytes of a frozen copy of ``bank``: its fp32 rows (every variant but ``raw``) and its live
    values (each in its own dtype), but the shared frozen parameters (``share_frozen``)."""
    rows = len(bank.variants) - 1
    shared = set(bank.still_frozen()) if share_frozen else set()
    live = sum(t.numel() * t.element_size() for k, t in bank.live_values().items() if k not in shared)
    return 4 * int(bank.numel) * rows + int(live)


def shared_keys(bank: EMABank, model: nn.Module) -> frozenset[str]:
    """State-dict keys (of the unwrapped ``model``) of the bank's still-frozen entries, tied names
    included: what ``score_share_frozen=True`` reads in place."""
    names = set(bank.still_frozen())
    target = unwrap_model(model)
    by_id = {id(p) for n, p in target.named_parameters(remove_duplicate=False) if n in names}
    return frozenset(n for n, p in target.named_parameters(remove_duplicate=False) if id(p) in by_id)


def host_available_bytes() -> int | None:
    """Host memory available to new allocations (``MemAvailable`` of /proc/meminfo, else
    ``sysconf``); ``None`` if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def device_free_bytes(device: torch.device) -> int | None:
    """Free bytes on an accelerator (``torch.cuda.mem_get_info``); host memory for ``cpu``."""
    if device.type == "cpu":
        return host_available_bytes()
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001
            return None
    return None


def free_after_plan(plan: Any, placement: str, *, device_now: int | None,
                    host_now: int | None) -> tuple[int | None, int | None]:
    """Free device and host bytes for a frozen copy, from the bank's memory plan
    (:class:`emascope.plan.MemoryPlan`) and from what is free now.

    The plan's free memory (measured at attach) less what the plan put there for the bank's
    ``placement``; the smaller of that and ``device_now`` / ``host_now``
    (training's own allocations since attach count too). ``None`` where neither is known.
    """
    def smaller(a: int | None, b: int | None) -> int | None:
        known = [x for x in (a, b) if x is not None]
        return min(known) if known else None

    plan_dev = plan_host = None
    if plan is not None:
        cost = next((c for c in plan.costs if c.placement == placement), None)
        if cost is not None:
            if plan.device_free is not None:
                plan_dev = max(0, int(plan.device_free) - int(cost.device_bytes))
            if plan.host_free is not None:
                plan_host = max(0, int(plan.host_free) - int(cost.host_bytes))
    return smaller(plan_dev, device_now), smaller(plan_host, host_now)


def choose_copy_placement(nbytes: int, device: torch.device | str, *, requested: str = "auto",
                          free_device: int | None = None, free_host: int | None = None) -> str:
    """Where a frozen copy of ``nbytes`` bytes of a bank on ``device`` goes: ``"device"``,
    ``"pinned"`` (host memory, page-locked, filled by non-blocking copies) or ``"disk"`` (the stage
    snapshot file).

    The one decision point of the placement (a memory plan can feed it ``free_device`` /
    ``free_host``; unknown amounts are measured here). ``requested`` other than ``"auto"`` is
    obeyed (``"pinned"`` for a CPU bank means ``"device"``: it already is host memory). Rule for
    ``"auto"``: the bank's own device when the copy takes at most :data:`HEADROOM` of its free
    memory (for a CPU bank: of the available host memory); else, for an accelerator bank, pinned
    host memory under the same rule; else disk.
    """
    device = torch.device(device)
    if requested != "auto":
        return "device" if requested == "pinned" and device.type == "cpu" else requested
    free_d = device_free_bytes(device) if free_device is None else free_device
    if free_d is not None and nbytes <= HEADROOM * free_d:
        return "device"
    if device.type != "cpu":
        free_h = host_available_bytes() if free_host is None else free_host
        if free_h is not None and nbytes <= HEADROOM * free_h:
            return "pinned"
    return "disk"


@dataclass
class FrozenStage:
    """What a background sweep of one stage needs, copied at the scoring point.

    ``state``/``live``: ``EMABank.state_dict()`` and copies of ``live_values()`` (placement
    ``"device"`` or ``"pinned"``); ``path``: the stage snapshot (``"disk"``); a disabled bank
    freezes only the model's state dict (``live``, ``bank_less``). ``shared``: the entries read in
    place (``score_share_frozen``): the training model's tensors, held in ``live`` or, for
    ``"disk"``, used instead of the snapshot's side file; ``versions`` their version counters at
    the scoring point. ``ready``: a CUDA event the copies were recorded behind, one per device
    (``None`` on CPU).
    """

    step: int
    placement: str
    variants: list[str]
    state: dict[str, Any] | None = None
    live: dict[str, torch.Tensor] | None = None
    path: Path | None = None
    bank_less: bool = False
    ready: Any = None
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    versions: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)
    blocked: float = 0.0
    nbytes: int = 0

    def open_bank(self) -> EMABank | None:
        """The model-less bank of this stage (``None`` for a bank-less stage); frees the copy."""
        for event in self.ready or ():
            event.synchronize()
        try:
            if self.bank_less:
                return None
            if self.path is not None:
                # the shared base: the training model's own tensors, not read back from the side file
                bank = load_snapshot(self.path, frozen=self.shared or None)
                bank.share_stored(self.shared)  # (an inline snapshot: the same values, held once)
            else:
                assert self.state is not None and self.live is not None
                bank = EMABank.from_state(self.state, self.live)
            return bank
        finally:
            if not self.bank_less:
                self.state = self.live = None
                self.shared = {}


def _copy_tensors(tree: dict[str, Any], placement: str,
                  keep: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Own copies of the tensors of a (flat) dict: clones on their device, or pinned host copies;
    the entries named in ``keep`` are passed on as they are (detached, not copied)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if not torch.is_tensor(v):
            out[k] = v
        elif k in keep:
            out[k] = v.detach()
        elif placement == "pinned" and v.device.type != "cpu":
            dst = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            out[k] = dst.copy_(v.detach(), non_blocking=True)
        else:
            out[k] = v.detach().clone()
    return out


@torch.no_grad()
def freeze_stage(bank: EMABank | None, model: nn.Module, step: int, *, placement: str,
                 run_dir: Path, run_id: str = "", frozen_files: FrozenStore | None = None,
                 share_frozen: bool = False) -> FrozenStage:
    """Copy what the sweep of ``step`` needs (runs in the training thread; this is its cost).

    ``bank=None`` (a disabled bank): only the model's state dict, scored as ``raw``. Placement
    ``"disk"`` writes the stage snapshot (``emascope.runformat.stage_snapshot_file``) instead of
    copying in memory; ``state_dict()`` already returns copies, so ``"device"`` only clones the
    live values. ``frozen_files``: the run's frozen side-file store, for the ``"disk"`` snapshot.
    ``share_frozen``: hold the bank's still-frozen entries in place instead of copying them (see
    the module docstring); a disabled bank's stage copies everything.
    """
    t = time.perf_counter()
    shared: dict[str, torch.Tensor] = {}
    if bank is not None and share_frozen:
        values = bank.live_values()
        shared = {k: values[k].detach() for k in bank.still_frozen()}
    if bank is None:
        live = _copy_tensors(model.state_dict(), "device" if placement == "disk" else placement)
        frozen = FrozenStage(step, placement, [rf.RAW], live=live, bank_less=True)
    elif placement == "disk":
        path = Path(run_dir) / rf.stage_snapshot_file(step)
        nbytes = save_snapshot(bank, path, metadata={"run_id": str(run_id), "step": str(step)}, frozen=frozen_files)
        frozen = FrozenStage(step, placement, list(bank.variants), path=path, nbytes=nbytes, shared=shared)
    else:
        state = bank.state_dict()  # its tensors are fresh copies already (on the bank's device)
        if placement == "pinned":
            state = _copy_tensors(state, placement)
        live = {**_copy_tensors({k: v for k, v in bank.live_values().items() if k not in shared}, placement),
                **shared}
        nbytes = sum(v.numel() * v.element_size() for d in (state, live) for k, v in d.items()
                     if torch.is_tensor(v) and not (d is live and k in shared))
        frozen = FrozenStage(step, placement, list(bank.variants), state=state, live=live, nbytes=nbytes,
                             shared=shared)
    for index in cuda_devices(model):  # the copies were queued on these devices' current streams
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(index))
        frozen.ready = [*(frozen.ready or []), event]
    frozen.versions = {k: (v, v._version) for k, v in shared.items()}  # detach() shares the counter
    frozen.blocked = time.perf_counter() - t
    return frozen


def changed_in_place(frozen: FrozenStage, twin: nn.Module, keys: frozenset[str]) -> list[str]:
    """The shared frozen parameters that changed since the stage's scoring point: a version counter
    that moved, or a ``Parameter`` of the eval copy (``keys``: the ones it shares) that no longer
    holds the tensor the stage saw (``p.data = ...``). Writes through ``.data`` are not seen."""
    out = [k for k, (t, v) in frozen.versions.items() if t._version != v]
    sd = unwrap_model(twin).state_dict(keep_vars=True)
    out += [k for k, (t, _) in frozen.versions.items()
            if k not in out and k in keys and k in sd and not same_tensor(sd[k], t)]
    return out


def eval_copy(model: nn.Module, share: frozenset[str] = frozenset()) -> nn.Module:
    """The worker's own copy of the model (``copy.deepcopy``, no gradients, eval mode). ``share``:
    parameter names (of the unwrapped model) whose ``Parameter`` objects the copy shares with
    ``model`` instead of copying them (:func:`shared_keys`); they are left untouched."""
    params = dict(unwrap_model(model).named_parameters(remove_duplicate=False))
    memo = {id(params[k]): params[k] for k in share if k in params}
    twin = copy.deepcopy(model, memo=dict(memo))
    for p in twin.parameters():
        if id(p) not in memo:
            p.grad = None
            p.requires_grad_(False)
    setattr(unwrap_model(twin), SHARED_ATTR, frozenset(k for k in share if k in params))
    return twin.eval()


def _shared_ids(model: nn.Module, share: frozenset[str]) -> dict[str, int]:
    """``{name: id(parameter)}`` of the parameters ``share`` names in ``model`` (unwrapped) now."""
    params = dict(unwrap_model(model).named_parameters(remove_duplicate=False))
    return {k: id(params[k]) for k in share if k in params}


def _load_live(model: nn.Module, live: dict[str, Any]) -> None:
    """``model.load_state_dict(live)`` but the parameters the eval copy shares with the training
    model (:func:`emascope.bank.shared_with_training`: never written)."""
    target = unwrap_model(model)
    missing = set(target.state_dict()) - set(live)
    if missing:
        raise RuntimeError(f"the frozen stage lacks {sorted(missing)[:5]} of the model's state")
    leave = shared_with_training(target)
    target.load_state_dict({k: v for k, v in live.items() if k not in leave}, strict=False)


@dataclass
class _Job:
    frozen: FrozenStage
    model: nn.Module
    last_progress: float = field(default_factory=time.monotonic)
    writer: StageWriter | None = None
    abandoned: bool = False
    result: SweepResult | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    def tick(self) -> None:
        self.last_progress = time.monotonic()


class BackgroundScorer:
    """One worker thread scoring frozen stages one at a time (see the module docstring).

    ``on_result(result)`` is called from the worker with each finished sweep's
    :class:`~emascope.scoring.SweepResult`; then ``after(result, model, tick)`` (if given: the
    search between grid decays) with the worker's eval copy of the model and the job's progress
    tick, while the stage still counts as running (its stage snapshot is kept). Methods other than
    the worker's own are called from the training thread.
    """

    def __init__(self, scorer: Scorer, writer: RunWriter, run_dir: Path, *, policy: str = "queue",
                 stall_timeout: float | None = 1800.0,
                 on_result: Callable[[SweepResult], None] = lambda r: None,
                 after: Callable[[SweepResult, nn.Module, Callable[[], None]], None] | None = None) -> None:
        if policy not in rf.BUSY_POLICIES:
            raise ValueError(f"policy must be one of {rf.BUSY_POLICIES}, got {policy!r}")
        self.scorer, self.writer, self.run_dir = scorer, writer, Path(run_dir)
        self.policy, self.stall_timeout, self.on_result = policy, stall_timeout, on_result
        self.after = after
        self._cv = threading.Condition()
        self._running: _Job | None = None
        self._pending: _Job | None = None
        self._thread: threading.Thread | None = None
        self._eval_model: nn.Module | None = None
        self._eval_share: tuple[frozenset[str], dict[str, int]] = (frozenset(), {})  # what it was built sharing
        self._stopping = False

    # ---------------------------------------------------------------- training-thread side

    def steps_in_use(self) -> set[int]:
        """Steps of the stages running or waiting (a ``"disk"`` copy reads its stage snapshot)."""
        with self._cv:
            return {j.frozen.step for j in (self._running, self._pending) if j is not None}

    @property
    def busy(self) -> bool:
        """A sweep is running or waiting."""
        with self._cv:
            return self._running is not None or self._pending is not None

    def wait_for_slot(self) -> float:
        """``"wait"`` policy: block until no stage is waiting (the worker took it, or it was
        abandoned as hung); returns the seconds waited. Training is then at most one stage ahead of
        the running sweep, and no stage is skipped."""
        t = time.monotonic()
        while True:
            self.check()
            with self._cv:
                if self._pending is None:
                    return time.monotonic() - t
                self._cv.wait(0.2)

    def accepts(self) -> bool:
        """Whether a stage frozen now would be scored or queued (``False``: ``"skip"`` policy and busy)."""
        return not (self.policy == "skip" and self.busy)

    def model_copy(self, model: nn.Module, share: frozenset[str] = frozenset()) -> nn.Module:
        """The worker's eval copy, made (in the training thread) the first time, after a hang, and
        whenever the parameters it should share (``share``, :func:`shared_keys`) are other names or
        other ``Parameter`` objects than those it was built with (a layer unfrozen, a parameter
        replaced). Compared with what was recorded at build time: the copy itself is not read (the
        worker may be using it)."""
        ids = _shared_ids(model, share)
        if self._eval_model is None or self._eval_share != (frozenset(share), ids):
            self._eval_model = eval_copy(model, share)
            self._eval_share = (frozenset(share), ids)
        return self._eval_model

    def submit(self, frozen: FrozenStage, model: nn.Module, *, force_queue: bool = False) -> None:
        """Hand a frozen stage to the worker (queue or skip by the policy; ``force_queue`` always
        queues, e.g. the final stage at close). ``model`` is the worker's eval copy."""
        job = _Job(frozen, model)
        skipped: tuple[_Job, str] | None = None
        with self._cv:
            busy = self._running is not None or self._pending is not None
            if busy and self.policy == "skip" and not force_queue:
                skipped = (job, "busy")
            else:
                if self._pending is not None:
                    skipped = (self._pending, "superseded")
                self._pending = job
                self._ensure_worker()
                self._cv.notify_all()
        if skipped is not None:
            self.writer.event("score_skipped", skipped[0].frozen.step, reason=skipped[1], policy=self.policy,
                              scorer=rf.SCORER_BACKGROUND)
        if busy and (skipped is None or skipped[1] == "superseded"):
            self.writer.event("score_queued", frozen.step, scorer=rf.SCORER_BACKGROUND)

    def check(self) -> None:
        """Watchdog (training thread): abandon a sweep without progress for ``stall_timeout`` s."""
        with self._cv:
            job = self._running
        if job is None or self.stall_timeout is None:
            return
        idle = time.monotonic() - job.last_progress
        if idle > self.stall_timeout:
            self._abandon(job, reason=f"no progress for {idle:.0f} s (score_timeout={self.stall_timeout:g} s)")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no sweep runs or waits (checking for hangs meanwhile); ``True`` if idle."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.check()
            with self._cv:
                if self._running is None and self._pending is None:
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(0.2 if left is None else min(0.2, left))

    def close(self, timeout: float | None = None) -> bool:
        """Wait for the running and queued sweeps (up to ``timeout`` s), then stop the worker.
        Sweeps still unfinished then are abandoned (``score_timeout``, ``reason: "close_timeout"``)
        or skipped (``score_skipped``, ``reason: "close"``). ``True`` if everything finished."""
        done = self.wait(timeout)
        with self._cv:
            pending, self._pending = self._pending, None
            running = self._running
            self._stopping = True
            self._cv.notify_all()
        if pending is not None:
            self.writer.event("score_skipped", pending.frozen.step, reason="close", policy=self.policy,
                              scorer=rf.SCORER_BACKGROUND)
        if running is not None:
            waited = "did not wait" if timeout == 0 else f"stopped waiting after {timeout:g} s (close_timeout)"
            self._abandon(running, reason=f"close() {waited}", kind="close_timeout")
        thread = self._thread
        if thread is not None and done:
            thread.join(timeout=5.0)
        return done

    def _abandon(self, job: _Job, *, reason: str, kind: str = "hang") -> None:
        with self._cv:
            if self._running is not job or job.abandoned:
                return
            job.abandoned = True
            self._running = None
            self._thread = None          # the hung thread keeps its eval copy; the next job gets new ones
            self._eval_model = None
            if job.writer is not None:
                job.writer.mute()
            if self._pending is not None:
                self._ensure_worker()
            self._cv.notify_all()
        self.writer.event("score_timeout", job.frozen.step, scorer=rf.SCORER_BACKGROUND, reason=reason,
                          cause=kind, seconds_idle=time.monotonic() - job.last_progress)

    def _ensure_worker(self) -> None:
        """(under the lock) Start a worker thread if none is alive."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="emascope-scoring", daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------- worker side

    def _loop(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cv:
                while self._pending is None and not self._stopping and self._thread is me:
                    self._cv.wait()
                if self._thread is not me or self._pending is None:
                    return
                job, self._pending = self._pending, None
                job.tick()
                self._running = job
            self._run(job)
            with self._cv:
                if self._running is job:
                    self._running = None
                job.finished.set()
                self._cv.notify_all()
                if job.abandoned:
                    return  # a replacement worker took over

    def _run(self, job: _Job) -> None:
        frozen = job.frozen
        step = frozen.step
        writer = job.writer = StageWriter(self.writer, on_write=job.tick)
        if job.abandoned:
            writer.mute()
        device = model_device(job.model)
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                bank = frozen.open_bank()
                if bank is None:
                    _load_live(job.model, frozen.live)  # a disabled bank: score the live weights
                job.tick()
                result = self.scorer.sweep(job.model, bank, frozen.variants, step, writer=writer,
                                           scorer=rf.SCORER_BACKGROUND, isolate_rng=False,
                                           on_progress=job.tick)
                if stream is not None:
                    stream.synchronize()
            changed = changed_in_place(frozen, job.model, shared_with_training(job.model))
            if changed:  # the sweep read weights that are not the stage's any more: record nothing of it
                writer.event("score_skipped", step, reason="frozen_changed", scorer=rf.SCORER_BACKGROUND,
                                  entries=changed[:20], message=(
                                      f"{len(changed)} shared frozen parameter(s) changed in place while stage "
                                      f"{step} was scored (a layer unfrozen and trained, weights loaded): the stage "
                                      "is not recorded; parameters no longer frozen are copied from the next stage on"))
                writer.mute()
                return
            n = writer.commit(then=lambda n: mark_done(self.run_dir, step, rf.done_record(
                step=step, scorer=rf.SCORER_BACKGROUND, seconds=result.seconds, records=n, time=time.time())))
            if n is not None:
                job.result = result
                self.on_result(result)
                if self.after is not None and not job.abandoned:
                    self.after(result, job.model, job.tick)
                    late = changed_in_place(frozen, job.model, shared_with_training(job.model))
                    if late and not job.abandoned:  # the search read the training model's frozen weights
                        writer.error("search", step, RuntimeError(
                            f"{len(late)} shared frozen parameter(s) changed in place while the search after stage "
                            f"{step} ran ({', '.join(late[:5])}): its synthesised decays may have been scored with "
                            "the changed weights"))
        except Exception as exc:  # noqa: BLE001 - never let the worker die silently
            writer.error("background", step, exc)
            writer.event("score_failed", step, scorer=rf.SCORER_BACKGROUND,
                         reason=f"{type(exc).__name__}: {exc}")
