"""host: CPU, memory, swap, load, disks, I/O, network, uptime, users and listening sockets.

A `host_metrics` event every `host_metrics.interval_s`; listening sockets are compared every
`host_metrics.ports_interval_s` and each one that appears or disappears is a `port` event.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import NamedTuple

import psutil

from amoskys.agents.runtime.base import Agent
from amoskys.config import AgentConfig, Seconds, Section
from amoskys.v1 import events_pb2

__all__ = ["HostAgent", "HostAgentConfig", "HostConfig", "Mount", "disk_mounts", "listening_sockets", "parse_mountinfo"]

SocketKey = tuple[str, str, int]
# Filesystems on a block device (/proc/filesystems without "nodev"), plus ZFS, which has none (as psutil).
BLOCKLESS_DISK_FS = frozenset({"zfs"})


def _protocol(kind: int, family: int) -> str:
    base = "tcp" if kind == socket.SOCK_STREAM else "udp"
    return base + ("6" if family == socket.AF_INET6 else "")


def listening_sockets() -> dict[SocketKey, events_pb2.ListenSocket]:
    """TCP sockets in LISTEN and bound UDP sockets without a peer, with their owning process."""
    found: dict[SocketKey, events_pb2.ListenSocket] = {}
    names: dict[int, str] = {}
    for conn in psutil.net_connections(kind="inet"):
        listening = conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and not conn.raddr)
        if not listening or not conn.laddr:
            continue
        protocol = _protocol(conn.type, conn.family)
        key = (protocol, conn.laddr.ip, conn.laddr.port)
        pid = conn.pid or 0
        if pid and pid not in names:
            try:
                names[pid] = psutil.Process(pid).name()
            except psutil.Error:
                names[pid] = ""
        found[key] = events_pb2.ListenSocket(
            protocol=protocol, address=conn.laddr.ip, port=conn.laddr.port, pid=pid, process=names.get(pid, "")
        )
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
