"""`amoskys status` and `amoskys query` against a live hub, as an operator would run them."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from amoskys.cli import main
from amoskys.v1 import events_pb2
from tests.hubfixture import LiveHub, make_events


def hub_args(live_hub: LiveHub) -> list[str]:
    tls = live_hub.consumer_tls("operator")
    return [
        "--hub",
        live_hub.address,
        "--server-name",
        "localhost",
        "--ca",
        tls.ca,
        "--cert",
        tls.cert,
        "--key",
        tls.key,
    ]


async def test_status_lists_agents_with_liveness(live_hub: LiveHub, capsys: pytest.CaptureFixture[str]) -> None:
    agent = live_hub.agent("web1-host")
    events = make_events(2, agent="host")
    events.append(
        events_pb2.Event(
            event_id="hb",
            ts_ns=time.time_ns(),
            host="web1",
            agent="host",
            heartbeat=events_pb2.Heartbeat(version="0.1.0", interval_s=30),
        )
    )
    await live_hub.publish(agent, agent.seal(events))
    args = hub_args(live_hub)
    assert await asyncio.to_thread(main, ["status", *args, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    (entry,) = document["agents"]
    assert (entry["agent_id"], entry["liveness"], entry["version"]) == ("web1-host", "up", "0.1.0")
    assert document["hub"]["events_stored"] == "3"
    assert await asyncio.to_thread(main, ["status", *args]) == 0
    table = capsys.readouterr().out
    assert "web1-host" in table
    assert " up " in table


async def test_query_finds_a_planted_event(live_hub: LiveHub, capsys: pytest.CaptureFixture[str]) -> None:
    agent = live_hub.agent("db1-auth")
    events = make_events(5, host="db1", agent="auth")
    events[3].auth.user = "needle-in-haystack"
    await live_hub.publish(agent, agent.seal(events))
    args = hub_args(live_hub)
    assert await asyncio.to_thread(main, ["query", *args, "--since", "10m", "--text", "NEEDLE", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["event"]["event_id"] == "db1-auth-3"
    assert await asyncio.to_thread(main, ["query", *args, "--since", "10m", "--text", "NEEDLE"]) == 0
    (row,) = capsys.readouterr().out.splitlines()
    assert row.split()[2:6] == ["db1", "db1-auth", "auth", "info"]
    assert "ssh_failed needle-in-haystack 192.0.2.9" in row  # the summary column says what happened


async def test_consumer_errors_are_clear(live_hub: LiveHub, capsys: pytest.CaptureFixture[str]) -> None:
    agent = live_hub.agent("web1-proc")  # an agent certificate is not a consumer's
    args = ["--hub", live_hub.address, "--server-name", "localhost", "--ca", agent.tls.ca,
            "--cert", agent.tls.cert, "--key", agent.tls.key]  # fmt: skip
    assert await asyncio.to_thread(main, ["status", *args]) == 2
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["query", *hub_args(live_hub), "--since", "soon"]) == 2
    assert "--since" in capsys.readouterr().err
