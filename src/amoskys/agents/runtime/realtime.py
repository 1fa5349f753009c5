"""Real-time priority given by the unit, kept for the agent's helper processes only.

A unit may start its agent at real-time priority (proc's drop-in: `CPUSchedulingPolicy=fifo`), which
the agent could not take itself (`RestrictRealtime=yes`). `keep_for_helpers`, called before anything
else, keeps it on one idle thread and makes every other thread a normal task (giving it up is always
allowed); `start_helper` starts a process from that thread, which inherits the priority. Every later
thread of the agent is made by a normal one, so the agent's own work never runs at real-time priority.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["keep_for_helpers", "runs_realtime", "start_helper"]

T = TypeVar("T")
REALTIME_POLICIES = frozenset({os.SCHED_FIFO, os.SCHED_RR})


def runs_realtime(tid: int = 0) -> bool:
    """Whether thread `tid` (0: this one) runs at a real-time policy."""
    return (os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK) in REALTIME_POLICIES


class _Helpers:
    """The one thread still at real-time priority, where the unit gave it."""

    def __init__(self) -> None:
        self.seat: ThreadPoolExecutor | None = None

    def keep(self) -> None:
        """Where the process started at real-time priority: keep it on one thread for `start_helper`, and
        make every other thread a normal task. Does nothing (not even ask) where it did not."""
        if self.seat is not None or not runs_realtime():
            return
        seat = ThreadPoolExecutor(max_workers=1, thread_name_prefix="realtime-helpers")
        seat_tid = seat.submit(threading.get_native_id).result()  # made now, while this thread is real-time
        for task in os.listdir("/proc/self/task"):  # this thread, and any an import started before
            if int(task) != seat_tid:
                with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                    os.sched_setscheduler(int(task), os.SCHED_OTHER, os.sched_param(0))
        self.seat = seat

    def start(self, start: Callable[[], T]) -> T:
        """`start()` (which starts a process) on the real-time thread where there is one, else here."""
        return start() if self.seat is None else self.seat.submit(start).result()


_helpers = _Helpers()
keep_for_helpers = _helpers.keep
start_helper = _helpers.start
