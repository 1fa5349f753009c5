"""The kernel's process-event connector: fork, exec, uid/gid changes and exit as they happen; and
the reader process that listens to it for the agent (this module run as a script: `serve`).

A netlink socket (`NETLINK_CONNECTOR`) joined to the `CN_IDX_PROC` group receives one message per
event: `struct nlmsghdr`, then `struct cn_msg` (include/uapi/linux/connector.h), then `struct
proc_event` (include/uapi/linux/cn_proc.h) whose `timestamp_ns` is the kernel's CLOCK_MONOTONIC.
Listening needs CAP_NET_ADMIN on kernels before 6.6, and the initial PID and user namespaces.
Kernels since 6.6 take an event-type filter (`struct proc_input`); older ones ignore it and send
everything, which `parse` skips.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import math
import os
import select
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "Ack",
    "ConnectorError",
    "ConnectorUnavailable",
    "EventsLost",
    "Exec",
    "Exit",
    "ExitRecord",
    "ExitRecords",
    "Fork",
    "FrameDecoder",
    "IdChange",
    "KernelEvent",
    "MalformedMessage",
    "ProcConnector",
    "ProcRead",
    "ReaderStarted",
    "Received",
    "Throttled",
    "has_capability",
    "monotonic_to_wall_ns",
    "parse",
    "read_proc",
    "read_procfs",
    "reader_command",
]

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
PROC_CN_MCAST_LISTEN, PROC_CN_MCAST_IGNORE = 1, 2
PROC_EVENT_NONE, PROC_EVENT_FORK, PROC_EVENT_EXEC = 0x0, 0x1, 0x2
PROC_EVENT_UID, PROC_EVENT_GID, PROC_EVENT_EXIT = 0x4, 0x40, 0x80000000
WANTED = PROC_EVENT_FORK | PROC_EVENT_EXEC | PROC_EVENT_UID | PROC_EVENT_GID | PROC_EVENT_EXIT
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # CAP_NET_ADMIN may exceed net.core.rmem_max

NLMSGHDR = struct.Struct("=IHHII")  # nlmsg_len, nlmsg_type, nlmsg_flags, nlmsg_seq, nlmsg_pid
CN_MSG = struct.Struct("=IIIIHH")  # id.idx, id.val, seq, ack, len, flags
PROC_EVENT = struct.Struct("=IIQ")  # what, cpu, timestamp_ns (8-aligned: offset 8), then the union
FORK = struct.Struct("=iiii")  # parent_pid, parent_tgid, child_pid, child_tgid
EXEC = struct.Struct("=ii")  # process_pid, process_tgid
ID = struct.Struct("=iiII")  # process_pid, process_tgid, ruid|rgid, euid|egid
EXIT = struct.Struct("=iiIIii")  # process_pid, process_tgid, exit_code, exit_signal, parent_pid, parent_tgid
ACK = struct.Struct("=I")  # err (a positive errno, 0 for success)
NLMSGERR = struct.Struct("=i")  # struct nlmsgerr starts with a negative errno
UNION_BYTES = 24  # the largest union member (comm_proc_event, exit_proc_event)
ACK_TIMEOUT_S = 2.0
DATAGRAM_MAX = 65536  # a netlink datagram from the kernel is read into a buffer of this size


class Fork(NamedTuple):
    ts_ns: int
    parent_tgid: int
    child_pid: int
    child_tgid: int


class Exec(NamedTuple):
    ts_ns: int
    pid: int
    tgid: int


class IdChange(NamedTuple):
    ts_ns: int
    gid: bool  # False: a uid change
    pid: int
    tgid: int
    real: int
    effective: int


class Exit(NamedTuple):
    ts_ns: int
    pid: int
    tgid: int
    exit_code: int
    exit_signal: int
    parent_tgid: int


class Ack(NamedTuple):
    """The kernel's answer to a listen request: multicast, so also heard by every other listener;
    `ack` is the request's cn_msg.ack plus one (its seq is not kept), which tells whose it is."""

    err: int
    ack: int


KernelEvent = Fork | Exec | IdChange | Exit | Ack


class ConnectorError(OSError):
    """The connector cannot be used or a message cannot be read."""


class ConnectorUnavailable(ConnectorError):
    """No process events here (no permission, not in the initial namespaces, no connector)."""


class EventsLost(ConnectorError):
    """The socket overflowed (ENOBUFS): the kernel dropped events; the caller must rescan."""


class MalformedMessage(ConnectorError):
    """A message that does not have the layout of connector.h / cn_proc.h."""


