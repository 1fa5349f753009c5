"""Packets for the flow agent: a fast header parser, a pcap/pcapng reader and a live capture socket.

Frames are parsed from raw bytes with `struct` at offsets (no copy, no dissection): Ethernet,
802.1Q/802.1ad tags, MPLS label stacks, Linux cooked captures (SLL, SLL2), raw IP, IPv4, IPv6
(with extension headers), TCP, UDP, SCTP, ICMP and ICMPv6. A parsed packet is a `Parsed` tuple; a frame that
cannot give one yields a reason (`NON_IP`, `TRUNCATED`, `MALFORMED`, `UNSUPPORTED_LINK`) that the
caller counts.

The capture socket is a plain AF_PACKET socket (CAP_NET_RAW) with the BPF filter compiled by
libpcap (`pcap_compile` through ctypes, on a dead handle: no capture privileges involved).
Scapy is not imported: its modules that read capture files load Wireshark's vendor table at
import (about 20 MB of RSS), more than this agent's whole budget for flows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "FRAGMENT_FIRST",
    "FRAGMENT_LATER",
    "LINKTYPE_ETHERNET",
    "MALFORMED",
    "NON_IP",
    "SUPPORTED_LINKTYPES",
    "TRUNCATED",
    "UNSUPPORTED_LINK",
    "BpfError",
    "Capture",
    "CaptureInterface",
    "Frame",
    "Parsed",
    "PcapReader",
    "Record",
    "compile_bpf",
    "parse_frame",
]

# (protocol, src, src_port, dst, dst_port, tcp_flags, ip_bytes, vlan, fragment); src/dst are 4 or 16
# bytes; fragment is 0 for a whole datagram, else its IP id (IPv6: fragment id) << 10 | protocol << 2
# | FRAGMENT_FIRST or FRAGMENT_LATER (a later fragment has no transport header: ports 0).
Parsed = tuple[int, bytes, int, bytes, int, int, int, int, int]
FRAGMENT_FIRST, FRAGMENT_LATER = 1, 2
NON_IP = "non_ip"
TRUNCATED = "truncated"
MALFORMED = "malformed"
UNSUPPORTED_LINK = "unsupported_link"

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
DLT_RAW = 12  # what some writers put for raw IP
ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
COOKED_HEADERS = {LINKTYPE_LINUX_SLL: (16, 14), LINKTYPE_LINUX_SLL2: (20, 0)}  # header size, protocol offset
RAW_LINKTYPES = frozenset({LINKTYPE_RAW, DLT_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6})
IP_VERSIONS = {4: ETH_IPV4, 6: ETH_IPV6}
SUPPORTED_LINKTYPES = frozenset({LINKTYPE_ETHERNET, *COOKED_HEADERS, *RAW_LINKTYPES})
VLAN_TPIDS = frozenset({0x8100, 0x88A8, 0x9100})
MPLS_ETHERTYPES = frozenset({0x8847, 0x8848})  # unicast (RFC 3032), multicast (RFC 5332)
MAX_MPLS_LABELS = 16  # deeper stacks do not occur; more means a corrupt frame
IPV6_EXTENSIONS = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options: (len + 1) * 8 bytes
IPV6_FRAGMENT, IPV6_AH = 44, 51
MAX_IPV6_EXTENSIONS = 8
PORT_PROTOCOLS = frozenset({17, 132, 136})  # UDP, SCTP, UDP-Lite (TCP is handled on its own)
ECHO_TYPES = {1: (0, 8), 58: (128, 129)}  # ICMP / ICMPv6 echo reply and request

_U16 = struct.Struct(">H").unpack_from


# ---- parsing -------------------------------------------------------------------------------------


def parse_frame(buf: bytes, off: int, end: int, wire: int, linktype: int, vlan: int = 0) -> Parsed | str:
    """Parse the frame in `buf[off:end]` (`wire` bytes long on the wire) of the given link type.

    `vlan` is a tag the kernel already stripped (live capture); an in-band tag is used otherwise.
    """
    if linktype == LINKTYPE_ETHERNET:
        return _ethernet(buf, off, end, wire, vlan)
    cooked = COOKED_HEADERS.get(linktype)
    if cooked is not None:
        size, field = cooked
        if end - off < size:
            return TRUNCATED
        return _ip_by_ethertype(buf, off + size, end, wire - size, buf[off + field] << 8 | buf[off + field + 1], vlan)
    if linktype in RAW_LINKTYPES:
        if end <= off:
            return TRUNCATED
        return _ip_by_ethertype(buf, off, end, wire, IP_VERSIONS.get(buf[off] >> 4, 0), vlan)
    return UNSUPPORTED_LINK


def _ethernet(buf: bytes, off: int, end: int, wire: int, vlan: int) -> Parsed | str:
    if end - off < 14:
        return TRUNCATED
    start, ethertype, off = off, buf[off + 12] << 8 | buf[off + 13], off + 14
    while ethertype in VLAN_TPIDS:
        if end - off < 4:
            return TRUNCATED
        vlan = vlan or (buf[off] & 0xF) << 8 | buf[off + 1]
        ethertype, off = buf[off + 2] << 8 | buf[off + 3], off + 4
    if ethertype == ETH_IPV4:
        return _ipv4(buf, off, end, wire - (off - start), vlan)
    return _ip_by_ethertype(buf, off, end, wire - (off - start), ethertype, vlan)


def _ip_by_ethertype(buf: bytes, off: int, end: int, wire: int, ethertype: int, vlan: int) -> Parsed | str:
    if ethertype == ETH_IPV4:
        return _ipv4(buf, off, end, wire, vlan)
    if ethertype == ETH_IPV6:
        return _ipv6(buf, off, end, wire, vlan)
    if ethertype in MPLS_ETHERTYPES:
        return _mpls(buf, off, end, wire, vlan)
    return NON_IP


def _mpls(buf: bytes, off: int, end: int, wire: int, vlan: int) -> Parsed | str:
    """A label stack (RFC 3032: 4 bytes a label; the S bit, the low bit of the third byte, marks the
    bottom), then IPv4 or IPv6 by the payload's first nibble (RFC 4182: the stack does not say which).
    Anything else under the stack (a pseudowire, its control word) is NON_IP."""
    for _ in range(MAX_MPLS_LABELS):
        if end - off < 5:  # a label and the payload's first byte
            return TRUNCATED
        bottom, off, wire = buf[off + 2] & 1, off + 4, wire - 4
        if bottom:
            return _ip_by_ethertype(buf, off, end, wire, IP_VERSIONS.get(buf[off] >> 4, 0), vlan)
    return MALFORMED


def _ipv4(buf: bytes, off: int, end: int, wire: int, vlan: int) -> Parsed | str:
    if end - off < 20:
        return TRUNCATED
    first = buf[off]
    header = (first & 0xF) * 4
    if first >> 4 != 4 or header < 20:
        return MALFORMED
    length = _U16(buf, off + 2)[0] or wire  # 0: a segmentation-offload super-packet
    protocol, src, dst = buf[off + 9], buf[off + 12 : off + 16], buf[off + 16 : off + 20]
    fragment = 0
    flags_offset = _U16(buf, off + 6)[0]
    if flags_offset & 0x3FFF:  # more fragments, or an offset: a fragment (of the datagram with this id)
        fragment = (_U16(buf, off + 4)[0] << 8 | protocol) << 2
        if flags_offset & 0x1FFF:  # a later fragment: no transport header
            return protocol, src, 0, dst, 0, 0, length, vlan, fragment | FRAGMENT_LATER
        fragment |= FRAGMENT_FIRST
    return _transport(buf, off + header, end, protocol, src, dst, length, vlan, fragment)


def _ipv6(buf: bytes, off: int, end: int, wire: int, vlan: int) -> Parsed | str:
    if end - off < 40:
        return TRUNCATED
    if buf[off] >> 4 != 6:
        return MALFORMED
    payload = _U16(buf, off + 4)[0]
    length = 40 + payload if payload else wire  # 0: a jumbogram or offload super-packet
    protocol, src, dst, pos = buf[off + 6], buf[off + 8 : off + 24], buf[off + 24 : off + 40], off + 40
    fragment = 0
    for _ in range(MAX_IPV6_EXTENSIONS):
        if protocol in IPV6_EXTENSIONS or protocol == IPV6_AH:
            if end - pos < 2:
                return TRUNCATED
            size = (buf[pos + 1] + 2) * 4 if protocol == IPV6_AH else (buf[pos + 1] + 1) * 8
            protocol, pos = buf[pos], pos + size
        elif protocol == IPV6_FRAGMENT:
            if end - pos < 8:
                return TRUNCATED
            protocol, offset_more = buf[pos], _U16(buf, pos + 2)[0]
            if offset_more & 0xFFF9:  # an offset or more fragments (else an atomic fragment: RFC 6946)
                fragment = (int.from_bytes(buf[pos + 4 : pos + 8]) << 8 | protocol) << 2
                if offset_more & 0xFFF8:
                    return protocol, src, 0, dst, 0, 0, length, vlan, fragment | FRAGMENT_LATER
                fragment |= FRAGMENT_FIRST
            pos += 8
        else:
            break
    return _transport(buf, pos, end, protocol, src, dst, length, vlan, fragment)


def _transport(
    buf: bytes, pos: int, end: int, protocol: int, src: bytes, dst: bytes, length: int, vlan: int, fragment: int
) -> Parsed | str:
    """Ports, and TCP flags; ICMP has its own idea of ports (see `_icmp`)."""
    if protocol == 6:
        if end - pos < 14:
            return TRUNCATED
        sport, dport = buf[pos] << 8 | buf[pos + 1], buf[pos + 2] << 8 | buf[pos + 3]
        return 6, src, sport, dst, dport, buf[pos + 13], length, vlan, fragment
    if protocol in PORT_PROTOCOLS:
        if end - pos < 4:
            return TRUNCATED
        sport, dport = buf[pos] << 8 | buf[pos + 1], buf[pos + 2] << 8 | buf[pos + 3]
        return protocol, src, sport, dst, dport, 0, length, vlan, fragment
    if protocol in ECHO_TYPES:
        return _icmp(buf, pos, end, protocol, src, dst, length, vlan, fragment)
    return protocol, src, 0, dst, 0, 0, length, vlan, fragment


def _icmp(
    buf: bytes, pos: int, end: int, protocol: int, src: bytes, dst: bytes, length: int, vlan: int, fragment: int
) -> Parsed | str:
    """Echo request and reply: the identifier as both ports (one flow); other messages: dst_port type<<8|code."""
    if end - pos < 4:
        return TRUNCATED
    kind = buf[pos]
    if kind not in ECHO_TYPES[protocol]:
        return protocol, src, 0, dst, kind << 8 | buf[pos + 1], 0, length, vlan, fragment
    if end - pos < 6:
        return TRUNCATED
    ident = buf[pos + 4] << 8 | buf[pos + 5]
    return protocol, src, ident, dst, ident, 0, length, vlan, fragment


# ---- pcap and pcapng files -----------------------------------------------------------------------

PCAP_MAGIC = {  # magic as read little-endian -> (byte order, ns per timestamp fraction unit)
    0xA1B2C3D4: ("<", 1000),
    0xA1B23C4D: ("<", 1),
    0xD4C3B2A1: (">", 1000),
    0x4D3CB2A1: (">", 1),
}
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BYTE_ORDER = 0x1A2B3C4D
PCAPNG_IDB, PCAPNG_OPB, PCAPNG_SPB, PCAPNG_EPB = 1, 2, 3, 6
PCAPNG_MIN_BODY = {PCAPNG_IDB: 8, PCAPNG_OPB: 20, PCAPNG_SPB: 4, PCAPNG_EPB: 20}  # bytes a block must hold
MAX_RECORD = 1 << 20  # no capture has frames this long: a bigger length means a corrupt file
CHUNK = 1 << 20

# (ts_ns, interface index, buffer, start, end, wire length)
Record = tuple[int, int, bytes, int, int, int]


class PcapReader:
    """Records of a pcap or pcapng file, read in 1 MiB chunks and handed out as buffer offsets.

    A missing or unreadable file raises OSError and a file that is not a capture ValueError, both
    at construction. A file cut short or corrupt later ends the records with `problem` set.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.interfaces: list[CaptureInterface] = []  # pcapng files add theirs as they are read
        self.problem = ""
        self.records_read = 0
        self._section_base = 0  # pcapng: index of the current section's first interface
        self._file: BinaryIO = path.open("rb")
        head = self._file.read(24)
        magic = int.from_bytes(head[:4], "little") if len(head) >= 4 else -1
        if magic in PCAP_MAGIC:
            if len(head) < 24:
                self.close()
                raise ValueError(f"{path}: pcap header cut short ({len(head)} of 24 bytes)")
            self._order, self._ts_unit = PCAP_MAGIC[magic]
            linktype = struct.unpack_from(self._order + "I", head, 20)[0] & 0x0FFFFFFF
            self.interfaces.append(CaptureInterface(path.name, linktype))
            self._pcapng = False
        elif magic == PCAPNG_SHB:
            self._order, self._pcapng = "<", True
        else:
            self.close()
            raise ValueError(f"{path}: not a pcap or pcapng file (magic {head[:4].hex() or 'missing'})")
        self._buf, self._pos = (head if self._pcapng else b""), 0

    def close(self) -> None:
        self._file.close()

    def _fill(self, need: int) -> bool:
        """Make `need` bytes available at the read position; False at the end of the file."""
        if len(self._buf) - self._pos >= need:
            return True
        self._buf, self._pos = self._buf[self._pos :] + self._file.read(max(CHUNK, need)), 0
        return len(self._buf) >= need

    def _cut(self, what: str) -> None:
        if len(self._buf) > self._pos:
            self.problem = f"{self.path}: file cut short inside {what} after {self.records_read} records"

    def records(self) -> Iterator[Record]:
        return self._pcapng_records() if self._pcapng else self._pcap_records()

    def _pcap_records(self) -> Iterator[Record]:
        header = struct.Struct(self._order + "IIII").unpack_from
        unit = self._ts_unit
        while self._fill(16):
            buf, pos = self._buf, self._pos
            size = len(buf)
            while size - pos >= 16:  # the records complete in this chunk
                seconds, fraction, caplen, wire = header(buf, pos)
                end = pos + 16 + caplen
                if end > size or caplen > MAX_RECORD:
                    break
                self.records_read += 1
                yield (
                    seconds * 1_000_000_000 + fraction * unit,
                    0,
                    buf,
                    pos + 16,
                    end,
                    wire if wire > caplen else caplen,
                )
                pos = end
            self._pos = pos
            if size - pos < 16:
                continue
            caplen = header(buf, pos)[2]
            if caplen > MAX_RECORD:
                self.problem = f"{self.path}: corrupt record {self.records_read + 1} (length {caplen})"
                return
            if not self._fill(16 + caplen):
                self._cut("a packet")
                return
        self._cut("a record header")

    def _pcapng_records(self) -> Iterator[Record]:
        ts_ns = 0
        while self._fill(12):
            kind = struct.unpack_from(self._order + "I", self._buf, self._pos)[0]
            if kind == PCAPNG_SHB:
                self._section_order()
            size = struct.unpack_from(self._order + "I", self._buf, self._pos + 4)[0]
            if size < 12 or size % 4 or size > MAX_RECORD:
                self.problem = f"{self.path}: corrupt block after {self.records_read} records (length {size})"
                return
            if not self._fill(size):
                self._cut("a block")
                return
            body, self._pos = self._pos + 8, self._pos + size
            if size - 12 < PCAPNG_MIN_BODY.get(kind, 0):
                self.problem = f"{self.path}: corrupt block after {self.records_read} records (too short)"
                return
            record = self._pcapng_block(kind, body, body + size - 12, ts_ns)
            if self.problem:
                return
            if record is not None:
                ts_ns = record[0]
                self.records_read += 1
                yield record
        self._cut("a block header")

    def _section_order(self) -> None:
        """A section header block: its byte-order magic sets the order; interfaces start over."""
        magic = self._buf[self._pos + 8 : self._pos + 12]
        self._order = "<" if int.from_bytes(magic, "little") == PCAPNG_BYTE_ORDER else ">"
        self._section_base = len(self.interfaces)

    def _pcapng_block(self, kind: int, body: int, end: int, last_ns: int) -> Record | None:
        order, buf = self._order, self._buf
        if kind == PCAPNG_IDB:
            linktype = struct.unpack_from(order + "H", buf, body)[0]
            name, resolution = self._idb_options(body + 8, end)
            name = name or f"{self.path.name}#{len(self.interfaces)}"
            self.interfaces.append(CaptureInterface(name, linktype, resolution))
            return None
        if kind in (PCAPNG_EPB, PCAPNG_OPB):
            if kind == PCAPNG_EPB:
                index, high, low, caplen, wire = struct.unpack_from(order + "IIIII", buf, body)
            else:
                index, _drops, high, low, caplen, wire = struct.unpack_from(order + "HHIIII", buf, body)
            index += self._section_base
            if index >= len(self.interfaces) or body + 20 + caplen > end:
                self.problem = f"{self.path}: corrupt packet block after {self.records_read} records"
                return None
            ts_ns = _scale(high << 32 | low, self.interfaces[index].resolution)
            return ts_ns, index, buf, body + 20, body + 20 + caplen, max(wire, caplen)
        if kind == PCAPNG_SPB and self.interfaces:
            wire = struct.unpack_from(order + "I", buf, body)[0]
            index = self._section_base
            return last_ns, index, buf, body + 4, body + 4 + min(wire, end - body - 4), wire
        return None  # name resolution, statistics, custom blocks

    def _idb_options(self, pos: int, end: int) -> tuple[str, int]:
        """if_name (2) and if_tsresol (9) of an interface description block."""
        name, resolution = "", 6
        while pos + 4 <= end:
            code, size = struct.unpack_from(self._order + "HH", self._buf, pos)
            if code == 0:
                break
            value = self._buf[pos + 4 : pos + 4 + size]
            if code == 2:
                name = value.decode("utf-8", "replace")
            elif code == 9 and value:
                resolution = value[0] if value[0] < 0x80 else -(value[0] & 0x7F)
            pos += 4 + (size + 3) // 4 * 4
        return name, resolution


