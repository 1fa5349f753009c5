"""`amoskys nats-exporter`: the local NATS node's monitoring endpoint (JSON) as Prometheus metrics (`amoskys_nats_*`).

Every scrape asks the node afresh (/varz, /routez, /healthz, /jsz with its streams and consumers), all within
`timeout_s`. A node that does not answer, or answers what cannot be read, is `amoskys_nats_up 0` and nothing
else: the scrape itself still succeeds, so Prometheus tells a stopped node from a stopped exporter.
"""

from __future__ import annotations

import http.client
import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import msgspec
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from amoskys import systemd
from amoskys.config import NatsExporterConfig, parse_address

__all__ = ["NatsCollector", "NatsExporter", "NodeView", "read_node"]

log = logging.getLogger(__name__)
T = TypeVar("T")
UP_HELP = "1 when the node's monitoring endpoint answered this scrape"


class _Json(msgspec.Struct, frozen=True):
    """What the exporter reads of nats-server's monitoring JSON (2.9): every other field is ignored."""


class Varz(_Json, frozen=True):
    server_name: str = ""
    connections: int = 0
    slow_consumers: int = 0
    mem: int = 0
    cpu: float = 0.0


class Routez(_Json, frozen=True):
    num_routes: int = 0


class Healthz(_Json, frozen=True):
    status: str = ""


class Peer(_Json, frozen=True):
    name: str = ""
    current: bool = False


class Placement(_Json, frozen=True):
    leader: str = ""
    replicas: list[Peer] = []  # the stream's other peers, as the node asked sees them


class StreamState(_Json, frozen=True):
    messages: int = 0
    bytes: int = 0


class ConsumerDetail(_Json, frozen=True):
    name: str = ""
    num_pending: int = 0


class StreamDetail(_Json, frozen=True):
    name: str = ""
    state: StreamState = StreamState()
    cluster: Placement | None = None
    consumer_detail: list[ConsumerDetail] = []


class AccountDetail(_Json, frozen=True):
    name: str = ""
    stream_detail: list[StreamDetail] = []


class JetStreamLimits(_Json, frozen=True):
    max_memory: int = 0
    max_storage: int = 0


class Jsz(_Json, frozen=True):
    disabled: bool = False
    config: JetStreamLimits | None = None
    memory: int = 0
    storage: int = 0
    reserved_memory: int = 0
    reserved_storage: int = 0
    streams: int = 0
    consumers: int = 0
    messages: int = 0
    bytes: int = 0
    account_details: list[AccountDetail] = []


@dataclass(frozen=True, slots=True)
class NodeView:
    """One scrape's answers of the node."""

    varz: Varz
    routez: Routez
    healthz: Healthz
    jsz: Jsz

    @property
    def jetstream(self) -> bool:
        return not self.jsz.disabled and self.jsz.config is not None


def _get(url: str, kind: type[T], deadline: float, *, error_body: bool = False) -> T:
    """GET url and decode its JSON as `kind` before `deadline` (monotonic); `error_body`: an HTTP error's
    body is the answer (/healthz says 503 and why)."""
    timeout = deadline - time.monotonic()
    if timeout <= 0:
        raise TimeoutError(f"{url}: no time left in this scrape")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (the configured http(s) URL)
            body: bytes = response.read()
    except urllib.error.HTTPError as error:
        if not error_body:
            raise
        body = error.read()
    return msgspec.json.decode(body, type=kind)


def read_node(base_url: str, timeout_s: float) -> NodeView:
    """The node's /varz, /routez, /healthz and /jsz (accounts, streams, consumers) within `timeout_s`; else
    OSError (unreachable, timed out, HTTP error), http.client.HTTPException or msgspec.DecodeError."""
    base = base_url.rstrip("/")
    deadline = time.monotonic() + timeout_s
    return NodeView(
        varz=_get(f"{base}/varz", Varz, deadline),
        routez=_get(f"{base}/routez", Routez, deadline),
        healthz=_get(f"{base}/healthz", Healthz, deadline, error_body=True),
        jsz=_get(f"{base}/jsz?accounts=true&streams=true&consumers=true", Jsz, deadline),
    )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def _node_metrics(node: NodeView) -> Iterator[Metric]:
    varz = node.varz
    yield _gauge(
        "amoskys_nats_healthy",
        "1 when /healthz says ok (JetStream current, the node routed)",
        node.healthz.status == "ok",
    )
    yield _gauge("amoskys_nats_routes", "Cluster routes of this node", node.routez.num_routes)
    yield _gauge("amoskys_nats_connections", "Client connections (hubs, indexer)", varz.connections)
    slow = CounterMetricFamily("amoskys_nats_slow_consumers", "Clients cut for not reading fast enough")
    slow.add_metric([], varz.slow_consumers)
    yield slow
    yield _gauge("amoskys_nats_mem_bytes", "Resident memory of nats-server", varz.mem)
    yield _gauge("amoskys_nats_cpu_percent", "CPU use of nats-server as /varz gives it (percent of one core)", varz.cpu)
    yield _gauge("amoskys_nats_jetstream_enabled", "1 when JetStream runs on this node", node.jetstream)


