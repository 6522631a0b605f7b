"""The memory plan of a bank: bytes per rank and update traffic of each placement, and the choice.

Pure arithmetic, no torch (``emascope plan`` runs without a model and without torch). Units:
bytes, and bytes per bank update; ``params`` is the number of averaged scalars (trainable
floating-point parameters), ``decays`` K, one more bank row with BEMA.

Placements (docs/bank.md, "Placements"):

- ``device``: the whole bank in the memory of the device the weights live on (one process, or
  ``shard=False``: rank 0 holds it all); updated in the optimizer step hook.
- ``sharded``: the bank split over the W ranks (DDP: a contiguous 1/W of the columns, plus or minus
  one block; FSDP2: each rank's own parameter shards), on the device; no communication per update.
- ``host``: the bank in host memory (pinned with CUDA, sharded over the ranks when W > 1), fed by a
  device-to-host copy and updated by a background thread; the device keeps one fp32 staging vector.

Per rank and placement: ``bank`` ``4 R n`` (``R`` rows, ``n`` columns held), the fp32 staging
vector ``4 n``, BEMA's ``theta0`` ``4 n``, and the peak extra memory of swapping one variant in
for scoring (``device``: an fp32 flat copy plus a materialised and a backup copy in the model's
dtype; ``sharded`` DDP: the all-gather buffer ``4 N`` and a ``4 n`` backup; FSDP2: a local backup).
Update traffic is the memory traffic of one update (rows read and written ``8 R n``, weights read,
staging written and read); ``d2h`` the bytes copied device-to-host per update (host placement);
communication per update is zero for every placement (each rank folds in its own weights).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

#: Columns per block of the bank (emascope.bank.BLOCK, repeated here to stay torch-free; a test
#: checks they agree).
BLOCK = 2048
PLACEMENTS = ("device", "sharded", "host")
SHARDINGS = ("ddp", "fsdp", "none")
#: Bytes per element of the parameter dtypes ``emascope plan --param-dtype`` accepts.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class PlanError(ValueError):
    """No placement fits (or the one asked for does not): the message names the numbers."""


@dataclass(frozen=True)
class PlacementCost:
    """One placement's cost per rank (bytes; traffic in bytes per update)."""

    placement: str
    available: bool          # possible for this job (e.g. ``device`` is not, for FSDP2)
    columns: int             # bank columns held by the rank (the most of any rank)
    bank_bytes: int          # the bank rows (+ BEMA's theta0)
    device_bytes: int        # on the device: bank, staging and swap transient where they live there
    host_bytes: int          # in host memory (per rank)
    update_traffic: int      # memory traffic of one update (where the bank lives)
    d2h_per_update: int      # device-to-host copy per update
    comm_per_update: int     # bytes communicated per update (0)
    comm_per_swap: int       # bytes received per rank to swap one variant in and back out
    fits: bool | None        # None: free memory not given
    why: str = ""            # why it does not fit / is not available


@dataclass(frozen=True)
class MemoryPlan:
    """The inputs and each placement's :class:`PlacementCost`; ``choice`` is what ``"auto"`` picks
    (``None`` when nothing fits)."""

    params: int
    decays: int
    bema: bool
    world: int
    sharding: str
    param_bytes: int
    device_free: int | None
    host_free: int | None
    ranks_per_node: int
    costs: tuple[PlacementCost, ...]
    choice: str | None

    def cost(self, placement: str) -> PlacementCost:
        return next(c for c in self.costs if c.placement == placement)

    def as_json(self) -> dict:
        return {"params": self.params, "decays": self.decays, "bema": self.bema, "world_size": self.world,
                "sharding": self.sharding, "param_bytes": self.param_bytes, "device_free": self.device_free,
                "host_free": self.host_free, "ranks_per_node": self.ranks_per_node, "choice": self.choice,
                "placements": {c.placement: {k: getattr(c, k) for k in (
                    "available", "columns", "bank_bytes", "device_bytes", "host_bytes", "update_traffic",
                    "d2h_per_update", "comm_per_update", "comm_per_swap", "fits", "why")} for c in self.costs}}


