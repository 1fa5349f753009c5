#!/usr/bin/env python3
"""Fuzz the hub's envelope path in-process, as an enrolled agent whose key was stolen would.

    python benchmarks/fuzz_envelope.py                    # 1,000,000 inputs
    python benchmarks/fuzz_envelope.py --inputs 20000 --seed 7

A real Hub (create_server on a temp config and PKI, `await hub.start()`) receives every input
through `hub.handle_envelope(raw, peer)` with the Peer of its one enrolled identity. Inputs are
mutated valid envelopes: bit flips, truncation, splicing of fields and bytes from other envelopes,
huge and over-long varints, and header or payload mutations signed *after* mutating (the attacker
holds the key), plus a few valid envelopes so the chain, and the checks that need it, move on.

Exit status 0 only if no exception escaped, every stored event carries the enrolled host and
kind (or is the hub's own alert), and the writer still commits a valid envelope at the end.
Prints inputs/s and the outcome histogram (status and reason prefix) as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import random
import sqlite3
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from amoskys import keys, pki
from amoskys.config import EventBusConfig, load_config
from amoskys.envelope import ChainState, envelope_digest, seal, signing_message
from amoskys.eventbus.acks import Ack
from amoskys.eventbus.auth import Peer
from amoskys.eventbus.server import Hub, create_server
from amoskys.eventbus.store import ChainRecord
from amoskys.v1 import envelope_pb2, events_pb2

AGENT_ID, HOST, KIND = "web1-proc", "web1", "proc"
CONCURRENCY = 256  # inputs in flight at once (the ones that pass every check wait for their commit)
FINAL_WITHIN_S = 10.0  # the legitimate envelope after the fuzz: served within this, its backoffs honoured
Status = envelope_pb2.PublishAck.Status


def _config(root: Path) -> tuple[EventBusConfig, Peer, Ed25519PrivateKey]:
    """A hub config with its own CA, server cert, trust map (one identity) and store."""
    ca = pki.init_ca(root / "ca", "Fuzz CA", days=30)
    server_key, server_cert = pki.issue(ca, root / "certs", "hub", "server", ["localhost"], 30)
    _client_key, client_cert = pki.issue(ca, root / "certs", AGENT_ID, "client", [], 30)
    signing = keys.generate_signing_key()
    (root / "trust").mkdir()
    (root / "trust" / f"{AGENT_ID}.pub").write_text(keys.public_key_text(signing.public_key()) + "\n")
    document = {
        "listen": "127.0.0.1:0",
        "tls": {"ca": str(root / "ca" / "ca.crt"), "cert": str(server_cert), "key": str(server_key)},
        "trust_map": str(root / "trust"),
        "crl": str(root / "crl.pem"),
        "store": {"path": str(root / "store" / "events.db"), "prune_interval_s": 3600, "synchronous": "normal"},
        "metrics": {"listen": ""},
        "logging": {"level": "error"},
    }
    (root / "eventbus.yml").write_text(yaml.safe_dump(document))
    cert = pki.load_certificate(client_cert)
    peer = Peer(AGENT_ID, cert.serial_number, int(cert.not_valid_after_utc.timestamp()) * 10**9)
    return load_config(root / "eventbus.yml", EventBusConfig, env={}), peer, signing


def _event(rng: random.Random, n: int) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=f"fuzz-{n}-{rng.getrandbits(32):08x}", ts_ns=time.time_ns(), host=HOST, agent=KIND,
        severity=events_pb2.SEVERITY_INFO,
        process=events_pb2.ProcessEvent(action=events_pb2.ProcessEvent.START, pid=n % 32768, name="sh"),
    )  # fmt: skip


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


HUGE_VARINTS = [
    _varint(2**64 - 1),
    _varint(2**63),
    _varint(2**32),
    b"\xff" * 10 + b"\x01",  # over-long: 11 bytes
    b"\xff" * 9 + b"\x7f",  # 2^70-ish: does not fit 64 bits
    b"\x80" * 20,  # never ends
]


class Fuzzer:
    """Builds the inputs: each a mutation of a fresh valid envelope of the agent's chain."""

    def __init__(self, rng: random.Random, key: Ed25519PrivateKey) -> None:
        self.rng, self.key = rng, key
        self.chain = ChainState.fresh()
        self.n = 0
        self.synced: ChainRecord | None = None
        self.mutations: list[tuple[str, Callable[[envelope_pb2.Envelope], bytes]]] = [
            ("bit_flips", self.bit_flips),
            ("truncate", self.truncate),
            ("splice_fields", self.splice_fields),
            ("splice_bytes", self.splice_bytes),
            ("huge_varint", self.huge_varint),
            ("resigned_header_bytes", self.resigned_header_bytes),
            ("resigned_header_fields", self.resigned_header_fields),
            ("resigned_payload_bytes", self.resigned_payload_bytes),
            ("resigned_event_fields", self.resigned_event_fields),
        ]
        self.previous = self.valid(advance=False)

    def valid(self, advance: bool) -> envelope_pb2.Envelope:
        """The next envelope of the chain (the chain moves on only when `advance`)."""
        count = self.rng.choice((1, 1, 2, 5))
        batch = events_pb2.EventBatch(events=[_event(self.rng, self.n + i) for i in range(count)])
        self.n += count
        envelope, chain = seal(AGENT_ID, batch, self.chain, self.key)
        if advance:
            self.chain = chain
        return envelope

    def next_input(self) -> tuple[str, bytes]:
        if self.rng.random() < 0.02:
            return "valid", self.valid(advance=True).SerializeToString()
        name, mutate = self.rng.choice(self.mutations)
        base = self.valid(advance=False)
        raw = mutate(base)
        self.previous = base
        return name, raw

    def follow(self, record: ChainRecord | None) -> None:
        """Adopt the hub's chain whenever it moved (an input was stored, or won a race): the next
        inputs then reach the checks that need a chain to be where it is."""
        if record is not None and record is not self.synced:
            self.adopt(record)

    def adopt(self, record: ChainRecord) -> None:
        """Go on from where the hub's chain is."""
        self.synced = record
        self.chain = ChainState(record.chain_id, record.last_seq, record.last_hash)

    def _sign(self, header: bytes, payload: bytes) -> bytes:
        sig = self.key.sign(signing_message(header, payload))
        return envelope_pb2.Envelope(header=header, payload=payload, sig=sig).SerializeToString()

    def _flip(self, data: bytes, flips: int) -> bytes:
        if not data:
            return data
        out = bytearray(data)
        for _ in range(flips):
            out[self.rng.randrange(len(out))] ^= 1 << self.rng.randrange(8)
        return bytes(out)

    def bit_flips(self, envelope: envelope_pb2.Envelope) -> bytes:
        return self._flip(envelope.SerializeToString(), self.rng.randint(1, 8))

    def truncate(self, envelope: envelope_pb2.Envelope) -> bytes:
        raw = envelope.SerializeToString()
        return raw[: self.rng.randrange(len(raw))]

    def splice_fields(self, envelope: envelope_pb2.Envelope) -> bytes:
        """Header, payload and sig taken from different envelopes (or swapped between fields)."""
        other, rng = self.previous, self.rng
        parts = [envelope.header, envelope.payload, envelope.sig, other.header, other.payload, other.sig, b""]
        header, payload, sig = (rng.choice(parts) for _ in range(3))
        return envelope_pb2.Envelope(header=header, payload=payload, sig=sig).SerializeToString()

    def splice_bytes(self, envelope: envelope_pb2.Envelope) -> bytes:
        raw, other = envelope.SerializeToString(), self.previous.SerializeToString()
        cut, start = self.rng.randrange(len(raw)), self.rng.randrange(len(other))
        return raw[:cut] + other[start : start + self.rng.randrange(1, 64)] + raw[cut:]

    def huge_varint(self, envelope: envelope_pb2.Envelope) -> bytes:
        """A varint field (seq, event_count, version, created_ns, or an unknown one) set to a huge or
        malformed varint, in the header (signed after) or in the envelope itself."""
        field = self.rng.choice((1, 3, 5, 7, 99, 536870911))
        value = self.rng.choice(HUGE_VARINTS)
        tag = _varint(field << 3)
        if self.rng.random() < 0.5:
            return envelope.SerializeToString() + tag + value
        return self._sign(envelope.header + tag + value, envelope.payload)

    def resigned_header_bytes(self, envelope: envelope_pb2.Envelope) -> bytes:
        header = self._flip(envelope.header, self.rng.randint(1, 4))
        if self.rng.random() < 0.3:
            header = header[: self.rng.randrange(len(header) + 1)]
        return self._sign(header, envelope.payload)

    def resigned_header_fields(self, envelope: envelope_pb2.Envelope) -> bytes:
        header = envelope_pb2.EnvelopeHeader.FromString(envelope.header)
        rng = self.rng
        choice = rng.randrange(7)
        if choice == 0:
            header.seq = rng.choice((0, 1, 2, header.seq + 1, header.seq + 2, 2**63 - 1, 2**63, 2**64 - 1))
        elif choice == 1:
            header.event_count = rng.choice((0, 2, 5000, 5001, 2**32 - 1))
        elif choice == 2:
            header.chain_id = rng.choice((b"", b"x" * 15, b"x" * 17, rng.randbytes(16), b"x" * 600))
        elif choice == 3:
            header.prev_hash = rng.choice((b"", bytes(32), rng.randbytes(32), b"y" * 33))
        elif choice == 4:
            header.version = rng.choice((0, 2, 2**32 - 1))
        elif choice == 5:
            header.agent_id = rng.choice(("", "db1-proc", "eventbus", AGENT_ID + "\0", "x" * 300))
        else:
            header.created_ns = rng.choice((-(2**63), 2**63 - 1, 0))
        return self._sign(header.SerializeToString(), envelope.payload)

    def resigned_payload_bytes(self, envelope: envelope_pb2.Envelope) -> bytes:
        return self._sign(envelope.header, self._flip(envelope.payload, self.rng.randint(1, 8)))

    def resigned_event_fields(self, envelope: envelope_pb2.Envelope) -> bytes:
        """A signed batch whose event claims another identity, time, kind, body or size."""
        batch = events_pb2.EventBatch.FromString(envelope.payload)
        event = batch.events[self.rng.randrange(len(batch.events))]
        _mutate_event(self.rng, event)
        return self._sign(envelope.header, batch.SerializeToString())


