"""host: a real listening socket appears and disappears; metrics are sane."""

from __future__ import annotations

import os
import socket
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


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to look as another user")
def test_a_socket_whose_process_cannot_be_seen_is_shown_as_unknown() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child: drop root, then look
        status = 1
        try:
            server.close()  # the parent's socket only, so that its owner is a root process
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            seen = listening_sockets()[("tcp", "127.0.0.1", port)]
            os.write(writer, f"{seen.pid} {seen.process!r}".encode())
            status = 0
        finally:
            os._exit(status)
    try:
        os.close(writer)
        with os.fdopen(reader) as pipe:
            seen_as_nobody = pipe.read()
        assert os.waitpid(child, 0)[1] == 0
        assert seen_as_nobody == "0 ''"
        owned = listening_sockets()[("tcp", "127.0.0.1", port)]
        assert owned.pid == os.getpid()
        assert socket_owner(owned) == f"{owned.process} ({owned.pid})"
        assert socket_owner(events_pb2.ListenSocket(protocol="tcp", port=port, pid=0)) == "unknown"
    finally:
        server.close()
