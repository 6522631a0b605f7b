"""Children die with their parent: ``emascope demo`` killed with SIGKILL (no handler can run) takes
its dashboard child (``emascope.dashboard.launch``) and the Streamlit server under it along.

A real demo process, a real SIGKILL; the whole session is killed at the end whatever happens.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emascope import procs
from emascope.samples import demo

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped is dead too)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "?")
    return state not in ("Z", "X")


def _pids_mentioning(text: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and _alive(int(pid)):
            out.append(int(pid))
    return out


def test_demo_killed_with_sigkill_takes_its_dashboard_along(tmp_path):
    run_dir = (tmp_path / "demo-kill").resolve()
    port = demo.free_port(8680)
    cmd = [sys.executable, "-m", "emascope.cli", "demo", "--no-browser", "--run-dir", str(run_dir),
           "--port", str(port), "--steps", "100000", "--num-samples", "40"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    children: list[int] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "dashboard -> http" in line:
                break
        assert any("dashboard -> http" in x for x in lines), "".join(lines)
        children = [p for p in _pids_mentioning(str(run_dir)) if p != proc.pid]
        # the launcher and the Streamlit server it started (both name the run dir in their argv)
        assert len(children) >= 2, (children, "".join(lines))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 30
        while any(_alive(p) for p in children) and time.time() < deadline:
            time.sleep(0.2)
        assert not [p for p in children if _alive(p)], "children outlived the SIGKILLed demo"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the session: whatever is left
        except ProcessLookupError:
            pass
        for p in children:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_preexec_child_gets_a_signal_when_its_parent_is_killed(tmp_path):
    """The Linux mechanism alone: a middle process starts a sleeper with the preexec and is SIGKILLed."""
    pidfile = tmp_path / "child.pid"
    middle = (
        "import subprocess, sys, time\n"
        "from emascope.procs import die_with_parent_preexec\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
        "                     preexec_fn=die_with_parent_preexec())\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", middle], start_new_session=True)
    child = None
    try:
        deadline = time.time() + 30
        while not pidfile.exists() or not pidfile.read_text():
            assert time.time() < deadline, "the middle process did not start its child"
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert _alive(child)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.time() + 10
        while _alive(child) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        for pid in (proc.pid, child):
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait()


def test_watch_parent_fallback_notices_a_dead_parent(tmp_path, monkeypatch):
    """The polling fallback (other platforms): a parent pid that is not ours counts as gone."""
    fired = []
    monkeypatch.setenv(procs.PARENT_ENV, str(os.getppid() + 10**6))
    thread = procs.watch_parent(lambda: fired.append(True), interval=0.01)
    assert thread is not None
    thread.join(timeout=5)
    assert fired == [True] and procs.PARENT_ENV not in os.environ
    monkeypatch.delenv(procs.PARENT_ENV, raising=False)
    assert procs.watch_parent(lambda: None) is None  # started by a person: nothing to watch
    env = procs.child_env({"A": "1"})
    assert env == {"A": "1", procs.PARENT_ENV: str(os.getpid())}
