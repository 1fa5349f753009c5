"""host: CPU, memory, swap, load, disks, I/O, network, uptime, users and listening sockets.

A `host_metrics` event every `host_metrics.interval_s`; listening sockets are compared every
`host_metrics.ports_interval_s` and each one that appears or disappears is a `port` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import NamedTuple

import psutil

from amoskys.agents.runtime.base import Agent
from amoskys.config import AgentConfig, Seconds, Section
from amoskys.v1 import events_pb2

__all__ = [
    "HostAgent",
    "HostAgentConfig",
    "HostConfig",
    "KernelSocket",
    "Mount",
    "disk_mounts",
    "kernel_sockets",
    "listening_sockets",
    "parse_mountinfo",
    "parse_proc_net",
    "socket_holders",
]

log = logging.getLogger(__name__)

SocketKey = tuple[str, str, int]
# Filesystems on a block device (/proc/filesystems without "nodev"), plus ZFS, which has none (as psutil).
BLOCKLESS_DISK_FS = frozenset({"zfs"})


class KernelSocket(NamedTuple):
    """One listening socket of a /proc/net table: what the kernel tells any reader, without privilege."""

    protocol: str
    address: str
    port: int
    uid: int  # the socket's owner: who created it (a daemon that binds as root, then drops privileges: 0)
    inode: int  # names the socket in its holders' /proc/PID/fd ("socket:[INODE]")


PROC = Path("/proc")
PROTOCOLS = ("tcp", "tcp6", "udp", "udp6")
TCP_LISTEN = 0x0A  # the `st` column (include/net/tcp_states.h)


def _address(field: str) -> tuple[str, int]:
    """ "0100007F:0016" -> ("127.0.0.1", 22): the address is 32-bit words in host byte order (IPv6: four)."""
    address, port = field.split(":")
    if len(address) not in (8, 32):
        raise ValueError(f"address {address!r}: expected 8 or 32 hex digits")
    words = [int(address[i : i + 8], 16) for i in range(0, len(address), 8)]
    family = socket.AF_INET if len(words) == 1 else socket.AF_INET6
    return socket.inet_ntop(family, struct.pack(f"={len(words)}I", *words)), _number(port, 16, 0xFFFF)


def _number(field: str, base: int, maximum: int) -> int:
    value = int(field, base)
    if not 0 <= value <= maximum:
        raise ValueError(f"{field!r}: expected 0 to {maximum}")
    return value


def _listening_line(protocol: str, line: str) -> KernelSocket | None:
    """A TCP socket in LISTEN or a bound UDP socket without a peer; None for any other socket."""
    fields = line.split()
    if len(fields) < 10:
        raise ValueError(f"{len(fields)} fields: expected at least 10")
    (address, port), (_, remote_port) = _address(fields[1]), _address(fields[2])
    uid, inode = _number(fields[7], 10, 0xFFFFFFFF), _number(fields[9], 10, 2**64 - 1)
    listening = int(fields[3], 16) == TCP_LISTEN if protocol.startswith("tcp") else remote_port == 0
    return KernelSocket(protocol, address, port, uid, inode) if listening and port else None


def parse_proc_net(protocol: str, text: str) -> list[KernelSocket]:
    """The listening sockets of one /proc/net/{tcp,tcp6,udp,udp6} table (the kernel's proc_net_tcp.rst).

    A line not in that format is logged and skipped: the other lines still count."""
    found = []
    for line in text.splitlines()[1:]:  # the first is the header
        try:
            kernel_socket = _listening_line(protocol, line)
        except (ValueError, struct.error) as error:
            log.warning("/proc/net/%s: skipped a line not in the kernel's format (%s): %r", protocol, error, line)
            continue
        if kernel_socket:
            found.append(kernel_socket)
    return found


def kernel_sockets(proc: Path = PROC) -> list[KernelSocket]:
    """Every listening socket of this network namespace, with its owner's uid (a table the kernel was built
    without, e.g. tcp6 with IPv6 off, has none)."""
    found = []
    for protocol in PROTOCOLS:
        try:
            text = (proc / "net" / protocol).read_text()
        except FileNotFoundError:
            continue
        found += parse_proc_net(protocol, text)
    return found


def _fd_links(fd_dir: Path) -> list[str]:
    """What a process's descriptors point to; none when this process may not list them, or it is gone."""
    try:
        with os.scandir(fd_dir) as fds:
            paths = [fd.path for fd in fds]
    except OSError:  # PermissionError: another user's process; FileNotFoundError: it exited
        return []
    links = []
    for path in paths:
        with contextlib.suppress(OSError):  # closed since listed
            links.append(os.readlink(path))
    return links