def monotonic_to_wall_ns(monotonic_ns: int) -> int:
    """The wall-clock time of a CLOCK_MONOTONIC instant (how the kernel stamps process events)."""
    return monotonic_ns + time.time_ns() - time.monotonic_ns()


def _payload(what: int, ts_ns: int, data: memoryview, ack: int) -> KernelEvent | None:
    if what == PROC_EVENT_EXEC:
        return Exec(ts_ns, *EXEC.unpack_from(data))
    if what == PROC_EVENT_FORK:
        _, parent_tgid, child_pid, child_tgid = FORK.unpack_from(data)
        return Fork(ts_ns, parent_tgid, child_pid, child_tgid)
    if what == PROC_EVENT_EXIT:
        pid, tgid, code, signal, _, parent_tgid = EXIT.unpack_from(data)
        return Exit(ts_ns, pid, tgid, code, signal, parent_tgid)
    if what in (PROC_EVENT_UID, PROC_EVENT_GID):
        return IdChange(ts_ns, what == PROC_EVENT_GID, *ID.unpack_from(data))
    if what == PROC_EVENT_NONE:
        return Ack(ACK.unpack_from(data)[0], ack)
    return None  # sid, ptrace, comm, coredump: not asked for (older kernels send them anyway)


def _connector_message(body: memoryview) -> KernelEvent | None:
    if len(body) < CN_MSG.size:
        raise MalformedMessage(f"connector message of {len(body)} bytes is shorter than struct cn_msg")
    idx, val, _, ack, length, _ = CN_MSG.unpack_from(body)
    if (idx, val) != (CN_IDX_PROC, CN_VAL_PROC):
        return None  # another connector user's message
    data = body[CN_MSG.size :]
    if length > len(data) or length < PROC_EVENT.size + UNION_BYTES:
        raise MalformedMessage(f"proc_event of {length} bytes ({len(data)} received); expected at least 40")
    what, _, ts_ns = PROC_EVENT.unpack_from(data)
    return _payload(what, ts_ns, data[PROC_EVENT.size : length], ack)


def _messages(view: memoryview) -> Iterator[tuple[int, memoryview]]:
    """(nlmsg_type, body) of each message in a netlink datagram; MalformedMessage where one is cut short."""
    offset = 0
    while offset < len(view):
        if len(view) - offset < NLMSGHDR.size:
            raise MalformedMessage(f"{len(view) - offset} trailing bytes are shorter than struct nlmsghdr")
        length, kind, _, _, _ = NLMSGHDR.unpack_from(view, offset)
        if length < NLMSGHDR.size or offset + length > len(view):
            raise MalformedMessage(f"nlmsg_len {length} at offset {offset} overruns the {len(view)}-byte datagram")
        yield kind, view[offset + NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3  # NLMSG_ALIGN


def parse(datagram: bytes | bytearray | memoryview) -> list[KernelEvent]:
    """The process events in one netlink datagram (possibly several messages); MalformedMessage if cut short."""
    events: list[KernelEvent] = []
    for kind, body in _messages(memoryview(datagram)):
        if kind == NLMSG_ERROR and len(body) >= NLMSGERR.size:
            (error,) = NLMSGERR.unpack_from(body)
            if error:
                raise ConnectorError(-error, f"netlink error: {errno.errorcode.get(-error, -error)}")
        elif kind == NLMSG_DONE:
            event = _connector_message(body)
            if event is not None:
                events.append(event)
    return events


def _request(operation: int, event_types: int | None, portid: int) -> bytes:
    """A PROC_CN_MCAST_* request: the 4-byte form (every kernel), or struct proc_input with a filter.
    Its ack field is the socket's port id (unique among live sockets): the kernel's ack carries it plus one."""
    data = struct.pack("=I", operation) if event_types is None else struct.pack("=II", operation, event_types)
    connector = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, portid, len(data), 0) + data
    return NLMSGHDR.pack(NLMSGHDR.size + len(connector), NLMSG_DONE, 0, 0, portid) + connector


