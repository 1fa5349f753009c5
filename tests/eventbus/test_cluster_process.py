"""The hub cluster as real processes: 3 nats-server nodes (R3), 2 hubs, the indexer; kill -9 under load.

Every acked event must be in the index exactly once, no chain gap recorded, and ingest must go on.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from amoskys.loadgen import LoadOptions, ensure_identities, run_agents
from tests.conftest import TestPki
from tests.eventbus.test_process import acked_ids
from tests.natscluster import NatsCluster, nats_cluster

AGENTS = 6
START_TIMEOUT_S = 40.0


class Process:
    """`amoskys COMMAND --config FILE` in a child process, ready once its log says `ready`."""

    def __init__(self, command: str, config: Path, log: Path, ready: str) -> None:
        self.command, self.config, self.log, self.ready = command, config, log, ready
        self.proc: subprocess.Popen[bytes] | None = None
        self.entry: dict[str, object] = {}

    def start(self) -> None:
        self.log.write_text("")
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "amoskys", self.command, "--config", str(self.config)], stderr=err
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                entry = json.loads(line) if line.startswith("{") else {}
                if entry.get("msg") == self.ready:
                    self.entry = entry
                    return
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"{self.command} did not start: {self.log.read_text()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


class Fleet:
    def __init__(self, test_pki: TestPki, tmp_path: Path, nats: NatsCluster) -> None:
        self.tmp_path, self.pki, self.nats = tmp_path, test_pki, nats
        self.index = tmp_path / "index" / "events.db"
        self.identities = tmp_path / "ids"
        ensure_identities(test_pki.ca_dir, self.identities, AGENTS)
        key, cert = test_pki.issue("hub", "server", ["localhost"])
        nats_section = {"servers": nats.servers, "tls": False, "replicas": 3, "request_timeout_s": 2}
        store = {"backend": "jetstream", "path": str(self.index)}
        hub = {
            "listen": "127.0.0.1:0",
            "tls": {"ca": str(test_pki.ca_cert), "cert": str(cert), "key": str(key)},
            "trust_map": str(self.identities / "trust"),
            "crl": str(tmp_path / "crl.pem"),
            "store": store,
            "nats": nats_section,
            "metrics": {"listen": ""},
            "drain_timeout_s": 5,
        }
        (tmp_path / "hub.yml").write_text(yaml.safe_dump(hub))
        indexer = {"nats": nats_section, "store": store, "metrics": {"listen": ""}, "batch": 500}
        (tmp_path / "indexer.yml").write_text(yaml.safe_dump(indexer))
        self.hubs = [
            Process("eventbus", tmp_path / "hub.yml", tmp_path / f"hub{i}.log", "eventbus serving") for i in (0, 1)
        ]
        self.indexer = Process("indexer", tmp_path / "indexer.yml", tmp_path / "indexer.log", "indexer running")

    def hub_address(self, i: int) -> str:
        return f"127.0.0.1:{self.hubs[i].entry['port']}"

    def load(self, hub: str | list[str], agents: range, ack_log: Path, duration: float) -> LoadOptions:
        return LoadOptions(
            hub=hub, server_name="localhost", ca=self.pki.ca_cert, identities=self.identities,  # type: ignore[arg-type]
            agents=AGENTS, batch=20, duration=duration, inflight=4, drain_s=8.0, rate=1500, ack_log=ack_log,
        )  # fmt: skip

    def stop(self) -> None:
        for process in [*self.hubs, self.indexer]:
            process.kill()


@pytest.fixture
def fleet(test_pki: TestPki, tmp_path: Path) -> Iterator[Fleet]:
    with nats_cluster(tmp_path / "nats", size=3) as nats:
        running = Fleet(test_pki, tmp_path, nats)
        try:
            yield running
        finally:
            running.stop()


def indexed(db: Path) -> tuple[list[str], dict[tuple[str, bytes], list[int]]]:
    """Event ids (agents only) and the envelope seqs of each (agent, chain), from the index."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        ids = [row[0] for row in conn.execute("SELECT event_id FROM events WHERE agent_id != 'eventbus'")]
        chains: dict[tuple[str, bytes], list[int]] = {}
        for agent, chain, seq in conn.execute("SELECT agent_id, chain_id, seq FROM envelopes ORDER BY seq"):
            chains.setdefault((agent, bytes(chain)), []).append(seq)
    return ids, chains


