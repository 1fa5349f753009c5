"""A small X.509 PKI for the fleet: CA, CSRs made where the key lives, signing, checks, revocation."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from amoskys import keys
from amoskys.config import MAX_DAYS
from amoskys.errors import IdentityError
from amoskys.keyfile import check_identity_name, read_identity_file

__all__ = [
    "CertificateAuthority",
    "TlsIdentity",
    "Usage",
    "check_ca_name",
    "check_certificate",
    "check_days",
    "check_san",
    "check_serial",
    "create_csr",
    "init_ca",
    "issue",
    "load_ca",
    "load_certificate",
    "load_crl",
    "load_tls_identity",
    "revoke",
    "sign_csr",
]

Usage = Literal["server", "client", "both"]
CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CLOCK_SKEW = dt.timedelta(minutes=5)
CA_DIR_MODE = 0o700
MAX_CN = 64  # X.509 ub-common-name (RFC 5280)
MAX_SERIAL_BITS = 159  # RFC 5280: a positive serial of at most 20 octets
# A DNS SAN: the characters of an identity name, up to a full DNS name's length (every CN is also a DNS SAN).
DNS_SAN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


def check_days(days: int, *, minimum: int = 1) -> int:
    """A validity in days: at least `minimum`, at most MAX_DAYS (notAfter stays far before int64 ns end, 2262)."""
    if not minimum <= days <= MAX_DAYS:
        raise IdentityError(f"{days} days is out of range: expected {minimum} to {MAX_DAYS} days")
    return days


def check_ca_name(name: str) -> str:
    """A CA's common name is only a label: 1-64 printable characters (spaces allowed)."""
    if not (1 <= len(name) <= MAX_CN and name.isprintable() and name.strip() == name):
        raise IdentityError(
            f"CA common name {name[:80]!r} is not valid: expected 1-{MAX_CN} printable characters, "
            "no leading or trailing space"
        )
    return name


def check_san(name: str) -> str:
    """A subject alternative name: an IP address, or a DNS name of letters, digits, '.', '_' and '-'."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        if not DNS_SAN.fullmatch(name):
            raise IdentityError(
                f"subject alt name {name[:80]!r} is neither an IP address nor a DNS name "
                "(1-253 letters, digits, '.', '_' or '-', starting with a letter or digit)"
            ) from None
        return name
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise IdentityError(f"subject alt name {name!r}: a certificate holds no zone (%{address.scope_id}); drop it")
    return name


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class TlsIdentity:
    """PEM bytes ready for grpc.ssl_*_credentials, plus the parsed cert."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    cert: x509.Certificate


def load_certificate(path: Path) -> x509.Certificate:
    data = read_identity_file(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise IdentityError(f"{path}: not a PEM certificate") from exc


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _prepare_ca_directory(directory: Path) -> None:
    """Create `directory` 0700, or take an existing one as it is: refused unless ours and only ours to write."""
    try:
        directory.mkdir(mode=CA_DIR_MODE, parents=True)
        directory.chmod(CA_DIR_MODE)  # umask-proof; only a directory made here is chmodded
        return
    except FileExistsError:
        pass
    except OSError as exc:
        raise IdentityError(f"{directory}: cannot create CA directory: {exc.strerror}") from exc
    info = directory.stat()
    mode = info.st_mode
    if not stat.S_ISDIR(mode):
        raise IdentityError(f"{directory}: not a directory")
    if info.st_uid != os.geteuid():
        raise IdentityError(
            f"{directory}: owned by uid {info.st_uid}, not by this user; refusing to keep a CA key there"
        )
    if mode & 0o022:
        raise IdentityError(
            f"{directory}: writable by group/others (mode {stat.S_IMODE(mode):04o}); refusing to keep a CA key "
            f"there; run: chmod go-w {directory} (or give a new directory)"
        )


def init_ca(directory: Path, common_name: str = "AMOSKYS CA", days: int = 3650) -> CertificateAuthority:
    """Create ca.key (0600) and ca.crt in `directory`; refuse if a CA is already there."""
    check_ca_name(common_name)
    check_days(days)
    key_path = directory / CA_KEY
    if key_path.exists() or (directory / CA_CERT).exists():
        raise IdentityError(f"{directory}: a CA already exists there; refusing to replace it")
    key = keys.generate_tls_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _prepare_ca_directory(directory)
    keys.write_key_and_public(key_path, key, directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return CertificateAuthority(cert, key)


def load_ca(directory: Path) -> CertificateAuthority:
    key = keys.load_private_key(directory / CA_KEY)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{directory / CA_KEY}: CA key must be ECDSA")
    cert = load_certificate(directory / CA_CERT)
    _require_matching(cert, key, directory / CA_CERT)
    return CertificateAuthority(cert, key)


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return list(dict.fromkeys(entries))  # one entry per address however it was written (::1, 0::1)


def _build_csr(key: ec.EllipticCurvePrivateKey, common_name: str, sans: list[str]) -> x509.CertificateSigningRequest:
    check_identity_name(common_name, "common name")
    for name in sans:
        check_san(name)
    builder = x509.CertificateSigningRequestBuilder().subject_name(_name(common_name))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san_entries(sans)), critical=False)
    return builder.sign(key, hashes.SHA256())


