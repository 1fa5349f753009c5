"""proc's reader process against the real kernel: its priority, its frames, what it says about processes
that had exited, and the hash only of the file that ran."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from amoskys.agents.proc import connector as connector_module
from amoskys.agents.proc.agent import ProcAgent, missing_fields
from amoskys.agents.proc.connector import (
    DATAGRAM,
    END,
    FRAME,
    PROCFS,
    ConnectorError,
    Exec,
    Exit,
    Fork,
    FrameDecoder,
    MalformedMessage,
    ProcConnector,
    ProcRead,
    ReaderStarted,
    Received,
    Throttled,
    encode_procfs,
    read_procfs,
    reader_command,
)
from amoskys.agents.proc.reader import Reader
from amoskys.v1 import events_pb2
from tests.agents.proc_running import new_agent
from tests.agents.test_proc_connector import message

Action = events_pb2.ProcessEvent.Action
SRC = Path(__file__).resolve().parents[2] / "src"


def take_until(reader: Reader, done: Callable[[list[Received]], bool], timeout: float = 20.0) -> list[Received]:
    items: list[Received] = []
    deadline = time.monotonic() + timeout
    while not done(items):
        assert time.monotonic() < deadline, f"timed out; got {len(items)} items"
        items += reader.take(0.2)
    return items


def reads_of(items: list[Received], pids: set[int]) -> dict[int, ProcRead | None]:
    return {
        k.pid: read for k, read in (i for i in items if isinstance(i, tuple)) if isinstance(k, Exec) and k.pid in pids
    }


def started(items: list[Received]) -> ReaderStarted:
    return next(i for i in items if isinstance(i, ReaderStarted))


def test_the_reader_runs_at_real_time_priority_and_reads_every_exec(connector: ProcConnector) -> None:
    reader = Reader(connector, 0.25)
    try:
        assert started(take_until(reader, lambda items: any(isinstance(i, ReaderStarted) for i in items))) is not None
        assert os.sched_getscheduler(reader.pid) == os.SCHED_FIFO
        pids = set()
        for _ in range(200):
            child = subprocess.Popen(["/bin/true"])
            child.wait()
            pids.add(child.pid)
        reads = reads_of(take_until(reader, lambda items: len(reads_of(items, pids)) == len(pids)), pids)
    finally:
        reader.close()
    assert all(read is not None for read in reads.values())  # each exec came with what /proc still had
    complete = [read for read in reads.values() if read is not None and read.exe is not None]
    assert all(read.cmdline == b"/bin/true\0" and read.exe.endswith(b"/true") for read in complete)
    assert all(read.read_ns > 0 for read in complete)
    print(f"{len(complete)} of 200 with exe and command line")  # a rate: a benchmark figure, not asserted
    assert reader.process.returncode == 0


def kernel_events_of(items: list[Received], pid: int) -> list[object]:
    """The kernel events about process `pid` (its own or its threads') among the reader's items."""
    events = [item[0] for item in items if isinstance(item, tuple)]
    return [e for e in events if (e.child_tgid if isinstance(e, Fork) else getattr(e, "tgid", None)) == pid]


def test_threads_are_left_out_and_their_process_is_not(connector: ProcConnector) -> None:
    code = "import threading\nfor _ in range(20):\n    t = threading.Thread(target=lambda: None); t.start(); t.join()"
    reader = Reader(connector, 0.5)
    try:
        child = subprocess.Popen([sys.executable, "-c", code])
        child.wait()
        items = take_until(reader, lambda items: any(isinstance(e, Exit) for e in kernel_events_of(items, child.pid)))
    finally:
        reader.close()
    events = kernel_events_of(items, child.pid)
    assert [type(event) for event in events] == [Fork, Exec, Exit], events  # none of its 20 threads' forks and exits


def test_the_reader_reads_on_while_the_agent_takes_nothing(connector: ProcConnector) -> None:
    """More frames than the pipe holds wait in the reader: every exec is still read at once, not when
    the agent comes back (a reader blocked on a full pipe would read the later ones only then)."""
    reader = Reader(connector, 0.5)
    try:
        take_until(reader, lambda items: any(isinstance(i, ReaderStarted) for i in items))
        pipe_bytes = fcntl.fcntl(reader.frames.fileno(), fcntl.F_GETPIPE_SZ)
        pids = set()
        for _ in range(3000):
            pid = os.posix_spawn("/bin/true", ["/bin/true"], {})
            os.waitpid(pid, 0)
            pids.add(pid)
        back = time.monotonic_ns()
        items = take_until(reader, lambda items: len(reads_of(items, pids)) == len(pids), timeout=60)
    finally:
        reader.close()
    reads = [read for read in reads_of(items, pids).values() if read is not None]
    assert len(reads) == len(pids)
    assert sum(len(encode_procfs(read)) for read in reads) > pipe_bytes  # more than the pipe could hold
    assert all(read.read_ns < back for read in reads)


def test_over_its_share_the_reader_pauses_for_the_rest_of_the_second(connector: ProcConnector) -> None:
    """Started at real-time priority (the session's agent helpers, as proc's unit gives them), it keeps it:
    once a batch used its share it pauses, then reads what waited in the socket meanwhile."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a helper at real-time priority, as the unit starts it")
    reader = Reader(connector, 1e-9)  # any batch uses more than this: every second it pauses once
    try:
        take_until(reader, lambda items: any(isinstance(i, ReaderStarted) for i in items))
        assert os.sched_getscheduler(reader.pid) == os.SCHED_FIFO
        started_at, throttles, pids, items = time.monotonic(), 0, set(), []
        while time.monotonic() - started_at < 3.0:
            child = subprocess.Popen(["/bin/true"])
            child.wait()
            pids.add(child.pid)
            taken = reader.take(0.05)
            throttles += sum(isinstance(i, Throttled) for i in taken)
            items += taken
        assert 2 <= throttles <= 4  # never more than one per second of execs
        assert os.sched_getscheduler(reader.pid) == os.SCHED_FIFO  # paused, not given up: it could not take it back
        items += take_until(reader, lambda more: len(reads_of(items + more, pids)) == len(pids))
        assert set(reads_of(items, pids)) == pids  # the execs during the pauses were read after them
    finally:
        reader.close()


