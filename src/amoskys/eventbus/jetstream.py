"""NATS JetStream as the hub cluster's durable log (`store.backend: jetstream`).

One stream (R3 by default) holds every verified envelope, exact bytes, on a subject per agent
(`PREFIX.env.AGENT`, a `.` in the id written `~`), and the hubs' own alerts on `PREFIX.alert.HOST`.
Headers carry what the indexer cannot read from the envelope (the enrolment's host and kind, the
client certificate's expiry) and the chain position, so a hub reads a chain head from the last
message of a subject without parsing it. Appends use optimistic concurrency: the expected last
sequence of the agent's subject and a message id (agent/chain/seq), never a lock of our own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext, api

from amoskys.config import NatsConfig
from amoskys.errors import AmoskysError
from amoskys.eventbus.store import AgentUpdate, ChainRecord

__all__ = [
    "HEADER_CERT",
    "HEADER_HOST",
    "HEADER_KIND",
    "JetStreamLog",
    "WrongLastSequenceError",
    "agent_subject",
    "alert_subject",
    "chain_head",
    "connect",
    "ensure_stream",
    "when_ready",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

HEADER_CHAIN = "Amoskys-Chain"  # hex chain id
HEADER_SEQ = "Amoskys-Seq"
HEADER_DIGEST = "Amoskys-Digest"  # hex SHA-256 of the signing message
HEADER_HOST = "Amoskys-Host"  # from the agent's enrolment
HEADER_KIND = "Amoskys-Kind"
HEADER_CERT = "Amoskys-Cert-Not-After"  # ns, the client certificate the envelope came over
MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
STREAM_WAIT_S = 30.0  # how long a starting hub or indexer waits for JetStream to have a leader
UNAVAILABLE = 503
STREAM_NAME_IN_USE = 10058  # JetStream's JSStreamNameExistErr: another hub created the stream meanwhile
WRONG_LAST_SEQUENCE = 10071  # JetStream's JSStreamWrongLastSequenceErrF: another writer appended first
NATS_SUBJECT_ESCAPE = str.maketrans({".": "~"})  # '~' is never in an agent id, '.' separates subject tokens


class WrongLastSequenceError(Exception):
    """The agent's subject moved on since its head was read: another hub appended first."""


def agent_subject(prefix: str, agent_id: str) -> str:
    return f"{prefix}.env.{agent_id.translate(NATS_SUBJECT_ESCAPE)}"


def alert_subject(prefix: str, hostname: str) -> str:
    token = "".join(c if c.isalnum() or c in "-_" else "_" for c in hostname) or "hub"
    return f"{prefix}.alert.{token}"


def tls_context(config: NatsConfig) -> ssl.SSLContext | None:
    """mTLS with the fleet CA: the server is checked against `ca`, we present `cert`/`key`."""
    if not config.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.cert, config.key)
    return context


