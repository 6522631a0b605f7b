"""The few torch.distributed exchanges emascope makes, and a counter of the bytes they move.

Everything here is a thin layer over ``torch.distributed`` (process groups, ``all_gather_single``,
``send``/``recv``, ``broadcast``). None of it runs per bank update: a sharded bank updates from
its own rank's weights only. These run when a variant is swapped in (DDP: one all-gather of that
variant), exported (pieces sent to the writer rank, tensor by tensor), snapshotted (one small
all-gather of status numbers) and when scoring gathers features to rank 0.

No pickle: JSON goes through uint8 tensors (:func:`broadcast_json`). Ranks are ranks *in the
group* everywhere (``group_rank``), mapped to global ranks only where torch needs them.

:class:`CollectiveCounter` counts every ``c10d`` operation dispatched while it is active (a
``TorchDispatchMode``: torch.distributed routes each collective through the dispatcher), with the
bytes of its tensors; the benchmark and the tests use it to show a bank update communicates nothing.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world(group: Any = None) -> tuple[int, int]:
    """``(rank in group, group size)``; ``(0, 1)`` without an initialised process group."""
    if not initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group: Any, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def comm_device(group: Any = None) -> torch.device:
    """The device tensors must be on for collectives of ``group``: CPU for gloo, else the current CUDA device."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cpu_group(group: Any = None, timeout: datetime.timedelta | None = None) -> Any:
    """A gloo group over the ranks of ``group`` for small CPU exchanges (``group`` itself when it is
    gloo). Creating one is a collective: every rank of the default group must call this together."""
    if "gloo" in str(dist.get_backend(group)).lower():
        return group
    ranks = None if group is None else dist.get_process_group_ranks(group)
    kw = {} if timeout is None else {"timeout": timeout}
    return dist.new_group(ranks=ranks, backend="gloo", **kw)


def _all_gather_flat(out: torch.Tensor, mine: torch.Tensor, group: Any) -> None:
    """``all_gather_single`` (torch >= 2.14), else ``all_gather_into_tensor``."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, mine, group=group)


def all_gather_padded(local: torch.Tensor, sizes: Sequence[int], group: Any = None) -> list[torch.Tensor]:
    """All-gather 1-D tensors of different lengths (``sizes[r]`` on rank ``r``, all known to every
    rank): one ``all_gather_into_tensor`` of chunks padded to ``max(sizes)``. Returns each rank's
    tensor (views into one buffer), on ``comm_device(group)``."""
    dev = comm_device(group)
    width = max(sizes) if sizes else 0
    mine = torch.zeros(width, dtype=local.dtype, device=dev)
    mine[: local.numel()].copy_(local.reshape(-1))
    out = torch.empty(len(sizes) * width, dtype=local.dtype, device=dev)
    _all_gather_flat(out, mine, group)
    return [out[r * width: r * width + n] for r, n in enumerate(sizes)]


def send(t: torch.Tensor, dst: int, group: Any = None) -> None:
    """Send ``t`` to group rank ``dst`` (moved to the group's device first)."""
    dist.send(t.to(comm_device(group)).contiguous(), global_rank(group, dst), group=group)


def recv(numel: int, dtype: torch.dtype, src: int, group: Any = None) -> torch.Tensor:
    """Receive ``numel`` elements of ``dtype`` from group rank ``src`` (1-D, on the group's device)."""
    out = torch.empty(numel, dtype=dtype, device=comm_device(group))
    dist.recv(out, global_rank(group, src), group=group)
    return out


def broadcast_json(obj: Any, src: int = 0, group: Any = None) -> Any:
    """``obj`` (JSON-able, given on group rank ``src``) on every rank: a length, then UTF-8 bytes."""
    dev = comm_device(group)
    me, _ = rank_world(group)
    data = json.dumps(obj).encode() if me == src else b""
    n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    dist.broadcast(n, global_rank(group, src), group=group)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev) if me == src
           else torch.empty(int(n.item()), dtype=torch.uint8, device=dev))
    if int(n.item()):
        dist.broadcast(buf, global_rank(group, src), group=group)
    return obj if me == src else json.loads(bytes(buf.cpu().tolist()).decode())


def all_gather_json(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's JSON-able ``obj``, in rank order (lengths, then UTF-8 bytes padded to the longest)."""
    data = json.dumps(obj).encode()
    lengths = [n for (n,) in all_gather_ints([len(data)], group)]
    parts = all_gather_padded(torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else
                              torch.empty(0, dtype=torch.uint8), lengths, group)
    return [json.loads(bytes(p.cpu().tolist()).decode()) for p in parts]


def all_gather_ints(values: Sequence[int], group: Any = None) -> list[list[int]]:
    """Every rank's ``values`` (the same count on every rank), as lists of ints."""
    dev = comm_device(group)
    mine = torch.tensor(list(values), dtype=torch.int64, device=dev)
    _, world = rank_world(group)
    out = torch.empty(world * len(values), dtype=torch.int64, device=dev)
    _all_gather_flat(out, mine, group)
    return out.view(world, len(values)).tolist()


def gather_rows(local: torch.Tensor, group: Any = None, dst: int = 0) -> torch.Tensor | None:
    """Concatenate every rank's ``[n_r, ...]`` tensor (same trailing shape and dtype everywhere) on
    group rank ``dst`` in rank order; ``None`` on the other ranks. Two collectives: the row counts
    (all-gather), then the rows padded to the largest count (all-gather)."""
    me, _ = rank_world(group)
    counts = [c[0] for c in all_gather_ints([local.shape[0]], group)]
    row = local[0].numel() if local.dim() > 1 else 1
    parts = all_gather_padded(local.reshape(-1), [c * row for c in counts], group)
    if me != dst:
        return None
    return torch.cat([p.reshape(c, *local.shape[1:]) for p, c in zip(parts, counts, strict=True)]).cpu()


def explained_barrier(group: Any = None, timeout_s: float = 60.0, what: str = "this call") -> None:
    """A barrier that, on a gloo group, names the ranks that did not arrive within ``timeout_s``
    (``monitored_barrier``) and raises ``RuntimeError`` saying that ``what`` must run on every rank."""
    try:
        if "gloo" in str(dist.get_backend(group)).lower():
            dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout_s))
        else:
            dist.barrier(group=group)
    except RuntimeError as exc:
        raise RuntimeError(f"{what} must be called on every rank of the process group: {exc}") from exc


class CollectiveCounter(TorchDispatchMode):
    """Counts ``c10d`` collectives and point-to-point operations dispatched while active.

    ``ops``: the operation names in order; ``bytes``: the bytes of every tensor they were given
    (input and output buffers alike: an upper bound on what crossed the wire, 0 exactly when
    nothing was exchanged). Use as ``with CollectiveCounter() as c: ...``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        if name.startswith("c10d."):
            self.ops.append(name)
            self.bytes += _tensor_bytes(args) + _tensor_bytes(kwargs or {})
        return func(*args, **(kwargs or {}))


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x) for x in obj.values())
    return 0
