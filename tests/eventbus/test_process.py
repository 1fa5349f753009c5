"""The hub as a real process: kill -9 under load, SIGTERM drain, SIGHUP rotation, backpressure."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from amoskys import pki
from amoskys.eventbus.server import create_server
from amoskys.loadgen import LoadOptions, ensure_identities, run_load
from amoskys.v1 import envelope_pb2
from tests.conftest import TestPki, small_tmpfs
from tests.hubfixture import LiveHub, hub_config, make_events

AGENTS = 4


class HubProcess:
    """`amoskys eventbus --config FILE` in a child process; the port is read from its log."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        self.log.write_text("")
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "amoskys", "eventbus", "--config", str(self.config)], stderr=err
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                entry = json.loads(line) if line.startswith("{") else {}
                if entry.get("msg") == "eventbus serving":
                    self.port = int(entry["port"])
                    return
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"hub did not start: {self.log.read_text()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def hub_setup(test_pki: TestPki, tmp_path: Path) -> Iterator[tuple[HubProcess, Path]]:
    key, cert = test_pki.issue("hub", "server", ["localhost"])
    identities = tmp_path / "ids"
    ensure_identities(test_pki.ca_dir, identities, AGENTS)
    config = {
        "listen": "127.0.0.1:0",
        "tls": {"ca": str(test_pki.ca_cert), "cert": str(cert), "key": str(key)},
        "trust_map": str(identities / "trust"),
        "crl": str(tmp_path / "crl.pem"),
        "store": {"path": str(tmp_path / "store" / "events.db")},
        "metrics": {"listen": ""},
        "drain_timeout_s": 10,
    }
    path = tmp_path / "eventbus.yml"
    path.write_text(yaml.safe_dump(config))
    hub = HubProcess(path, tmp_path / "hub.log")
    try:
        yield hub, identities
    finally:
        hub.stop()


def load_options(hub: HubProcess, test_pki: TestPki, identities: Path, ack_log: Path, **kw: object) -> LoadOptions:
    base: dict[str, object] = {"agents": AGENTS, "batch": 200, "duration": 3.0, "inflight": 4, "drain_s": 3.0}
    base.update(kw)
    return LoadOptions(
        hub=f"127.0.0.1:{hub.port}", server_name="localhost", ca=test_pki.ca_cert, identities=identities,
        ack_log=ack_log, **base,  # type: ignore[arg-type]
    )  # fmt: skip


