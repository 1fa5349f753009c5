"""One meaning for each word the CLI and the UI share: the same inputs give the same answer in both
(liveness, times, severities)."""

from __future__ import annotations

import time

import pytest

from amoskys.cli import build_parser
from amoskys.commands import query, status
from amoskys.errors import AmoskysError
from amoskys.semantics import SEVERITIES, liveness, parse_time, severity_name, severity_value
from amoskys.ui import model
from amoskys.v1 import bus_pb2

NOW = 1_800_000_000 * 10**9
S = 10**9

# (last heartbeat s ago or None, last envelope s ago or None, heartbeat interval s (0: never said), state)
LIVENESS_CASES = [
    pytest.param(600, 1, 30, "down", id="old-heartbeat-recent-envelope"),
    pytest.param(10, 600, 30, "up", id="recent-heartbeat-old-envelope"),
    pytest.param(75, 75, 30, "up", id="at-2.5-intervals"),
    pytest.param(76, 1, 30, "late", id="past-2.5-intervals"),
    pytest.param(150, 1, 30, "late", id="at-5-intervals"),
    pytest.param(151, 1, 30, "down", id="past-5-intervals"),
    pytest.param(3, 3, 1, "late", id="short-interval"),
    pytest.param(7200, 7200, 3600, "up", id="long-interval"),
    pytest.param(None, 60, 0, "up", id="no-heartbeat-default-interval"),
    pytest.param(None, 100, 0, "late", id="no-heartbeat-late"),
    pytest.param(None, 200, 0, "down", id="no-heartbeat-down"),
    pytest.param(None, None, 0, "down", id="never-heard"),
    pytest.param(-30, -30, 30, "up", id="clock-ahead-of-ours"),
]


def agent(heartbeat_ago: int | None, envelope_ago: int | None, interval_s: int) -> bus_pb2.AgentInfo:
    return bus_pb2.AgentInfo(
        agent_id="web1-host", host="web1", kind="host", heartbeat_interval_s=interval_s,
        last_heartbeat_ns=0 if heartbeat_ago is None else NOW - heartbeat_ago * S,
        last_seen_ns=0 if envelope_ago is None else NOW - envelope_ago * S,
    )  # fmt: skip


@pytest.mark.parametrize(("heartbeat_ago", "envelope_ago", "interval_s", "state"), LIVENESS_CASES)
def test_status_and_ui_judge_liveness_alike(
    heartbeat_ago: int | None, envelope_ago: int | None, interval_s: int, state: str
) -> None:
    info = agent(heartbeat_ago, envelope_ago, interval_s)
    cli = status.agent_document(info, NOW)["liveness"]
    ui = model.agent_view(info, NOW)["state"]
    fleet = model.fleet([info], model.RateHistory(), NOW)
    assert (cli, ui, fleet["hosts"][0]["state"], liveness(info, NOW)) == (state, state, state, state)
    assert fleet["agents"][state] == 1


@pytest.mark.parametrize(("heartbeat_ago", "envelope_ago"), [(600, 1), (5, 300), (None, 42)])
def test_status_and_ui_show_the_same_heard_age(heartbeat_ago: int | None, envelope_ago: int) -> None:
    info = agent(heartbeat_ago, envelope_ago, 30)
    heard_ago_s = heartbeat_ago if heartbeat_ago is not None else envelope_ago
    assert status.table_row(info, NOW).split()[4] == f"{heard_ago_s}s"
    assert status.agent_document(info, NOW)["heard_ns"] == str(NOW - heard_ago_s * S)
    assert model.agent_view(info, NOW)["heard_ago"] == model.ago(heard_ago_s)


# ---- times and severities: `amoskys query` and the UI's filter take the same words ----------------

UTC_18H = 1_795_370_400 * S  # 2026-11-22T18:00:00Z

