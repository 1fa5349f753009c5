"""What the words mean wherever they are shown or typed (`amoskys status`/`query` and the UI alike):
an agent's liveness, a point in time (`15m`, `2h`, `7d`, ISO 8601), a severity name.
"""

from __future__ import annotations

import datetime as dt
import re

from amoskys.v1 import bus_pb2, events_pb2

__all__ = [
    "DEFAULT_INTERVAL_S",
    "LATE_FACTOR",
    "SEVERITIES",
    "STATES",
    "heard_ns",
    "liveness",
    "parse_time",
    "severity_name",
    "severity_value",
]

LATE_FACTOR = 2.5  # missed heartbeat intervals before an agent is late; twice that: down
DEFAULT_INTERVAL_S = 30  # an agent that never said its heartbeat interval
STATES = ("up", "late", "down")  # best first
SEVERITIES = [name.removeprefix("SEVERITY_").lower() for name in events_pb2.Severity.keys()][1:]  # noqa: SIM118
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
TIME_FORMS = "15m, 2h, 7d (s, m, h, d back from now) or an ISO 8601 time such as 2026-11-22T18:00 (UTC unless given)"
MAX_NS = 2**63 - 1


def heard_ns(agent: bus_pb2.AgentInfo) -> int:
    """When the agent was last heard from, as liveness counts it: its last heartbeat, or its last
    envelope if it never sent one."""
    return agent.last_heartbeat_ns or agent.last_seen_ns


def liveness(agent: bus_pb2.AgentInfo, now_ns: int) -> str:
    """up / late / down: the age of `heard_ns` against the agent's own heartbeat interval; late after
    LATE_FACTOR intervals, down after twice that."""
    interval_s = agent.heartbeat_interval_s or DEFAULT_INTERVAL_S
    age_s = (now_ns - heard_ns(agent)) / 1e9
    if age_s <= interval_s * LATE_FACTOR:
        return "up"
    return "late" if age_s <= interval_s * 2 * LATE_FACTOR else "down"


def parse_time(text: str, now_ns: int, key: str = "time") -> int:
    """Nanoseconds since the epoch from '' (0: unbounded), a duration back from `now_ns` (`15m`, `2h`,
    `7d`) or an ISO 8601 time (naive: UTC); ValueError naming `key` for anything else."""
    text = text.strip()
    if not text:
        return 0
    if match := re.fullmatch(r"(\d{1,12})\s*([smhd])", text):
        value = now_ns - int(match.group(1)) * UNITS[match.group(2)] * 1_000_000_000
    else:
        value = _iso_ns(text, key)
    if not 0 < value <= MAX_NS:
        raise ValueError(f"{key} {text!r}: out of range (1970 to 2262)")
    return value


def _iso_ns(text: str, key: str) -> int:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{key} {text!r}: expected {TIME_FORMS}") from None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    delta = moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def severity_value(name: str, key: str = "severity") -> int:
    """The Severity number of a name (`info`, `WARNING`, ...); ValueError naming `key` if unknown."""
    if name.lower() not in SEVERITIES:
        raise ValueError(f"{key} {name!r}: expected one of {', '.join(SEVERITIES)}")
    return events_pb2.Severity.Value(f"SEVERITY_{name.upper()}")


def severity_name(value: int) -> str:
    """The name shown for a Severity number; a number no name has (a newer agent's) as itself."""
    if value in events_pb2.Severity.values():
        return events_pb2.Severity.Name(value).removeprefix("SEVERITY_").lower()  # type: ignore[arg-type]
    return str(value)
