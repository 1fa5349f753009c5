"""auth: logins, sudo, su, account changes and sessions from auth.log (or the journal).

The position (inode + offset of the last complete line, or the journal cursor) is saved in the
outbox in the same transaction as the events it produced, so a restart or kill -9 neither loses
nor repeats a line. Rotation by rename (the old file is read to its end first) and by
copytruncate (the file shrinks) are both followed. `auth.brute_force` fires when one address
fails `brute_force_failures` times within `brute_force_window_s`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from amoskys.agents.authbrute import BruteForce, Burst
from amoskys.agents.authlog import ParsedLine, parse_line, parse_message
from amoskys.agents.base import Agent
from amoskys.config import AgentConfig
from amoskys.errors import AmoskysError, ConfigError
from amoskys.v1 import events_pb2

__all__ = ["AuthAgent"]

log = logging.getLogger(__name__)
POLL_S = 0.25
READ_CHUNK = 1 << 20
HEAD_BYTES = 64
Kind = events_pb2.AuthEvent.Kind


class JournalError(AmoskysError):
    """journalctl stopped: the runtime counts it and restarts the collector, which resumes at the cursor."""


class LogFollower:
    """Complete lines of one log path across rotations, with a resumable (inode, offset)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: BinaryIO | None = None
        self.inode = 0
        self.offset = 0
        self.head = b""  # the file's first bytes: a rewrite of the same length changes them

    def restore(self, inode: int, offset: int) -> None:
        self.inode, self.offset = inode, offset

    def _open(self) -> bool:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        if self.inode and st.st_ino != self.inode:
            old = self._find_rotated(self.inode)
            if old is not None:  # rotated while we were away: finish the old file first
                self.handle = old.open("rb")
                self.handle.seek(self.offset)
                return True
            self.offset = 0
        self.handle = self.path.open("rb")  # PermissionError surfaces to the caller
        self.inode = os.fstat(self.handle.fileno()).st_ino
        self.head = self.handle.read(HEAD_BYTES)
        if st.st_size < self.offset:
            self.offset = 0
        self.handle.seek(self.offset)
        return True

    def _find_rotated(self, inode: int) -> Path | None:
        for candidate in sorted(self.path.parent.glob(self.path.name + ".*")):
            try:
                if candidate.stat().st_ino == inode and not candidate.name.endswith(".gz"):
                    return candidate
            except OSError:
                continue
        return None

    def read_lines(self) -> list[tuple[str, int]]:
        """New complete lines with the offset just past each; follows rotation and truncation."""
        if self.handle is None and not self._open():
            return []
        assert self.handle is not None
        lines = self._read_complete()
        if not lines and self._rotated():
            return self.read_lines()
        return lines

    def _read_complete(self) -> list[tuple[str, int]]:
        assert self.handle is not None
        self.handle.seek(self.offset)
        data = self.handle.read(READ_CHUNK)
        end = data.rfind(b"\n")
        if end < 0:
            return []
        lines, offset = [], self.offset
        for raw in data[: end + 1].splitlines(keepends=True):
            offset += len(raw)
            lines.append((raw.decode("utf-8", "replace"), offset))
        return lines

    def _rotated(self) -> bool:
        """At EOF: switch files after a rename, rewind after a truncation; True when something changed."""
        assert self.handle is not None
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        if st.st_ino != os.fstat(self.handle.fileno()).st_ino:
            self.handle.close()
            self.handle, self.inode, self.offset = None, 0, 0
            return self._open()
        self.handle.seek(0)
        head = self.handle.read(HEAD_BYTES)
        if st.st_size < self.offset or head[: len(self.head)] != self.head[: len(head)]:  # copytruncate
            self.offset, self.head = 0, head
            return True
        self.head = head
        return False

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def journal_entry(entry: dict[str, object]) -> ParsedLine | None:
    """A `journalctl -o json` entry, timed by `__REALTIME_TIMESTAMP` (microseconds since the epoch)."""
    message = entry.get("MESSAGE")
    if isinstance(message, list):  # journald writes non-UTF-8 messages as byte arrays
        message = bytes(message).decode("utf-8", "replace")
    if not isinstance(message, str):
        return None
    program = str(entry.get("SYSLOG_IDENTIFIER", ""))
    pid = str(entry.get("_PID", ""))
    realtime = str(entry.get("__REALTIME_TIMESTAMP", ""))
    ts_ns = int(realtime) * 1000 if realtime.isdigit() else 0
    return parse_message(program, int(pid) if pid.isdigit() else 0, message, f"{program}: {message}", ts_ns)


