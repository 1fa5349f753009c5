"""The hub's answer to one envelope: a status, a reason code (`PublishAck.Reason`) and a text for people."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from amoskys.envelope import reason_label
from amoskys.v1 import envelope_pb2

__all__ = [
    "NO_REASON",
    "STATUS_INVALID",
    "STATUS_OK",
    "STATUS_RETRY",
    "STATUS_UNAUTHORIZED",
    "Ack",
    "Reason",
    "Refusal",
    "Status",
    "invalid",
    "label",
    "ok",
    "retry",
    "unauthorized",
]

Status = envelope_pb2.PublishAck.Status
Reason = envelope_pb2.PublishAck.Reason
label = reason_label
# The values every envelope's answer uses, looked up once (a protobuf enum's attributes are found by Python code).
STATUS_OK, STATUS_RETRY = Status.OK, Status.RETRY
STATUS_INVALID, STATUS_UNAUTHORIZED = Status.INVALID, Status.UNAUTHORIZED
NO_REASON = Reason.REASON_UNSPECIFIED


class Refusal(NamedTuple):
    """Why a check refuses: the reason code and the text for people."""

    code: int
    details: str


@dataclass(frozen=True, slots=True)
class Ack:
    status: int
    code: int = NO_REASON
    details: str = ""  # for people; the text is "<label>: <details>"
    backoff_ms: int = 0
    acked_seq: int = 0
    chain_id: bytes = b""
    hold_s: float = 0.0  # answer only after this long (a sender that ignores its backoff is held, not served)

    @property
    def reason(self) -> str:
        if self.code == NO_REASON:
            return self.details
        return f"{label(self.code)}: {self.details}" if self.details else label(self.code)

    def message(self) -> envelope_pb2.PublishAck:
        return envelope_pb2.PublishAck(
            status=self.status,  # type: ignore[arg-type]
            reason=self.reason,
            reason_code=self.code,  # type: ignore[arg-type]
            backoff_ms=self.backoff_ms,
            acked_seq=self.acked_seq,
            chain_id=self.chain_id,
        )


def ok(code: int, acked_seq: int, chain_id: bytes) -> Ack:
    return Ack(STATUS_OK, code, "", 0, acked_seq, chain_id)


def retry(code: int, details: str, backoff_ms: int, acked_seq: int = 0, chain_id: bytes = b"") -> Ack:
    return Ack(STATUS_RETRY, code, details, backoff_ms, acked_seq, chain_id)


def invalid(code: int, details: str, acked_seq: int = 0) -> Ack:
    return Ack(STATUS_INVALID, code, details, acked_seq=acked_seq)


def unauthorized(code: int, details: str) -> Ack:
    return Ack(STATUS_UNAUTHORIZED, code, details)
