"""PKI: keys born 0600, certs that openssl accepts, loud refusals."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from amoskys import keys, pki
from amoskys.cli import main
from amoskys.errors import IdentityError
from tests.conftest import TestPki


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_key_is_0600_and_ca_refuses_to_be_replaced(test_pki: TestPki) -> None:
    assert mode(test_pki.ca_dir / "ca.key") == 0o600
    assert mode(test_pki.ca_dir) == 0o700
    with pytest.raises(IdentityError, match="already exists"):
        pki.init_ca(test_pki.ca_dir)


def test_keys_are_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0)
    try:
        keys.write_private_key(tmp_path / "k", keys.generate_signing_key())
    finally:
        os.umask(old)
    assert mode(tmp_path / "k") == 0o600


def test_csr_flow_writes_the_private_key_only_at_its_path(tmp_path: Path, test_pki: TestPki) -> None:
    host_dir = tmp_path / "host"
    assert (
        main(
            [
                "pki",
                "csr",
                "--cn",
                "web1",
                "--key",
                str(host_dir / "tls.key"),
                "--out",
                str(host_dir / "tls.csr"),
                "--san",
                "10.0.0.5",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "pki",
                "sign",
                "--ca-dir",
                str(test_pki.ca_dir),
                "--csr",
                str(host_dir / "tls.csr"),
                "--out",
                str(host_dir / "tls.crt"),
                "--usage",
                "server",
            ]
        )
        == 0
    )
    holders = [p for p in tmp_path.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert sorted(holders) == sorted([host_dir / "tls.key", test_pki.ca_dir / "ca.key"])
    assert mode(host_dir / "tls.key") == 0o600
    cert = pki.load_certificate(host_dir / "tls.crt")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "web1" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
@pytest.mark.parametrize(("usage", "purpose"), [("server", "sslserver"), ("client", "sslclient")])
def test_openssl_verifies_signed_certs(test_pki: TestPki, usage: pki.Usage, purpose: str) -> None:
    _, cert = test_pki.issue(f"n-{usage}", usage)
    result = subprocess.run(
        ["openssl", "verify", "-purpose", purpose, "-CAfile", str(test_pki.ca_cert), str(cert)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")


def test_check_passes_then_fails_on_days_left(test_pki: TestPki, capsys: pytest.CaptureFixture[str]) -> None:
    key, cert = test_pki.issue("agent", days=10)
    args = ["pki", "check", "--cert", str(cert), "--ca", str(test_pki.ca_cert), "--key", str(key)]
    assert main([*args, "--days", "5"]) == 0
    assert main([*args, "--days", "20"]) == 1
    assert "fewer than 20" in capsys.readouterr().out


def test_check_fails_for_another_ca(tmp_path: Path, test_pki: TestPki) -> None:
    other = pki.init_ca(tmp_path / "other")
    _, cert = pki.issue(other, tmp_path / "o", "stranger", "client", [])
    assert main(["pki", "check", "--cert", str(cert), "--ca", str(test_pki.ca_cert)]) == 1


def test_expired_cert_is_refused(test_pki: TestPki) -> None:
    key, cert = test_pki.issue("old", days=0)
    with pytest.raises(IdentityError, match="expired"):
        pki.load_tls_identity(cert, key, test_pki.ca_cert)


def test_mismatched_key_is_refused(test_pki: TestPki) -> None:
    key_a, _ = test_pki.issue("a")
    _, cert_b = test_pki.issue("b")
    with pytest.raises(IdentityError, match="does not match"):
        pki.load_tls_identity(cert_b, key_a, test_pki.ca_cert)


def test_world_readable_key_is_refused(test_pki: TestPki) -> None:
    key, cert = test_pki.issue("loose")
    key.chmod(0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        pki.load_tls_identity(cert, key, test_pki.ca_cert)


def test_missing_files_are_named(tmp_path: Path, test_pki: TestPki) -> None:
    key, cert = test_pki.issue("x")
    with pytest.raises(IdentityError, match="private key not found"):
        pki.load_tls_identity(cert, tmp_path / "nope.key", test_pki.ca_cert)
    with pytest.raises(IdentityError, match="certificate not found"):
        pki.load_tls_identity(tmp_path / "nope.crt", key, test_pki.ca_cert)


def test_revocation_list_accumulates_and_is_ca_signed(tmp_path: Path, test_pki: TestPki) -> None:
    crl = tmp_path / "crl.pem"
    _, cert_a = test_pki.issue("a")
    _, cert_b = test_pki.issue("b")
    assert main(["pki", "revoke", "--ca-dir", str(test_pki.ca_dir), "--crl", str(crl), "--cert", str(cert_a)]) == 0
    assert main(["pki", "revoke", "--ca-dir", str(test_pki.ca_dir), "--crl", str(crl), "--cert", str(cert_b)]) == 0
    revoked = pki.load_crl(crl, test_pki.ca.cert)
    assert revoked == {pki.load_certificate(c).serial_number for c in (cert_a, cert_b)}
    other = pki.init_ca(tmp_path / "other")
    with pytest.raises(IdentityError, match="not signed by the configured CA"):
        pki.load_crl(crl, other.cert)


def test_keygen_and_trust_map_forms(tmp_path: Path) -> None:
    assert main(["pki", "keygen", "--out", str(tmp_path / "agent1.key")]) == 0
    assert mode(tmp_path / "agent1.key") == 0o600
    pub_text = (tmp_path / "agent1.key.pub").read_text().strip()
    trust_dir = tmp_path / "trust"
    trust_dir.mkdir()
    (trust_dir / "web1-proc.pub").write_text(pub_text + "\n")
    (trust_dir / "lab.yml").write_text(f"collector-7: {{key: '{pub_text}', host: db1, kind: snmp}}\n")
    (tmp_path / "trust.yml").write_text(
        f"web1-proc: '{pub_text}'\ncollector-7: {{key: '{pub_text}', host: db1, kind: snmp}}\n"
    )
    signing = keys.load_signing_key(tmp_path / "agent1.key")
    for source in (trust_dir, tmp_path / "trust.yml"):
        loaded = keys.read_trust_map(source)
        assert sorted(loaded) == ["collector-7", "web1-proc"]
        assert (loaded["web1-proc"].host, loaded["web1-proc"].kind) == ("web1", "proc")
        assert (loaded["collector-7"].host, loaded["collector-7"].kind) == ("db1", "snmp")
        loaded["web1-proc"].key.verify(signing.sign(b"m"), b"m")


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ("agent1: 'ed25519:not-base64!'", "agent1"),
        ("collector: 'ed25519:AAAA'", "cannot tell the host and kind of 'collector'"),
        ("web1-gpu: 'ed25519:AAAA'", "cannot tell the host and kind of 'web1-gpu'"),
        ("x: {key: 'ed25519:AAAA', host: web1, kind: eventbus}", "kind one of"),
        ("x: {key: 'ed25519:AAAA', host: '', kind: proc}", "non-empty host"),
        ("- a list", "mapping"),
    ],
)
def test_bad_trust_map_entries_are_named(tmp_path: Path, entry: str, complaint: str) -> None:
    (tmp_path / "trust.yml").write_text(entry + "\n")
    with pytest.raises(IdentityError, match=re.escape(complaint)):
        keys.read_trust_map(tmp_path / "trust.yml")


def test_existing_key_is_not_overwritten(tmp_path: Path) -> None:
    assert main(["pki", "keygen", "--out", str(tmp_path / "k")]) == 0
    before = (tmp_path / "k").read_bytes()
    assert main(["pki", "keygen", "--out", str(tmp_path / "k")]) == 2
    assert (tmp_path / "k").read_bytes() == before
