"""Test-session set-up: import emascope only as the installed package, and the test helpers by name.

pytest runs in ``importlib`` import mode (pyproject.toml), so test files are not imported through
``sys.path``. Two path fixes remain:

- the repository root is removed from ``sys.path`` (``python -m pytest`` puts the working directory
  first), so the folders ``agent/``, ``dashboard/`` and ``sample_runs/`` can never be imported under
  their folder names, which would load a second copy of a module with other class identities;
- this folder is added, so tests import their helpers (``scope_helpers``, ``bank_helpers``,
  ``dashboard_fixtures``) by name.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == ROOT
    except OSError:
        return False


sys.path[:] = [p for p in sys.path if not _is_root(p)]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

FOLDER_NAMES = ("agent", "dashboard", "sample_runs")


def folder_modules() -> list[str]:
    """Modules imported under a folder's name instead of ``emascope`` (there must be none)."""
    return sorted(m for m in sys.modules if m.split(".")[0] in FOLDER_NAMES)


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001 - pytest hook signature
    """After every test run: fail it if anything imported ``agent``/``dashboard``/``sample_runs``."""
    leaked = folder_modules()
    if leaked:
        sys.stderr.write(f"\nconftest: modules imported under their folder names: {leaked}\n")
        session.exitstatus = 1
