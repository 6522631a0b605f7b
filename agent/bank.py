"""EMABank: many EMA decays of one model's weights in one fp32 ``[K, N]`` bank, one fused update.

Layout. The model's ``state_dict`` entries are split into

- *averaged* entries: trainable floating-point parameters (and floating-point buffers when
  ``average_buffers=True``), flattened into columns ``[offset, offset + numel)`` of a logical
  ``[R, N]`` bank (``R = K`` decays, ``+1`` row for BEMA's EMA). Always fp32, whatever the model dtype.
- *fixed* entries: frozen parameters, buffers (unless averaged; integer buffers such as
  ``num_batches_tracked`` always), stored nowhere while a model is attached: they are read from the
  live model when a variant is materialised (a snapshot stores them once).

Sharding (:mod:`emascope.shards`). A rank holds *segments* of the ``N`` columns: elements ``[a, b)``
of averaged tensor ``i`` in its local columns ``[col, col + b - a)``. One process holds every
tensor whole (``col = offset``): the layout above. Under DistributedDataParallel (replicated
weights, ``shard=None`` shards by default) rank ``r`` holds a contiguous 1/W of the columns (whole
blocks) and reads them from its own replica; under FSDP2 (``fully_shard``, DTensor parameters) a
rank holds the rows of its own parameter shards (``DTensor.to_local()``, uneven shards included).
An update reads only the rank's own weights: **no communication per update**, 1/W of the memory,
the same elementwise arithmetic, hence bit-identical rows. Swapping a variant in is local for
FSDP2 (each rank writes its shards) and one all-gather of that variant for DDP; ``materialize``
and ``variant_flat`` gather (collectives: call them on every rank); exports stream entry by entry
to one rank (:meth:`EMABank.stream_variant`). ``state_dict()`` of a sharded bank is the rank's own
shard (resume at the same world size); per-rank snapshot files and re-sharding are in
:mod:`emascope.shardfiles`. Non-finite weights are checked on the rank's own columns: a step whose
NaN/Inf lie in some ranks' columns only is skipped by those ranks only (counters are per rank).

Memory layout: the local ``[R, n]`` bank is stored *blocked*, as ``[ceil(n / B), R, B]`` with
``B = BLOCK`` columns per block (the tail of the last block is zero padding). One block holds all R
rows of B consecutive columns contiguously, so the update streams through memory once, front to
back, and the B staging values of a block are reused by all R rows from L1 cache. (A row-major
``[R, N]`` bank makes the update walk R streams ``4N`` bytes apart; on the 2-core development CPU
that was ~1.3x slower than the blocked pass; see bench/bank_update.py.) ``state_dict()`` and
snapshots use the plain row-major ``[R, n]`` form.

Update (once per optimizer step, see :meth:`EMABank.update`): the live averaged tensors are copied
into an fp32 staging vector with one ``torch._foreach_copy_`` onto views, then all rows are lerped
towards it in one call, ``blocks.lerp_(staging.view(nb, 1, B).expand(nb, R, B), w.view(1, R, 1))``,
where ``w[r]`` is the weight given to the new weights (``1 - d**m``, Eq. U/L of :mod:`emascope.ema_math`).
On CPU, the blocks lying inside a large fp32 parameter are lerped straight from the parameter's
storage instead (one call per parameter, see ``DIRECT_MIN``); only the rest goes through staging.

Placements (:mod:`emascope.plan`): ``device`` (the whole bank with the weights), ``sharded`` (1/W
per rank, with the weights), ``host`` (``device="cpu"``: host memory, pinned with CUDA, fed by an
asynchronous copy and updated by a background thread, :class:`emascope.offload.HostFeed`);
``device="auto"`` picks one from the memory plan and refuses, naming the numbers, when none fits.

Non-finite live weights skip the update for the whole (local) bank. On CPU the check is a float32
sum of the staging (a finite sum implies finite elements; a non-finite sum is confirmed
element-wise, so a finite overflow never skips). On accelerators it is done without a host sync: an
``isfinite`` flag of a float64 sum (which cannot overflow) stays on the device, zeroes the row
weights of a bad step, and the staging is ``nan_to_num``-ed so that the weight-0 lerp leaves the
bank bit-identical.

Tied parameters are stored once (deduplicated by identity) and appear under every name in
materialised state dicts. Models wrapped in ``DistributedDataParallel``/``DataParallel`` or
``torch.compile`` are unwrapped.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from emascope import shards as S
from emascope.collectives import all_gather_padded, recv, send
from emascope.ema_math import (
    DEFAULT_DECAYS,
    BEMAConfig,
    bema_alpha,
    bema_weight,
    effective_decay,
    update_weight,
    validate_bema_schedule,
    validate_decays,
    validate_update_every,
)
from emascope.offload import HostFeed
from emascope.plan import MemoryPlan, choose, plan_memory
from emascope.runformat import BEMA, RAW, parse_variant, variant_name

__all__ = ["DEFAULT_DECAYS", "EMABank", "BEMAConfig", "unwrap_model"]

STATE_FORMAT = "emascope.EMABank"
STATE_VERSION = 1

# Columns per block of the blocked bank layout (see the module docstring): a block's staging slice
# (8 KiB) stays in L1 while R rows of it are updated. 1024-4096 measured alike on the development CPU.
BLOCK = 2048
# CPU only: an fp32 parameter of at least this many elements is lerped straight from its own storage
# over the blocks it fully covers (no staging copy); smaller ones and block remainders go through the
# staging vector. Saves ~3 of the ~20 bytes/element of non-bank memory traffic per update (measured
# 6-11 % faster on the 25M-parameter bench model, bit-identical results).
DIRECT_MIN = 64 * BLOCK
# dtypes whose values survive a round trip through fp32 exactly (a DDP swap backs up only the
# rank's own columns, in fp32, and all-gathers them back)
_FP32_EXACT = (torch.float32, torch.bfloat16, torch.float16)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def _dtype_from_str(name: str) -> torch.dtype:
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def _dtype_str(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


@dataclass
class _Entry:
    """One deduplicated state tensor. ``kind``: "avg" (in the bank), "frozen", "buffer", "int"."""

    name: str
    keys: list[str]
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    offset: int = -1
    numel: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "keys": self.keys, "shape": list(self.shape),
                "dtype": _dtype_str(self.dtype), "kind": self.kind,
                "offset": self.offset, "numel": self.numel}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _Entry:
        return cls(name=str(d["name"]), keys=[str(k) for k in d["keys"]],
                   shape=tuple(int(s) for s in d["shape"]), dtype=_dtype_from_str(d["dtype"]),
                   kind=str(d["kind"]), offset=int(d["offset"]), numel=int(d["numel"]))


def _build_layout(model: nn.Module, average_buffers: bool) -> tuple[list[_Entry], list[torch.Tensor], int]:
    """Entries in state_dict order (tied tensors merged), the live tensors per entry, and N."""
    entries: list[_Entry] = []
    live: list[torch.Tensor] = []
    by_id: dict[int, int] = {}
    n = 0
    state = model.state_dict(keep_vars=True)
    lazy = [k for k, t in state.items() if isinstance(t, torch.Tensor) and nn.parameter.is_lazy(t)]
    if lazy:
        raise ValueError(f"the model has uninitialized (lazy) parameters or buffers ({', '.join(lazy[:5])}): "
                         "run one forward pass to initialize them before building the bank (attach)")
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue  # get_extra_state() payloads: not weights, left to the model
        if id(t) in by_id:
            entries[by_id[id(t)]].keys.append(key)
            continue
        is_param = isinstance(t, nn.Parameter)
        floating = t.is_floating_point()
        if is_param and floating and t.requires_grad:
            kind = "avg"
        elif is_param:
            kind = "frozen"
        elif floating:
            kind = "avg" if average_buffers else "buffer"
        else:
            kind = "int"
        e = _Entry(name=key, keys=[key], shape=tuple(t.shape), dtype=t.dtype, kind=kind)
        if kind == "avg":
            e.offset, e.numel = n, t.numel()
            n += t.numel()
        by_id[id(t)] = len(entries)
        entries.append(e)
        live.append(t)
    return entries, live, n


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same memory the same way (copying one onto the other is a no-op)."""
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.numel() > 0 and a.data_ptr() == b.data_ptr())