class AuthAgent(Agent):
    kind = "auth"

    def __init__(self, config: AgentConfig, state_dir: Path) -> None:
        super().__init__(config, state_dir)
        settings = config.auth
        self.source = settings.source
        if self.source == "auto":
            self.source = "file" if Path(settings.log_path).exists() or not shutil.which("journalctl") else "journal"
        self.follower = LogFollower(Path(settings.log_path))
        self.cursor = ""
        self.brute_force = BruteForce(settings.brute_force_failures, settings.brute_force_window_s)

    def checkpoint(self) -> dict[str, str]:
        state = {"auth.brute_force": self.brute_force.state()}
        if self.source == "journal":
            return state | ({"auth.cursor": self.cursor} if self.cursor else {})
        return state | {"auth.position": f"{self.follower.inode}:{self.follower.offset}"}

    def restore(self, state: dict[str, str]) -> None:
        self.cursor = state.get("auth.cursor", "")
        inode, _, offset = state.get("auth.position", "0:0").partition(":")
        self.follower.restore(int(inode), int(offset))
        try:
            self.brute_force.load(state.get("auth.brute_force", '{"attempts":{},"connections":{}}'))
        except ValueError as exc:
            log.warning("saved auth state unreadable; starting that part afresh", extra={"error": str(exc)})

    def reload(self, config: AgentConfig) -> None:
        super().reload(config)
        self.brute_force.threshold = config.auth.brute_force_failures
        self.brute_force.window_ns = int(config.auth.brute_force_window_s * 1e9)

    def events_for(self, parsed: ParsedLine) -> list[events_pb2.Event]:
        """The line's events (N for "message repeated N times"), stamped with the log's own time."""
        ts_ns = parsed.ts_ns or time.time_ns()
        events = []
        for _ in range(parsed.repeats):
            events.append(self._at(ts_ns, self.event(parsed.severity, auth=parsed.auth)))
            burst = self.brute_force.observe(parsed.auth.src_ip, parsed.auth.pid, parsed.failures, ts_ns)
            if burst:
                events.append(self._at(ts_ns, self._alert(burst, parsed.auth.user)))
        return events

    @staticmethod
    def _at(ts_ns: int, event: events_pb2.Event) -> events_pb2.Event:
        event.ts_ns = ts_ns
        return event

    def _alert(self, burst: Burst, user: str) -> events_pb2.Event:
        span_s = (burst.last_ns - burst.first_ns) / 1e9
        summary = (
            f"{burst.count} failed login attempts from {burst.address} within {span_s:.0f} s"
            f" (rule: {self.config.auth.brute_force_failures} within {self.config.auth.brute_force_window_s:g} s)"
        )
        details = {
            "src_ip": burst.address, "failures": str(burst.count), "last_user": user,
            "first_ns": str(burst.first_ns), "last_ns": str(burst.last_ns),
        }  # fmt: skip
        return self.alert("auth.brute_force", summary, details, events_pb2.SEVERITY_ERROR)

    async def collect(self) -> AsyncIterator[events_pb2.Event]:
        source = self._journal() if self.source == "journal" else self._file()
        async for event in source:
            yield event

    async def _file(self) -> AsyncIterator[events_pb2.Event]:
        path = self.follower.path
        warned = False
        while True:
            try:
                lines = await asyncio.to_thread(self.follower.read_lines)
            except OSError as exc:
                hint = " (add the agent to the log's group, e.g. adm)" if isinstance(exc, PermissionError) else ""
                raise ConfigError(f"{path}: cannot be read: {exc.strerror}{hint}") from exc
            if not lines and not path.exists() and not warned:
                log.warning("auth log not found; waiting for it", extra={"path": str(path)})
                warned = True
            now_ns = time.time_ns()
            for line, offset in lines:
                self.follower.offset = offset  # the position moves with each line, before its events
                parsed = parse_line(line, now_ns)
                for event in self.events_for(parsed) if parsed else []:
                    yield event
            if not lines:
                await asyncio.sleep(POLL_S)

    async def _journal(self) -> AsyncIterator[events_pb2.Event]:
        args = ["journalctl", "-o", "json", "--follow", "--no-pager"]
        args += [f"--after-cursor={self.cursor}"] if self.cursor else ["--lines=0"]
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        try:
            while line := await proc.stdout.readline():
                entry = json.loads(line)
                self.cursor = entry.get("__CURSOR", self.cursor)
                parsed = journal_entry(entry)
                for event in self.events_for(parsed) if parsed else []:
                    yield event
            code = await proc.wait()
            raise JournalError(f"journalctl exited with status {code}; following the journal again from its cursor")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def close(self) -> None:
        self.follower.close()
