"""host: a real listening socket appears and disappears; metrics are sane."""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from amoskys.agents import host
from amoskys.agents.host import HostAgent, HostAgentConfig, host_metrics, listening_sockets
from amoskys.ui.model import socket_owner
from amoskys.v1 import events_pb2
from tests.agents.conftest import section_error

Action = events_pb2.PortChange.Action


def test_listening_socket_opened_then_closed(tmp_path: Path) -> None:
    agent = HostAgent(msgspec.convert({"host": "testhost"}, HostAgentConfig), tmp_path)
    assert agent.port_changes(listening_sockets()) == []  # the first scan is the baseline
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        opened = [e.port for e in agent.port_changes(listening_sockets()) if e.port.socket.port == port]
        assert [(c.action, c.socket.protocol, c.socket.address, c.socket.pid) for c in opened] == [
            (Action.OPENED, "tcp", "127.0.0.1", os.getpid())
        ]
        assert opened[0].socket.process
    finally:
        server.close()
    closed = [e.port for e in agent.port_changes(listening_sockets()) if e.port.socket.port == port]
    assert [c.action for c in closed] == [Action.CLOSED]


def test_host_metrics_are_read_from_the_machine() -> None:
    metrics = host_metrics(listening_sockets())
    assert metrics.mem_total_bytes > metrics.mem_available_bytes > 0
    assert metrics.uptime_s > 0
    assert any(d.mount == "/" for d in metrics.disks) or metrics.disks == []
    assert 0.0 <= metrics.cpu_percent <= 100.0 * os.cpu_count()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("{interval_s: 0}", "key 'host_metrics.interval_s': expected float > 0.0"),
        ("{ports_interval_s: .inf}", "key 'host_metrics.ports_interval_s': expected float <= 31622400"),
        ("{interval: 5}", "key 'host_metrics.interval': unknown key; did you mean 'interval_s'?"),
    ],
)
def test_bad_host_section_is_explained_at_load(tmp_path: Path, section: str, expected: str) -> None:
    assert section_error(tmp_path, "host", f"host_metrics: {section}\n").startswith(expected)


def _mountinfo_line(mount_id: int, root: str, mountpoint: Path | str, fstype: str, super_options: str = "rw") -> str:
    escaped = str(mountpoint).replace(" ", "\\040")
    return f"{mount_id} 1 8:1 {root} {escaped} rw,relatime shared:{mount_id} - {fstype} /dev/sda1 {super_options}"


def test_disks_leave_out_pseudo_bind_and_file_mounts(tmp_path: Path) -> None:
    disk, data, netns, incoming = (tmp_path / name for name in ("disk", "my data", "netns", "incoming"))
    for directory in (disk, data, netns, incoming):
        directory.mkdir()
    os_release = tmp_path / "os-release"
    os_release.write_text("ID=debian\n")
    text = "\n".join([
        _mountinfo_line(20, "/", "/", "overlay"),  # an nspawn machine's root: listed whatever its type
        _mountinfo_line(21, "/", disk, "ext4"),
        _mountinfo_line(22, "/@data", data, "btrfs", "rw,subvol=/@data"),  # a btrfs subvolume is no bind mount
        _mountinfo_line(23, "/run/netns", netns, "ext4"),  # a bind mount of a directory
        _mountinfo_line(24, "/usr/lib/os-release", os_release, "ext4"),  # nspawn's /run/host/os-release
        _mountinfo_line(25, "/", os_release, "ext4"),  # a whole filesystem on a file: not a disk either
        _mountinfo_line(26, "/", incoming, "tmpfs"),  # nspawn's /run/host/incoming (pseudo)
        _mountinfo_line(27, "/", tmp_path / "proc", "proc"),
        "garbage without the separator",
    ])  # fmt: skip
    mounts = host.parse_mountinfo(text)
    assert mounts[2].mountpoint == str(data)  # \040 is a space
    kept = host.disk_mounts(mounts, host.block_filesystems("nodev\ttmpfs\nnodev\tproc\n\text4\n\tbtrfs\n"))
    assert [(m.mountpoint, m.fstype) for m in kept] == [("/", "overlay"), (str(disk), "ext4"), (str(data), "btrfs")]


def test_disks_of_this_machine_are_directories_with_a_size() -> None:
    disks = host_metrics({}).disks
    assert len({d.mount for d in disks}) == len(disks)
    for disk in disks:
        assert Path(disk.mount).is_dir(), disk.mount
        assert disk.total_bytes > 0


