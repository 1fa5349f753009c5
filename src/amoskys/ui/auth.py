"""Operator authentication: a scrypt password hash (HTTP Basic over TLS) and/or client certificates."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
from collections.abc import Mapping
from typing import Any

from cryptography import x509

from amoskys.pki import common_name

__all__ = ["Authenticator", "hash_password", "verify_password"]

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
VERIFIED_CACHE = 64  # Basic credentials already checked: scrypt costs ~0.1 s, not per page view


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=32)


def hash_password(password: str) -> str:
    """`scrypt$N$r$p$salt$hash` (base64 parts), for `ui.auth.password_hash`."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    salt_text, digest_text = base64.b64encode(salt).decode(), base64.b64encode(digest).decode()
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt_text}${digest_text}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether `password` matches a hash from hash_password; a malformed hash matches nothing."""
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        computed = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
        return hmac.compare_digest(computed, base64.b64decode(digest))
    except (ValueError, MemoryError):
        return False


def check_hash(encoded: str) -> None:
    """Raise ValueError unless `encoded` is a well-formed hash from hash_password."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt" or not all(p.isdigit() for p in parts[1:4]):
        raise ValueError("auth.password_hash: expected the output of `amoskys ui hash-password`")


class Authenticator:
    """Decides per request: a password (any user name) and/or a client certificate with an allowed CN."""

    def __init__(self, password_hash: str = "", client_cns: frozenset[str] | None = None) -> None:
        if password_hash:
            check_hash(password_hash)
        self.password_hash = password_hash
        self.client_cns = client_cns  # None: certificates not used; empty: any cert from the CA
        self._key = secrets.token_bytes(32)
        self._verified: dict[bytes, None] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.password_hash) or self.client_cns is not None

    def allows(self, environ: Mapping[str, Any]) -> bool:
        if self.client_cns is not None and not self._cert_allowed(environ):
            return False
        return not self.password_hash or self._password_allowed(str(environ.get("HTTP_AUTHORIZATION", "")))

    def _cert_allowed(self, environ: Mapping[str, Any]) -> bool:
        pem = environ.get("SSL_CLIENT_CERT")
        if environ.get("SSL_CLIENT_VERIFY") != "SUCCESS" or not pem:
            return False
        if not self.client_cns:
            return True
        return common_name(x509.load_pem_x509_certificate(str(pem).encode())) in self.client_cns

    def _password_allowed(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        tag = hmac.digest(self._key, value.encode(), "sha256")
        if tag in self._verified:
            return True
        try:
            _user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if not verify_password(password, self.password_hash):
            return False
        with self._lock:
            if len(self._verified) >= VERIFIED_CACHE:
                self._verified.pop(next(iter(self._verified)))
            self._verified[tag] = None
        return True
