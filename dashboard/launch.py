"""``emascope dashboard PATH``: start the Streamlit app on a run directory or a folder of runs.

Security defaults: listens on 127.0.0.1 only, usage statistics off, ``server.allowedHosts`` limited
to the localhost names (one ``--server.allowedHosts`` flag per host: the comma form would be one
bogus host that rejects every connection), CORS and XSRF protection on, no file watcher on the
app's source. ``--host`` opts in to other interfaces, with a warning.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import webbrowser
from collections.abc import Sequence
from pathlib import Path

from emascope.procs import PARENT_ENV, die_with_parent_preexec, restore_sigint, watch_parent

APP = Path(__file__).with_name("app.py")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
ENV_PATH = "EMASCOPE_DASHBOARD_PATH"
DEFAULT_PORT = 8501


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="emascope dashboard", description="Live dashboard of emascope run directories."
    )
    p.add_argument("path", help="a run directory, or a folder searched recursively for runs (run.json)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default 127.0.0.1; anything else exposes your runs)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="extra host name browsers may use to reach the app (repeatable; with --host)",
    )
    p.add_argument("--no-browser", action="store_true", help="do not open a browser")
    p.add_argument(
        "--poll",
        action="store_true",
        help="poll files instead of OS notifications (network file systems; or EMASCOPE_POLL=1)",
    )
    args = p.parse_args(list(argv))
    if not 1 <= args.port <= 65535:
        p.error(f"--port must be in 1..65535, got {args.port}")
    return args


def allowed_hosts(host: str, extra: Sequence[str] = ()) -> list[str]:
    """Host names the server accepts (localhost names, the chosen host if specific, and ``extra``)."""
    hosts = list(LOCAL_HOSTS)
    if host not in ("0.0.0.0", "::", "") and host not in hosts:
        hosts.append(host)
    if host in ("0.0.0.0", "::"):
        for name in {socket.gethostname(), socket.getfqdn()}:
            if name and name not in hosts:
                hosts.append(name)
    hosts += [h for h in extra if h not in hosts]
    return hosts


def build_command(
    path: Path,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    poll: bool = False,
    extra_hosts: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The ``streamlit run`` command line of the dashboard (pure; tested)."""
    cmd = [
        python,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.enableCORS",
        "true",
        "--server.enableXsrfProtection",
        "true",
        "--server.fileWatcherType",
        "none",
        "--server.runOnSave",
        "false",
        "--client.toolbarMode",
        "viewer",
        "--theme.base",
        "light",
    ]
    for h in allowed_hosts(host, extra_hosts):
        cmd += ["--server.allowedHosts", h]
    cmd += ["--", str(path)] + (["--poll"] if poll else [])
    return cmd


def url_for(host: str, port: int) -> str:
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::", "::1", "") else host
    return f"http://{shown}:{port}"


def probe_url(host: str, port: int) -> str:
    """Where this machine reaches the server (wildcard addresses probed on loopback)."""
    if host in ("0.0.0.0", "", "localhost"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll Streamlit's health endpoint until it answers (or the process dies / times out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``emascope dashboard``; returns the exit code of the server."""
    restore_sigint()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    path = Path(args.path).expanduser().resolve()
    if not path.is_dir():
        print(f"emascope dashboard: not a directory: {args.path!r}", file=sys.stderr)
        return 2
    if args.host not in LOCAL_HOSTS:
        print(
            f"emascope dashboard: WARNING: listening on {args.host!r}, not only on localhost: anyone who "
            "can reach this port can read your runs and write export requests.",
            file=sys.stderr,
        )
    cmd = build_command(path, host=args.host, port=args.port, poll=args.poll, extra_hosts=args.allowed_host)
    env = dict(os.environ, **{ENV_PATH: str(path)})
    env.pop(PARENT_ENV, None)  # for this process's watch_parent only, not the server's children
    if args.poll:
        env["EMASCOPE_POLL"] = "1"
    # the server dies with this launcher, even a SIGKILLed one (Linux: parent-death signal)
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent_preexec())

    def forward(signum, _frame):  # a terminated launcher must not leave the server running
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, forward)
        except (ValueError, OSError, AttributeError):  # not the main thread / not on this platform
            pass
    # started by `emascope demo` (EMASCOPE_PARENT_PID): stop when it is gone, on any platform
    watch_parent(lambda: os.kill(os.getpid(), signal.SIGTERM))
    url = url_for(args.host, args.port)

    def announce() -> None:
        if wait_until_up(probe_url(args.host, args.port), proc):
            print(f"emascope dashboard: {path} -> {url}", flush=True)
            if not args.no_browser:
                webbrowser.open(url)

    threading.Thread(target=announce, daemon=True).start()
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
