"""The process-event connector against the running kernel, and its parser against cut and foreign messages."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amoskys.agents.proc.connector import (
    CN_MSG,
    NETLINK_CONNECTOR,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGHDR,
    TASKSTATS_TYPE_AGGR_PID,
    TASKSTATS_TYPE_PID,
    TASKSTATS_TYPE_STATS,
    ConnectorError,
    Exec,
    Exit,
    ExitRecord,
    Fork,
    IdChange,
    KernelEvent,
    MalformedMessage,
    ProcConnector,
    monotonic_to_wall_ns,
    parse,
    parse_exits,
)

SRC = Path(__file__).resolve().parents[2] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC)}
USER = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]  # the unit's: a user of its own
CAPABLE = [*USER, "--inh-caps", "+net_admin", "--ambient-caps", "+net_admin"]  # and CAP_NET_ADMIN, ambient


def events_of(conn: ProcConnector, pid: int, until: type, timeout: float = 10.0) -> list[KernelEvent]:
    """The kernel's events about `pid` up to and including the first of type `until`."""
    found: list[KernelEvent] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in conn.read(0.2):
            if pid in (getattr(event, "tgid", None), getattr(event, "child_tgid", None)):
                found.append(event)
                if isinstance(event, until):
                    return found
    raise AssertionError(f"no {until.__name__} for {pid} within {timeout} s; saw {found}")


def message(what: int, payload: bytes, *, idx: int = 1, length: int | None = None) -> bytes:
    """One netlink datagram as the kernel builds it: nlmsghdr, cn_msg, proc_event (40 bytes)."""
    event = struct.pack("=IIQ", what, 0, 123) + payload.ljust(24, b"\0")
    body = CN_MSG.pack(idx, 1, 0, 0, len(event) if length is None else length, 0) + event
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), NLMSG_DONE, 0, 0, 0) + body


def test_fork_exec_exit_of_a_short_process(connector: ProcConnector) -> None:
    before = time.monotonic_ns()
    child = subprocess.Popen(["/bin/sh", "-c", "exit 3"])
    child.wait()
    fork, exec_, exit_ = events_of(connector, child.pid, Exit)
    assert isinstance(fork, Fork) and isinstance(exec_, Exec) and isinstance(exit_, Exit)
    assert fork.parent_tgid == os.getpid() and fork.child_pid == fork.child_tgid
    assert exit_.parent_tgid == os.getpid()
    assert exit_.exit_code == 3 << 8  # the wait status, as waitpid() returns it
    assert before <= fork.ts_ns <= exec_.ts_ns <= exit_.ts_ns <= time.monotonic_ns()
    assert abs(monotonic_to_wall_ns(exit_.ts_ns) - time.time_ns()) < 60 * 10**9


def test_uid_and_gid_changes_are_reported(connector: ProcConnector) -> None:
    child = subprocess.Popen(["/bin/true"], user=65534, group=65534, extra_groups=[])
    child.wait()
    events = events_of(connector, child.pid, Exit)
    changes = [e for e in events if isinstance(e, IdChange) and e.pid == child.pid]
    assert any(not e.gid and e.real == e.effective == 65534 for e in changes), changes
    assert any(e.gid and e.real == e.effective == 65534 for e in changes), changes


def test_a_thread_is_a_fork_within_the_same_process(connector: ProcConnector) -> None:
    code = "import threading; t = threading.Thread(target=lambda: None); t.start(); t.join()"
    child = subprocess.Popen([sys.executable, "-c", code])
    child.wait()
    events = events_of(connector, child.pid, Exit)
    threads = [e for e in events if isinstance(e, Fork) and e.child_pid != e.child_tgid]
    assert threads and all(e.child_tgid == child.pid for e in threads)
    assert all(e.parent_tgid == os.getpid() for e in threads)  # a thread's "parent" is its process's parent


def test_a_message_not_from_the_kernel_is_refused(connector: ProcConnector) -> None:
    forger = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    try:
        forger.bind((0, 0))
        forger.sendto(message(0x2, struct.pack("=ii", 4242, 4242)), (connector.portid, 0))
        deadline = time.monotonic() + 10
        with pytest.raises(MalformedMessage, match="not the kernel"):
            while time.monotonic() < deadline:
                connector.read(0.2)
    finally:
        forger.close()