def stored_ids(db: Path) -> list[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return [row[0] for row in conn.execute("SELECT event_id FROM events WHERE agent_id != 'eventbus'")]


def acked_ids(ack_log: Path) -> set[str]:
    ids = set()
    for line in ack_log.read_text().splitlines():
        prefix, _seq, first, count = line.split()
        ids.update(f"{prefix}:{n}" for n in range(int(first), int(first) + int(count)))
    return ids


def assert_exactly_once(db: Path, ack_log: Path) -> None:
    stored = stored_ids(db)
    assert len(stored) == len(set(stored)), "an event was stored twice"
    acked = acked_ids(ack_log)
    assert acked, "nothing was acked"
    missing = acked - set(stored)
    assert not missing, f"{len(missing)} acked events are not in the store"


@pytest.mark.slow
async def test_kill_9_under_load_loses_no_acked_event(
    hub_setup: tuple[HubProcess, Path], test_pki: TestPki, tmp_path: Path
) -> None:
    hub, identities = hub_setup
    hub.start()
    ack_log = tmp_path / "acks.log"
    load = asyncio.create_task(run_load(load_options(hub, test_pki, identities, ack_log, duration=6.0)))
    await asyncio.sleep(2.5)
    hub.signal(signal.SIGKILL)
    hub.wait()
    summary = await load
    assert summary["acked_events"] > 0
    hub.start()  # recovery: the store opens, the chains are where they were
    hub.signal(signal.SIGTERM)
    assert hub.wait() == 0
    assert_exactly_once(tmp_path / "store" / "events.db", ack_log)


async def test_sigterm_drains_and_exits_0(
    hub_setup: tuple[HubProcess, Path], test_pki: TestPki, tmp_path: Path
) -> None:
    hub, identities = hub_setup
    hub.start()
    ack_log = tmp_path / "acks.log"
    load = asyncio.create_task(run_load(load_options(hub, test_pki, identities, ack_log, duration=4.0)))
    await asyncio.sleep(1.5)
    hub.signal(signal.SIGTERM)
    assert await asyncio.to_thread(hub.wait) == 0
    summary = await load
    assert summary["acked_events"] > 0
    assert "eventbus stopped" in hub.log.read_text()
    assert_exactly_once(tmp_path / "store" / "events.db", ack_log)


def _served_certificate_serial(port: int, test_pki: TestPki, client: tuple[Path, Path]) -> int:
    context = ssl.create_default_context(cafile=str(test_pki.ca_cert))
    context.load_cert_chain(str(client[1]), str(client[0]))
    context.set_alpn_protocols(["h2"])
    with context.wrap_socket(
        __import__("socket").create_connection(("127.0.0.1", port), timeout=5), server_hostname="localhost"
    ) as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


async def test_sighup_rotates_cert_and_trust_without_dropping_streams(
    hub_setup: tuple[HubProcess, Path], test_pki: TestPki, tmp_path: Path
) -> None:
    hub, identities = hub_setup
    hub.start()
    cert_path = test_pki.root / "certs" / "hub.crt"
    old_serial = pki.load_certificate(cert_path).serial_number
    client = test_pki.issue("probe", "client")
    assert _served_certificate_serial(hub.port, test_pki, client) == old_serial
    ack_log = tmp_path / "acks.log"
    load = asyncio.create_task(
        run_load(load_options(hub, test_pki, identities, ack_log, agents=2, duration=4.0, rate=2000))
    )
    await asyncio.sleep(1.0)
    for suffix in ("crt", "key"):
        (test_pki.root / "certs" / f"hub.{suffix}").unlink()
    test_pki.issue("hub", "server", ["localhost"])
    ensure_identities(test_pki.ca_dir, identities, AGENTS + 1)  # a new agent joins the trust map
    hub.signal(signal.SIGHUP)
    summary = await load
    assert summary["errors"] == {}, summary
    assert summary["rejected"] == {}, summary
    new_serial = pki.load_certificate(cert_path).serial_number
    assert _served_certificate_serial(hub.port, test_pki, client) == new_serial
    newcomer = load_options(hub, test_pki, identities, tmp_path / "new.log", agents=AGENTS + 1, duration=1.0)
    assert (await run_load(newcomer))["errors"] == {}
    hub.signal(signal.SIGTERM)
    assert await asyncio.to_thread(hub.wait) == 0
    assert_exactly_once(tmp_path / "store" / "events.db", ack_log)


async def test_backpressure_answers_retry_and_loses_nothing(test_pki: TestPki, tmp_path: Path) -> None:
    identities = tmp_path / "ids"
    ensure_identities(test_pki.ca_dir, identities, AGENTS)
    config = hub_config(
        test_pki, tmp_path, trust_map=str(identities / "trust"),
        backpressure={"high_water_events": 600, "base_backoff_ms": 20, "max_backoff_ms": 200},
    )  # fmt: skip
    hub = create_server(config)
    await hub.start()
    ack_log = tmp_path / "acks.log"
    try:
        options = LoadOptions(
            hub=f"127.0.0.1:{hub.port}", server_name="localhost", ca=test_pki.ca_cert, identities=identities,
            agents=AGENTS, batch=300, duration=3.0, inflight=4, ack_log=ack_log,
        )  # fmt: skip
        summary = await run_load(options)
    finally:
        await hub.stop()
    assert summary["retried"] > 0
    assert summary["rejected"] == {}
    assert summary["errors"] == {}
    assert_exactly_once(Path(config.store.path), ack_log)
    assert len(stored_ids(Path(config.store.path))) == summary["acked_events"]


@pytest.mark.root
@pytest.mark.parametrize("part_events", [250, 20])  # 20: each envelope committed in 10 parts
async def test_full_disk_answers_retry_then_recovers(test_pki: TestPki, tmp_path: Path, part_events: int) -> None:
    with small_tmpfs(tmp_path / "small", "3m") as mount:
        store = {"path": str(mount / "events.db"), "prune_interval_s": 3600}
        config = hub_config(test_pki, tmp_path, store=store, backpressure={"commit_part_events": part_events})
        hub = create_server(config)
        await hub.start()
        live = LiveHub(hub, test_pki, config)
        agent = live.agent("full-proc")
        filler = mount / "filler"
        filler.write_bytes(b"\0" * (2 * 1024 * 1024))
        acked, retry = 0, None
        for i in range(200):
            envelope = agent.seal(make_events(200, host="full", start=i * 200))
            ack = await live.publish(agent, envelope)
            if ack.status != envelope_pb2.PublishAck.OK:
                retry = (ack, envelope)
                break
            acked += 200
        assert retry is not None, "the store never filled up"
        ack, envelope = retry
        assert ack.status == envelope_pb2.PublishAck.RETRY
        assert "disk full" in ack.reason
        assert ack.backoff_ms > 0
        filler.unlink()
        await asyncio.sleep(config.backpressure.max_backoff_ms / 4000 + 0.1)
        again = await live.publish(agent, envelope)
        assert again.status == envelope_pb2.PublishAck.OK, again
        await hub.stop()
        stored = stored_ids(mount / "events.db")
        assert len(stored) == len(set(stored)) == acked + 200
        with sqlite3.connect(mount / "events.db") as conn:
            assert conn.execute("SELECT count(*) FROM pending_parts").fetchone()[0] == 0
