"""proc: every process start (exec) and exit as the kernel reports it, with who ran what and from where.

At start every running process is reported once (`SNAPSHOT`). Then the kernel's process-event
connector (`connector`) says when a process calls exec(), exits, or changes its uid/gid. A
reader process of its own (`reader`, at real-time priority where allowed) reads each exec's
command line and executable at once, then its fds, cwd, stat, uids and cgroup; a process already
reaped gets its name, parent and real ids from the kernel's exit record (taskstats). What neither
had is named in the event's `missing` (and `gone` set), with the pid and ppid the kernel gave,
never guessed.
Events carry the kernel's timestamp. Where the connector is unavailable (no CAP_NET_ADMIN on an
older kernel, a container's PID namespace) the agent says so once in its log and compares the
process table every `proc.interval_s` instead; `amoskys_agent_proc_mode` says which runs. When
the kernel drops events (the socket overflowed: ENOBUFS) the loss is counted and a rescan reports
what changed meanwhile.

Command lines have obvious secrets masked; executables are hashed (SHA-256, cached by device +
inode + mtime, up to `proc.hash_max_bytes`).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import hashlib
import io
import logging
import os
import pwd
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from amoskys.agents.proc.config import ProcAgentConfig
from amoskys.agents.proc.connector import (
    EXE_ID,
    ConnectorUnavailable,
    EventsLost,
    Exec,
    Exit,
    ExitRecord,
    ExitRecords,
    Fork,
    IdChange,
    KernelEvent,
    MalformedMessage,
    ProcConnector,
    ProcRead,
    ReaderStarted,
    Received,
    Throttled,
    monotonic_to_wall_ns,
    read_proc,
    read_procfs,
)
from amoskys.agents.proc.reader import Reader
from amoskys.agents.proc.rules import Subject, evaluate
from amoskys.agents.runtime.base import Agent
from amoskys.v1 import events_pb2

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import HistogramMetricFamily, Metric

__all__ = ["ProcAgent", "mask_cmdline"]

log = logging.getLogger(__name__)
Action = events_pb2.ProcessEvent.Action
SECRET_FLAG = re.compile(r"^--?(password|passwd|pass|pwd|secret|token|api[-_]?key|access[-_]?key|auth)(=.*)?$", re.I)
SECRET_ASSIGN = re.compile(
    r"^([A-Za-z0-9_.-]*(password|passwd|secret|token|api[-_]?key|access[-_]?key)[A-Za-z0-9_]*)=.+$", re.I
)
URL_CREDENTIALS = re.compile(r"(://[^/:@\s]+:)[^@\s]+@")
# One of these is in every argument the three patterns above mask: looking for them in the whole command
# line spares most execs the three patterns for each argument (the agent's largest cost for a command line).
# In the casefold: re.I also takes the long s (U+017F) for "s" and the Kelvin sign for "k"; lower() keeps both.
SECRET_HINTS = ("pass", "pwd", "secret", "token", "api", "access", "auth", "://")
CONTAINER_ID = re.compile(r"([0-9a-f]{64})")
MASK = "***"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RECENT_EXITS = 256  # exited processes the rules may still ask about (the other end of a pipe)
HASH_CACHE_MAX = 4096  # executables' digests kept (about 0.5 MB); then the cache starts over
EXEC_FIELDS = ("cmdline", "exe", "cwd", "name", "uid", "cgroup")  # what an exec event gets from /proc
READ_TIMEOUT_S = 0.5  # how often the follow thread looks whether it should stop
# Seconds from an exec to its command line and executable read by the reader (a histogram).
READ_DELAY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1, float("inf"))
Deliver = Callable[[list[events_pb2.Event]], object]


def mask_cmdline(argv: list[str]) -> list[str]:
    """Mask the values of password/token-like flags and assignments, and passwords in URLs."""
    text = "\0".join(argv).casefold()
    if not any(hint in text for hint in SECRET_HINTS):
        return argv
    masked: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            masked.append(MASK)
            hide_next = False
            continue
        flag = SECRET_FLAG.match(arg)
        if flag:
            hide_next = flag.group(2) is None
            masked.append(arg if hide_next else arg.split("=", 1)[0] + "=" + MASK)
            continue
        assign = SECRET_ASSIGN.match(arg)
        masked.append(assign.group(1) + "=" + MASK if assign else URL_CREDENTIALS.sub(r"\1" + MASK + "@", arg))
    return masked


# ---- a process from what /proc said ---------------------------------------------------------------


def _text(raw: bytes | None) -> str:
    return (raw or b"").decode(errors="replace")


def parse_stat(raw: bytes) -> tuple[str, int, int]:
    """(comm, ppid, start time in clock ticks since boot) from the text of /proc/PID/stat."""
    close = raw.rfind(b")")  # comm may itself contain ')' and spaces
    fields = raw[close + 2 :].split()
    return raw[raw.find(b"(") + 1 : close].decode(errors="replace"), int(fields[1]), int(fields[19])


def read_stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, start ticks) of a running process; None if gone."""
    raw = read_proc(pid, "stat")
    return parse_stat(raw) if raw else None


