#!/usr/bin/env python3
"""UI page times with a big fleet: p50/p95/max per page, as JSON.

    python benchmarks/ui.py                                  # 1,000 hosts, 10,000,000 events
    python benchmarks/ui.py --hosts 100 --events 1000000     # smaller
    python benchmarks/ui.py --work /var/tmp/uibench          # keep the store and reuse it next time
    python benchmarks/ui.py --abuse --hosts 20 --events 20000  # the UI before login, under abuse

`--abuse` serves the UI with a password and measures, in that process, the resident memory before
and after 40 oversized requests (32 MiB request lines, headers, many headers, declared bodies) and
after 40 threads (in a process of their own) guess passwords for 10 s, while a logged-in operator
fetches a host page: its p50/p95/max, and what the guessers were answered.

The store is filled with the hub's own code (`to_row`, `SqliteStore.commit`): events spread over
the last 24 h across every host's proc/host/auth agents (and a scanner on every tenth host), and a
registry row per agent with its heartbeat and certificate expiry. Then `amoskys eventbus` serves
that store as its own process and `amoskys ui` runs as another, reading it over mTLS gRPC; each
page is fetched over keep-alive HTTP and timed from request to the last byte. Last, this process
times a registry sample (ListAgents + GetStatus) and the fleet view built from it, which the UI
does in the background after every sample.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import multiprocessing
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from amoskys import pki
from amoskys.config import TlsConfig
from amoskys.eventbus.rows import to_row
from amoskys.eventbus.store import AcceptedEnvelope, AgentUpdate, SqliteStore
from amoskys.ui.app import FleetView
from amoskys.ui.auth import hash_password
from amoskys.ui.hubclient import HubClient
from amoskys.ui.server import MAX_HEADER_BYTES
from amoskys.v1 import events_pb2

S = 1_000_000_000
DAY_NS = 86_400 * S
AGENT_KINDS = ("proc", "host", "auth")
BATCH = 200_000
NEEDLE = "needle-4711"


def templates(host: str) -> list[tuple[str, events_pb2.Event]]:
    """One event per kind for a host, with the kind's share of the traffic (weights repeat)."""
    process = events_pb2.ProcessEvent(
        action=events_pb2.ProcessEvent.START, pid=4242, ppid=1, name="python3", exe="/usr/bin/python3",
        cmdline=["python3", "-m", "http.server", "8000"], user="www-data",
    )  # fmt: skip
    sockets = [events_pb2.ListenSocket(protocol="tcp", address="0.0.0.0", port=p, process="svc") for p in (22, 80, 443)]
    metrics = events_pb2.HostMetrics(cpu_percent=7.5, load1=0.4, mem_total_bytes=8 << 30, listening=sockets)
    auth = events_pb2.AuthEvent(kind=events_pb2.AuthEvent.SSH_FAILED, user="root", src_ip="198.51.100.7",
                                raw="Failed password for root from 198.51.100.7 port 52311 ssh2")  # fmt: skip
    alert = events_pb2.Alert(rule="auth.brute_force", summary="5 failures from 198.51.100.7 in 60 s")
    heartbeat = events_pb2.Heartbeat(version="0.1.0", interval_s=30)
    return [
        *[("proc", events_pb2.Event(host=host, agent="proc", process=process))] * 14,
        ("host", events_pb2.Event(host=host, agent="host", host_metrics=metrics)),
        ("auth", events_pb2.Event(host=host, agent="auth", auth=auth)),
        ("auth", events_pb2.Event(host=host, agent="auth", severity=events_pb2.SEVERITY_WARNING, alert=alert)),
        *[("host", events_pb2.Event(host=host, agent="host", heartbeat=heartbeat))] * 3,
    ]


