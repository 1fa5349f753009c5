"""auth: rotations by real logrotate, event time, brute force and its saved windows, kill -9 mid-file exactly once."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import yaml

from amoskys import keys
from amoskys.agents.auth.agent import READ_CHUNK, AuthAgent, JournalError, LogFollower, Position, journal_entry
from amoskys.agents.auth.config import AuthAgentConfig
from amoskys.agents.auth.lines import parse_line
from amoskys.agents.runtime.outbox import Outbox
from amoskys.config import OutboxConfig
from amoskys.errors import ConfigError
from amoskys.v1 import bus_pb2, events_pb2
from tests.agents.conftest import agent_config, section_error
from tests.agents.test_authlog import DATA
from tests.hubfixture import LiveHub

Kind = events_pb2.AuthEvent.Kind
H = "2026-11-22T10:15:01.123456+00:00 web1"
NS = 1_000_000_000
T0 = 1_795_335_301  # 2026-11-22T08:15:01Z


def write(path: Path, lines: list[str], mode: str = "a") -> None:
    with path.open(mode) as handle:
        handle.writelines(line + "\n" for line in lines)


def numbered(prefix: str, first: int, count: int) -> list[str]:
    return [f"{prefix} line {i:05d} " + "x" * (i % 37) for i in range(first, first + count)]


def drain(follower: LogFollower, upto: int | None = None) -> list[str]:
    """Lines the agent would process (all, or the first `upto`), advancing as the agent does."""
    seen: list[str] = []
    for _ in range(6):  # each rotation step needs a poll
        for line, offset in follower.read_lines():
            if upto is not None and len(seen) == upto:
                return seen
            seen.append(line)
            follower.advance(offset)
    return seen


def logrotate(tmp_path: Path, log: Path, mode: str) -> None:
    """Debian's rsyslog rotation (delaycompress: the newest rotated file stays plain), by `create` or `copytruncate`."""
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"{log} {{\n  rotate 4\n  {mode}\n  compress\n  delaycompress\n  missingok\n}}\n")
    subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "logrotate.state"), str(conf)], check=True)


