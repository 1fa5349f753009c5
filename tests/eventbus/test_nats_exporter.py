"""`amoskys nats-exporter` against real nats-server nodes (tests/natscluster.py) and real HTTP servers that answer
badly: the node's state as `amoskys_nats_*`, and `amoskys_nats_up 0` (the scrape still 200) when it cannot be read."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import nats
import nats.js.errors
import pytest
from nats.js import JetStreamContext, api
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from amoskys.cli import main
from amoskys.config import MetricsConfig, NatsExporterConfig
from amoskys.eventbus.natsmetrics import NatsCollector, NatsExporter
from tests.natscluster import NatsNode, nats_cluster

T = TypeVar("T")
NO_SUITABLE_PEERS = 10005  # JetStream's err_code
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def monitor_url(node: NatsNode) -> str:
    return f"http://127.0.0.1:{node.monitor_port}"


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((f"amoskys_nats_{name}", frozenset(labels.items())))


@contextmanager
def exporter(url: str, timeout_s: float = 2.0) -> Iterator[NatsExporter]:
    """The exporter serving on a kernel-chosen loopback port, in a thread; stopped (and its result checked) after."""
    config = NatsExporterConfig(monitor_url=url, timeout_s=timeout_s, metrics=MetricsConfig(listen="127.0.0.1:0"))
    running = NatsExporter(config)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(running.run()))
    thread.start()
    try:
        yield running
    finally:
        running.request_stop()
        thread.join(10)
        assert result == [0]


def scrape(running: NatsExporter) -> tuple[int, Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{running.port}/metrics", timeout=10) as response:
        return response.status, parse(response.read().decode())


def collect(url: str, timeout_s: float = 2.0) -> Samples:
    registry = CollectorRegistry()
    registry.register(NatsCollector(url, timeout_s))
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in registry.collect()
        for sample in family.samples
    }


def wait_for(probe: Callable[[], T], ready: Callable[[T], bool], timeout: float = 20) -> T:
    """The first probe() that is ready, or the last one after `timeout` s (the assertions say what is wrong)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = probe()
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