def rows(hosts: list[str], count: int, now_ns: int) -> Iterator[tuple[str, Any]]:
    """(agent_id, EventRow) for `count` events spread evenly over the last day, hosts interleaved."""
    per_host = {host: templates(host) for host in hosts}
    step = DAY_NS // count
    for i in range(count):
        host = hosts[i % len(hosts)]
        options = per_host[host]
        kind, event = options[(i // len(hosts)) % len(options)]
        event.ts_ns = now_ns - DAY_NS + i * step
        event.event_id = f"{i:032x}"
        if i == count // 2:  # one planted line for the text search
            planted = events_pb2.Event(host=host, agent="auth", ts_ns=event.ts_ns, event_id=event.event_id)
            planted.auth.raw = f"Failed password for invalid user {NEEDLE}"
            yield f"{host}-auth", to_row(planted)
            continue
        yield f"{host}-{kind}", to_row(event)


def registry(hosts: list[str], now_ns: int, not_after_ns: int, counts: dict[str, int]) -> list[AcceptedEnvelope]:
    """One envelope per agent carrying its registry facts (a few hosts late, a few down)."""
    accepted = []
    for n, host in enumerate(hosts):
        age_s = 100 if n % 97 == 0 else 1000 if n % 89 == 0 else 5
        kinds = (*AGENT_KINDS, "scanner") if n % 10 == 0 else AGENT_KINDS
        for kind in kinds:
            update = AgentUpdate(host=host, kind=kind, version="0.1.0", heartbeat_ns=now_ns - age_s * S,
                                 interval_s=30, events=counts.get(f"{host}-{kind}", 0),
                                 cert_not_after_ns=not_after_ns)  # fmt: skip
            agent_id = f"{host}-{kind}"
            chain_id = agent_id.encode()[:16].ljust(16, b"\0")
            accepted.append(AcceptedEnvelope(agent_id, chain_id, 1, bytes(32), (), update))
    return accepted


def build_store(path: Path, hosts: int, events: int) -> None:
    names = [f"host-{n:04d}" for n in range(hosts)]
    store = SqliteStore(path, synchronous="normal")
    now = time.time_ns()
    started = time.monotonic()
    batch: dict[str, list[Any]] = {}
    counts: dict[str, int] = {}
    for index, (agent_id, row) in enumerate(rows(names, events, now), 1):
        batch.setdefault(agent_id, []).append(row)
        if index % BATCH == 0 or index == events:
            store.commit([AcceptedEnvelope(a, b"", 0, b"", r) for a, r in batch.items()], {}, now)
            for agent, agent_rows in batch.items():
                counts[agent] = counts.get(agent, 0) + len(agent_rows)
            batch.clear()
            print(f"stored {index:,} events ({index / (time.monotonic() - started):,.0f}/s)", file=sys.stderr)
    store.commit(registry(names, now, now + 90 * DAY_NS, counts), {}, now)
    store.close()


def start(command: list[str], log_path: Path, ready: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start an amoskys process; wait for its JSON log line `ready` and return its port."""
    log = log_path.open("wb")
    process = subprocess.Popen([sys.executable, "-m", "amoskys", *command], stderr=log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if f'"{ready}"' in line:
                return process, int(json.loads(line)["port"])
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"{command[0]} did not start: {log_path.read_text()[-2000:]}")


def write_configs(work: Path) -> tuple[Path, dict[str, Any]]:
    ca_dir, tls = work / "ca", work / "tls"
    if not (ca_dir / "ca.crt").exists():
        ca = pki.init_ca(ca_dir)
        pki.issue(ca, tls, "hub", "server", ["localhost"])
        pki.issue(ca, tls, "ui", "client", [])
    (work / "trust").mkdir(exist_ok=True)
    hub = {
        "listen": "127.0.0.1:0",
        "tls": {"ca": str(ca_dir / "ca.crt"), "cert": str(tls / "hub.crt"), "key": str(tls / "hub.key")},
        "trust_map": str(work / "trust"),
        "crl": str(work / "crl.pem"),
        "store": {"path": str(work / "store" / "events.db"), "max_bytes": 64 << 30},
        "metrics": {"listen": ""},
    }
    (work / "eventbus.yml").write_text(yaml.safe_dump(hub))
    ui = {
        "listen": "127.0.0.1:0",
        "hub_server_name": "localhost",
        "tls": {"ca": str(ca_dir / "ca.crt"), "cert": str(tls / "ui.crt"), "key": str(tls / "ui.key")},
    }
    return work / "ui.yml", ui


def percentiles(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    p95 = round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 1) if len(ordered) >= 20 else None
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p95_ms": p95,
        "max_ms": round(ordered[-1] * 1000, 1),
    }


def fleet_build(ui: dict[str, Any], hub_port: int, samples: int = 20) -> dict[str, Any]:
    """In this process: a fresh registry sample from the hub, then the fleet view built from it."""
    tls = TlsConfig(**ui["tls"])
    fetch, build = [], []
    with HubClient(f"127.0.0.1:{hub_port}", tls, "localhost", refresh_s=3600) as client:
        view = FleetView(client)
        for _ in range(samples):
            started = time.perf_counter()
            snapshot = client.snapshot(max_age_s=0)
            fetched = time.perf_counter()
            view.build(snapshot)
            fetch.append(fetched - started)
            build.append(time.perf_counter() - fetched)
    return {"sample_fetch": percentiles(fetch), "fleet_build": percentiles(build)}


def measure(port: int, paths: list[str], warmup: int = 2) -> dict[str, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    times, size, failures = [], 0, {}
    for index, path in enumerate([*paths[:warmup], *paths]):
        started = time.perf_counter()
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
        if index < warmup:
            continue
        times.append(elapsed)
        if response.status == 200:
            size = len(body)
        else:  # e.g. 503 when the hub needs longer than hub_timeout_s
            failures[response.status] = failures.get(response.status, 0) + 1
    connection.close()
    return {**percentiles(times), "bytes": size, **({"failed": failures} if failures else {})}


def pages(hosts: int, requests: int) -> dict[str, list[str]]:
    pick = random.Random(7)
    host = lambda: f"host-{pick.randrange(hosts):04d}"  # noqa: E731
    return {
        "fleet": ["/"] * requests,
        "host": [f"/hosts/{host()}" for _ in range(requests)],
        "events": ["/events"] * requests,
        "events_host": [f"/events?host={host()}" for _ in range(requests)],
        "events_alerts": ["/events?kind=alert"] * requests,
        "api_fleet": ["/api/v1/fleet"] * requests,
        "events_text_1h": [f"/events?since=1h&text={NEEDLE}"] * max(requests // 10, 3),
        "events_text_24h": [f"/events?since=24h&text={NEEDLE}"] * max(requests // 10, 3),
    }


def run(work: Path, hosts: int, events: int, requests: int, abused: bool = False) -> dict[str, Any]:
    ui_config, ui = write_configs(work)
    store = work / "store" / "events.db"
    built = time.monotonic()
    if not store.exists():
        build_store(store, hosts, events)
    build_s = time.monotonic() - built
    hub, hub_port = start(["eventbus", "--config", str(work / "eventbus.yml")], work / "hub.log", "eventbus serving")
    try:
        auth = {"auth": {"password_hash": hash_password(PASSWORD)}} if abused else {}
        ui_config.write_text(yaml.safe_dump({**ui, **auth, "hub": f"127.0.0.1:{hub_port}"}))
        web, port = start(["ui", "--config", str(ui_config)], work / "ui.log", "ui serving")
        try:
            if abused:
                results = abuse(port, web.pid)
            else:
                results = {name: measure(port, paths) for name, paths in pages(hosts, requests).items()}
                results.update(fleet_build(ui, hub_port))
        finally:
            web.terminate()
            web.wait(30)
    finally:
        hub.terminate()
        hub.wait(60)
    return {
        "hosts": hosts,
        "events": events,
        "store_bytes": store.stat().st_size,
        "store_build_s": round(build_s, 1),
        "abuse" if abused else "pages": results,
    }


PASSWORD = "benchmark password"
MiB = 1 << 20
ABUSE = {
    "request_line": b"GET /events?text=",
    "header": b"GET / HTTP/1.1\r\nHost: ui\r\nX-Filler: ",
    "many_headers": b"GET / HTTP/1.1\r\nHost: ui\r\n" + b"X-A: b\r\n" * (MAX_HEADER_BYTES // 8 + 1),
    "body": b"GET / HTTP/1.1\r\nHost: ui\r\nContent-Length: %d\r\n\r\n" % (32 * MiB),
}


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def timed_get(port: int, path: str, password: str) -> tuple[int, float]:
    credentials = base64.b64encode(f"ops:{password}".encode()).decode()
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("GET", path, headers={"Authorization": f"Basic {credentials}"})
        response = connection.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    finally:
        connection.close()


def oversized(port: int, head: bytes) -> tuple[str, float]:
    """`head` and up to 32 MiB of filler; the status line's code and how long it took to come."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:

        def flood() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(head)
                for _ in range(32):
                    sock.sendall(b"a" * MiB)

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        try:
            answer = sock.makefile("rb").readline().split()
        except OSError:
            answer = []
        elapsed = time.perf_counter() - started
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(60)
    return (answer[1].decode() if len(answer) > 1 else "none"), elapsed


def guess(port: int, seconds: float, threads: int = 40) -> dict[int, int]:
    """`threads` guessers with wrong passwords for `seconds`: how often each status came back."""
    answers: Counter[int] = Counter()
    deadline = time.monotonic() + seconds

    def loop(thread: int) -> None:
        attempt = 0
        while time.monotonic() < deadline:
            answers[timed_get(port, "/", f"guess-{thread}-{attempt}")[0]] += 1
            attempt += 1

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(loop, range(threads)))
    return dict(answers)


def logged_in(port: int, seconds: float, path: str = "/hosts/host-0001") -> dict[str, Any]:
    times = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, elapsed = timed_get(port, path, PASSWORD)
        assert status == 200, status
        times.append(elapsed)
    return percentiles(times)


def abuse(port: int, pid: int) -> dict[str, Any]:
    """The UI's memory and a logged-in operator's page times, under oversized requests and guessing."""
    quiet = logged_in(port, 5)
    result: dict[str, Any] = {"rss_mib_start": round(rss_mib(pid), 1), "logged_in_quiet": quiet}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda kind: (kind, oversized(port, ABUSE[kind])), [*ABUSE] * 10))
    time.sleep(1)
    result["oversized"] = {
        kind: {"answers": dict(Counter(a[0] for k, a in answers if k == kind)),
               "slowest_answer_ms": round(max(a[1] for k, a in answers if k == kind) * 1000, 1)}
        for kind in ABUSE
    }  # fmt: skip
    result["rss_mib_after_oversized"] = round(rss_mib(pid), 1)
    with multiprocessing.get_context("spawn").Pool(1) as flood:
        guessers = flood.apply_async(guess, (port, 10.0))
        time.sleep(1)
        result["logged_in_during_guessing"] = logged_in(port, 7)
        result["guessers"] = guessers.get(120)
    time.sleep(1)
    result["rss_mib_after_guessing"] = round(rss_mib(pid), 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--requests", type=int, default=100, help="timed requests per page")
    parser.add_argument("--work", type=Path, help="keep the store here and reuse it (default: a temp dir)")
    parser.add_argument("--abuse", action="store_true", help="oversized requests and password guessing instead")
    args = parser.parse_args()
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        result = run(args.work, args.hosts, args.events, args.requests, args.abuse)
    else:
        with tempfile.TemporaryDirectory(prefix="amoskys-uibench-") as tmp:
            result = run(Path(tmp), args.hosts, args.events, args.requests, args.abuse)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
