"""EMABank: many EMA decays of one model's weights in one fp32 ``[K, N]`` bank, one fused update.

Layout. The model's ``state_dict`` entries are split into

- *averaged* entries: trainable floating-point parameters (and floating-point buffers when
  ``average_buffers=True``), flattened into columns ``[offset, offset + numel)`` of a logical
  ``[R, N]`` bank (``R = K`` decays, ``+1`` row for BEMA's EMA). Always fp32, whatever the model dtype.
- *fixed* entries: frozen parameters, buffers (unless averaged; integer buffers such as
  ``num_batches_tracked`` always), stored nowhere while a model is attached: they are read from the
  live model when a variant is materialised (a snapshot stores them once).

Memory layout: the ``[R, N]`` bank is stored *blocked*, as ``[ceil(N / B), R, B]`` with ``B = BLOCK``
columns per block (the tail of the last block is zero padding). One block holds all R rows of B
consecutive columns contiguously, so the update streams through memory once, front to back, and
the B staging values of a block are reused by all R rows from L1 cache. (A row-major ``[R, N]``
bank makes the update walk R streams ``4N`` bytes apart; on the 2-core development CPU that was
~1.3x slower than the blocked pass; see bench/bank_update.py.) ``state_dict()`` and snapshots use
the plain row-major ``[R, N]`` form.

Update (once per optimizer step, see :meth:`EMABank.update`): the live averaged tensors are copied
into an fp32 staging vector with one ``torch._foreach_copy_`` onto views, then all rows are lerped
towards it in one call, ``blocks.lerp_(staging.view(nb, 1, B).expand(nb, R, B), w.view(1, R, 1))``,
where ``w[r]`` is the weight given to the new weights (``1 - d**m``, Eq. U/L of :mod:`emascope.ema_math`).
On CPU, the blocks lying inside a large fp32 parameter are lerped straight from the parameter's
storage instead (one call per parameter, see ``DIRECT_MIN``); only the rest goes through staging.

Non-finite live weights skip the update for the whole bank. On CPU the check is a float32 sum of
the staging (a finite sum implies finite elements; a non-finite sum is confirmed element-wise, so a
finite overflow never skips). On accelerators it is done without a host sync: an ``isfinite`` flag
of a float64 sum (which cannot overflow) stays on the device, zeroes the row weights of a bad step,
and the staging is ``nan_to_num``-ed so that the weight-0 lerp leaves the bank bit-identical.

Tied parameters are stored once (deduplicated by identity) and appear under every name in
materialised state dicts. Models wrapped in ``DistributedDataParallel``/``DataParallel`` or
``torch.compile`` are unwrapped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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
    for key, t in model.state_dict(keep_vars=True).items():
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


class EMABank:
    """A bank of EMAs of one model's weights, one per decay, updated together. See docs/design.md.

    Args:
        model: the training model (DDP/DataParallel/``torch.compile`` wrappers are unwrapped). Its
            averaged tensors are read at every :meth:`update`; keep the same parameter objects
            (in-place changes such as ``model.half()`` are fine).
        decays: decays ``d`` in [0, 1): the weight *kept* from the old average per optimizer step
            (``1 - d`` goes to the new weights); the averaging window is ~``1/(1-d)`` optimizer steps.
            ``None``: :data:`DEFAULT_DECAYS`.
        device: where the bank lives. ``None``: the parameters' device. ``"cpu"`` with parameters on
            an accelerator: host memory, pinned, filled by non-blocking device-to-host copies; each
            copy is folded in at the next :meth:`update` or read (one step late, never lost).
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

    Counters: :attr:`step` counts :meth:`update` calls (optimizer steps); :attr:`num_updates` the
    bank updates applied; :attr:`num_skipped` those skipped because the live weights were non-finite.
    """

    def __init__(self, model: nn.Module, decays: Sequence[float] | None = DEFAULT_DECAYS, *,
                 device: str | torch.device | None = None, update_every: int = 1,
                 bias_correction: bool = False, bema: bool | BEMAConfig = False,
                 average_buffers: bool = False) -> None:
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
        self._n = n
        avg_live = [t for e, t in zip(entries, live, strict=True) if e.kind == "avg"]
        param_device = avg_live[0].device
        if device is None:
            bank_device = param_device
        else:
            try:
                bank_device = torch.device(device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"bad device {device!r}: {exc}") from None
        self.device = bank_device
        self._stored: dict[str, torch.Tensor] | None = None  # model-less banks only
        self._allocate(param_device)
        with torch.no_grad():
            self._gather_into(self._dev_staging)
            if self._cross:
                self._staging.copy_(self._dev_staging)
            self._init_rows(self._staging)

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
        self._pending: tuple[int, Any] | None = None

    def _allocate(self, param_device: torch.device) -> None:
        dev = self.device
        rows = len(self.decays) + (1 if self.bema is not None else 0)
        # page-locked host memory only where it serves: non-blocking copies from an accelerator
        pin = dev.type == "cpu" and param_device.type == "cuda" and self._model is not None
        self._rows = rows
        self._nb = -(-self._n // BLOCK)
        padded = self._nb * BLOCK
        # zeros: the padding columns of the last block stay finite (0) forever
        self._blocks = torch.zeros((self._nb, rows, BLOCK), dtype=torch.float32, device=dev, pin_memory=pin)
        self._staging = torch.zeros(padded, dtype=torch.float32, device=dev, pin_memory=pin)
        self._cross = param_device != dev and self._model is not None
        # fp32 staging on the parameters' device: the gather target when the bank lives elsewhere
        self._dev_staging = (torch.zeros(padded, dtype=torch.float32, device=param_device)
                             if self._cross else self._staging)
        self._views = [self._dev_staging[e.offset:e.offset + e.numel].view(e.shape)
                       for e in self._entries if e.kind == "avg"]
        self._avg_live = ([t for e, t in zip(self._entries, self._live, strict=True) if e.kind == "avg"]
                          if self._live else [])
        m, f64 = self.update_every, torch.float64
        # per decay: d**m kept (Eq. U) and 1 - d**m given to the new weights (Eq. L) per bank update
        self._deff = torch.tensor([effective_decay(d, m) for d in self.decays], dtype=f64, device=dev)
        self._w_const = torch.tensor([update_weight(d, m) for d in self.decays], dtype=f64, device=dev)
        self._bc_pow = torch.ones(len(self.decays), dtype=torch.float64, device=dev)  # (d**m)**n_applied
        self._applied = torch.zeros((), dtype=torch.int64, device=dev)
        self._w = torch.empty(rows, dtype=torch.float64, device=dev)
        self._theta0 = (torch.empty(self._n, dtype=torch.float32, device=dev)
                        if self.bema is not None else None)
        # CPU: a Python-side isfinite check is free; accelerators use device-side flags (no sync).
        self._sync_free = dev.type != "cpu"
        self._plan_direct()

    def _plan_direct(self) -> None:
        """CPU same-device banks: which blocks are lerped straight from a parameter, which from staging.

        ``_direct``: ``(avg index, start in the flat parameter, first block, end block)`` for every run
        of blocks lying inside one large fp32 parameter. ``_staged_runs``: the other runs of blocks,
        and ``_pieces``: ``(avg index, start, end, staging column)`` copies that fill their columns.
        ``_direct`` is None where the plain full-staging path is used (accelerators, cross-device,
        snapshots, models without large fp32 parameters).
        """
        self._direct: list[tuple[int, int, int, int]] | None = None
        self._staged_runs: list[tuple[int, int]] = []
        self._pieces: list[tuple[int, int, int, int]] = []
        if self._model is None or self._cross or self.device.type != "cpu":
            return
        avg = [e for e in self._entries if e.kind == "avg"]
        direct = []
        covered = [False] * self._nb
        for i, e in enumerate(avg):
            if e.numel < DIRECT_MIN or e.dtype != torch.float32:
                continue
            j0, j1 = -(-e.offset // BLOCK), (e.offset + e.numel) // BLOCK
            if j1 > j0:
                direct.append((i, j0 * BLOCK - e.offset, j0, j1))
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
            for i, e in enumerate(avg):
                lo, hi = max(e.offset, c0), min(e.offset + e.numel, c1)
                if lo < hi:
                    self._pieces.append((i, lo - e.offset, hi - e.offset, lo))
        self._direct = direct

    def _init_rows(self, staging: torch.Tensor) -> None:
        self._blocks.copy_(self._blocked(staging))
        if self._theta0 is not None:
            self._theta0.copy_(staging[:self._n])

    def _blocked(self, staging: torch.Tensor) -> torch.Tensor:
        """The padded staging vector as a ``[nb, R, B]`` view (stride 0 over rows)."""
        return staging.view(self._nb, 1, BLOCK).expand(self._nb, self._rows, BLOCK)

    def _rows_flat(self) -> torch.Tensor:
        """The bank in row-major form: a fresh contiguous ``[R, N]`` fp32 tensor on the bank device."""
        out = torch.empty((self._rows, self._n), dtype=torch.float32, device=self.device)
        full, rem = divmod(self._n, BLOCK)
        out[:, :full * BLOCK].view(self._rows, full, BLOCK).copy_(self._blocks[:full].permute(1, 0, 2))
        if rem:
            out[:, full * BLOCK:].copy_(self._blocks[full, :, :rem])
        return out

    def _load_rows(self, rows: torch.Tensor) -> None:
        """Inverse of :meth:`_rows_flat`: write a row-major ``[R, N]`` bank into the blocks."""
        full, rem = divmod(self._n, BLOCK)
        self._blocks[:full].permute(1, 0, 2).copy_(rows[:, :full * BLOCK].reshape(self._rows, full, BLOCK))
        if rem:
            self._blocks[full, :, :rem].copy_(rows[:, full * BLOCK:])
            self._blocks[full, :, rem:].zero_()

    def _row(self, r: int) -> torch.Tensor:
        """Row ``r`` of the bank as a fresh contiguous fp32 ``[N]`` vector."""
        return self._blocks[:, r, :].reshape(-1)[:self._n]

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
        """Averaged scalars per row (``N``)."""
        return self._n

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self) -> None:
        """Fold the live weights in; call once after every optimizer step.

        Only every ``update_every``-th call reads the weights (Eq. U: decay ``d**m``). A call whose
        weights hold NaN/Inf changes no bank and is counted in :attr:`num_skipped`.
        """
        if self._model is None:
            raise RuntimeError("this EMABank was loaded from a snapshot and has no model; update() needs "
                               "a bank built on a model (EMABank(model, ...)) and load_state_dict()")
        self.step += 1
        if self.step % self.update_every:
            return
        self._events += 1
        if self._cross:
            self._flush()
            self._gather_into(self._dev_staging)
            self._staging.copy_(self._dev_staging, non_blocking=True)
            event = torch.cuda.Event() if self._dev_staging.is_cuda else None
            if event is not None:
                event.record()
            self._pending = (self.step, event)
            return
        f32 = torch.float32
        if self._direct is not None and all(self._avg_live[i].dtype == f32 for i, *_ in self._direct):
            self._apply_direct(self.step)
            return
        self._gather_into(self._staging)
        self._apply(self._staging, self.step)

    def _apply_direct(self, t: int) -> None:
        """CPU path of :meth:`_apply`: large parameters are read in place, the rest via staging."""
        flats = [x.detach().reshape(-1) for x in self._avg_live]
        st = self._staging
        if self._pieces:
            torch._foreach_copy_([st[d:d + (b - a)] for i, a, b, d in self._pieces],
                                 [flats[i][a:b] for i, a, b, d in self._pieces])
        parts = ([flats[i][a:a + (j1 - j0) * BLOCK] for i, a, j0, j1 in self._direct]
                 + [st[j * BLOCK:k * BLOCK] for j, k in self._staged_runs])
        # every averaged column is in exactly one part; finite sums imply finite elements (see _apply)
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

    def _gather_into(self, staging: torch.Tensor) -> None:
        """Copy (and cast to fp32) every live averaged tensor into its columns of ``staging``."""
        assert staging is self._dev_staging
        torch._foreach_copy_(self._views, [t.detach() for t in self._avg_live])

    def _flush(self) -> None:
        """Fold in a weight copy still in flight to a host bank (cross-device mode only)."""
        if self._pending is None:
            return
        t, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        with torch.no_grad():
            self._apply(self._staging, t)

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

    # ------------------------------------------------------------------ reading out
    def resolve(self, variant: str | float) -> str:
        """The canonical variant string, or a ValueError listing the available ones."""
        v = parse_variant(variant)
        if v not in self.variants:
            raise ValueError(f"unknown variant {variant!r}; this bank has: {', '.join(self.variants)}")
        return v

    def _live_value(self, i: int) -> torch.Tensor:
        """The current live value of entry ``i`` (model or snapshot), not a copy."""
        if self._model is not None:
            return self._live[i].detach()
        assert self._stored is not None
        return self._stored[self._entries[i].name]

    def _raw_flat(self) -> torch.Tensor:
        """Live averaged tensors as a fresh fp32 ``[N]`` vector on the bank device."""
        out = torch.empty(self._n, dtype=torch.float32, device=self.device)
        for i, e in enumerate(self._entries):
            if e.kind == "avg":
                out[e.offset:e.offset + e.numel].copy_(self._live_value(i).reshape(-1))
        return out

    @torch.no_grad()
    def variant_flat(self, variant: str | float) -> torch.Tensor:
        """The averaged tensors of a variant as a fresh fp32 ``[N]`` vector on the bank device."""
        v = self.resolve(variant)
        self._flush()
        if v == RAW:
            return self._raw_flat()
        row = self._row(self._row_of[v])
        if v == BEMA:
            assert self.bema is not None and self._theta0 is not None
            if self.step < self.bema.tau:  # BEMA Eq. tau: the live weights during the burn-in
                return self._raw_flat()
            # BEMA Eq. correction: theta'_t = EMA_t + alpha_t (theta_t - theta_0), t = self.step
            return row + bema_alpha(self.step, self.bema) * (self._raw_flat() - self._theta0)
        return row

    @torch.no_grad()
    def materialize(self, variant: str | float, *, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """A full state_dict of the model for ``variant`` ("raw", "bema", or a decay).

        ``dtype=None`` keeps each entry's model dtype; a floating dtype (e.g. ``torch.float32``) casts
        floating entries only. ``device=None``: the live tensor's device (cpu for snapshot banks).
        Tensors are fresh copies; tied parameters share one tensor under all their names.
        """
        v = self.resolve(variant)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        flat = None if v == RAW else self.variant_flat(v)
        out: dict[str, torch.Tensor] = {}
        for i, e in enumerate(self._entries):
            live = self._live_value(i)
            dev = torch.device(device) if device is not None else live.device
            dt = dtype if (dtype is not None and e.dtype.is_floating_point) else e.dtype
            if flat is not None and e.kind == "avg":
                src = flat[e.offset:e.offset + e.numel].view(e.shape)
            else:
                src = live
            t = src.to(device=dev, dtype=dt, copy=True)
            for key in e.keys:
                out[key] = t
        return out

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
        (values are copied in place), so optimizers and hooks are unaffected.
        """
        target = unwrap_model(model)
        v = self.resolve(variant)
        sd = self._check_model(target)
        new = self.materialize(v)
        dsts: dict[int, torch.Tensor] = {}
        for key, t in sd.items():
            if isinstance(t, torch.Tensor) and key in new:
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

    # ------------------------------------------------------------------ state
    def _meta(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION,
            "decays": list(self.decays), "update_every": self.update_every,
            "bias_correction": self.bias_correction, "average_buffers": self.average_buffers,
            "bema": None if self.bema is None else self.bema.as_dict(),
            "step": self.step, "events": self._events, "numel": self._n,
            "layout": [e.as_json() for e in self._entries],
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: settings, counters, layout and the bank tensors.

        ``bank`` is a row-major fp32 ``[R, N]`` copy (row ``i`` = decay ``decays[i]``, then BEMA's
        EMA); ``applied`` (int64, bank updates applied), ``bc_pow`` (float64 ``[K]``, ``(d**m)**n``
        of the bias correction) and ``theta0`` (BEMA only) are copies too, so the dict stays valid
        after further updates. JSON-able settings and the layout sit beside them; everything loads
        with ``torch.load(weights_only=True)``. Live (raw/fixed) weights are not included; see
        :meth:`save_snapshot` for a self-contained file.
        """
        self._flush()
        sd: dict[str, Any] = self._meta()
        sd["bank"] = self._rows_flat()
        sd["applied"] = self._applied.clone()
        sd["bc_pow"] = self._bc_pow.clone()
        if self._theta0 is not None:
            sd["theta0"] = self._theta0.clone()
        return sd

    def _check_compatible(self, sd: dict[str, Any]) -> None:
        if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT:
            raise ValueError("not an EMABank state dict (missing format "
                             f"{STATE_FORMAT!r}, got {sd.get('format') if isinstance(sd, dict) else sd!r})")
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"EMABank state version {sd.get('version')!r} is not supported "
                             f"(this emascope reads version {STATE_VERSION})")
        required = ("decays", "update_every", "bias_correction", "average_buffers", "bema", "step", "events",
                    "layout", "bank", "applied", "bc_pow")
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
        if self.bema is not None and "theta0" not in sd:
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
        shape = (self._rows, self._n)
        tb = sd["bank"]
        if not isinstance(tb, torch.Tensor) or tuple(tb.shape) != shape:
            got = tuple(tb.shape) if isinstance(tb, torch.Tensor) else type(tb).__name__
            raise ValueError(f"bank shape differs: checkpoint {got} vs {shape}")

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; ValueError naming what differs if it is for another model/setup."""
        self._check_compatible(sd)
        self._pending = None
        self._load_rows(sd["bank"])
        self._applied.copy_(torch.as_tensor(sd["applied"]))
        self._bc_pow.copy_(torch.as_tensor(sd["bc_pow"]))
        if self._theta0 is not None:
            self._theta0.copy_(sd["theta0"])
        self.step = int(sd["step"])
        self._events = int(sd["events"])

    # ------------------------------------------------------------------ model-less banks
    def live_values(self) -> dict[str, torch.Tensor]:
        """Every state entry's current live value (not a copy), by entry name (tied names once).

        With :meth:`state_dict`, all a model-less bank needs (:meth:`from_state`); the snapshot
        format (:mod:`emascope.snapshot`) stores both.
        """
        return {e.name: self._live_value(i) for i, e in enumerate(self._entries)}

    @classmethod
    def from_state(cls, state: dict[str, Any], live: dict[str, torch.Tensor]) -> EMABank:
        """A model-less bank (cpu) from a :meth:`state_dict` and :meth:`live_values`.

        ``materialize``/``variant_flat``/``swap`` work; ``update`` raises. ``ValueError`` naming
        the problem when the state is not an EMABank state or the live values do not fit its layout.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not an emascope bank state (format {got!r})")
        self = cls.__new__(cls)
        bema = state.get("bema")
        self._configure(state["decays"], int(state["update_every"]), bool(state["bias_correction"]),
                        BEMAConfig(**bema) if bema else False, bool(state["average_buffers"]))
        self._model = None
        self._entries = [_Entry.from_json(e) for e in state["layout"]]
        self._live = []
        self._n = int(state["numel"])
        self.device = torch.device("cpu")
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
        self._allocate(self.device)
        self.load_state_dict(state)
        return self
