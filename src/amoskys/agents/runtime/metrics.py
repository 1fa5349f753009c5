"""The agent's Prometheus metrics (`amoskys_agent_*`), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["AgentMetrics"]


class AgentMetrics:
    def __init__(self, kind: str) -> None:
        self.registry = r = CollectorRegistry()
        self.events_collected = Counter("amoskys_agent_events_collected", "Events stored in the outbox", registry=r)
        self.events_acked = Counter("amoskys_agent_events_acked", "Events the hub acknowledged", registry=r)
        self.events_dropped = Counter(
            "amoskys_agent_events_dropped", "Events dropped by the outbox policy, by reason", ["reason"], registry=r
        )
        self.dead_letters = Counter("amoskys_agent_dead_letters", "Envelopes the hub refused for good", registry=r)
        self.retries = Counter("amoskys_agent_retries", "RETRY answers from the hub, by reason", ["reason"], registry=r)
        self.publish_errors = Counter(
            "amoskys_agent_publish_errors",
            "Failed publish attempts, by gRPC code (OUTBOX: the outbox could not be written)",
            ["code"],
            registry=r,
        )
        self.collect_errors = Counter(
            "amoskys_agent_collect_errors", "Errors raised by the collector (it is restarted)", registry=r
        )
        self.outbox_events = Gauge("amoskys_agent_outbox_events", "Events waiting in the outbox", registry=r)
        self.outbox_bytes = Gauge("amoskys_agent_outbox_bytes", "Bytes used by the outbox", registry=r)
        self.connected = Gauge("amoskys_agent_connected", "1 while a stream to the hub is up", registry=r)
        self.info = Gauge("amoskys_agent_info", "Agent kind", ["kind"], registry=r)
        self.info.labels(kind).set(1)
        self.ack_latency = Histogram(
            "amoskys_agent_ack_latency_seconds", "From envelope sent to ack",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r,
        )  # fmt: skip
