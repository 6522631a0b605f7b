"""``emascope score RUN_DIR --entry MODULE:FUNCTION [--watch]``: score a run's stages in this process.

The run must have been attached with ``scoring="external"``: its training process writes a stage
snapshot at every scoring point and this command scores each one exactly once, however many
scorers watch the run (:mod:`emascope.external`, :mod:`emascope.claims`). Exit codes: 0 done
(also after Ctrl-C), 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from emascope.procs import restore_sigint


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry (dispatched from ``emascope score``); returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="emascope score",
        description="Score the stage snapshots of a run attached with scoring='external' (each stage exactly "
                    "once among all scorers of the run).")
    parser.add_argument("run_dir", help="run directory (written by attach(..., scoring='external'))")
    parser.add_argument("--entry", required=True,
                        help="MODULE:FUNCTION or path/to/file.py:FUNCTION; FUNCTION() returns a dict with "
                             "'model' and attach's scoring arguments (sampler, reference, evaluate, ...)")
    parser.add_argument("--watch", action="store_true",
                        help="keep scoring new stages until the training run is closed and every stage is scored")
    parser.add_argument("--name", default=None, help="scorer name shown in events (default host:pid)")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between looks for new stages (--watch)")
    parser.add_argument("--stale-after", type=float, default=60.0,
                        help="seconds without a claim heartbeat before another scorer takes a stage over")
    parser.add_argument("--max-stages", type=int, default=None, help="stop after scoring this many stages")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.poll <= 0 or args.stale_after <= 0 or (args.max_stages is not None and args.max_stages < 1):
        parser.error("--poll and --stale-after must be > 0 and --max-stages >= 1")
    restore_sigint()
    from emascope.external import ScoreError, score_run  # torch is imported only here

    try:
        n = score_run(args.run_dir, args.entry, watch=args.watch, name=args.name, stale_after=args.stale_after,
                      poll=args.poll, max_stages=args.max_stages)
    except ScoreError as exc:
        print(f"emascope score: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emascope score: interrupted", file=sys.stderr)
        return 0
    print(f"emascope score: {n} stage(s) scored")
    return 0


if __name__ == "__main__":
    sys.exit(main())
