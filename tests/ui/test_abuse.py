"""The UI before login, as its own process: oversized requests and password guessing are answered at once,
without growing it and without slowing down an operator who is logged in."""

from __future__ import annotations

import base64
import contextlib
import http.client
import multiprocessing
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from amoskys.ui.auth import LOGIN_BURST, LOGIN_REFILL_S, hash_password
from amoskys.ui.server import MAX_HEADER_BYTES
from tests.ui.conftest import Fleet, UiProcess, samples, ui_process

PASSWORD = "correct horse battery staple"
MiB = 1 << 20
FILLER = b"a" * MiB
ABUSE_BYTES = 32 * MiB  # what the issue sent: the UI grew from 72 MB to 204-280 MB and kept it
RSS_GROWTH_LIMIT = 30 * MiB
# Main made every logged-in page wait ~12 s behind the guessers' scrypt. With cheroot's listen backlog of 5 the
# guessers' connections also made the kernel drop a user's SYN (p95 1.06 s quiet, 2.03 s once in CI); with 1024:
# median 0.07-0.12 s, p95 0.12-0.36 s. The bounds leave room for a loaded 2-core machine.
LOGGED_IN_MEDIAN_S = 1.0
LOGGED_IN_P95_S = 5.0
OVERSIZED = {
    "request line": (b"GET /events?text=", 414),
    "one header": (b"GET / HTTP/1.1\r\nHost: ui\r\nX-Filler: ", 413),
    "many headers": (b"GET / HTTP/1.1\r\nHost: ui\r\n" + b"X-A: b\r\n" * (MAX_HEADER_BYTES // 8 + 1), 413),
    "body": (b"GET / HTTP/1.1\r\nHost: ui\r\nContent-Length: %d\r\n\r\n" % ABUSE_BYTES, 413),
}


def basic(password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"ops:{password}".encode()).decode()}


def get(port: int, path: str, password: str = PASSWORD, source: str = "127.0.0.1") -> http.client.HTTPResponse:
    """One GET from `source` (any 127/8 address is ours on Linux); the response, its body read."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        connection.request("GET", path, headers=basic(password))
        response = connection.getresponse()
        response.read()
        return response
    finally:
        connection.close()


@pytest.fixture(scope="module")
def ui(seeded: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiProcess]:
    root: Path = tmp_path_factory.mktemp("ui-abuse")
    with ui_process(root, seeded.hub, auth={"password_hash": hash_password(PASSWORD)}) as process:
        yield process


def send_oversized(port: int, head: bytes) -> tuple[int | None, float]:
    """`head` then filler until ABUSE_BYTES are sent or the server stops reading: (status answered, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:

        def flood() -> None:
            try:
                sock.sendall(head)
                for _ in range(ABUSE_BYTES // len(FILLER)):
                    sock.sendall(FILLER)
            except OSError:
                pass  # the server answered and closed: what we want

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        try:
            status_line = sock.makefile("rb").readline()
        except OSError:
            status_line = b""
        elapsed = time.monotonic() - started
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # stops the sender if the server did not
        sender.join(30)
    parts = status_line.split()
    return (int(parts[1]) if len(parts) > 1 else None), elapsed


def test_oversized_requests_are_answered_at_once_and_memory_stays_flat(ui: UiProcess) -> None:
    for path in ("/", "/events", "/hosts/web1", "/hub"):  # warm up: templates compiled, fleet built
        assert get(ui.port, path).status == 200
    baseline = ui.rss_bytes()
    shapes = [shape for shape in OVERSIZED.values() for _ in range(10)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda shape: (send_oversized(ui.port, shape[0]), shape[1]), shapes))
    for (status, elapsed), expected in answers:
        assert status == expected
        assert elapsed < 5, elapsed
    time.sleep(1)
    grown = ui.rss_bytes() - baseline
    assert grown < RSS_GROWTH_LIMIT, f"RSS grew {grown / MiB:.1f} MiB after {len(shapes)} oversized requests"
    assert get(ui.port, "/events").status == 200


def test_a_long_but_reasonable_query_is_served(ui: UiProcess) -> None:
    path = "/events?text=" + "x" * 150 + "&host=" + ",".join(f"h{i}" for i in range(50))
    assert get(ui.port, path).status == 200


def status_after_busy(port: int, password: str, source: str) -> int:
    """A login's status, asking again while every password slot is busy (503, Retry-After: 1)."""
    for _ in range(20):
        response = get(port, "/hub", password, source)
        if response.status != 503:
            return response.status
        time.sleep(int(response.headers["Retry-After"]))
    raise AssertionError("password slots busy for 20 s")


def guess_for(port: int, seconds: float, threads: int = 40) -> Counter[int]:
    """`threads` guessers trying wrong passwords from 127.0.0.1 for `seconds`: the statuses they got.

    Run in a process of its own, so the guessers' threads do not slow the timed requests' client.
    """
    answers: Counter[int] = Counter()
    deadline = time.monotonic() + seconds

    def guess(thread: int) -> None:
        attempt = 0
        while time.monotonic() < deadline:
            response = get(port, "/", f"guess-{thread}-{attempt}")
            answers[response.status] += 1
            if response.status == 429:
                assert 0 < int(response.headers["Retry-After"]) <= LOGIN_REFILL_S
            attempt += 1

    with ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(guess, n) for n in range(threads)]:
            done.result()
    return answers


def test_password_guessing_is_limited_per_address_and_spares_logged_in_users(ui: UiProcess) -> None:
    assert get(ui.port, "/hosts/web1").status == 200  # logged in: its credentials are verified once
    baseline = ui.rss_bytes()
    seconds = 10.0
    started = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        flood = pool.apply_async(guess_for, (ui.port, seconds))
        time.sleep(1)  # the guessers are at it
        latencies = []
        while time.monotonic() - started < seconds - 3:
            begin = time.monotonic()
            assert get(ui.port, "/hosts/web1").status == 200
            latencies.append(time.monotonic() - begin)
        other_address = status_after_busy(ui.port, PASSWORD, "127.0.0.2")
        other_guess = status_after_busy(ui.port, "wrong", "127.0.0.3")
        answers = flood.get(seconds + 60)
    elapsed = time.monotonic() - started
    median, p95 = statistics.median(latencies), statistics.quantiles(latencies, n=20)[-1]
    print(f"logged-in median {median:.3f} s, p95 {p95:.3f} s over {len(latencies)} pages; guessers {dict(answers)}")
    assert median < LOGGED_IN_MEDIAN_S and p95 < LOGGED_IN_P95_S, (
        f"logged-in median {median:.3f} s, p95 {p95:.3f} s of {len(latencies)} during the flood; "
        f"{answers} in {elapsed:.1f} s"
    )
    assert (other_address, other_guess) == (200, 401)  # the limit is per address
    assert answers[429] > 100, answers
    assert answers[401] <= LOGIN_BURST + elapsed / LOGIN_REFILL_S + 1, answers  # scrypt ran this often
    assert set(answers) <= {401, 429, 503}, answers
    time.sleep(1)
    grown = ui.rss_bytes() - baseline
    assert grown < RSS_GROWTH_LIMIT, f"RSS grew {grown / MiB:.1f} MiB after {answers.total()} guesses"
    counted = scrape(ui.port)
    assert counted[("amoskys_ui_login_failures_total", ())] == answers[401] + 1  # 127.0.0.3's wrong one
    assert counted[("amoskys_ui_login_refused_total", (("reason", "rate_limited"),))] == answers[429]
    assert counted[("amoskys_ui_requests_total", (("status", "429"),))] == answers[429]
    assert counted[("amoskys_ui_hub_call_seconds_count", (("call", "query"),))] >= len(latencies)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics (behind the same password as the pages), as {(sample name, labels): value}."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/metrics", headers=basic(PASSWORD))
        response = connection.getresponse()
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    finally:
        connection.close()
    return samples(text)
