"""What the pages show, as plain JSON-able data: liveness, hosts, events, filters, certificates."""

from __future__ import annotations

import datetime as dt
import json
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from google.protobuf.json_format import MessageToDict

from amoskys import catalog
from amoskys.bodies import summary_line
from amoskys.semantics import (
    LATE_FACTOR,
    SEVERITIES,
    STATES,
    heard_ns,
    liveness,
    parse_time,
    severity_name,
    severity_value,
)
from amoskys.ui import svg
from amoskys.v1 import bus_pb2, events_pb2

__all__ = [
    "LATE_FACTOR",
    "MAX_FILTER_VALUES",
    "SEVERITIES",
    "SHOWN_KINDS",
    "RateHistory",
    "agent_view",
    "certificates",
    "clean",
    "clean_tree",
    "devices",
    "event_view",
    "fleet",
    "host_metrics_view",
    "host_url",
    "parse_filter",
    "summary",
    "to_json",
]

STATE_RANK = {state: rank for rank, state in enumerate(STATES)}
KINDS = [field.name for field in events_pb2.Event.DESCRIPTOR.oneofs_by_name["body"].fields]  # the proto's bodies
SHOWN_KINDS = [k for k in KINDS if k != "heartbeat"]  # event lists, unless asked for heartbeats or a kind
AGENT_KINDS = [*sorted(catalog.AGENT_KINDS), catalog.HUB_AGENT]
SUMMARY_MAX = 300
MAX_FILTER_VALUES = 100  # per list filter (host, agent_id, agent, kind)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def clean(text: str, limit: int | None = None) -> str:
    """Agent-sent text as the UI shows it: every character Python calls unprintable (controls, bidi and
    other format characters, zero-width and line separators, non-ASCII spaces, private use, unassigned)
    as a visible `\\u202e`-style escape; cut to `limit` characters when given."""
    if not text.isprintable():
        text = "".join(char if char.isprintable() else _escape(char) for char in text)
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def clean_tree(value: Any) -> Any:
    """`clean` applied to every string (and mapping key) in JSON-like data."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(str(k)): clean_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_tree(v) for v in value]
    return value


def finite(value: Any) -> Any:
    """JSON-like data with every non-finite float (NaN, ±Infinity) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def to_json(data: Any) -> str:
    """Strict JSON (RFC 8259 has no NaN or Infinity): non-finite floats become null."""
    return json.dumps(finite(data), allow_nan=False)


def host_url(host: str) -> str:
    """The host page's path; percent-encoding keeps the exact name (and shows nothing unprintable)."""
    return f"/hosts/{quote(host, safe='')}"


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