def _scale(ticks: int, resolution: int) -> int:
    """Timestamp ticks to ns: `resolution` >= 0 means 10**-resolution s, < 0 means 2**resolution s."""
    if resolution < 0:
        return ticks * 1_000_000_000 >> -resolution
    if resolution <= 9:
        return ticks * int(10 ** (9 - resolution))
    return ticks // int(10 ** (resolution - 9))


class CaptureInterface:
    """One capture source: its name (interface or file), link type and pcapng time resolution."""

    __slots__ = ("linktype", "name", "resolution")

    def __init__(self, name: str, linktype: int, resolution: int = 6) -> None:
        self.name, self.linktype, self.resolution = name, linktype, resolution


# ---- BPF -----------------------------------------------------------------------------------------


class BpfError(ValueError):
    """A filter that libpcap cannot compile, or no libpcap to compile it."""


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p)]


@functools.cache
def _libpcap() -> ctypes.CDLL:
    for name in ("libpcap.so.0.8", "libpcap.so.1", ctypes.util.find_library("pcap")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.pcap_open_dead.restype = ctypes.c_void_p
        lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32]
        lib.pcap_geterr.restype = ctypes.c_char_p
        lib.pcap_geterr.argtypes = [ctypes.c_void_p]
        lib.pcap_freecode.argtypes = [ctypes.c_void_p]
        lib.pcap_close.argtypes = [ctypes.c_void_p]
        return lib
    raise BpfError("compiling a BPF filter needs libpcap (Debian: apt install libpcap0.8)")


