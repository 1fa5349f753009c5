"""What each event body says in words, in one place: the one line people read (the UI's Summary
column, `amoskys query`) and the words a text search finds it by (the hub's text index).

One entry per body field of `Event`: a new body gets its words here, once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from amoskys.v1 import events_pb2

__all__ = ["BODY_TEXT", "BodyText", "search_terms", "summary_line"]

Render = Callable[[events_pb2.Event], str]
Action = events_pb2.ProcessEvent.Action


@dataclass(frozen=True, slots=True)
class BodyText:
    summary: Render  # one line: what happened
    terms: Render | None = None  # the searchable words (the store lower-cases them); None: not searched


def _process_summary(e: events_pb2.Event) -> str:
    p = e.process
    return f"{Action.Name(p.action).lower()} {p.name} pid {p.pid} user {p.user} {' '.join(p.cmdline) or p.exe}"


def _process_terms(e: events_pb2.Event) -> str:
    p = e.process
    return f"{p.name} {p.exe} {' '.join(p.cmdline)} {p.user} {p.container_id} {p.exe_sha256}"


def _flow_summary(e: events_pb2.Event) -> str:
    f = e.flow
    return f"{f.src_ip}:{f.src_port} → {f.dst_ip}:{f.dst_port} proto {f.protocol} {f.bytes_out}/{f.bytes_in} B"


def _flow_terms(e: events_pb2.Event) -> str:
    f = e.flow
    return f"{f.src_ip}:{f.src_port} {f.dst_ip}:{f.dst_port} {f.interface}"


def _auth_summary(e: events_pb2.Event) -> str:
    a = e.auth
    return a.raw or f"{events_pb2.AuthEvent.Kind.Name(a.kind).lower()} {a.user} {a.src_ip} {a.command}"


def _auth_terms(e: events_pb2.Event) -> str:
    a = e.auth
    return a.raw or f"{a.user} {a.target_user} {a.src_ip} {a.command} {a.group}"


def _alert_terms(e: events_pb2.Event) -> str:
    a = e.alert
    return f"{a.rule} {a.summary} {' '.join(f'{k}={v}' for k, v in a.details.items())}"


def _device_summary(e: events_pb2.Event) -> str:
    d = e.device
    return f"{events_pb2.DeviceEvent.Action.Name(d.action).lower()} {d.mac} {' '.join(d.ips)} {d.vendor}"


def _device_terms(e: events_pb2.Event) -> str:
    d = e.device
    return f"{d.mac} {' '.join(d.ips)} {d.vendor} {d.previous_mac} {d.interface}"


def _snmp_summary(e: events_pb2.Event) -> str:
    s = e.snmp
    return f"{events_pb2.SnmpEvent.Kind.Name(s.kind).lower()} {s.target} {s.sys_name} {s.error}"


def _snmp_terms(e: events_pb2.Event) -> str:
    s = e.snmp
    return f"{s.target} {s.sys_name} {s.trap_oid} {s.error} {' '.join(s.varbinds.values())}"


def _socket_words(s: events_pb2.ListenSocket) -> str:
    """Its address, process and owner: the user's name on its host, else the uid (none from older agents)."""
    owner = ["user", s.user or str(s.uid)] if s.HasField("uid") else []
    return " ".join(word for word in [s.protocol, f"{s.address}:{s.port}", s.process, *owner] if word)


def _port_summary(e: events_pb2.Event) -> str:
    return f"{events_pb2.PortChange.Action.Name(e.port.action).lower()} {_socket_words(e.port.socket)}"


def _host_metrics_summary(e: events_pb2.Event) -> str:
    m = e.host_metrics
    return f"cpu {m.cpu_percent:.0f}% load {m.load1:.2f} mem available {m.mem_available_bytes / 2**20:,.0f} MiB"


def _heartbeat_summary(e: events_pb2.Event) -> str:
    return f"heartbeat version {e.heartbeat.version} every {e.heartbeat.interval_s} s"


BODY_TEXT: dict[str, BodyText] = {
    "process": BodyText(_process_summary, _process_terms),
    "flow": BodyText(_flow_summary, _flow_terms),
    "auth": BodyText(_auth_summary, _auth_terms),
    "alert": BodyText(lambda e: f"{e.alert.rule}: {e.alert.summary}", _alert_terms),
    "device": BodyText(_device_summary, _device_terms),
    "snmp": BodyText(_snmp_summary, _snmp_terms),
    "port": BodyText(_port_summary, lambda e: _socket_words(e.port.socket)),
    "host_metrics": BodyText(_host_metrics_summary),
    "heartbeat": BodyText(_heartbeat_summary),
}


def summary_line(event: events_pb2.Event, kind: str) -> str:
    """What happened, in words (unsanitised: the caller cleans it for its screen); a body without words: its name."""
    text = BODY_TEXT.get(kind)
    return text.summary(event) if text else kind


def search_terms(event: events_pb2.Event, kind: str) -> str:
    """The words a text search finds the event by ('' for a body that is not searched)."""
    text = BODY_TEXT.get(kind)
    return text.terms(event) if text and text.terms else ""