def socket_holders(inodes: set[int], proc: Path = PROC) -> dict[int, int]:
    """Socket inode -> the lowest pid holding it, among the processes whose /proc/PID/fd this one may list
    (its own user's, or all with CAP_DAC_READ_SEARCH: CAP_SYS_PTRACE is not enough)."""
    holders: dict[int, int] = {}
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    if not wanted:
        return holders
    for pid in sorted(int(name) for name in os.listdir(proc) if name.isdigit()):
        for link in _fd_links(proc / str(pid) / "fd"):
            if (inode := wanted.get(link)) is not None and inode not in holders:
                holders[inode] = pid
        if len(holders) == len(wanted):
            break
    return holders


def _process_name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return ""


def _user_name(uid: int) -> str:
    """The uid's name on this host ("" when it has none): resolved here, since names differ between hosts."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


def listening_sockets(proc: Path = PROC) -> dict[SocketKey, events_pb2.ListenSocket]:
    """TCP sockets in LISTEN and bound UDP sockets without a peer, each with its owner's uid and user name
    (always known) and its process (pid 0 and no name when this process cannot list the holder's fds)."""
    sockets = kernel_sockets(proc)
    holders = socket_holders({s.inode for s in sockets}, proc)
    names = {pid: _process_name(pid) for pid in set(holders.values())}
    users = {uid: _user_name(uid) for uid in {s.uid for s in sockets}}
    found: dict[SocketKey, events_pb2.ListenSocket] = {}
    for s in sockets:
        pid = holders.get(s.inode, 0)
        found[(s.protocol, s.address, s.port)] = events_pb2.ListenSocket(
            protocol=s.protocol, address=s.address, port=s.port, pid=pid, process=names.get(pid, ""),
            uid=s.uid, user=users[s.uid],
        )  # fmt: skip
    return found


class Mount(NamedTuple):
    """One line of /proc/self/mountinfo (proc(5)): what is mounted where."""

    root: str  # the directory of the filesystem mounted here: "/" unless a bind mount (or btrfs subvolume)
    mountpoint: str
    fstype: str
    super_options: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        before, separator, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not separator or len(fields) < 5 or len(tail) < 3:
            continue
        mounts.append(Mount(_unescape(fields[3]), _unescape(fields[4]), tail[0], tail[2]))
    return mounts


def block_filesystems(text: str) -> frozenset[str]:
    """The filesystem types of /proc/filesystems that need a block device (no "nodev" flag)."""
    return frozenset(line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("nodev"))


def _is_bind(mount: Mount) -> bool:
    """A bind mount shows a subdirectory (or a file) of a filesystem; a btrfs subvolume names its root itself."""
    return mount.root != "/" and f"subvol={mount.root}" not in mount.super_options.split(",")


def disk_mounts(mounts: Iterable[Mount], disk_types: frozenset[str]) -> list[Mount]:
    """The disks worth listing, as node_exporter's defaults pick them: the root filesystem whatever its type
    (overlay in a container), then filesystems on a block device, without bind mounts (nspawn's
    /run/host/os-release and /run/host/incoming, /run/netns) nor mount points that are not directories;
    of stacked mounts on one mount point, the last (the visible one)."""
    kept: dict[str, Mount] = {}
    for mount in mounts:
        if mount.mountpoint != "/" and (
            mount.fstype not in disk_types | BLOCKLESS_DISK_FS or _is_bind(mount) or not os.path.isdir(mount.mountpoint)
        ):
            continue
        kept.pop(mount.mountpoint, None)
        kept[mount.mountpoint] = mount
    return list(kept.values())


def _disks() -> list[events_pb2.DiskUsage]:
    disk_types = block_filesystems(Path("/proc/filesystems").read_text())
    disks = []
    for mount in disk_mounts(parse_mountinfo(Path("/proc/self/mountinfo").read_text()), disk_types):
        try:
            usage = psutil.disk_usage(mount.mountpoint)
        except OSError:
            continue
        disks.append(
            events_pb2.DiskUsage(
                mount=mount.mountpoint, fstype=mount.fstype, total_bytes=usage.total, used_bytes=usage.used
            )
        )
    return disks


def host_metrics(listening: dict[SocketKey, events_pb2.ListenSocket]) -> events_pb2.HostMetrics:
    memory, swap = psutil.virtual_memory(), psutil.swap_memory()
    load1, load5, load15 = os.getloadavg()
    disk_io = psutil.disk_io_counters()
    net_io = psutil.net_io_counters()
    return events_pb2.HostMetrics(
        cpu_percent=psutil.cpu_percent(interval=None),
        load1=load1, load5=load5, load15=load15,
        mem_total_bytes=memory.total, mem_available_bytes=memory.available,
        swap_total_bytes=swap.total, swap_used_bytes=swap.used,
        disks=_disks(),
        disk_read_bytes=disk_io.read_bytes if disk_io else 0,
        disk_write_bytes=disk_io.write_bytes if disk_io else 0,
        net_rx_bytes=net_io.bytes_recv, net_tx_bytes=net_io.bytes_sent,
        uptime_s=int(time.time() - psutil.boot_time()),
        users=sorted({user.name for user in psutil.users()}),
        listening=sorted(listening.values(), key=lambda s: (s.protocol, s.port, s.address)),
    )  # fmt: skip


class HostConfig(Section, frozen=True):
    interval_s: Seconds = 30.0
    ports_interval_s: Seconds = 5.0


class HostAgentConfig(AgentConfig, frozen=True):
    host_metrics: HostConfig = HostConfig()  # `host` is the common part's host name


class HostAgent(Agent[HostAgentConfig]):
    kind = "host"
    config_type = HostAgentConfig

    def __init__(self, config: HostAgentConfig, state_dir: Path) -> None:
        super().__init__(config, state_dir)
        self.known: dict[SocketKey, events_pb2.ListenSocket] | None = None
        psutil.cpu_percent(interval=None)  # prime: the first real reading covers the first interval

    def port_changes(self, current: dict[SocketKey, events_pb2.ListenSocket]) -> list[events_pb2.Event]:
        """PortChange events against the previous scan (none for the first: it is the baseline)."""
        previous, self.known = self.known, current
        if previous is None:
            return []
        Action = events_pb2.PortChange.Action
        opened = [(Action.OPENED, current[k]) for k in sorted(current.keys() - previous.keys())]
        closed = [(Action.CLOSED, previous[k]) for k in sorted(previous.keys() - current.keys())]
        return [self.event(port=events_pb2.PortChange(action=a, socket=s)) for a, s in opened + closed]

    async def collect(self) -> AsyncIterator[events_pb2.Event]:
        settings = self.config.host_metrics
        next_metrics = 0.0
        while True:
            current = await asyncio.to_thread(listening_sockets)
            for event in self.port_changes(current):
                yield event
            if time.monotonic() >= next_metrics:
                next_metrics = time.monotonic() + settings.interval_s
                yield self.event(host_metrics=await asyncio.to_thread(host_metrics, current))
            await asyncio.sleep(settings.ports_interval_s)
