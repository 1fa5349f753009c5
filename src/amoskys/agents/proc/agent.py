"""proc: every process start (exec) and exit as the kernel reports it, with who ran what and from where.

At start every running process is reported once (`SNAPSHOT`). Then the kernel's process-event
connector (`connector`) says when a process calls exec(), exits, or changes its uid/gid;
on each exec the agent reads /proc at once (exe, command line, cwd, uids, parent, cgroup), and a
process that was already gone is still reported (`gone`, with the pid and ppid the kernel gave).
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
import collections
import hashlib
import logging
import os
import pwd
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING

from amoskys.agents.proc.config import ProcAgentConfig
from amoskys.agents.proc.connector import (
    ConnectorUnavailable,
    EventsLost,
    Exec,
    Exit,
    Fork,
    IdChange,
    KernelEvent,
    MalformedMessage,
    ProcConnector,
    monotonic_to_wall_ns,
)
from amoskys.agents.proc.rules import Subject, evaluate
from amoskys.agents.runtime.base import Agent
from amoskys.v1 import events_pb2

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

__all__ = ["ProcAgent", "mask_cmdline"]

log = logging.getLogger(__name__)
Action = events_pb2.ProcessEvent.Action
SECRET_FLAG = re.compile(r"^--?(password|passwd|pass|pwd|secret|token|api[-_]?key|access[-_]?key|auth)(=.*)?$", re.I)
SECRET_ASSIGN = re.compile(
    r"^([A-Za-z0-9_.-]*(password|passwd|secret|token|api[-_]?key|access[-_]?key)[A-Za-z0-9_]*)=.+$", re.I
)
URL_CREDENTIALS = re.compile(r"(://[^/:@\s]+:)[^@\s]+@")
CONTAINER_ID = re.compile(r"([0-9a-f]{64})")
MASK = "***"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RECENT_EXITS = 256  # exited processes the rules may still ask about (the other end of a pipe)
HASH_CACHE_MAX = 4096  # executables' digests kept (about 0.5 MB); then the cache starts over
READ_MAX = 65536  # of a /proc file: a longer command line is cut there
DRAIN_MAX = 2000  # datagrams read (and their processes captured) before the batch is enriched and yielded
# The reader needs the GIL within a millisecond of an exec (a short process is gone after that); by
# default a waiting thread gets it only after 5 ms of another thread's Python (publishing, say).
GIL_SWITCH_S = 0.0002
READ_TIMEOUT_S = 0.5  # how often the connector thread looks whether it should stop
Deliver = Callable[[list[events_pb2.Event]], object]


def mask_cmdline(argv: list[str]) -> list[str]:
    """Mask the values of password/token-like flags and assignments, and passwords in URLs."""
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


# ---- reading /proc: the fast part runs while a short-lived process may still be there -------------


def _read(path: str) -> bytes | None:
    """A small /proc file in one read (os.read: a third of the cost of open().read())."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, READ_MAX)
    except OSError:
        return None
    finally:
        os.close(fd)


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def read_stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, start time in clock ticks since boot) from /proc/PID/stat; None if gone."""
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    close = raw.rfind(b")")  # comm may itself contain ')' and spaces
    fields = raw[close + 2 :].split()
    return raw[raw.find(b"(") + 1 : close].decode(errors="replace"), int(fields[1]), int(fields[19])


def _ids(status: bytes | None) -> tuple[int, int, int, int]:
    """(uid, euid, gid, egid) from /proc/PID/status (-1 each if unreadable)."""
    found = {b"Uid:": (-1, -1), b"Gid:": (-1, -1)}
    for line in (status or b"").splitlines():
        key = line[:4]
        if key in found:
            parts = line.split()
            found[key] = (int(parts[1]), int(parts[2]))
    return (*found[b"Uid:"], *found[b"Gid:"])


def _cgroup(pid: int) -> tuple[str, str]:
    text = (_read(f"/proc/{pid}/cgroup") or b"").decode(errors="replace").strip()
    path = text.splitlines()[-1].split(":", 2)[-1] if text else ""
    match = CONTAINER_ID.search(text)
    return path, match.group(1) if match else ""


def _boot_time_ns() -> int:
    for line in (_read("/proc/stat") or b"").splitlines():
        if line.startswith(b"btime "):
            return int(line.split()[1]) * 10**9
    return 0


@dataclass(slots=True)
class Captured:
    """What /proc said about one process: its event (not yet enriched) and what identifies it."""

    info: events_pb2.ProcessEvent
    start_ticks: int
    stdin: str  # where fd 0 points, e.g. "socket:[1234]" or "/dev/pts/0"
    stdout: str
    observed_ns: int  # CLOCK_MONOTONIC when read (a kernel event older than this is already included)


First = tuple[bytes, str, tuple[str, int, int] | None]  # command line, exe link, stat
Received = tuple[KernelEvent, First | None] | Exception  # what the reader thread queues


def capture_first(pid: int) -> First:
    """What a process loses first when it exits, read on each exec at once: its command line and
    executable, then its stat (name, ppid, start), which stays until its parent reaps it."""
    return _read(f"/proc/{pid}/cmdline") or b"", _readlink(f"/proc/{pid}/exe"), read_stat(pid)


def capture(pid: int, first: First | None = None) -> Captured | None:
    """Read a process from /proc (no hashing, no name lookups); None if it is gone.

    `first` is what `capture_first` read right after the exec.
    """
    cmdline, link, stat = first or capture_first(pid)
    if stat is None and not link:
        return None
    # Reaped before its stat was read: the executed file's name is its comm (but for a symlink's).
    name, ppid, start_ticks = stat or (os.path.basename(link.removesuffix(" (deleted)"))[:15], 0, 0)
    stdin, stdout = _readlink(f"/proc/{pid}/fd/0"), _readlink(f"/proc/{pid}/fd/1")
    uid, euid, gid, egid = _ids(_read(f"/proc/{pid}/status"))
    info = events_pb2.ProcessEvent(
        pid=pid, ppid=ppid, name=name, exe=link.removesuffix(" (deleted)"), exe_deleted=link.endswith(" (deleted)"),
        cmdline=mask_cmdline(cmdline.decode(errors="replace").split("\0")[:-1]),
        cwd=_readlink(f"/proc/{pid}/cwd"), uid=uid, euid=euid, gid=gid, egid=egid,
    )  # fmt: skip
    info.cgroup, info.container_id = _cgroup(pid)
    return Captured(info, start_ticks, stdin, stdout, time.monotonic_ns())


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

    # ---- enriching a captured process -----------------------------------------------------------

    def _hash(self, pid: int, exe: str) -> str:
        """SHA-256 of the running executable (through /proc/PID/exe, else its path), cached."""
        for path in (f"/proc/{pid}/exe", exe):
            try:
                handle = open(path, "rb")  # noqa: SIM115 - closed below, after the cache lookup
            except OSError:
                continue
            with handle:
                st = os.fstat(handle.fileno())
                key = (st.st_dev, st.st_ino, st.st_mtime_ns)
                if key not in self.hashes:
                    if st.st_size > self.config.proc.hash_max_bytes:
                        return ""
                    if len(self.hashes) >= HASH_CACHE_MAX:
                        self.hashes.clear()
                    try:
                        self.hashes[key] = hashlib.file_digest(handle, "sha256").hexdigest()
                    except OSError:
                        return ""
                return self.hashes[key]
        return ""

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
        if info.exe and not info.exe_deleted:
            info.exe_sha256 = self._hash(info.pid, info.exe)
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
            captured = capture(pid)
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

    def on_kernel_events(self, batch: list[tuple[KernelEvent, Captured | None]]) -> list[events_pb2.Event]:
        """Events for a batch of kernel events, each exec with what /proc said right after it."""
        events: list[events_pb2.Event] = []
        for kernel, captured in batch:
            if isinstance(kernel, Exec):
                events += self._on_exec(kernel, captured)
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

    def _on_exec(self, kernel: Exec, captured: Captured | None) -> list[events_pb2.Event]:
        known = self.seen.get(kernel.pid)
        if known is not None and known.observed_ns > kernel.ts_ns:
            return []  # the start-up snapshot read this process after the exec: already reported
        events = [self._exit(self.seen.pop(kernel.pid), monotonic_to_wall_ns(kernel.ts_ns))] if known else []
        self.counts["execs"] += 1
        if captured is None or not captured.info.exe:
            self.counts["gone"] += 1
            captured = self._gone(kernel, captured)
        if not captured.info.ppid:  # read too late for its stat: the kernel's fork event says it
            captured.info.ppid = self.forked.get(kernel.pid, 0)
        captured.info.action = Action.START
        captured.info.start_time_ns = monotonic_to_wall_ns(kernel.ts_ns)
        captured.observed_ns = kernel.ts_ns  # a later exec of this pid is newer than this one, however late read
        self.seen[kernel.pid] = captured
        return events + self._report(self.enrich(captured), captured.info.start_time_ns, captured)

    def _gone(self, kernel: Exec, partial: Captured | None) -> Captured:
        """A process that exited before /proc could be read: what the kernel (and a partial read) gave."""
        if partial is None:
            info = events_pb2.ProcessEvent(pid=kernel.pid, ppid=self.forked.get(kernel.pid, 0), uid=-1)
            partial = Captured(info, 0, "", "", time.monotonic_ns())
        partial.info.gone = True
        return partial

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

    def _read_kernel(self, connector: ProcConnector, queue: SimpleQueue[Received], stop: threading.Event) -> None:
        """The reader thread: kernel events, and each exec's command line, executable and stat read at
        once (a short process is gone a millisecond later). Everything else happens in `follow`."""
        try:
            while not stop.is_set():
                try:
                    kernel_events = connector.read(READ_TIMEOUT_S)
                except (EventsLost, MalformedMessage) as exc:
                    queue.put(exc)
                    continue
                for kernel in kernel_events:
                    queue.put((kernel, capture_first(kernel.pid) if isinstance(kernel, Exec) else None))
        except Exception as exc:  # handed to follow, which raises it
            queue.put(exc)

    def follow(self, connector: ProcConnector, deliver: Deliver, stop: threading.Event) -> None:
        """Kernel events until `stop`: the rest of /proc, rules and events for what the reader thread
        queues; a loss (ENOBUFS) is counted and rescanned; deleted executables rechecked."""
        queue: SimpleQueue[Received] = SimpleQueue()
        reader = threading.Thread(
            target=self._read_kernel, args=(connector, queue, stop), name="proc-kernel-events", daemon=True
        )
        reader.start()
        recheck_at = time.monotonic() + self.config.proc.recheck_s
        try:
            while not stop.is_set():
                if time.monotonic() >= recheck_at:
                    recheck_at = time.monotonic() + self.config.proc.recheck_s
                    deliver(self.recheck())
                self._handle(self._take(queue), deliver)
        finally:
            stop.set()
            reader.join()

    @staticmethod
    def _take(queue: SimpleQueue[Received]) -> list[Received]:
        """What the reader queued: wait a moment for the first item, then take what is there."""
        try:
            items = [queue.get(timeout=READ_TIMEOUT_S)]
        except Empty:
            return []
        while len(items) < DRAIN_MAX:
            try:
                items.append(queue.get_nowait())
            except Empty:
                break
        return items

    def _handle(self, items: list[Received], deliver: Deliver) -> None:
        batch: list[tuple[KernelEvent, Captured | None]] = []
        for item in items:
            if isinstance(item, tuple):
                kernel, first = item
                batch.append((kernel, capture(kernel.pid, first) if isinstance(kernel, Exec) and first else None))
                continue
            deliver(self.on_kernel_events(batch))
            batch = []
            if isinstance(item, EventsLost):
                self.counts["lost"] += 1
                log.warning("proc: the kernel dropped process events (socket overflow); rescanning /proc")
                deliver(self.scan(Action.START))
            elif isinstance(item, MalformedMessage):
                self.counts["rejected"] += 1
                log.warning("proc: kernel message rejected", extra={"error": str(item)})
            else:
                raise item
        if batch:
            deliver(self.on_kernel_events(batch))

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

    async def collect(self) -> AsyncIterator[events_pb2.Event]:
        connector = await asyncio.to_thread(self._open_connector)  # before the snapshot: nothing falls between
        for event in await asyncio.to_thread(self.scan, Action.SNAPSHOT):
            yield event
        events = self._poll() if connector is None else self._follow_in_thread(connector)
        async for event in events:
            yield event

    async def _poll(self) -> AsyncIterator[events_pb2.Event]:
        while True:
            await asyncio.sleep(self.config.proc.interval_s)
            for event in await asyncio.to_thread(lambda: self.scan(Action.START) + self.recheck()):
                yield event

    async def _follow_in_thread(self, connector: ProcConnector) -> AsyncIterator[events_pb2.Event]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[events_pb2.Event] | BaseException] = asyncio.Queue()
        stop = threading.Event()

        def run() -> None:
            try:
                self.follow(connector, lambda events: loop.call_soon_threadsafe(queue.put_nowait, events), stop)
            except Exception as exc:  # handed to the collect loop, which raises it (the runtime restarts it)
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                connector.close()

        sys.setswitchinterval(GIL_SWITCH_S)
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
        subject = Subject(started.info, started.stdin, started.stdout, self)
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
            if _readlink(f"/proc/{pid}/exe").endswith(" (deleted)"):
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
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
            ("gone", "Execs whose process exited before /proc could be read (reported with pid, ppid)"),
            ("lost", "Times the kernel dropped process events (socket overflow, ENOBUFS); each is rescanned"),
            ("rejected", "Connector messages refused (cut short, or not sent by the kernel)"),
        ):
            yield CounterMetricFamily(f"amoskys_agent_proc_{name}", text, value=agent.counts[name])
