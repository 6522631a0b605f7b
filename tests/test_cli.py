"""The `emascope` console script: version, help, and dispatch of unknown commands."""

from __future__ import annotations

import subprocess
import sys

import emascope
from emascope.cli import main


def test_version_flag_prints_package_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:  # argparse's version action exits 0
        assert exc.code == 0
    assert capsys.readouterr().out.strip() == f"emascope {emascope.__version__}"


def test_console_script_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "emascope.cli", "--version"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == f"emascope {emascope.__version__}"


def test_no_arguments_prints_help_listing_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("export", "dashboard", "demo"):
        assert command in out


def test_unknown_command_is_an_error(capsys):
    try:
        main(["frobnicate"])
    except SystemExit as exc:
        assert exc.code == 2
    else:  # pragma: no cover - argparse always exits here
        raise AssertionError("unknown command did not fail")
    assert "invalid choice" in capsys.readouterr().err
