"""The ``emascope`` command line: dispatches subcommands to the module that owns each one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _version() -> str:
    from agent import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``emascope`` console script. Returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="emascope",
        description="Sweep many EMA decays in one training run, score them, pick the best.",
    )
    parser.add_argument("--version", action="version", version=f"emascope {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("export", help="export one variant (decay) of a run as a .safetensors checkpoint",
                   add_help=False)
    sub.add_parser("dashboard", help="open the live dashboard on a run directory or a folder of runs",
                   add_help=False)
    sub.add_parser("demo", help="train a sample model live with the agent attached and open the dashboard",
                   add_help=False)
    if not argv:
        parser.print_help()
        return 0
    if argv[0] not in {"export", "dashboard", "demo"}:
        parser.parse_args(argv)  # handles --version / --help / unknown commands
        return 0
    command, rest = argv[0], argv[1:]
    if command == "export":
        from agent.export_cli import main as run
    elif command == "dashboard":
        from dashboard.launch import main as run
    else:
        from sample_runs.demo import main as run
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
