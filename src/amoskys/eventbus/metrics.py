"""The hub's Prometheus metrics (`amoskys_bus_*`), in a registry of their own."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from amoskys.eventbus.acks import STATUS_INVALID, STATUS_OK, STATUS_RETRY, STATUS_UNAUTHORIZED, Ack, label
from amoskys.v1 import bus_pb2

__all__ = ["BusMetrics", "CertificateExpiry", "Totals"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class CertificateExpiry(Collector):
    """At scrape time: when the hub's own certificate and each agent's client certificate expire."""

    def __init__(self, hub_not_after: Callable[[], float], agents: Callable[[], list[bus_pb2.AgentInfo]]) -> None:
        self.hub_not_after = hub_not_after
        self.agents = agents

    def collect(self) -> Iterator[Metric]:
        hub = GaugeMetricFamily(
            "amoskys_bus_cert_expiry_timestamp_seconds", "When the hub's server certificate expires (Unix time)"
        )
        hub.add_metric([], self.hub_not_after())
        yield hub
        agents = GaugeMetricFamily(
            "amoskys_bus_agent_cert_expiry_timestamp_seconds",
            "When each agent's client certificate expires (Unix time), as last presented to the hub",
            labels=["agent_id", "host"],
        )
        for agent in self.agents():
            if agent.cert_not_after_ns:
                agents.add_metric([agent.agent_id, agent.host], agent.cert_not_after_ns / 1e9)
        yield agents


@dataclass
class Totals:
    """What `GetStatus` reports, kept beside the Prometheus counters (never read back from them)."""

    rejected: collections.Counter[str] = field(default_factory=collections.Counter)  # by reason label
    retries: int = 0
    chain_breaks: int = 0
    events_stored: int = 0
    streams: int = 0  # open publish streams


class BusMetrics:
    def __init__(self) -> None:
        self.totals = Totals()
        self.registry = CollectorRegistry()
        r = self.registry
        self.envelopes_received = Counter("amoskys_bus_envelopes_received", "Envelopes received", registry=r)
        self.events_received = Counter("amoskys_bus_events_received", "Events in received envelopes", registry=r)
        self.events_stored = Counter("amoskys_bus_events_stored", "Events committed to the store", registry=r)
        self.future_events = Counter(
            "amoskys_bus_future_events", "Events stamped beyond the allowed clock skew (filed at hub time)", registry=r
        )
        self.alerts_suppressed = Counter(
            "amoskys_bus_alerts_suppressed", "Hub alerts not stored (rate limit per agent and rule)", ["rule"],
            registry=r,
        )  # fmt: skip
        self.duplicates = Counter("amoskys_bus_duplicates", "Envelopes resent and acked without storing", registry=r)
        self.rejected = Counter("amoskys_bus_rejected", "Envelopes rejected, by reason", ["reason"], registry=r)
        self.retries = Counter("amoskys_bus_retries", "RETRY answers, by reason", ["reason"], registry=r)
        self.chain_breaks = Counter("amoskys_bus_chain_breaks", "Chain breaks and forks, by kind", ["kind"], registry=r)
        self.inflight_events = Gauge("amoskys_bus_inflight_events", "Events waiting for commit", registry=r)
        self.streams = Gauge("amoskys_bus_streams", "Open publish streams", registry=r)
        self.subscribers_cut = Counter(
            "amoskys_bus_subscribers_cut", "Subscribe streams ended because the consumer stopped reading", registry=r
        )
        self.subscribers = Gauge("amoskys_bus_subscribers", "Live Subscribe streams", registry=r)
        self.store_bytes = Gauge("amoskys_bus_store_bytes", "Bytes used by the store", registry=r)
        self.store_errors = Counter("amoskys_bus_store_errors", "Failed store commits, by kind", ["kind"], registry=r)
        self.pruned = Counter("amoskys_bus_pruned_events", "Events removed by retention", registry=r)
        self.ack_latency = Histogram(
            "amoskys_bus_ack_latency_seconds",
            "From envelope received to ack sent",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.commit_batch = Histogram(
            "amoskys_bus_commit_events",
            "Events per group commit",
            buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 25000),
            registry=r,
        )

    def count_answer(self, ack: Ack) -> None:
        """The one place answers are counted by reason (`acks.label`): RETRY in `retries`, INVALID and
        UNAUTHORIZED in `rejected`; OK in neither (duplicates have their own counter)."""
        if ack.status == STATUS_OK:
            return
        if ack.status == STATUS_RETRY:
            self.retries.labels(label(ack.code)).inc()
            self.totals.retries += 1
        elif ack.status in (STATUS_INVALID, STATUS_UNAUTHORIZED):
            self.rejected.labels(label(ack.code)).inc()
            self.totals.rejected[label(ack.code)] += 1

    def count_stored(self, events: int) -> None:
        self.events_stored.inc(events)
        self.totals.events_stored += events

    def count_chain_break(self, kind: str) -> None:
        """A chain "break", "fork" or "reset"."""
        self.chain_breaks.labels(kind).inc()
        self.totals.chain_breaks += 1

    def count_stream(self, delta: int) -> None:
        self.streams.inc(delta)
        self.totals.streams += delta
