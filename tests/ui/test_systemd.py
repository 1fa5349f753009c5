"""`amoskys ui` under systemd: READY, WATCHDOG, SIGHUP (served certificate reloaded), STOPPING, exit 0."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from amoskys import pki
from tests.conftest import TestPki
from tests.ui.conftest import NotifySocket


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    yield sock
    sock.close()


def served_serial(port: int, ca: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    address = ("127.0.0.1", port)
    with (
        socket.create_connection(address, timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=address[0]) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der
    return x509.load_der_x509_certificate(der).serial_number


def test_notify_watchdog_reload_and_stop(tmp_path: Path, test_pki: TestPki, notify: NotifySocket) -> None:
    key, cert = test_pki.issue("ui", "both", ["127.0.0.1"])
    tls = {"ca": str(test_pki.ca_cert), "cert": str(cert), "key": str(key)}
    config = tmp_path / "ui.yml"
    # loopback with TLS: the served certificate is what SIGHUP must replace; the hub is never reached.
    document = {"listen": "127.0.0.1:0", "hub": "127.0.0.1:9", "tls": tls, "server_tls": True}
    config.write_text(yaml.safe_dump(document))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([sys.executable, "-m", "amoskys", "ui", "--config", str(config)], env=env)
    try:
        port = int(notify.wait_for("STATUS=serving on port").rsplit(" ", 1)[1])
        notify.wait_for("WATCHDOG=1", timeout=2)
        first = served_serial(port, test_pki.ca_cert)

        new_key, new_cert = pki.issue(test_pki.ca, tmp_path / "rotated", "ui", "both", ["127.0.0.1"])
        os.replace(new_key, key)
        os.replace(new_cert, cert)
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        notify.wait_for("READY=1")
        assert served_serial(port, test_pki.ca_cert) != first
        assert proc.poll() is None

        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
