"""Who may see the UI: loopback by default, TLS plus authentication anywhere else."""

from __future__ import annotations

import base64
import http.client
import io
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from amoskys.cli import main
from amoskys.config import UiConfig, load_config
from amoskys.errors import ConfigError
from amoskys.ui.app import create_app
from amoskys.ui.auth import Authenticator, LoginLimiter, LoginRefused, hash_password, verify_password
from amoskys.ui.hubclient import HubClient
from amoskys.ui.server import authenticator, check_exposure
from tests.ui.conftest import Fleet, call, running

PASSWORD = "correct horse battery staple"


def basic(password: str, user: str = "ops") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def ui_config(tmp_path: Path, **document: Any) -> UiConfig:
    path = tmp_path / "ui.yml"
    path.write_text(yaml.safe_dump(document))
    return load_config(path, UiConfig, env={})


def test_password_hash_round_trip() -> None:
    encoded = hash_password(PASSWORD)
    assert encoded.startswith("scrypt$32768$8$1$")
    assert verify_password(PASSWORD, encoded)
    assert not verify_password(PASSWORD + "!", encoded)
    assert not verify_password(PASSWORD, "scrypt$1$1$1$xx$yy")
    assert hash_password(PASSWORD) != encoded  # salted
    with pytest.raises(ValueError, match="hash-password"):
        Authenticator("plain-text-password")


def test_password_protects_pages_api_and_static(client: HubClient) -> None:
    app = create_app(client, Authenticator(hash_password(PASSWORD)))
    for path in ("/", "/api/v1/fleet", "/static/style.css"):
        refused = call(app, path)
        assert refused.status == 401
        assert refused.headers["WWW-Authenticate"].startswith("Basic realm=")
        assert refused.headers["X-Content-Type-Options"] == "nosniff"
        assert call(app, path, basic("wrong password")).status == 401
        assert call(app, path, basic(PASSWORD)).status == 200
        assert call(app, path, basic(PASSWORD)).status == 200  # the cached verification
    assert call(app, "/", {"Authorization": "Basic !!!"}).status == 401
    assert call(app, "/", {"Authorization": "Bearer x"}).status == 401


@pytest.mark.parametrize(
    ("document", "refusal"),
    [
        ({"listen": "0.0.0.0:8080"}, "without TLS .* and authentication"),
        ({"listen": "192.0.2.10:8080", "server_tls": True}, "without authentication"),
        ({"listen": "[::]:8080", "auth": {"password_hash": "scrypt$1$1$1$a$b"}}, "without TLS"),
        ({"listen": "ui.example.net:443", "auth": {"client_certs": True}}, "client_certs needs server_tls"),
    ],
)
def test_refuses_public_bind_without_tls_and_auth(tmp_path: Path, document: dict[str, Any], refusal: str) -> None:
    with pytest.raises(ConfigError, match=refusal):
        check_exposure(ui_config(tmp_path, **document))


@pytest.mark.parametrize(
    "document",
    [
        {"listen": "127.0.0.1:8080"},
        {"listen": "[::1]:8080"},
        {"listen": "localhost:8080"},
        {"listen": "0.0.0.0:8443", "server_tls": True, "auth": {"password_hash": "scrypt$1$1$1$a$b"}},
        {"listen": "0.0.0.0:8443", "server_tls": True, "auth": {"client_certs": True}},
    ],
)
def test_allows_loopback_or_tls_with_auth(tmp_path: Path, document: dict[str, Any]) -> None:
    check_exposure(ui_config(tmp_path, **document))


def test_cli_refuses_public_bind_before_touching_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ui.yml"
    config.write_text(yaml.safe_dump({"listen": "0.0.0.0:0", "tls": {"ca": "/nonexistent"}}))
    assert main(["ui", "--config", str(config)]) == 2
    assert "refusing to serve without TLS" in capsys.readouterr().err


def test_cli_hash_password(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["ui", "hash-password", "--stdin"]) == 0
    assert verify_password(PASSWORD, capsys.readouterr().out.strip())
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert main(["ui", "hash-password", "--stdin"]) == 2


def https_get(port: int, ca: str, path: str = "/", cert: tuple[str, str] | None = None, **headers: str) -> int:
    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(*cert)
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def tls_config(tmp_path: Path, seeded: Fleet, name: str, **document: Any) -> UiConfig:
    key, cert = seeded.hub.live.pki.issue(name, "server", ["localhost", "127.0.0.1"])
    tls = {"ca": str(seeded.hub.live.pki.ca_cert), "cert": str(cert), "key": str(key)}
    return ui_config(tmp_path, listen="0.0.0.0:0", server_tls=True, tls=tls, **document)


