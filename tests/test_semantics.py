"""One meaning for each word the CLI and the UI share: the same inputs give the same answer in both."""

from __future__ import annotations

import pytest

from amoskys.commands import status
from amoskys.semantics import liveness
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
