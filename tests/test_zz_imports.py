"""Runs last (file order): after every other test file's imports, no module was loaded under a folder
name (``agent``, ``dashboard``, ``sample_runs``), only as ``emascope`` (conftest also checks this
at the end of every run, whatever subset of tests ran)."""

from __future__ import annotations

from conftest import folder_modules

import emascope


def test_no_module_was_imported_under_a_folder_name():
    assert folder_modules() == []
    assert emascope.__file__ and "emascope" in {m.split(".")[0] for m in __import__("sys").modules}