def test_unavailable_outside_the_initial_namespaces() -> None:
    probe = (
        "from amoskys.agents.proc.connector import ProcConnector, ConnectorUnavailable\n"
        "try:\n    ProcConnector()\nexcept ConnectorUnavailable as exc:\n    print('unavailable:', exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run(
        ["unshare", "--pid", "--fork", sys.executable, "-c", probe], capture_output=True, text=True, env=env,
        check=False,
    )  # fmt: skip
    if result.returncode and "unshare failed" in result.stderr:
        pytest.skip("cannot create a PID namespace here")
    assert "unavailable: [Errno 110] the process connector did not answer" in result.stdout, result


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_the_units_capability_is_enough_to_listen_with_the_full_buffer() -> None:
    """As the unit runs proc: an unprivileged user with CAP_NET_ADMIN (ambient) listens, and its
    socket buffer is the 8 MiB asked for (the kernel doubles it), past net.core.rmem_max."""
    probe = (
        "import socket\nfrom amoskys.agents.proc.connector import ProcConnector\n"
        "c = ProcConnector()\nprint(c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))\nc.close()\n"
    )
    result = subprocess.run(
        [*CAPABLE, sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, check=True
    )
    assert int(result.stdout) == 2 * (8 << 20)


EXIT_RECORD_PROBE = """
import subprocess, time
from amoskys.agents.proc.connector import ConnectorUnavailable, ExitRecord, ExitRecords
try:
    records = ExitRecords()
except ConnectorUnavailable as exc:
    print("unavailable:", exc)
    raise SystemExit(0)
child = subprocess.Popen(["/bin/sleep", "0"])
child.wait()
time.sleep(0.1)
records.drain()
print(ExitRecord.unpack(records.kept[child.pid]))
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_the_units_capability_is_enough_for_exit_records_and_none_is_refused_clearly() -> None:
    """As the unit runs proc (nobody with CAP_NET_ADMIN): the record of a reaped child names it, its
    parent and its ids. Without the capability the kernel takes the registration and sends nothing: the
    agent does not ask, and says why."""
    capable = subprocess.run(
        [*CAPABLE, sys.executable, "-c", EXIT_RECORD_PROBE], capture_output=True, text=True, env=ENV, check=True
    )
    parent = capable.stdout  # the probe's pid is the child's parent
    assert "ExitRecord(comm='sleep', uid=65534, gid=65534, ppid=" in parent, capable
    bare = subprocess.run(
        [*USER, sys.executable, "-c", EXIT_RECORD_PROBE], capture_output=True, text=True, env=ENV, check=True
    )
    assert bare.stdout.startswith("unavailable: [Errno 1] exit records (taskstats) need CAP_NET_ADMIN"), bare


def taskstats_message(pid: int, stats: bytes, *, sender_length: int | None = None) -> bytes:
    """A taskstats exit datagram as the kernel builds it: nlmsghdr, genlmsghdr, AGGR_PID{PID, STATS}."""
    inner = nla(TASKSTATS_TYPE_PID, struct.pack("=I", pid)) + nla(TASKSTATS_TYPE_STATS, stats)
    body = struct.pack("=BBH", 3, 1, 0) + nla(TASKSTATS_TYPE_AGGR_PID, inner)
    length = NLMSGHDR.size + len(body) if sender_length is None else sender_length
    return NLMSGHDR.pack(length, 22, 0, 0, 0) + body


def nla(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + bytes(-len(payload) % 4)


def taskstats(comm: bytes, uid: int, gid: int, pid: int, ppid: int) -> bytes:
    return bytes(80) + comm.ljust(32, b"\0") + bytes(8) + struct.pack("=IIII", uid, gid, pid, ppid) + bytes(280)


def test_an_exit_record_is_read_by_pid() -> None:
    record = parse_exits(memoryview(taskstats_message(42, taskstats(b"true", 1000, 100, 42, 7))))
    assert {pid: ExitRecord.unpack(raw) for pid, raw in record.items()} == {42: ExitRecord("true", 1000, 100, 7)}


@pytest.mark.parametrize(
    "datagram",
    [
        taskstats_message(42, taskstats(b"true", 0, 0, 42, 7))[:30],  # cut in the attributes
        taskstats_message(42, taskstats(b"true", 0, 0, 42, 7), sender_length=4096),  # longer than it is
        taskstats_message(42, taskstats(b"true", 0, 0, 42, 7)[:100]),  # stats shorter than the record
        taskstats_message(42, b""),  # no stats
        b"\0" * 7,  # shorter than a header
        NLMSGHDR.pack(8, 22, 0, 0, 0) + bytes(12),  # a length shorter than its own header
    ],
    ids=["cut-attributes", "length-beyond-datagram", "short-stats", "no-stats", "tiny", "short-length"],
)
def test_a_cut_exit_record_is_left_out(datagram: bytes) -> None:
    """What no record can be read from gives none (a name is then said missing), and never an error."""
    assert parse_exits(memoryview(datagram)) == {}


def test_parse_reads_each_event_kind() -> None:
    datagram = (
        message(0x1, struct.pack("=iiii", 1, 1, 7, 7))
        + message(0x2, struct.pack("=ii", 7, 7))
        + message(0x4, struct.pack("=iiII", 7, 7, 1000, 0))
        + message(0x40, struct.pack("=iiII", 7, 7, 50, 50))
        + message(0x80000000, struct.pack("=iiIIii", 7, 7, 256, 17, 1, 1))
        + message(0x200, struct.pack("=ii16s", 7, 7, b"renamed"))  # comm: not asked for, skipped
    )
    assert parse(datagram) == [
        Fork(123, 1, 7, 7), Exec(123, 7, 7), IdChange(123, False, 7, 7, 1000, 0), IdChange(123, True, 7, 7, 50, 50),
        Exit(123, 7, 7, 256, 17, 1),
    ]  # fmt: skip


def test_another_connector_users_message_is_not_ours() -> None:
    assert parse(message(0x2, struct.pack("=ii", 7, 7), idx=7)) == []


@pytest.mark.parametrize(
    ("datagram", "error"),
    [
        (message(0x2, b"")[:10], "shorter than struct nlmsghdr"),
        (message(0x2, b"")[:50], "overruns"),
        (NLMSGHDR.pack(26, NLMSG_DONE, 0, 0, 0) + b"\0" * 10, "shorter than struct cn_msg"),
        (message(0x2, b"", length=16), "proc_event of 16 bytes"),
        (message(0x2, b"", length=400), "proc_event of 400 bytes"),
    ],
    ids=["cut-header", "cut-body", "cut-cn_msg", "short-proc_event", "length-beyond-datagram"],
)
def test_cut_messages_are_errors_that_say_what_is_wrong(datagram: bytes, error: str) -> None:
    with pytest.raises(MalformedMessage, match=error):
        parse(datagram)


def test_a_netlink_error_is_raised_with_its_errno() -> None:
    datagram = NLMSGHDR.pack(NLMSGHDR.size + 20, NLMSG_ERROR, 0, 0, 0) + struct.pack("=i", -1) + b"\0" * 16
    with pytest.raises(ConnectorError) as caught:
        parse(datagram)
    assert caught.value.errno == 1
