"""Turning events into store rows: index columns plus a lower-cased searchable text."""

from __future__ import annotations

from typing import NamedTuple

from amoskys.v1 import events_pb2

__all__ = ["EventRow", "event_kind", "searchable_text", "to_row"]


class EventRow(NamedTuple):
    ts_ns: int
    host: str
    agent: str
    kind: str
    severity: int
    event_id: str
    text: str
    body: bytes


def event_kind(event: events_pb2.Event) -> str:
    """The body's field name (process, flow, ...), or 'none'."""
    return event.WhichOneof("body") or "none"


def _process(e: events_pb2.Event) -> str:
    p = e.process
    return f"{p.name} {p.exe} {' '.join(p.cmdline)} {p.user} {p.container_id} {p.exe_sha256}"


def _flow(e: events_pb2.Event) -> str:
    f = e.flow
    return f"{f.src_ip}:{f.src_port} {f.dst_ip}:{f.dst_port} {f.interface}"


def _auth(e: events_pb2.Event) -> str:
    a = e.auth
    return a.raw or f"{a.user} {a.target_user} {a.src_ip} {a.command} {a.group}"


def _alert(e: events_pb2.Event) -> str:
    a = e.alert
    return f"{a.rule} {a.summary} {' '.join(f'{k}={v}' for k, v in a.details.items())}"


def _device(e: events_pb2.Event) -> str:
    d = e.device
    return f"{d.mac} {' '.join(d.ips)} {d.vendor} {d.previous_mac} {d.interface}"


def _snmp(e: events_pb2.Event) -> str:
    s = e.snmp
    return f"{s.target} {s.sys_name} {s.trap_oid} {s.error} {' '.join(s.varbinds.values())}"


def _port(e: events_pb2.Event) -> str:
    s = e.port.socket
    return f"{s.protocol} {s.address}:{s.port} {s.process}"


_TEXT = {
    "process": _process,
    "flow": _flow,
    "auth": _auth,
    "alert": _alert,
    "device": _device,
    "snmp": _snmp,
    "port": _port,
}


def searchable_text(event: events_pb2.Event, kind: str) -> str:
    render = _TEXT.get(kind)
    base = render(event) if render else ""
    if event.labels:
        base += " " + " ".join(f"{k}={v}" for k, v in event.labels.items())
    return base.lower().replace("\0", " ")  # the store's text index (FTS5) would stop reading at a NUL


def to_row(event: events_pb2.Event) -> EventRow:
    kind = event_kind(event)
    return EventRow(
        event.ts_ns,
        event.host,
        event.agent,
        kind,
        event.severity,
        event.event_id,
        searchable_text(event, kind),
        event.SerializeToString(),
    )
