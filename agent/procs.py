"""Process plumbing shared by the command-line tools (torch-free): signals of long-running commands."""

from __future__ import annotations

import signal
import threading


def restore_sigint() -> None:
    """Make Ctrl-C raise ``KeyboardInterrupt`` again in this process.

    A process started from a non-interactive shell's background job inherits SIGINT as *ignored*
    (POSIX job control); Python then never installs its handler, and Ctrl-C does nothing. Long
    running commands (``emascope demo``, ``emascope dashboard``) call this first. Only the main
    thread may set handlers; elsewhere it does nothing.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