def _owners(model: nn.Module, entries: list[_Entry], live: list[torch.Tensor]) -> list[tuple[nn.Module, str] | None]:
    """Per entry, the module and attribute name that hold its tensor (``None`` where the state_dict key
    is not such a path). A module may replace a buffer by a new tensor (``self.buf = self.buf * d``,
    ``model.half()``, ``model.to(...)``): the bank looks it up there instead of keeping the old one."""
    out: list[tuple[nn.Module, str] | None] = []
    for e, t in zip(entries, live, strict=True):
        prefix, _, name = e.name.rpartition(".")
        try:
            mod = model.get_submodule(prefix)
        except AttributeError:
            out.append(None)
            continue
        found = mod._parameters.get(name) if name in mod._parameters else mod._buffers.get(name)
        out.append((mod, name) if found is t else None)
    return out


#: Attribute an eval copy of the training model carries (``emascope.background.eval_copy``): the
#: state-dict keys of the parameters it shares with the training model, which nothing may write.
SHARED_ATTR = "_emascope_shared_with_training"


def shared_with_training(model: nn.Module) -> frozenset[str]:
    """Keys of the parameters ``model`` (unwrapped) shares with the training model
    (:data:`SHARED_ATTR`; empty for any other model): swaps and loads leave them alone."""
    return frozenset(getattr(unwrap_model(model), SHARED_ATTR, None) or ())


def free_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` in bytes: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` of
    ``/proc/meminfo`` (else ``sysconf``) on the CPU; ``None`` when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


