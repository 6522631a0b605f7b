"""Crash consistency and permissions (issue 15): stale temp files of a killed snapshot are removed on
start and resume (only ours, only inside the run), an append after a failed write (full disk) does
not glue onto the torn line, and every file is created with the permissions of a plain ``open``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scope_helpers import Denoiser, mixture, train_step

from emascope import attach
from emascope import runformat as rf
from emascope.atomic import append_jsonl, atomic_write_bytes, atomic_write_json
from emascope.bank import EMABank
from emascope.rundir import RunWriter
from emascope.snapshot import export_checkpoint, save_snapshot

torch.set_num_threads(1)
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines() if x.startswith("{")]


# ------------------------------------------------------------------ kill -9 during a snapshot

KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import torch
    import safetensors.torch as st
    import emascope.snapshot as snap
    from emascope import attach
    run_dir = sys.argv[1]
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = attach(model, opt, run_dir=run_dir, score_every=None, decays=(0.9,), snapshot_every=None)

    def half_then_hang(tensors, filename, metadata=None):
        st.save_file(tensors, filename, metadata=metadata)  # the temp file is full size ...
        print("WRITING", flush=True)
        time.sleep(600)                                      # ... and then the writer is killed

    snap.save_file = half_then_hang
    scope.close()
""")


@pytest.fixture(scope="module")
def killed_once(tmp_path_factory) -> Path:
    """A run whose writer got SIGKILL while writing banks/latest.safetensors (a real kill -9)."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env=ENV, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return run_dir


@pytest.fixture()
def killed_run(killed_once, tmp_path) -> Path:
    """A fresh copy of the killed run for one test."""
    return Path(shutil.copytree(killed_once, tmp_path / "run", symlinks=True))


def _resume(run_dir: Path, **kw):
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return attach(model, opt, run_dir=run_dir, score_every=None, decays=(0.9,), **kw)


def test_resume_removes_the_temp_file_of_a_killed_snapshot_and_nothing_else(killed_run, tmp_path):
    run_dir = killed_run
    (stale,) = [p for p in (run_dir / "banks").iterdir()]
    assert rf.is_temp_file_name(stale.name) and stale.stat().st_size > 256 * 256 * 4  # full bank size
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / ".run.json.abcdefgh12.tmp"  # our pattern, but outside the run
    victim.write_text("keep")
    keep = {
        run_dir / "banks" / "notes.tmp": "not our pattern",
        run_dir / "banks" / ".x.tmp": "no random part",
        run_dir / "requests" / ".r1.json.abcdefgh12.tmp": "young, in a folder the dashboard writes to",
        victim: "keep",
    }
    for path, text in keep.items():
        path.write_text(text)
    link = run_dir / "samples" / ".0.9.png.abcdefgh12.tmp"
    link.symlink_to(victim)  # a symlink with our name: removed? never followed
    old_request_tmp = run_dir / "requests" / ".r2.json.abcdefgh12.tmp"
    old_request_tmp.write_text("old")
    os.utime(old_request_tmp, (time.time() - 2 * rf.STALE_TEMP_AGE_S,) * 2)
    stage = run_dir / "samples" / rf.stage_dir_name(5)
    stage.mkdir(parents=True)
    stage_tmp = stage / ".raw.npy.abcdefgh12.tmp"
    stage_tmp.write_bytes(b"x")
    with _resume(run_dir, resume=True):
        pass
    assert not stale.exists() and not old_request_tmp.exists() and not stage_tmp.exists()
    assert {p: p.read_text() for p in keep} == keep
    assert link.is_symlink() and victim.read_text() == "keep"
    (notice,) = [e for e in _events(run_dir) if e["type"] == "notice" and e.get("where") == "start"]
    assert sorted(notice["removed"]) == sorted([f"banks/{stale.name}", "requests/.r2.json.abcdefgh12.tmp",
                                                f"samples/{stage.name}/.raw.npy.abcdefgh12.tmp"])
    assert [p.name for p in (run_dir / "banks").iterdir() if rf.is_temp_file_name(p.name)] == []


def test_a_fresh_start_over_a_killed_run_removes_its_temp_files(killed_run):
    """overwrite=True deletes banks/ anyway, but keeps reference/ and exports/: a reference cache
    killed mid-write (and an hour-old export temp) are removed by the start's cleanup."""
    ref_tmp = killed_run / "reference" / ".identity-0-ab.npz.0123456789abcdef.tmp"
    ref_tmp.write_bytes(b"x" * 1000)
    export_tmp = killed_run / "exports" / ".m.safetensors.0123456789abcdef.tmp"
    export_tmp.write_bytes(b"x")
    os.utime(export_tmp, (time.time() - 2 * rf.STALE_TEMP_AGE_S,) * 2)
    with _resume(killed_run, overwrite=True):
        pass
    assert not ref_tmp.exists() and not export_tmp.exists()
    assert [p.name for p in (killed_run / "banks").iterdir()] == ["latest.safetensors"]
    (notice,) = [e for e in _events(killed_run) if e["type"] == "notice" and e.get("where") == "start"]
    assert "1001 bytes" in notice["message"]


