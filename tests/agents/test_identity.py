"""The agent's own identity checks (ssl + PyNaCl): same verdicts as the hub would reach, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from amoskys import envelope, keys, pki
from amoskys.agents.runtime.identity import check_tls_identity, client_tls_context, load_signer
from amoskys.config import TlsConfig
from amoskys.errors import IdentityError
from amoskys.v1 import events_pb2
from tests.conftest import TestPki


def tls_for(test_pki: TestPki, cert: Path, key: Path) -> TlsConfig:
    return TlsConfig(ca=str(test_pki.ca_cert), cert=str(cert), key=str(key))


def test_signatures_match_cryptography_and_verify_at_the_hub(tmp_path: Path) -> None:
    path = tmp_path / "sign.key"
    reference = keys.generate_signing_key()
    keys.write_private_key(path, reference)
    signer = load_signer(path)
    message = b"amoskys test message"
    assert signer.sign(message) == reference.sign(message)  # Ed25519 is deterministic
    sealed, _ = envelope.seal("agent-1", events_pb2.EventBatch(), envelope.ChainState.fresh(), signer)
    envelope.verify_signature(sealed, reference.public_key())


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p.chmod(0o644), "chmod 600"),
        (lambda p: p.unlink(), "private key not found"),
        (
            lambda p: p.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
            "not an unencrypted",
        ),
        (lambda p: (p.unlink(), keys.write_private_key(p, keys.generate_tls_key())), "not an unencrypted PEM Ed25519"),
    ],
)
def test_bad_signing_keys_are_refused(tmp_path: Path, setup: object, message: str) -> None:
    path = tmp_path / "sign.key"
    keys.write_private_key(path, keys.generate_signing_key())
    setup(path)  # type: ignore[operator]
    with pytest.raises(IdentityError, match=message):
        load_signer(path)


def test_a_good_identity_passes(test_pki: TestPki) -> None:
    key, cert = test_pki.issue("web1-proc")
    check_tls_identity(tls_for(test_pki, cert, key), "web1-proc")


def test_expired_certificate(test_pki: TestPki) -> None:
    key, cert = test_pki.issue("web1-proc", days=0)
    with pytest.raises(IdentityError, match="certificate has expired"):
        check_tls_identity(tls_for(test_pki, cert, key), "web1-proc")


def test_certificate_from_another_ca(test_pki: TestPki, tmp_path: Path) -> None:
    other = pki.init_ca(tmp_path / "other")
    key, cert = pki.issue(other, tmp_path / "o", "web1-proc", "client", [])
    with pytest.raises(IdentityError, match="unable to get local issuer certificate"):
        check_tls_identity(tls_for(test_pki, cert, key), "web1-proc")


def test_server_only_certificate_is_not_a_client_identity(test_pki: TestPki) -> None:
    key, cert = test_pki.issue("web1-proc", usage="server")
    with pytest.raises(IdentityError, match="unsuitable certificate purpose"):
        check_tls_identity(tls_for(test_pki, cert, key), "web1-proc")


def test_mismatched_key(test_pki: TestPki) -> None:
    key_a, _ = test_pki.issue("a")
    _, cert_b = test_pki.issue("web1-proc")
    with pytest.raises(IdentityError, match="does not match its private key"):
        check_tls_identity(tls_for(test_pki, cert_b, key_a), "web1-proc")


def test_certificate_of_another_agent(test_pki: TestPki) -> None:
    key, cert = test_pki.issue("web1-host")
    with pytest.raises(IdentityError, match="CN 'web1-host' is not this agent's id 'web1-proc'"):
        check_tls_identity(tls_for(test_pki, cert, key), "web1-proc")


def test_missing_files_and_unsafe_key(test_pki: TestPki, tmp_path: Path) -> None:
    key, cert = test_pki.issue("web1-proc")
    with pytest.raises(IdentityError, match="certificate not found"):
        check_tls_identity(tls_for(test_pki, tmp_path / "none.crt", key), "web1-proc")
    tls = TlsConfig(ca=str(tmp_path / "none-ca.crt"), cert=str(cert), key=str(key))
    with pytest.raises(IdentityError, match="CA certificate not found"):
        check_tls_identity(tls, "web1-proc")
    (tmp_path / "garbage.crt").write_text("not a certificate\n")
    with pytest.raises(IdentityError, match="not a PEM certificate"):
        check_tls_identity(tls_for(test_pki, tmp_path / "garbage.crt", key), "web1-proc")
    key.chmod(0o640)
    with pytest.raises(IdentityError, match="chmod 600"):
        check_tls_identity(tls_for(test_pki, cert, key), "web1-proc")


def test_the_client_context_is_built_once_per_version_of_the_files(test_pki: TestPki) -> None:
    """Reconnects reuse the context; a rotated certificate (a new file) gives a new one."""
    key, cert = test_pki.issue("web1-ctx")
    tls = tls_for(test_pki, cert, key)
    first = client_tls_context(tls)
    assert client_tls_context(tls) is first
    os.utime(cert, ns=(cert.stat().st_atime_ns, cert.stat().st_mtime_ns + 1_000_000_000))  # as a rotation rewrites it
    assert client_tls_context(tls) is not first
