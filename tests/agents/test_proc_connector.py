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
    ConnectorError,
    Exec,
    Exit,
    Fork,
    IdChange,
    KernelEvent,
    MalformedMessage,
    ProcConnector,
    monotonic_to_wall_ns,
    parse,
)

SRC = Path(__file__).resolve().parents[2] / "src"


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
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    user = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    capable = [*user, "--inh-caps", "+net_admin", "--ambient-caps", "+net_admin"]
    result = subprocess.run(
        [*capable, sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    )
    assert int(result.stdout) == 2 * (8 << 20)


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