def create_csr(key_path: Path, csr_path: Path, common_name: str, sans: list[str]) -> None:
    """Generate a TLS key at `key_path` (0600, nowhere else) and write its CSR."""
    if key_path.resolve() == csr_path.resolve():
        raise IdentityError(f"{csr_path}: the CSR must not be written over its own key")
    key = keys.generate_tls_key()
    csr = _build_csr(key, common_name, sans)
    keys.write_key_and_public(key_path, key, csr_path, csr.public_bytes(serialization.Encoding.PEM))


def _usage_oids(usage: Usage) -> list[x509.ObjectIdentifier]:
    oids = {"server": [ExtendedKeyUsageOID.SERVER_AUTH], "client": [ExtendedKeyUsageOID.CLIENT_AUTH]}
    return oids["server"] + oids["client"] if usage == "both" else oids[usage]


def _requested_names(csr: x509.CertificateSigningRequest) -> list[str]:
    """The CSR's common name (checked) followed by the SANs it asks for (checked)."""
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise IdentityError("CSR must carry exactly one common name")
    names = [check_identity_name(str(cns[0].value), "CSR common name")]
    try:
        requested = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return names
    names += [check_san(str(v)) for v in requested.get_values_for_type(x509.DNSName)]
    return names + [str(v) for v in requested.get_values_for_type(x509.IPAddress)]


