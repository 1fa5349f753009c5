"""The snmp agent against Debian's snmpd and net-snmp's snmpget/snmptrap on loopback, and through a live hub."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry, generate_latest

from amoskys.agents.runtime.runner import AgentRuntime
from amoskys.agents.snmp.agent import (
    COLUMNS,
    SYSTEM,
    PollError,
    SnmpAgent,
    build_result,
    counter_delta,
    engine_slots,
    walk_columns,
)
from amoskys.agents.snmp.config import SnmpAgentConfig
from amoskys.config import load_config
from amoskys.errors import ConfigError
from amoskys.logs import JsonFormatter
from amoskys.v1 import bus_pb2, events_pb2
from tests.agents.conftest import agent_config
from tests.hubfixture import LiveHub
from tests.snmpd import COMMUNITY, SYS_DESCR, SYS_NAME, V3_USERS, Snmpd, run_snmpd

Kind = events_pb2.SnmpEvent.Kind
V3_USER, V3_USER_256 = "amxuser", "amx256"
_, V3_AUTH, _, V3_PRIV = V3_USERS[V3_USER]
_, V3_AUTH_256, _, V3_PRIV_256 = V3_USERS[V3_USER_256]
TRAP_COMMUNITY = "amx-trap-51c0"
TRAP_ENGINE = "0x8000000001020304"
LINK_DOWN = "1.3.6.1.6.3.1.1.5.3"


SYSTEM_OID = {name: ".".join(map(str, oid)) for name, oid in SYSTEM.items()}


@pytest.fixture(scope="module")
def snmpd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Snmpd]:
    with run_snmpd(tmp_path_factory.mktemp("snmpd")) as running:
        yield running


_made: list[SnmpAgent] = []


@pytest_asyncio.fixture(autouse=True)
async def _close_agents() -> AsyncIterator[None]:
    """Every agent a test made is closed (its SNMP engines' sockets, the trap socket), even on failure."""
    yield
    while _made:
        await _made.pop().close()


def make_agent(tmp_path: Path, **snmp: Any) -> SnmpAgent:
    config = msgspec.convert({"host": "testhost", "state_dir": str(tmp_path), "snmp": snmp}, SnmpAgentConfig)
    _made.append(SnmpAgent(config, tmp_path))
    return _made[-1]


def target(snmpd: Snmpd, name: str = "dev", **fields: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {"name": name, "address": "127.0.0.1", "port": snmpd.port, "timeout_s": 1, "retries": 0}
    return defaults | ({"community": COMMUNITY} if fields.get("version") != 3 else {}) | fields


def v3_target(snmpd: Snmpd, name: str = "dev3", **fields: Any) -> dict[str, Any]:
    return target(snmpd, name, version=3, user=V3_USER, auth_key=V3_AUTH, priv_key=V3_PRIV) | fields


async def poll(agent: SnmpAgent, index: int = 0) -> list[events_pb2.Event]:
    return await agent.poll_once(agent.pollers[index])


def interface(event: events_pb2.Event, name: str) -> events_pb2.InterfaceStats:
    (found,) = [i for i in event.snmp.interfaces if i.name == name]
    return found


def counter(agent: SnmpAgent, name: str, **labels: str) -> float:
    registry = CollectorRegistry()
    agent.register_metrics(registry)
    value = registry.get_sample_value(name, labels)
    return value or 0.0


@contextlib.asynccontextmanager
async def collecting(agent: SnmpAgent) -> AsyncIterator[Callable[..., Any]]:
    """Run the agent's collect loop; yields `wait(predicate, timeout)` -> the events seen so far."""
    seen: list[tuple[float, events_pb2.Event]] = []
    started = time.monotonic()

    async def pump() -> None:
        async for event in agent.collect():
            seen.append((time.monotonic() - started, event))

    async def wait(predicate: Callable[[list[events_pb2.Event]], bool], timeout: float = 10) -> list[Any]:
        deadline = time.monotonic() + timeout
        while not predicate([e for _, e in seen]):
            assert time.monotonic() < deadline, [(round(t, 2), e.snmp) for t, e in seen]
            await asyncio.sleep(0.02)
        return seen

    task = asyncio.create_task(pump())
    try:
        yield wait
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await agent.close()


# ---- polling ----------------------------------------------------------------------------------------


async def test_v2c_poll_matches_snmpget(snmpd: Snmpd, tmp_path: Path) -> None:
    agent = make_agent(tmp_path, targets=[target(snmpd)])
    lo_in = f"{'.'.join(map(str, COLUMNS['in_octets']))}.1"
    before = int(await asyncio.to_thread(lambda: snmpd.snmpget(lo_in)[0]))
    (event,) = await poll(agent)
    after = int(await asyncio.to_thread(lambda: snmpd.snmpget(lo_in)[0]))
    name, descr, oper = await asyncio.to_thread(
        snmpd.snmpget, SYSTEM_OID["name"], SYSTEM_OID["descr"], f"{'.'.join(map(str, COLUMNS['oper']))}.1"
    )
    snmp = event.snmp
    assert (snmp.kind, snmp.target, event.agent, event.host) == (Kind.POLL, "dev", "snmp", "testhost")
    assert (snmp.sys_name, snmp.sys_descr) == (name, descr) == (SYS_NAME, SYS_DESCR)
    assert snmp.sys_uptime_ticks > 0
    lo = interface(event, "lo")
    assert lo.index == 1
    assert before <= lo.in_octets <= after, "lo's ifHCInOctets between two snmpget readings"
    assert lo.oper_status == {"1": "up", "2": "down"}[oper] == "up"
    assert lo.admin_status == "up"
    assert not lo.HasField("in_bps") and not lo.HasField("out_bps"), "no rate before a second poll"
    assert counter(agent, "amoskys_agent_snmp_polls_total", target="dev") == 1


async def test_rates_between_two_polls_follow_the_traffic(snmpd: Snmpd, tmp_path: Path) -> None:
    agent = make_agent(tmp_path, targets=[target(snmpd)])
    first = (await poll(agent))[0]  # (other interfaces of this host may change meanwhile: ignored here)
    first_at = agent.pollers[0].previous.at  # type: ignore[union-attr]
    sent = 0
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s,
    ):
        sink.bind(("127.0.0.1", 0))
        for _ in range(64):  # 4 MB over lo
            sent += s.sendto(b"\0" * 65000, sink.getsockname())
            with contextlib.suppress(BlockingIOError):
                sink.recv(65536, socket.MSG_DONTWAIT)
    await asyncio.sleep(3.2)  # snmpd caches the interface table for about 3 s
    second = (await poll(agent))[0]
    second_at = agent.pollers[0].previous.at  # type: ignore[union-attr]
    lo1, lo2 = interface(first, "lo"), interface(second, "lo")
    delta_in, delta_out = lo2.in_octets - lo1.in_octets, lo2.out_octets - lo1.out_octets
    assert delta_in >= sent and delta_out >= sent
    assert lo2.in_bps == pytest.approx(delta_in * 8 / (second_at - first_at))
    assert lo2.out_bps == pytest.approx(delta_out * 8 / (second_at - first_at))
    assert lo2.in_bps > sent * 8 / 10


def dotted(oid: tuple[int, ...]) -> str:
    return ".".join(map(str, oid))


NO_IFX, MIXED = "amx-noifx-4e1b", "amx-mixed-93d0"  # communities of views without ifXTable, without lo's HC counters
VIEWS = f"""view noifx included .1
view noifx excluded {dotted(COLUMNS["name"][:-1])}
view mixed included .1
view mixed excluded {dotted(COLUMNS["in_octets"])}.1
view mixed excluded {dotted(COLUMNS["out_octets"])}.1
rocommunity {NO_IFX} 127.0.0.1 -V noifx
rocommunity {MIXED} 127.0.0.1 -V mixed
"""


async def test_a_device_without_ifxtable_gives_speed_from_ifspeed_and_rates_from_32_bit_counters(
    tmp_path: Path,
) -> None:
    """snmpd seen through views: the whole MIB, no ifXTable (older and small devices), and no 64-bit
    counters for lo only: speeds are net-snmp's ifSpeed (or ifHighSpeed), counters chosen per interface."""
    with run_snmpd(tmp_path / "snmpd", VIEWS) as views:
        names = ("full", "noifx", "mixed")
        communities = zip(names, (COMMUNITY, NO_IFX, MIXED), strict=True)
        agent = make_agent(tmp_path, targets=[target(views, name, community=c) for name, c in communities])
        lo_in32 = f"{dotted(COLUMNS['in_octets32'])}.1"
        before = int((await asyncio.to_thread(views.snmpget, lo_in32))[0])
        first = {name: (await poll(agent, i))[0] for i, name in enumerate(names)}
        after = int((await asyncio.to_thread(views.snmpget, lo_in32))[0])
        if_speed = await asyncio.to_thread(views.snmpwalk, dotted(COLUMNS["speed"]))
        high_speed = await asyncio.to_thread(views.snmpwalk, dotted(COLUMNS["high_speed"]))
        no_ifx = await asyncio.to_thread(views.snmpwalk, dotted(COLUMNS["high_speed"]), NO_IFX)
        assert list(no_ifx.values()) == ["No Such Object available on this agent at this OID"]
        for name in names:
            assert {i.index for i in first[name].snmp.interfaces} == set(if_speed), name
        bits = {name: {i: octets[2] for i, octets in p.previous.octets.items()}  # type: ignore[union-attr]
                for name, p in zip(names, agent.pollers, strict=True)}  # fmt: skip
        assert set(bits["full"].values()) == {64} == {bits["mixed"][i] for i in if_speed if i != 1}
        assert set(bits["noifx"].values()) == {32} == {bits["mixed"][1]}
        by_index = {name: {i.index: i for i in first[name].snmp.interfaces} for name in names}
        assert {i: s.speed_mbps for i, s in by_index["noifx"].items()} == {
            i: (int(v) + 500_000) // 1_000_000 for i, v in if_speed.items()
        }
        assert {i: s.speed_mbps for i, s in by_index["full"].items()} == {i: int(v) for i, v in high_speed.items()}
        assert by_index["noifx"][1].speed_mbps == by_index["full"][1].speed_mbps == 10  # lo
        assert before <= by_index["noifx"][1].in_octets <= after
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(16):
                s.sendto(b"\0" * 60000, ("127.0.0.1", 9))
        await asyncio.sleep(3.2)  # snmpd caches the interface table for about 3 s
        second = interface((await poll(agent, 1))[0], "lo")
    assert second.in_bps > 16 * 60000 * 8 / 10


PASS_IF_DESCR = """#!/bin/sh
# snmpd's pass protocol (-g get, -n getnext) for one object: ifDescr.1 as a Windows agent sends it
column=.1.3.6.1.2.1.2.2.1.2
if { [ "$1" = -g ] && [ "$2" = "$column.1" ]; } || { [ "$1" = -n ] && [ "$2" = "$column" ]; }; then
  printf '%s\\noctet\\n%s\\n' "$column.1" "$2"
fi
"""


async def test_nul_bytes_in_names_are_dropped_at_the_end_and_escaped_inside(tmp_path: Path) -> None:
    descr = b"MS TCP\x00Loopback interface\x00\x00"  # a C string with its terminator, and a NUL inside
    script = tmp_path / "if-descr.sh"
    script.write_text(PASS_IF_DESCR.replace('"$2"\n', f'"{" ".join(f"{b:02X}" for b in descr)}"\n'))
    script.chmod(0o755)
    with run_snmpd(tmp_path / "snmpd", f"{VIEWS}pass {dotted(COLUMNS['descr'])} {script}\n") as device:
        raw = await asyncio.to_thread(device.snmpget, f"{dotted(COLUMNS['descr'])}.1", community=NO_IFX)
        assert bytes.fromhex("".join(raw)) == descr  # net-snmp prints it in hex: not text
        agent = make_agent(tmp_path, targets=[target(device, community=NO_IFX)])
        (event,) = await poll(agent)
    assert [i.name for i in event.snmp.interfaces if i.index == 1] == ["MS TCP\\x00Loopback interface"]


async def test_v3_auth_priv_sha_aes(snmpd: Snmpd, tmp_path: Path) -> None:
    agent = make_agent(tmp_path, targets=[v3_target(snmpd)])
    (event,) = await poll(agent)
    assert event.snmp.kind == Kind.POLL, event.snmp.error
    assert event.snmp.sys_name == (await asyncio.to_thread(snmpd.snmpget, SYSTEM_OID["name"], user=V3_USER))[0]
    assert interface(event, "lo").oper_status == "up"


async def test_v3_auth_priv_sha256_aes256(snmpd: Snmpd, tmp_path: Path) -> None:
    fields = {"user": V3_USER_256, "auth_protocol": "SHA256", "auth_key": V3_AUTH_256}
    agent = make_agent(tmp_path, targets=[v3_target(snmpd, **fields, priv_protocol="AES256", priv_key=V3_PRIV_256)])
    (event,) = await poll(agent)
    assert (event.snmp.kind, event.snmp.sys_name) == (Kind.POLL, SYS_NAME), event.snmp.error


async def test_v3_context_selects_what_the_device_serves_in_that_context(tmp_path: Path) -> None:
    """snmpd serves context vrf-blue by proxying it to a second snmpd (net-snmp's `proxy -Cn`), whose
    sysDescr differs: a target with `context: vrf-blue` polls that one, one without the default."""
    with run_snmpd(tmp_path / "inner", "sysdescr vrf-blue device\n") as inner:
        contexts = (f"proxy -Cn vrf-blue -v 2c -c {COMMUNITY} {inner.address} .1.3\n"
                    f"view all included .1\nrouser {V3_USER} priv -V all vrf-blue\n")  # fmt: skip
        with run_snmpd(tmp_path / "outer", contexts) as outer:
            targets = [v3_target(outer, "default"), v3_target(outer, "blue", context="vrf-blue"),
                       v3_target(outer, "nosuch", context="nosuch")]  # fmt: skip
            agent = make_agent(tmp_path, targets=targets)
            default, blue, nosuch = [(await poll(agent, i))[0] for i in range(3)]
    assert (default.snmp.kind, default.snmp.sys_descr) == (Kind.POLL, SYS_DESCR), default.snmp.error
    assert (blue.snmp.kind, blue.snmp.sys_descr) == (Kind.POLL, "vrf-blue device"), blue.snmp.error
    assert interface(blue, "lo").oper_status == "up"  # the interface walk went through the context too
    assert nosuch.snmp.kind == Kind.POLL_ERROR  # net-snmp does not answer for a context it lacks
    assert nosuch.snmp.error.endswith("a wrong priv_key/priv_protocol, or no context 'nosuch' there?")


@pytest.mark.parametrize(
    ("fields", "reason", "message", "secret"),
    [
        pytest.param({"auth_key": "wrong-pass-1234"}, "auth_failure",
                     "authentication failed for SNMPv3 user 'amxuser': wrong auth_key", "wrong-pass-1234",
                     id="wrong-auth-key"),
        pytest.param({"user": "nobody"}, "unknown_user", "the device does not know SNMPv3 user 'nobody'", V3_AUTH,
                     id="unknown-user"),
        pytest.param({"priv_key": "wrong-priv-5678"}, "timeout", "no response within 0.5 s", "wrong-priv-5678",
                     id="wrong-priv-key"),
    ],
)  # fmt: skip
async def test_v3_errors_are_clear_counted_and_keep_the_keys_secret(
    snmpd: Snmpd, tmp_path: Path, caplog: pytest.LogCaptureFixture, fields: dict[str, str], reason: str,
    message: str, secret: str,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    agent = make_agent(tmp_path, targets=[v3_target(snmpd, "bad", timeout_s=0.5) | fields])
    (event,) = await poll(agent)
    assert event.snmp.kind == Kind.POLL_ERROR
    assert event.severity == events_pb2.SEVERITY_WARNING
    assert event.labels["reason"] == reason
    assert event.snmp.error.startswith(message), event.snmp.error
    assert counter(agent, "amoskys_agent_snmp_poll_errors_total", target="bad", reason=reason) == 1
    logged = "\n".join(JsonFormatter().format(record) for record in caplog.records)  # extra= fields too
    assert '"error"' in logged
    for text in (event.SerializeToString(), logged.encode()):
        assert secret.encode() not in text
        assert V3_PRIV.encode() not in text
    assert "snmp poll failed" in caplog.text


async def test_an_answer_of_the_wrong_type_is_a_counted_poll_error(tmp_path: Path) -> None:
    """A device that answers a 64-bit counter with a string (snmpd's `override`) gets POLL_ERROR
    bad_response, poll after poll: polling that target goes on."""
    wrong = 'override .1.3.6.1.2.1.31.1.1.1.6.1 octet_str "not-a-counter"\n'  # ifHCInOctets of lo
    with run_snmpd(tmp_path / "snmpd", wrong) as odd:
        agent = make_agent(tmp_path, targets=[target(odd, "odd")])
        for _ in range(2):
            (event,) = await poll(agent)
            assert (event.snmp.kind, event.labels["reason"]) == (Kind.POLL_ERROR, "bad_response")
            assert "wrong type" in event.snmp.error
        assert counter(agent, "amoskys_agent_snmp_poll_errors_total", target="odd", reason="bad_response") == 2


async def test_wrong_community_times_out_with_a_hint(snmpd: Snmpd, tmp_path: Path) -> None:
    agent = make_agent(tmp_path, targets=[target(snmpd, community="not-the-one", timeout_s=0.3, retries=1)])
    (event,) = await poll(agent)
    assert event.snmp.error == (
        "no response within 0.3 s (2 attempts): device down or unreachable, a wrong community, "
        "or this address not allowed?"
    )
    assert "not-the-one" not in str(event)


async def test_a_dead_target_does_not_delay_the_others(snmpd: Snmpd, tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # takes requests, never answers
        silent.bind(("127.0.0.1", 0))
        dead = target(snmpd, "dead", port=silent.getsockname()[1], timeout_s=1.0, retries=1)
        agent = make_agent(tmp_path, targets=[dead, target(snmpd, "live")], interval_s=60)
        async with collecting(agent) as wait:
            await wait(lambda events: any(e.snmp.target == "live" for e in events), timeout=5)
            assert agent.start_up_steps_left == 1  # start-up memory is released after the dead one's first poll
            seen = await wait(lambda events: any(e.snmp.target == "dead" for e in events), timeout=5)
            assert agent.start_up_steps_left == 0
    times = {e.snmp.target: (t, e.snmp.kind) for t, e in seen}
    assert times["live"][1] == Kind.POLL and times["live"][0] < 1.0, times
    assert times["dead"][1] == Kind.POLL_ERROR and times["dead"][0] >= 1.9, times  # 2 attempts of 1 s


async def test_with_thirteen_targets_a_timeout_is_its_own_length_and_the_others_keep_their_schedule(
    snmpd: Snmpd, tmp_path: Path
) -> None:
    """Twelve live targets polled every 2.5 s and a dead one (two attempts of 1 s): its POLL_ERROR comes
    when its attempts are over by the clock (late only by the event loop's own latency on this busy
    machine, measured beside it), and each live target's polls come an interval apart."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        dead = target(snmpd, "dead", port=silent.getsockname()[1], timeout_s=1.0, retries=1)
        live = [target(snmpd, f"live{i}", timeout_s=2.0) for i in range(12)]
        agent = make_agent(tmp_path, targets=[dead, *live], interval_s=2.5)
        lags: list[float] = []

        async def probe() -> None:  # how late the event loop runs a timer (this machine may be busy)
            while True:
                before = time.monotonic()
                await asyncio.sleep(0.01)
                lags.append(time.monotonic() - before - 0.01)

        prober = asyncio.create_task(probe())
        async with collecting(agent) as wait:
            seen = await wait(lambda events: sum(e.snmp.kind == Kind.POLL for e in events) >= 36, timeout=15)
        prober.cancel()
    late = max(lags)  # each clock deadline may run that late, never more (pysnmp's ticks added up: 4 s)
    errors = [t for t, e in seen if e.snmp.target == "dead"]
    assert 2.0 <= errors[0] < 2.0 + 2 * late + 0.1, (errors, late)  # 2 attempts of 1 s
    for name in (f"live{i}" for i in range(12)):
        polls = [t for t, e in seen if e.snmp.target == name and e.snmp.kind == Kind.POLL]
        gaps = [later - earlier for earlier, later in itertools.pairwise(polls)]
        assert len(polls) >= 2 and all(abs(gap - 2.5) < 0.75 + 2 * late for gap in gaps), (name, polls, late)


async def test_one_v3_user_name_with_two_sets_of_keys(snmpd: Snmpd, tmp_path: Path) -> None:
    good, bad = v3_target(snmpd, "good"), v3_target(snmpd, "bad", auth_key="other-key-4444")
    agent = make_agent(tmp_path, targets=[target(snmpd, "v2"), good, bad, v3_target(snmpd, "good-too")])
    assert engine_slots(agent.config.snmp.targets) == [0, 0, 1, 0]
    async with collecting(agent) as wait:
        seen = await wait(lambda events: len(events) == 4)
    assert {e.snmp.target: e.snmp.kind for _, e in seen} == {
        "v2": Kind.POLL, "good": Kind.POLL, "good-too": Kind.POLL, "bad": Kind.POLL_ERROR
    }  # fmt: skip
    assert len(agent.engines) == 2


def test_counter_delta_wraps_32_bit_counters_and_treats_a_64_bit_decrease_as_a_reset() -> None:
    assert counter_delta(100, 250, 64) == 150
    assert counter_delta(2**32 - 100, 50, 32) == 150
    assert counter_delta(2**64 - 100, 50, 64) is None
    assert counter_delta(5_000_000, 10, 64) is None


async def test_walk_columns_side_by_side_until_each_leaves_its_column() -> None:
    from pysnmp.proto.rfc1905 import endOfMibView

    a, b = (1, 3, 6, 1, 9, 1), (1, 3, 6, 1, 9, 2)
    mib = [((*a, 1), "a1"), ((*a, 2), "a2"), ((*b, 1), "b1"), ((*b, 7), "b7"), ((1, 3, 6, 1, 10), "next")]
    requests = []

    async def bulk(oids: list[tuple[int, ...]]) -> list[tuple[tuple[int, ...], Any]]:
        """GETBULK with max-repetitions 2: per row, the next object after each column's cursor."""
        requests.append(oids)
        after = [[entry for entry in mib if entry[0] > oid] for oid in oids]
        return [column[row] if row < len(column) else (oid, endOfMibView)
                for row in range(2) for oid, column in zip(oids, after, strict=True)]  # fmt: skip

    assert await walk_columns(bulk, {"a": a, "b": b}) == {"a": {1: "a1", 2: "a2"}, "b": {1: "b1", 7: "b7"}}
    assert requests == [[a, b], [(*a, 2), (*b, 7)]]

    async def backwards(oids: list[tuple[int, ...]]) -> list[tuple[tuple[int, ...], Any]]:
        return [((*a, 5), "x")] if oids == [a] else [((*a, 3), "back")]

    with pytest.raises(PollError, match="non-increasing OID in column a"):
        await walk_columns(backwards, {"a": a})


def test_reload_takes_the_interval_and_warns_that_targets_need_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = make_agent(tmp_path, targets=[{"name": "a", "address": "192.0.2.1", "community": "c"}])
    faster = msgspec.structs.replace(agent.config, snmp=msgspec.structs.replace(agent.config.snmp, interval_s=5.0))
    agent.reload(faster)
    assert agent.config.snmp.interval_s == 5.0
    assert "restart" not in caplog.text
    moved = msgspec.structs.replace(faster, snmp=msgspec.structs.replace(faster.snmp, targets=[]))
    agent.reload(moved)
    assert "snmp targets and trap settings change on restart" in caplog.text
    assert [p.target.name for p in agent.pollers] == ["a"]


def _table(**columns: dict[int, Any]) -> dict[str, dict[int, Any]]:
    from pysnmp.proto.rfc1902 import Counter32, Counter64, Gauge32, Integer, OctetString

    kinds = {"descr": OctetString, "name": OctetString, "admin": Integer, "oper": Integer, "in_errors": Counter32,
             "out_errors": Counter32, "in_octets32": Counter32, "out_octets32": Counter32, "in_octets": Counter64,
             "out_octets": Counter64, "high_speed": Gauge32, "speed": Gauge32}  # fmt: skip
    return {name: {i: kinds[name](v) for i, v in columns.get(name, {}).items()} for name in COLUMNS}


def test_rates_wraps_resets_restarts_and_status_changes() -> None:
    base = {"name": {1: "ge-0/0/1", 2: "old0"}, "admin": {1: 1, 2: 1}, "oper": {1: 1, 2: 1}, "high_speed": {1: 1000}}
    first = build_result(
        {"uptime": 1000}, _table(**base, in_octets={1: 2**64 - 1000}, out_octets={1: 500},
                                 in_octets32={2: 2**32 - 1000}, out_octets32={2: 10}), 100.0, None,
    )  # fmt: skip
    later = base | {"oper": {1: 2, 2: 1}}
    second = build_result(
        {"uptime": 2000}, _table(**later, in_octets={1: 3000}, out_octets={1: 1500},
                                 in_octets32={2: 1000}, out_octets32={2: 1010}), 110.0, first.sample,
    )  # fmt: skip
    wide, narrow = second.interfaces
    assert (wide.name, wide.speed_mbps, wide.HasField("in_bps"), wide.out_bps) == ("ge-0/0/1", 1000, False, 800.0)
    assert (narrow.in_bps, narrow.out_bps) == (2000 * 8 / 10, 1000 * 8 / 10)  # 32-bit wrap
    assert [(s.name, s.oper_status, was) for s, was in second.changes] == [("ge-0/0/1", "down", ("up", "up"))]
    restarted = build_result(
        {"uptime": 5}, _table(**later, in_octets={1: 9000}, out_octets={1: 9000}), 120.0, second.sample
    )
    assert [(i.HasField("in_bps"), i.HasField("out_bps")) for i in restarted.interfaces] == [(False, False)] * 2
    idle = build_result({"uptime": 6}, _table(**later, in_octets={1: 9000}, out_octets={1: 9000}), 130.0,
                        restarted.sample)  # fmt: skip
    assert [(i.HasField("in_bps"), i.in_bps, i.out_bps) for i in idle.interfaces] == [(True, 0.0, 0.0)] * 2


async def test_interface_change_events(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    first = build_result({"uptime": 1}, _table(name={3: "eth9"}, admin={3: 1}, oper={3: 1}), 1.0, None)
    second = build_result({"uptime": 2}, _table(name={3: "eth9"}, admin={3: 1}, oper={3: 2}), 2.0, first.sample)
    poll_event, change = agent.poll_events("sw1", second)
    assert poll_event.snmp.kind == Kind.POLL
    assert change.snmp.kind == Kind.INTERFACE_CHANGE
    assert (change.snmp.target, change.severity) == ("sw1", events_pb2.SEVERITY_WARNING)
    assert [(i.name, i.oper_status, i.admin_status) for i in change.snmp.interfaces] == [("eth9", "down", "up")]
    assert dict(change.labels) == {"previous_oper_status": "up", "previous_admin_status": "up"}


@pytest.mark.root
async def test_interface_up_down_on_a_real_device_is_reported(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("creating a veth pair needs root")
    suffix = uuid.uuid4().hex[:8]
    name, peer = f"amxs{suffix}", f"amxp{suffix}"  # a pair of our own, without addresses, removed at the end
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", peer], check=True)
    try:
        with run_snmpd(tmp_path / "snmpd") as own:  # started after the pair exists: its interface cache has it
            agent = make_agent(tmp_path, targets=[target(own)])
            (first,) = await poll(agent)
            assert (interface(first, name).admin_status, interface(first, name).oper_status) == ("down", "down")
            for device in (name, peer):
                subprocess.run(["ip", "link", "set", device, "up"], check=True)
            await asyncio.sleep(3.2)  # snmpd's interface cache
            events = await poll(agent)
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)
    assert {e.snmp.kind for e in events[1:]} == {Kind.INTERFACE_CHANGE}
    changes = {  # only our pair: other tests on this host may add or flap interfaces meanwhile
        i.name: (i.admin_status, i.oper_status, dict(e.labels))
        for e in events[1:] for i in e.snmp.interfaces if i.name in (name, peer)
    }  # fmt: skip
    previous = {"previous_admin_status": "down", "previous_oper_status": "down"}
    assert changes == {name: ("up", "up", previous), peer: ("up", "up", previous)}


# ---- traps ------------------------------------------------------------------------------------------


def trap_agent(tmp_path: Path, **snmp: Any) -> SnmpAgent:
    users = [{"user": "trapper", "engine_id": TRAP_ENGINE, "auth_key": "trap-auth-9911", "priv_key": "trap-priv-7722"}]
    defaults = {"trap_listen": "127.0.0.1:0", "trap_communities": [TRAP_COMMUNITY], "trap_users": users}
    return make_agent(tmp_path, **(defaults | snmp))


async def send(snmpd_env: dict[str, str], *args: str) -> None:
    process = await asyncio.create_subprocess_exec(*args, env=snmpd_env, stderr=asyncio.subprocess.PIPE)
    _, err = await process.communicate()
    assert process.returncode == 0, err.decode()


def trap_env(tmp_path: Path) -> dict[str, str]:
    return Snmpd(0, tmp_path).env()


async def test_v2c_trap_becomes_a_trap_event(tmp_path: Path) -> None:
    agent = trap_agent(tmp_path)
    to = f"127.0.0.1:{agent.trap_port}"
    env = trap_env(tmp_path)
    async with collecting(agent) as wait:
        await send(env, "snmptrap", "-v2c", "-c", TRAP_COMMUNITY, to, "", LINK_DOWN,
                   "1.3.6.1.2.1.2.2.1.1.7", "i", "7", "1.3.6.1.2.1.2.2.1.2.7", "s", "uplink to core",
                   "1.3.6.1.2.1.2.2.1.6.7", "x", "001B21AABBCC")  # fmt: skip
        seen = await wait(lambda events: len(events) == 1)
    ((_, event),) = seen
    snmp = event.snmp
    assert (snmp.kind, snmp.trap_oid, snmp.target) == (Kind.TRAP, LINK_DOWN, "127.0.0.1")
    assert dict(snmp.varbinds) == {
        "1.3.6.1.2.1.2.2.1.1.7": "7",
        "1.3.6.1.2.1.2.2.1.2.7": "uplink to core",
        "1.3.6.1.2.1.2.2.1.6.7": "0x001b21aabbcc",  # binary (a MAC address) as hex
    }
    assert dict(event.labels) == {"source": "127.0.0.1", "version": "2c"}
    assert event.severity == events_pb2.SEVERITY_WARNING  # linkDown
    assert TRAP_COMMUNITY.encode() not in event.SerializeToString()
    assert counter(agent, "amoskys_agent_snmp_traps_total") == 1


async def test_wrong_community_and_v1_traps(tmp_path: Path) -> None:
    agent = trap_agent(tmp_path)
    to = f"127.0.0.1:{agent.trap_port}"
    env = trap_env(tmp_path)
    async with collecting(agent) as wait:
        await send(env, "snmptrap", "-v2c", "-c", "guess", to, "", "1.3.6.1.4.1.8072.2.3.0.1")
        for _ in range(100):
            if agent.trap_rejections()["bad_community"]:
                break
            await asyncio.sleep(0.02)
        await send(env, "snmptrap", "-v1", "-c", TRAP_COMMUNITY, to, "1.3.6.1.4.1.8072", "127.0.0.1", "6", "17", "",
                   "1.3.6.1.2.1.1.5.0", "s", "v1 device")  # fmt: skip
        seen = await wait(lambda events: len(events) == 1)
    ((_, event),) = seen
    assert event.snmp.trap_oid == "1.3.6.1.4.1.8072.0.17"
    assert event.labels["version"] == "1"
    assert event.snmp.varbinds["1.3.6.1.2.1.1.5.0"] == "v1 device"
    assert event.snmp.varbinds["1.3.6.1.6.3.18.1.3.0"] == "127.0.0.1"  # snmpTrapAddress: the v1 agent-addr
    assert TRAP_COMMUNITY.encode() not in event.SerializeToString(), "snmpTrapCommunity.0 is dropped"
    assert counter(agent, "amoskys_agent_snmp_traps_rejected_total", reason="bad_community") == 1


async def test_v3_trap_and_inform(tmp_path: Path) -> None:
    agent = trap_agent(tmp_path)
    to = f"127.0.0.1:{agent.trap_port}"
    env = trap_env(tmp_path)
    usm = ["-v3", "-l", "authPriv", "-u", "trapper", "-a", "SHA", "-A", "trap-auth-9911", "-x", "AES"]
    async with collecting(agent) as wait:
        await send(env, "snmptrap", *usm, "-X", "trap-priv-7722", "-e", TRAP_ENGINE, to, "",
                   "1.3.6.1.4.1.8072.2.3.0.1", "1.3.6.1.4.1.8072.2.3.2.1", "i", "42")  # fmt: skip
        await send(env, "snmpinform", *usm, "-X", "trap-priv-7722", "-t", "2", to, "", "1.3.6.1.4.1.8072.2.3.0.2")
        await send(
            env, "snmptrap", *usm, "-X", "wrong-priv-0000", "-e", TRAP_ENGINE, to, "", "1.3.6.1.4.1.8072.2.3.0.3"
        )
        seen = await wait(lambda events: len(events) == 2)
        await asyncio.sleep(0.3)
    events = [e for _, e in seen]
    assert [(e.snmp.trap_oid, e.labels["version"], e.labels["user"]) for e in events] == [
        ("1.3.6.1.4.1.8072.2.3.0.1", "3", "trapper"),
        ("1.3.6.1.4.1.8072.2.3.0.2", "3", "trapper"),
    ]
    assert events[0].snmp.varbinds["1.3.6.1.4.1.8072.2.3.2.1"] == "42"
    assert len(seen) == 2, "the trap with a wrong privacy key is refused"
    assert counter(agent, "amoskys_agent_snmp_traps_rejected_total", reason="decryption_error") == 1
    # snmpinform first learns this receiver's engine ID (RFC 3414 4): protocol, not a rejection
    assert counter(agent, "amoskys_agent_snmp_engine_discoveries_total") == 1
    assert counter(agent, "amoskys_agent_snmp_traps_rejected_total", reason="unknown_engine_id") == 0


async def test_ipv6_target_and_trap_receiver(snmpd: Snmpd, tmp_path: Path) -> None:
    agent = trap_agent(tmp_path, targets=[target(snmpd, "v6", address="::1")], trap_listen="[::1]:0")
    (event,) = await poll(agent)
    assert (event.snmp.kind, event.snmp.sys_name) == (Kind.POLL, SYS_NAME), event.snmp.error
    async with collecting(agent) as wait:
        await send(trap_env(tmp_path), "snmptrap", "-v2c", "-c", TRAP_COMMUNITY, f"udp6:[::1]:{agent.trap_port}", "",
                   "1.3.6.1.4.1.8072.2.3.0.1")  # fmt: skip
        seen = await wait(lambda events: any(e.snmp.kind == Kind.TRAP for e in events))
    (trap,) = [e for _, e in seen if e.snmp.kind == Kind.TRAP]
    assert (trap.snmp.target, trap.labels["source"]) == ("v6", "::1")


# ---- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("targets: [{name: sw1, address: 10.0.0.1, version: 3, user: u}]",
         "key 'snmp.targets[0].auth_key': version 3 needs user, auth_key and priv_key (authPriv)"),
        ("targets: [{name: sw1, address: 10.0.0.1, version: 3, auth_key: abcdefgh1, priv_key: abcdefgh2}]",
         "key 'snmp.targets[0].user': version 3 needs user, auth_key and priv_key"),
        ("targets: [{name: sw1, address: 10.0.0.1, version: 3, user: u, auth_key: short, priv_key: long-enough}]",
         "key 'snmp.targets[0].auth_key': must be at least 8 characters (RFC 3414), got 5"),
        ("targets: [{name: sw1, address: 10.0.0.1, version: '3', user: u, auth_key: long-enough, priv_key: abc1234}]",
         "key 'snmp.targets[0].priv_key': must be at least 8 characters (RFC 3414), got 7"),
        ("targets: [{name: sw1, address: 10.0.0.1, version: 1, community: c}]",
         "key 'snmp.targets[0].version': expected one of '2c', 3, got 1"),
        ("targets: [{name: sw1, address: 10.0.0.1, version: 2c}]",
         "key 'snmp.targets[0].community': version 2c needs a community"),
        ("targets: [{name: sw1, address: 10.0.0.1, community: c, context: vrf1}]",
         "key 'snmp.targets[0].context': a context name is SNMPv3's"),
        ("targets: [{name: sw1, address: a, community: c, auth_protocol: MD5}]",
         "key 'snmp.targets[0].auth_protocol': expected one of 'SHA', 'SHA256', 'SHA512', got 'MD5'"),
        ("targets: [{name: sw1, address: a, community: c}, {name: sw1, address: b, community: c}]",
         "key 'snmp.targets': target name 'sw1' is used twice"),
        ("trap_listen: 127.0.0.1:162", "key 'snmp.trap_listen': the trap receiver needs trap_communities"),
        ("trap_listen: 'localhost'", "key 'snmp.trap_listen': expected 'host:port'"),
        ("trap_users: [{user: u, auth_key: abcdefgh1, priv_key: abcdefgh2, engine_id: xyz}]",
         "key 'snmp.trap_users[0].engine_id': expected 5 to 32 bytes in hex"),
    ],
)  # fmt: skip
def test_bad_snmp_config_is_explained(tmp_path: Path, section: str, expected: str) -> None:
    path = tmp_path / "agent-snmp.yml"
    path.write_text("snmp:\n  " + section + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, SnmpAgentConfig, env={})
    assert str(caught.value).startswith(f"{path}: {expected}"), str(caught.value)
    for secret in ("abcdefgh1", "abcdefgh2", "long-enough", "short", "abc1234"):
        assert secret not in str(caught.value)


def test_config_dump_masks_every_snmp_secret(tmp_path: Path) -> None:
    from amoskys.config import dump_config

    path = tmp_path / "agent-snmp.yml"
    path.write_text(
        "snmp:\n  trap_listen: 0.0.0.0:162\n  trap_communities: [trap-secret-1]\n"
        "  trap_users: [{user: t, auth_key: trap-auth-secret, priv_key: trap-priv-secret}]\n"
        "  targets:\n    - {name: a, address: 192.0.2.1, community: poll-secret}\n"
        "    - {name: b, address: 192.0.2.2, version: 3, user: u, auth_key: auth-secret, priv_key: priv-secret}\n"
    )
    dumped = dump_config(load_config(path, SnmpAgentConfig, env={}))
    for secret in ("trap-secret-1", "trap-auth-secret", "trap-priv-secret", "poll-secret", "auth-secret", "priv-secr"):
        assert secret not in dumped
    assert "user: u" in dumped and "name: b" in dumped


def test_a_trap_port_in_use_stops_the_agent_at_start(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ConfigError, match=rf"snmp.trap_listen {listen}: cannot bind: Address already in use"):
            trap_agent(tmp_path, trap_listen=listen)


# ---- end to end ------------------------------------------------------------------------------------


async def test_snmp_agent_publishes_through_the_hub(snmpd: Snmpd, live_hub: LiveHub, tmp_path: Path) -> None:
    snmp = {
        "targets": [target(snmpd, "lab-sw"), v3_target(snmpd, "lab-v3", auth_key="not-the-password")],
        "interval_s": 1.0, "trap_listen": "127.0.0.1:0", "trap_communities": [TRAP_COMMUNITY],
    }  # fmt: skip
    runtime = AgentRuntime("snmp", None, agent_config(live_hub, tmp_path, "snmp", snmp=snmp))
    assert isinstance(runtime.agent, SnmpAgent)
    task = asyncio.create_task(runtime.run())
    try:
        await asyncio.sleep(0.5)
        await send(trap_env(tmp_path), "snmptrap", "-v2c", "-c", TRAP_COMMUNITY,
                   f"127.0.0.1:{runtime.agent.trap_port}", "", "1.3.6.1.4.1.8072.2.3.0.1")  # fmt: skip
        kinds: set[tuple[str, int]] = set()
        for _ in range(100):
            stored = await live_hub.query(bus_pb2.EventFilter(agent_ids=["test-snmp"], kinds=["snmp"]))
            kinds = {(s.event.snmp.target, s.event.snmp.kind) for s in stored}
            polls = [s for s in stored if s.event.snmp.kind == Kind.POLL and s.event.snmp.target == "lab-sw"]
            rated = [p for p in polls if interface(p.event, "lo").in_bps > 0]  # once snmpd's 3 s cache moved
            if {("lab-v3", Kind.POLL_ERROR), ("127.0.0.1", Kind.TRAP)} <= kinds and rated:
                break
            await asyncio.sleep(0.1)
        metrics = generate_latest(runtime.metrics.registry).decode()
    finally:
        runtime._stopping.set()
        await asyncio.wait_for(task, 30)
    assert ("lab-sw", Kind.POLL) in kinds and ("lab-v3", Kind.POLL_ERROR) in kinds and ("127.0.0.1", Kind.TRAP) in kinds
    assert rated, "polls after the first carry rates"
    assert all(p.event.snmp.sys_name == SYS_NAME for p in polls)
    assert 'amoskys_agent_snmp_poll_errors_total{reason="auth_failure",target="lab-v3"}' in metrics
    assert 'amoskys_agent_snmp_polls_total{target="lab-sw"}' in metrics
    assert "not-the-password" not in str(stored)
