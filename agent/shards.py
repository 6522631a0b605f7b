"""Which columns of the bank a rank holds: the sharding layout of a bank under torch.distributed.

The bank's logical layout is one flat fp32 column space ``[0, N)`` over the model's averaged
tensors (full, unsharded shapes, ``state_dict`` order; :mod:`emascope.bank`). A *segment*
``(i, a, b, col)`` says that this rank holds elements ``[a, b)`` of averaged tensor ``i`` (flattened
row-major, in the full tensor) in its local columns ``[col, col + b - a)``. Global column of a
segment: ``offset_i + a``. A single process holds one segment per tensor, ``a = 0``, ``b = numel``,
``col = offset``: the identity, i.e. W = 1 of the same layout.

Two ways to shard (:class:`ShardPlan`):

- ``"ddp"``, replicated weights (DistributedDataParallel): the ``ceil(N / B)`` blocks of ``B``
  columns are split into W contiguous runs, rank ``r`` holding blocks
  ``[floor(r * nb / W), floor((r + 1) * nb / W))`` (:func:`block_range`): exactly 1/W of the bank,
  plus or minus one block. Every rank reads its columns from its own replica.
- ``"fsdp"``, FSDP2 (``fully_shard``, DTensor parameters placed ``Shard(0)`` on a 1-D mesh): a rank
  holds the rows of every parameter that its local shard holds, in ``torch.chunk`` order: rows
  ``[r * c, min((r + 1) * c, d0))`` with ``c = ceil(d0 / W)`` (:func:`row_range`), which may be
  uneven or empty. Local shards are read with ``DTensor.to_local()`` (never rebuilt with
  ``DTensor.from_local``, whose shape inference is wrong for uneven shards); the offsets computed
  here are checked against DTensor's own ``compute_local_shape_and_global_offset``.

No communication here: every rank can compute every rank's segments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from emascope.collectives import rank_world

Segment = tuple[int, int, int, int]  # (averaged tensor index, first element, end element, first local column)

DDP, FSDP = "ddp", "fsdp"


_DTENSOR: list[type | None] = []


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor``, or ``None`` when torch has no distributed support."""
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - torch built without distributed
            DTensor = None  # noqa: N806
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def is_dtensor(t: Any) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank's own data of ``t``: ``to_local()`` of a DTensor (a view, not a copy), else ``t``; detached."""
    return (t.to_local() if is_dtensor(t) else t).detach()


@dataclass(frozen=True)
class ShardPlan:
    """How a bank is sharded: ``kind`` (``"ddp"`` or ``"fsdp"``), this rank, the world size, the
    process group the ranks share (not serialised)."""

    kind: str
    rank: int
    world: int
    group: Any = None

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "world_size": self.world}


def block_range(num_blocks: int, rank: int, world: int) -> tuple[int, int]:
    """Blocks ``[j0, j1)`` held by ``rank`` of ``world`` under DDP sharding (contiguous, balanced)."""
    return rank * num_blocks // world, (rank + 1) * num_blocks // world


def row_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[r0, r1)`` of a dim-0 size ``rows`` held by ``rank`` under ``Shard(0)`` (torch.chunk
    order: chunks of ``ceil(rows / world)``; the last ranks may hold fewer rows or none)."""
    chunk = -(-rows // world) if rows else 0
    r0 = min(rank * chunk, rows)
    return r0, min(r0 + chunk, rows)


def ddp_segments(spans: Sequence[tuple[int, int]], total: int, block: int, rank: int,
                 world: int) -> list[Segment]:
    """Segments of ``rank`` under DDP sharding; ``spans[i] = (offset, numel)`` of averaged tensor ``i``."""
    nb = -(-total // block)
    j0, j1 = block_range(nb, rank, world)
    c0, c1 = j0 * block, min(j1 * block, total)
    out = []
    for i, (off, numel) in enumerate(spans):
        lo, hi = max(off, c0), min(off + numel, c1)
        if lo < hi:
            out.append((i, lo - off, hi - off, lo - c0))
    return out


def fsdp_segments(shapes: Sequence[tuple[int, ...]], rank: int, world: int) -> list[Segment]:
    """Segments of ``rank`` under FSDP2 ``Shard(0)``; ``shapes[i]`` is averaged tensor ``i``'s full shape."""
    out, col = [], 0
    for i, shape in enumerate(shapes):
        row = math.prod(shape[1:])
        r0, r1 = row_range(shape[0], rank, world)
        if r1 > r0 and row:
            a, b = r0 * row, r1 * row
            out.append((i, a, b, col))
            col += b - a
    return out


