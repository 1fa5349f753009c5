"""Serving the UI with cheroot (a production, threaded WSGI server), and the exposure rule.

Bound to a loopback address the UI may run plain HTTP without authentication (an SSH tunnel or a
local reverse proxy in front). Bound to anything else it refuses to start unless it serves TLS
with a certificate from the fleet CA *and* authenticates operators (password or client cert).
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import ssl
import threading
from pathlib import Path
from typing import Any

from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

from amoskys import pki, systemd
from amoskys.config import UiConfig, load_config, parse_address
from amoskys.errors import AmoskysError, ConfigError
from amoskys.logs import setup_logging
from amoskys.ui.app import create_app
from amoskys.ui.auth import Authenticator, LoginLimiter
from amoskys.ui.hubclient import HubClient
from amoskys.ui.metrics import UiMetrics

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "authenticator",
    "build_server",
    "check_exposure",
    "is_loopback",
    "reload",
    "serve",
]

log = logging.getLogger(__name__)
# cheroot reads the request line and headers in 256-byte steps against one budget and stops at it:
# a longer request line is answered 414, longer headers 413, and the connection closed.
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024  # every route is GET: a declared body over this is answered 413 before reading it


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(config: UiConfig) -> None:
    """Raise ConfigError for a public bind without TLS and authentication, or auth that cannot work."""
    host, _port = parse_address(config.listen)
    if config.auth.client_certs and not config.server_tls:
        raise ConfigError("auth.client_certs needs server_tls: true (client certificates are part of TLS)")
    if is_loopback(host):
        return
    missing = []
    if not config.server_tls:
        missing.append("TLS (server_tls: true, with tls.cert from the fleet CA)")
    if not (config.auth.password_hash or config.auth.client_certs):
        missing.append("authentication (auth.password_hash or auth.client_certs)")
    if missing:
        raise ConfigError(
            f"listen {config.listen}: not a loopback address; refusing to serve without {' and '.join(missing)}"
        )


def authenticator(config: UiConfig, metrics: UiMetrics | None = None) -> Authenticator:
    try:
        cns = frozenset(config.auth.client_cns) if config.auth.client_certs else None
        return Authenticator(config.auth.password_hash, cns, LoginLimiter(metrics=metrics))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _tls_adapter(config: UiConfig) -> BuiltinSSLAdapter:
    """Server TLS from a checked identity (chains to the CA, matches its key, not expired)."""
    tls = config.tls
    pki.load_tls_identity(Path(tls.cert), Path(tls.key), Path(tls.ca))
    adapter = BuiltinSSLAdapter(tls.cert, tls.key)
    context: ssl.SSLContext = adapter.context
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.auth.client_certs:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=tls.ca)
    return adapter


# cheroot's default listen backlog is 5: a burst of connections (a password guesser's) filled it, the kernel
# dropped the next SYNs and a logged-in user's page waited for the 1 s SYN retransmission.
LISTEN_BACKLOG = 1024


def build_server(config: UiConfig, app: Any) -> wsgi.Server:
    """A cheroot server for `app` on config.listen (port 0 picks a free port: see bound_port)."""
    check_exposure(config)
    host, port = parse_address(config.listen)
    server = wsgi.Server(
        (host, port), app, numthreads=config.threads, server_name="amoskys-ui", request_queue_size=LISTEN_BACKLOG
    )
    server.max_request_header_size = MAX_HEADER_BYTES
    server.max_request_body_size = MAX_BODY_BYTES
    if config.server_tls:
        server.ssl_adapter = _tls_adapter(config)
    return server


def bound_port(server: wsgi.Server) -> int:
    return int(server.bind_addr[1])


def reload(config_path: Path | None, server: wsgi.Server) -> None:
    """SIGHUP: the logging level and the served TLS certificate (e.g. after a rotation).

    The hub connection and the listen address keep their start-up values (a restart changes them).
    """
    systemd.reloading()
    try:
        fresh = load_config(config_path, UiConfig)
        setup_logging(fresh.logging)
        if server.ssl_adapter is not None:
            tls = fresh.tls
            pki.load_tls_identity(Path(tls.cert), Path(tls.key), Path(tls.ca))
            server.ssl_adapter.context.load_cert_chain(tls.cert, tls.key)
    except AmoskysError as exc:
        log.error("reload failed; keeping the running config", extra={"error": str(exc)})
    else:
        log.info("config reloaded")
    systemd.notify("READY=1")


def serve(config: UiConfig, config_path: Path | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then stop the server and the hub client; SIGHUP reloads. 1 when the
    server thread ended without being asked (systemd restarts the UI), else 0."""
    check_exposure(config)
    metrics = UiMetrics()
    auth = authenticator(config, metrics)
    with HubClient(
        config.hub, config.tls, config.hub_server_name, config.hub_timeout_s, config.refresh_s, metrics
    ) as hub:
        server = build_server(config, create_app(hub, auth))
        server.prepare()
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        signal.signal(signal.SIGHUP, lambda *_: reload(config_path, server))
        thread = threading.Thread(target=server.serve, name="ui-server", daemon=True)
        thread.start()
        systemd.notify("READY=1", f"STATUS=serving on port {bound_port(server)}")
        log.info("ui serving", extra={"listen": config.listen, "port": bound_port(server), "hub": config.hub})
        asked = systemd.wait_while_alive(stop, thread)
        if not asked:
            log.error("the ui server thread ended; exiting")
        systemd.notify("STOPPING=1")
        server.stop()
        thread.join(10)
    log.info("ui stopped")
    return 0 if asked else 1
