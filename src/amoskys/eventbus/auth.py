"""Who is calling: the verified client certificate, the trust map and the revocation list."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from amoskys import keys, pki
from amoskys.config import EventBusConfig
from amoskys.eventbus.edge import INT64_MAX

__all__ = ["Peer", "TrustState", "peer_of"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Peer:
    """The client certificate gRPC verified against our CA during the handshake."""

    cn: str
    serial: int
    not_after_ns: int


@functools.lru_cache(maxsize=16384)
def _parse_peer(pem: bytes) -> Peer:
    cert = x509.load_pem_x509_certificate(pem)
    # A certificate valid past 2262 would overflow int64 nanoseconds (and the registry's column).
    not_after_ns = min(int(cert.not_valid_after_utc.timestamp()) * 1_000_000_000, INT64_MAX)
    return Peer(pki.common_name(cert), cert.serial_number, not_after_ns)


def peer_of(context: grpc.aio.ServicerContext[object, object]) -> Peer | None:
    """The caller's certificate identity; None if there is none (never for mTLS-only ports)."""
    auth = context.auth_context()
    pem = next(iter(auth.get("x509_pem_cert", ())), None)
    return _parse_peer(bytes(pem)) if pem else None


class TrustState:
    """Trust map (who may speak for which host and kind), revocation list and server credentials.

    `reload()` swaps them atomically.
    """

    def __init__(self, config: EventBusConfig) -> None:
        self.config = config
        self.agents: dict[str, keys.Enrolment] = {}
        self.revoked: frozenset[int] = frozenset()
        self.identity: pki.TlsIdentity | None = None
        self._pending_tls: grpc.ServerCertificateConfiguration | None = None
        self.reload()

    def reload(self) -> None:
        """Load everything anew; on any error keep the previous state and raise."""
        tls = self.config.tls
        identity = pki.load_tls_identity(Path(tls.cert), Path(tls.key), Path(tls.ca))
        trust = keys.read_trust_map(Path(self.config.trust_map))
        revoked = frozenset(pki.load_crl(Path(self.config.crl), pki.load_certificate(Path(tls.ca))))
        changed_tls = self.identity is None or identity.cert_pem != self.identity.cert_pem
        self.identity, self.agents, self.revoked = identity, trust, revoked
        if changed_tls:
            self._pending_tls = self.certificate_configuration()
        log.info("trust loaded", extra={"agents": len(trust), "revoked": len(revoked)})

    def certificate_configuration(self) -> grpc.ServerCertificateConfiguration:
        assert self.identity is not None
        return grpc.ssl_server_certificate_configuration(
            [(self.identity.key_pem, self.identity.cert_pem)], root_certificates=self.identity.ca_pem
        )

    def fetch_certificate_configuration(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: a new configuration after a reload, else None."""
        pending, self._pending_tls = self._pending_tls, None
        return pending

    def server_credentials(self) -> grpc.ServerCredentials:
        self._pending_tls = None
        return grpc.dynamic_ssl_server_credentials(
            self.certificate_configuration(),
            self.fetch_certificate_configuration,  # type: ignore[arg-type]  # None means "no change"
            require_client_authentication=True,
        )

    def refusal(self, peer: Peer | None, now_ns: int) -> str | None:
        """Why this peer may not talk to us now, or None."""
        if peer is None:
            return "no client certificate"
        if peer.serial in self.revoked:
            return "certificate revoked"
        if peer.not_after_ns <= now_ns:
            return "certificate expired"
        return None
