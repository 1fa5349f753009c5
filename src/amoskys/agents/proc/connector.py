"""The kernel's process-event connector: fork, exec, uid/gid changes and exit as they happen.

A netlink socket (`NETLINK_CONNECTOR`) joined to the `CN_IDX_PROC` group receives one message per
event: `struct nlmsghdr`, then `struct cn_msg` (include/uapi/linux/connector.h), then `struct
proc_event` (include/uapi/linux/cn_proc.h) whose `timestamp_ns` is the kernel's CLOCK_MONOTONIC.
Listening needs CAP_NET_ADMIN on kernels before 6.6, and the initial PID and user namespaces.
Kernels since 6.6 take an event-type filter (`struct proc_input`); older ones ignore it and send
everything, which `parse` skips.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import struct
import time
from typing import NamedTuple

__all__ = [
    "Ack",
    "ConnectorError",
    "ConnectorUnavailable",
    "EventsLost",
    "Exec",
    "Exit",
    "Fork",
    "IdChange",
    "KernelEvent",
    "MalformedMessage",
    "ProcConnector",
    "monotonic_to_wall_ns",
    "parse",
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
    err: int


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


def _payload(what: int, ts_ns: int, data: memoryview) -> KernelEvent | None:
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
        return Ack(*ACK.unpack_from(data))
    return None  # sid, ptrace, comm, coredump: not asked for (older kernels send them anyway)


def _connector_message(body: memoryview) -> KernelEvent | None:
    if len(body) < CN_MSG.size:
        raise MalformedMessage(f"connector message of {len(body)} bytes is shorter than struct cn_msg")
    idx, val, _, _, length, _ = CN_MSG.unpack_from(body)
    if (idx, val) != (CN_IDX_PROC, CN_VAL_PROC):
        return None  # another connector user's message
    data = body[CN_MSG.size :]
    if length > len(data) or length < PROC_EVENT.size + UNION_BYTES:
        raise MalformedMessage(f"proc_event of {length} bytes ({len(data)} received); expected at least 40")
    what, _, ts_ns = PROC_EVENT.unpack_from(data)
    return _payload(what, ts_ns, data[PROC_EVENT.size : length])


def parse(datagram: bytes | bytearray | memoryview) -> list[KernelEvent]:
    """The process events in one netlink datagram (possibly several messages); MalformedMessage if cut short."""
    view = memoryview(datagram)
    events: list[KernelEvent] = []
    offset = 0
    while offset < len(view):
        if len(view) - offset < NLMSGHDR.size:
            raise MalformedMessage(f"{len(view) - offset} trailing bytes are shorter than struct nlmsghdr")
        length, kind, _, _, _ = NLMSGHDR.unpack_from(view, offset)
        if length < NLMSGHDR.size or offset + length > len(view):
            raise MalformedMessage(f"nlmsg_len {length} at offset {offset} overruns the {len(view)}-byte datagram")
        body = view[offset + NLMSGHDR.size : offset + length]
        if kind == NLMSG_ERROR and len(body) >= NLMSGERR.size:
            (error,) = NLMSGERR.unpack_from(body)
            if error:
                raise ConnectorError(-error, f"netlink error: {errno.errorcode.get(-error, -error)}")
        elif kind == NLMSG_DONE:
            event = _connector_message(body)
            if event is not None:
                events.append(event)
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return events


def _request(operation: int, event_types: int | None, portid: int) -> bytes:
    """A PROC_CN_MCAST_* request: the 4-byte form (every kernel), or struct proc_input with a filter."""
    data = struct.pack("=I", operation) if event_types is None else struct.pack("=II", operation, event_types)
    connector = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(data), 0) + data
    return NLMSGHDR.pack(NLMSGHDR.size + len(connector), NLMSG_DONE, 0, 0, portid) + connector


class ProcConnector:
    """A subscribed connector socket; `read` returns the next events as they come."""

    def __init__(self, receive_buffer_bytes: int = 8 << 20) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError as exc:
            raise ConnectorUnavailable(exc.errno, f"no netlink connector socket: {exc.strerror}") from exc
        self.buffer = bytearray(65536)
        try:
            self._set_receive_buffer(receive_buffer_bytes)
            self.sock.bind((0, CN_IDX_PROC))
            self.portid = self.sock.getsockname()[0]
            self._subscribe()
        except OSError as exc:
            self.sock.close()
            if isinstance(exc, ConnectorError):
                raise
            raise ConnectorUnavailable(exc.errno, f"cannot listen to process events: {exc.strerror}") from exc

    def _set_receive_buffer(self, size: int) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def _subscribe(self) -> None:
        """Listen (answered by an ack on every kernel), then narrow to the wanted events (6.6+)."""
        self.sock.sendto(_request(PROC_CN_MCAST_LISTEN, None, self.portid), (0, 0))
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectorUnavailable(
                    errno.ETIMEDOUT, "the process connector did not answer (not in the initial PID/user namespace?)"
                )
            try:
                acks = [event for event in self.read(remaining) if isinstance(event, Ack)]
            except MalformedMessage:
                continue
            if acks:
                break
        if acks[0].err:
            raise ConnectorUnavailable(acks[0].err, f"the kernel refused to listen: {errno.errorcode[acks[0].err]}")
        self.sock.sendto(_request(PROC_CN_MCAST_LISTEN, WANTED, self.portid), (0, 0))

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, timeout: float | None) -> list[KernelEvent]:
        """The events of the next datagram from the kernel ([] when none came within `timeout` seconds).

        Raises EventsLost when the kernel dropped events since the last read (ENOBUFS), and
        MalformedMessage for a datagram that is cut short or was not sent by the kernel.
        """
        if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
            return []
        try:
            size, (sender, _) = self.sock.recvfrom_into(self.buffer, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return []
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                raise EventsLost(errno.ENOBUFS, "process events were lost: the socket buffer overflowed") from exc
            raise
        if sender != 0:  # any local process may send a unicast here: only port 0 is the kernel
            raise MalformedMessage(f"a {size}-byte message from netlink port {sender}, not the kernel: ignored")
        return parse(memoryview(self.buffer)[:size])

    def close(self) -> None:
        """Stop listening (so the kernel stops building events when no one else listens) and close."""
        with contextlib.suppress(OSError):  # closing releases the listener on current kernels anyway
            self.sock.sendto(_request(PROC_CN_MCAST_IGNORE, None, self.portid), (0, 0))
        self.sock.close()