async def connect(config: NatsConfig, name: str) -> NatsClient:
    """A client that reconnects for ever (to any of `servers`); in-flight requests fail and callers retry them.

    TimeoutError when no server could be reached (or none accepted the handshake) within 3 request timeouts.
    """

    async def on_error(error: Exception) -> None:
        log.warning("nats: %s", error, extra={"error": repr(error)})

    async def on_disconnect() -> None:
        log.warning("nats: disconnected; reconnecting")

    async def on_reconnect() -> None:
        log.info("nats: reconnected")

    connecting = nats.connect(
        servers=list(config.servers),
        tls=tls_context(config),
        name=name,
        connect_timeout=config.request_timeout_s,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    # The client retries for ever (reconnects must: a node restarts); the first connection gets a deadline
    # so that a hub or indexer that cannot reach NATS (down, TLS refused) fails and is restarted.
    return await asyncio.wait_for(connecting, config.request_timeout_s * 3)


async def ensure_stream(js: JetStreamContext, config: NatsConfig, wait_s: float = STREAM_WAIT_S) -> None:
    """Create the stream unless it exists (its settings are then the operator's: never changed here)."""
    await when_ready(lambda: _ensure_stream(js, config), wait_s)


async def when_ready(request: Callable[[], Awaitable[T]], wait_s: float = STREAM_WAIT_S) -> T:
    """`request()`'s answer. A cluster still electing a leader (after a node died: the stream's, or a
    consumer's) answers "unavailable" or not at all for a few seconds: asked again until `wait_s` passed."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await request()
        except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError, TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise
            log.info("jetstream not ready; asking again", extra={"error": repr(exc)})
        except nats.js.errors.APIError as exc:
            if exc.code != UNAVAILABLE or time.monotonic() >= deadline:
                raise
            log.info("jetstream not ready; asking again", extra={"error": repr(exc)})
        await asyncio.sleep(0.5)


async def _ensure_stream(js: JetStreamContext, config: NatsConfig) -> None:
    try:
        await js.stream_info(config.stream)
        return
    except nats.js.errors.NotFoundError:
        pass
    stream = api.StreamConfig(
        name=config.stream,
        subjects=[f"{config.subject_prefix}.>"],
        storage=api.StorageType.FILE,
        num_replicas=config.replicas,
        max_age=config.max_age_days * 86400,
        max_bytes=config.max_bytes,
        duplicate_window=config.duplicate_window_s,
        discard=api.DiscardPolicy.OLD,
    )
    try:
        await js.add_stream(stream)
    except nats.js.errors.APIError as exc:
        if exc.code == UNAVAILABLE or isinstance(exc, nats.js.errors.ServiceUnavailableError):
            raise  # electing a leader: `when_ready` asks again
        if exc.err_code != STREAM_NAME_IN_USE:  # e.g. max_bytes more than the nodes' JetStream storage
            raise AmoskysError(
                f"jetstream refused to create stream {config.stream!r} ({config.replicas} replicas, "
                f"max_bytes {config.max_bytes}): {exc.description} (error {exc.err_code})"
            ) from exc
        await js.stream_info(config.stream)  # another hub created it meanwhile
        return
    log.info("jetstream stream created", extra={"stream": config.stream, "replicas": config.replicas})


@dataclass(frozen=True, slots=True)
class Head:
    """An agent's chain head as the stream has it: the record and the stream sequence of its message."""

    chain: ChainRecord | None
    stream_seq: int


def chain_head(headers: Mapping[str, str] | None) -> ChainRecord | None:
    """The chain position an envelope message's headers carry."""
    if not headers or HEADER_CHAIN not in headers:
        return None
    return ChainRecord(
        bytes.fromhex(headers[HEADER_CHAIN]), int(headers[HEADER_SEQ]), bytes.fromhex(headers[HEADER_DIGEST])
    )


def envelope_headers(agent_id: str, chain: ChainRecord, update: AgentUpdate, expected_seq: int) -> dict[str, str]:
    return {
        MSG_ID: f"{agent_id}/{chain.chain_id.hex()}/{chain.last_seq}",
        EXPECTED_LAST_SUBJECT_SEQ: str(expected_seq),
        HEADER_CHAIN: chain.chain_id.hex(),
        HEADER_SEQ: str(chain.last_seq),
        HEADER_DIGEST: chain.last_hash.hex(),
        HEADER_HOST: update.host,
        HEADER_KIND: update.kind,
        HEADER_CERT: str(update.cert_not_after_ns),
    }


class JetStreamLog:
    """The hub's connection to the stream, on an event loop thread of its own (the writer thread calls in)."""

    def __init__(self, config: NatsConfig, name: str) -> None:
        self.config = config
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="amoskys-jetstream", daemon=True)
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None

    def start(self) -> None:
        """Connect and make sure the stream exists; raises when NATS cannot be reached."""
        self._thread.start()
        self.call(self._connect(), self.config.request_timeout_s * 4 + STREAM_WAIT_S)  # connect: 3, stream: +1

    async def _connect(self) -> None:
        self._nc = await connect(self.config, self.name)
        self._js = self._nc.jetstream(timeout=self.config.request_timeout_s)
        await ensure_stream(self._js, self.config)

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "JetStreamLog.start() not called"
        return self._js

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the log's loop and wait for its result (from another thread)."""
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    async def head(self, agent_id: str) -> Head:
        """The last envelope on the agent's subject (None and 0 when it has none)."""
        subject = agent_subject(self.config.subject_prefix, agent_id)
        try:
            message = await self.js.get_last_msg(self.config.stream, subject)
        except nats.js.errors.NotFoundError:
            return Head(None, 0)
        return Head(chain_head(message.headers), message.seq or 0)

    async def digest_at(self, stream_seq: int) -> bytes | None:
        """The digest of the envelope stored at `stream_seq`."""
        message = await self.js.get_msg(self.config.stream, stream_seq)
        chain = chain_head(message.headers)
        return chain.last_hash if chain else None

    async def append(
        self, agent_id: str, raw: bytes, chain: ChainRecord, update: AgentUpdate, expected_seq: int
    ) -> api.PubAck:
        """Append one envelope after the subject's message `expected_seq` (0: the subject is empty)."""
        headers = envelope_headers(agent_id, chain, update, expected_seq)
        subject = agent_subject(self.config.subject_prefix, agent_id)
        try:
            return await self.js.publish(subject, raw, timeout=self.config.request_timeout_s, headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise WrongLastSequenceError(agent_id) from exc
            raise

    async def append_alert(self, hostname: str, event_id: str, body: bytes) -> None:
        subject = alert_subject(self.config.subject_prefix, hostname)
        await self.js.publish(subject, body, timeout=self.config.request_timeout_s, headers={MSG_ID: event_id})

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self.call(self._shutdown(), self.config.request_timeout_s * 2)
            except (TimeoutError, OSError, nats.errors.Error) as exc:
                log.warning("nats: close failed", extra={"error": repr(exc)})
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()

    async def _shutdown(self) -> None:
        """Close the connection, then end what the client left running on this loop."""
        try:
            if self._nc is not None:
                await self._nc.close()
        finally:
            current = asyncio.current_task()
            leftovers = [task for task in asyncio.all_tasks() if task is not current]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
