"""Work on the event loop in small steps, taken in turn: no sender's large envelope (and no fan-out of
a large commit) holds the loop for longer than one step, and a small envelope waits for one step of
each other sender, never for their whole backlog.

A job is a generator: each `next()` does a bounded amount of work (a step), its return value is the
job's result. Jobs are queued by key (the sender's identity, or the broker); keys take one step each
in turn, a key's jobs run in order. Between slices of about `SLICE_S` the loop runs everything else.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Generator, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["SLICE_S", "Steps", "Turns", "run_now"]

log = logging.getLogger(__name__)
SLICE_S = 0.002  # the longest the loop runs steps before it runs everything else again
Steps = Generator[None, None, Any]
T = TypeVar("T")


@dataclass(slots=True)
class _Job:
    steps: Steps
    future: asyncio.Future[Any] = field(repr=False)


class Turns:
    def __init__(self, slice_s: float = SLICE_S) -> None:
        self.slice_s = slice_s
        self._queues: dict[Hashable, collections.deque[_Job]] = {}  # insertion order: whose turn is next
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.busy_s = 0.0  # time spent taking steps, in all (the hub's loop watcher reads how fast it grows)

    def has(self, key: Hashable) -> bool:
        """Whether `key` has jobs queued (a job of its run now would overtake them)."""
        return key in self._queues

    @property
    def waiting(self) -> int:
        """Jobs queued (those of every key)."""
        return sum(len(jobs) for jobs in self._queues.values())

    def add(self, key: Hashable, steps: Steps) -> asyncio.Future[Any]:
        """Queue a job behind `key`'s others; the future gets its result (or its exception)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            steps.close()
            future.cancel()
            return future
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._serve(), name="turns")
        self._queues.setdefault(key, collections.deque()).append(_Job(steps, future))
        self._ready.set()
        return future

    async def stop(self) -> None:
        """Stop taking steps; jobs not finished (and any added later) get CancelledError."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for jobs in self._queues.values():
            for job in jobs:
                job.steps.close()
                job.future.cancel()
        self._queues.clear()

    async def _serve(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._queues:
                self._slice()
                await asyncio.sleep(0)  # everything else that is ready runs before the next slice

    def _slice(self) -> None:
        """Steps in turn for about `slice_s` (at least one)."""
        started = time.perf_counter()
        deadline = started + self.slice_s
        try:
            self._steps_until(deadline)
        finally:
            self.busy_s += time.perf_counter() - started

    def _steps_until(self, deadline: float) -> None:
        while self._queues:
            key = next(iter(self._queues))
            jobs = self._queues.pop(key)
            self._step(jobs)
            if jobs:
                self._queues[key] = jobs  # to the back of the line
            if time.perf_counter() >= deadline:
                return

    @staticmethod
    def _step(jobs: collections.deque[_Job]) -> None:
        job = jobs[0]
        try:
            next(job.steps)
            return
        except StopIteration as done:
            result, error = done.value, None
        except Exception as exc:  # handed to whoever awaits the job
            log.exception("a queued job failed")
            result, error = None, exc
        jobs.popleft()
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)


def run_now(steps: Generator[None, None, T]) -> T:
    """Take every step of a job at once and return its result (for a job of about one step)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: T = done.value
            return result
