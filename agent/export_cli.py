"""``emascope export RUN_DIR (--variant D | --decay D | --sigma-rel S) [--format F] [--out PATH] [--dtype float32]``.

``--variant``: rebuild one variant the bank holds from the run's latest bank snapshot
(``banks/latest.safetensors``, or a sharded run's ``banks/latest.index.json`` and its per-rank files,
consolidated offline with no process group) without the model's Python class and write it (atomic files):

- ``--format safetensors`` (default): one ``.safetensors`` state dict, through
  :func:`emascope.shardfiles.export_from_run`; default ``RUN_DIR/exports/ema-<variant>-step<step>.safetensors``;
- ``--format transformers`` / ``diffusers``: a folder that ``from_pretrained`` loads (the config
  recorded at attach + the weights), through :func:`emascope.pretrained.export_pretrained`;
  default ``RUN_DIR/exports/ema-<variant>-step<step>/``; for a peft ``PeftModel`` ``transformers``
  is the merged model and ``--format peft`` the adapter folder (``...-adapter/``, :mod:`emascope.peft_export`).

``--decay`` (any decay in (0, 1)) or ``--sigma-rel`` (EDM2's power-function EMA): synthesise it
post hoc from the stage snapshots (:func:`emascope.posthoc.export_synthesized`, docs/synthesis.md)
at ``--step`` (default: the latest stage snapshot), streaming tensor by tensor, and print its error
report (profile residual, leave-one-out calibrated weight-space error and bound); ``--report
PATH`` also writes the report as JSON (checked like ``--out`` before anything is written). A target
the snapshots cannot represent is refused (exit code 2) unless ``--force``. Default output:
``RUN_DIR/exports/ema-<decay>-synth-step<step>.safetensors`` (``phema-<sigma_rel>-step<step>``);
``--format safetensors`` only.

``--out`` may be any path outside the run directory or under its ``exports/`` (an existing file
there is replaced, atomically); a folder (for a file export), an unwritable place or a file of the
run itself (``RUN/run.json``) is refused, as is a run of a newer ``format_version``.
Exit codes: 0 done, 2 bad input (a message naming the problem) or a refused synthesis.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from emascope import runformat as rf
from emascope.runformat import EXPORT_FORMATS


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry (dispatched from ``emascope export``). Prints the path and size; returns exit code."""
    parser = argparse.ArgumentParser(prog="emascope export",
                                     description="Export one variant (EMA decay) of a run as .safetensors, "
                                                 "or synthesise any decay / sigma_rel from its stage snapshots.")
    parser.add_argument("run_dir", help="run directory (holds banks/latest.safetensors or a sharded snapshot)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--variant", help='a variant the bank holds: decay such as 0.999, or "raw" / "bema"')
    what.add_argument("--decay", type=float,
                      help="any decay in (0, 1), synthesised post hoc from the bank snapshots (also one the bank "
                           "holds: --variant exports the bank's own row)")
    what.add_argument("--sigma-rel", type=float, help="EDM2 power-function EMA length (e.g. 0.05), synthesised")
    parser.add_argument("--step", type=int, default=None,
                        help="synthesise the average as of this optimizer step (default: the latest stage snapshot)")
    parser.add_argument("--force", action="store_true", help="write a synthesis even when its error is large")
    parser.add_argument("--report", default=None, help="also write the synthesis error report (JSON) here")
    parser.add_argument("--out", default=None, help="output path (default: RUN_DIR/exports/...)")
    parser.add_argument("--dtype", default=None, choices=["float32"], help="cast floating tensors")
    parser.add_argument("--format", default="safetensors", choices=list(EXPORT_FORMATS),
                        help="safetensors (a state dict file, default), or a folder that transformers' / "
                             "diffusers' from_pretrained loads (needs the config recorded at attach); peft: "
                             "a LoRA run's adapter folder for PeftModel.from_pretrained")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.variant is None:
        if args.format != "safetensors":
            parser.error("--format transformers/diffusers/peft goes with --variant (a synthesised decay is "
                         "written as a .safetensors state dict)")
        return _synthesized(args)
    if args.step is not None or args.force or args.report:
        parser.error("--step, --force and --report go with --decay / --sigma-rel")
    try:
        rf.check_readable_run_dir(args.run_dir)
    except ValueError as exc:
        print(f"emascope export: error: {exc}", file=sys.stderr)
        return 2
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


def _synthesized(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        rf.check_synthesis_target(args.decay, args.sigma_rel)
        rf.check_readable_run_dir(args.run_dir)
    except ValueError as exc:
        print(f"emascope export: error: {exc}", file=sys.stderr)
        return 2
    from emascope.atomic import atomic_write_json
    from emascope.posthoc import export_synthesized  # torch is imported only here
    from emascope.snapshot import check_export_target
    from emascope.synthesis import SynthesisError

    try:
        if args.report:  # checked like --out, before anything is written
            check_export_target(args.run_dir, args.report, option="--report")
        path, report = export_synthesized(args.run_dir, args.out, decay=args.decay, sigma_rel=args.sigma_rel,
                                          step=args.step, dtype=args.dtype, force=args.force)
    except (SynthesisError, ValueError, OSError) as exc:
        print(f"emascope export: error: {exc}", file=sys.stderr)
        return 2
    print(f"{path}  ({path.stat().st_size} bytes)")
    print(f"synthesised {report.summary()}")
    for w in report.warnings:
        print(f"warning: {w}")
    if args.report:
        try:
            Path(args.report).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(args.report, report.as_json())
        except OSError as exc:
            print(f"emascope export: error: cannot write --report {args.report!r}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
