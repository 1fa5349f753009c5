"""The brute-force rule: failed authentication attempts from one address within a window of event time.

Every attempt counts, whatever the user (invalid users, `none` and key-only attempts included). One
attempt often shows as several lines (`Invalid user x`, `Failed password for invalid user x`,
`Connection closed by invalid user x ... [preauth]`), so attempts are counted per connection (sshd's
pid and the address): a connection counts as many attempts as its `Failed ...` lines, and at least
one when anything else shows it failed (`PAM 2 more authentication failures`: at least three).
The state is JSON, saved with the log position, so a restart or kill -9 keeps the windows.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass

from amoskys.agents.auth.lines import Failures

__all__ = ["BruteForce", "Burst"]

NS = 1_000_000_000
CONNECTION_TTL_NS = 600 * NS  # longer than sshd's LoginGraceTime (120 s): a connection's lines are closer
MAX_TRACKED = 10_000  # addresses and connections kept (oldest forgotten first): a botnet cannot grow it


@dataclass(frozen=True, slots=True)
class Burst:
    """The rule fired: `count` attempts from `address` between `first_ns` and `last_ns`."""

    address: str
    count: int
    first_ns: int
    last_ns: int


class BruteForce:
    def __init__(self, threshold: int, window_s: float) -> None:
        self.threshold = threshold
        self.window_ns = int(window_s * NS)
        self.attempts: dict[str, list[int]] = {}  # address -> attempt times (ns), sorted
        self.connections: dict[str, list[int]] = {}  # "pid address" -> [counted, failed lines, last seen ns]
        self._saved: str | None = None

    def observe(self, address: str, pid: int, failures: Failures, ts_ns: int) -> Burst | None:
        """Take one line's failures; a Burst when the address reaches the threshold within the window."""
        if not address or not (failures.new or failures.at_least):
            return None
        self._saved = None
        connection = self.connections.pop(f"{pid} {address}", [0, 0, ts_ns])
        counted, failed, seen = connection
        failed += failures.new
        total = max(counted, failed, failures.at_least)
        self.connections[f"{pid} {address}"] = [total, failed, max(seen, ts_ns)]  # re-inserted: newest last
        times = self.attempts.pop(address, [])
        for _ in range(total - counted):
            bisect.insort(times, ts_ns)
        times = times[bisect.bisect_left(times, times[-1] - self.window_ns) :] if times else times
        self.attempts[address] = times
        self._bound(ts_ns)
        recent = times[bisect.bisect_left(times, ts_ns - self.window_ns) : bisect.bisect_right(times, ts_ns)]
        if len(recent) < self.threshold:
            return None
        del self.attempts[address]  # counted once: the next burst starts afresh
        return Burst(address, len(recent), recent[0], recent[-1])

    def _bound(self, now_ns: int) -> None:
        while len(self.attempts) > MAX_TRACKED:
            del self.attempts[next(iter(self.attempts))]
        while self.connections:
            oldest = next(iter(self.connections))
            if len(self.connections) <= MAX_TRACKED and self.connections[oldest][2] >= now_ns - CONNECTION_TTL_NS:
                break
            del self.connections[oldest]

    def state(self) -> str:
        if self._saved is None:
            self._saved = json.dumps(
                {"attempts": self.attempts, "connections": self.connections}, separators=(",", ":")
            )
        return self._saved

    def load(self, text: str) -> None:
        """Take back `state()`; ValueError when it is not one (the caller starts with empty windows)."""
        try:
            data = json.loads(text)
            attempts = {str(k): sorted(int(t) for t in v) for k, v in data["attempts"].items()}
            connections = {str(k): [int(n) for n in v[:3]] for k, v in data["connections"].items()}
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a brute-force state: {exc}") from None
        if any(len(v) != 3 for v in connections.values()):
            raise ValueError("not a brute-force state: a connection needs [counted, failed, seen]")
        self.attempts, self.connections, self._saved = attempts, connections, text
