"""Key material on disk: created 0600 in place, refused when unsafe, never logged.

Private keys are written with O_EXCL and mode 0600 from the start (no window where they are
readable), and every load checks that group and others have no access.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from nacl.signing import VerifyKey

from amoskys.catalog import AGENT_KINDS, split_agent_id
from amoskys.errors import IdentityError
from amoskys.keyfile import PRIVATE_MODE, check_identity_name, check_private_permissions, read_private_key

__all__ = [
    "Enrolment",
    "PrivateKey",
    "check_private_permissions",
    "generate_signing_key",
    "generate_tls_key",
    "load_private_key",
    "load_signing_key",
    "load_verify_key",
    "public_key_text",
    "read_trust_map",
    "write_key_and_public",
    "write_private_key",
    "write_public_file",
]

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PUBLIC_MODE = 0o644


def generate_tls_key() -> ec.EllipticCurvePrivateKey:
    """TLS identities use ECDSA P-256: small, fast handshakes, supported by gRPC everywhere."""
    return ec.generate_private_key(ec.SECP256R1())


def generate_signing_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IdentityError(f"{path.parent}: cannot create directory: {exc.strerror}") from exc


def write_private_key(path: Path, key: PrivateKey, *, overwrite: bool = False) -> None:
    """Write a PKCS#8 PEM key, born 0600; refuse to replace an existing key unless asked."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _make_parent(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    if overwrite and path.exists():
        path.unlink()
    try:
        fd = os.open(path, flags, PRIVATE_MODE)
    except FileExistsError as exc:
        raise IdentityError(f"{path}: a file already exists there; refusing to overwrite it") from exc
    except OSError as exc:
        raise IdentityError(f"{path}: cannot write private key: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        os.chmod(path, PRIVATE_MODE)  # umask-proof
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise IdentityError(f"{path}: cannot write private key: {exc.strerror}") from exc


def _holds_private_key(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return b"PRIVATE KEY-----" in handle.read(1 << 16)
    except OSError:
        return False


def write_public_file(path: Path, data: bytes) -> None:
    """Write public material (certs, CSRs, public keys) atomically, mode 0644; never over a private key."""
    if _holds_private_key(path):
        raise IdentityError(f"{path}: holds a private key; refusing to replace it with public material")
    _make_parent(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a stale one from a crash; O_EXCL below refuses anything planted meanwhile
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PUBLIC_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, PUBLIC_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise IdentityError(f"{path}: cannot write: {exc.strerror}") from exc


def write_key_and_public(key_path: Path, key: PrivateKey, public_path: Path, data: bytes) -> None:
    """A private key and its public companion (cert, CSR, .pub): both written, or neither left behind."""
    write_private_key(key_path, key)
    try:
        write_public_file(public_path, data)
    except IdentityError:
        key_path.unlink(missing_ok=True)
        raise


def load_private_key(path: Path) -> PrivateKey:
    """Load a PEM private key after the permission check."""
    data = read_private_key(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise IdentityError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    key = load_private_key(path)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise IdentityError(f"{path}: not an Ed25519 signing key")
    return key


def public_key_text(key: ed25519.Ed25519PublicKey) -> str:
    """The one-line form of a signing public key: `ed25519:<base64 raw 32 bytes>`."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + base64.b64encode(raw).decode("ascii")


def parse_public_key_text(text: str, origin: str) -> ed25519.Ed25519PublicKey:
    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode())
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise IdentityError(f"{origin}: not an Ed25519 public key")
        return key
    prefix, _, b64 = text.partition(":")
    try:
        raw = base64.b64decode(b64, validate=True)
        if prefix != "ed25519":
            raise ValueError(prefix)
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise IdentityError(f"{origin}: expected 'ed25519:<base64 of 32 bytes>' or a PEM public key") from exc


def load_verify_key_text(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"{path}: cannot read public key: {exc}") from exc


def load_verify_key(path: Path) -> ed25519.Ed25519PublicKey:
    return parse_public_key_text(load_verify_key_text(path), str(path))


@dataclass(frozen=True, slots=True)
class Enrolment:
    """What one agent identity may speak for: its signing key, and the host and kind it was enrolled for."""

    key: ed25519.Ed25519PublicKey
    host: str
    kind: str
    verify_key: VerifyKey = field(init=False, repr=False, compare=False)  # the key for libsodium (the hub's checks)

    def __post_init__(self) -> None:
        raw = self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        object.__setattr__(self, "verify_key", VerifyKey(raw))


def _enrolment(agent_id: str, entry: object, origin: str) -> Enrolment:
    """`agent_id: KEY` (host and kind from the id's `HOST-KIND` form) or `agent_id: {key, host, kind}`."""
    check_identity_name(agent_id, f"{origin}: agent_id")
    if not isinstance(entry, dict):
        split = split_agent_id(agent_id)
        if split is None:
            raise IdentityError(
                f"{origin}: cannot tell the host and kind of {agent_id!r} (not HOST-KIND with a known kind); "
                "write it as {key: ..., host: ..., kind: ...}"
            )
        return Enrolment(parse_public_key_text(str(entry), origin), *split)
    key, host, kind = entry.get("key"), entry.get("host"), entry.get("kind")
    if not isinstance(host, str) or not host or not isinstance(kind, str) or kind not in AGENT_KINDS:
        kinds = ", ".join(sorted(AGENT_KINDS))
        raise IdentityError(f"{origin}: expected {{key, host, kind}} with a non-empty host and kind one of {kinds}")
    return Enrolment(parse_public_key_text(str(key), origin), host, kind)


def _read_yaml_map(path: Path) -> dict[str, Enrolment]:
    import yaml

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise IdentityError(f"{path}: cannot read trust map: {exc}") from exc
    if not isinstance(document, dict):
        raise IdentityError(f"{path}: trust map must be a mapping of agent_id to public key")
    return {str(agent): _enrolment(str(agent), entry, f"{path}: {agent}") for agent, entry in document.items()}


def read_trust_map(path: Path) -> dict[str, Enrolment]:
    """A trust map: one YAML file, or a directory of YAML files and `<agent_id>.pub` key files.

    An entry is `agent_id: KEY` (an id of the form HOST-KIND binds that host and kind) or
    `agent_id: {key: KEY, host: HOST, kind: KIND}`.
    """
    if not path.is_dir():
        return _read_yaml_map(path)
    trust: dict[str, Enrolment] = {}
    for item in sorted(path.iterdir()):
        if item.suffix == ".pub":
            trust[item.stem] = _enrolment(item.stem, load_verify_key_text(item), str(item))
        elif item.suffix in (".yml", ".yaml"):
            trust.update(_read_yaml_map(item))
    return trust