def local_numel(segments: Sequence[Segment]) -> int:
    return sum(b - a for _, a, b, _ in segments)


def _check_dtensor(name: str, t: torch.Tensor, world: int) -> None:
    """A DTensor the bank can shard with: ``Shard(0)`` on a 1-D mesh, local shard as computed here."""
    from torch.distributed.tensor import Shard

    mesh, placements = t.device_mesh, tuple(t.placements)
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise NotImplementedError(
            f"parameter {name!r} is a DTensor placed {placements} on a {mesh.ndim}-D mesh: emascope shards a "
            "bank along FSDP2's default placement, Shard(0) on a 1-D mesh (fully_shard without HSDP or "
            "shard_placement_fn)")
    if t.dim() == 0:
        raise NotImplementedError(f"parameter {name!r} is a 0-d DTensor; it cannot be Shard(0)")
    rank = mesh.get_local_rank()
    r0, r1 = row_range(t.shape[0], rank, world)
    loc = t.to_local()
    if tuple(loc.shape) != (r1 - r0, *t.shape[1:]) or not loc.is_contiguous():
        raise NotImplementedError(
            f"parameter {name!r}: local shard {tuple(loc.shape)} is not rows [{r0}, {r1}) of {tuple(t.shape)} "
            "(torch.chunk order), or not contiguous")
    try:  # DTensor's own answer, where this torch has it
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover
        return
    shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    if tuple(shape) != tuple(loc.shape) or (len(offset) and offset[0] != r0):
        raise NotImplementedError(f"parameter {name!r}: DTensor reports local shape {tuple(shape)} at offset "
                                  f"{tuple(offset)}, emascope computed rows [{r0}, {r1})")


def resolve(wrapped: nn.Module, names: Sequence[str], live: Sequence[torch.Tensor],
            shard: bool | None) -> ShardPlan | None:
    """The sharding of a bank over ``live`` (every state tensor, ``names`` its entry names).

    DTensor parameters: FSDP2 sharding over their mesh (``shard=False`` is refused: no rank holds the
    whole weights). Otherwise ``shard=None`` shards when ``wrapped`` is a DistributedDataParallel
    module in a group of more than one rank, ``True`` shards over DDP's group, else the default
    group, ``False`` never. One rank: ``None`` (not sharded).
    """
    group = None
    if shard not in (None, True, False):
        raise ValueError(f"shard must be True, False or None (auto), got {shard!r}")
    dts = [(n, t) for n, t in zip(names, live, strict=True) if is_dtensor(t)]
    if dts:
        if shard is False:
            raise ValueError("the model has sharded (DTensor, FSDP2) parameters: its bank must be sharded too "
                             "(shard=False is impossible: no rank holds the whole weights)")
        mesh = dts[0][1].device_mesh
        world = mesh.size()
        for n, t in dts:
            if t.device_mesh != mesh:
                raise NotImplementedError(f"parameter {n!r} lives on another device mesh than {dts[0][0]!r}")
            _check_dtensor(n, t, world)
        plain = [n for n, t in zip(names, live, strict=True) if not is_dtensor(t) and isinstance(t, nn.Parameter)]
        if plain:
            raise NotImplementedError(f"parameters {plain[:3]} are plain tensors beside DTensor ones: shard the "
                                      "whole model with fully_shard")
        return ShardPlan(FSDP, mesh.get_local_rank(), world, mesh.get_group())
    is_ddp = isinstance(wrapped, nn.parallel.DistributedDataParallel)
    if shard is False or (shard is None and not is_ddp):
        return None
    if group is None and is_ddp:
        group = wrapped.process_group
    rank, world = rank_world(group)
    if world == 1:
        return None
    return ShardPlan(DDP, rank, world, group)