def compile_bpf(expression: str, linktype: int = LINKTYPE_ETHERNET) -> bytes:
    """Classic BPF bytecode (8 bytes an instruction) for a tcpdump-style filter expression."""
    lib = _libpcap()
    # libpcap takes a DLT, which for raw IP (101 in files) is 12
    handle = lib.pcap_open_dead(DLT_RAW if linktype == LINKTYPE_RAW else linktype, SNAPLEN)
    if not handle:
        raise BpfError(f"libpcap cannot compile for link type {linktype}")
    program = _BpfProgram()
    try:
        if lib.pcap_compile(handle, ctypes.byref(program), expression.encode(), 1, 0xFFFFFFFF) != 0:
            raise BpfError(f"{expression!r} does not compile: {lib.pcap_geterr(handle).decode(errors='replace')}")
        code = ctypes.string_at(program.bf_insns, program.bf_len * 8)
        lib.pcap_freecode(ctypes.byref(program))
    finally:
        lib.pcap_close(handle)
    return code


# ---- live capture --------------------------------------------------------------------------------

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC = 1, 1
PACKET_STATISTICS, PACKET_AUXDATA = 6, 8
SO_ATTACH_FILTER, SO_RCVBUFFORCE, SO_TIMESTAMPNS = 26, 33, 35
TP_STATUS_VLAN_VALID = 0x10
SNAPLEN = 262144  # what the filter accepts; the socket then hands over only READ_BYTES of it
READ_BYTES = 256  # enough for every header this agent reads
RCVBUF = 8 << 20  # frames are queued whole (a 64 KiB offload frame takes 64 KiB)
# ARPHRD (link type of an interface) -> pcap link type: Ethernet, loopback; PPP, raw IP, tun ("none")
ARPHRD_LINKTYPES = {
    1: LINKTYPE_ETHERNET,
    772: LINKTYPE_ETHERNET,
    512: LINKTYPE_RAW,
    519: LINKTYPE_RAW,
    0xFFFE: LINKTYPE_RAW,
}
ARPHRD_LOOPBACK = 772
_AUXDATA = struct.Struct("IIIHHHH").unpack_from
_TIMESPEC = struct.Struct("qq").unpack_from
_STATS = struct.Struct("II").unpack