def test_public_https_with_password(tmp_path: Path, seeded: Fleet, client: HubClient) -> None:
    config = tls_config(tmp_path, seeded, "ui-web-password", auth={"password_hash": hash_password(PASSWORD)})
    with running(config, create_app(client, authenticator(config))) as port:
        ca = config.tls.ca
        assert https_get(port, ca) == 401
        assert https_get(port, ca, **basic("nope")) == 401
        assert https_get(port, ca, **basic(PASSWORD)) == 200
        with pytest.raises(ssl.SSLError):
            https_get(port, str(Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")))


def test_public_https_with_client_certificates(tmp_path: Path, seeded: Fleet, client: HubClient) -> None:
    config = tls_config(tmp_path, seeded, "ui-web-certs", auth={"client_certs": True, "client_cns": ["operator"]})
    live = seeded.hub.live
    operator, agent = live.consumer_tls("operator"), live.consumer_tls("web1-proc-x")
    with running(config, create_app(client, authenticator(config))) as port:
        assert https_get(port, config.tls.ca, "/api/v1/fleet", (operator.cert, operator.key)) == 200
        assert https_get(port, config.tls.ca, "/", (agent.cert, agent.key)) == 401  # from our CA, CN not allowed
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_get(port, config.tls.ca)  # no certificate: the handshake fails


def test_production_server_on_loopback(tmp_path: Path, client: HubClient) -> None:
    config = ui_config(tmp_path, listen="127.0.0.1:0")
    with running(config, create_app(client)) as port:
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{port}/hub').status)",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert result.stdout.strip() == "200"


class Clock:
    """A clock the test moves by hand (the limiter's time source)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_login_limiter_counts_failures_per_address_and_refills() -> None:
    clock = Clock()
    limiter = LoginLimiter(burst=3, refill_s=10, slots=1, clock=clock)
    for _ in range(3):
        assert not limiter.attempt("192.0.2.1", lambda: False)
    with pytest.raises(LoginRefused) as refused:
        limiter.attempt("192.0.2.1", lambda: True)  # refused before the check: even a right password waits
    assert (refused.value.status, refused.value.retry_after_s) == (429, 10)
    assert limiter.attempt("192.0.2.2", lambda: True)  # another address is not affected
    clock.now += 10
    assert not limiter.attempt("192.0.2.1", lambda: False)  # one refilled
    with pytest.raises(LoginRefused):
        limiter.attempt("192.0.2.1", lambda: False)
    for _ in range(10):
        assert limiter.attempt("192.0.2.3", lambda: True)  # right passwords cost no allowance


def test_login_limiter_groups_ipv6_by_64_and_caps_concurrent_checks() -> None:
    limiter = LoginLimiter(burst=2, refill_s=60, slots=1)
    assert not limiter.attempt("2001:db8::1", lambda: False)
    assert not limiter.attempt("2001:db8::ffff:2", lambda: False)
    with pytest.raises(LoginRefused, match="2001:db8::/64"):
        limiter.attempt("2001:db8::3", lambda: False)
    assert not limiter.attempt("::ffff:192.0.2.7", lambda: False)
    assert not limiter.attempt("192.0.2.7", lambda: False)
    with pytest.raises(LoginRefused, match=r"from 192\.0\.2\.7:"):  # a mapped IPv4 address is that address
        limiter.attempt("::ffff:192.0.2.7", lambda: False)

    def nested() -> bool:  # a second check while the only slot is taken
        with pytest.raises(LoginRefused) as busy:
            limiter.attempt("198.51.100.9", lambda: True)
        assert (busy.value.status, busy.value.retry_after_s) == (503, 1)
        return True

    assert limiter.attempt("198.51.100.8", nested)
    assert limiter.attempt("198.51.100.9", lambda: True)  # the refused one got its token back


def test_refused_login_is_429_with_retry_after(client: HubClient) -> None:
    app = create_app(client, Authenticator(hash_password(PASSWORD), limiter=LoginLimiter(burst=1, refill_s=30)))
    assert call(app, "/", basic("wrong")).status == 401
    refused = call(app, "/api/v1/fleet", basic(PASSWORD))
    assert refused.status == 429
    assert 25 <= int(refused.headers["Retry-After"]) <= 30  # a whole refill, less the time scrypt took
    assert "too many failed logins" in refused.json()["error"]
