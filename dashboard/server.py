"""Streamlit's own server for the dashboard, with an exact-origin check in front of it.

``emascope dashboard`` (:mod:`emascope.dashboard.launch`) runs ``python -m
emascope.dashboard.server run dashboard/app.py --server.* ... -- PATH``: this module installs two
small hooks, then hands the command line to Streamlit's own CLI (``streamlit.web.cli.main``),
which starts Streamlit's bootstrap and server unchanged.

**What is patched and why** (checked against the installed Streamlit, 1.67: a Starlette app
served by uvicorn; there is no Tornado in this version):

1. Streamlit's WebSocket endpoint (``starlette_websocket._is_origin_allowed``) accepts an
   ``Origin`` whose ``host:port`` equals the request's ``Host`` header, and otherwise any origin
   whose *host name* is allowed (``server_util.is_url_from_allowed_origins``: ``localhost``,
   ``127.0.0.1``, the machine's own addresses): the port is never compared, so a page served from
   ``http://localhost:ANY_PORT`` can open the dashboard's WebSocket, read the runs and press
   Export. We wrap the ASGI application that ``starlette_server.create_starlette_app`` returns
   (the one name replaced, in ``streamlit.web.server.starlette.starlette_server``) in
   :class:`OriginGuard`: every HTTP request and WebSocket handshake that carries an ``Origin``
   header must carry exactly one of the server's own origins, ``scheme://host:port`` for each
   name in ``server.allowedHosts`` and the port the server actually bound. Anything else gets
   HTTP 403 (a WebSocket is closed with 1008 before it is accepted, which uvicorn answers with
   403) and a warning in the log. Requests without ``Origin`` (a browser's own page loads, curl)
   pass: a process on this machine can read the run directory anyway.
2. ``bootstrap._on_server_start`` is wrapped to print ``emascope dashboard: PATH -> URL`` (and
   open the browser when asked) once *this* server listens, with the port read back from
   Streamlit's config after the bind, so the launcher never announces another program's server.

If the installed Streamlit lacks either name, :func:`install` raises ``RuntimeError`` and the
dashboard does not start (never unguarded). Standard library only at import time.
"""

from __future__ import annotations

import logging
import os
import sys
import webbrowser
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from emascope.dashboard.launch import ENV_OPEN_BROWSER, ENV_PATH, url_for

_LOG = logging.getLogger("emascope.dashboard.server")
_REFUSED = b"emascope dashboard: request refused: its Origin is not this dashboard's own origin\n"


def own_origins(hosts: Iterable[str], port: int, scheme: str = "http") -> frozenset[str]:
    """The exact origins of a server reachable as ``scheme://HOST:port`` for each of ``hosts``.

    Host names are lower-cased, IPv6 addresses bracketed; wildcard patterns (``*``) are
    skipped (they name no origin). The default port of the scheme (80, 443) also matches the
    origin without a port, as browsers send it.
    """
    out = set()
    for h in hosts:
        h = str(h).strip().lower().rstrip(".")
        if not h or "*" in h or h in ("0.0.0.0", "::"):
            continue
        hh = f"[{h}]" if ":" in h and not h.startswith("[") else h
        out.add(f"{scheme}://{hh}:{int(port)}")
        if (scheme, int(port)) in (("http", 80), ("https", 443)):
            out.add(f"{scheme}://{hh}")
    return frozenset(out)


def origin_allowed(origins: Sequence[str], own: frozenset[str]) -> bool:
    """True when no ``Origin`` header was sent, or every one sent is exactly one of ``own``."""
    return all(o.strip().lower() in own for o in origins)


def _origins_of(scope: dict[str, Any]) -> list[str]:
    return [v.decode("latin-1") for k, v in scope.get("headers") or () if k.lower() == b"origin"]


class OriginGuard:
    """ASGI middleware: refuse HTTP requests and WebSocket handshakes from any foreign origin.

    ``origins()`` returns the server's own origins (read when a request comes: the port is known
    only after the bind). Lifespan and other scopes pass through untouched.
    """

    def __init__(self, app: Callable, origins: Callable[[], frozenset[str]]) -> None:
        self.app = app
        self.origins = origins

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        kind = scope.get("type")
        if kind in ("http", "websocket"):
            sent = _origins_of(scope)
            if sent and not origin_allowed(sent, self.origins()):
                _LOG.warning("refused a %s request to %s from origin %s (this dashboard serves only %s)",
                             kind, scope.get("path"), ", ".join(repr(o) for o in sent),
                             ", ".join(sorted(self.origins())))
                if kind == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                else:
                    await send({"type": "http.response.start", "status": 403,
                                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                            (b"content-length", str(len(_REFUSED)).encode())]})
                    await send({"type": "http.response.body", "body": _REFUSED})
                return
        await self.app(scope, receive, send)


def current_origins() -> frozenset[str]:
    """The running Streamlit server's own origins, from its config (allowed hosts, bound port, TLS)."""
    from streamlit import config

    scheme = "https" if config.get_option("server.sslCertFile") else "http"
    return own_origins(config.get_option("server.allowedHosts") or (), int(config.get_option("server.port")), scheme)


def announce() -> None:
    """Print where this server listens (and open a browser tab when the launcher asked)."""
    from streamlit import config

    url = url_for(str(config.get_option("server.address") or "127.0.0.1"), int(config.get_option("server.port")))
    print(f"emascope dashboard: {os.environ.get(ENV_PATH, '')} -> {url}", flush=True)
    if os.environ.get(ENV_OPEN_BROWSER) == "1":
        webbrowser.open(url)


def install() -> None:
    """Put :class:`OriginGuard` in front of Streamlit's app and the announcement after its start.

    Idempotent. ``RuntimeError`` when the installed Streamlit does not have the two names this
    relies on (see the module docstring): the dashboard then refuses to start.
    """
    import streamlit
    from streamlit.web import bootstrap

    try:
        from streamlit.web.server.starlette import starlette_server
    except ImportError:
        starlette_server = None
    create = getattr(starlette_server, "create_starlette_app", None)
    on_start = getattr(bootstrap, "_on_server_start", None)
    if create is None or on_start is None:
        raise RuntimeError(
            f"emascope's dashboard does not know the server of Streamlit {streamlit.__version__} (it needs "
            "streamlit.web.server.starlette.starlette_server.create_starlette_app and "
            "streamlit.web.bootstrap._on_server_start to check origins); install a Streamlit it supports "
            "(see pyproject.toml)")
    if getattr(create, "emascope_guarded", False):
        return

    def guarded_app(runtime: Any) -> OriginGuard:
        return OriginGuard(create(runtime), current_origins)

    def started(server: Any) -> None:
        on_start(server)
        announce()

    guarded_app.emascope_guarded = True  # type: ignore[attr-defined]
    starlette_server.create_starlette_app = guarded_app
    bootstrap._on_server_start = started


def _configure_logging() -> None:
    log = logging.getLogger("emascope")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m emascope.dashboard.server run APP [streamlit options] -- PATH``."""
    _configure_logging()
    install()
    from streamlit.web import cli

    sys.argv = ["streamlit", *(sys.argv[1:] if argv is None else argv)]
    cli.main(prog_name="streamlit")


if __name__ == "__main__":
    main()
