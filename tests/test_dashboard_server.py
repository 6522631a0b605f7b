"""Issue 15, "the server": the real ``emascope dashboard`` server (Streamlit behind emascope's origin
guard) started as a subprocess, probed with a real WebSocket client and real HTTP requests; ports
taken by a real listening socket.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from dashboard_fixtures import make_run
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from emascope.dashboard import launch, server

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "emascope.cli", "dashboard", *args]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the launcher and everything it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """``emascope dashboard RUN --no-browser --port P`` until the module's tests are done."""
    run = make_run(tmp_path_factory.mktemp("server"), "r", steps=(1000,), samples=False)
    port = _free_port()
    proc = subprocess.Popen(_command(str(run), "--no-browser", "--port", str(port)), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    try:
        deadline = time.monotonic() + 90
        while not any(x.startswith("emascope dashboard:") for x in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        yield {"port": port, "run": run, "lines": lines}
    finally:
        _stop(proc)


def _ws(port: int, origin: str | None):
    return connect(f"ws://127.0.0.1:{port}/_stcore/stream", origin=origin, open_timeout=20)


def test_websocket_from_another_local_port_is_refused(dashboard):
    port = dashboard["port"]
    announced = next(x for x in dashboard["lines"] if x.startswith("emascope dashboard:"))
    assert announced.strip() == f"emascope dashboard: {dashboard['run']} -> http://localhost:{port}"
    # a page served from localhost on another port (the attack): same host name, other port
    for foreign in (f"http://localhost:{port + 1}", f"http://127.0.0.1:{port - 1}", f"https://localhost:{port}",
                    "http://localhost", "null", f"http://evil.example:{port}"):
        with pytest.raises(InvalidStatus) as err:
            _ws(port, foreign)
        assert err.value.response.status_code == 403, foreign
    # the dashboard's own origins (every name it is served under) are accepted
    for own in (f"http://localhost:{port}", f"http://127.0.0.1:{port}"):
        with _ws(port, own) as ws:
            ws.ping().wait(10)
    deadline = time.monotonic() + 10
    while not any("refused a websocket request" in x and f"localhost:{port + 1}" in x for x in dashboard["lines"]):
        assert time.monotonic() < deadline, "".join(dashboard["lines"])  # the refusal is logged
        time.sleep(0.1)


def test_http_with_a_foreign_origin_is_refused(dashboard):
    port = dashboard["port"]
    url = f"http://127.0.0.1:{port}/_stcore/health"
    with urllib.request.urlopen(url, timeout=20) as r:  # no Origin: a plain page load
        assert r.status == 200
    own = urllib.request.Request(url, headers={"Origin": f"http://localhost:{port}"})
    with urllib.request.urlopen(own, timeout=20) as r:
        assert r.status == 200
    for method in ("GET", "POST"):
        foreign = urllib.request.Request(url, method=method, headers={"Origin": f"http://localhost:{port + 1}"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(foreign, timeout=20)
        assert err.value.code == 403 and b"Origin is not this dashboard's own origin" in err.value.read()


def test_requested_port_taken_is_a_clear_error(tmp_path):
    run = make_run(tmp_path, "r", steps=(1000,), samples=False)
    with socket.socket() as other:  # another server on the requested port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc = subprocess.Popen(_command(str(run), "--no-browser", "--port", str(port)), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            _stop(proc)
    assert proc.returncode == 2
    assert err.strip() == (f"emascope dashboard: port {port} is taken on 127.0.0.1 (another program is listening "
                           "there); choose another with --port, or leave --port out to use the next free port")
    assert "http://" not in out  # never the URL of the other server


def test_next_free_port_when_none_was_asked():
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        a.listen()
        start = a.getsockname()[1]
        assert launch.port_taken("127.0.0.1", start)
        got = launch.choose_port("127.0.0.1", None, start=start)
        assert got > start and not launch.port_taken("127.0.0.1", got)
        b.bind(("127.0.0.1", got))  # the chosen port really is free
    with pytest.raises(launch.PortError, match=f"port {start} is taken on 127.0.0.1"):
        with socket.socket() as c:
            c.bind(("127.0.0.1", start))
            c.listen()
            launch.choose_port("127.0.0.1", start)


def test_own_origins_and_the_check():
    own = server.own_origins(["localhost", "127.0.0.1", "::1", "*.example.com", "Box.LAN."], 8501)
    assert own == {"http://localhost:8501", "http://127.0.0.1:8501", "http://[::1]:8501", "http://box.lan:8501"}
    assert server.origin_allowed([], own) and server.origin_allowed(["http://LOCALHOST:8501"], own)
    assert not server.origin_allowed(["http://localhost:8502"], own)
    assert not server.origin_allowed(["http://localhost:8501", "http://localhost:1"], own)
    assert server.own_origins(["localhost"], 443, "https") == {"https://localhost:443", "https://localhost"}


def test_install_refuses_an_unknown_streamlit_server(monkeypatch):
    from streamlit.web.server.starlette import starlette_server

    monkeypatch.delattr(starlette_server, "create_starlette_app")
    with pytest.raises(RuntimeError, match="does not know the server of Streamlit"):
        server.install()