TIME_CASES = [
    pytest.param("15m", NOW - 900 * S, id="minutes"),
    pytest.param("2h", NOW - 7200 * S, id="hours"),
    pytest.param("7d", NOW - 7 * 86400 * S, id="days"),
    pytest.param("30s", NOW - 30 * S, id="seconds"),
    pytest.param(" 15 m ", NOW - 900 * S, id="spaces"),
    pytest.param("0m", NOW, id="zero"),
    pytest.param("2026-11-22T18:00", UTC_18H, id="iso-naive-is-utc"),
    pytest.param("2026-11-22T18:00:00Z", UTC_18H, id="iso-z"),
    pytest.param("2026-11-22 18:00:00.000001", UTC_18H + 1000, id="iso-space-microseconds"),
    pytest.param("2026-11-22T20:00+02:00", UTC_18H, id="iso-offset"),
    pytest.param("2026-11-22", UTC_18H - 18 * 3600 * S, id="iso-date"),
    pytest.param("20261122T180000Z", UTC_18H, id="iso-basic"),
]

BAD_TIMES = [
    pytest.param("soon", "expected 15m, 2h, 7d", id="word"),
    pytest.param("15", "expected 15m, 2h, 7d", id="no-unit"),
    pytest.param("15M", "expected 15m, 2h, 7d", id="unit-case"),
    pytest.param("1w", "expected 15m, 2h, 7d", id="weeks"),
    pytest.param("-5m", "expected 15m, 2h, 7d", id="negative"),
    pytest.param("2026-13-01", "expected 15m, 2h, 7d", id="month-13"),
    pytest.param("1969-12-31T23:59", "out of range", id="before-1970"),
    pytest.param("2263-01-01", "out of range", id="after-2262"),
    pytest.param("999999999999d", "out of range", id="too-far-back"),
    pytest.param("9999999999999d", "expected 15m, 2h, 7d", id="too-many-digits"),
]


def cli_filter(*options: str, now_ns: int = NOW) -> bus_pb2.EventFilter:
    return query.event_filter(build_parser("query").parse_args(["query", *options]), now_ns)


def ui_filter(**params: str) -> bus_pb2.EventFilter:
    return model.parse_filter(params)[0]


@pytest.mark.parametrize(("text", "expected_ns"), TIME_CASES)
def test_query_and_ui_read_times_alike(text: str, expected_ns: int) -> None:
    assert parse_time(text, NOW) == expected_ns
    cli = cli_filter(f"--since={text}", f"--until={text}")
    assert (cli.since_ns, cli.until_ns) == (expected_ns, expected_ns)
    before = time.time_ns()  # the UI reads the clock itself: its answer lies between these two
    ui = ui_filter(since=text, until=text)
    after = time.time_ns()
    for value in (ui.since_ns, ui.until_ns):
        assert parse_time(text, before) <= value <= parse_time(text, after)


@pytest.mark.parametrize(("text", "message"), BAD_TIMES)
def test_query_and_ui_refuse_the_same_times(text: str, message: str) -> None:
    with pytest.raises(AmoskysError, match=f"--since {text!r}: {message}"):
        cli_filter(f"--since={text}")
    with pytest.raises(ValueError, match=f"since {text!r}: {message}"):
        ui_filter(since=text)


@pytest.mark.parametrize(
    ("name", "value"),
    [("debug", 1), ("info", 2), ("notice", 3), ("warning", 4), ("error", 5), ("critical", 6), ("WARNING", 4)],
)
def test_query_and_ui_read_severities_alike(name: str, value: int) -> None:
    assert severity_value(name) == value
    assert cli_filter(f"--severity={name}").min_severity == value
    assert ui_filter(severity=name).min_severity == value
    assert severity_name(value) == name.lower()


@pytest.mark.parametrize("name", ["warn", "unspecified", "severity_info", "5"])
def test_query_and_ui_refuse_the_same_severities(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_filter(f"--severity={name}")
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"severity {name!r}: expected one of debug, info, notice"):
        ui_filter(severity=name)


def test_a_severity_without_a_name_is_shown_as_its_number() -> None:
    assert severity_name(0) == "unspecified"
    assert severity_name(42) == "42"  # from a newer agent: shown, not an error
    assert SEVERITIES == ["debug", "info", "notice", "warning", "error", "critical"]
