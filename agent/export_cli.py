"""``emascope export RUN_DIR --variant D [--out PATH] [--dtype float32]``.

Rebuilds one variant from the run's bank snapshot (``banks/latest.safetensors``) without the
model's Python class and writes it as a ``.safetensors`` checkpoint (atomic), through
:func:`emascope.snapshot.export_from_run`. Default output:
``RUN_DIR/exports/ema-<variant>-step<step>.safetensors``. ``--out`` may be any file path outside the
run directory or under its ``exports/``; a folder, an unwritable place or a file of the run itself
(``RUN/run.json``) is refused. Exit codes: 0 done, 2 bad input (a message naming the problem).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry (dispatched from ``emascope export``). Prints the path and size; returns exit code."""
    parser = argparse.ArgumentParser(prog="emascope export",
                                     description="Export one variant (EMA decay) of a run as .safetensors.")
    parser.add_argument("run_dir", help="run directory (holds banks/latest.safetensors)")
    parser.add_argument("--variant", required=True, help='decay such as 0.999, or "raw" / "bema"')
    parser.add_argument("--out", default=None, help="output path (default: RUN_DIR/exports/...)")
    parser.add_argument("--dtype", default=None, choices=["float32"], help="cast floating tensors")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    from emascope.snapshot import ExportError, export_from_run  # torch is imported only here

    def note(message: str) -> None:
        print(f"emascope export: note: {message}", file=sys.stderr)

    try:
        path = export_from_run(args.run_dir, args.variant, args.out, args.dtype, notice=note)
    except (ExportError, OSError) as exc:  # OSError: a file system error not foreseen by the checks
        print(f"emascope export: error: {exc}", file=sys.stderr)
        return 2
    print(f"{path}  ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
