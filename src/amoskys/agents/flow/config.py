"""flow's settings: interfaces, capture filter, flow timeouts and table size (section `flow` of agent-flow.yml)."""

from __future__ import annotations

import msgspec

from amoskys.config import AgentConfig, Positive, Seconds, Section

__all__ = ["FlowAgentConfig", "FlowConfig"]


class FlowConfig(Section, frozen=True):
    interfaces: list[str] = msgspec.field(default_factory=list)
    bpf: str = "ip or ip6 or ether proto 0x8847 or ether proto 0x8848"  # IP, and IP inside MPLS
    idle_timeout_s: Seconds = 15.0
    active_timeout_s: Seconds = 60.0
    max_flows: Positive = 60_000  # a full table keeps the agent within 70 MB (BENCHMARKS.md)
    promiscuous: bool = False  # also frames not addressed to this host (a mirror/SPAN port)
    pcap: str = ""  # replay this pcap/pcapng file instead of capturing (`amoskys agent flow --pcap FILE`)


class FlowAgentConfig(AgentConfig, frozen=True):
    flow: FlowConfig = FlowConfig()
