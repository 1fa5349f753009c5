"""A process's serving thread watched for systemd: the watchdog is pinged while it lives, and its end is seen."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from amoskys import systemd
from tests.ui.conftest import NotifySocket


@pytest.fixture
def watched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """This process under a (stand-in) systemd with WatchdogSec=0.4 s."""
    sock = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    yield sock
    sock.close()


def test_a_serving_thread_that_ends_unasked_is_seen_and_the_pings_stop(watched: NotifySocket) -> None:
    ending = threading.Event()
    serving = threading.Thread(target=ending.wait)
    serving.start()
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(systemd.wait_while_alive(threading.Event(), serving)))
    waiter.start()
    watched.wait_for("WATCHDOG=1", timeout=2)
    ending.set()  # the serving thread ends, nobody asked it to
    waiter.join(5)
    assert result == [False]
    watched.drain()  # pings sent before the end was seen
    with pytest.raises(AssertionError):
        watched.wait_for("WATCHDOG=1", timeout=0.6)


def test_a_stop_request_returns_true_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    stop, forever = threading.Event(), threading.Event()
    serving = threading.Thread(target=forever.wait, daemon=True)
    serving.start()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    assert systemd.wait_while_alive(stop, serving)
    assert time.monotonic() - started < 2
    forever.set()
    serving.join(5)