# The reader started as Reader does, by a stdlib-only probe (connector.py imports nothing else).
RT_PROBE = """
import os, subprocess, sys
sys.path.insert(0, sys.argv[1])
import connector
c = connector.ProcConnector()
reader = subprocess.Popen(connector.reader_command(c.fileno(), -1, float(sys.argv[2])),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(c.fileno(),))
decoder, items = connector.FrameDecoder(), []
while not items:
    items = decoder.feed(os.read(reader.stdout.fileno(), 65536))
print(repr(items[0].realtime_refused), os.sched_getscheduler(reader.pid) == os.SCHED_FIFO)
reader.stdin.close()
reader.wait()
c.close()
"""
UNPRIVILEGED = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--inh-caps", "+net_admin",
                "--ambient-caps", "+net_admin"]  # fmt: skip
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable  # one an unprivileged user can run
NOT_GIVEN = "the unit gives no real-time priority (its drop-in sets CPUSchedulingPolicy=fifo)"


def as_the_unit_runs_proc(
    *, realtime: bool, share: float = 0.25, tracer: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """RT_PROBE as an unprivileged user with CAP_NET_ADMIN, started at SCHED_FIFO 1 (CPUSchedulingPolicy=fifo)
    or as a normal task."""
    policy = ["chrt", "--fifo", "1"] if realtime else []
    probe = [SYSTEM_PYTHON, "-I", "-S", "-c", RT_PROBE, str(Path(connector_module.__file__).parent), str(share)]
    return subprocess.run(
        [*tracer, *policy, *UNPRIVILEGED, *probe], capture_output=True, text=True, check=False, timeout=60
    )


needs_setpriv = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root, setpriv")


@needs_setpriv
def test_started_at_real_time_priority_the_reader_keeps_it() -> None:
    result = as_the_unit_runs_proc(realtime=True)
    assert result.stdout.strip() == "'' True", result


@needs_setpriv
def test_without_its_share_the_reader_gives_real_time_up_and_says_why() -> None:
    result = as_the_unit_runs_proc(realtime=True, share=0)
    assert result.stdout.strip() == "'proc.realtime_share is 0' False", result


@needs_setpriv
def test_started_as_a_normal_task_the_reader_says_so_and_reads_on() -> None:
    result = as_the_unit_runs_proc(realtime=False)
    assert result.stdout.strip() == f"{NOT_GIVEN!r} False", result


@needs_setpriv
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_started_as_a_normal_task_the_reader_does_not_call_sched_setscheduler(tmp_path: Path) -> None:
    """The unit without its real-time drop-in denies sched_setscheduler (SystemCallFilter=~@resources): a
    process that calls it is killed (SIGSYS), so the reader must not call it, even with no share."""
    trace = tmp_path / "syscalls"
    tracer = ["strace", "--follow-forks", "--quiet=all", "--trace=sched_setscheduler", f"--output={trace}"]
    result = as_the_unit_runs_proc(realtime=False, share=0, tracer=tracer)
    assert result.returncode == 0 and result.stdout.endswith("False\n"), result
    assert "sched_setscheduler" not in trace.read_text()


def test_the_reader_ends_when_the_agent_is_killed(tmp_path: Path) -> None:
    probe = (
        "import sys, time\nfrom amoskys.agents.proc.connector import ProcConnector\n"
        "from amoskys.agents.proc.reader import Reader\n"
        "c = ProcConnector(); r = Reader(c, 0.25); print(r.pid, flush=True); time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    agent = subprocess.Popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert agent.stdout is not None
        reader_pid = int(agent.stdout.readline())
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{reader_pid}").exists() and b") Z " not in Path(f"/proc/{reader_pid}/stat").read_bytes():
        assert time.monotonic() < deadline, "the reader outlived the agent"
        time.sleep(0.05)


def test_a_reader_that_fails_says_why_and_exits_with_an_error() -> None:
    """The reader given something that is no socket: a FAILED frame naming the error, then status 1."""
    read_end, write_end = os.pipe()
    try:
        result = subprocess.run(
            reader_command(read_end, -1, 0.25), pass_fds=(read_end,),
            capture_output=True, stdin=subprocess.DEVNULL, check=False, timeout=60,
        )  # fmt: skip
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.returncode == 1, result
    (failure,) = FrameDecoder().feed(result.stdout)
    assert isinstance(failure, ConnectorError) and "the process-event reader failed: OSError" in str(failure)


# ---- the frames ------------------------------------------------------------------------------------


def frame(kind: int, payload: bytes = b"") -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


def test_frames_give_a_batch_only_when_it_is_complete_with_each_exec_and_its_read() -> None:
    read = ProcRead(7, 123, 456, b"/bin/true\0", b"/usr/bin/true", None, b"/dev/null", None, b"/", b"", b"", b"0::/")
    stream = (
        frame(DATAGRAM, message(0x1, struct.pack("=iiii", 1, 1, 7, 7)))
        + frame(DATAGRAM, message(0x2, struct.pack("=ii", 7, 7)))
        + frame(DATAGRAM, message(0x2, struct.pack("=ii", 8, 8)))  # another exec: its read did not come
        + frame(PROCFS, encode_procfs(read))
        + frame(END)
    )
    decoder = FrameDecoder()
    got = [item for byte in range(len(stream)) for item in decoder.feed(stream[byte : byte + 1])]
    fork, exec7, exec8 = got
    assert isinstance(fork, tuple) and fork[1] is None
    assert exec7 == (Exec(123, 7, 7), read)
    assert exec8 == (Exec(123, 8, 8), None)
    assert decoder.feed(b"") == [] and not decoder.buffer


@pytest.mark.parametrize(
    ("stream", "error", "text"),
    [
        (FRAME.pack(DATAGRAM, 2 << 20), ConnectorError, "reader frame of 2097152 bytes: the stream is corrupt"),
        (frame(99) + frame(END), ConnectorError, "unknown reader frame kind 99"),
        (frame(PROCFS, b"\0" * 5), MalformedMessage, "shorter than its header"),
        (frame(PROCFS, struct.pack("=iQQ", 7, 1, 1) + struct.pack("=i", 50) + b"x"), MalformedMessage, "overruns"),
        (frame(PROCFS, struct.pack("=iQQ", 7, 1, 1) + struct.pack("=i", -1)), MalformedMessage, "cut short"),
    ],
    ids=["oversized", "unknown-kind", "cut-procfs-header", "field-overruns", "fields-missing"],
)
def test_a_corrupt_frame_stream_is_an_error_that_says_what_is_wrong(
    stream: bytes, error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=text):
        FrameDecoder().feed(stream)


def test_a_cut_kernel_datagram_in_a_frame_is_a_rejected_message_not_a_crash() -> None:
    (rejected,) = FrameDecoder().feed(frame(DATAGRAM, message(0x2, b"")[:30]) + frame(END))
    assert isinstance(rejected, MalformedMessage)


# ---- what is missing, and the hash of what ran -------------------------------------------------------


@pytest.fixture
def zombie() -> Iterator[int]:
    """A child that exited and was not reaped: /proc keeps its stat, status and cgroup, not its memory."""
    child = subprocess.Popen(["/bin/true"])
    try:
        deadline = time.monotonic() + 10
        while b") Z " not in Path(f"/proc/{child.pid}/stat").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield child.pid
    finally:
        child.wait()


def test_a_process_that_exited_is_reported_with_what_proc_still_had_and_names_the_rest(
    zombie: int, tmp_path: Path
) -> None:
    read = read_procfs(zombie)
    assert (read.cmdline, read.exe, read.exe_id, read.cwd) == (b"", None, None, None)
    assert missing_fields(read) == ["cmdline", "exe", "cwd"]
    agent = new_agent(tmp_path)
    (start,) = [e.process for e in agent.on_kernel_events([(Exec(time.monotonic_ns(), zombie, zombie), read)])]
    assert (start.action, start.pid, start.name, start.ppid, start.uid) == (
        Action.START,
        zombie,
        "true",
        os.getpid(),
        0,
    )
    assert start.gone and list(start.missing) == ["cmdline", "exe", "cwd"]
    assert (start.exe, list(start.cmdline), start.cwd, start.exe_sha256) == ("", [], "", "")
    assert agent.counts["gone"] == 1 and agent.missing["cwd"] == 1


def starts(agent: ProcAgent, read: ProcRead) -> list[events_pb2.ProcessEvent]:
    """The process events (not alerts) for an exec of `read`'s process."""
    events = agent.on_kernel_events([(Exec(read.read_ns, read.pid, read.pid), read)])
    return [e.process for e in events if e.WhichOneof("body") == "process"]


def run_and_reap(program: Path) -> ProcRead:
    """`program` read by /proc while it runs, then ended and reaped."""
    child = subprocess.Popen([str(program), "30"])
    try:
        deadline = time.monotonic() + 10
        while (read := read_procfs(child.pid)).exe != bytes(program):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        child.kill()
        child.wait()
    return read


def test_the_hash_is_of_the_file_that_ran_or_named_missing(tmp_path: Path) -> None:
    program = tmp_path / "payload"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", program)
    agent = new_agent(tmp_path)
    read = run_and_reap(program)  # gone: its path still holds the file that ran
    (start,) = starts(agent, read)
    assert start.exe_sha256 == hashlib.sha256(program.read_bytes()).hexdigest() and not start.gone
    read = run_and_reap(program)
    replacement = tmp_path / "new"
    replacement.write_bytes(b"#!/bin/sh\n")
    replacement.rename(program)  # another file at that path now
    (start,) = starts(agent, read)
    assert start.exe == str(program) and start.exe_sha256 == ""
    assert start.gone and list(start.missing) == ["exe_sha256"]


def test_a_new_binary_that_ran_a_moment_is_still_alerted_on(tmp_path: Path) -> None:
    """proc.new_binary takes the mtime read at the exec: the process is gone when the rules run."""
    program = tmp_path / "dropped"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", program)  # modified now
    agent = new_agent(tmp_path)
    read = run_and_reap(program)
    events = agent.on_kernel_events([(Exec(read.read_ns, read.pid, read.pid), read)])
    rules = [e.alert.rule for e in events if e.WhichOneof("body") == "alert"]
    assert "proc.new_binary" in rules, rules