def test_rename_rotation_reads_the_old_file_to_its_end_then_the_new(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    write(log, numbered("a", 0, 100), "w")
    follower = LogFollower(log)
    assert drain(follower, upto=40) == numbered("a", 0, 40)
    write(log, numbered("a", 100, 30))
    logrotate(tmp_path, log, "create")
    write(log, numbered("b", 0, 50))
    assert drain(follower) == numbered("a", 40, 90) + numbered("b", 0, 50)
    logrotate(tmp_path, log, "create")  # again: auth.log.1 -> auth.log.2.gz
    write(log, numbered("c", 0, 5))
    assert drain(follower) == numbered("c", 0, 5)


def test_copytruncate_lines_written_just_before_come_from_the_copy(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    write(log, numbered("a", 0, 100), "w")
    follower = LogFollower(log)
    assert len(drain(follower)) == 100
    write(log, numbered("a", 100, 34))  # not read yet when logrotate copies and truncates
    logrotate(tmp_path, log, "copytruncate")
    write(log, numbered("b", 0, 20))
    assert drain(follower) == numbered("a", 100, 34) + numbered("b", 0, 20)
    write(log, numbered("a", 134, 3))  # a second copytruncate, the first copy now compressed
    logrotate(tmp_path, log, "copytruncate")
    assert drain(follower) == numbered("a", 134, 3)


@pytest.mark.parametrize("copy", [True, False], ids=["copytruncate", "truncate-only"])
def test_append_larger_than_the_old_offset_right_after_truncation(tmp_path: Path, copy: bool) -> None:
    log = tmp_path / "auth.log"
    write(log, numbered("a", 0, 10), "w")
    follower = LogFollower(log)
    assert len(drain(follower)) == 10
    write(log, numbered("a", 10, 5))
    if copy:
        logrotate(tmp_path, log, "copytruncate")
    else:
        log.open("r+").truncate(0)
    write(log, numbered("b", 0, 200))  # past the old offset before the agent looks again
    unread = numbered("a", 10, 5) if copy else []  # without a copy they are gone: said in a warning
    assert drain(follower) == unread + numbered("b", 0, 200)


@pytest.mark.parametrize("mode", ["copytruncate", "create"])
def test_agent_down_across_a_rotation_resumes_exactly(tmp_path: Path, mode: str) -> None:
    log = tmp_path / "auth.log"
    write(log, numbered("a", 0, 50), "w")
    first = LogFollower(log)
    assert len(drain(first, upto=30)) == 30
    saved = first.position.text()
    first.close()
    write(log, numbered("a", 50, 18))
    logrotate(tmp_path, log, mode)
    write(log, numbered("b", 0, 25))
    second = LogFollower(log)
    second.restore(Position.parse(saved))
    assert drain(second) == numbered("a", 30, 38) + numbered("b", 0, 25)


def test_agent_down_across_a_truncate_without_copy_reads_the_new_content(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    write(log, numbered("a", 0, 50), "w")
    first = LogFollower(log)
    drain(first)
    saved = first.position.text()
    first.close()
    log.open("r+").truncate(0)
    write(log, numbered("b", 0, 80))  # longer than before: only the first bytes tell
    second = LogFollower(log)
    second.restore(Position.parse(saved))
    assert drain(second) == numbered("b", 0, 80)


def test_a_missing_log_keeps_the_saved_position_until_it_comes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "auth.log"
    follower = LogFollower(log)
    follower.restore(Position(123, 456, b"Nov 22 10:15:03 web1"))
    assert follower.read_lines() == follower.read_lines() == []
    assert follower.position == Position(123, 456, b"Nov 22 10:15:03 web1") and not caplog.records
    write(log, numbered("b", 0, 3), "w")  # another stream: the old one's rest is nowhere
    assert drain(follower) == numbered("b", 0, 3)
    assert [r.getMessage() for r in caplog.records] == [
        "the rest of the log before the last rotation is gone (no uncompressed rotated copy); going on"
    ]


def test_a_line_longer_than_a_read_comes_in_pieces_and_the_next_line_whole(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    giant = "x" * (2 * READ_CHUNK + 10)
    write(log, [giant, "after"], "w")
    assert drain(LogFollower(log)) == [giant[:READ_CHUNK], giant[READ_CHUNK : 2 * READ_CHUNK], giant[-10:], "after"]


def test_bytes_that_are_not_utf8_are_replaced_not_dropped(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    log.write_bytes(f"{H} sshd[9]: Invalid user ".encode() + b"\xff\xfeadm" + b" from 192.0.2.1 port 22\n")
    [line] = drain(LogFollower(log))
    parsed = parse_line(line)
    assert parsed is not None and parsed.auth.user == "\ufffd\ufffdadm" and parsed.auth.src_ip == "192.0.2.1"


def test_journal_entries_of_every_shape() -> None:
    binary = {"SYSLOG_IDENTIFIER": "sshd", "_PID": "7", "__REALTIME_TIMESTAMP": "1795335301000001",
              "MESSAGE": list(b"Invalid user \xffx from 192.0.2.1 port 22")}  # fmt: skip
    parsed = journal_entry(binary)
    assert parsed is not None and parsed.auth.user == "\ufffdx" and parsed.ts_ns == 1_795_335_301_000_001_000
    bare = journal_entry({"SYSLOG_IDENTIFIER": "su", "MESSAGE": "(to root) alice on pts/0", "_PID": "x"})
    assert bare is not None and (bare.auth.pid, bare.ts_ns) == (0, 0)  # no time: stamped on arrival
    assert journal_entry({"SYSLOG_IDENTIFIER": "sshd"}) is None


def test_position_text_round_trip_and_bad_text(tmp_path: Path) -> None:
    position = Position(12, 345, b"Nov 22 10:15:03 web1")
    assert Position.parse(position.text()) == position
    assert Position.parse("12:345") == Position(12, 345, b"")  # saved by an older version
    with pytest.raises(ValueError):
        Position.parse("twelve:3")


def test_crlf_and_partial_lines(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    log.write_bytes(b"one\r\ntw\ro\npart")
    follower = LogFollower(log)
    assert drain(follower) == ["one\r", "tw\ro"]  # a lone CR is inside a line; the parser drops the CRLF's
    with log.open("ab") as handle:
        handle.write(b"ial\n")
    assert drain(follower) == ["partial"]


# ---- the agent: event time, brute force ---------------------------------------------------------------


def auth_config(log: Path, **auth: object) -> AuthAgentConfig:
    return msgspec.convert({"host": "t", "auth": {"source": "file", "log_path": str(log), **auth}}, AuthAgentConfig)


async def take(agent: AuthAgent, count: int) -> list[events_pb2.Event]:
    events: list[events_pb2.Event] = []

    async def run() -> None:
        async for event in agent.collect():
            events.append(event)
            if len(events) == count:
                return

    await asyncio.wait_for(run(), 20)
    return events


def iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat()


def alerts(events: list[events_pb2.Event]) -> list[events_pb2.Event]:
    return [e for e in events if e.WhichOneof("body") == "alert"]


async def test_events_carry_the_log_time_and_the_window_is_event_time(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    spread = [f"{iso(T0 + i * 2700)} web1 sshd[{i}]: Failed password for root from 192.0.2.50 port {4000 + i} ssh2"
              for i in range(5)]  # fmt: skip
    burst = [f"{iso(T0 + 20000 + i * 10)} web1 sshd[{i}]: Failed password for root from 192.0.2.50 port {i} ssh2"
             for i in range(5)]  # fmt: skip
    write(log, spread + burst, "w")  # three hours of log read in one go, as after an outage
    agent = AuthAgent(auth_config(log, brute_force_failures=5, brute_force_window_s=60), tmp_path)
    events = await take(agent, 11)
    assert [e.ts_ns for e in events[:5]] == [(T0 + i * 2700) * NS for i in range(5)]
    [alert] = alerts(events)
    assert alert is events[10] and alert.ts_ns == (T0 + 20040) * NS
    assert alert.alert.details["failures"] == "5"
    assert alert.alert.details["first_ns"] == str((T0 + 20000) * NS)
    assert "within 40 s" in alert.alert.summary


async def test_invalid_users_and_key_only_probes_count(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    lines = []
    for i in range(12):  # 12 invalid-user probes in 2 minutes, each its own connection
        stamp = f"{iso(T0 + i * 10)} web1 sshd[{500 + i}]:"
        address = f"192.0.2.9 port {6000 + i}"
        lines += [f"{stamp} Invalid user probe{i} from {address}",
                  f"{stamp} Failed none for invalid user probe{i} from {address} ssh2",
                  f"{stamp} Connection closed by invalid user probe{i} {address} [preauth]"]  # fmt: skip
    write(log, lines, "w")
    agent = AuthAgent(auth_config(log, brute_force_failures=5, brute_force_window_s=120), tmp_path)
    events = await take(agent, 36 + 2)
    assert [a.alert.details["failures"] for a in alerts(events)] == ["5", "5"]  # at the 5th and the 10th


async def test_real_openssh_lines_count_one_attempt_per_failed_connection(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    shutil.copy(DATA / "openssh-9.2-loopback.log", log)  # 8 connections fail, one succeeds
    agent = AuthAgent(auth_config(log, brute_force_failures=8, brute_force_window_s=3600), tmp_path)
    events = await take(agent, 17 + 1)
    [alert] = alerts(events)
    assert alert.alert.details["failures"] == "8"
    assert alert is events[-2] and "maximum authentication attempts" in events[-3].auth.raw  # the 8th connection


async def test_message_repeated_counts_each_repetition(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    write(log, [
        f"{H} sshd[7]: Failed password for root from 192.0.2.7 port 4000 ssh2",
        f"{H} sshd[7]: message repeated 4 times: [ Failed password for root from 192.0.2.7 port 4000 ssh2]",
    ], "w")  # fmt: skip
    agent = AuthAgent(auth_config(log, brute_force_failures=5), tmp_path)
    events = await take(agent, 6)
    assert [e.WhichOneof("body") for e in events] == ["auth"] * 5 + ["alert"]


async def test_brute_force_windows_survive_a_restart(tmp_path: Path) -> None:
    """The window is saved with the position, in the outbox transaction the runtime writes."""
    log = tmp_path / "auth.log"
    failures = [
        f"{iso(T0 + i)} web1 sshd[{i}]: Failed password for root from 192.0.2.66 port {i} ssh2" for i in range(5)
    ]
    write(log, failures[:3], "w")
    key = tmp_path / "sign.key"
    keys.write_private_key(key, keys.generate_signing_key())

    def outbox() -> Outbox:
        return Outbox(tmp_path / "outbox.db", OutboxConfig(), "agent-1", keys.load_signing_key(key))

    first = AuthAgent(auth_config(log), tmp_path)
    box = outbox()
    first.restore(box.state())
    box.add([e.SerializeToString() for e in await take(first, 3)], first.checkpoint())
    box.close()
    write(log, failures[3:])
    second = AuthAgent(auth_config(log), tmp_path)
    second.restore(outbox().state())
    events = await take(second, 3)
    assert [e.auth.raw for e in events[:2]] == failures[3:]  # nothing read twice
    assert alerts(events)[0].alert.details["failures"] == "5"


def test_unreadable_saved_state_starts_afresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agent = AuthAgent(auth_config(tmp_path / "auth.log"), tmp_path)
    agent.restore({"auth.position": "1:2", "auth.brute_force": "{not json"})
    assert agent.follower.position == Position(1, 2)
    assert "saved auth state unreadable" in caplog.text
    assert agent.checkpoint()["auth.brute_force"] == '{"attempts":{},"connections":{}}'


async def test_unreadable_log_is_a_clear_error(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    log.mkdir()  # a path that exists but cannot be read as a log, whoever we are
    config = msgspec.convert({"host": "t", "auth": {"source": "file", "log_path": str(log)}}, AuthAgentConfig)
    agent = AuthAgent(config, tmp_path)
    with pytest.raises(ConfigError, match=r"auth\.log: cannot be read"):
        await asyncio.wait_for(agent.collect().__anext__(), 5)


class AgentProcess:
    """`amoskys agent auth` as its own process, publishing to the live hub; what the hub stored."""

    def __init__(self, live_hub: LiveHub, tmp_path: Path, log: Path) -> None:
        self.hub = live_hub
        self.config = agent_config(
            live_hub, tmp_path, "auth",
            auth={"source": "file", "log_path": str(log)},
            batch={"max_events": 500, "max_linger_ms": 50},
        )  # fmt: skip
        path = tmp_path / "agent-auth.yml"
        path.write_text(yaml.safe_dump(msgspec.to_builtins(self.config)))
        self.command = [sys.executable, "-m", "amoskys", "agent", "auth", "--config", str(path)]

    def start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command, stderr=subprocess.DEVNULL)

    def count(self, kind: str = "auth") -> int:
        """Events of `kind` in the hub's store, read-only beside the hub."""
        with sqlite3.connect(f"file:{self.hub.config.store.path}?mode=ro", uri=True) as db:
            query = "SELECT count(*) FROM events WHERE agent_id = ? AND kind = ?"
            return int(db.execute(query, (self.config.agent_id, kind)).fetchone()[0])

    async def wait_for(self, total: int) -> None:
        for _ in range(600):
            if self.count() >= total:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # and nothing more comes

    async def stored(self, kind: str) -> list[events_pb2.Event]:
        stored = await self.hub.query(bus_pb2.EventFilter(agent_ids=[self.config.agent_id], kinds=[kind]))
        return [s.event for s in stored]


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(20)


@pytest.mark.slow
async def test_kill_9_mid_file_then_restart_every_line_exactly_once(live_hub: LiveHub, tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    total = 60_000
    lines = [
        f"{H} sshd[{i}]: Accepted password for user{i} from 10.9.0.{i % 250} port {1024 + i} ssh2" for i in range(total)
    ]
    write(log, lines, "w")
    agent = AgentProcess(live_hub, tmp_path, log)
    first = agent.start()
    try:
        while agent.count() == 0:
            await asyncio.sleep(0.02)
        first.send_signal(signal.SIGKILL)  # as soon as the first batch is stored: mid-file
        first.wait()
    finally:
        stop(first)
    assert agent.count() < total, "the agent finished before it was killed: use more lines"
    second = agent.start()
    try:
        await agent.wait_for(total)
        raws = [event.auth.raw for event in await agent.stored("auth")]
        assert len(raws) == total
        assert set(raws) == set(lines)
    finally:
        stop(second)


@pytest.mark.slow
async def test_kill_9_then_copytruncate_while_down_loses_repeats_and_resets_nothing(
    live_hub: LiveHub, tmp_path: Path
) -> None:
    """The issue's run: lines written before the truncate, new ones after, the agent down across it;
    three failures before the kill and two after still make one brute-force alert."""
    log = tmp_path / "auth.log"
    accepted = [
        f"{H} sshd[{i}]: Accepted password for user{i} from 10.9.1.{i % 250} port {i} ssh2" for i in range(2052)
    ]
    failed = [f"{H} sshd[{70 + i}]: Failed password for root from 192.0.2.77 port {i} ssh2" for i in range(5)]
    write(log, accepted[:2000] + failed[:3], "w")
    agent = AgentProcess(live_hub, tmp_path, log)
    first = agent.start()
    try:
        await agent.wait_for(2003)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        stop(first)
    write(log, accepted[2000:2034])  # not read: the agent is down
    logrotate(tmp_path, log, "copytruncate")
    write(log, accepted[2034:] + failed[3:])
    second = agent.start()
    try:
        await agent.wait_for(2057)
        raws = [event.auth.raw for event in await agent.stored("auth")]
        assert sorted(raws) == sorted(accepted + failed)  # each line exactly once
        [alert] = await agent.stored("alert")
        assert (alert.alert.rule, alert.alert.details["failures"]) == ("auth.brute_force", "5")
    finally:
        stop(second)


JOURNAL_ENTRIES = [  # `journalctl -o json` lines as Debian 12's journald writes them for sshd
    {"__CURSOR": "s=1;i=1", "__REALTIME_TIMESTAMP": "1795335301123456", "SYSLOG_IDENTIFIER": "sshd", "_PID": "812",
     "MESSAGE": "Failed password for invalid user admin from 198.51.100.7 port 50122 ssh2"},
    {"__CURSOR": "s=1;i=2", "__REALTIME_TIMESTAMP": "1795335302000001", "SYSLOG_IDENTIFIER": "sshd", "_PID": "815",
     "MESSAGE": "Accepted publickey for alice from 198.51.100.8 port 50200 ssh2: ED25519 SHA256:abc"},
]  # fmt: skip


async def test_journalctl_exit_is_an_error_and_the_cursor_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """journald cannot run here (PID 1 is not systemd; Molecule covers the real journal): a journalctl
    that prints real-format entries and exits stands in for it, to show the agent does not go quiet."""
    import json

    calls = tmp_path / "calls"
    script = tmp_path / "bin" / "journalctl"
    script.parent.mkdir()
    lines = "\n".join(json.dumps(entry) for entry in JOURNAL_ENTRIES)
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\ncat <<'EOF'\n{lines}\nEOF\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
    config = msgspec.convert({"host": "h", "auth": {"source": "journal"}}, AuthAgentConfig)
    agent = AuthAgent(config, tmp_path)
    events: list[events_pb2.Event] = []
    with pytest.raises(JournalError, match="journalctl exited with status 1"):
        async for event in agent.collect():
            events.append(event)
    assert [e.auth.kind for e in events] == [events_pb2.AuthEvent.SSH_FAILED, events_pb2.AuthEvent.SSH_ACCEPTED]
    assert [e.ts_ns for e in events] == [1_795_335_301_123_456_000, 1_795_335_302_000_001_000]  # the journal's time
    assert agent.checkpoint()["auth.cursor"] == "s=1;i=2"
    with pytest.raises(JournalError):
        async for _ in agent.collect():
            pass
    first, second = calls.read_text().splitlines()
    assert "--lines=0" in first.split()
    assert "--after-cursor=s=1;i=2" in second.split()


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("{source: syslog}", "key 'auth.source': expected one of 'auto', 'file', 'journal', got 'syslog'"),
        ("{brute_force_failures: 0}", "key 'auth.brute_force_failures': expected int >= 1"),
        ("{brute_force_window_s: -1}", "key 'auth.brute_force_window_s': expected float > 0.0"),
        ("{path: /var/log/secure}", "key 'auth.path': unknown key; did you mean 'log_path'?"),
    ],
)
def test_bad_auth_section_is_explained_at_load(tmp_path: Path, section: str, expected: str) -> None:
    assert section_error(tmp_path, "auth", f"auth: {section}\n").startswith(expected)
