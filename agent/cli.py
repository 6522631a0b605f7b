"""The ``emascope`` command line: dispatches each subcommand to the module that owns it.

This module sits above everything: it is the only core module that reaches the dashboard and the
samples (lazily, per subcommand), so the core never imports either.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from emascope.version import __version__

#: subcommand -> (module with a ``main(argv) -> int``, help line)
COMMANDS = {
    "export": ("emascope.export_cli", "export one variant (decay) of a run as a .safetensors checkpoint"),
    "plan": ("emascope.plan_cli", "memory plan of a bank: bytes per rank and update traffic of each placement"),
    "score": ("emascope.score_cli", "score the stage snapshots of a run attached with scoring='external'"),
    "dashboard": ("emascope.dashboard.launch", "open the live dashboard on a run directory or a folder of runs"),
    "demo": ("emascope.samples.demo", "train a sample model live with the agent attached and open the dashboard"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``emascope`` console script. Returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="emascope", description="Sweep many EMA decays in one training run, score them, pick the best.")
    parser.add_argument("--version", action="version", version=f"emascope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    if not argv:
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.parse_args(argv)  # handles --version / --help / unknown commands
        return 0
    run = importlib.import_module(COMMANDS[argv[0]][0]).main
    return int(run(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
