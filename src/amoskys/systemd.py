"""sd_notify without libsystemd: READY, STATUS, STOPPING, RELOADING and WATCHDOG datagrams.

Everything is a no-op when NOTIFY_SOCKET is unset (not under systemd, or Type=simple).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

__all__ = ["notify", "reloading", "wait_while_alive", "watchdog_interval", "watchdog_loop"]

THREAD_CHECK_S = 1.0  # how often `wait_while_alive` looks at the serving thread


def _address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    return "\0" + path[1:] if path.startswith("@") else path


def notify(*states: str) -> bool:
    """Send `KEY=value` lines to systemd; True when a manager is listening."""
    address = _address()
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
        except OSError:
            return False
    return True


def reloading() -> bool:
    """RELOADING=1 with the monotonic timestamp systemd 253+ wants (older ones ignore it)."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def watchdog_interval() -> float | None:
    """Half the WatchdogSec systemd gave this process, in seconds; None when not watched."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2_000_000, 0.1)
    except ValueError:
        return None


async def watchdog_loop() -> None:
    """Ping the watchdog at half its period while the event loop is responsive.

    A wedged event loop stops the pings, and systemd restarts the service: the point of it.
    """
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def wait_while_alive(stop: threading.Event, serving: threading.Thread) -> bool:
    """Block until `stop` is set (True) or the `serving` thread has ended (False: the caller exits
    non-zero and systemd restarts it), pinging the watchdog meanwhile."""
    interval = watchdog_interval()
    period = THREAD_CHECK_S if interval is None else min(interval, THREAD_CHECK_S)
    while not stop.wait(period):
        if not serving.is_alive():
            return False
        if interval is not None:
            notify("WATCHDOG=1")
    return True