def agent_view(agent: bus_pb2.AgentInfo, now_ns: int) -> dict[str, Any]:
    return {
        "agent_id": clean(agent.agent_id),
        "host": clean(agent.host),
        "kind": clean(agent.kind),
        "version": clean(agent.version),
        "state": liveness(agent, now_ns),
        "last_heartbeat_ns": agent.last_heartbeat_ns,
        "last_seen_ns": agent.last_seen_ns,
        "heard_ago": ago((now_ns - heard_ns(agent)) / 1e9),
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
    """Events per second per host (by its shown name, `clean`), from successive registry samples;
    sparklines cached per sample."""

    def __init__(self, size: int = 60) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._last: tuple[int, dict[str, int]] | None = None
        self._rates: dict[str, deque[float]] = {}
        self._charts: dict[str, str] = {}

    def update(self, taken_ns: int, agents: Iterable[bus_pb2.AgentInfo]) -> None:
        totals: dict[str, int] = {}
        for agent in agents:
            host = clean(agent.host)
            totals[host] = totals.get(host, 0) + agent.events_total
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
    counts = dict.fromkeys(STATES, 0)
    for host, members in by_host(agents).items():
        views = [agent_view(a, now_ns) for a in members]
        for view in views:
            counts[view["state"]] += 1
        shown = clean(host)
        hosts.append(
            {
                "host": shown,
                "host_url": host_url(host),
                "state": max((v["state"] for v in views), key=STATE_RANK.__getitem__),
                "agents": views,
                "events_total": sum(a.events_total for a in members),
                "alerts_total": sum(a.alerts_total for a in members),
                "last_seen_ns": max(a.last_seen_ns for a in members),
                "last_heartbeat_ns": max(heard_ns(a) for a in members),
                "rate_eps": rates.rate(shown),
            }
        )
    hosts.sort(key=lambda h: (-STATE_RANK[h["state"]], h["host"]))
    return {"generated_ns": now_ns, "agents": counts, "hosts": hosts}


def certificates(agents: Sequence[bus_pb2.AgentInfo], now_ns: int) -> list[dict[str, Any]]:
    """Client certificate expiry per agent, soonest first (unknown last)."""
    rows = [
        {
            "agent_id": clean(a.agent_id),
            "host": clean(a.host),
            "not_after_ns": a.cert_not_after_ns,
            "not_after": fmt_time(a.cert_not_after_ns) if a.cert_not_after_ns else "unknown",
            "days_left": (a.cert_not_after_ns - now_ns) // 86_400_000_000_000 if a.cert_not_after_ns else None,
        }
        for a in agents
    ]
    rows.sort(key=lambda r: (r["not_after_ns"] == 0, r["not_after_ns"]))
    return rows


# ---- events ----------------------------------------------------------------------------------


def summary(event: events_pb2.Event) -> str:
    """What happened, in one line safe to show (the UI's Summary column, `amoskys query`'s last column)."""
    return clean(summary_line(event, event.WhichOneof("body") or "none"), SUMMARY_MAX)


def event_view(stored: bus_pb2.StoredEvent) -> dict[str, Any]:
    """One stored event for a table row and the JSON API (body as protobuf JSON), its text `clean`."""
    event = stored.event
    kind = event.WhichOneof("body") or "none"
    body = MessageToDict(getattr(event, kind), preserving_proto_field_name=True) if kind != "none" else {}
    return {
        "cursor": stored.cursor,
        "agent_id": clean(stored.agent_id),
        "received_ns": stored.received_ns,
        "event_id": clean(event.event_id),
        "ts_ns": event.ts_ns,
        "time": fmt_time(event.ts_ns),
        "host": clean(event.host),
        "host_url": host_url(event.host),
        "agent": clean(event.agent),
        "severity": severity_name(event.severity),
        "kind": kind,
        "summary": summary(event),
        "labels": clean_tree(dict(event.labels)),
        "body": clean_tree(body),
    }


UNKNOWN_OWNER = "unknown"
UNKNOWN_PROCESS = "unknown process"
UNKNOWN_OWNER_WHY = (
    "the host agent could not see which process holds this socket: it runs as its own user and reads other "
    "users' /proc/PID/fd only where its unit grants that; the user shown is the socket's owner, which the kernel "
    "tells anyone: the user that created the socket"
)


def socket_user(socket: events_pb2.ListenSocket) -> str:
    """The socket's owner as the agent's host names it ("uid N" without a name there); "" when not known."""
    if not socket.HasField("uid"):
        return ""
    return f"user {clean(socket.user)}" if socket.user else f"uid {socket.uid}"


def socket_owner(socket: events_pb2.ListenSocket) -> str:
    """The process holding a listening socket as "name (pid)"; when the agent could not see it, "unknown
    process (user NAME)" from the socket's uid, or "unknown" from an agent that does not send the uid."""
    if socket.pid:
        return f"{clean(socket.process) or '?'} ({socket.pid})"
    if socket.process:
        return clean(socket.process)
    user = socket_user(socket)
    return f"{UNKNOWN_PROCESS} ({user})" if user else UNKNOWN_OWNER


def host_metrics_view(stored: bus_pb2.StoredEvent | None) -> dict[str, Any] | None:
    """The latest host_metrics event: its figures and its listening sockets, by port."""
    if stored is None:
        return None
    m = stored.event.host_metrics
    listening = sorted(
        ({"protocol": clean(s.protocol), "address": clean(s.address), "port": s.port, "pid": s.pid,
          "process": clean(s.process), "uid": s.uid if s.HasField("uid") else None, "user": clean(s.user),
          "owner": socket_owner(s),
          "owner_why": "" if s.pid or s.process else UNKNOWN_OWNER_WHY} for s in m.listening),
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
        "users": [clean(u) for u in m.users],
        "disks": [
            {
                "mount": clean(d.mount),
                "fstype": clean(d.fstype),
                "total_bytes": d.total_bytes,
                "used_bytes": d.used_bytes,
            }
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
            "mac": clean(s.event.device.mac),
            "ips": [clean(ip) for ip in s.event.device.ips],
            "vendor": clean(s.event.device.vendor),
            "interface": clean(s.event.device.interface),
            "last_change": events_pb2.DeviceEvent.Action.Name(s.event.device.action).lower(),
            "time": fmt_time(s.event.ts_ns),
        }
        for s in latest.values()
        if s.event.device.action != events_pb2.DeviceEvent.GONE
    ]


# ---- filters ---------------------------------------------------------------------------------


def _values(text: str, key: str) -> list[str]:
    """A comma-separated filter list; ValueError beyond MAX_FILTER_VALUES."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if len(values) > MAX_FILTER_VALUES:
        raise ValueError(f"{key}: {len(values):,} values; at most {MAX_FILTER_VALUES} (comma-separated)")
    return values


def parse_filter(params: Mapping[str, str], default_since: str = "24h") -> tuple[bus_pb2.EventFilter, dict[str, str]]:
    """An EventFilter from query parameters, and the form values to show back; ValueError if invalid.

    Without a `kind`, heartbeats are left out unless `heartbeats` is set (to anything).
    """
    keys = ("until", "host", "agent_id", "agent", "kind", "heartbeats", "severity", "text")
    form = {key: params.get(key, "") for key in keys}
    form["since"] = params.get("since", default_since)
    now_ns = time.time_ns()
    severity = severity_value(form["severity"]) if form["severity"] else 0
    kinds = _values(form["kind"], "kind")
    if unknown := [k for k in kinds if k not in KINDS]:
        raise ValueError(f"kind {unknown[0]!r}: expected one of {', '.join(KINDS)}")
    flt = bus_pb2.EventFilter(
        since_ns=parse_time(form["since"], now_ns, "since"),
        until_ns=parse_time(form["until"], now_ns, "until"),
        hosts=_values(form["host"], "host"),
        agent_ids=_values(form["agent_id"], "agent_id"),
        agents=_values(form["agent"], "agent"),
        kinds=kinds or ([] if form["heartbeats"] else SHOWN_KINDS),
        min_severity=severity,  # type: ignore[arg-type]
        text=form["text"][:200],
    )
    return flt, form
