"""Operator authentication: a scrypt password hash (HTTP Basic over TLS) and/or client certificates."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from cryptography import x509

from amoskys.errors import AmoskysError
from amoskys.pki import common_name
from amoskys.ui.metrics import UiMetrics

__all__ = ["Authenticator", "LoginLimiter", "LoginRefused", "hash_password", "verify_password"]

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
VERIFIED_CACHE = 64  # Basic credentials already checked: scrypt costs ~0.1 s, not per page view
LOGIN_BURST = 5  # password checks an address may start at once ...
LOGIN_REFILL_S = 12.0  # ... and one more every 12 s (5 a minute); a correct password costs none
SCRYPT_SLOTS = 2  # password checks running at once (32 MiB each); one more is refused at once
TRACKED_ADDRESSES = 4096  # addresses with a partly used allowance; the least recent is forgotten first


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


class LoginRefused(AmoskysError):
    """A password check not even started: `status` 429 (the address used its allowance) or 503 (all slots busy)."""

    def __init__(self, status: int, retry_after_s: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


def address_key(address: str) -> str:
    """Whom an allowance belongs to: an IPv4 address, an IPv6 /64 (one host's usual share)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


class LoginLimiter:
    """A token bucket of password checks per client address, and a cap on checks running at once.

    A check takes a token before scrypt runs and gives it back when the password was right, so only
    failures use the allowance; nothing waits: an empty bucket or no free slot is refused at once.
    """

    def __init__(
        self,
        burst: int = LOGIN_BURST,
        refill_s: float = LOGIN_REFILL_S,
        slots: int = SCRYPT_SLOTS,
        clock: Callable[[], float] = time.monotonic,
        metrics: UiMetrics | None = None,
    ) -> None:
        self.burst, self.refill_s, self.clock = burst, refill_s, clock
        self.metrics = metrics or UiMetrics()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when), least recent first
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(slots)

    def attempt(self, address: str, check: Callable[[], bool]) -> bool:
        """Run `check` (a password verification) within the limits; LoginRefused if not allowed."""
        key = address_key(address)
        try:
            self._take(key)
        except LoginRefused:
            self.metrics.login_refused.labels("rate_limited").inc()
            raise
        if not self._slots.acquire(blocking=False):
            self._give(key)
            self.metrics.login_refused.labels("busy").inc()
            raise LoginRefused(503, 1, "busy checking other passwords: try again in a second")
        try:
            passed = check()
        finally:
            self._slots.release()
        if passed:
            self._give(key)
        else:
            self.metrics.login_failures.inc()
        return passed

    def _tokens(self, key: str, now: float) -> float:
        tokens, when = self._buckets.pop(key, (self.burst, now))
        return min(self.burst, tokens + (now - when) / self.refill_s)

    def _take(self, key: str) -> None:
        with self._lock:
            now = self.clock()
            tokens = self._tokens(key, now)
            allowed = tokens >= 1
            self._buckets[key] = (tokens - 1 if allowed else tokens, now)
            while len(self._buckets) > TRACKED_ADDRESSES:
                del self._buckets[next(iter(self._buckets))]
        if not allowed:
            wait = math.ceil((1 - tokens) * self.refill_s)
            raise LoginRefused(429, wait, f"too many failed logins from {key}: try again in {wait} s")

    def _give(self, key: str) -> None:
        with self._lock:
            now = self.clock()
            self._buckets[key] = (min(self.burst, self._tokens(key, now) + 1), now)


class Authenticator:
    """Decides per request: a password (any user name) and/or a client certificate with an allowed CN."""

    def __init__(
        self, password_hash: str = "", client_cns: frozenset[str] | None = None, limiter: LoginLimiter | None = None
    ) -> None:
        if password_hash:
            check_hash(password_hash)
        self.password_hash = password_hash
        self.client_cns = client_cns  # None: certificates not used; empty: any cert from the CA
        self.limiter = limiter or LoginLimiter()
        self._key = secrets.token_bytes(32)
        self._verified: dict[bytes, None] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.password_hash) or self.client_cns is not None

    def allows(self, environ: Mapping[str, Any]) -> bool:
        """Whether the request may proceed; LoginRefused when its password cannot be checked now."""
        if self.client_cns is not None and not self._cert_allowed(environ):
            return False
        if not self.password_hash:
            return True
        return self._password_allowed(str(environ.get("HTTP_AUTHORIZATION", "")), str(environ.get("REMOTE_ADDR", "")))

    def _cert_allowed(self, environ: Mapping[str, Any]) -> bool:
        pem = environ.get("SSL_CLIENT_CERT")
        if environ.get("SSL_CLIENT_VERIFY") != "SUCCESS" or not pem:
            return False
        if not self.client_cns:
            return True
        return common_name(x509.load_pem_x509_certificate(str(pem).encode())) in self.client_cns

    def _password_allowed(self, header: str, address: str) -> bool:
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
        if not self.limiter.attempt(address, lambda: verify_password(password, self.password_hash)):
            return False
        with self._lock:
            if len(self._verified) >= VERIFIED_CACHE:
                self._verified.pop(next(iter(self._verified)))
            self._verified[tag] = None
        return True
