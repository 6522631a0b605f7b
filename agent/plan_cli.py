"""``emascope plan --params 1.5e9 --decays 10 --world 8 --device-free 20GiB``: a bank's memory plan.

Prints bytes per rank, update traffic and bytes communicated per update for each placement
(device, sharded, host) and the one ``device="auto"`` would pick (:mod:`emascope.plan`; no model,
no torch). Exit codes: 0 a placement fits (or free memory was not given), 2 bad input or nothing
fits (the message names the numbers).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from emascope.plan import DTYPE_BYTES, PlanError, choose, format_plan, parse_bytes, plan_memory


def _count(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 1 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return int(round(value))


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry (dispatched from ``emascope plan``); returns the exit code."""
    parser = argparse.ArgumentParser(prog="emascope plan",
                                     description="Memory plan of an EMA bank: bytes per rank and update traffic "
                                                 "of each placement, and the one device='auto' picks.")
    parser.add_argument("--params", type=_count, required=True,
                        help="trainable parameters averaged (e.g. 1.5e9)")
    parser.add_argument("--decays", type=_count, default=10, help="number of decays K (default 10)")
    parser.add_argument("--bema", action="store_true", help="add the BEMA variant (one more row)")
    parser.add_argument("--world", type=_count, default=1, help="ranks W (default 1)")
    parser.add_argument("--ranks-per-node", type=_count, default=None,
                        help="ranks sharing one host's memory (default: --world)")
    parser.add_argument("--device-free", type=_size, default=None, help="free memory per device, e.g. 20GiB")
    parser.add_argument("--host-free", type=_size, default=None, help="free host memory per node, e.g. 500GiB")
    parser.add_argument("--param-dtype", choices=sorted(DTYPE_BYTES), default="bfloat16",
                        help="the weights' dtype (default bfloat16)")
    shard = parser.add_mutually_exclusive_group()
    shard.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) weights instead of DDP replicas")
    shard.add_argument("--no-shard", action="store_true", help="shard=False: rank 0 holds the whole bank")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    sharding = "fsdp" if args.fsdp else "none" if args.no_shard else "ddp"
    try:
        plan = plan_memory(args.params, args.decays, world=args.world, bema=args.bema,
                           param_bytes=DTYPE_BYTES[args.param_dtype], device_free=args.device_free,
                           host_free=args.host_free, ranks_per_node=args.ranks_per_node, sharding=sharding)
    except ValueError as exc:
        print(f"emascope plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.as_json(), indent=1) if args.json else format_plan(plan))
    try:
        choose(plan, "auto")
    except PlanError as exc:
        print(f"emascope plan: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