def _jetstream_metrics(jsz: Jsz) -> Iterator[Metric]:
    limits = jsz.config or JetStreamLimits()
    for name, what, memory, file in (
        ("amoskys_nats_jetstream_used_bytes", "JetStream storage used", jsz.memory, jsz.storage),
        ("amoskys_nats_jetstream_reserved_bytes", "JetStream storage reserved by stream limits",
         jsz.reserved_memory, jsz.reserved_storage),
        ("amoskys_nats_jetstream_max_bytes", "JetStream storage this node may use", limits.max_memory,
         limits.max_storage),
    ):  # fmt: skip
        family = GaugeMetricFamily(name, f"{what}, by store", labels=["store"])
        family.add_metric(["memory"], memory)
        family.add_metric(["file"], file)
        yield family
    yield _gauge("amoskys_nats_jetstream_streams", "Streams on this node", jsz.streams)
    yield _gauge("amoskys_nats_jetstream_consumers", "Consumers on this node", jsz.consumers)
    yield _gauge("amoskys_nats_jetstream_messages", "Messages in this node's streams", jsz.messages)
    yield _gauge("amoskys_nats_jetstream_bytes", "Bytes in this node's streams", jsz.bytes)


def _stream_metrics(node: NodeView) -> Iterator[Metric]:
    labels = ["account", "stream"]
    families = {
        "messages": GaugeMetricFamily("amoskys_nats_stream_messages", "Messages in the stream", labels=labels),
        "bytes": GaugeMetricFamily("amoskys_nats_stream_bytes", "Bytes in the stream", labels=labels),
        "leader": GaugeMetricFamily("amoskys_nats_stream_leader", "1 when this node leads the stream", labels=labels),
        "replicas": GaugeMetricFamily("amoskys_nats_stream_replicas", "Peers holding the stream", labels=labels),
        "current": GaugeMetricFamily(
            "amoskys_nats_stream_replicas_current",
            "Peers current as this node sees them, itself counted when it leads (only the leader's view is "
            "reliable: a follower's view of another follower goes stale)",
            labels=labels,
        ),
    }
    pending = GaugeMetricFamily(
        "amoskys_nats_consumer_num_pending", "Messages the consumer has yet to be delivered",
        labels=[*labels, "consumer"],
    )  # fmt: skip
    for account in node.jsz.account_details:
        for stream in account.stream_detail:
            key = [account.name, stream.name]
            placement = stream.cluster or Placement(leader=node.varz.server_name)  # a single server leads all
            leads = placement.leader == node.varz.server_name
            families["messages"].add_metric(key, stream.state.messages)
            families["bytes"].add_metric(key, stream.state.bytes)
            families["leader"].add_metric(key, leads)
            families["replicas"].add_metric(key, len(placement.replicas) + 1)
            families["current"].add_metric(key, sum(peer.current for peer in placement.replicas) + leads)
            for consumer in stream.consumer_detail:
                pending.add_metric([*key, consumer.name], consumer.num_pending)
    yield from families.values()
    yield pending


class NatsCollector(Collector):
    """At scrape time: the node's state as `amoskys_nats_*`; `amoskys_nats_up 0` alone when it cannot be read."""

    def __init__(self, monitor_url: str, timeout_s: float) -> None:
        self.monitor_url = monitor_url
        self.timeout_s = timeout_s
        self._was_up: bool | None = None

    def collect(self) -> Iterator[Metric]:
        try:
            node = read_node(self.monitor_url, self.timeout_s)
        except (OSError, ValueError, http.client.HTTPException, msgspec.DecodeError) as error:
            self._note(False, error)
            yield _gauge("amoskys_nats_up", UP_HELP, 0)
            return
        self._note(True, None)
        yield _gauge("amoskys_nats_up", UP_HELP, 1)
        yield from _node_metrics(node)
        if node.jetstream:
            yield from _jetstream_metrics(node.jsz)
            yield from _stream_metrics(node)

    def _note(self, up: bool, error: Exception | None) -> None:
        """Log when the node is lost or back (not on every scrape)."""
        if up != self._was_up:
            if up:
                log.info("NATS monitoring endpoint answers", extra={"url": self.monitor_url})
            else:
                log.warning(
                    "NATS monitoring endpoint unreadable", extra={"url": self.monitor_url, "error": repr(error)}
                )
        self._was_up = up


class NatsExporter:
    """The collector behind an HTTP server (`metrics.listen`), until SIGTERM/SIGINT or `request_stop`."""

    def __init__(self, config: NatsExporterConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.registry.register(NatsCollector(config.monitor_url, config.timeout_s))
        host, port = parse_address(config.metrics.listen)
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port: int = self._server.server_port
        self._stop = threading.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        """Serve; ping systemd's watchdog while the HTTP server thread lives."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda _sig, _frame: self._stop.set())
        systemd.notify("READY=1", f"STATUS=exporting {self.config.monitor_url} on port {self.port}")
        log.info("nats exporter running", extra={"monitor_url": self.config.monitor_url, "port": self.port})
        try:
            if not systemd.wait_while_alive(self._stop, self._thread):
                log.error("the metrics server stopped")
                return 1
        finally:
            systemd.notify("STOPPING=1")
            self._server.shutdown()
            self._server.server_close()
        log.info("nats exporter stopped")
        return 0