async def add_stream(js: JetStreamContext, name: str, replicas: int, wait_s: float = 20) -> None:
    """A new cluster is healthy before its meta leader knows every peer: "no suitable peers" is asked again."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            await js.add_stream(name=name, subjects=[f"{name.lower()}.>"], num_replicas=replicas)
            return
        except nats.js.errors.BadRequestError as error:
            if error.err_code != NO_SUITABLE_PEERS or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


async def fill_stream(server: str, name: str, replicas: int, messages: int) -> None:
    """A stream of `replicas` with `messages` messages and a durable consumer that has read none."""
    client = await nats.connect(server)
    try:
        js = client.jetstream(timeout=10)
        await add_stream(js, name, replicas)
        for n in range(messages):
            await js.publish(f"{name.lower()}.x", b"%d" % n)
        await js.add_consumer(name, api.ConsumerConfig(durable_name="reader", ack_policy=api.AckPolicy.EXPLICIT))
    finally:
        await client.close()


async def test_a_cluster_node_is_read_as_prometheus_metrics(tmp_path: Path) -> None:
    with nats_cluster(tmp_path / "nats", size=3) as cluster:
        node = cluster.nodes[0]
        with exporter(monitor_url(node)) as running:
            healthy = await asyncio.to_thread(
                wait_for, lambda: scrape(running)[1], lambda s: value(s, "healthy") == 1 and value(s, "routes") == 2
            )
            assert (value(healthy, "up"), value(healthy, "routes")) == (1, 2)
            await fill_stream(node.url, "EXPORTED", replicas=3, messages=7)
            status, samples = await asyncio.to_thread(
                wait_for,
                lambda: scrape(running),
                lambda s: value(s[1], "stream_messages", account="$G", stream="EXPORTED") == 7,
            )
        assert status == 200
        stream = {"account": "$G", "stream": "EXPORTED"}
        assert value(samples, "stream_messages", **stream) == 7
        assert value(samples, "stream_replicas", **stream) == 3
        assert value(samples, "consumer_num_pending", **stream, consumer="reader") == 7
        assert value(samples, "jetstream_enabled") == 1
        assert value(samples, "jetstream_streams") == 1
        assert value(samples, "slow_consumers_total") == 0
        assert (value(samples, "mem_bytes") or 0) > 0
        assert (value(samples, "jetstream_used_bytes", store="file") or 0) > 0
        views = [collect(monitor_url(each)) for each in cluster.nodes]
        assert sum(value(view, "stream_leader", **stream) or 0 for view in views) == 1  # one leader
        leader = next(n for n, view in zip(cluster.nodes, views, strict=True) if value(view, "stream_leader", **stream))
        seen = await asyncio.to_thread(
            wait_for, lambda: collect(monitor_url(leader)), lambda s: value(s, "stream_replicas_current", **stream) == 3
        )
        assert value(seen, "stream_replicas_current", **stream) == 3  # the leader sees every replica current


async def test_a_stopped_node_is_up_0_and_the_scrape_still_succeeds(tmp_path: Path) -> None:
    with nats_cluster(tmp_path / "nats", size=1) as cluster:
        node = cluster.nodes[0]
        with exporter(monitor_url(node)) as running:
            await asyncio.to_thread(wait_for, lambda: scrape(running)[1], lambda s: value(s, "healthy") == 1)
            await fill_stream(node.url, "SINGLE", replicas=1, messages=3)
            _, samples = await asyncio.to_thread(scrape, running)
            single = {"account": "$G", "stream": "SINGLE"}
            assert (value(samples, "routes"), value(samples, "stream_messages", **single)) == (0, 3)
            assert value(samples, "stream_leader", **single) == 1  # a single server leads every stream
            node.stop()
            status, samples = await asyncio.to_thread(scrape, running)
    assert status == 200
    assert {name for name, _ in samples if name.startswith("amoskys_nats_")} == {"amoskys_nats_up"}
    assert value(samples, "up") == 0


class AnsweringServer(http.server.ThreadingHTTPServer):
    answer: tuple[int, bytes] = (200, b"")


class Answers(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the server's `status` and `body` (a monitoring endpoint gone wrong)."""

    server: AnsweringServer

    def do_GET(self) -> None:
        status, body = self.server.answer
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def answering(status: int, body: bytes) -> Iterator[str]:
    server = AnsweringServer(("127.0.0.1", 0), Answers)
    server.answer = (status, body)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(
    ("status", "body"),
    [(200, b"<html>not json</html>"), (200, b'{"connections": "many"}'), (200, b"[1, 2]"), (500, b"{}"), (200, b"")],
    ids=["not-json", "wrong-types", "not-an-object", "http-500", "empty"],
)
def test_unreadable_answers_are_up_0(status: int, body: bytes) -> None:
    with answering(status, body) as url:
        samples = collect(url)
    assert samples == {("amoskys_nats_up", frozenset()): 0}


def test_a_node_that_never_answers_is_up_0_within_the_timeout() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        start = time.monotonic()
        samples = collect(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.5)
        elapsed = time.monotonic() - start
    assert samples == {("amoskys_nats_up", frozenset()): 0}
    assert elapsed < 1.5, elapsed  # one deadline for the whole scrape


def test_config_check_knows_the_exporter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "nats-exporter.yml"
    good.write_text("monitor_url: http://127.0.0.1:8222\nmetrics: {listen: 10.0.0.1:9128}\ntimeout_s: 1.5\n")
    assert main(["config", "check", str(good)]) == 0
    assert "valid nats-exporter config" in capsys.readouterr().out
    for text, key in [("monitor_url: ftp://x\n", "monitor_url"), ("metrics: {listen: ''}\n", "metrics")]:
        good.write_text(text)
        assert main(["config", "check", str(good)]) == 2
        assert f"key '{key}'" in capsys.readouterr().err
