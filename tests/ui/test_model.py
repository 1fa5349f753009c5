"""The UI's pure parts: liveness thresholds, time parsing, text cleaning, rates, charts."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from amoskys.ui import model, svg
from amoskys.v1 import bus_pb2, events_pb2

S = 1_000_000_000
NOW = 1_800_000_000 * S


@pytest.mark.parametrize(
    ("heartbeat_age_s", "interval_s", "state"),
    [(0, 30, "up"), (75, 30, "up"), (76, 30, "late"), (150, 30, "late"), (151, 30, "down"), (3, 1, "late")],
)
def test_liveness_from_heartbeat_interval(heartbeat_age_s: int, interval_s: int, state: str) -> None:
    agent = bus_pb2.AgentInfo(
        last_heartbeat_ns=NOW - heartbeat_age_s * S, last_seen_ns=NOW, heartbeat_interval_s=interval_s
    )
    assert model.liveness(agent, NOW) == state


def test_liveness_without_heartbeats_uses_last_envelope_and_default_interval() -> None:
    assert model.liveness(bus_pb2.AgentInfo(last_seen_ns=NOW - 60 * S), NOW) == "up"
    assert model.liveness(bus_pb2.AgentInfo(last_seen_ns=NOW - 100 * S), NOW) == "late"


def test_parse_time() -> None:
    assert model.parse_time("", NOW) == 0
    assert model.parse_time("15m", NOW) == NOW - 900 * S
    assert model.parse_time("7d", NOW) == NOW - 7 * 86400 * S
    moment = dt.datetime(2026, 11, 22, 18, 0, tzinfo=dt.UTC)
    assert model.parse_time("2026-11-22T18:00", NOW) == int(moment.timestamp()) * S
    assert model.parse_time("2026-11-22T18:00:00Z", NOW) == int(moment.timestamp()) * S
    with pytest.raises(ValueError, match="since 'soon'"):
        model.parse_time("soon", NOW, "since")


def test_clean_shows_controls_and_cuts() -> None:
    assert model.clean("a\x1b[0m\x00b\u202ec\nd") == "a\\u001b[0m\\u0000b\\u202ec\\u000ad"
    assert model.clean("tag\U000e0041 nbsp\u00a0 ok ✓ jürgen") == "tag\\U000e0041 nbsp\\u00a0 ok ✓ jürgen"
    assert model.clean_tree({"k\u202e": ["v\u2066", 1.5]}) == {"k\\u202e": ["v\\u2066", 1.5]}
    assert model.clean("x" * 500, limit=10) == "x" * 9 + "…"


def test_rate_history_per_host() -> None:
    rates = model.RateHistory(size=3)
    agents = lambda total: [bus_pb2.AgentInfo(host="h", events_total=total), bus_pb2.AgentInfo(host="h")]  # noqa: E731
    rates.update(NOW, agents(100))
    assert rates.rate("h") is None
    assert "collecting" in rates.chart("h")
    rates.update(NOW + 10 * S, agents(600))
    rates.update(NOW + 20 * S, agents(600))
    assert rates.series("h") == [50.0, 0.0]
    assert "<polyline" in rates.chart("h")
    for step in range(3, 6):
        rates.update(NOW + step * 10 * S, agents(600 + step))
    assert len(rates.series("h")) == 3


def test_charts_are_plain_svg() -> None:
    chart = svg.line_chart([1.0, 5.0, 2.0], 'rate "x"', "events/s")
    assert chart.startswith("<svg") and chart.endswith("</svg>")
    assert 'aria-label="rate &quot;x&quot;"' in chart
    assert "max 5 events/s" in chart
    assert "style=" not in chart and "<script" not in chart


def test_devices_latest_state_per_device_icmp_ones_by_address() -> None:
    def stored(action: int, mac: str, ip: str, interface: str = "eth0") -> bus_pb2.StoredEvent:
        device = events_pb2.DeviceEvent(action=action, mac=mac, ips=[ip], interface=interface)  # type: ignore[arg-type]
        return bus_pb2.StoredEvent(event=events_pb2.Event(agent="scanner", device=device))

    Action = events_pb2.DeviceEvent.Action
    newest_first = [
        stored(Action.GONE, "02:00:00:00:00:02", "10.0.0.2"),
        stored(Action.NEW, "", "10.9.0.5"),  # ICMP: no MAC
        stored(Action.NEW, "", "10.9.0.6"),
        stored(Action.CHANGED, "02:00:00:00:00:01", "10.0.0.9"),
        stored(Action.NEW, "02:00:00:00:00:01", "10.0.0.1"),
        stored(Action.NEW, "02:00:00:00:00:02", "10.0.0.2"),
    ]
    shown = {(d["mac"], tuple(d["ips"]), d["last_change"]) for d in model.devices(newest_first)}
    assert shown == {
        ("", ("10.9.0.5",), "new"),
        ("", ("10.9.0.6",), "new"),
        ("02:00:00:00:00:01", ("10.0.0.9",), "changed"),
    }


def test_to_json_is_strict_and_turns_non_finite_numbers_into_null() -> None:
    data = {"a": math.nan, "b": [math.inf, -math.inf, 1.5, (2.0, math.nan)], "c": "NaN", "d": 3}
    assert model.to_json(data) == '{"a": null, "b": [null, null, 1.5, [2.0, null]], "c": "NaN", "d": 3}'
