"""``emascope export RUN_DIR --variant D [--out PATH] [--dtype float32]``.

Rebuilds one variant from the run's latest bank snapshot (``banks/latest.safetensors``, or a
sharded run's ``banks/latest.index.json`` and its per-rank files, consolidated offline with no
process group) without the model's Python class and writes it as a ``.safetensors`` checkpoint
(atomic), through :func:`emascope.shardfiles.export_from_run`. Default output:
``RUN_DIR/exports/ema-<variant>-step<step>.safetensors``. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry (dispatched from ``emascope export``). Prints the path and size; returns exit code."""
    parser = argparse.ArgumentParser(prog="emascope export",
                                     description="Export one variant (EMA decay) of a run as .safetensors.")
    parser.add_argument("run_dir", help="run directory (holds banks/latest.safetensors or a sharded snapshot)")
    parser.add_argument("--variant", required=True, help='decay such as 0.999, or "raw" / "bema"')
    parser.add_argument("--out", default=None, help="output path (default: RUN_DIR/exports/...)")
    parser.add_argument("--dtype", default=None, choices=["float32"], help="cast floating tensors")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    from emascope.shardfiles import export_from_run  # torch is imported only here
    from emascope.snapshot import ExportError

    try:
        path = export_from_run(args.run_dir, args.variant, args.out, args.dtype)
    except ExportError as exc:
        print(f"emascope export: error: {exc}", file=sys.stderr)
        return 2
    print(f"{path}  ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