def sign_csr(
    ca: CertificateAuthority, csr_pem: bytes, usage: Usage, sans: list[str], days: int = 365
) -> x509.Certificate:
    """Sign a CSR: CN from the CSR, SANs from the CSR plus `sans` (CN is always a DNS SAN).

    `days` is 0 to MAX_DAYS (0: expired at once, for tests of expiry); never past the CA's own end.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise IdentityError("not a PEM certificate signing request") from exc
    return _sign(ca, csr, usage, sans, days)


def _sign(
    ca: CertificateAuthority, csr: x509.CertificateSigningRequest, usage: Usage, sans: list[str], days: int
) -> x509.Certificate:
    check_days(days, minimum=0)
    for name in sans:
        check_san(name)
    if not csr.is_signature_valid:
        raise IdentityError("CSR signature is invalid")
    requested = _requested_names(csr)
    common_name, names = requested[0], [requested[0], *sans, *requested[1:]]
    now = _now()
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise IdentityError("CSR key must be ECDSA or Ed25519")
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(_usage_oids(usage)), critical=False)
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def _file_in(directory: Path, name: str) -> Path:
    """`directory / name`, refused unless it resolves to a file directly inside `directory`."""
    path = directory / name
    if path.resolve().parent != directory.resolve():
        raise IdentityError(f"{path}: resolves outside {directory}; refusing to write there")
    return path


def issue(
    ca: CertificateAuthority,
    directory: Path,
    common_name: str,
    usage: Usage,
    sans: list[str],
    days: int = 365,
) -> tuple[Path, Path]:
    """One step for tests and the lab: NAME.key (0600) + NAME.crt in `directory` (days as for sign_csr)."""
    check_identity_name(common_name, "common name")
    key_path, cert_path = _file_in(directory, f"{common_name}.key"), _file_in(directory, f"{common_name}.crt")
    for path in (key_path, cert_path):
        if path.exists() or path.is_symlink():
            raise IdentityError(f"{path}: a file already exists there; refusing to overwrite it")
    key = keys.generate_tls_key()
    cert = _sign(ca, _build_csr(key, common_name, sans), usage, sans, days)
    keys.write_key_and_public(key_path, key, cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def _require_matching(cert: x509.Certificate, key: keys.PrivateKey, origin: Path) -> None:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise IdentityError(f"{origin}: certificate does not match its private key")


def check_certificate(
    cert: x509.Certificate, ca_cert: x509.Certificate, origin: Path, min_days: int = 0
) -> dt.timedelta:
    """Raise unless `cert` chains to the CA and is valid for at least `min_days`; return time left."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{origin}: certificate was not issued by the configured CA") from exc
    except Exception as exc:  # InvalidSignature
        raise IdentityError(f"{origin}: certificate signature does not verify against the CA") from exc
    now = _now()
    if cert.not_valid_before_utc > now + CLOCK_SKEW:
        raise IdentityError(f"{origin}: certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
    left = cert.not_valid_after_utc - now
    if left <= dt.timedelta(0):
        raise IdentityError(f"{origin}: certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z")
    if left < dt.timedelta(days=min_days):
        raise IdentityError(
            f"{origin}: certificate expires on {cert.not_valid_after_utc:%Y-%m-%d} "
            f"({left.days} days left, fewer than {min_days})"
        )
    return left


def load_tls_identity(cert_path: Path, key_path: Path, ca_path: Path) -> TlsIdentity:
    """Load and check a TLS identity: key safe, cert matches key, chains to the CA, not expired."""
    key = keys.load_private_key(key_path)
    cert = load_certificate(cert_path)
    ca_cert = load_certificate(ca_path)
    _require_matching(cert, key, cert_path)
    check_certificate(cert, ca_cert, cert_path)
    return TlsIdentity(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key_path.read_bytes(),
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        cert=cert,
    )


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def load_crl(path: Path, ca_cert: x509.Certificate) -> set[int]:
    """Serial numbers revoked by a CRL that the CA signed; a missing file revokes nothing."""
    if not path.exists():
        return set()
    try:
        crl = x509.load_pem_x509_crl(read_identity_file(path, "revocation list"))
    except ValueError as exc:
        raise IdentityError(f"{path}: not a PEM certificate revocation list") from exc
    public_key = ca_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(public_key):
        raise IdentityError(f"{path}: revocation list is not signed by the configured CA")
    return {entry.serial_number for entry in crl}


def check_serial(serial: int) -> int:
    """A certificate serial as RFC 5280 allows it: positive, at most 20 octets."""
    if not 0 < serial < 1 << MAX_SERIAL_BITS:
        raise IdentityError(f"serial {serial:#x} is not a certificate serial: expected 1 to 2^{MAX_SERIAL_BITS}-1")
    return serial


def revoke(ca: CertificateAuthority, crl_path: Path, serials: list[int], days: int = 30) -> int:
    """Add serials to the CRL at `crl_path` (created when missing), re-signed; return its size."""
    for serial in serials:
        check_serial(serial)
    revoked = load_crl(crl_path, ca.cert) | set(serials)
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=check_days(days)))
    )
    for serial in sorted(revoked):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    keys.write_public_file(crl_path, crl.public_bytes(serialization.Encoding.PEM))
    return len(revoked)
