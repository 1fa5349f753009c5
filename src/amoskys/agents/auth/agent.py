"""auth: logins, sudo, su, account changes and sessions from auth.log (or the journal).

Events carry the log's own time (lines.py). The position (the stream's inode and first bytes, and
the offset of the last complete line; or the journal cursor) and the brute-force windows are saved
in the outbox in the same transaction as the events they produced, so a restart or kill -9 neither
loses nor repeats a line nor resets a window. Rotation by rename (the old file is read to its end
first) and by copytruncate (the rest of the old content is read from the rotated copy) are followed,
also across a stop. `auth.brute_force` fires when one address fails `brute_force_failures` times
within `brute_force_window_s` of event time (brute.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from amoskys.agents.auth.brute import BruteForce, Burst
from amoskys.agents.auth.config import AuthAgentConfig
from amoskys.agents.auth.lines import ParsedLine, parse_line, parse_message
from amoskys.agents.runtime.base import Agent
from amoskys.errors import AmoskysError, ConfigError
from amoskys.v1 import events_pb2

__all__ = ["AuthAgent", "JournalError", "LogFollower", "Position", "journal_entry"]

log = logging.getLogger(__name__)
POLL_S = 0.25
READ_CHUNK = 1 << 20
HEAD_BYTES = 128
COMPRESSED = (".gz", ".xz", ".bz2", ".zst", ".lz4")
Kind = events_pb2.AuthEvent.Kind


class JournalError(AmoskysError):
    """journalctl stopped: the runtime counts it and restarts the collector, which resumes at the cursor."""


class Position(NamedTuple):
    """Where the agent is in the log: the stream (first file's inode and first bytes) and the offset in it.

    The first bytes tell a truncation followed by a rewrite longer than the offset (copytruncate, then
    a burst) from an append, and find the rest of the stream in the rotated copy, whatever its inode.
    """

    inode: int = 0
    offset: int = 0
    head: bytes = b""  # up to HEAD_BYTES of the stream's start

    def text(self) -> str:
        return f"{self.inode}:{self.offset}:{self.head.hex()}"

    @classmethod
    def parse(cls, text: str) -> Position:
        """`text()` back (also the older `inode:offset`); ValueError when it is not one."""
        if not text:
            return cls()
        inode, offset, head = [*text.split(":"), ""][:3]
        return cls(int(inode), int(offset), bytes.fromhex(head))


class LogFollower:
    """Complete lines of one log path across rotations (rename or copytruncate), with a resumable Position."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: BinaryIO | None = None
        self.position = Position()  # replaced whole, never mutated: checkpoint() reads it from another thread
        self.draining = False  # the handle is a rotated file holding the rest of the stream

    def restore(self, position: Position) -> None:
        self.position = position

    def advance(self, offset: int) -> None:
        self.position = self.position._replace(offset=offset)

    def read_lines(self) -> list[tuple[str, int]]:
        """New complete lines with the offset just past each; follows rotation and truncation."""
        if self.handle is None and not self._open():
            return []
        assert self.handle is not None
        if not self._holds_stream(self.handle):
            self._lost_stream()  # truncated, or truncated and rewritten past our offset
        lines = self._read_complete()
        if lines and not self._holds_stream(self.handle):  # truncated while we read: take them from the copy
            self._lost_stream()
            lines = self._read_complete()
        if not lines and self.handle is not None and self._stream_ended():
            self._start_new()
            lines = self._read_complete()
        return lines

    def _open(self) -> bool:
        """First open, or after a restart: the file holding the rest of the saved stream, else a new stream."""
        if not self.position.inode:
            return self._start_new()
        for candidate in [self.path, *self._rotated()]:
            handle = self._open_holding(candidate)
            if handle is not None:
                self.handle, self.draining = handle, candidate != self.path
                return True
        if not self.path.exists():
            return False  # wait for it, keeping the saved position
        log.warning(
            "the rest of the log before the last rotation is gone (no uncompressed rotated copy); going on",
            extra={"path": str(self.path), "offset": self.position.offset},
        )
        return self._start_new()

    def _open_holding(self, candidate: Path) -> BinaryIO | None:
        try:
            handle = candidate.open("rb")
        except FileNotFoundError:
            return None
        same_file = os.fstat(handle.fileno()).st_ino == self.position.inode
        if (same_file or self.position.head) and self._holds_stream(handle):
            return handle
        handle.close()
        return None

    def _rotated(self) -> list[Path]:
        """Uncompressed rotated copies: auth.log.1, auth.log-20261122, ..."""
        found = self.path.parent.glob(self.path.name + "?*")
        return sorted(p for p in found if not p.name.endswith(COMPRESSED) and p.is_file())

    def _holds_stream(self, handle: BinaryIO) -> bool:
        """This file still holds our stream: it reaches our offset and starts with our first bytes."""
        fd = handle.fileno()
        head = os.pread(fd, HEAD_BYTES, 0)
        known = self.position.head
        if os.fstat(fd).st_size < self.position.offset or head[: len(known)] != known[: len(head)]:
            return False
        if len(head) > len(known):
            self.position = self.position._replace(head=head)
        return True

    def _lost_stream(self) -> None:
        """The open file no longer holds the stream: finish it from the rotated copy, else start afresh."""
        assert self.handle is not None
        copy = None
        if not self.draining and self.position.head:
            copy = next((h for p in self._rotated() if (h := self._open_holding(p)) is not None), None)
        if copy is None:
            log.warning(
                "log truncated and no rotated copy holds the rest; reading the new content",
                extra={"path": str(self.path), "offset": self.position.offset},
            )
            self._start_new()
            return
        self.handle.close()
        self.handle, self.draining = copy, True

    def _stream_ended(self) -> bool:
        """At the end of the stream's content: a drained copy, or a renamed file with a new one in its place."""
        assert self.handle is not None
        if self.draining:
            return True
        try:
            return self.path.stat().st_ino != os.fstat(self.handle.fileno()).st_ino
        except FileNotFoundError:
            return False  # renamed, not yet recreated: its writer may still append

    def _start_new(self) -> bool:
        """Follow the file now at the path from its start, as a new stream."""
        self.close()
        try:
            self.handle = self.path.open("rb")  # PermissionError surfaces to the caller
        except FileNotFoundError:
            return False
        inode = os.fstat(self.handle.fileno()).st_ino
        self.position = Position(inode, 0, os.pread(self.handle.fileno(), HEAD_BYTES, 0))
        return True

    def _read_complete(self) -> list[tuple[str, int]]:
        """Complete lines from the offset; a line longer than READ_CHUNK comes in pieces of that size."""
        if self.handle is None:
            return []
        data = os.pread(self.handle.fileno(), READ_CHUNK, self.position.offset)
        if b"\n" not in data and len(data) == READ_CHUNK:
            return [(data.decode("utf-8", "replace"), self.position.offset + len(data))]
        lines, offset = [], self.position.offset
        for raw in data.split(b"\n")[:-1]:  # the last piece is incomplete (or empty)
            offset += len(raw) + 1
            lines.append((raw.decode("utf-8", "replace"), offset))
        return lines

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        self.draining = False


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


class AuthAgent(Agent[AuthAgentConfig]):
    kind = "auth"
    config_type = AuthAgentConfig

    def __init__(self, config: AuthAgentConfig, state_dir: Path) -> None:
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
        return state | {"auth.position": self.follower.position.text()}

    def restore(self, state: dict[str, str]) -> None:
        self.cursor = state.get("auth.cursor", "")
        try:
            self.follower.restore(Position.parse(state.get("auth.position", "")))
            self.brute_force.load(state.get("auth.brute_force", '{"attempts":{},"connections":{}}'))
        except ValueError as exc:
            log.warning("saved auth state unreadable; starting that part afresh", extra={"error": str(exc)})

    def reload(self, config: AuthAgentConfig) -> None:
        super().reload(config)
        self.brute_force.threshold = config.auth.brute_force_failures
        self.brute_force.window_ns = int(config.auth.brute_force_window_s * 1e9)

    def events_for(self, parsed: ParsedLine) -> Iterator[events_pb2.Event]:
        """The line's events (N for "message repeated N times", one by one), stamped with the log's own time."""
        ts_ns = parsed.ts_ns or time.time_ns()
        for _ in range(parsed.repeats):  # the window takes each before its event goes: a checkpoint then has it
            burst = self.brute_force.observe(parsed.auth.src_ip, parsed.auth.pid, parsed.failures, ts_ns)
            yield self._at(ts_ns, self.event(parsed.severity, auth=parsed.auth))
            if burst:
                yield self._at(ts_ns, self._alert(burst, parsed.auth.user))

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
                self.follower.advance(offset)  # the position moves with each line, before its events
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