def _ids(status: bytes) -> tuple[int, int, int, int]:
    """(uid, euid, gid, egid) from /proc/PID/status."""
    found = {b"Uid:": (-1, -1), b"Gid:": (-1, -1)}
    for line in status.splitlines():
        key = line[:4]
        if key in found:
            parts = line.split()
            found[key] = (int(parts[1]), int(parts[2]))
    return (*found[b"Uid:"], *found[b"Gid:"])


def _cgroup(raw: bytes) -> tuple[str, str]:
    text = raw.decode(errors="replace").strip()
    path = text.splitlines()[-1].split(":", 2)[-1] if text else ""
    match = CONTAINER_ID.search(text)
    return path, match.group(1) if match else ""


def _boot_time_ns() -> int:
    """When the machine booted, by the clock /proc/PID/stat's start times count on (CLOCK_BOOTTIME); to the
    nanosecond, where /proc/stat's btime is whole seconds (and outside ProcSubset=pid, which the unit keeps)."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def missing_fields(read: ProcRead) -> list[str]:
    """The event fields /proc could no longer give (the process had exited or been reaped).

    An empty command line is a real one when the executable was still readable after it (both go
    when the process exits); an unreadable stdin or stdout is a closed descriptor when cwd (which
    goes after the descriptors) was still there.
    """
    missing = [field for field in ("exe", "cwd") if getattr(read, field) is None]
    if read.cmdline is None or (not read.cmdline and read.exe is None):
        missing.insert(0, "cmdline")
    if read.stat is None and read.exited is None:
        missing.append("name")
    if read.status is None:
        missing.append("uid" if read.exited is None else "euid")  # the exit record has the real ids only
    if read.cgroup is None:
        missing.append("cgroup")
    return missing


@dataclass(slots=True)
class Captured:
    """What /proc said about one process: its event (not yet enriched) and what identifies it."""

    info: events_pb2.ProcessEvent
    start_ticks: int
    stdin: str  # where fd 0 points, e.g. "socket:[1234]" or "/dev/pts/0"
    stdout: str
    observed_ns: int  # CLOCK_MONOTONIC when read (a kernel event older than this is already included)
    exe_id: bytes | None = None  # connector.EXE_ID of the file that ran, to hash that file only


def capture(read: ProcRead) -> Captured | None:
    """A process as /proc showed it, or as the kernel's exit record did once /proc had nothing left (no
    hashing, no name lookups); None if neither had anything."""
    if read.stat is None and read.exe is None and read.exited is None:
        return None
    exited = ExitRecord.unpack(read.exited) if read.exited is not None else None
    name, ppid, start_ticks = parse_stat(read.stat) if read.stat else ("", 0, 0)
    uid, euid, gid, egid = _ids(read.status) if read.status is not None else (-1, -1, -1, -1)
    if exited is not None:
        name, ppid = (name, ppid) if read.stat else (exited.comm, exited.ppid)
        uid, gid = (uid, gid) if read.status is not None else (exited.uid, exited.gid)
    link = _text(read.exe)
    info = events_pb2.ProcessEvent(
        pid=read.pid, ppid=ppid, name=name, exe=link.removesuffix(" (deleted)"),
        exe_deleted=link.endswith(" (deleted)"), cmdline=mask_cmdline(_text(read.cmdline).split("\0")[:-1]),
        cwd=_text(read.cwd), uid=uid, euid=euid, gid=gid, egid=egid,
    )  # fmt: skip
    info.cgroup, info.container_id = _cgroup(read.cgroup or b"")
    return Captured(info, start_ticks, _text(read.stdin), _text(read.stdout), read.read_ns, read.exe_id)


# ---- the agent ------------------------------------------------------------------------------------


class ProcAgent(Agent[ProcAgentConfig]):
    kind = "proc"
    config_type = ProcAgentConfig

    def __init__(self, config: ProcAgentConfig, state_dir: Path) -> None:
        super().__init__(config, state_dir)
        self.seen: dict[int, Captured] = {}
        self.forked: dict[int, int] = {}  # pid -> parent pid, for processes the kernel said were forked
        self.hashes: dict[tuple[int, int, int], str] = {}
        self.users: dict[int, str] = {}
        self.boot_ns = _boot_time_ns()
        self.mode = "starting"
        self.counts: collections.Counter[str] = collections.Counter()
        self.exited: collections.deque[Captured] = collections.deque(maxlen=RECENT_EXITS)
        self.missing: collections.Counter[str] = collections.Counter()  # field -> execs reported without it
        self.read_delays = [0] * len(READ_DELAY_BUCKETS)  # exec -> command line and executable read
        self.read_delay_sum_s = 0.0
        self.realtime = False  # the reader runs at real-time priority
        self.exit_records = False  # the kernel's exit records are heard (taskstats)

    # ---- enriching a captured process -----------------------------------------------------------

    def _hash(self, pid: int, exe: str, exe_id: bytes | None) -> str | None:
        """SHA-256 of the file that ran (`exe_id`: its device, inode and mtime when the process was
        read), opened through /proc/PID/exe or its path; None if neither is that file any more."""
        if exe_id is None:
            return None
        ran = EXE_ID.unpack(exe_id)
        for path in (f"/proc/{pid}/exe", exe):
            try:
                handle = open(path, "rb")  # noqa: SIM115 - closed below, after the cache lookup
            except OSError:
                continue
            with handle:
                st = os.fstat(handle.fileno())
                key = (st.st_dev, st.st_ino, st.st_mtime_ns)
                if key == ran:  # not another file at that path, nor another process with that pid
                    return self._digest(handle, key, st.st_size)
        return None

    def _digest(self, handle: io.BufferedReader, key: tuple[int, int, int], size: int) -> str:
        if key not in self.hashes:
            if size > self.config.proc.hash_max_bytes:
                return ""
            if len(self.hashes) >= HASH_CACHE_MAX:
                self.hashes.clear()
            try:
                self.hashes[key] = hashlib.file_digest(handle, "sha256").hexdigest()
            except OSError:
                return ""
        return self.hashes[key]

    def _user(self, uid: int) -> str:
        if uid not in self.users:
            try:
                self.users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self.users[uid] = str(uid)
        return self.users[uid]

    def name_of(self, pid: int) -> str:
        known = self.seen.get(pid)
        if known is not None:
            return known.info.name
        stat = read_stat(pid) if pid > 0 else None
        return stat[0] if stat else ""

    def enrich(self, captured: Captured) -> events_pb2.ProcessEvent:
        info = captured.info
        if info.uid >= 0:
            info.user = self._user(info.uid)
        info.parent_name = self.name_of(info.ppid)
        if info.exe:  # a deleted one too: /proc/PID/exe still opens it while it runs
            digest = self._hash(info.pid, info.exe, captured.exe_id)
            if digest is None:
                info.missing.append("exe_sha256")
                info.gone = True
            else:
                info.exe_sha256 = digest
        return info

    def _report(
        self, info: events_pb2.ProcessEvent, ts_ns: int | None = None, started: Captured | None = None
    ) -> list[events_pb2.Event]:
        """The process event, and the rules' alerts for a process that `started`; `ts_ns`: the kernel's time."""
        alerts = self.alerts(started) if started is not None else []
        severity = events_pb2.SEVERITY_WARNING if alerts else events_pb2.SEVERITY_INFO
        event = self.event(severity, process=info)
        if ts_ns is not None:
            event.ts_ns = ts_ns
        return [event, *alerts]

    # ---- polling: the start-up snapshot, the fallback, and the rescan after a loss -------------------

    def scan(self, action: int) -> list[events_pb2.Event]:
        """Compare the process table with what is known; return events (and alerts) for changes."""
        current: set[int] = set()
        events: list[events_pb2.Event] = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            stat = read_stat(pid)
            if stat is None:
                continue
            current.add(pid)
            known = self.seen.get(pid)
            if known is not None and known.start_ticks == stat[2] and known.info.name == stat[0]:
                continue
            if known is not None:  # pid reused, or exec(): the old program is gone
                events.append(self._exit(self.seen.pop(pid)))
            captured = capture(read_procfs(pid))
            if captured is None:
                continue
            captured.info.action = action  # type: ignore[assignment]
            captured.info.start_time_ns = self.boot_ns + captured.start_ticks * 10**9 // CLOCK_TICKS
            self.seen[pid] = captured
            events += self._report(self.enrich(captured), started=captured)
        for pid in [pid for pid in self.seen if pid not in current]:
            events.append(self._exit(self.seen.pop(pid)))
        self.forked = {pid: ppid for pid, ppid in self.forked.items() if pid in current}  # exits may have been lost
        return events

    def _exit(self, known: Captured, ts_ns: int | None = None) -> events_pb2.Event:
        self.exited.append(known)
        info = events_pb2.ProcessEvent()
        info.CopyFrom(known.info)
        info.action = Action.EXIT
        return self._report(info, ts_ns)[0]

    # ---- kernel events -------------------------------------------------------------------------------

    def on_kernel_events(self, batch: list[tuple[KernelEvent, ProcRead | None]]) -> list[events_pb2.Event]:
        """Events for a batch of kernel events, each exec with what /proc said right after it."""
        events: list[events_pb2.Event] = []
        for kernel, read in batch:
            if isinstance(kernel, Exec):
                events += self._on_exec(kernel, read)
            elif isinstance(kernel, Fork) and kernel.child_pid == kernel.child_tgid:  # a process, not a thread
                self.forked[kernel.child_tgid] = kernel.parent_tgid
            elif isinstance(kernel, Exit) and kernel.pid == kernel.tgid:
                self.forked.pop(kernel.pid, None)
                known = self.seen.pop(kernel.pid, None)
                if known is not None:
                    events.append(self._exit(known, monotonic_to_wall_ns(kernel.ts_ns)))
            elif isinstance(kernel, IdChange) and kernel.pid == kernel.tgid:
                events += self._on_id_change(kernel)
        return events

    def _on_exec(self, kernel: Exec, read: ProcRead | None) -> list[events_pb2.Event]:
        known = self.seen.get(kernel.pid)
        if known is not None and known.observed_ns > kernel.ts_ns:
            return []  # the start-up snapshot read this process after the exec: already reported
        events = [self._exit(self.seen.pop(kernel.pid), monotonic_to_wall_ns(kernel.ts_ns))] if known else []
        self.counts["execs"] += 1
        captured = self._captured_at_exec(kernel, read)
        captured.info.action = Action.START
        captured.info.start_time_ns = monotonic_to_wall_ns(kernel.ts_ns)
        captured.observed_ns = kernel.ts_ns  # a later exec of this pid is newer than this one, however late read
        self.seen[kernel.pid] = captured
        info = self.enrich(captured)
        if info.missing:
            self.counts["gone"] += 1
            self.missing.update(info.missing)
        return events + self._report(info, info.start_time_ns, captured)

    def _captured_at_exec(self, kernel: Exec, read: ProcRead | None) -> Captured:
        """The process as read right after its exec; what /proc no longer had is named in `missing`
        (and `gone` set), never guessed; the parent then comes from the kernel's fork event."""
        captured = capture(read) if read is not None else None
        if captured is None:
            info = events_pb2.ProcessEvent(pid=kernel.pid, uid=-1, euid=-1, gid=-1, egid=-1)
            captured = Captured(info, 0, "", "", kernel.ts_ns)
        if read is not None:
            delay_s = (read.read_ns - kernel.ts_ns) / 1e9
            self.read_delays[bisect.bisect_left(READ_DELAY_BUCKETS, delay_s)] += 1
            self.read_delay_sum_s += delay_s
        missing = missing_fields(read) if read is not None else list(EXEC_FIELDS)
        if not captured.info.ppid:
            captured.info.ppid = self.forked.get(kernel.pid, 0)
            if not captured.info.ppid:
                missing.append("ppid")
        captured.info.gone = bool(missing)
        captured.info.missing.extend(missing)
        return captured

    def _on_id_change(self, kernel: IdChange) -> list[events_pb2.Event]:
        known = self.seen.get(kernel.pid)
        if known is None:
            return []
        info = known.info
        if kernel.gid:
            info.gid, info.egid = kernel.real, kernel.effective
        else:
            info.uid, info.euid = kernel.real, kernel.effective
            info.user = self._user(kernel.real)
        change = events_pb2.ProcessEvent()
        change.CopyFrom(info)
        change.action = Action.SETID
        return self._report(change, monotonic_to_wall_ns(kernel.ts_ns))

    def follow(self, reader: Reader, deliver: Deliver, stop: threading.Event) -> None:
        """Kernel events until `stop`, from the reader process that read each exec's /proc at once:
        the events, rules and alerts for them; a loss (ENOBUFS) counted and rescanned; deleted
        executables rechecked."""
        recheck_at = time.monotonic() + self.config.proc.recheck_s
        while not stop.is_set():
            if time.monotonic() >= recheck_at:
                recheck_at = time.monotonic() + self.config.proc.recheck_s
                deliver(self.recheck())
            self._handle(reader.take(READ_TIMEOUT_S), deliver)

    def _handle(self, items: list[Received], deliver: Deliver) -> None:
        batch: list[tuple[KernelEvent, ProcRead | None]] = []
        for item in items:
            if isinstance(item, tuple):
                batch.append(item)
                continue
            if batch:
                deliver(self.on_kernel_events(batch))
                batch = []
            self._on_notice(item, deliver)
        if batch:
            deliver(self.on_kernel_events(batch))

    def _on_notice(self, item: ReaderStarted | Throttled | Exception, deliver: Deliver) -> None:
        """What the reader says besides kernel events: its start, a throttle, a loss, a refusal, a failure."""
        if isinstance(item, ReaderStarted):
            self.realtime = not item.realtime_refused
            if item.realtime_refused:
                log.warning(
                    "proc: the process-event reader runs without real-time priority; short-lived processes "
                    "may exit before their command line and executable are read",
                    extra={"error": item.realtime_refused},
                )
        elif isinstance(item, Throttled):
            self.counts["throttled"] += 1
        elif isinstance(item, EventsLost):
            self.counts["lost"] += 1
            log.warning("proc: the kernel dropped process events (socket overflow); rescanning /proc")
            deliver(self.scan(Action.START))
        elif isinstance(item, MalformedMessage):
            self.counts["rejected"] += 1
            log.warning("proc: kernel message rejected", extra={"error": str(item)})
        else:
            raise item

    # ---- the collect loop ----------------------------------------------------------------------------

    def _open_connector(self) -> ProcConnector | None:
        try:
            connector = ProcConnector()
        except ConnectorUnavailable as exc:
            self.mode = "polling"
            log.warning(
                "proc: kernel process events unavailable; polling /proc instead",
                extra={"error": str(exc), "interval_s": self.config.proc.interval_s},
            )
            return None
        self.mode = "connector"
        return connector

    def _open_exit_records(self) -> ExitRecords | None:
        """The kernel's exit records (the name of a process reaped before it was read); None, said once, if
        the kernel has no taskstats."""
        try:
            exits = ExitRecords()
        except ConnectorUnavailable as exc:
            log.warning(
                "proc: no exit records (taskstats); a process reaped before it is read is reported without its name",
                extra={"error": str(exc)},
            )
            return None
        self.exit_records = True
        return exits

    async def collect(self) -> AsyncIterator[events_pb2.Event]:
        # Listening and the reader start before the snapshot: nothing falls between, and the execs
        # meanwhile are read at once (their events wait in the reader's pipe).
        connector = await asyncio.to_thread(self._open_connector)
        exits = None if connector is None else await asyncio.to_thread(self._open_exit_records)
        reader = (
            None
            if connector is None
            else await asyncio.to_thread(Reader, connector, self.config.proc.realtime_share, exits)
        )
        try:
            for event in await asyncio.to_thread(self.scan, Action.SNAPSHOT):
                yield event
            events = self._poll() if reader is None else self._follow_in_thread(reader)
            async for event in events:
                yield event
        finally:
            if reader is not None:
                await asyncio.to_thread(reader.close)
            if connector is not None:
                connector.close()
            if exits is not None:
                exits.close()

    async def _poll(self) -> AsyncIterator[events_pb2.Event]:
        while True:
            await asyncio.sleep(self.config.proc.interval_s)
            for event in await asyncio.to_thread(lambda: self.scan(Action.START) + self.recheck()):
                yield event

    async def _follow_in_thread(self, reader: Reader) -> AsyncIterator[events_pb2.Event]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[events_pb2.Event] | BaseException] = asyncio.Queue()
        stop = threading.Event()

        def run() -> None:
            try:
                self.follow(reader, lambda events: loop.call_soon_threadsafe(queue.put_nowait, events), stop)
            except Exception as exc:  # handed to the collect loop, which raises it (the runtime restarts it)
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        thread = threading.Thread(target=run, name="proc-connector", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                for event in item:
                    yield event
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)

    # ---- metrics and rules -------------------------------------------------------------------------

    def register_metrics(self, registry: CollectorRegistry) -> None:
        registry.register(_ProcMetrics(self))

    def alerts(self, started: Captured, only: frozenset[str] | None = None) -> list[events_pb2.Event]:
        """Alerts of the rules (rules) for a process that started (or of the `only` ones)."""
        mtime_ns = EXE_ID.unpack(started.exe_id)[2] if started.exe_id is not None else None
        subject = Subject(started.info, started.stdin, started.stdout, self, mtime_ns)
        return [
            self.alert(found.rule, found.summary, found.details, found.severity)
            for found in evaluate(self.config.proc.rules, subject, only)
        ]

    def recheck(self) -> list[events_pb2.Event]:
        """Executables deleted since their process started (a dropper deleting its payload): alert once."""
        alerts = []
        for pid, known in list(self.seen.items()):
            if known.info.exe_deleted or not known.info.exe:
                continue
            if (read_proc(pid, "exe") or b"").endswith(b" (deleted)"):
                known.info.exe_deleted = True
                alerts += self.alerts(known, only=frozenset({"exe_deleted"}))
        return alerts

    # ---- what the rules may ask about other processes (rules.ProcessTable) ---------------------

    def ppid_of(self, pid: int) -> int:
        known = self.seen.get(pid)
        if known is not None:
            return known.info.ppid
        stat = read_stat(pid) if pid > 0 else None
        return stat[1] if stat else 0

    def pipe_peers(self, pipe: str, stdout: bool) -> Iterator[events_pb2.ProcessEvent]:
        for known in (*self.seen.values(), *self.exited):
            if (known.stdout if stdout else known.stdin) == pipe:
                yield known.info


