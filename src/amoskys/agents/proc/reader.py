"""The agent's side of the process-event reader: the process started, its frames read, it stopped.

The reader itself (`connector.reader_command`: its `serve`) reads the kernel's process events and
each exec's /proc at once, apart from the agent's GIL and at the real-time priority the unit gave
the agent, where it did: it is started from the agent's thread that kept it (runtime.realtime).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import subprocess

from amoskys.agents.proc.connector import (
    ConnectorError,
    ExitRecords,
    FrameDecoder,
    ProcConnector,
    Received,
    reader_command,
)
from amoskys.agents.runtime.realtime import start_helper

__all__ = ["Reader"]

PIPE_BYTES = 1 << 20  # the pipe from the reader holds a burst while the agent is busy (1 MiB: Linux's default cap)
READ_BYTES = 1 << 16  # taken from the pipe at a time, into one buffer (os.read mapped and unmapped 1 MiB each time)
STOP_TIMEOUT_S = 5.0


class Reader:
    """The reader process for an open connector (and the exit records, where heard); `take` returns
    what it reported."""

    def __init__(self, listening: ProcConnector, realtime_share: float, exits: ExitRecords | None = None) -> None:
        fd, exits_fd = listening.fileno(), -1 if exits is None else exits.fileno()
        self.process = start_helper(
            lambda: subprocess.Popen(
                reader_command(fd, exits_fd, realtime_share),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                pass_fds=(fd,) if exits_fd < 0 else (fd, exits_fd),
                start_new_session=True,  # a terminal's ^C goes to the agent, which stops the reader
            )
        )  # fmt: skip
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.control, self.frames = self.process.stdin, self.process.stdout
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.frames.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self.buffer = bytearray(READ_BYTES)
        self.decoder = FrameDecoder()

    @property
    def pid(self) -> int:
        return self.process.pid

    def take(self, timeout: float) -> list[Received]:
        """What the reader reported within `timeout` seconds ([] if nothing); ConnectorError if it ended."""
        if not select.select([self.frames], [], [], timeout)[0]:
            return []
        size = os.readv(self.frames.fileno(), [self.buffer])
        if not size:
            code = self.process.wait()
            raise ConnectorError(errno.EPIPE, f"the process-event reader exited with status {code}")
        return self.decoder.feed(memoryview(self.buffer)[:size])

    def close(self) -> None:
        """Stop the reader (its control pipe closed: it sees the end) and wait for it."""
        self.control.close()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.frames.close()
