"""Open streams by identity: a cap per identity, and a way to end them from outside (revocation)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from amoskys.eventbus.auth import Peer

__all__ = ["OpenStreams", "StreamHandle"]


@dataclass(eq=False)
class StreamHandle:
    """One open PublishStream or Subscribe; `end()` asks its handler to finish with `reason`."""

    peer: Peer
    wake: Callable[[], object] = field(default=lambda: None)
    reason: str = ""
    code: grpc.StatusCode = grpc.StatusCode.OK  # the status the handler ends the stream with

    def end(self, reason: str, code: grpc.StatusCode) -> None:
        if not self.reason:
            self.reason, self.code = reason, code
            self.wake()


class OpenStreams:
    def __init__(self, max_per_identity: int) -> None:
        self.max_per_identity = max_per_identity
        self.by_identity: dict[str, set[StreamHandle]] = {}

    def open(self, peer: Peer) -> StreamHandle | None:
        """A handle for a new stream of `peer`, or None when it already has its share open."""
        mine = self.by_identity.setdefault(peer.cn, set())
        if len(mine) >= self.max_per_identity:
            return None
        handle = StreamHandle(peer)
        mine.add(handle)
        return handle

    def close(self, handle: StreamHandle) -> None:
        mine = self.by_identity.get(handle.peer.cn)
        if mine is not None:
            mine.discard(handle)
            if not mine:
                del self.by_identity[handle.peer.cn]

    def end_where(self, refusal: Callable[[Peer], str | None]) -> int:
        """End every stream whose identity `refusal` now refuses (e.g. revoked); return how many."""
        ended = 0
        for handles in list(self.by_identity.values()):
            for handle in list(handles):
                reason = refusal(handle.peer)
                if reason is not None:
                    handle.end(reason, grpc.StatusCode.UNAUTHENTICATED)
                    ended += 1
        return ended