class _ProcMetrics:
    """`amoskys_agent_proc_*`, read from the agent's plain counters at scrape time."""

    def __init__(self, agent: ProcAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        agent = self.agent
        mode = GaugeMetricFamily(
            "amoskys_agent_proc_mode", "1 for how processes are seen: connector (kernel events) or polling",
            labels=["mode"],
        )  # fmt: skip
        for name in ("connector", "polling"):
            mode.add_metric([name], 1 if agent.mode == name else 0)
        yield mode
        for name, text in (
            ("execs", "exec() calls reported from kernel events"),
            ("gone", "Execs reported without some of /proc: the process had exited (their `missing` says what)"),
            ("lost", "Times the kernel dropped process events (socket overflow, ENOBUFS); each is rescanned"),
            ("rejected", "Connector messages refused (cut short, or not sent by the kernel)"),
            ("throttled", "Times the reader used its real-time share of a second and paused for the rest of it"),
        ):
            yield CounterMetricFamily(f"amoskys_agent_proc_{name}", text, value=agent.counts[name])
        missing = CounterMetricFamily(
            "amoskys_agent_proc_missing", "Execs reported without this field: the process had exited", labels=["field"]
        )
        for field in (*EXEC_FIELDS, "euid", "ppid", "exe_sha256"):
            missing.add_metric([field], agent.missing[field])
        yield missing
        yield GaugeMetricFamily(
            "amoskys_agent_proc_reader_realtime", "1 if the reader runs at real-time priority (SCHED_FIFO)",
            value=1 if agent.realtime else 0,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "amoskys_agent_proc_exit_records",
            "1 if the kernel's exit records (taskstats) name the processes reaped before they were read",
            value=1 if agent.exit_records else 0,
        )  # fmt: skip
        yield _read_delay_histogram(agent, HistogramMetricFamily)


def _read_delay_histogram(agent: ProcAgent, family: type[HistogramMetricFamily]) -> HistogramMetricFamily:
    cumulative, total = [], 0
    for bound, count in zip(READ_DELAY_BUCKETS, agent.read_delays, strict=True):
        total += count
        cumulative.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return family(
        "amoskys_agent_proc_read_delay_seconds",
        "From an exec (the kernel's time) to its command line and executable read by the reader",
        buckets=cumulative, sum_value=agent.read_delay_sum_s,
    )  # fmt: skip
