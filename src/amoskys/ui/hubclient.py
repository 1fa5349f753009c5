"""The UI's link to the hub: gRPC over mTLS on one asyncio loop in a background thread.

WSGI worker threads call the synchronous methods; each submits a coroutine to the loop with
`asyncio.run_coroutine_threadsafe` and waits for it. The registry (ListAgents) and hub status are
also sampled every `refresh_s` into a short history, from which the pages draw event rates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from amoskys.client import hub_channel, hub_stub
from amoskys.config import TlsConfig
from amoskys.errors import AmoskysError
from amoskys.ui.metrics import UiMetrics
from amoskys.ui.model import RateHistory
from amoskys.v1 import bus_pb2, bus_pb2_grpc

__all__ = ["HubClient", "HubError", "Snapshot"]

T = TypeVar("T")
log = logging.getLogger(__name__)
HISTORY = 60  # samples kept for the rate charts
SLOW_HINT = " (a text search scans every event in its time range: narrow the range, or add a host or kind)"


class HubError(AmoskysError):
    """The hub refused or did not answer; `code` is the gRPC status code."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The registry and hub status at one moment."""

    taken_ns: int
    agents: Sequence[bus_pb2.AgentInfo]
    status: bus_pb2.HubStatus


class HubClient:
    """Owns the channel, the loop thread and the sampled history; close() releases all three."""

    def __init__(
        self,
        address: str,
        tls: TlsConfig,
        server_name: str = "",
        timeout_s: float = 10.0,
        refresh_s: float = 5.0,
        metrics: UiMetrics | None = None,
    ) -> None:
        self.address = address
        self.metrics = metrics or UiMetrics()
        self.timeout_s = timeout_s
        self.refresh_s = refresh_s
        self.history: deque[Snapshot] = deque(maxlen=HISTORY)
        self.rates = RateHistory(HISTORY)
        self.listeners: list[Callable[[Snapshot], object]] = []  # run in a worker thread after each sample
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ui-hub", daemon=True)
        self._thread.start()
        self._stub: bus_pb2_grpc.EventBusAsyncStub
        self._channel, self._sampler = self._run(self._open(tls, server_name), "open")

    async def _open(self, tls: TlsConfig, server_name: str) -> tuple[grpc.aio.Channel, asyncio.Task[None]]:
        """Channel and sampler are created on the loop that will use them."""
        channel = hub_channel(self.address, tls, server_name)
        self._stub = hub_stub(channel)
        return channel, asyncio.create_task(self._sample_forever(), name="ui-hub-sampler")

    def _run(self, coro: Coroutine[Any, Any, T], call: str) -> T:
        """Run `coro` on the hub loop, timed as `call`; gRPC failures and timeouts become HubError."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        with self._observed(call):
            try:
                return future.result(self.timeout_s)
            except TimeoutError as exc:
                future.cancel()
                raise HubError(f"hub {self.address}: no answer within {self.timeout_s} s{SLOW_HINT}") from exc
            except grpc.aio.AioRpcError as exc:
                hint = SLOW_HINT if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else ""
                raise HubError(f"hub {self.address}: {exc.code().name}: {exc.details()}{hint}", exc.code()) from exc

    @contextlib.contextmanager
    def _observed(self, call: str) -> Iterator[None]:
        """The call's duration, and its failure by gRPC status (DEADLINE_EXCEEDED for our own timeout)."""
        started = time.monotonic()
        try:
            yield
        except HubError as exc:
            self._failed(call, exc.code or grpc.StatusCode.DEADLINE_EXCEEDED)
            raise
        except grpc.aio.AioRpcError as exc:
            self._failed(call, exc.code())
            raise
        except TimeoutError:
            self._failed(call, grpc.StatusCode.DEADLINE_EXCEEDED)
            raise
        finally:
            self.metrics.hub_seconds.labels(call).observe(time.monotonic() - started)

    def _failed(self, call: str, code: grpc.StatusCode) -> None:
        self.metrics.hub_errors.labels(call, code.name).inc()

    # ---- calls --------------------------------------------------------------------------------

    def query(self, request: bus_pb2.QueryRequest) -> bus_pb2.QueryResponse:
        return self.query_many([request])[0]

    def query_many(self, requests: Sequence[bus_pb2.QueryRequest]) -> list[bus_pb2.QueryResponse]:
        """Several queries at once (a page that needs three answers waits for the slowest only).

        Calls are created inside the coroutine: gRPC aio objects belong to the loop's thread.
        """

        async def gather() -> list[bus_pb2.QueryResponse]:
            calls = [self._stub.Query(r, timeout=self.timeout_s) for r in requests]
            return list(await asyncio.gather(*calls))

        return self._run(gather(), "query")

    def tail(self, flt: bus_pb2.EventFilter, after_cursor: int, wait_s: float, limit: int) -> list[bus_pb2.StoredEvent]:
        """Stored events after `after_cursor` (replayed, then live for up to `wait_s`), oldest first."""
        request = bus_pb2.SubscribeRequest(filter=flt, after_cursor=after_cursor, replay=True)

        async def collect() -> list[bus_pb2.StoredEvent]:
            events: list[bus_pb2.StoredEvent] = []
            call = self._stub.Subscribe(request)
            try:
                async with asyncio.timeout(wait_s):
                    async for stored in call:
                        events.append(stored)
                        if len(events) >= limit:
                            break
            except TimeoutError:
                pass
            finally:
                call.cancel()
            return events

        return self._run(collect(), "tail")

    def snapshot(self, max_age_s: float | None = None) -> Snapshot:
        """The latest sample, or a fresh one when it is older than `max_age_s` (default 2 x refresh_s)."""
        limit_ns = (2 * self.refresh_s if max_age_s is None else max_age_s) * 1e9
        if self.history and time.time_ns() - self.history[-1].taken_ns <= limit_ns:
            return self.history[-1]
        return self._run(self._sample(), "sample")

    async def _sample(self) -> Snapshot:
        agents, status = await asyncio.gather(
            self._stub.ListAgents(bus_pb2.ListAgentsRequest(), timeout=self.timeout_s),
            self._stub.GetStatus(bus_pb2.StatusRequest(), timeout=self.timeout_s),
        )
        sample = Snapshot(time.time_ns(), agents.agents, status)
        self.history.append(sample)
        self.rates.update(sample.taken_ns, sample.agents)
        return sample

    async def _sample_forever(self) -> None:
        while True:
            try:
                with self._observed("sample"):
                    sample = await self._sample()
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                log.warning("hub sample failed", extra={"hub": self.address, "error": str(exc)})
            else:
                await self._notify(sample)
            await asyncio.sleep(self.refresh_s)

    async def _notify(self, sample: Snapshot) -> None:
        for listener in self.listeners:
            try:
                await asyncio.to_thread(listener, sample)
            except Exception:  # a view that fails to build must not stop the sampling
                log.exception("sample listener failed")

    async def _shutdown(self) -> None:
        self._sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sampler
        await self._channel.close()

    def close(self) -> None:
        """Stop sampling, close the channel, stop the loop and join its thread."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(AmoskysError):
            self._run(self._shutdown(), "close")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.timeout_s)
        self._loop.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