async def wait_for_index(db: Path, acked: set[str], timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        ids, _ = await asyncio.to_thread(indexed, db)
        if acked <= set(ids) or time.monotonic() > deadline:
            return ids
        await asyncio.sleep(0.2)


def assert_exactly_once_and_chained(db: Path, acked: set[str], ids: list[str]) -> None:
    assert acked, "nothing was acked"
    assert len(ids) == len(set(ids)), "an event was indexed twice"
    missing = acked - set(ids)
    assert not missing, f"{len(missing)} acked events are not in the index"
    _, chains = indexed(db)
    for (agent, _chain), seqs in chains.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"{agent}: chain with gaps {seqs[:10]}..."


@pytest.mark.slow
async def test_kill_9_of_a_nats_node_a_hub_and_the_indexer_under_load(fleet: Fleet, tmp_path: Path) -> None:
    fleet.indexer.start()
    for hub in fleet.hubs:
        hub.start()
    ack_log = tmp_path / "acks.log"
    half = AGENTS // 2
    loads = [
        asyncio.create_task(run_agents(fleet.load(fleet.hub_address(0), range(half), ack_log, 7.0), range(half))),
        asyncio.create_task(
            run_agents(fleet.load(fleet.hub_address(1), range(half, AGENTS), ack_log, 7.0), range(half, AGENTS))
        ),
    ]
    await asyncio.sleep(1.5)
    fleet.nats.nodes[1].kill()
    await asyncio.sleep(1.5)
    fleet.indexer.kill()
    await asyncio.sleep(1.0)
    fleet.hubs[1].kill()
    await asyncio.sleep(0.5)
    await asyncio.to_thread(fleet.indexer.start)
    (first, _), (second, _) = await asyncio.gather(*loads)
    assert first.acked_events > 0 and second.acked_events > 0
    after = tmp_path / "after.log"  # ingest goes on through the surviving hub and two of three NATS nodes
    (later, _) = await run_agents(fleet.load(fleet.hub_address(0), range(half), after, 1.5), range(half))
    assert later.acked_events > 0, later
    acked = acked_ids(ack_log) | acked_ids(after)
    ids = await wait_for_index(fleet.index, acked)
    assert_exactly_once_and_chained(fleet.index, acked, ids)
    assert "chain gap" not in fleet.indexer.log.read_text()
    assert fleet.indexer.terminate() == 0
    assert fleet.hubs[0].terminate() == 0


@pytest.mark.slow
async def test_agents_fail_over_to_the_other_hub_and_their_chains_go_on(fleet: Fleet, tmp_path: Path) -> None:
    fleet.indexer.start()
    for hub in fleet.hubs:
        hub.start()
    ack_log = tmp_path / "acks.log"
    hubs = [fleet.hub_address(0), fleet.hub_address(1)]
    load = asyncio.create_task(run_agents(fleet.load(hubs, range(AGENTS), ack_log, 5.0), range(AGENTS)))
    await asyncio.sleep(2.0)
    fleet.hubs[0].kill()
    stats, _ = await load
    assert stats.sent_events > 0
    assert stats.errors, "no agent lost its hub"  # some agents started on the killed one
    assert stats.acked_events == stats.sent_events, stats  # the agents of the lost hub were acked by the other
    assert not stats.rejected, stats
    acked = acked_ids(ack_log)
    ids = await wait_for_index(fleet.index, acked)
    assert_exactly_once_and_chained(fleet.index, acked, ids)
    _, chains = indexed(fleet.index)
    assert sorted(agent for agent, _ in chains) == sorted({agent for agent, _ in chains}), "a chain was restarted"
    assert len(chains) == AGENTS
    assert "chain_reset" not in fleet.hubs[1].log.read_text()
