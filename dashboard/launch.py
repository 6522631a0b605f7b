"""``emascope dashboard PATH``: start the Streamlit app on a run directory or a folder of runs.

Security defaults: listens on 127.0.0.1 only, usage statistics off, ``server.allowedHosts`` limited
to the localhost names (one ``--server.allowedHosts`` flag per host: the comma form would be one
bogus host that rejects every connection), CORS and XSRF protection on, no file watcher on the
app's source, errors in the page shown as their type only (``client.showErrorDetails=type``: no
message, traceback or file path; the details go to the server's log). ``--host`` opts in to other
interfaces, with a warning. The server runs as ``python -m emascope.dashboard.server`` (Streamlit's
own server behind an exact-origin check: :mod:`emascope.dashboard.server`), which prints the URL
once it listens.

Ports: a ``--port`` that is taken is an error (exit 2) naming the port, before anything starts;
without ``--port`` the first free port from 8501 is used.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from emascope.procs import PARENT_ENV, die_with_parent_preexec, restore_sigint, watch_parent

APP = Path(__file__).with_name("app.py")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
ENV_PATH = "EMASCOPE_DASHBOARD_PATH"
DEFAULT_PORT = 8501
#: Ports tried from DEFAULT_PORT when no --port is given.
PORT_TRIES = 100
#: Set to "1" for the server to open a browser tab once it listens (emascope.dashboard.server).
ENV_OPEN_BROWSER = "EMASCOPE_OPEN_BROWSER"
#: The server module run in the child process (see emascope.dashboard.server).
SERVER_MODULE = "emascope.dashboard.server"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="emascope dashboard", description="Live dashboard of emascope run directories."
    )
    p.add_argument("path", help="a run directory, or a folder searched recursively for runs (run.json)")
    p.add_argument("--port", type=int, default=None,
                   help=f"port (default: the first free one from {DEFAULT_PORT}; a taken --port is an error)")
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
    if args.port is not None and not 1 <= args.port <= 65535:
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
        SERVER_MODULE,
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
        "--client.showErrorDetails",
        "type",
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


def _addresses(host: str) -> list[str]:
    """Addresses a browser may reach for ``host`` (both loopbacks for the local names)."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return ["127.0.0.1", "::1"]
    return [host]


def port_taken(host: str, port: int) -> bool:
    """Whether another program holds ``port`` on ``host`` (a test bind, as the server will bind:
    ``SO_REUSEADDR`` on, so a port in TIME_WAIT is free). Addresses this machine lacks (no IPv6)
    do not count as taken."""
    for addr in _addresses(host):
        try:
            infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError:
            continue
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            if os.name != "nt":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and addr in ("::", ""):
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                s.bind(sockaddr)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    return True
    return False


class PortError(ValueError):
    """No usable port: the requested one is taken, or none is free in the searched range."""


def choose_port(host: str, requested: int | None, start: int | None = None, tries: int = PORT_TRIES) -> int:
    """The port to serve on: ``requested`` if free (else :class:`PortError` naming it), or the
    first free port from ``start`` (default :data:`DEFAULT_PORT`) when none was requested."""
    if requested is not None:
        if port_taken(host, requested):
            raise PortError(f"port {requested} is taken on {host} (another program is listening there); "
                            "choose another with --port, or leave --port out to use the next free port")
        return requested
    first = DEFAULT_PORT if start is None else start
    for port in range(first, min(first + tries, 65536)):
        if not port_taken(host, port):
            return port
    raise PortError(f"no free port on {host} in {first}..{first + tries - 1}; choose one with --port")


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
    try:
        port = choose_port(args.host, args.port)
    except PortError as exc:
        print(f"emascope dashboard: {exc}", file=sys.stderr)
        return 2
    cmd = build_command(path, host=args.host, port=port, poll=args.poll, extra_hosts=args.allowed_host)
    env = dict(os.environ, **{ENV_PATH: str(path)})
    env.pop(PARENT_ENV, None)  # for this process's watch_parent only, not the server's children
    if args.poll:
        env["EMASCOPE_POLL"] = "1"
    env[ENV_OPEN_BROWSER] = "0" if args.no_browser else "1"  # the server opens it once it listens
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