def _mutate_event(rng: random.Random, event: events_pb2.Event) -> None:
    choice = rng.randrange(12)
    if choice == 0:
        event.host = rng.choice(("db1", "", "web1\0", "WEB1", "x" * 1000))
    elif choice == 1:
        event.agent = rng.choice(("eventbus", "auth", "", "proc ", "host"))
    elif choice == 2:
        event.ts_ns = rng.choice((2**63 - 1, -(2**63), 0, -1, time.time_ns() + 10**12))
    elif choice == 3:
        event.severity = rng.choice((-1, 7, 99, 2**31 - 1))  # type: ignore[assignment]
    elif choice == 4:
        event.alert.CopyFrom(events_pb2.Alert(rule=rng.choice(("bus.chain_break", "auth.brute_force", "proc.x"))))
    elif choice == 5:
        event.auth.CopyFrom(events_pb2.AuthEvent(raw="Accepted password for root", src_port=rng.choice((22, 70000))))
    elif choice == 6:
        event.heartbeat.CopyFrom(events_pb2.Heartbeat(interval_s=rng.choice((0, 1, 86401, 2**32 - 1))))
    elif choice == 7:
        event.ClearField("process")
    elif choice == 8:
        event.event_id = rng.choice(("", "e" * 129, "\u202eevil"))
    elif choice == 9:
        event.labels["pad"] = "x" * rng.choice((10, 70_000))
    elif choice == 10:
        event.host_metrics.CopyFrom(events_pb2.HostMetrics(cpu_percent=rng.choice((float("nan"), float("inf")))))
    else:
        event.process.pid = rng.choice((-(2**31), 2**31 - 1))