class _KernelSocket:
    """A netlink socket the kernel writes to: opened here and set up, or handed down by another process."""

    sock: socket.socket
    buffer: bytearray  # each datagram is read into it

    def _take(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray(DATAGRAM_MAX)

    def _open(self, protocol: int, name: str) -> None:
        """A new socket of netlink `protocol`; ConnectorUnavailable (naming it `name`) if there is none."""
        try:
            self._take(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, protocol))
        except OSError as exc:
            raise ConnectorUnavailable(exc.errno, f"no {name} socket: {exc.strerror}") from exc

    @contextlib.contextmanager
    def _setting_up(self, what: str) -> Iterator[None]:
        """The socket closed if its setup fails, the failure a ConnectorError (`what` could not be listened to)."""
        try:
            yield
        except OSError as exc:
            self.sock.close()
            if isinstance(exc, ConnectorError):
                raise
            raise ConnectorUnavailable(exc.errno, f"cannot listen to {what}: {exc.strerror}") from exc

    def _set_receive_buffer(self, size: int) -> None:
        """Past net.core.rmem_max where CAP_NET_ADMIN allows it (SO_RCVBUFFORCE), else up to it."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def fileno(self) -> int:
        return self.sock.fileno()


class ProcConnector(_KernelSocket):
    """A subscribed connector socket; `read` returns the next events as they come."""

    def __init__(self, receive_buffer_bytes: int = 8 << 20) -> None:
        self._open(NETLINK_CONNECTOR, "netlink connector")
        with self._setting_up("process events"):
            self._set_receive_buffer(receive_buffer_bytes)
            self.sock.bind((0, CN_IDX_PROC))
            self.portid = self.sock.getsockname()[0]
            self._subscribe()

    @classmethod
    def inherit(cls, fileno: int) -> ProcConnector:
        """The subscribed socket `fileno` another process opened and handed down (the reader's)."""
        connector = cls.__new__(cls)
        connector._take(socket.socket(fileno=fileno))
        connector.portid = connector.sock.getsockname()[0]
        return connector

    def _subscribe(self) -> None:
        """Listen (answered by an ack on every kernel, to every listener: only the one for this socket's
        request counts), then narrow to the wanted events (6.6+). A process outside the initial PID and
        user namespaces gets no answer, though its socket hears the others' events and acks."""
        self.sock.sendto(_request(PROC_CN_MCAST_LISTEN, None, self.portid), (0, 0))
        answer = (self.portid + 1) & 0xFFFFFFFF  # the ack field of the kernel's answer to this socket's request
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectorUnavailable(
                    errno.ETIMEDOUT, "the process connector did not answer (not in the initial PID/user namespace?)"
                )
            try:
                acks = [event for event in self.read(remaining) if isinstance(event, Ack) and event.ack == answer]
            except MalformedMessage:
                continue
            if acks:
                break
        if acks[0].err:
            raise ConnectorUnavailable(acks[0].err, f"the kernel refused to listen: {errno.errorcode[acks[0].err]}")
        self.sock.sendto(_request(PROC_CN_MCAST_LISTEN, WANTED, self.portid), (0, 0))

    def read(self, timeout: float | None) -> list[KernelEvent]:
        """The events of the next datagram from the kernel ([] when none came within `timeout` seconds).

        Raises EventsLost when the kernel dropped events since the last read (ENOBUFS), and
        MalformedMessage for a datagram that is cut short or was not sent by the kernel.
        """
        if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
            return []
        datagram = self.receive()
        return [] if datagram is None else parse(datagram)

    def receive(self) -> memoryview | None:
        """The next datagram as it came (valid until the next call), None if none is waiting.

        Raises EventsLost after an overflow (ENOBUFS) and MalformedMessage for one not from the kernel.
        """
        try:
            size, (sender, _) = self.sock.recvfrom_into(self.buffer, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                raise EventsLost(errno.ENOBUFS, "process events were lost: the socket buffer overflowed") from exc
            raise
        if sender != 0:  # any local process may send a unicast here: only port 0 is the kernel
            raise MalformedMessage(f"a {size}-byte message from netlink port {sender}, not the kernel: ignored")
        return memoryview(self.buffer)[:size]

    def close(self) -> None:
        """Stop listening (so the kernel stops building events when no one else listens) and close."""
        with contextlib.suppress(OSError):  # closing releases the listener on current kernels anyway
            self.sock.sendto(_request(PROC_CN_MCAST_IGNORE, None, self.portid), (0, 0))
        self.sock.close()


# ---- exit records: the kernel's taskstats of each process that ends ---------------------------------
#
# The connector's exec event carries no name, and a process that is reaped before the reader gets to
# /proc leaves nothing there. The kernel's taskstats (include/uapi/linux/taskstats.h) sends a record at
# every task's exit to the listeners of its CPU (generic netlink family "TASKSTATS", a cpumask
# registered: CAP_NET_ADMIN, the initial PID and user namespaces) with its name, parent and ids. It is
# sent in do_exit before the process's memory is released, so when /proc no longer has a process's
# command line its record is already waiting on this socket.

NETLINK_GENERIC = 16
CAP_NET_ADMIN = 12  # include/uapi/linux/capability.h
GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 16, 3, 1, 2
TASKSTATS_CMD_GET, TASKSTATS_CMD_ATTR_REGISTER_CPUMASK = 1, 3
TASKSTATS_TYPE_PID, TASKSTATS_TYPE_STATS, TASKSTATS_TYPE_AGGR_PID = 1, 3, 4
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
GENLMSGHDR = struct.Struct("=BBH")  # cmd, version, reserved
NLATTR = struct.Struct("=HH")  # nla_len, nla_type
NLA_F_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
# struct taskstats from ac_comm (offset 80, fixed since version 1: fields are only ever appended):
# ac_comm[32], ac_sched, ac_pad[3], 4 bytes of alignment, ac_uid, ac_gid, ac_pid, ac_ppid.
EXIT_RECORD = struct.Struct("=32s8xIIII")
EXIT_RECORD_OFFSET = 80
EXIT_RECORD_END = EXIT_RECORD_OFFSET + EXIT_RECORD.size
EXITS_KEPT = 4096  # the latest exits looked up by pid: seconds of them at 500 execs/s; a pid comes back
# only after the kernel has allocated its way through pid_max (>= 32768) others


class ExitRecord(NamedTuple):
    """What the kernel said about a process as it ended."""

    comm: str
    uid: int
    gid: int
    ppid: int

    @classmethod
    def unpack(cls, raw: bytes) -> ExitRecord:
        comm, uid, gid, _, ppid = EXIT_RECORD.unpack(raw)
        return cls(comm.split(b"\0", 1)[0].decode(errors="replace"), uid, gid, ppid)


def _attributes(data: memoryview) -> dict[int, memoryview]:
    """A netlink message's attributes by type (their payloads); a cut-short one ends the list."""
    found: dict[int, memoryview] = {}
    offset = 0
    while len(data) - offset >= NLATTR.size:
        length, kind = NLATTR.unpack_from(data, offset)
        if length < NLATTR.size or offset + length > len(data):
            break
        found[kind & NLA_F_TYPE_MASK] = data[offset + NLATTR.size : offset + length]
        offset += (length + 3) & ~3  # NLA_ALIGN
    return found


def _attribute(kind: int, payload: bytes) -> bytes:
    length = NLATTR.size + len(payload)
    return NLATTR.pack(length, kind) + payload + bytes(-length % 4)


def parse_exits(datagram: memoryview) -> dict[int, bytes]:
    """pid -> its EXIT_RECORD bytes, for each process or thread exit in a taskstats datagram (up to a
    message cut short: a record lost costs only a name)."""
    records: dict[int, bytes] = {}
    with contextlib.suppress(MalformedMessage):
        for _, body in _messages(datagram):
            aggregate = _attributes(body[GENLMSGHDR.size :]).get(TASKSTATS_TYPE_AGGR_PID)
            inner = _attributes(aggregate) if aggregate is not None else {}
            pid, stats = inner.get(TASKSTATS_TYPE_PID), inner.get(TASKSTATS_TYPE_STATS)
            if pid is not None and len(pid) >= 4 and stats is not None and len(stats) >= EXIT_RECORD_END:
                records[struct.unpack_from("=I", pid)[0]] = bytes(stats[EXIT_RECORD_OFFSET:EXIT_RECORD_END])
    return records


class ExitRecords(_KernelSocket):
    """A taskstats socket listening to every CPU's exits; `drain` keeps the latest EXITS_KEPT by pid."""

    def __init__(self, receive_buffer_bytes: int = 4 << 20) -> None:
        if not has_capability(CAP_NET_ADMIN):  # the kernel takes the registration without it, then sends nothing
            raise ConnectorUnavailable(errno.EPERM, "exit records (taskstats) need CAP_NET_ADMIN")
        self._open(NETLINK_GENERIC, "generic netlink")
        self.kept: dict[int, bytes] = {}
        with self._setting_up("exit records"):
            self._set_receive_buffer(receive_buffer_bytes)
            self.sock.bind((0, 0))
            family = self._ask(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_NAME, b"TASKSTATS\0")
            family_id = _attributes(family).get(CTRL_ATTR_FAMILY_ID)
            if family_id is None or len(family_id) < 2:
                raise ConnectorUnavailable(errno.ENOENT, "the kernel has no TASKSTATS family (CONFIG_TASKSTATS)")
            cpus = _possible_cpus().encode() + b"\0"
            self._ask(
                struct.unpack_from("=H", family_id)[0], TASKSTATS_CMD_GET, TASKSTATS_CMD_ATTR_REGISTER_CPUMASK, cpus
            )

    @classmethod
    def inherit(cls, fileno: int) -> ExitRecords:
        """The registered socket `fileno` another process opened and handed down (the reader's)."""
        records = cls.__new__(cls)
        records._take(socket.socket(fileno=fileno))
        records.kept = {}
        return records

    def _ask(self, family: int, command: int, attribute: int, value: bytes) -> memoryview:
        """One request and its answer's attributes (an ack's are empty); ConnectorUnavailable if refused."""
        payload = GENLMSGHDR.pack(command, 1, 0) + _attribute(attribute, value)
        self.sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(payload), family, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + payload)
        answer = memoryview(self.buffer)
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
            size = self.sock.recv_into(answer)
            length, kind, _, sequence, _ = NLMSGHDR.unpack_from(answer)
            if sequence != 1 or size < length:
                continue  # an exit record already (the registration was answered before it)
            body = answer[NLMSGHDR.size : length]
            if kind == NLMSG_ERROR:
                (error,) = NLMSGERR.unpack_from(body)
                if error:
                    raise ConnectorUnavailable(-error, f"taskstats refused: {errno.errorcode.get(-error, -error)}")
                return memoryview(b"")
            return body[GENLMSGHDR.size :]
        raise ConnectorUnavailable(errno.ETIMEDOUT, "the kernel did not answer a taskstats request")

    def drain(self) -> None:
        """Take every record waiting (an overflow loses only names: nothing else depends on them); one
        not sent by the kernel (any local process may send here) is left out."""
        while True:
            try:
                size, (sender, _) = self.sock.recvfrom_into(self.buffer, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    continue
                raise
            if sender != 0:
                continue
            for pid, raw in parse_exits(memoryview(self.buffer)[:size]).items():
                self.kept.pop(pid, None)  # the latest exit of a pid is the last one kept
                self.kept[pid] = raw
        for pid in list(itertools.islice(self.kept, max(0, len(self.kept) - EXITS_KEPT))):
            del self.kept[pid]

    def close(self) -> None:
        self.sock.close()


def _possible_cpus() -> str:
    """The CPUs the kernel may ever run on, as a cpulist ("0-1"): the mask taskstats is registered for."""
    try:
        with open("/sys/devices/system/cpu/possible") as possible:
            return possible.read().strip()
    except OSError:
        return f"0-{(os.cpu_count() or 1) - 1}"


# ---- the reader: the connector read by a process of its own ---------------------------------------
#
# A short-lived process keeps its command line and executable for about half a millisecond after
# its exec (/bin/true here: 0.59 ms from the kernel's exec event to its exit event, at the median),
# and a thread of the agent often got the CPU and the GIL later than that (BENCHMARKS.md, proc).
# The reader is a fresh interpreter that imports only this module (`reader_command`), with no GIL
# shared with the agent's publishing and rules, at the real-time priority (SCHED_FIFO) the unit gave
# the agent, where it did (the agent starts it from the thread that kept it); for each exec it reads
# the command line and executable first, the rest of what /proc loses when a process exits after the
# socket is drained, and hands the kernel's datagrams and those reads to the agent over a pipe, as
# frames (FRAME: kind, payload length; then payload).

READ_MAX = 65536  # of a /proc file: a longer command line is cut there
DRAIN_MAX = 256  # datagrams read before the later /proc reads and the frames are written
FIRST = ("cmdline", "exe", "exe_id")  # gone when the process exits (exit_mm)
LATER = ("stdin", "stdout", "cwd", "stat", "status", "cgroup")  # gone at exit (fds, cwd) or when reaped
PROC_PATHS = {"cmdline": "cmdline", "exe": "exe", "stdin": "fd/0", "stdout": "fd/1", "cwd": "cwd",
              "stat": "stat", "status": "status", "cgroup": "cgroup"}  # fmt: skip
LINKS = frozenset({"exe", "stdin", "stdout", "cwd"})
EXE_ID = struct.Struct("=QQq")  # the running executable's st_dev, st_ino, st_mtime_ns
FRAME = struct.Struct("=BI")  # kind, payload length
PROCFS_HEAD = struct.Struct("=iQQ")  # pid, the exec's kernel time, when its first fields had been read
FIELD = struct.Struct("=i")  # a field's length, -1 when it could not be read
FRAME_MAX = 1 << 20  # no frame is near this: a longer one means the stream is corrupt
BACKLOG_MAX = 16 << 20  # frames the agent has not taken yet (about 10,000 execs); then the socket waits
DATAGRAM, PROCFS, LOST, REJECTED, END, STARTED, THROTTLED, FAILED = range(1, 9)


class ProcRead(NamedTuple):
    """What /proc/PID said (raw bytes; links as their targets); None where it could not be read."""

    pid: int
    exec_ns: int  # the exec's kernel time (CLOCK_MONOTONIC): which exec of the pid this is; 0 for a scan
    read_ns: int  # CLOCK_MONOTONIC when cmdline, exe and exe_id had been read
    cmdline: bytes | None
    exe: bytes | None
    exe_id: bytes | None  # EXE_ID of the file that runs (stat through /proc/PID/exe)
    stdin: bytes | None
    stdout: bytes | None
    cwd: bytes | None
    stat: bytes | None
    status: bytes | None
    cgroup: bytes | None
    exited: bytes | None = None  # its EXIT_RECORD, when it was reaped before its stat or status was read


class ReaderStarted:
    """The reader's first word: whether it runs at real-time priority."""

    __slots__ = ("realtime_refused",)

    def __init__(self, realtime_refused: str) -> None:
        self.realtime_refused = realtime_refused  # "" when it does, else why not


class Throttled:
    """The reader used its real-time share of a second and pauses for the rest of it."""

    __slots__ = ()


Received = tuple[KernelEvent, ProcRead | None] | ReaderStarted | Throttled | ConnectorError


def read_proc(pid: int, name: str) -> bytes | None:
    """One of PROC_PATHS of a process (a link's target for LINKS); None if it cannot be read."""
    path = f"/proc/{pid}/{PROC_PATHS[name]}"
    try:
        if name in LINKS:
            return os.readlink(path.encode())
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, READ_MAX)
    except OSError:
        return None
    finally:
        os.close(fd)


def _exe_id(pid: int) -> bytes | None:
    try:
        st = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return None
    return EXE_ID.pack(st.st_dev, st.st_ino, st.st_mtime_ns)


def read_first(pid: int, exec_ns: int) -> list[int | bytes | None]:
    """What a process loses first when it exits, read at once: command line, then executable."""
    cmdline, exe, exe_id = read_proc(pid, "cmdline"), read_proc(pid, "exe"), _exe_id(pid)
    return [pid, exec_ns, time.monotonic_ns(), cmdline, exe, exe_id]


def read_later(first: list[int | bytes | None]) -> ProcRead:
    """The rest of the process's /proc after `read_first`."""
    pid = first[0]
    assert isinstance(pid, int)
    return ProcRead(*first, *(read_proc(pid, name) for name in LATER))  # type: ignore[arg-type]


def read_procfs(pid: int) -> ProcRead:
    """Everything ProcRead holds about a running process (a scan's read)."""
    return read_later(read_first(pid, 0))


def encode_procfs(read: ProcRead) -> bytes:
    fields = (FIELD.pack(-1) if value is None else FIELD.pack(len(value)) + value for value in read[3:])
    return PROCFS_HEAD.pack(*read[:3]) + b"".join(fields)


def decode_procfs(payload: bytes) -> ProcRead:
    """A PROCFS frame's ProcRead; MalformedMessage if it is cut short."""
    if len(payload) < PROCFS_HEAD.size:
        raise MalformedMessage(f"a {len(payload)}-byte procfs frame is shorter than its header")
    values: list[int | bytes | None] = list(PROCFS_HEAD.unpack_from(payload))
    offset = PROCFS_HEAD.size
    for _ in range(len(ProcRead._fields) - 3):
        if offset + FIELD.size > len(payload):
            raise MalformedMessage(f"procfs frame cut short at byte {offset} of {len(payload)}")
        (length,) = FIELD.unpack_from(payload, offset)
        offset += FIELD.size
        if length > len(payload) - offset:
            raise MalformedMessage(f"procfs field of {length} bytes overruns the {len(payload)}-byte frame")
        values.append(None if length < 0 else payload[offset : offset + length])
        offset += max(length, 0)
    return ProcRead(*values)  # type: ignore[arg-type]


def has_capability(bit: int) -> bool:
    """Whether this process has the capability numbered `bit` in its effective set."""
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


class _Realtime:
    """The real-time priority the reader was started with (the unit's drop-in: the agent keeps it for its
    helpers, runtime.realtime); once the reader used `share` of a second's CPU it pauses for the rest of
    that second (an exec storm must not starve the host's own work), as it could not take the priority
    back once given up (RestrictRealtime=yes)."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.kept = False
        self.window_end = 0.0
        self.cpu_at_start = 0.0

    def start(self) -> str:
        """ "" when the reader runs at real-time priority, else why not."""
        policy = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK  # runtime.realtime.runs_realtime: not imported here
        if policy not in (os.SCHED_FIFO, os.SCHED_RR):
            # Nothing to give up, and nothing asked: the unit without its drop-in denies sched_setscheduler
            # (SystemCallFilter=~@resources), which kills the process that calls it.
            return "the unit gives no real-time priority (its drop-in sets CPUSchedulingPolicy=fifo)"
        if self.share <= 0:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))  # giving up is always allowed
            return "proc.realtime_share is 0"
        self.kept = True
        return ""

    def pause_after_batch(self) -> float:
        """Account for a batch's CPU: the seconds to pause for when it used up this second's share, else 0."""
        if not self.kept:
            return 0.0
        now = time.monotonic()
        if now >= self.window_end:
            self.window_end, self.cpu_at_start = now + 1.0, time.process_time()
        elif time.process_time() - self.cpu_at_start > self.share:
            return self.window_end - now
        return 0.0


class _FrameWriter:
    """Frames to the agent without ever waiting for it: what the pipe does not take waits here, up
    to BACKLOG_MAX bytes (then the reader stops reading the socket, whose overflow is counted)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.frames: list[bytes] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.offset = 0  # into chunks[0]
        self.backlog = 0  # bytes not yet written
        os.set_blocking(fd, False)

    def add(self, kind: int, payload: bytes | memoryview = b"") -> None:
        self.frames += (FRAME.pack(kind, len(payload)), bytes(payload))

    def flush(self) -> None:
        """Write what the pipe takes now (the frames added so far, after any backlog)."""
        if self.frames:
            chunk = b"".join(self.frames)
            self.frames = []
            self.chunks.append(chunk)
            self.backlog += len(chunk)
        while self.chunks:
            head = self.chunks[0]
            try:
                written = os.write(self.fd, memoryview(head)[self.offset :])
            except BlockingIOError:
                return
            self.offset += written
            self.backlog -= written
            if self.offset == len(head):
                self.chunks.popleft()
                self.offset = 0

    def flush_all(self) -> None:
        os.set_blocking(self.fd, True)
        self.flush()


def _of_a_process(event: KernelEvent) -> bool:
    """Not a thread's: a fork that makes a process, a process's exit or id change, an exec."""
    if isinstance(event, Fork):
        return event.child_pid == event.child_tgid
    if isinstance(event, Exit | IdChange):
        return event.pid == event.tgid
    return isinstance(event, Exec)


def _reaped(read: ProcRead) -> bool:
    """Reaped before its stat or its ids were read (read in that order: the exit record has both)."""
    return read.stat is None or read.status is None


def _drain(connector: ProcConnector, exits: ExitRecords | None, out: _FrameWriter) -> None:
    """Read what the socket holds: each exec's first fields at once, the later ones after, and the exit
    record of any process already reaped; one batch (threads' events left out: the agent reports processes)."""
    firsts = []
    for _ in range(DRAIN_MAX):
        try:
            datagram = connector.receive()
            if datagram is None:
                break
            events = parse(datagram)
        except (EventsLost, MalformedMessage) as exc:
            out.add(LOST if isinstance(exc, EventsLost) else REJECTED, str(exc).encode())
            continue
        if not any(map(_of_a_process, events)):
            continue  # a thread started or ended (most events on a busy host): nothing the agent reports
        firsts += [read_first(event.pid, event.ts_ns) for event in events if isinstance(event, Exec)]
        out.add(DATAGRAM, datagram)
    reads = [read_later(first) for first in firsts]
    if exits is not None and any(map(_reaped, reads)):
        exits.drain()  # the reaped ones' records were sent before their /proc went
        reads = [read._replace(exited=exits.kept.get(read.pid)) if _reaped(read) else read for read in reads]
    for read in reads:
        out.add(PROCFS, encode_procfs(read))
    if out.frames:
        out.add(END)


def serve(sock_fd: int, exits_fd: int, realtime_share: float, control: int = 0, out_fd: int = 1) -> None:
    """The reader's loop: batches of frames to `out_fd` until `control` reaches its end (the agent);
    `exits_fd` the ExitRecords socket (-1: none)."""
    connector = ProcConnector.inherit(sock_fd)
    exits = ExitRecords.inherit(exits_fd) if exits_fd >= 0 else None
    out = _FrameWriter(out_fd)
    realtime = _Realtime(realtime_share)
    out.add(STARTED, realtime.start().encode())
    out.add(END)
    out.flush()
    sock = connector.fileno()
    resume_at = 0.0  # while paused (its real-time share used up), the socket waits
    while True:
        # The socket while the backlog has room (an overflow meanwhile is counted: ENOBUFS) and the reader
        # is not paused; the pipe while frames wait for it; and the control pipe, whose end (or hang-up)
        # says stop.
        poller = select.poll()
        poller.register(control, select.POLLIN)
        pause_ms = max(0, math.ceil((resume_at - time.monotonic()) * 1000))
        if out.backlog < BACKLOG_MAX and not pause_ms:
            poller.register(sock, select.POLLIN)
        if out.backlog:
            poller.register(out_fd, select.POLLOUT)
        if exits is not None:
            poller.register(exits_fd, select.POLLIN)
        ready = dict(poller.poll(pause_ms or None))
        if control in ready:
            return
        if exits_fd in ready and exits is not None:
            exits.drain()  # each exit on the host: kept a while for a process the next batch finds reaped
        if sock in ready:
            _drain(connector, exits, out)
            pause = realtime.pause_after_batch()
            if pause:
                resume_at = time.monotonic() + pause
                out.add(THROTTLED)
                out.add(END)
        out.flush()


# Imports this module as it was compiled at install (its cached bytecode): run as a script it would be
# compiled at every start, which leaves the reader 1.5 MB larger.
READER_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); import connector; sys.exit(connector.reader_main(sys.argv))"
)


