"""A small X.509 PKI for the fleet: CA, CSRs made where the key lives, signing, checks, revocation."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from amoskys import keys
from amoskys.errors import IdentityError
from amoskys.keyfile import read_identity_file

__all__ = [
    "CertificateAuthority",
    "TlsIdentity",
    "Usage",
    "check_certificate",
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


def init_ca(directory: Path, common_name: str = "AMOSKYS CA", days: int = 3650) -> CertificateAuthority:
    """Create ca.key (0600) and ca.crt in `directory`; refuse if a CA is already there."""
    key_path = directory / CA_KEY
    if key_path.exists() or (directory / CA_CERT).exists():
        raise IdentityError(f"{directory}: a CA already exists there; refusing to replace it")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
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
    keys.write_private_key(key_path, key)
    keys.write_public_file(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
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
    return entries


def create_csr(key_path: Path, csr_path: Path, common_name: str, sans: list[str]) -> None:
    """Generate a TLS key at `key_path` (0600, nowhere else) and write its CSR."""
    key = keys.generate_tls_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(_name(common_name))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san_entries(sans)), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    keys.write_private_key(key_path, key)
    keys.write_public_file(csr_path, csr.public_bytes(serialization.Encoding.PEM))


def _usage_oids(usage: Usage) -> list[x509.ObjectIdentifier]:
    oids = {"server": [ExtendedKeyUsageOID.SERVER_AUTH], "client": [ExtendedKeyUsageOID.CLIENT_AUTH]}
    return oids["server"] + oids["client"] if usage == "both" else oids[usage]


def sign_csr(
    ca: CertificateAuthority, csr_pem: bytes, usage: Usage, sans: list[str], days: int = 365
) -> x509.Certificate:
    """Sign a CSR: CN from the CSR, SANs from the CSR plus `sans` (CN is always a DNS SAN)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise IdentityError("not a PEM certificate signing request") from exc
    if not csr.is_signature_valid:
        raise IdentityError("CSR signature is invalid")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not str(cns[0].value):
        raise IdentityError("CSR must carry exactly one non-empty common name")
    common_name = str(cns[0].value)
    names = [common_name, *sans]
    try:
        requested = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += [str(v) for v in requested.get_values_for_type(x509.DNSName)]
        names += [str(v) for v in requested.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
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
        .add_extension(x509.SubjectAlternativeName(_san_entries(list(dict.fromkeys(names)))), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def issue(
    ca: CertificateAuthority,
    directory: Path,
    common_name: str,
    usage: Usage,
    sans: list[str],
    days: int = 365,
) -> tuple[Path, Path]:
    """One step for tests and the lab: NAME.key (0600) + NAME.crt in `directory`."""
    key_path, cert_path = directory / f"{common_name}.key", directory / f"{common_name}.crt"
    csr_path = directory / f"{common_name}.csr"
    create_csr(key_path, csr_path, common_name, sans)
    cert = sign_csr(ca, csr_path.read_bytes(), usage, sans, days)
    csr_path.unlink()
    keys.write_public_file(cert_path, cert.public_bytes(serialization.Encoding.PEM))
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
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except ValueError as exc:
        raise IdentityError(f"{path}: not a PEM certificate revocation list") from exc
    public_key = ca_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(public_key):
        raise IdentityError(f"{path}: revocation list is not signed by the configured CA")
    return {entry.serial_number for entry in crl}


def revoke(ca: CertificateAuthority, crl_path: Path, serials: list[int], days: int = 30) -> int:
    """Add serials to the CRL at `crl_path` (created when missing), re-signed; return its size."""
    revoked = load_crl(crl_path, ca.cert) | set(serials)
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=days))
    )
    for serial in sorted(revoked):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    keys.write_public_file(crl_path, crl.public_bytes(serialization.Encoding.PEM))
    return len(revoked)