def _outcome(ack: envelope_pb2.PublishAck | None, error: BaseException | None) -> str:
    if error is not None:
        return f"EXCEPTION {type(error).__name__}"
    assert ack is not None
    return f"{Status.Name(ack.status)} {ack.reason.split(':')[0]}".strip()


def _forged_rows(db: Path) -> list[tuple[str, str, str]]:
    """Stored events whose host or kind is not the enrolment's (the hub's own alerts apart)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT agent_id, host, agent, body FROM events").fetchall()
    forged = []
    for agent_id, host, agent, body in rows:
        event = events_pb2.Event.FromString(body)
        if agent_id == "eventbus" and agent == "eventbus" and event.agent == "eventbus":
            continue
        if (agent_id, host, agent, event.host, event.agent) != (AGENT_ID, HOST, KIND, HOST, KIND):
            forged.append((agent_id, event.host, event.agent))
    return forged


async def _feed(hub: Hub, peer: Peer, fuzzer: Fuzzer, inputs: int, report: dict[str, object]) -> None:
    outcomes: collections.Counter[str] = collections.Counter()
    by_mutation: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    first_error: list[str] = []

    async def one(name: str, raw: bytes) -> None:
        ack, error = None, None
        try:
            ack = (await hub.handle_envelope(raw, peer)).message()
        except Exception as exc:  # the point of fuzzing: nothing may escape
            error = exc
            if not first_error:
                first_error.append("".join(traceback.format_exception(exc)))
        outcome = _outcome(ack, error)
        outcomes[outcome] += 1
        by_mutation[name][outcome.split()[0]] += 1

    left = inputs

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            fuzzer.follow(hub.ingest.chains.get(AGENT_ID))
            await one(*fuzzer.next_input())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    done = inputs
    elapsed = time.perf_counter() - started
    report.update(
        inputs=done, seconds=round(elapsed, 1), inputs_per_s=round(done / elapsed),
        outcomes=dict(outcomes.most_common()), by_mutation={k: dict(v) for k, v in sorted(by_mutation.items())},
        first_exception=first_error[0] if first_error else None,
    )  # fmt: skip


async def _publish_as_an_agent(hub: Hub, peer: Peer, fuzzer: Fuzzer) -> tuple[envelope_pb2.Envelope, Ack]:
    """The next valid envelope from where the hub's chain is (the fuzzer's own may have run ahead: a valid
    input the hub answered RETRY was never stored), sent as an agent sends: again after each RETRY's
    backoff, for up to FINAL_WITHIN_S."""
    record = hub.ingest.chains.get(AGENT_ID)
    if record is not None:
        fuzzer.adopt(record)
    final = fuzzer.valid(advance=True)
    deadline = time.monotonic() + FINAL_WITHIN_S
    while True:
        ack = await hub.handle_envelope(final.SerializeToString(), peer)
        if ack.status != Status.RETRY or time.monotonic() > deadline:
            return final, ack
        await asyncio.sleep(max(ack.backoff_ms, 10) / 1000)


async def run(inputs: int, seed: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="amoskys-fuzz-") as tmp:
        root = Path(tmp)
        config, peer, key = _config(root)
        hub = create_server(config)
        await hub.start()
        report: dict[str, object] = {"seed": seed}
        fuzzer = Fuzzer(random.Random(seed), key)
        try:
            await _feed(hub, peer, fuzzer, inputs, report)
            final, final_ack = await _publish_as_an_agent(hub, peer, fuzzer)
            report["writer_alive"] = final_ack.status == Status.OK and hub.ingest.failure is None
            report["final_ack"] = _outcome(final_ack.message(), None)
        finally:
            await hub.stop()
        report["stored_events"] = _count(Path(config.store.path))
        forged = _forged_rows(Path(config.store.path))
        report["forged_stored"] = len(forged)
        report["forged_examples"] = forged[:5]
        report["final_chain_digest"] = envelope_digest(final.header, final.payload).hex()[:16]
    return report


def _count(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        count: int = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=int.from_bytes(struct.pack(">d", time.time())[4:], "big"))
    args = parser.parse_args(argv)
    logging.getLogger("amoskys").setLevel(logging.ERROR)  # the hub warns of every fork and break it sees
    report = asyncio.run(run(args.inputs, args.seed))
    print(json.dumps(report, indent=2))
    failed = report["first_exception"] is not None or report["forged_stored"] or not report["writer_alive"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