def reader_command(sock_fd: int, exits_fd: int, realtime_share: float) -> list[str]:
    """The reader's command line: a fresh interpreter that imports this module and nothing else of the agent."""
    here = os.path.dirname(os.path.abspath(__file__))
    return [sys.executable, "-I", "-S", "-c", READER_BOOT, here, str(sock_fd), str(exits_fd), repr(realtime_share)]


def reader_main(argv: list[str]) -> int:
    """`reader_command` (reader.Reader starts it; `python -I -S connector.py SOCKET_FD EXITS_FD REALTIME_SHARE`
    does the same): the kernel's sockets inherited, stdin the agent's control pipe, stdout the frames."""
    try:
        serve(int(argv[1]), int(argv[2]), float(argv[3]))
    except BrokenPipeError:  # the agent is gone
        return 0
    except Exception as exc:  # told to the agent, which raises it (and the runtime restarts the collector)
        with contextlib.suppress(OSError):
            out = _FrameWriter(1)
            out.add(FAILED, f"{type(exc).__name__}: {exc}".encode())
            out.add(END)
            out.flush_all()
        return 1
    return 0


# ---- the agent's side of the reader -------------------------------------------------------------------


class FrameDecoder:
    """The reader's frames back into what happened, a batch at a time (at each END frame)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.batch: list[Received] = []
        self.reads: dict[tuple[int, int], ProcRead] = {}

    def feed(self, data: bytes | memoryview) -> list[Received]:
        """What the completed batches in `data` (and earlier partial data) hold, in order."""
        self.buffer += data
        done: list[Received] = []
        offset = 0
        while len(self.buffer) - offset >= FRAME.size:
            kind, length = FRAME.unpack_from(self.buffer, offset)
            if length > FRAME_MAX:
                raise ConnectorError(errno.EPROTO, f"reader frame of {length} bytes: the stream is corrupt")
            if len(self.buffer) - offset - FRAME.size < length:
                break
            done += self._frame(kind, bytes(self.buffer[offset + FRAME.size : offset + FRAME.size + length]))
            offset += FRAME.size + length
        del self.buffer[:offset]
        return done

    def _frame(self, kind: int, payload: bytes) -> list[Received]:
        if kind == END:
            batch = [self._with_read(item) for item in self.batch]
            self.batch, self.reads = [], {}
            return batch
        if kind == DATAGRAM:
            try:
                self.batch += [(event, None) for event in parse(payload)]
            except MalformedMessage as exc:
                self.batch.append(exc)
        elif kind == PROCFS:
            read = decode_procfs(payload)
            self.reads[read.pid, read.exec_ns] = read
        else:
            self.batch.append(self._notice(kind, payload.decode(errors="replace")))
        return []

    @staticmethod
    def _notice(kind: int, text: str) -> Received:
        if kind == LOST:
            return EventsLost(errno.ENOBUFS, text)
        if kind == REJECTED:
            return MalformedMessage(text)
        if kind == STARTED:
            return ReaderStarted(text)
        if kind == THROTTLED:
            return Throttled()
        if kind == FAILED:
            return ConnectorError(errno.EIO, f"the process-event reader failed: {text}")
        raise ConnectorError(errno.EPROTO, f"unknown reader frame kind {kind}: the stream is corrupt")

    def _with_read(self, item: Received) -> Received:
        if isinstance(item, tuple) and isinstance(item[0], Exec):
            return item[0], self.reads.get((item[0].pid, item[0].ts_ns))
        return item


if __name__ == "__main__":
    sys.exit(reader_main(sys.argv))
