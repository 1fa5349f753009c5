"""PKI: keys born 0600, certs that openssl accepts, loud refusals."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import sys
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


def test_check_several_certs_in_one_run(tmp_path: Path, test_pki: TestPki, capsys: pytest.CaptureFixture[str]) -> None:
    good_key, good = test_pki.issue("agent-a")
    other_key, other = test_pki.issue("agent-b")
    _, stranger = pki.issue(pki.init_ca(tmp_path / "other"), tmp_path / "o", "stranger", "client", [])
    ca = ["--ca", str(test_pki.ca_cert), "--days", "5"]
    assert main(["pki", "check", *ca, "--cert", str(good), "--key", str(good_key), "--cert", str(other),
                 "--key", str(other_key)]) == 0  # fmt: skip
    assert main(["pki", "check", *ca, "--cert", str(stranger), "--cert", str(good)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["OK", "OK", "FAIL", "OK"]
    assert lines[2].startswith(f"FAIL {stranger}: ")
    assert main(["pki", "check", *ca, "--cert", str(good), "--cert", str(tmp_path / "gone.crt")]) == 2
    assert capsys.readouterr().out == ""  # unreadable input: nothing checked
    assert main(["pki", "check", *ca, "--cert", str(good), "--cert", str(other), "--key", str(good_key)]) == 2
    assert "one per --cert" in capsys.readouterr().err


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


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A CA, a CSR and its key, a signing key, and the awkward things a bad argument can point at."""
    assert main(["pki", "init-ca", "--dir", str(tmp_path / "ca"), "--days", "36500"]) == 0
    host = tmp_path / "host"
    assert main(["pki", "csr", "--cn", "web1", "--key", str(host / "web1.key"), "--out", str(host / "web1.csr")]) == 0
    assert main(["pki", "keygen", "--out", str(tmp_path / "existing.key")]) == 0
    (tmp_path / "adir").mkdir()
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    (tmp_path / "afile").write_text("just text\n")
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    (tmp_path / "issued").mkdir()
    (tmp_path / "issued" / "esc.crt").symlink_to(tmp_path / "adir" / "victim.crt")
    (tmp_path / "loose.key").write_bytes((tmp_path / "existing.key").read_bytes())
    (tmp_path / "loose.key").chmod(0o644)
    return tmp_path


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under `root` with its mode and content (a symlink: its target)."""
    state = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        content = b""
        if path.is_symlink():
            content = str(path.readlink()).encode()
        elif path.is_file():
            content = path.read_bytes()
        state[str(path.relative_to(root))] = (info.st_mode, content)
    return state


CN_RULE = "is not a valid identity: expected 1-64 letters, digits"
LONG = "a" * 65
# (argv with {w} for the work directory, what the one error line says); every case exits 2 and writes nothing.
BAD_PKI_ARGS = [
    ("init-ca --dir {w}/new --cn=", "CA common name '' is not valid"),
    (f"init-ca --dir {{w}}/new --cn {'C' * 65}", "CA common name 'CCC"),
    ("init-ca --dir {w}/new --days -1", "-1 days is out of range: expected 1 to 36500"),
    ("init-ca --dir {w}/new --days 0", "0 days is out of range: expected 1 to 36500"),
    ("init-ca --dir {w}/new --days 36501", "36501 days is out of range"),
    ("init-ca --dir {w}/open", "{w}/open: writable by group/others (mode 0777); refusing to keep a CA key there"),
    ("init-ca --dir {w}/afile", "{w}/afile: not a directory"),
    ("init-ca --dir {w}/ca", "{w}/ca: a CA already exists there"),
    ("init-ca --dir /proc/amoskys-ca", "/proc/amoskys-ca: cannot create CA directory"),
    ("csr --cn=../x --key {w}/n.key --out {w}/n.csr", f"common name '../x' {CN_RULE}"),
    ("csr --cn={w}/abs --key {w}/n.key --out {w}/n.csr", f"common name '{{w}}/abs' {CN_RULE}"),
    ("csr --cn= --key {w}/n.key --out {w}/n.csr", f"common name '' {CN_RULE}"),
    ("csr --cn=.. --key {w}/n.key --out {w}/n.csr", f"common name '..' {CN_RULE}"),
    (f"csr --cn={LONG} --key {{w}}/n.key --out {{w}}/n.csr", f"common name '{LONG}' {CN_RULE}"),
    ("csr --cn=web2 --san=a/b --key {w}/n.key --out {w}/n.csr", "subject alt name 'a/b' is neither an IP address"),
    ("csr --cn web2 --key {w}/existing.key --out {w}/n.csr", "{w}/existing.key: a file already exists there"),
    ("csr --cn web2 --key {w}/n.key --out {w}/adir", "{w}/adir: cannot write: Is a directory"),
    ("csr --cn web2 --key {w}/n.key --out {w}/n.key", "{w}/n.key: the CSR must not be written over its own key"),
    ("sign --ca-dir {w}/ca --csr {w}/host/web1.csr --out {w}/o.crt --days 0", "0 days is out of range"),
    ("sign --ca-dir {w}/ca --csr {w}/host/web1.csr --out {w}/o.crt --days 100000", "100000 days is out of range"),
    ("sign --ca-dir {w}/ca --csr {w}/host/web1.csr --out {w}/o.crt --san=", "subject alt name '' is neither"),
    ("sign --ca-dir {w}/ca --csr {w}/host/web1.csr --out {w}/o.crt --san fe80::1%eth0", "holds no zone (%eth0)"),
    ("sign --ca-dir {w}/ca --csr {w}/host/web1.csr --out {w}/adir", "{w}/adir: cannot write: Is a directory"),
    ("sign --ca-dir {w}/ca --csr {w}/host/web1.csr --out {w}/ca/ca.key", "{w}/ca/ca.key: holds a private key"),
    ("sign --ca-dir {w}/ca --csr {w}/nope.csr --out {w}/o.crt", "{w}/nope.csr: CSR not found"),
    ("sign --ca-dir {w}/ca --csr {w}/afile --out {w}/o.crt", "not a PEM certificate signing request"),
    ("sign --ca-dir {w}/ca --csr /dev/zero --out {w}/o.crt", "/dev/zero: larger than 16 MiB; not a CSR"),
    ("check --cert /dev/zero --ca {w}/ca/ca.crt", "/dev/zero: larger than 16 MiB; not a certificate"),
    ("sign --ca-dir {w}/nope --csr {w}/host/web1.csr --out {w}/o.crt", "{w}/nope/ca.key: private key not found"),
    ("issue --ca-dir {w}/ca --cn=../x --dir {w}/issued", f"common name '../x' {CN_RULE}"),
    ("issue --ca-dir {w}/ca --cn={w}/abs --dir {w}/issued", f"common name '{{w}}/abs' {CN_RULE}"),
    ("issue --ca-dir {w}/ca --cn= --dir {w}/issued", f"common name '' {CN_RULE}"),
    (f"issue --ca-dir {{w}}/ca --cn={LONG} --dir {{w}}/issued", f"common name '{LONG}' {CN_RULE}"),
    ("issue --ca-dir {w}/ca --cn=web2 --dir {w}/issued --days 100000", "100000 days is out of range"),
    ("issue --ca-dir {w}/ca --cn=web2 --dir {w}/issued --days -5", "-5 days is out of range"),
    ("issue --ca-dir {w}/ca --cn=web2 --dir {w}/issued --san=ü.example", "subject alt name 'ü.example' is neither"),
    ("issue --ca-dir {w}/ca --cn=existing --dir {w}", "{w}/existing.key: a file already exists there"),
    ("issue --ca-dir {w}/ca --cn=esc --dir {w}/issued", "{w}/issued/esc.crt: resolves outside {w}/issued"),
    ("keygen --out {w}/existing.key", "{w}/existing.key: a file already exists there"),
    ("keygen --out {w}/adir", "{w}/adir: a file already exists there"),
    ("keygen --out /proc/amoskys/k", "/proc/amoskys: cannot create directory"),
    ("pubkey {w}/nope.key", "{w}/nope.key: private key not found"),
    ("pubkey {w}/host/web1.key", "{w}/host/web1.key: not an Ed25519 signing key"),
    ("pubkey {w}/loose.key", "{w}/loose.key: private key is accessible to group/others (mode 0644)"),
    ("check --cert {w}/ca/ca.crt --ca {w}/ca/ca.crt --days -1", "-1 days is out of range: expected 0 to 36500"),
    ("check --cert {w}/adir --ca {w}/ca/ca.crt", "{w}/adir: cannot read certificate: Is a directory"),
    ("check --cert {w}/garbage.pem --ca {w}/ca/ca.crt", "{w}/garbage.pem: not a PEM certificate"),
    ("revoke --ca-dir {w}/ca --crl {w}/crl.pem --serial -1", "serial -0x1 is not a certificate serial"),
    ("revoke --ca-dir {w}/ca --crl {w}/crl.pem --serial 0", "serial 0x0 is not a certificate serial"),
    (f"revoke --ca-dir {{w}}/ca --crl {{w}}/crl.pem --serial {1 << 159:#x}", "is not a certificate serial"),
    ("revoke --ca-dir {w}/ca --crl {w}/crl.pem", "nothing to revoke: give --cert or --serial"),
    ("revoke --ca-dir {w}/ca --crl {w}/adir --serial 5", "{w}/adir: cannot read revocation list: Is a directory"),
    ("revoke --ca-dir {w}/ca --crl {w}/afile --serial 5", "{w}/afile: not a PEM certificate revocation list"),
    ("revoke --ca-dir {w}/ca --crl {w}/crl.pem --cert {w}/nope.crt", "{w}/nope.crt: certificate not found"),
]
# Refused by argparse itself: exit 2, the usage, then one error line naming the argument.
BAD_PKI_SYNTAX = [
    ("init-ca --dir {w}/new --days soon", "argument --days: invalid int value: 'soon'"),
    ("issue --ca-dir {w}/ca --cn web2 --dir {w}/issued --usage root", "argument --usage: invalid choice: 'root'"),
    ("revoke --ca-dir {w}/ca --crl {w}/crl.pem --serial zz", "argument --serial: invalid serial_number value: 'zz'"),
    ("sign --ca-dir {w}/ca --out {w}/o.crt", "the following arguments are required: --csr"),
]


@pytest.mark.parametrize(("argv", "error"), BAD_PKI_ARGS, ids=[case[0].split(" --")[0] for case in BAD_PKI_ARGS])
def test_bad_pki_arguments_are_refused_in_one_line_and_write_nothing(
    work: Path, capsys: pytest.CaptureFixture[str], argv: str, error: str
) -> None:
    before = snapshot(work)
    capsys.readouterr()
    assert main(["pki", *argv.format(w=work).split(" ")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("amoskys pki: error: "), err
    assert error.format(w=work) in err, err
    assert snapshot(work) == before


@pytest.mark.parametrize(("argv", "error"), BAD_PKI_SYNTAX)
def test_bad_pki_syntax_is_a_usage_error(work: Path, capsys: pytest.CaptureFixture[str], argv: str, error: str) -> None:
    before = snapshot(work)
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        main(["pki", *argv.format(w=work).split(" ")])
    assert caught.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[-1].startswith(f"amoskys pki {argv.split(' ', 1)[0]}: error: {error}"), err
    assert snapshot(work) == before


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_a_csr_made_elsewhere_with_a_path_for_a_name_is_refused(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
         str(work / "evil.key"), "-subj", r"/CN=..\/x", "-out", str(work / "evil.csr")],
        check=True, capture_output=True,
    )  # fmt: skip
    before = snapshot(work)
    argv = ["pki", "sign", "--ca-dir", str(work / "ca"), "--csr", str(work / "evil.csr"), "--out", str(work / "o")]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"amoskys pki: error: CSR common name '../x' {CN_RULE}")
    assert snapshot(work) == before


def test_init_ca_leaves_an_existing_directory_as_it_is(tmp_path: Path) -> None:
    existing = tmp_path / "shared"
    existing.mkdir()
    existing.chmod(0o750)
    assert main(["pki", "init-ca", "--dir", str(existing)]) == 0
    assert mode(existing) == 0o750
    assert mode(existing / "ca.key") == 0o600


def test_init_ca_refuses_a_directory_another_user_owns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    assert main(["pki", "init-ca", "--dir", str(theirs)]) == 2
    assert capsys.readouterr().err == (
        f"amoskys pki: error: {theirs}: owned by uid 65534, not by this user; refusing to keep a CA key there\n"
    )
    assert list(theirs.iterdir()) == []


def test_init_ca_makes_a_new_directory_0700_whatever_the_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0)
    try:
        assert main(["pki", "init-ca", "--dir", str(tmp_path / "new" / "ca")]) == 0
    finally:
        os.umask(old)
    assert mode(tmp_path / "new" / "ca") == 0o700
    assert mode(tmp_path / "new" / "ca" / "ca.key") == 0o600


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_the_longest_name_and_validity_are_issued_and_end_long_before_2262(work: Path) -> None:
    longest = "n" * 64
    argv = ["pki", "issue", "--ca-dir", str(work / "ca"), "--cn", longest, "--dir", str(work / "out")]
    assert main([*argv, "--days", "36500", "--usage", "server"]) == 0
    cert = pki.load_certificate(work / "out" / f"{longest}.crt")
    assert pki.common_name(cert) == longest
    assert cert.not_valid_after_utc.year < 2200
    assert mode(work / "out" / f"{longest}.key") == 0o600
    result = subprocess.run(
        ["openssl", "verify", "-purpose", "sslserver", "-CAfile", str(work / "ca" / "ca.crt"),
         str(work / "out" / f"{longest}.crt")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_an_address_written_two_ways_is_one_san(test_pki: TestPki) -> None:
    _, cert = test_pki.issue("web1", "server", ["::1", "0:0::1", "web1", "127.0.0.1"])
    sans = pki.load_certificate(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["::1", "127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["web1"]


def test_the_installed_command_refuses_a_path_for_a_name_in_one_line(work: Path) -> None:
    before = snapshot(work)
    result = subprocess.run(
        [sys.executable, "-m", "amoskys", "pki", "issue", "--ca-dir", str(work / "ca"), "--cn", "../x",
         "--dir", str(work / "issued")],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"amoskys pki: error: common name '../x' {CN_RULE}, '.', '_' or '-', starting with a " \
        "letter or digit\n"  # fmt: skip
    assert snapshot(work) == before
