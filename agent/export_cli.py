"""``emascope export RUN_DIR --variant D [--format F] [--out PATH] [--dtype float32]``.

Rebuilds one variant from the run's latest bank snapshot (``banks/latest.safetensors``, or a
sharded run's ``banks/latest.index.json`` and its per-rank files, consolidated offline with no
process group) without the model's Python class and writes it (atomic files):

- ``--format safetensors`` (default): one ``.safetensors`` state dict, through
  :func:`emascope.shardfiles.export_from_run`; default ``RUN_DIR/exports/ema-<variant>-step<step>.safetensors``;
- ``--format transformers`` / ``diffusers``: a folder that ``from_pretrained`` loads (the config
  recorded at attach + the weights), through :func:`emascope.pretrained.export_pretrained`;
  default ``RUN_DIR/exports/ema-<variant>-step<step>/``.

``--out`` may be any path outside the run directory or under its ``exports/``; a folder (for a
file export), an unwritable place or a file of the run itself (``RUN/run.json``) is refused.
Exit codes: 0 done, 2 bad input (a message naming the problem).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from emascope.runformat import EXPORT_FORMATS


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry (dispatched from ``emascope export``). Prints the path and size; returns exit code."""
    parser = argparse.ArgumentParser(prog="emascope export",
                                     description="Export one variant (EMA decay) of a run as .safetensors.")
    parser.add_argument("run_dir", help="run directory (holds banks/latest.safetensors or a sharded snapshot)")
    parser.add_argument("--variant", required=True, help='decay such as 0.999, or "raw" / "bema"')
    parser.add_argument("--out", default=None, help="output path (default: RUN_DIR/exports/...)")
    parser.add_argument("--dtype", default=None, choices=["float32"], help="cast floating tensors")
    parser.add_argument("--format", default="safetensors", choices=list(EXPORT_FORMATS),
                        help="safetensors (a state dict file, default), or a folder that transformers' / "
                             "diffusers' from_pretrained loads (needs the config recorded at attach)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    # torch is imported only here
    from emascope.pretrained import export_pretrained
    from emascope.shardfiles import export_from_run
    from emascope.snapshot import ExportError

    def note(message: str) -> None:
        print(f"emascope export: note: {message}", file=sys.stderr)

    try:
        if args.format == "safetensors":
            path = export_from_run(args.run_dir, args.variant, args.out, args.dtype, notice=note)
        else:
            path = export_pretrained(args.run_dir, args.variant, args.format, args.out, args.dtype, notice=note)
    except (ExportError, OSError) as exc:  # OSError: a file system error not foreseen by the checks
        print(f"emascope export: error: {exc}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
    print(f"{path}  ({size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