NOBODY, OTHER = 65534, 65533  # the sockets' user, and the agent's: another unprivileged user
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")


def _drop_to(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _in_child_as(uid: int, work: Callable[[], str], closing: tuple[socket.socket, ...] = ()) -> str:
    """What `work` returns, run in a child process as `uid` (which therefore cannot list other users' fds),
    without the `closing` sockets (the parent's)."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(reader)
            for parents in closing:
                parents.close()
            _drop_to(uid)
            os.write(writer, work().encode())
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        output = pipe.read()
    assert os.waitpid(child, 0)[1] == 0
    return output


def _seen(keys: list[host.SocketKey]) -> Callable[[], str]:
    def look() -> str:
        found = listening_sockets()
        return json.dumps([[found[k].pid, found[k].process, found[k].uid, found[k].user] for k in keys])

    return look


@pytest.fixture
def nobodys_sockets() -> Iterator[tuple[int, list[host.SocketKey]]]:
    """A child running as nobody listening on TCP and UDP, IPv4 and IPv6 loopback: its pid and the sockets."""
    ready_reader, ready_writer = os.pipe()
    stop_reader, stop_writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child: nobody's sockets, held until the pipe closes
        try:
            os.close(ready_reader)
            os.close(stop_writer)
            _drop_to(NOBODY)
            keys, held = [], []  # held: a socket object no longer referenced is closed
            for protocol, family, kind, address in [
                ("tcp", socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1"),
                ("tcp6", socket.AF_INET6, socket.SOCK_STREAM, "::1"),
                ("udp", socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1"),
                ("udp6", socket.AF_INET6, socket.SOCK_DGRAM, "::1"),
            ]:
                held.append(socket.socket(family, kind))
                held[-1].bind((address, 0))
                if kind == socket.SOCK_STREAM:
                    held[-1].listen()
                keys.append((protocol, address, held[-1].getsockname()[1]))
            os.write(ready_writer, json.dumps(keys).encode())
            os.close(ready_writer)
            os.read(stop_reader, 1)
        finally:
            os._exit(0)
    os.close(ready_writer)
    os.close(stop_reader)
    try:
        with os.fdopen(ready_reader) as ready:
            keys = [(p, a, port) for p, a, port in json.loads(ready.read())]
        yield child, keys
    finally:
        os.close(stop_writer)
        os.waitpid(child, 0)


@needs_root
def test_sockets_of_a_process_the_agent_cannot_see_carry_their_users_uid(
    nobodys_sockets: tuple[int, list[host.SocketKey]],
) -> None:
    holder, keys = nobodys_sockets
    nobody = host._user_name(NOBODY)  # this host's name for it, as the agent sends it
    seen_by_agent = json.loads(_in_child_as(OTHER, _seen(keys)))
    assert seen_by_agent == [[0, "", NOBODY, nobody]] * 4  # tcp, tcp6, udp, udp6: no process, but the user
    seen_by_root = json.loads(_seen(keys)())
    assert [(pid, uid) for pid, _, uid, _ in seen_by_root] == [(holder, NOBODY)] * 4
    unseen = events_pb2.ListenSocket(protocol="udp6", address="::1", port=keys[3][2], uid=NOBODY, user=nobody)
    assert socket_owner(unseen) == f"unknown process (user {nobody})"


@needs_root
def test_a_socket_whose_process_cannot_be_seen_is_shown_with_its_user() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    key = ("tcp", "127.0.0.1", server.getsockname()[1])
    try:
        (pid, process, uid, user), *_ = json.loads(_in_child_as(NOBODY, _seen([key]), closing=(server,)))
        assert (pid, process, uid, user) == (0, "", 0, "root")  # root's 0 is a uid, not "unknown"
        owned = listening_sockets()[key]
        assert (owned.pid, owned.uid) == (os.getpid(), 0)
        assert socket_owner(owned) == f"{owned.process} ({owned.pid})"
        unseen = events_pb2.ListenSocket(protocol="tcp", port=key[2], pid=0, uid=0, user="root")
        assert socket_owner(unseen) == "unknown process (user root)"
        nameless = events_pb2.ListenSocket(protocol="tcp", port=key[2], uid=OTHER)  # no name on its host
        assert socket_owner(nameless) == f"unknown process (uid {OTHER})"
        assert socket_owner(events_pb2.ListenSocket(protocol="tcp", port=key[2])) == "unknown"  # an older agent
    finally:
        server.close()


def _line(local: str, remote: str, state: str, uid: str, inode: str) -> str:
    """A /proc/net line as the kernel prints it: sl, local and remote address, st, tx:rx, tr:when, retrnsmt, uid,
    timeout, inode, then more columns (the table's own)."""
    return f"   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000 {uid:>5} 0 {inode} 1 0 100 0"


ANY4, ANY6 = "00000000:0000", "00000000000000000000000000000000:0000"
HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"
# Addresses as this (little-endian) kernel printed them: 32-bit words in host byte order, IPv6 four of them.
PROC_NET = {
    "tcp": [
        HEADER,
        _line("0100007F:0016", ANY4, "0A", "0", "17"),
        _line("0100007F:0016", "0100007F:D431", "01", "108", "18"),  # established: no listener
        "   2: 0100007F:0017 00000000:0000 0A 00000000:00000000 00:00000000 00000000",
        _line("0100007F:0018", ANY4, "0A", "-1", "19"),
        _line("0100007G:0019", ANY4, "0A", "0", "20"),
        _line("00007F:001A", ANY4, "0A", "0", "21"),
        _line("0100007F:10000", ANY4, "0A", "0", "22"),
        _line("0100007F", ANY4, "0A", "0", "23"),
        _line("0000000A:1538", ANY4, "0A", "108", "24"),
    ],
    "tcp6": [
        HEADER,
        _line("0000000000000000FFFF00000100007F:AF31", ANY6, "0A", "1000", "30"),
        _line("00000000000000000000000001000000:0050", ANY6, "0A", "33", "31"),
        _line("B80D0120000000000000000001000000:01BB", ANY6, "0A", "33", "32"),
    ],
    "udp": [
        HEADER + " ref pointer drops",
        _line("00000000:0035", ANY4, "07", "101", "40"),
        _line("0100007F:A1B2", "0100007F:0035", "01", "0", "41"),  # connected: no listener
        _line("00000000:0000", ANY4, "07", "0", "42"),  # not bound
    ],
}


@pytest.mark.skipif(sys.byteorder != "little", reason="the sample is a little-endian kernel's")
def test_proc_net_tables_read_as_the_kernel_writes_them(caplog: pytest.LogCaptureFixture) -> None:
    assert host.parse_proc_net("tcp", "\n".join(PROC_NET["tcp"])) == [
        host.KernelSocket("tcp", "127.0.0.1", 22, 0, 17),
        host.KernelSocket("tcp", "10.0.0.0", 5432, 108, 24),
    ]
    assert host.parse_proc_net("tcp6", "\n".join(PROC_NET["tcp6"])) == [
        host.KernelSocket("tcp6", "::ffff:127.0.0.1", 44849, 1000, 30),  # four words, each in host byte order
        host.KernelSocket("tcp6", "::1", 80, 33, 31),
        host.KernelSocket("tcp6", "2001:db8::1", 443, 33, 32),
    ]
    assert host.parse_proc_net("udp", "\n".join(PROC_NET["udp"])) == [host.KernelSocket("udp", "0.0.0.0", 53, 101, 40)]
    skipped = [r.getMessage() for r in caplog.records if r.name == "amoskys.agents.host"]
    assert len(skipped) == 6 and all(m.startswith("/proc/net/tcp: skipped a line") for m in skipped)
    assert "7 fields: expected at least 10" in skipped[0]
    assert "'-1': expected 0 to 4294967295" in skipped[1]


@pytest.mark.skipif(sys.byteorder != "little", reason="the sample is a little-endian kernel's")
def test_a_malformed_proc_net_line_is_skipped_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text("\n".join(PROC_NET["tcp"]))
    (tmp_path / "net" / "udp6").write_text("header\n  0: garbage\n")  # tcp6 and udp missing: no IPv6, say
    (tmp_path / "1" / "fd").mkdir(parents=True)
    (tmp_path / "1" / "fd" / "3").symlink_to("socket:[24]")  # pid 1 holds the socket of inode 24
    found = listening_sockets(tmp_path)
    assert sorted(found) == [("tcp", "10.0.0.0", 5432), ("tcp", "127.0.0.1", 22)]
    assert (found["tcp", "127.0.0.1", 22].pid, found["tcp", "127.0.0.1", 22].user) == (0, "root")
    assert (found["tcp", "10.0.0.0", 5432].pid, found["tcp", "10.0.0.0", 5432].uid) == (1, 108)
