"""proc: processes that start and exit, with who ran what, from where, and three alert rules.

At start every running process is reported once (`SNAPSHOT`); then each scan (every
`proc.interval_s`) reports `START` and `EXIT`. Command lines have obvious secrets masked, and
executables are hashed (SHA-256, cached by device + inode + mtime, up to `proc.hash_max_bytes`).

Rules (alert events): `proc.exe_deleted` (the executable was deleted while running),
`proc.exe_in_tmp` (it runs from /tmp, /dev/shm or /var/tmp), `proc.shell_from_daemon` (a shell
whose parent is a network-facing daemon named in `proc.network_daemons`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from amoskys.agents.base import Agent
from amoskys.config import AgentConfig
from amoskys.v1 import events_pb2

__all__ = ["ProcAgent", "mask_cmdline"]

Action = events_pb2.ProcessEvent.Action
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "fish", "csh", "tcsh", "ash", "busybox"})
SECRET_FLAG = re.compile(r"^--?(password|passwd|pass|pwd|secret|token|api[-_]?key|access[-_]?key|auth)(=.*)?$", re.I)
SECRET_ASSIGN = re.compile(
    r"^([A-Za-z0-9_.-]*(password|passwd|secret|token|api[-_]?key|access[-_]?key)[A-Za-z0-9_]*)=.+$", re.I
)
URL_CREDENTIALS = re.compile(r"(://[^/:@\s]+:)[^@\s]+@")
CONTAINER_ID = re.compile(r"([0-9a-f]{64})")
MASK = "***"


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


@dataclass(slots=True)
class Seen:
    start_ns: int
    event: events_pb2.ProcessEvent


class ProcAgent(Agent):
    kind = "proc"

    def __init__(self, config: AgentConfig, state_dir: Path) -> None:
        super().__init__(config, state_dir)
        self.seen: dict[int, Seen] = {}
        self.hashes: dict[tuple[int, int, int], str] = {}

    # ---- reading one process --------------------------------------------------------------------

    def _hash(self, exe: str) -> str:
        try:
            st = os.stat(exe)
        except OSError:
            return ""
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        if key not in self.hashes:
            if st.st_size > self.config.proc.hash_max_bytes:
                return ""
            digest = hashlib.sha256()
            try:
                with open(exe, "rb") as handle:
                    while chunk := handle.read(1 << 20):
                        digest.update(chunk)
            except OSError:
                return ""
            self.hashes[key] = digest.hexdigest()
        return self.hashes[key]

    @staticmethod
    def _exe(pid: int) -> tuple[str, bool]:
        try:
            link = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return "", False
        deleted = link.endswith(" (deleted)")
        return link.removesuffix(" (deleted)"), deleted

    @staticmethod
    def _cgroup(pid: int) -> tuple[str, str]:
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return "", ""
        path = text.strip().splitlines()[-1].split(":", 2)[-1] if text.strip() else ""
        match = CONTAINER_ID.search(text)
        return path, match.group(1) if match else ""

    def describe(self, proc: psutil.Process) -> events_pb2.ProcessEvent | None:
        """A ProcessEvent for a live process (None if it vanished while we looked)."""
        try:
            with proc.oneshot():
                info = events_pb2.ProcessEvent(
                    pid=proc.pid, ppid=proc.ppid(), name=proc.name(), cmdline=mask_cmdline(proc.cmdline()),
                    uid=proc.uids().real, start_time_ns=int(proc.create_time() * 1e9),
                )  # fmt: skip
                try:
                    info.user = proc.username()
                except (KeyError, psutil.Error):
                    info.user = str(info.uid)
                try:
                    info.parent_name = psutil.Process(info.ppid).name() if info.ppid else ""
                except psutil.Error:
                    info.parent_name = ""
        except psutil.Error:
            return None
        info.exe, info.exe_deleted = self._exe(proc.pid)
        info.cgroup, info.container_id = self._cgroup(proc.pid)
        if info.exe and not info.exe_deleted:
            info.exe_sha256 = self._hash(info.exe)
        return info

    # ---- scanning ---------------------------------------------------------------------------------

    def scan(self, action: int) -> list[events_pb2.Event]:
        """Compare the process table with the last scan; return events (and alerts) for changes."""
        current: dict[int, int] = {}
        events: list[events_pb2.Event] = []
        for proc in psutil.process_iter():
            try:
                start_ns = int(proc.create_time() * 1e9)
            except psutil.Error:
                continue
            current[proc.pid] = start_ns
            known = self.seen.get(proc.pid)
            if known is not None and known.start_ns == start_ns and not self._execed(proc, known):
                continue
            if known is not None:  # pid reused, or exec(): the old program is gone
                events.append(self._exit(proc.pid, known))
            info = self.describe(proc)
            if info is None:
                continue
            info.action = action  # type: ignore[assignment]
            self.seen[proc.pid] = Seen(start_ns, info)
            alerts = self.rules(info)
            severity = events_pb2.SEVERITY_WARNING if alerts else events_pb2.SEVERITY_INFO
            events.append(self.event(severity, process=info))
            events += alerts
        for pid in [pid for pid in self.seen if pid not in current]:
            events.append(self._exit(pid, self.seen.pop(pid)))
        return events

    @staticmethod
    def _execed(proc: psutil.Process, known: Seen) -> bool:
        """Same pid and start time but another program: the process called exec()."""
        try:
            return proc.name() != known.event.name
        except psutil.Error:
            return False

    def _exit(self, pid: int, known: Seen) -> events_pb2.Event:
        info = events_pb2.ProcessEvent()
        info.CopyFrom(known.event)
        info.action = Action.EXIT
        return self.event(process=info)

    def rules(self, info: events_pb2.ProcessEvent) -> list[events_pb2.Event]:
        alerts = []
        where = {"pid": str(info.pid), "exe": info.exe, "user": info.user}
        if info.exe_deleted:
            alerts.append(self.alert("proc.exe_deleted", f"{info.name} ({info.pid}) runs a deleted executable", where))
        if any(info.exe == d or info.exe.startswith(d.rstrip("/") + "/") for d in self.config.proc.suspicious_dirs):
            alerts.append(self.alert("proc.exe_in_tmp", f"{info.name} ({info.pid}) runs from {info.exe}", where))
        if info.name in SHELLS and info.parent_name in self.config.proc.network_daemons:
            summary = f"shell {info.name} ({info.pid}) started by {info.parent_name}"
            details = {**where, "parent": info.parent_name, "ppid": str(info.ppid)}
            alerts.append(self.alert("proc.shell_from_daemon", summary, details, events_pb2.SEVERITY_ERROR))
        return alerts

    async def collect(self) -> AsyncIterator[events_pb2.Event]:
        action = Action.SNAPSHOT
        while True:
            for event in await asyncio.to_thread(self.scan, action):
                yield event
            action = Action.START
            await asyncio.sleep(self.config.proc.interval_s)