# ------------------------------------------------------------------ a full disk mid-append

FULL_DISK = textwrap.dedent("""
    import json, os, resource, signal, sys
    from emascope.rundir import RunWriter
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like ENOSPC
    run_dir = sys.argv[1]
    w = RunWriter(run_dir)
    w.metric(1, "raw", "fd", 1.0)
    w.event("before", 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    for name, write in (("metrics.jsonl", lambda: w.metric(2, "raw", "fd", 2.0)),
                        ("events.jsonl", lambda: w.event("lost", 2, pad="x" * 100))):
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(os.path.join(run_dir, name)) + 10, hard))
        write()                                              # torn: 10 bytes of the line made it
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
    w.metric(3, "raw", "fd", 3.0)
    w.event("after", 3)
    print(json.dumps({"errors": w.num_write_errors}))
""")


def test_an_append_after_a_failed_write_terminates_the_torn_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(run_dir)], capture_output=True, text=True, env=ENV,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["errors"] == 2  # both torn writes were caught, training went on
    metrics = (run_dir / "metrics.jsonl").read_text().split("\n")
    events = (run_dir / "events.jsonl").read_text().split("\n")
    for lines in (metrics, events):
        assert len(lines[1]) == 10 and lines[1].startswith("{")  # the torn fragment, on a line of its own
    parsed = [json.loads(x) for x in metrics if x.startswith("{") and x.endswith("}")]
    assert [r["step"] for r in parsed] == [1, 3]  # only the torn record is lost, not the next one too
    parsed = [json.loads(x) for x in events if x.startswith("{") and x.endswith("}")]
    assert [r["type"] for r in parsed] == ["before", "after"]


# ------------------------------------------------------------------ permissions


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002, 0o027])
def test_files_are_created_with_the_permissions_of_a_plain_open(tmp_path, umask):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    bank = EMABank(model, (0.9,))
    old = os.umask(umask)
    try:
        plain = tmp_path / "plain"
        with open(plain, "w"):
            pass
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json(tmp_path / "b.json", {"a": 1})
        append_jsonl(tmp_path / "c.jsonl", {"a": 1})
        save_snapshot(bank, tmp_path / "snap.safetensors")
        export_checkpoint(bank, "0.9", tmp_path / "export.safetensors")
        RunWriter(tmp_path).save_points("p.npy", np.zeros((2, 2)))
    finally:
        os.umask(old)
    expected = stat.S_IMODE(plain.stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("a.bin", "b.json", "c.jsonl", "snap.safetensors", "export.safetensors", "p.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_a_run_is_readable_by_a_teammate_under_the_usual_umask(tmp_path):
    """run.json, the heartbeat and the snapshot were 0600 (mkstemp) while the logs were 0644."""
    old = os.umask(0o022)
    try:
        torch.manual_seed(0)
        model = Denoiser(width=8)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        data, g = mixture(100, seed=1), torch.Generator().manual_seed(0)
        with attach(model, opt, run_dir=tmp_path / "run", score_every=None, decays=(0.9,)) as scope:
            train_step(model, opt, data, g, batch=16)
            scope.export("0.9")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"run.json", "heartbeat", "latest.safetensors", "events.jsonl"}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o644)}
