"""An agent's identity, checked and loaded with the standard `ssl` module and PyNaCl.

The hub and the CLI handle keys and certificates with `cryptography`; an agent only needs to sign
envelopes (Ed25519) and present its TLS identity, and `cryptography`'s bindings cost ~13 MB of
resident memory in every agent process. So the agent checks its certificate by doing what the hub
will do with it: an in-memory TLS handshake in which a server that trusts only the fleet CA
verifies the certificate (chain, validity dates, client purpose) and reads its CN.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import re
import ssl
from pathlib import Path

from nacl.signing import SigningKey

from amoskys.config import TlsConfig
from amoskys.errors import IdentityError
from amoskys.keyfile import check_private_permissions, read_identity_file, read_private_key

__all__ = ["Ed25519Signer", "check_tls_identity", "client_tls_context", "load_signer"]

# PKCS#8 DER of an Ed25519 private key: this fixed prefix, then the 32-byte seed (RFC 8410).
ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN PRIVATE KEY-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END PRIVATE KEY-----")
HANDSHAKE_ROUNDS = 8


class Ed25519Signer:
    """Signs envelopes (RFC 8032, deterministic: the same bytes as `cryptography` would produce)."""

    def __init__(self, seed: bytes) -> None:
        self._key = SigningKey(seed)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message).signature

    def public_bytes(self) -> bytes:
        return bytes(self._key.verify_key)


def load_signer(path: Path) -> Ed25519Signer:
    """The agent's Ed25519 signing key (PKCS#8 PEM, as `amoskys pki keygen` writes it), 0600 only."""
    data = read_private_key(path)
    match = PEM_PRIVATE_KEY.search(data)
    der = base64.b64decode(match.group(1)) if match else b""
    if len(der) != len(ED25519_PKCS8_PREFIX) + 32 or not der.startswith(ED25519_PKCS8_PREFIX):
        raise IdentityError(f"{path}: not an unencrypted PEM Ed25519 signing key")
    return Ed25519Signer(der[len(ED25519_PKCS8_PREFIX) :])


def _load_chain(context: ssl.SSLContext, tls: TlsConfig) -> None:
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise IdentityError(f"{tls.cert}: certificate does not match its private key") from exc
        raise IdentityError(f"{tls.cert}: not a PEM certificate with a usable key ({exc.reason})") from exc


def _trusting_server(tls: TlsConfig) -> ssl.SSLContext:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(server, tls)  # the server needs some certificate; it presents the agent's own
    try:
        server.load_verify_locations(cafile=tls.ca)
    except ssl.SSLError as exc:
        raise IdentityError(f"{tls.ca}: not a PEM CA certificate") from exc
    server.verify_mode = ssl.CERT_REQUIRED
    return server


def _handshake(client: ssl.SSLObject, server: ssl.SSLObject, bios: tuple[ssl.MemoryBIO, ...]) -> None:
    client_in, client_out, server_in, server_out = bios
    done = {client: False, server: False}
    for _ in range(HANDSHAKE_ROUNDS):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
                done[side] = True
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if done[server]:
            return
    raise IdentityError("TLS self-check did not complete")


def _subject(server: ssl.SSLObject) -> tuple[tuple[tuple[str, str], ...], ...]:
    peer = server.getpeercert() or {}
    subject: tuple[tuple[tuple[str, str], ...], ...] = peer.get("subject", ())  # type: ignore[assignment]
    return subject


def check_tls_identity(tls: TlsConfig, agent_id: str) -> None:
    """Refuse a missing, unsafe, mismatched, untrusted, expired or misnamed TLS identity."""
    check_private_permissions(Path(tls.key))
    read_identity_file(Path(tls.cert), "certificate")
    read_identity_file(Path(tls.ca), "CA certificate")
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE  # only the agent's certificate is under test
    _load_chain(client_context, tls)
    bios = tuple(ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(bios[0], bios[1], server_side=False)
    server = _trusting_server(tls).wrap_bio(bios[2], bios[3], server_side=True)
    try:
        _handshake(client, server, bios)
    except ssl.SSLCertVerificationError as exc:
        raise IdentityError(f"{tls.cert}: {exc.verify_message} (checked against {tls.ca})") from exc
    common_name = next((value for rdn in _subject(server) for key, value in rdn if key == "commonName"), "")
    if common_name != agent_id:
        raise IdentityError(
            f"{tls.cert}: certificate CN {common_name!r} is not this agent's id {agent_id!r} "
            "(set agent_id, or issue the certificate for it)"
        )


def client_tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """The mTLS client context for the hub: the agent's certificate, trusting only the fleet CA.

    Built once for each version of the three files (a reconnect after a rotation reads the new
    ones): parsing them took a quarter of the load generator's event loop in a reconnect storm."""
    versions = tuple(os.stat(path).st_mtime_ns for path in (tls.ca, tls.cert, tls.key))
    return _client_tls_context(tls, versions)


@functools.cache
def _client_tls_context(tls: TlsConfig, versions: tuple[int, ...]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, tls)
    context.set_alpn_protocols(["h2"])
    return context
