"""What the pages show, as plain JSON-able data: liveness, hosts, events, filters, certificates."""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict

from amoskys.ui import svg
from amoskys.v1 import bus_pb2, events_pb2

__all__ = [
    "LATE_FACTOR",
    "RateHistory",
    "agent_view",
    "certificates",
    "clean",
    "devices",
    "event_view",
    "fleet",
    "host_metrics_view",
    "parse_filter",
    "summary",
]

LATE_FACTOR = 2.5  # missed heartbeat intervals before an agent is late; twice that: down
DEFAULT_INTERVAL_S = 30
STATE_RANK = {"up": 0, "late": 1, "down": 2}
SEVERITIES = [n.removeprefix("SEVERITY_").lower() for n in events_pb2.Severity.keys()][1:]  # noqa: SIM118
KINDS = ["process", "flow", "snmp", "device", "host_metrics", "auth", "port", "heartbeat", "alert"]
AGENT_KINDS = ["proc", "host", "auth", "flow", "scanner", "snmp", "eventbus"]
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SUMMARY_MAX = 300
# C0/C1 controls, DEL, and the bidi controls that can reorder what an operator reads
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean(text: str, limit: int = SUMMARY_MAX) -> str:
    """Visible escapes for control characters, cut to `limit` characters."""
    text = _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).replace("\n", " ").replace("\t", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fmt_time(ts_ns: int) -> str:
    if not ts_ns:
        return "never"
    return dt.datetime.fromtimestamp(ts_ns / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


# ---- fleet -----------------------------------------------------------------------------------


def liveness(agent: bus_pb2.AgentInfo, now_ns: int) -> str:
    """up / late / down from the agent's last heartbeat (its last envelope if it never sent one)."""
    interval = agent.heartbeat_interval_s or DEFAULT_INTERVAL_S
    age_s = (now_ns - (agent.last_heartbeat_ns or agent.last_seen_ns)) / 1e9
    if age_s <= interval * LATE_FACTOR:
        return "up"
    return "late" if age_s <= interval * 2 * LATE_FACTOR else "down"


def agent_view(agent: bus_pb2.AgentInfo, now_ns: int) -> dict[str, Any]:
    heard = agent.last_heartbeat_ns or agent.last_seen_ns
    return {
        "agent_id": agent.agent_id,
        "host": agent.host,
        "kind": agent.kind,
        "version": agent.version,
        "state": liveness(agent, now_ns),
        "last_heartbeat_ns": agent.last_heartbeat_ns,
        "last_seen_ns": agent.last_seen_ns,
        "heard_ago": ago((now_ns - heard) / 1e9),
        "heartbeat_interval_s": agent.heartbeat_interval_s,
        "events_total": agent.events_total,
        "alerts_total": agent.alerts_total,
        "last_seq": agent.last_seq,
        "cert_not_after_ns": agent.cert_not_after_ns,
    }


def by_host(agents: Iterable[bus_pb2.AgentInfo]) -> dict[str, list[bus_pb2.AgentInfo]]:
    hosts: dict[str, list[bus_pb2.AgentInfo]] = {}
    for agent in agents:
        hosts.setdefault(agent.host or "(unknown)", []).append(agent)
    return hosts


class RateHistory:
    """Events per second per host, from successive registry samples; sparklines cached per sample."""

    def __init__(self, size: int = 60) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._last: tuple[int, dict[str, int]] | None = None
        self._rates: dict[str, deque[float]] = {}
        self._charts: dict[str, str] = {}

    def update(self, taken_ns: int, agents: Iterable[bus_pb2.AgentInfo]) -> None:
        totals: dict[str, int] = {}
        for agent in agents:
            totals[agent.host] = totals.get(agent.host, 0) + agent.events_total
        with self._lock:
            if self._last is not None and taken_ns > self._last[0]:
                elapsed, before = (taken_ns - self._last[0]) / 1e9, self._last[1]
                for host, total in totals.items():
                    rate = max(total - before.get(host, total), 0) / elapsed
                    self._rates.setdefault(host, deque(maxlen=self.size)).append(rate)
                self._charts = {h: svg.sparkline(r, f"events/s, now {r[-1]:.1f}") for h, r in self._rates.items()}
            self._last = (taken_ns, totals)

    def rate(self, host: str) -> float | None:
        series = self._rates.get(host)
        return series[-1] if series else None

    def series(self, host: str) -> list[float]:
        return list(self._rates.get(host, ()))

    def chart(self, host: str) -> str:
        return self._charts.get(host) or svg.sparkline([], "events/s: collecting samples")


def fleet(agents: Sequence[bus_pb2.AgentInfo], rates: RateHistory, now_ns: int) -> dict[str, Any]:
    """Every host with its agents; problems (down, then late) first, then by name."""
    hosts = []
    counts = {"up": 0, "late": 0, "down": 0}
    for host, members in by_host(agents).items():
        views = [agent_view(a, now_ns) for a in members]
        for view in views:
            counts[view["state"]] += 1
        hosts.append(
            {
                "host": host,
                "state": max((v["state"] for v in views), key=STATE_RANK.__getitem__),
                "agents": views,
                "events_total": sum(a.events_total for a in members),
                "alerts_total": sum(a.alerts_total for a in members),
                "last_seen_ns": max(a.last_seen_ns for a in members),
                "last_heartbeat_ns": max(a.last_heartbeat_ns or a.last_seen_ns for a in members),
                "rate_eps": rates.rate(host),
            }
        )
    hosts.sort(key=lambda h: (-STATE_RANK[h["state"]], h["host"]))
    return {"generated_ns": now_ns, "agents": counts, "hosts": hosts}


def certificates(agents: Sequence[bus_pb2.AgentInfo], now_ns: int) -> list[dict[str, Any]]:
    """Client certificate expiry per agent, soonest first (unknown last)."""
    rows = [
        {
            "agent_id": a.agent_id,
            "host": a.host,
            "not_after_ns": a.cert_not_after_ns,
            "not_after": fmt_time(a.cert_not_after_ns) if a.cert_not_after_ns else "unknown",
            "days_left": (a.cert_not_after_ns - now_ns) // 86_400_000_000_000 if a.cert_not_after_ns else None,
        }
        for a in agents
    ]
    rows.sort(key=lambda r: (r["not_after_ns"] == 0, r["not_after_ns"]))
    return rows


# ---- events ----------------------------------------------------------------------------------


def _summary(event: events_pb2.Event, kind: str) -> str:  # noqa: PLR0911 - one line per kind
    if kind == "process":
        p = event.process
        action = events_pb2.ProcessEvent.Action.Name(p.action).lower()
        return f"{action} {p.name} pid {p.pid} user {p.user} {' '.join(p.cmdline) or p.exe}"
    if kind == "auth":
        a = event.auth
        return a.raw or f"{events_pb2.AuthEvent.Kind.Name(a.kind).lower()} {a.user} {a.src_ip} {a.command}"
    if kind == "alert":
        return f"{event.alert.rule}: {event.alert.summary}"
    if kind == "flow":
        f = event.flow
        return f"{f.src_ip}:{f.src_port} → {f.dst_ip}:{f.dst_port} proto {f.protocol} {f.bytes_out}/{f.bytes_in} B"
    if kind == "device":
        d = event.device
        action = events_pb2.DeviceEvent.Action.Name(d.action).lower()
        return f"{action} {d.mac} {' '.join(d.ips)} {d.vendor}"
    if kind == "port":
        sock, action = event.port.socket, events_pb2.PortChange.Action.Name(event.port.action).lower()
        return f"{action} {sock.protocol} {sock.address}:{sock.port} {sock.process}"
    if kind == "host_metrics":
        m = event.host_metrics
        return f"cpu {m.cpu_percent:.0f}% load {m.load1:.2f} mem available {m.mem_available_bytes / 2**20:,.0f} MiB"
    if kind == "heartbeat":
        return f"heartbeat version {event.heartbeat.version} every {event.heartbeat.interval_s} s"
    if kind == "snmp":
        snmp = event.snmp
        return f"{events_pb2.SnmpEvent.Kind.Name(snmp.kind).lower()} {snmp.target} {snmp.sys_name} {snmp.error}"
    return kind


def summary(event: events_pb2.Event) -> str:
    """What happened, in one line safe to show (the UI's Summary column, `amoskys query`'s last column)."""
    return clean(_summary(event, event.WhichOneof("body") or "none"))


def event_view(stored: bus_pb2.StoredEvent) -> dict[str, Any]:
    """One stored event for a table row and the JSON API (body as protobuf JSON)."""
    event = stored.event
    kind = event.WhichOneof("body") or "none"
    body = MessageToDict(getattr(event, kind), preserving_proto_field_name=True) if kind != "none" else {}
    return {
        "cursor": stored.cursor,
        "agent_id": stored.agent_id,
        "received_ns": stored.received_ns,
        "event_id": event.event_id,
        "ts_ns": event.ts_ns,
        "time": fmt_time(event.ts_ns),
        "host": event.host,
        "agent": event.agent,
        "severity": events_pb2.Severity.Name(event.severity).removeprefix("SEVERITY_").lower(),
        "kind": kind,
        "summary": summary(event),
        "labels": dict(event.labels),
        "body": body,
    }


def host_metrics_view(stored: bus_pb2.StoredEvent | None) -> dict[str, Any] | None:
    """The latest host_metrics event: its figures and its listening sockets, by port."""
    if stored is None:
        return None
    m = stored.event.host_metrics
    listening = sorted(
        ({"protocol": s.protocol, "address": s.address, "port": s.port, "pid": s.pid, "process": s.process}
         for s in m.listening),
        key=lambda s: (s["port"], s["protocol"], s["address"]),
    )  # fmt: skip
    return {
        "time": fmt_time(stored.event.ts_ns),
        "cpu_percent": m.cpu_percent,
        "load": [m.load1, m.load5, m.load15],
        "mem_total_bytes": m.mem_total_bytes,
        "mem_available_bytes": m.mem_available_bytes,
        "swap_used_bytes": m.swap_used_bytes,
        "uptime": ago(m.uptime_s),
        "users": list(m.users),
        "disks": [
            {"mount": d.mount, "fstype": d.fstype, "total_bytes": d.total_bytes, "used_bytes": d.used_bytes}
            for d in m.disks
        ],
        "listening": listening,
    }


def devices(events: Iterable[bus_pb2.StoredEvent]) -> list[dict[str, Any]]:
    """Devices from newest-first device events: the latest state per device, gone ones left out.

    A device is its MAC on an interface; one found by ICMP (a routed subnet) has no MAC, so its address names it.
    """
    latest: dict[tuple[str, str], bus_pb2.StoredEvent] = {}
    for stored in events:
        device = stored.event.device
        latest.setdefault((device.interface, device.mac or ",".join(device.ips)), stored)
    return [
        {
            "mac": s.event.device.mac,
            "ips": list(s.event.device.ips),
            "vendor": s.event.device.vendor,
            "interface": s.event.device.interface,
            "last_change": events_pb2.DeviceEvent.Action.Name(s.event.device.action).lower(),
            "time": fmt_time(s.event.ts_ns),
        }
        for s in latest.values()
        if s.event.device.action != events_pb2.DeviceEvent.GONE
    ]


# ---- filters ---------------------------------------------------------------------------------


def parse_time(text: str, now_ns: int, key: str = "time") -> int:
    """'' (unbounded), a duration back from now (15m, 2h, 7d), or a UTC time (2026-11-22T18:00[:00])."""
    text = text.strip()
    if not text:
        return 0
    if match := re.fullmatch(r"(\d+)\s*([smhd])", text):
        return now_ns - int(match.group(1)) * UNITS[match.group(2)] * 1_000_000_000
    try:
        moment = dt.datetime.fromisoformat(text.removesuffix("Z"))
    except ValueError:
        raise ValueError(f"{key} {text!r}: expected 15m, 2h, 7d or YYYY-MM-DDTHH:MM") from None
    return int(moment.replace(tzinfo=moment.tzinfo or dt.UTC).timestamp() * 1e9)


def _values(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_filter(params: Mapping[str, str], default_since: str = "24h") -> tuple[bus_pb2.EventFilter, dict[str, str]]:
    """An EventFilter from query parameters, and the form values to show back; ValueError if invalid."""
    form = {key: params.get(key, "") for key in ("until", "host", "agent_id", "agent", "kind", "severity", "text")}
    form["since"] = params.get("since", default_since)
    now_ns = time.time_ns()
    severity = form["severity"].lower()
    if severity and severity not in SEVERITIES:
        raise ValueError(f"severity {severity!r}: expected one of {', '.join(SEVERITIES)}")
    kinds = _values(form["kind"])
    if unknown := [k for k in kinds if k not in KINDS]:
        raise ValueError(f"kind {unknown[0]!r}: expected one of {', '.join(KINDS)}")
    flt = bus_pb2.EventFilter(
        since_ns=parse_time(form["since"], now_ns, "since"),
        until_ns=parse_time(form["until"], now_ns, "until"),
        hosts=_values(form["host"]),
        agent_ids=_values(form["agent_id"]),
        agents=_values(form["agent"]),
        kinds=kinds,
        min_severity=events_pb2.Severity.Value(f"SEVERITY_{severity.upper()}") if severity else 0,  # type: ignore[arg-type]
        text=form["text"][:200],
    )
    return flt, form
