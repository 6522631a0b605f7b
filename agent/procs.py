"""Process plumbing shared by the command-line tools (torch-free): signals of long-running commands,
and child processes that die with their parent.

A child started by ``emascope demo`` (the dashboard) or by ``emascope dashboard`` (the Streamlit
server) must not outlive its parent, even when the parent is killed with SIGKILL (no handler runs
then). On Linux the kernel does it: the child asks for a parent-death signal (``prctl(
PR_SET_PDEATHSIG, SIGTERM)``) in :func:`die_with_parent_preexec`, run between ``fork`` and ``exec``.
Elsewhere a child started with :func:`child_env` polls its parent (:func:`watch_parent`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

#: Environment variable naming the parent's pid for :func:`watch_parent`.
PARENT_ENV = "EMASCOPE_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def restore_sigint() -> None:
    """Make Ctrl-C raise ``KeyboardInterrupt`` again in this process.

    A process started from a non-interactive shell's background job inherits SIGINT as *ignored*
    (POSIX job control); Python then never installs its handler, and Ctrl-C does nothing. Long
    running commands (``emascope demo``, ``emascope dashboard``) call this first. Only the main
    thread may set handlers; elsewhere it does nothing.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def die_with_parent_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen` that makes the child receive ``sig`` when the
    calling thread's process dies (Linux ``PR_SET_PDEATHSIG``); ``None`` where there is none.

    The C function is looked up here, in the parent, so the child only makes one system call.
    Create the child from the main thread: Linux sends the signal when the creating *thread* exits.
    If the parent is already gone when the child runs it, the child signals itself.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # died between fork and prctl: no signal will come
            os.kill(os.getpid(), sig)

    return preexec


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) plus :data:`PARENT_ENV` = this pid."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def watch_parent(on_orphan: Callable[[], None], interval: float = 0.5) -> threading.Thread | None:
    """In a child started with :func:`child_env`: a daemon thread that calls ``on_orphan()`` once the
    parent named by :data:`PARENT_ENV` is gone (this process was re-parented), checked every
    ``interval`` seconds. ``None`` when the variable is not set (started by a person). The variable
    is removed from this process's environment, so its own children do not inherit it."""
    try:
        parent = int(os.environ.pop(PARENT_ENV, ""))
    except ValueError:
        return None

    def loop() -> None:
        stop = threading.Event()
        while os.getppid() == parent:
            stop.wait(interval)
        on_orphan()

    thread = threading.Thread(target=loop, name="emascope-watch-parent", daemon=True)
    thread.start()
    return thread