class EMABank:
    """A bank of EMAs of one model's weights, one per decay, updated together. See docs/bank.md.

    Args:
        model: the training model (DDP/DataParallel/``torch.compile`` wrappers are unwrapped; FSDP2
            ``fully_shard`` models are used as they are). Its averaged tensors are read at every
            :meth:`update`; keep the same parameter objects (in-place changes such as
            ``model.half()`` are fine). Buffers are looked up in their modules at every read, so a
            buffer the model replaces by a new tensor is followed. What is averaged is fixed here: a
            parameter unfrozen later is not (:meth:`unaveraged_trainable`).
        decays: decays ``d`` in [0, 1): the weight *kept* from the old average per optimizer step
            (``1 - d`` goes to the new weights); the averaging window is ~``1/(1-d)`` optimizer steps.
            ``None``: :data:`DEFAULT_DECAYS`.
        device: where the bank lives. ``None``: the parameters' device. ``"cpu"``: the host placement,
            host memory (pinned when the weights are on CUDA) fed by asynchronous copies and updated by
            a background thread; every update is applied, in order (reads wait for it). ``"auto"``:
            from the memory plan (:attr:`memory_plan`): with the weights if the bank fits there,
            else host memory, else a ``ValueError`` naming the numbers.
        update_every: ``m``; read the weights at every ``m``-th optimizer step only and apply the
            decay ``d**m`` there, so each decay still averages over ~``1/(1-d)`` optimizer steps.
        bias_correction: ``False`` (default): every EMA starts from the weights at attach time
            (``EMA_0 = theta_attach``). ``True``: Adam style, a zero-initialised EMA divided by
            ``1 - (d**m)**n`` after ``n`` applied updates, which equals an average of only the
            weights seen since attach (the first update copies them); before the first update the
            attach weights are returned.
        bema: ``True`` or a :class:`BEMAConfig` adds the ``"bema"`` variant (arXiv 2508.00180), with
            ``theta_0`` = the weights at attach and ``t`` = optimizer steps since attach.
        average_buffers: average floating-point buffers too (default: take them from the live model).
            Integer buffers are always taken from the live model.
        shard: split the bank over the ranks (:mod:`emascope.shards`): DDP's process group, the
            FSDP2 parameters' mesh, else the default group. ``None``: when the model is
            DistributedDataParallel-wrapped in a group of more than one rank, and always for FSDP2
            (DTensor) parameters. A sharded bank is built on every rank; its ``materialize``,
            ``variant_flat``, ``swap`` (DDP) and ``stream_variant`` are collectives.

    Counters: :attr:`step` counts :meth:`update` calls (optimizer steps); :attr:`num_updates` the
    bank updates applied; :attr:`num_skipped` those skipped because the live weights were non-finite
    (per rank for a sharded bank).
    """

    def __init__(self, model: nn.Module, decays: Sequence[float] | None = DEFAULT_DECAYS, *,
                 device: str | torch.device | None = None, update_every: int = 1,
                 bias_correction: bool = False, bema: bool | BEMAConfig = False,
                 average_buffers: bool = False, shard: bool | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._configure(DEFAULT_DECAYS if decays is None else decays, update_every, bias_correction, bema,
                        average_buffers)
        self._model: nn.Module | None = unwrap_model(model)
        entries, live, n = _build_layout(self._model, self.average_buffers)
        if n == 0:
            raise ValueError("the model has no trainable floating-point parameters to average")
        self._entries = entries
        self._live = live
        self._owners = _owners(self._model, entries, live)
        self._n = n
        self._plan = S.resolve(model, [e.name for e in entries], live, shard)
        self._set_segments()
        param_device = S.local_tensor(self._avg_live[0]).device
        self.memory_plan = self._make_plan(param_device)
        self.placement, self.device = self._place(device, param_device)
        self._stored: dict[str, torch.Tensor] | None = None  # model-less banks only
        self._allocate(param_device)
        with torch.no_grad():
            init = torch.zeros(self._nb * BLOCK, dtype=torch.float32, device=param_device)
            self._gather_into(init, cache=False)
            self._init_rows(init.to(self.device))

    # ------------------------------------------------------------------ construction helpers
    def _configure(self, decays: Sequence[float], update_every: int, bias_correction: bool,
                   bema: bool | BEMAConfig, average_buffers: bool) -> None:
        self.decays: tuple[float, ...] = validate_decays(decays)
        self.update_every: int = validate_update_every(update_every)
        for name, value in (("bias_correction", bias_correction), ("average_buffers", average_buffers)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.bias_correction = bias_correction
        self.average_buffers = average_buffers
        if bema is True:
            bema = BEMAConfig()
        elif bema is False or bema is None:
            bema = None
        elif not isinstance(bema, BEMAConfig):
            raise ValueError(f"bema must be a bool or a BEMAConfig, got {bema!r}")
        validate_bema_schedule(bema, self.update_every)
        self.bema: BEMAConfig | None = bema
        names = [variant_name(d) for d in self.decays]
        self.variants: list[str] = [RAW, *names] + ([BEMA] if self.bema is not None else [])
        self._row_of = {v: i for i, v in enumerate(names)}
        if self.bema is not None:
            self._row_of[BEMA] = len(names)
        self.step = 0          # optimizer steps seen by update()
        self._events = 0       # update() calls that tried to fold weights in (step % m == 0)
        self._feed: HostFeed | None = None
        self._plan: S.ShardPlan | None = None
        self.memory_plan: MemoryPlan | None = None  # set for banks built on a model

    def _set_segments(self) -> None:
        """This rank's segments (``(avg index, a, b, col)``), every rank's, and the local shapes."""
        self._avg_entries = [e for e in self._entries if e.kind == "avg"]
        self._avg_live = [t for e, t in zip(self._entries, self._live, strict=True) if e.kind == "avg"]
        # averaged buffers (average_buffers=True): looked up again at every update (see _owners)
        self._avg_buffers = [(j, i) for j, i in enumerate(i for i, e in enumerate(self._entries) if e.kind == "avg")
                             if not isinstance(self._live[i], nn.Parameter)]
        self._any_dtensor = any(S.is_dtensor(t) for t in self._avg_live)
        plan = self._plan
        world = 1 if plan is None else plan.world
        self._segs_by_rank = [self._segments_of(r) for r in range(world)]
        me = 0 if plan is None else plan.rank
        self._segs = self._segs_by_rank[me]
        self._nl = S.local_numel(self._segs)
        # where each averaged tensor's local data starts in its full flattening, and its local shape
        self._local_start, self._local_shape = [], []
        for e in self._avg_entries:
            if plan is not None and plan.kind == S.FSDP:
                r0, r1 = S.row_range(e.shape[0], me, world)
                self._local_start.append(r0 * math.prod(e.shape[1:]))
                self._local_shape.append((r1 - r0, *e.shape[1:]))
            else:
                self._local_start.append(0)
                self._local_shape.append(e.shape)
        self._whole = [b - a == math.prod(self._local_shape[i]) for i, a, b, _ in self._segs]
        self._pieces_of_entry: list[list[tuple[int, int, int, int]]] = [[] for _ in self._avg_entries]
        for r, segs in enumerate(self._segs_by_rank):
            for i, a, b, col in segs:
                self._pieces_of_entry[i].append((r, a, b, col))

    def _segments_of(self, rank: int) -> list[S.Segment]:
        avg, plan = self._avg_entries, self._plan
        if plan is None:
            return [(i, 0, e.numel, e.offset) for i, e in enumerate(avg)]
        if plan.kind == S.DDP:
            return S.ddp_segments([(e.offset, e.numel) for e in avg], self._n, BLOCK, rank, plan.world)
        return S.fsdp_segments([e.shape for e in avg], rank, plan.world)

    def _make_plan(self, param_device: torch.device) -> MemoryPlan:
        """The memory plan of this bank's placements (:func:`emascope.plan.plan_memory`)."""
        avg = self._avg_entries
        nbytes = sum(e.numel * e.dtype.itemsize for e in avg)
        plan = self._plan
        world = 1 if plan is None else plan.world
        try:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        except ValueError:
            local = world
        dev_free = free_bytes(param_device)
        host_free = free_bytes(torch.device("cpu"))
        if param_device.type == "cpu" and dev_free is not None:
            dev_free //= max(1, local)  # the ranks of a node share its memory
        return plan_memory(self._n, len(self.decays), world=world, bema=self.bema is not None,
                           param_bytes=max(1, round(nbytes / self._n)), device_free=dev_free,
                           host_free=host_free, ranks_per_node=local,
                           sharding="none" if plan is None else plan.kind)

    def _place(self, device: Any, param_device: torch.device) -> tuple[str, torch.device]:
        """``(placement, bank device)`` for the ``device`` argument."""
        if isinstance(device, str) and device == "auto":
            placement = choose(self.memory_plan, "auto")
            return placement, (torch.device("cpu") if placement == "host" else param_device)
        if device is None:
            dev = param_device
        else:
            try:
                dev = torch.device(device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"bad device {device!r}: {exc}") from None
            if dev.type == "cpu":
                return "host", dev
        return ("device" if self._plan is None else "sharded"), dev

    def _allocate(self, param_device: torch.device) -> None:
        dev = self.device
        rows = len(self.decays) + (1 if self.bema is not None else 0)
        self._rows = rows
        self._nb = -(-self._nl // BLOCK)
        padded = self._nb * BLOCK
        has_model = self._model is not None
        host = self.placement == "host" and has_model
        # zeros: the padding columns of the last block stay finite (0) forever
        self._blocks = torch.zeros((self._nb, rows, BLOCK), dtype=torch.float32, device=dev)
        self._cross = not host and param_device != dev and has_model
        self._views_cache: dict[int, list[torch.Tensor]] = {}
        self._staging = None if host else torch.zeros(padded, dtype=torch.float32, device=dev)
        # fp32 staging on the parameters' device: the gather target when the bank lives on another device
        self._dev_staging = (torch.zeros(padded, dtype=torch.float32, device=param_device)
                             if self._cross else self._staging)
        if host:
            self._feed = HostFeed(padded, param_device, gather=self._gather_into, apply=self._apply_no_grad)
        m, f64 = self.update_every, torch.float64
        # per decay: d**m kept (Eq. U) and 1 - d**m given to the new weights (Eq. L) per bank update
        self._deff = torch.tensor([effective_decay(d, m) for d in self.decays], dtype=f64, device=dev)
        self._w_const = torch.tensor([update_weight(d, m) for d in self.decays], dtype=f64, device=dev)
        self._bc_pow = torch.ones(len(self.decays), dtype=torch.float64, device=dev)  # (d**m)**n_applied
        self._applied = torch.zeros((), dtype=torch.int64, device=dev)
        self._w = torch.empty(rows, dtype=torch.float64, device=dev)
        self._theta0 = (torch.empty(self._nl, dtype=torch.float32, device=dev)
                        if self.bema is not None else None)
        # CPU: a Python-side isfinite check is free; accelerators use device-side flags (no sync).
        self._sync_free = dev.type != "cpu"
        self._plan_direct()

    def _plan_direct(self) -> None:
        """CPU same-device banks: which blocks are lerped straight from a parameter, which from staging.

        ``_direct``: ``(segment, start in the segment's flat source, first block, end block)`` for
        every run of blocks lying inside one large fp32 segment. ``_staged_runs``: the other runs of
        blocks, and ``_pieces``: ``(segment, start, end, staging column)`` copies that fill their
        columns. ``_direct`` is None where the plain full-staging path is used (accelerators,
        cross-device, host placement, snapshots, models without large fp32 parameters).
        """
        self._direct: list[tuple[int, int, int, int]] | None = None
        self._staged_runs: list[tuple[int, int]] = []
        self._pieces: list[tuple[int, int, int, int]] = []
        if self._model is None or self._cross or self._feed is not None or self.device.type != "cpu":
            return
        direct = []
        covered = [False] * self._nb
        for k, (i, a, b, col) in enumerate(self._segs):
            if b - a < DIRECT_MIN or self._avg_entries[i].dtype != torch.float32:
                continue
            j0, j1 = -(-col // BLOCK), (col + b - a) // BLOCK
            if j1 > j0:
                direct.append((k, j0 * BLOCK - col, j0, j1))
                covered[j0:j1] = [True] * (j1 - j0)
        if not direct:
            return
        j = 0
        while j < self._nb:
            if covered[j]:
                j += 1
                continue
            k = j
            while k < self._nb and not covered[k]:
                k += 1
            self._staged_runs.append((j, k))
            j = k
        for j, k in self._staged_runs:
            c0, c1 = j * BLOCK, k * BLOCK
            for s, (_, a, b, col) in enumerate(self._segs):
                lo, hi = max(col, c0), min(col + b - a, c1)
                if lo < hi:
                    self._pieces.append((s, lo - col, hi - col, lo))
        self._direct = direct

    def _init_rows(self, staging: torch.Tensor) -> None:
        self._blocks.copy_(self._blocked(staging))
        if self._theta0 is not None:
            self._theta0.copy_(staging[:self._nl])

    def _blocked(self, staging: torch.Tensor) -> torch.Tensor:
        """The padded staging vector as a ``[nb, R, B]`` view (stride 0 over rows)."""
        return staging.view(self._nb, 1, BLOCK).expand(self._nb, self._rows, BLOCK)

    def _rows_flat(self) -> torch.Tensor:
        """The local bank in row-major form: a fresh contiguous ``[R, n]`` fp32 tensor on the bank device."""
        out = torch.empty((self._rows, self._nl), dtype=torch.float32, device=self.device)
        full, rem = divmod(self._nl, BLOCK)
        out[:, :full * BLOCK].view(self._rows, full, BLOCK).copy_(self._blocks[:full].permute(1, 0, 2))
        if rem:
            out[:, full * BLOCK:].copy_(self._blocks[full, :, :rem])
        return out

    def _load_rows(self, rows: torch.Tensor) -> None:
        """Inverse of :meth:`_rows_flat`: write a row-major ``[R, n]`` bank into the blocks."""
        full, rem = divmod(self._nl, BLOCK)
        self._blocks[:full].permute(1, 0, 2).copy_(rows[:, :full * BLOCK].reshape(self._rows, full, BLOCK))
        if rem:
            self._blocks[full, :, :rem].copy_(rows[:, full * BLOCK:])
            self._blocks[full, :, rem:].zero_()

    def _row(self, r: int) -> torch.Tensor:
        """Row ``r`` of the local bank as a fresh contiguous fp32 ``[n]`` vector."""
        return self._blocks[:, r, :].reshape(-1)[:self._nl]

    # ------------------------------------------------------------------ live tensors and segments
    def _locals(self) -> list[torch.Tensor]:
        """Each averaged tensor's data on this rank (DTensor: its local shard), detached."""
        if self._model is None:
            assert self._stored is not None
            return [self._stored[e.name] for e in self._avg_entries]
        if not self._any_dtensor:
            return [t.detach() for t in self._avg_live]
        return [S.local_tensor(t) for t in self._avg_live]

    def _sources(self, locals_: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per segment, the live data it holds: the local tensor itself when the segment covers all
        of it, else a slice of its flattening (a view for contiguous tensors)."""
        out = []
        for (i, a, b, _), whole in zip(self._segs, self._whole, strict=True):
            t = locals_[i]
            if whole:
                out.append(t)
            else:
                s = self._local_start[i]
                out.append(t.reshape(-1)[a - s:b - s])
        return out

    def _views(self, buf: torch.Tensor, cache: bool = True) -> list[torch.Tensor]:
        """Per segment, the view of ``buf`` (local columns) it fills, shaped like :meth:`_sources`."""
        key = buf.data_ptr()
        if cache and key in self._views_cache:
            return self._views_cache[key]
        views = []
        for (i, a, b, col), whole in zip(self._segs, self._whole, strict=True):
            v = buf[col:col + b - a]
            views.append(v.view(self._local_shape[i]) if whole else v)
        if cache:
            self._views_cache[key] = views
        return views

    def _gather_into(self, buf: torch.Tensor, locals_: list[torch.Tensor] | None = None, *,
                     cache: bool = True) -> None:
        """Copy (and cast to fp32) the rank's live averaged columns into ``buf`` (``cache``: a
        persistent buffer, whose views are kept)."""
        srcs = self._sources(self._locals() if locals_ is None else locals_)
        if srcs:
            torch._foreach_copy_(self._views(buf, cache=cache), srcs)

    # ------------------------------------------------------------------ properties
    @property
    def num_skipped(self) -> int:
        """Bank updates skipped because the live weights held NaN/Inf (reads a device counter)."""
        self._flush()
        return self._events - int(self._applied.item())

    @property
    def num_updates(self) -> int:
        """Bank updates applied so far (``n`` of the bias correction)."""
        self._flush()
        return int(self._applied.item())

    @property
    def has_model(self) -> bool:
        return self._model is not None

    @property
    def numel(self) -> int:
        """Averaged scalars per row (``N``, the whole model's)."""
        return self._n

    @property
    def local_numel(self) -> int:
        """Columns this rank holds (``N`` unless sharded)."""
        return self._nl

    @property
    def sharded(self) -> bool:
        return self._plan is not None

    @property
    def shard_plan(self) -> S.ShardPlan | None:
        """How the bank is sharded (``None``: not sharded)."""
        return self._plan

    @property
    def nbytes(self) -> int:
        """Bytes of the bank this rank holds: the blocked rows (with the padding of the last block)
        and BEMA's ``theta0``; staging buffers are not included."""
        n = self._blocks.numel() * self._blocks.element_size()
        return n + (self._theta0.numel() * 4 if self._theta0 is not None else 0)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self) -> None:
        """Fold the live weights in; call once after every optimizer step.

        Only every ``update_every``-th call reads the weights (Eq. U: decay ``d**m``). A call whose
        weights hold NaN/Inf changes no bank and is counted in :attr:`num_skipped`. Reads only this
        rank's own weights: no communication.
        """
        if self._model is None:
            raise RuntimeError("this EMABank was loaded from a snapshot and has no model; update() needs "
                               "a bank built on a model (EMABank(model, ...)) and load_state_dict()")
        self.step += 1
        if self.step % self.update_every:
            return
        for j, i in self._avg_buffers:
            self._avg_live[j] = self._current(i)
        self._events += 1
        if self._feed is not None:
            self._feed.submit(self.step)
            return
        assert self._staging is not None
        if self._cross:
            self._gather_into(self._dev_staging)
            self._staging.copy_(self._dev_staging)
            self._apply(self._staging, self.step)
            return
        locals_ = self._locals()
        if self._direct is not None and all(locals_[self._segs[k][0]].dtype == torch.float32
                                            for k, *_ in self._direct):
            self._apply_direct(self.step, locals_)
            return
        self._gather_into(self._staging, locals_)
        self._apply(self._staging, self.step)

    def _apply_direct(self, t: int, locals_: list[torch.Tensor]) -> None:
        """CPU path of :meth:`_apply`: large parameters are read in place, the rest via staging."""
        assert self._direct is not None and self._staging is not None
        flats = [x.reshape(-1) for x in self._sources(locals_)]
        st = self._staging
        if self._pieces:
            torch._foreach_copy_([st[d:d + (b - a)] for s, a, b, d in self._pieces],
                                 [flats[s][a:b] for s, a, b, d in self._pieces])
        parts = ([flats[s][a:a + (j1 - j0) * BLOCK] for s, a, j0, j1 in self._direct]
                 + [st[j * BLOCK:k * BLOCK] for j, k in self._staged_runs])
        # every local column is in exactly one part; finite sums imply finite elements (see _apply)
        if not bool(torch.isfinite(torch.stack([p.sum() for p in parts]).sum())):
            if not all(bool(torch.isfinite(p).all()) for p in parts):
                return  # skipped: _events counted it, _applied did not
        w = self._row_weights(t, None).to(torch.float32).view(1, self._rows, 1)
        for p, (_, _, j0, j1) in zip(parts, self._direct, strict=False):
            n = j1 - j0
            self._blocks[j0:j1].lerp_(p.view(n, 1, BLOCK).expand(n, self._rows, BLOCK), w)
        for j, k in self._staged_runs:
            n = k - j
            self._blocks[j:k].lerp_(st[j * BLOCK:k * BLOCK].view(n, 1, BLOCK).expand(n, self._rows, BLOCK), w)
        self._applied.add_(1)
        self._bema_start(t)

    def _flush(self) -> None:
        """Wait until every weight copy handed to the host placement's worker is folded in."""
        if self._feed is not None:
            self._feed.flush()

    def close(self) -> None:
        """Fold in pending host-placement updates and stop its worker thread (the bank stays readable;
        a later :meth:`update` starts a new one). Never raises: a worker's error is raised by reads."""
        if self._feed is not None:
            self._feed.close()

    def _apply_no_grad(self, staging: torch.Tensor, t: int) -> None:
        with torch.no_grad():  # grad mode is per thread: the host worker sets its own
            self._apply(staging, t)

    def _apply(self, staging: torch.Tensor, t: int) -> None:
        """Fold ``staging`` (padded fp32 ``[nb * B]``, weights of optimizer step ``t``) into every row."""
        if self._sync_free:
            # float64 sum: cannot overflow for fp32 inputs, so it is non-finite iff an input is
            flag = torch.isfinite(staging.sum(dtype=torch.float64))
            staging.nan_to_num_(0.0, 0.0, 0.0)
        else:
            # a finite float32 sum implies finite elements; confirm the rare non-finite sum exactly
            if not bool(torch.isfinite(staging.sum())) and not bool(torch.isfinite(staging).all()):
                return  # skipped: _events counted it, _applied did not
            flag = None
        w = self._row_weights(t, flag)
        self._fused_lerp(staging, w.to(torch.float32).view(1, self._rows, 1))
        if flag is None:
            self._applied.add_(1)
        else:
            self._applied.add_(flag.to(torch.int64))
        self._bema_start(t)

    def _bema_start(self, t: int) -> None:
        """BEMA Eq. tau: at step ``tau`` (> 0) the EMA row was just set to the live weights (weight 1);
        ``theta_0`` becomes the same values. (A skipped update at ``tau`` leaves both at the attach
        weights.)"""
        if self.bema is not None and self.bema.tau > 0 and t == self.bema.tau:
            self._theta0.copy_(self._row(len(self.decays)))

    def _row_weights(self, t: int, flag: torch.Tensor | None) -> torch.Tensor:
        """Per-row lerp weight (float64, ``[R]``): Eq. L, or Eq. BC' with bias correction, then BEMA."""
        k = len(self.decays)
        if self.bias_correction:
            new_pow = self._bc_pow * self._deff
            if flag is not None:
                new_pow = torch.where(flag, new_pow, self._bc_pow)
            self._bc_pow.copy_(new_pow)
            w = self._w_const / (1.0 - self._bc_pow)  # Eq. BC': (1 - b) / (1 - b**n)
            self._w[:k].copy_(torch.where(self._bc_pow < 1.0, w, torch.zeros_like(w)))
        else:
            self._w[:k].copy_(self._w_const)
        if self.bema is not None:
            self._w[k] = bema_weight(t, self.bema, self.update_every)
        if flag is not None:
            return torch.where(flag, self._w, torch.zeros_like(self._w))
        return self._w

    def _fused_lerp(self, staging: torch.Tensor, w: torch.Tensor) -> None:
        """All rows in one pass over the blocks: ``bank[r] += w[r] * (staging - bank[r])``.

        ``w`` is ``[1, R, 1]`` fp32, the weight of the new weights per row (``1 - d**m``).
        """
        self._blocks.lerp_(self._blocked(staging), w)

    def unaveraged_trainable(self) -> list[str]:
        """Names of parameters that were frozen when the bank was built but require grad now (a layer
        unfrozen later): the bank does not average them, every variant holds their live values.
        Empty for a bank without a model."""
        if self._model is None:
            return []
        return [e.name for i, e in enumerate(self._entries) if e.kind == "frozen" and self._current(i).requires_grad]

    def still_frozen(self) -> list[str]:
        """Names of the frozen-parameter entries (kind ``"frozen"``: not averaged) that are still
        frozen now (``requires_grad`` False). Training does not change them, so background scoring
        reads them in place instead of copying them (a LoRA base). Empty for a bank without a model
        or a sharded one."""
        if self._model is None or self._plan is not None:
            return []
        return [e.name for i, e in enumerate(self._entries)
                if e.kind == "frozen" and not self._current(i).requires_grad]

    def frozen_keys(self) -> list[str]:
        """State-dict keys of the frozen parameters (entries of kind ``"frozen"``: not averaged, e.g.
        a LoRA base): every variant holds their live values. Buffers are not among them."""
        return [k for e in self._entries if e.kind == "frozen" for k in e.keys]

    def share_stored(self, values: dict[str, torch.Tensor]) -> None:
        """Model-less bank: hold ``values[name]`` itself (not a copy) as the live value of each fixed
        entry ``name`` (same shape and dtype), e.g. the training model's frozen parameters in place of
        equal copies read from a snapshot. ``ValueError`` for an averaged or unknown entry."""
        if self._stored is None:
            raise ValueError("share_stored: only a model-less bank stores its live values")
        kinds = {e.name: e for e in self._entries}
        for name, t in values.items():
            e = kinds.get(name)
            if e is None or e.kind == "avg":
                raise ValueError(f"share_stored: {name!r} is not a fixed entry of this bank")
            old = self._stored[name]
            if tuple(t.shape) != tuple(old.shape) or t.dtype != old.dtype:
                raise ValueError(f"share_stored: {name!r} is {t.dtype} {tuple(t.shape)}, the bank holds "
                                 f"{old.dtype} {tuple(old.shape)}")
            self._stored[name] = t.detach()

    # ------------------------------------------------------------------ reading out
    def resolve(self, variant: str | float) -> str:
        """The canonical variant string, or a ValueError listing the available ones."""
        v = parse_variant(variant)
        if v not in self.variants:
            raise ValueError(f"unknown variant {variant!r}; this bank has: {', '.join(self.variants)}")
        return v

    def _current(self, i: int) -> torch.Tensor:
        """The model's tensor of entry ``i`` now: the one its module holds (a buffer may have been
        replaced since the bank was built), else the one seen at construction."""
        owner = self._owners[i] if self._model is not None else None
        if owner is not None:
            mod, name = owner
            t = mod._parameters.get(name) if name in mod._parameters else mod._buffers.get(name)
            if t is not None and t is not self._live[i]:
                e = self._entries[i]
                if e.kind == "avg" and isinstance(self._live[i], nn.Parameter):
                    raise ValueError(f"parameter {e.name!r} was replaced by a new Parameter object after the bank "
                                     "was built (e.g. load_state_dict(assign=True)): the bank averages the old one; "
                                     "attach again (resume=True keeps the run) to follow the new one")
                if tuple(t.shape) != e.shape:
                    raise ValueError(f"entry {e.name!r} has shape {tuple(t.shape)} in the model but "
                                     f"{e.shape} when the bank was built")
                self._live[i] = t
        return self._live[i]

    def _live_value(self, i: int) -> torch.Tensor:
        """The current live value of entry ``i`` (model or snapshot), not a copy (DTensor: as is)."""
        if self._model is not None:
            return self._current(i).detach()
        assert self._stored is not None
        return self._stored[self._entries[i].name]

    def _raw_local(self) -> torch.Tensor:
        """This rank's live averaged columns as a fresh fp32 ``[n]`` vector on the bank device."""
        out = torch.empty(self._nl, dtype=torch.float32, device=self.device)
        srcs = self._sources(self._locals())
        for dst, src in zip(self._views(out, cache=False), srcs, strict=True):
            dst.copy_(src)
        return out

    @torch.no_grad()
    def _variant_local(self, v: str) -> torch.Tensor:
        """This rank's columns of canonical variant ``v`` as a fresh fp32 ``[n]`` vector."""
        self._flush()
        if v == RAW:
            return self._raw_local()
        row = self._row(self._row_of[v])
        if v == BEMA:
            assert self.bema is not None and self._theta0 is not None
            if self.step < self.bema.tau:  # BEMA Eq. tau: the live weights during the burn-in
                return self._raw_local()
            # BEMA Eq. correction: theta'_t = EMA_t + alpha_t (theta_t - theta_0), t = self.step
            return row + bema_alpha(self.step, self.bema) * (self._raw_local() - self._theta0)
        return row

    @torch.no_grad()
    def variant_flat(self, variant: str | float) -> torch.Tensor:
        """The averaged tensors of a variant as a fresh fp32 ``[N]`` vector on the bank device.

        Sharded banks: a collective (every rank calls it and gets the whole vector)."""
        v = self.resolve(variant)
        local = self._variant_local(v)
        return local if self._plan is None else self._gather_full(local)

    def _all_local_numels(self) -> list[int]:
        return [S.local_numel(s) for s in self._segs_by_rank]

    def _gather_full(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's local columns -> the whole fp32 ``[N]`` vector on every rank (one all-gather)."""
        assert self._plan is not None
        parts = all_gather_padded(local, self._all_local_numels(), self._plan.group)
        full = torch.empty(self._n, dtype=torch.float32, device=self.device)
        for r, segs in enumerate(self._segs_by_rank):
            for i, a, b, col in segs:
                off = self._avg_entries[i].offset
                full[off + a:off + b].copy_(parts[r][col:col + b - a])
        return full

    @torch.no_grad()
    def materialize(self, variant: str | float, *, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """A full state_dict of the model for ``variant`` ("raw", "bema", or a decay).

        ``dtype=None`` keeps each entry's model dtype; a floating dtype (e.g. ``torch.float32``) casts
        floating entries only. ``device=None``: the live tensor's device (cpu for snapshot banks).
        Tensors are fresh copies; tied parameters share one tensor under all their names. Sharded
        banks: a collective; every rank gets the whole state_dict (use :meth:`stream_variant` to
        bring one variant to one rank tensor by tensor).
        """
        v = self.resolve(variant)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        # raw: the live tensors themselves (DTensors: their own full_tensor(), exact in any dtype)
        flat = None if v == RAW else self.variant_flat(v)
        out: dict[str, torch.Tensor] = {}
        for i, e in enumerate(self._entries):
            live = self._live_value(i)
            if S.is_dtensor(live):
                live = live.full_tensor()  # type: ignore[attr-defined]  # a collective, same order everywhere
            dev = torch.device(device) if device is not None else live.device
            # the model's dtype now (model.half() after construction), else the recorded one
            own = live.dtype if self._model is not None else e.dtype
            dt = dtype if (dtype is not None and own.is_floating_point) else own
            if flat is not None and e.kind == "avg":
                src = flat[e.offset:e.offset + e.numel].view(e.shape)
            else:
                src = live
            t = src.to(device=dev, dtype=dt, copy=True)
            for key in e.keys:
                out[key] = t
        return out

    @torch.no_grad()
    def variant_state(self, variant: str | float) -> dict[str, torch.Tensor]:
        """``variant``'s state_dict without copying what the bank does not average: averaged entries
        are fresh tensors (model dtype, the live tensor's device), every other entry (frozen
        parameters, buffers) is the live tensor itself (the model's, or the snapshot's; do not modify
        it). For a LoRA model this is the adapters' size, not the base model's. Not for sharded banks."""
        if self._plan is not None:
            raise ValueError("variant_state: a sharded bank has no local full state; use stream_variant")
        v = self.resolve(variant)
        flat = None if v == RAW else self.variant_flat(v)
        out: dict[str, torch.Tensor] = {}
        for i, e in enumerate(self._entries):
            live = self._live_value(i)
            if flat is not None and e.kind == "avg":
                t = flat[e.offset:e.offset + e.numel].view(e.shape).to(device=live.device, dtype=live.dtype, copy=True)
            else:
                t = live
            for key in e.keys:
                out[key] = t
        return out

    @torch.no_grad()
    def stream_variant(self, variant: str | float, *, dtype: torch.dtype | None = None,
                       dst: int = 0) -> Iterator[tuple[list[str], torch.Tensor | None]]:
        """``(state_dict keys, tensor)`` for every entry of ``variant``, one entry at a time, the
        tensor on the CPU of group rank ``dst`` (``None`` on the other ranks), as :meth:`materialize`
        would give it (same values, dtypes and tied keys).

        Sharded banks: a collective; each entry's pieces are sent to ``dst`` (point to point) as it
        is reached, so no rank ever holds more than its shard plus one entry beyond what ``dst``
        accumulates. Not sharded: the entries of :meth:`materialize`.
        """
        v = self.resolve(variant)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        if self._plan is None:
            sd = self.materialize(v, dtype=dtype, device="cpu")
            for e in self._entries:
                yield list(e.keys), sd[e.keys[0]]
            return
        plan = self._plan
        me, group = plan.rank, plan.group
        local = None if v == RAW else self._variant_local(v)  # raw: the live tensors (exact in any dtype)
        avg_index = {id(e): i for i, e in enumerate(self._avg_entries)}
        for idx, e in enumerate(self._entries):
            live = self._live_value(idx)
            own = live.dtype if self._model is not None else e.dtype
            dt = dtype if (dtype is not None and own.is_floating_point) else own
            if e.kind == "avg" and local is not None:
                pieces = self._pieces_of_entry[avg_index[id(e)]]
                if me == dst:
                    full = torch.empty(e.numel, dtype=torch.float32)
                    for r, a, b, col in pieces:
                        full[a:b].copy_(local[col:col + b - a] if r == me else recv(b - a, torch.float32, r, group))
                    yield list(e.keys), full.view(e.shape).to(dtype=dt)
                else:
                    for r, a, b, col in pieces:
                        if r == me:
                            send(local[col:col + b - a], dst, group)
                    yield list(e.keys), None
            elif S.is_dtensor(live):
                full_t = live.full_tensor()  # type: ignore[attr-defined]
                yield list(e.keys), (full_t.to("cpu", dt, copy=True) if me == dst else None)
            else:
                yield list(e.keys), (live.to("cpu", dt, copy=True) if me == dst else None)

    def _check_model(self, model: nn.Module) -> dict[str, Any]:
        sd = model.state_dict(keep_vars=True)
        for e in self._entries:
            for key in e.keys:
                if key not in sd:
                    raise ValueError(f"model has no entry {key!r} that the bank holds")
                t = sd[key]
                if tuple(t.shape) != e.shape:
                    raise ValueError(f"entry {key!r} has shape {tuple(e.shape)} in the bank but "
                                     f"{tuple(t.shape)} in the model")
        known = {k for e in self._entries for k in e.keys}
        extra = [k for k, t in sd.items() if isinstance(t, torch.Tensor) and k not in known]
        if extra:
            raise ValueError(f"model has entries the bank does not hold: {extra[:5]}")
        return sd

    @contextlib.contextmanager
    def swap(self, model: nn.Module, variant: str | float) -> Iterator[nn.Module]:
        """Load ``variant`` into ``model`` for the ``with`` body; restore the live weights bit-exactly.

        The live state is restored also when the body raises. Parameter objects keep their identity
        (values are copied in place), so optimizers and hooks are unaffected. Frozen parameters the
        variant shares with ``model`` (its own frozen base, e.g. LoRA's) are neither copied nor backed
        up: the body must not write them (nothing else does). Sharded banks: FSDP2
        writes each rank's own shards (no communication; FSDP's next forward gathers them); DDP
        all-gathers the variant once into every replica and all-gathers the rank's saved columns back
        on exit (collectives: every rank swaps the same variants in the same order).
        """
        target = unwrap_model(model)
        v = self.resolve(variant)
        sd = self._check_model(target)
        if self._plan is not None:
            swap = self._swap_local if self._plan.kind == S.FSDP else self._swap_gathered
            with swap(target, sd, v):
                yield model
            return
        new = self.variant_state(v)  # fixed entries: the live tensors, not copies
        untouched = self._untouched_keys(target, sd, new)
        dsts: dict[int, torch.Tensor] = {}
        for key, t in sd.items():
            if isinstance(t, torch.Tensor) and key in new and key not in untouched:
                dsts.setdefault(id(t), t)
        backup = {i: t.detach().clone() for i, t in dsts.items()}
        key_of = {}
        for key, t in sd.items():
            if isinstance(t, torch.Tensor) and key in new:
                key_of.setdefault(id(t), key)
        try:
            with torch.no_grad():
                for i, t in dsts.items():
                    t.copy_(new[key_of[i]])
            yield model
        finally:
            with torch.no_grad():
                for i, t in dsts.items():
                    t.copy_(backup[i])

    def _untouched_keys(self, target: nn.Module, sd: dict[str, Any], new: dict[str, torch.Tensor]) -> set[str]:
        """Keys :meth:`swap` neither writes nor restores: frozen parameters that are their own source
        (the model's frozen base, e.g. LoRA's: no copy of it, and nothing written into it) and those
        the target shares with the training model (:func:`shared_with_training`). Buffers are always
        copied and restored."""
        frozen = {k for e in self._entries if e.kind == "frozen" for k in e.keys}
        own = {k for k in frozen if isinstance(sd.get(k), torch.Tensor) and k in new and same_tensor(sd[k], new[k])}
        shared = shared_with_training(target)
        if shared - frozen:
            raise RuntimeError(f"the model shares {sorted(shared - frozen)[:5]} with the training model, but this bank "
                               "does not hold them as frozen parameters: refusing to write into the training weights")
        return own | shared

    def _fixed_backup(self, sd: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Clones of the plain (not sharded) buffers of a model, restored after a sharded swap."""
        return {e.keys[0]: sd[e.keys[0]].detach().clone() for e in self._entries
                if e.kind in ("buffer", "int") and not S.is_dtensor(sd[e.keys[0]])}

    @contextlib.contextmanager
    def _swap_local(self, target: nn.Module, sd: dict[str, Any], v: str) -> Iterator[None]:
        """FSDP2: write this rank's columns of ``v`` into its own parameter shards."""
        local = self._variant_local(v)
        shards = self._sources([S.local_tensor(sd[e.keys[0]]) for e in self._avg_entries])
        backup = [t.clone() for t in shards]
        fixed = self._fixed_backup(sd)
        _reshard(target)  # parameters gathered by an earlier forward would hide the new shards
        try:
            with torch.no_grad():
                if shards:
                    torch._foreach_copy_(shards, self._views(local, cache=False))
            yield
        finally:
            with torch.no_grad():
                if shards:
                    torch._foreach_copy_(shards, backup)
                for key, t in fixed.items():
                    sd[key].copy_(t)
            _reshard(target)

    @contextlib.contextmanager
    def _swap_gathered(self, target: nn.Module, sd: dict[str, Any], v: str) -> Iterator[None]:
        """DDP: one all-gather of ``v`` into every replica; the rank's own columns restore it."""
        local = self._variant_local(v)
        params = [sd[e.keys[0]] for e in self._avg_entries]
        exact = all(e.dtype in _FP32_EXACT for e in self._avg_entries)
        saved = self._raw_local() if exact else None
        whole = None if exact else [p.detach().clone() for p in params]
        fixed = self._fixed_backup(sd)
        self._scatter_into(params, local)
        try:
            yield
        finally:
            with torch.no_grad():
                if saved is not None:
                    self._scatter_into(params, saved)
                else:
                    assert whole is not None
                    for p, t in zip(params, whole, strict=True):
                        p.copy_(t)
                for key, t in fixed.items():
                    sd[key].copy_(t)

    @torch.no_grad()
    def _scatter_into(self, params: list[torch.Tensor], local: torch.Tensor) -> None:
        """All-gather every rank's local columns and write them into the full ``params`` (DDP)."""
        assert self._plan is not None
        parts = all_gather_padded(local, self._all_local_numels(), self._plan.group)
        dsts, srcs = [], []
        for i, p in enumerate(params):
            pieces = self._pieces_of_entry[i]
            if p.is_contiguous():
                flat = p.detach().view(-1)
                for r, a, b, col in pieces:
                    dsts.append(flat[a:b])
                    srcs.append(parts[r][col:col + b - a])
            else:
                tmp = torch.empty(p.numel(), dtype=torch.float32, device=parts[0].device)
                for r, a, b, col in pieces:
                    tmp[a:b].copy_(parts[r][col:col + b - a])
                p.detach().copy_(tmp.view(p.shape))
        if dsts:
            torch._foreach_copy_(dsts, srcs)

    # ------------------------------------------------------------------ state
    def _shard_json(self) -> dict[str, Any] | None:
        if self._plan is None:
            return None
        return {**self._plan.as_json(), "numel": self._nl,
                "segments": [[self._avg_entries[i].name, a, b, col] for i, a, b, col in self._segs]}

    def _meta(self) -> dict[str, Any]:
        meta = {
            "format": STATE_FORMAT, "version": STATE_VERSION,
            "decays": list(self.decays), "update_every": self.update_every,
            "bias_correction": self.bias_correction, "average_buffers": self.average_buffers,
            "bema": None if self.bema is None else self.bema.as_dict(),
            "step": self.step, "events": self._events, "numel": self._n,
            "layout": [e.as_json() for e in self._entries],
        }
        if self._plan is not None:
            meta["shard"] = self._shard_json()
        return meta

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: settings, counters, layout and the bank tensors.

        ``bank`` is a row-major fp32 ``[R, N]`` copy (row ``i`` = decay ``decays[i]``, then BEMA's
        EMA); ``applied`` (int64, bank updates applied), ``bc_pow`` (float64 ``[K]``, ``(d**m)**n``
        of the bias correction) and ``theta0`` (BEMA only) are copies too, so the dict stays valid
        after further updates. JSON-able settings and the layout sit beside them; everything loads
        with ``torch.load(weights_only=True)``. Live (raw/fixed) weights are not included; see
        :meth:`save_snapshot` for a self-contained file.

        A sharded bank gives this rank's shard: ``bank`` is ``[R, n]`` over its local columns,
        ``theta0`` ``[n]``, counters are the rank's, and ``shard`` describes the segments (kind,
        rank, world_size, numel, ``[name, a, b, col]`` each). No communication.
        """
        self._flush()
        sd: dict[str, Any] = self._meta()
        sd["bank"] = self._rows_flat()
        sd["applied"] = self._applied.clone()
        sd["bc_pow"] = self._bc_pow.clone()
        if self._theta0 is not None:
            sd["theta0"] = self._theta0.clone()
        return sd

    def segments(self) -> list[tuple[str, int, int, int]]:
        """The columns this rank holds: ``(entry name, a, b, col)`` = elements ``[a, b)`` of averaged
        entry ``name`` (flattened, full shape) in local columns ``[col, col + b - a)``."""
        return [(self._avg_entries[i].name, a, b, col) for i, a, b, col in self._segs]

    def check_state_meta(self, sd: dict[str, Any]) -> None:
        """``ValueError`` naming what differs when the settings/layout of a state (or a snapshot's
        JSON state) do not fit this bank; tensors are not looked at."""
        self._check_meta(sd, tensors=False)

    def _check_compatible(self, sd: dict[str, Any]) -> None:
        self._check_meta(sd, tensors=True)

    def _check_meta(self, sd: dict[str, Any], *, tensors: bool) -> None:
        if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT:
            raise ValueError("not an EMABank state dict (missing format "
                             f"{STATE_FORMAT!r}, got {sd.get('format') if isinstance(sd, dict) else sd!r})")
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"EMABank state version {sd.get('version')!r} is not supported "
                             f"(this emascope reads version {STATE_VERSION})")
        required = ("decays", "update_every", "bias_correction", "average_buffers", "bema", "step", "events",
                    "layout") + (("bank", "applied", "bc_pow") if tensors else ())
        missing = [k for k in required if k not in sd]
        if missing:
            raise ValueError(f"EMABank state dict lacks {', '.join(missing)}")
        theirs = [float(d) for d in sd["decays"]]
        if theirs != list(self.decays):
            raise ValueError(f"decays differ: checkpoint has {theirs} but bank has {list(self.decays)}")
        for key in ("update_every", "bias_correction", "average_buffers"):
            if sd[key] != getattr(self, key):
                raise ValueError(f"{key} differs: checkpoint has {sd[key]!r} but bank has "
                                 f"{getattr(self, key)!r}")
        mine_bema = None if self.bema is None else self.bema.as_dict()
        theirs_bema = sd["bema"]
        if isinstance(theirs_bema, dict):  # states written before tau/phi existed: their defaults
            try:
                theirs_bema = BEMAConfig(**theirs_bema).as_dict()
            except (TypeError, ValueError):
                pass
        if theirs_bema != mine_bema:
            raise ValueError(f"bema differs: checkpoint has {sd['bema']!r} but bank has {mine_bema!r}")
        if tensors and self.bema is not None and "theta0" not in sd:
            raise ValueError("EMABank state dict lacks theta0 (needed for BEMA)")
        theirs_e = {e["name"]: e for e in sd["layout"]}
        mine_e = {e.name: e for e in self._entries}
        for name in mine_e:
            if name not in theirs_e:
                raise ValueError(f"parameter {name!r} is in the model but not in the checkpoint")
        for name, te in theirs_e.items():
            me = mine_e.get(name)
            if me is None:
                raise ValueError(f"parameter {name!r} is in the checkpoint but not in the model")
            if tuple(te["shape"]) != me.shape:
                raise ValueError(f"parameter {name!r} has shape {tuple(te['shape'])} in the checkpoint but "
                                 f"{me.shape} in the model")
            if te["kind"] != me.kind:
                raise ValueError(f"parameter {name!r} is {te['kind']!r} in the checkpoint but {me.kind!r} "
                                 "in the model (requires_grad or average_buffers changed?)")
            if int(te["offset"]) != me.offset:
                raise ValueError(f"parameter {name!r} is at offset {te['offset']} in the checkpoint but "
                                 f"{me.offset} in the model (parameter order changed?)")
        if not tensors:
            return
        theirs_shard = sd.get("shard")
        if theirs_shard is not None:
            mine = self._shard_json()
            if mine is None:
                raise ValueError(f"the state is rank {theirs_shard.get('rank')}'s shard of a bank sharded over "
                                 f"{theirs_shard.get('world_size')} ranks; this bank is not sharded: load the "
                                 "run's sharded snapshot (emascope.shardfiles) to consolidate it")
            if theirs_shard != mine:
                raise ValueError(
                    f"the state is rank {theirs_shard.get('rank')} of {theirs_shard.get('world_size')} "
                    f"({theirs_shard.get('kind')}), this bank is rank {mine['rank']} of {mine['world_size']} "
                    f"({mine['kind']}) or holds other columns: re-shard through the run's snapshot files "
                    "(attach(..., resume=True) or emascope.shardfiles.load_bank_state)")
            shape = (self._rows, self._nl)
        else:
            shape = (self._rows, self._n)
        tb = sd["bank"]
        if not isinstance(tb, torch.Tensor) or tuple(tb.shape) != shape:
            got = tuple(tb.shape) if isinstance(tb, torch.Tensor) else type(tb).__name__
            raise ValueError(f"bank shape differs: checkpoint {got} vs {shape}")

    def _local_columns(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's columns of a whole ``[..., N]`` tensor, in local order."""
        parts = [t[..., self._avg_entries[i].offset + a:self._avg_entries[i].offset + b]
                 for i, a, b, _ in self._segs]
        return torch.cat(parts, dim=-1) if parts else t[..., :0]

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; ValueError naming what differs if it is for another model/setup.

        A sharded bank loads its own shard's state (same ranks, same columns), or takes its columns
        from a whole (unsharded) state.
        """
        self._check_compatible(sd)
        self._flush()
        whole = sd.get("shard") is None and self._plan is not None
        rows = sd["bank"]
        self._load_rows(self._local_columns(rows) if whole else rows)
        self._applied.copy_(torch.as_tensor(sd["applied"]))
        self._bc_pow.copy_(torch.as_tensor(sd["bc_pow"]))
        if self._theta0 is not None:
            th = sd["theta0"]
            self._theta0.copy_(self._local_columns(th) if whole else th)
        self.step = int(sd["step"])
        self._events = int(sd["events"])

    # ------------------------------------------------------------------ model-less banks
    def live_values(self) -> dict[str, torch.Tensor]:
        """Every state entry's current live value (not a copy), by entry name (tied names once).

        With :meth:`state_dict`, all a model-less bank needs (:meth:`from_state`); the snapshot
        format (:mod:`emascope.snapshot`) stores both. Not for sharded banks (see :meth:`live_pieces`).
        """
        if self._plan is not None:
            raise ValueError("a sharded bank's live values are spread over the ranks: use live_pieces() "
                             "(emascope.shardfiles writes them per rank)")
        return {e.name: self._live_value(i) for i, e in enumerate(self._entries)}

    def entry_kinds(self) -> dict[str, str]:
        """Each state entry's kind by entry name: ``"avg"``, ``"frozen"``, ``"buffer"`` or ``"int"``."""
        return {e.name: e.kind for e in self._entries}

    def live_pieces(self) -> list[tuple[str, int, int, torch.Tensor]]:
        """The live values this rank stores in its shard of a snapshot: ``(entry name, a, b, data)``
        with ``data`` elements ``[a, b)`` of the entry's flattening (model dtype, not a copy).

        The averaged columns it holds; entries sharded as DTensors: its local rows; replicated
        entries (buffers, frozen DDP parameters): whole, on rank 0 only. Not sharded: every entry whole.
        """
        out = []
        me = 0 if self._plan is None else self._plan.rank
        avg_pos = {id(e): i for i, e in enumerate(self._avg_entries)}
        srcs = self._sources(self._locals())
        src_of = {}
        for k, (i, a, b, _) in enumerate(self._segs):
            src_of.setdefault(i, []).append((a, b, srcs[k]))
        for idx, e in enumerate(self._entries):
            live = self._live_value(idx)
            if e.kind == "avg" and self._plan is not None:
                for a, b, t in src_of.get(avg_pos[id(e)], []):
                    out.append((e.name, a, b, t.reshape(-1)))
            elif S.is_dtensor(live):
                row = math.prod(e.shape[1:])
                r0, r1 = S.row_range(e.shape[0], me, self._plan.world if self._plan else 1)
                if r1 > r0 and row:
                    out.append((e.name, r0 * row, r1 * row, S.local_tensor(live).reshape(-1)))
            elif me == 0:
                out.append((e.name, 0, e.numel if e.kind == "avg" else math.prod(e.shape), live.reshape(-1)))
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any], live: dict[str, torch.Tensor]) -> EMABank:
        """A model-less bank (cpu) from a :meth:`state_dict` and :meth:`live_values`.

        ``materialize``/``variant_flat``/``swap`` work; ``update`` raises. ``ValueError`` naming
        the problem when the state is not an EMABank state or the live values do not fit its layout.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not an emascope bank state (format {got!r})")
        if state.get("shard") is not None:
            shard = state["shard"]
            raise ValueError(f"the state is rank {shard.get('rank')}'s shard of a bank sharded over "
                             f"{shard.get('world_size')} ranks, not a whole bank: open the sharded snapshot's "
                             "index (emascope.shardfiles) to consolidate it")
        self = cls.__new__(cls)
        bema = state.get("bema")
        self._configure(state["decays"], int(state["update_every"]), bool(state["bias_correction"]),
                        BEMAConfig(**bema) if bema else False, bool(state["average_buffers"]))
        self._model = None
        self._entries = [_Entry.from_json(e) for e in state["layout"]]
        self._live = [None] * len(self._entries)  # type: ignore[list-item]
        self._n = int(state["numel"])
        self.device = torch.device("cpu")
        self.placement = "device"
        stored: dict[str, torch.Tensor] = {}
        for e in self._entries:
            t = live.get(e.name)
            if t is None:
                raise ValueError(f"the live value of {e.name!r} is missing")
            if tuple(t.shape) != e.shape or t.dtype != e.dtype:
                raise ValueError(f"entry {e.name!r} is {tuple(t.shape)} {t.dtype}, the layout says "
                                 f"{e.shape} {e.dtype}")
            stored[e.name] = t
        self._stored = stored
        self._set_segments()
        self._allocate(self.device)
        self.load_state_dict(state)
        return self


def _reshard(model: nn.Module) -> None:
    """``reshard()`` every FSDP2 module of ``model`` (frees gathered parameters; the next forward
    gathers the shards again)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