def parse_bytes(text: str | int | float) -> int:
    """``"20GiB"``, ``"1.5e9"``, ``"512 MB"``, ``20e9`` -> bytes (binary units ``KiB/MiB/GiB/TiB`` or
    ``K/M/G/T``; decimal ``KB/MB/GB/TB``). ``ValueError`` naming the text otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"not a size: {text!r} (e.g. 20GiB, 512MB, 1.5e9)")
        value, unit = float(m.group(1)), m.group(2).upper()
    out = value * _UNITS[unit]
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"not a size: {text!r}")
    return int(out)


def format_bytes(n: int | None) -> str:
    """``n`` bytes in binary units (``"7.0 GiB"``)."""
    if n is None:
        return "?"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def plan_memory(params: int, decays: int, *, world: int = 1, bema: bool = False, param_bytes: int = 4,
                device_free: int | None = None, host_free: int | None = None, ranks_per_node: int | None = None,
                sharding: str = "ddp", block: int = BLOCK) -> MemoryPlan:
    """Bytes per rank and update traffic of every placement, and the choice for ``device="auto"``.

    Args:
        params: averaged scalars N (trainable floating-point parameters of the whole model).
        decays: number of decays K (BEMA adds one row).
        world: ranks W.
        param_bytes: bytes per parameter element (2 for bf16/fp16 weights, 4 for fp32).
        device_free: free bytes on each rank's device (``None``: unknown, nothing refused).
        host_free: free host bytes per node (``None``: unknown).
        ranks_per_node: ranks sharing one node's host memory (default: ``world``).
        sharding: ``"ddp"`` (replicated weights), ``"fsdp"`` (FSDP2 shards) or ``"none"`` (no sharding:
            rank 0 holds the whole bank).
    """
    for name, v, lo in (("params", params, 1), ("decays", decays, 1), ("world", world, 1),
                        ("param_bytes", param_bytes, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    rpn = world if ranks_per_node is None else int(ranks_per_node)
    if rpn < 1:
        raise ValueError(f"ranks_per_node must be >= 1, got {ranks_per_node!r}")
    rows = decays + (1 if bema else 0)
    nb = _ceil(params, block)
    full_cols = nb * block
    split = world > 1 and sharding != "none"
    shard_cols = _ceil(nb, world) * block if split else full_cols
    if sharding == "fsdp":  # Shard(0) rows: about N / W per rank, padded to blocks
        shard_cols = _ceil(_ceil(params, world), block) * block
    costs = []
    for placement in PLACEMENTS:
        cols = full_cols if placement == "device" else shard_cols
        bank = 4 * rows * cols + (4 * cols if bema else 0)
        staging = 4 * cols
        sharded = placement != "device" and split
        if not sharded:  # materialize: an fp32 flat variant, its model-dtype copy, a backup of the weights
            swap = 4 * params + 2 * param_bytes * params
        elif sharding == "fsdp":  # local: the variant's columns and a backup of the local shards
            swap = 4 * cols + param_bytes * cols
        else:  # DDP: the all-gather buffer of the variant and a backup of this rank's columns
            swap = 4 * world * cols + 4 * cols
        comm_swap = 2 * 4 * world * cols if sharded and sharding == "ddp" else 0
        traffic = 8 * rows * cols + param_bytes * cols + 8 * cols
        if placement == "host":
            device_b, host_b, d2h = staging + swap, bank + 2 * staging, staging
        else:
            device_b, host_b, d2h = bank + staging + swap, 0, 0
        available, why = True, ""
        if placement == "device" and sharding == "fsdp":
            available, why = False, "FSDP2: no rank holds the whole weights"
        elif placement == "sharded" and not split:
            available, why = False, "one rank (or shard=False): nothing to shard over"
        fits: bool | None = None
        if available:
            need = []
            if device_free is not None:
                need.append(device_b <= device_free)
                if device_b > device_free:
                    why = f"needs {format_bytes(device_b)} on each device, {format_bytes(device_free)} free"
            if host_free is not None and host_b:
                need.append(host_b * rpn <= host_free)
                if host_b * rpn > host_free:
                    why = (why + "; " if why else "") + (
                        f"needs {format_bytes(host_b * rpn)} of host memory per node ({rpn} ranks x "
                        f"{format_bytes(host_b)}), {format_bytes(host_free)} free")
            fits = all(need) if need else None
        costs.append(PlacementCost(placement, available, cols, bank, device_b, host_b, traffic, d2h, 0,
                                   comm_swap, fits, why))
    order = ("sharded", "host") if split else ("device", "host")
    choice = next((p for p in order for c in costs if c.placement == p and c.available and c.fits is not False),
                  None)
    return MemoryPlan(params, decays, bema, world, sharding, param_bytes, device_free, host_free, rpn,
                      tuple(costs), choice)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def choose(plan: MemoryPlan, requested: str = "auto") -> str:
    """The placement to use: ``plan.choice`` for ``"auto"``, else ``requested`` if it is available and
    fits. :class:`PlanError` naming the numbers otherwise."""
    if requested == "auto":
        if plan.choice is None:
            raise PlanError("no bank placement fits: " + _summary(plan))
        return plan.choice
    if requested not in PLACEMENTS:
        raise ValueError(f"placement must be 'auto' or one of {PLACEMENTS}, got {requested!r}")
    c = plan.cost(requested)
    if not c.available or c.fits is False:
        raise PlanError(f"placement {requested!r} does not fit: {c.why}. " + _summary(plan))
    return requested


def _summary(plan: MemoryPlan) -> str:
    head = (f"{plan.params:,} parameters x {plan.decays} decays{' + BEMA' if plan.bema else ''}, "
            f"{plan.world} rank(s)")
    parts = []
    for c in plan.costs:
        if not c.available:
            continue
        where = f"{format_bytes(c.device_bytes)} device"
        if c.host_bytes:
            where += f" + {format_bytes(c.host_bytes)} host"
        parts.append(f"{c.placement}: {where} per rank ({c.why or 'fits'})")
    return head + "; " + "; ".join(parts) + ". Use fewer decays, more ranks, or a host with more memory."


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a text table (what ``emascope plan`` and the agent print)."""
    lines = [f"bank memory plan: {plan.params:,} params, {plan.decays} decays{' + BEMA' if plan.bema else ''}, "
             f"{plan.world} rank(s) ({plan.sharding}), params {plan.param_bytes} B each; free per device "
             f"{format_bytes(plan.device_free)}, host per node {format_bytes(plan.host_free)}",
             f"{'placement':<9} {'device/rank':>12} {'host/rank':>11} {'update traffic':>15} {'d2h/update':>11} "
             f"{'comm/update':>12} {'comm/swap':>10}  fits"]
    for c in plan.costs:
        if not c.available:
            lines.append(f"{c.placement:<9} {'-':>12} {'-':>11} {'-':>15} {'-':>11} {'-':>12} {'-':>10}  n/a ({c.why})")
            continue
        fits = {True: "yes", False: "no", None: "?"}[c.fits]
        lines.append(f"{c.placement:<9} {format_bytes(c.device_bytes):>12} {format_bytes(c.host_bytes):>11} "
                     f"{format_bytes(c.update_traffic):>15} {format_bytes(c.d2h_per_update):>11} "
                     f"{format_bytes(c.comm_per_update):>12} {format_bytes(c.comm_per_swap):>10}  {fits}"
                     + (f" ({c.why})" if c.fits is False else ""))
    lines.append(f"auto picks: {plan.choice or 'nothing fits'}")
    return "\n".join(lines)
