"""Bad input to the command line: exit code 2, one line naming the problem, no traceback, nothing
written. Run in-process (``emascope.cli.main``) on a copy of the shipped tree2d run's bank."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from emascope.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "sample_runs" / "runs" / "tree2d"


def _tree(path: Path) -> dict[str, int]:
    """Every file and folder under ``path`` with its size (folders: -1)."""
    return {str(p.relative_to(path)): (p.stat().st_size if p.is_file() else -1) for p in sorted(path.rglob("*"))}


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """run.json and banks/ of the shipped tree2d run (what export and synthesis read)."""
    run = tmp_path / "tree2d"
    run.mkdir()
    shutil.copy2(SHIPPED / "run.json", run / "run.json")
    shutil.copytree(SHIPPED / "banks", run / "banks")
    return run


def _refused(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize("what", [["--variant", "0.12345"], ["--variant", "0.99x"]])
def test_export_of_an_unknown_variant_writes_nothing(run, capsys, what):
    before = _tree(run)
    _refused(capsys, ["export", str(run), *what], repr(what[1]))
    assert _tree(run) == before  # no exports/ folder either


def test_synthesis_from_an_empty_folder_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(capsys, ["export", str(empty), "--decay", "0.995"], "no readable bank snapshot")
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("command", [["export", "{}", "--variant", "0.99"], ["export", "{}", "--decay", "0.995"],
                                     ["score", "{}", "--entry", "m:f"]])
def test_a_file_given_as_the_run_directory_is_named_as_such(tmp_path, capsys, command):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _refused(capsys, [c.format(afile) for c in command], "is not a directory")


@pytest.mark.parametrize("what", [["--variant", "0.999"], ["--decay", "0.995"]])
def test_export_refuses_a_run_of_a_newer_format_version(run, capsys, what):
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "format_version": 99}))
    before = _tree(run)
    _refused(capsys, ["export", str(run), *what], "format_version 99", "format_version 1")
    assert _tree(run) == before


@pytest.mark.parametrize("report", ["run.json", "folder", "afile/r.json"])
def test_export_report_path_is_checked_before_anything_is_written(run, tmp_path, capsys, report):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    target = run / report if report == "run.json" else tmp_path / report
    out = tmp_path / "out.safetensors"
    before = _tree(run)
    _refused(capsys, ["export", str(run), "--decay", "0.995", "--out", str(out), "--report", str(target)],
             "--report")
    assert _tree(run) == before  # run.json untouched, no synthesis cache
    assert not out.exists()


def test_export_report_is_written_where_asked(run, tmp_path, capsys):
    out, rep = tmp_path / "out.safetensors", tmp_path / "reports" / "r.json"
    assert main(["export", str(run), "--decay", "0.995", "--out", str(out), "--report", str(rep)]) == 0
    assert json.loads(rep.read_text())["target"]["decay"] == 0.995 and out.stat().st_size > 0


def test_synthesised_export_to_an_unwritable_place_names_the_path(run, capsys):
    _refused(capsys, ["export", str(run), "--decay", "0.995", "--out", "/proc/x.safetensors"],
             "cannot write '/proc/x.safetensors'")


def test_demo_refuses_an_unwritable_run_dir(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    _refused(capsys, ["demo", "--no-dashboard", "--run-dir", str(tmp_path / "afile" / "run")], "--run-dir")


def test_demo_refuses_a_taken_port_before_training(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        _refused(capsys, ["demo", "--no-browser", "--port", str(port), "--run-dir", str(tmp_path / "run")],
                 f"port {port} is taken")
    assert not (tmp_path / "run").exists()