# (ts_ns, frame bytes, wire length, vlan stripped by the kernel)
Frame = tuple[int, bytes, int, int]


class Capture:
    """An AF_PACKET socket on one interface: every frame in and out, through an optional BPF filter.

    Needs CAP_NET_RAW. Raises OSError for an interface that does not exist (ENODEV) or that is of
    a link type this parser does not read, and BpfError for a filter that does not compile.
    """

    def __init__(self, interface: str, bpf: str = "", promiscuous: bool = False) -> None:
        self.interface = interface
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: nothing arrives yet
        try:
            self._setup(bpf, promiscuous)
        except BaseException:
            self.sock.close()
            raise

    def _setup(self, bpf: str, promiscuous: bool) -> None:
        sock = self.sock
        sock.bind((self.interface, 0))  # OSError ENODEV for an unknown interface
        hatype = sock.getsockname()[3]
        if hatype not in ARPHRD_LINKTYPES:
            raise OSError(f"{self.interface}: link type {hatype} (ARPHRD) is not Ethernet or raw IP")
        self.linktype = ARPHRD_LINKTYPES[hatype]
        self.skip_outgoing = hatype == ARPHRD_LOOPBACK  # loopback shows every frame twice
        if bpf:
            code = ctypes.create_string_buffer(compile_bpf(bpf, self.linktype))
            program = struct.pack("HL", len(code.raw) // 8, ctypes.addressof(code))
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program)
        if promiscuous:
            index = socket.if_nametoindex(self.interface)
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, struct.pack("IHH8s", index, PACKET_MR_PROMISC, 0, b""))
        try:  # beyond net.core.rmem_max only with CAP_NET_ADMIN; without it the kernel caps SO_RCVBUF there
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setblocking(False)
        sock.bind((self.interface, ETH_P_ALL))  # start receiving, filter already in place
        self.index = socket.if_nametoindex(self.interface)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, limit: int) -> list[Frame]:
        """Up to `limit` frames waiting now (never blocks)."""
        frames: list[Frame] = []
        recvmsg, space = self.sock.recvmsg, socket.CMSG_SPACE(20) + socket.CMSG_SPACE(16)
        for _ in range(limit):
            try:
                data, ancillary, _flags, address = recvmsg(READ_BYTES, space)
            except BlockingIOError:
                break
            if self.skip_outgoing and address[2] == socket.PACKET_OUTGOING:
                continue
            ts_ns, wire, vlan = 0, len(data), 0
            for level, kind, value in ancillary:
                if level == SOL_PACKET and kind == PACKET_AUXDATA:
                    status, wire, _snap, _mac, _net, tci, _tpid = _AUXDATA(value)
                    vlan = tci & 0xFFF if status & TP_STATUS_VLAN_VALID else 0
                elif level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanoseconds = _TIMESPEC(value)
                    ts_ns = seconds * 1_000_000_000 + nanoseconds
            frames.append((ts_ns, data, wire, vlan))
        return frames

    def still_there(self) -> bool:
        """The interface still exists (it may be down): not deleted, nor replaced by another of that name."""
        try:
            return socket.if_nametoindex(self.interface) == self.index
        except OSError:
            return False

    def kernel_drops(self) -> int:
        """Frames the kernel dropped (socket buffer full) since the last call."""
        _packets, drops = _STATS(self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        return int(drops)

    def close(self) -> None:
        self.sock.close()
