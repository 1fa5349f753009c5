"""The agent's side of the process-event reader: the reader started, its frames read, it stopped.

The reader itself (`connector.run_reader`: its `serve`) reads the kernel's process events and each
exec's /proc at once. Where it may take real-time priority it is a process of its own
(`connector.reader_command`), apart from the agent's GIL: a real-time thread would still wait for
the GIL held by a normal one. Where it may not (the default unit, without the real-time drop-in) it
is a thread of the agent: as a normal task a process of its own read no more short-lived execs than a
thread does (BENCHMARKS.md, proc), and it cost a second interpreter (12 MB RSS).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import subprocess
import sys
import threading
from typing import IO

from amoskys.agents.proc.connector import (
    ConnectorError,
    FrameDecoder,
    ProcConnector,
    Received,
    reader_command,
    realtime_refusal,
    run_reader,
)

__all__ = ["Reader"]

PIPE_BYTES = 1 << 20  # the pipe from the reader holds a burst while the agent is busy (1 MiB: Linux's default cap)
READ_BYTES = 1 << 16  # taken from the pipe at a time, into one buffer (a larger one would stay resident)
STOP_TIMEOUT_S = 5.0
# A reader thread waits for the GIL at each wake-up: at most this long (Python's default, 5 ms, is
# ten times the life of a short process's command line).
THREAD_SWITCH_INTERVAL_S = 0.0002


class Reader:
    """The reader for an open connector (a process, or a thread where real-time is refused); `take`
    returns what it reported."""

    def __init__(self, listening: ProcConnector, realtime_share: float) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.thread: threading.Thread | None = None
        self._switch_interval = sys.getswitchinterval()
        if realtime_refusal(realtime_share):
            self.control, self.frames = self._start_thread(listening.fileno(), realtime_share)
        else:
            self.control, self.frames = self._start_process(listening.fileno(), realtime_share)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.frames.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self.buffer = bytearray(READ_BYTES)
        self.decoder = FrameDecoder()

    def _start_process(self, fd: int, realtime_share: float) -> tuple[IO[bytes], IO[bytes]]:
        self.process = subprocess.Popen(
            reader_command(fd, realtime_share), stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(fd,),
            bufsize=0, start_new_session=True,  # a terminal's ^C goes to the agent, which stops the reader
        )  # fmt: skip
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        return self.process.stdin, self.process.stdout

    def _start_thread(self, fd: int, realtime_share: float) -> tuple[IO[bytes], IO[bytes]]:
        control_in, control_out = os.pipe()
        frames_in, frames_out = os.pipe()
        sock = os.dup(fd)  # the reader closes its own when it ends

        def run() -> None:
            try:
                run_reader(sock, realtime_share, control_in, frames_out)
            finally:
                os.close(control_in)
                os.close(frames_out)  # the agent's `take` sees the end

        sys.setswitchinterval(THREAD_SWITCH_INTERVAL_S)
        self.thread = threading.Thread(target=run, name="proc-reader", daemon=True)
        self.thread.start()
        return open(control_out, "wb", buffering=0), open(frames_in, "rb", buffering=0)

    @property
    def pid(self) -> int:
        """The reader's process id, or its thread's (a task id: sched_getscheduler takes either)."""
        if self.process is not None:
            return self.process.pid
        assert self.thread is not None
        assert self.thread.native_id is not None
        return self.thread.native_id

    def take(self, timeout: float) -> list[Received]:
        """What the reader reported within `timeout` seconds ([] if nothing); ConnectorError if it ended."""
        if not select.select([self.frames], [], [], timeout)[0]:
            return []
        size = os.readv(self.frames.fileno(), [self.buffer])
        if not size:
            raise ConnectorError(errno.EPIPE, f"the process-event reader ended ({self._ending()})")
        return self.decoder.feed(memoryview(self.buffer)[:size])

    def _ending(self) -> str:
        if self.process is not None:
            return f"exit status {self.process.wait()}"
        return "its thread stopped"

    def close(self) -> None:
        """Stop the reader (its control pipe closed: it sees the end) and wait for it."""
        self.control.close()
        if self.process is not None:
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.thread is not None:
            self.thread.join()
            sys.setswitchinterval(self._switch_interval)
        self.frames.close()
