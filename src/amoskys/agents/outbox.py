"""The agent's outbox: SQLite in the state directory; an event is collected once it is here.

Collected events wait in `events` until the batcher seals them into an envelope (`envelopes`,
with the chain position persisted in the same transaction), and leave only when the hub acks
them. Envelopes the hub calls INVALID move to `dead_letters` and the chain restarts. Agents'
positions (e.g. a log offset) live in `state`, written in the same transaction as their events.

When full (`outbox.max_bytes`) or for events older than `outbox.max_age_days`, the policy is
explicit: `drop_oldest` (default: recent telemetry matters most) deletes the oldest unsent
events, `drop_newest` refuses new ones. Every drop is counted (`dropped` here, a metric, and an
`agent.dropped` alert once the hub is reachable). Nothing is dropped silently.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from amoskys.config import OutboxConfig
from amoskys.envelope import ChainState, Signer, seal
from amoskys.errors import AmoskysError

__all__ = ["Outbox", "OutboxError", "SealedEnvelope"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, body BLOB NOT NULL, created_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS envelopes (
    seq INTEGER PRIMARY KEY, chain_id BLOB NOT NULL, raw BLOB NOT NULL, payload BLOB NOT NULL,
    events INTEGER NOT NULL, created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, chain_id BLOB NOT NULL, raw BLOB NOT NULL,
    events INTEGER NOT NULL, reason TEXT NOT NULL, created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chain (id INTEGER PRIMARY KEY CHECK (id = 1), chain_id BLOB, last_seq INTEGER,
                                  last_hash BLOB);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class OutboxError(AmoskysError):
    """The outbox cannot be written (disk full, I/O error, corrupt file)."""


@dataclass(frozen=True, slots=True)
class SealedEnvelope:
    seq: int
    chain_id: bytes
    raw: bytes
    events: int


def _payload(bodies: Sequence[bytes]) -> bytes:
    """EventBatch bytes from serialized events: field 1, length-delimited, in order."""
    parts = []
    for body in bodies:
        parts.append(b"\x0a" + _varint(len(body)) + body)
    return b"".join(parts)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class Outbox:
    def __init__(self, path: Path, config: OutboxConfig, agent_id: str, signing_key: Signer) -> None:
        self.path = path
        self.config = config
        self.agent_id = agent_id
        self.signing_key = signing_key
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise OutboxError(f"{path}: cannot open the outbox: {exc}") from exc
        except OSError as exc:
            raise OutboxError(f"{path}: cannot create the outbox directory: {exc.strerror}") from exc
        self.chain = self._load_chain()
        self.used_bytes = self._scan_bytes()  # kept up to date by every write below

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            yield self.db
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise OutboxError(f"{self.path}: {exc}") from exc

    def _load_chain(self) -> ChainState:
        row = self.db.execute("SELECT chain_id, last_seq, last_hash FROM chain WHERE id = 1").fetchone()
        if row is None:
            return self._new_chain()
        return ChainState(bytes(row[0]), int(row[1]), bytes(row[2]))

    def _new_chain(self) -> ChainState:
        chain = ChainState.fresh()
        self.db.execute(
            "INSERT INTO chain (id, chain_id, last_seq, last_hash) VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE "
            "SET chain_id = excluded.chain_id, last_seq = excluded.last_seq, last_hash = excluded.last_hash",
            (chain.chain_id, chain.last_seq, chain.last_hash),
        )
        return chain

    # ---- collecting ----------------------------------------------------------------------------

    def add(self, bodies: Sequence[bytes], state: dict[str, str] | None = None) -> int:
        """Store serialized events (and the agent's position) in one transaction; return how many events
        the bounds dropped (old ones under drop_oldest, these new ones under drop_newest)."""
        now = time.time_ns()
        with self._tx() as db:
            dropped = self._drop_aged(db)
            if self.config.when_full == "drop_newest":
                accepted = self._fitting(bodies)
                dropped += len(bodies) - len(accepted)
            else:
                accepted = list(bodies)
            db.executemany("INSERT INTO events (body, created_ns) VALUES (?, ?)", [(b, now) for b in accepted])
            self.used_bytes += sum(len(b) for b in accepted)
            if self.used_bytes > self.config.max_bytes:
                dropped += self._drop_oldest(db, self.used_bytes - self.config.max_bytes)
            self._count(db, "dropped", dropped)
            for key, value in (state or {}).items():
                db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))
        return dropped

    def _fitting(self, bodies: Sequence[bytes]) -> list[bytes]:
        """The leading events that fit in the room left (drop_newest keeps what it already has)."""
        room = self.config.max_bytes - self.used_bytes
        accepted = []
        for body in bodies:
            room -= len(body)
            if room < 0:
                break
            accepted.append(body)
        return accepted

    def _drop_aged(self, db: sqlite3.Connection) -> int:
        cutoff = time.time_ns() - int(self.config.max_age_days * 86400 * 1e9)
        oldest = db.execute("SELECT created_ns FROM events ORDER BY id LIMIT 1").fetchone()
        return self._drop_where(db, "created_ns < ?", cutoff) if oldest and oldest[0] < cutoff else 0

    def _drop_where(self, db: sqlite3.Connection, condition: str, value: int) -> int:
        query = f"SELECT count(*), coalesce(sum(length(body)), 0) FROM events WHERE {condition}"  # noqa: S608
        count, size = db.execute(query, (value,)).fetchone()
        db.execute(f"DELETE FROM events WHERE {condition}", (value,))  # noqa: S608 - fixed conditions
        self.used_bytes -= int(size)
        return int(count)

    def _drop_oldest(self, db: sqlite3.Connection, excess: int) -> int:
        freed, last_id = 0, None
        for event_id, size in db.execute("SELECT id, length(body) FROM events ORDER BY id"):
            if freed >= excess:
                break
            freed += size
            last_id = event_id
        return self._drop_where(db, "id <= ?", last_id) if last_id is not None else 0

    def _scan_bytes(self) -> int:
        row = self.db.execute(
            "SELECT (SELECT coalesce(sum(length(body)), 0) FROM events) + "
            "(SELECT coalesce(sum(length(raw)), 0) FROM envelopes)"
        ).fetchone()
        return int(row[0])

    @staticmethod
    def _count(db: sqlite3.Connection, name: str, delta: int) -> None:
        if delta:
            db.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (name, delta),
            )

    def state(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM state").fetchall())

    def counter(self, name: str) -> int:
        row = self.db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def take_counter(self, name: str) -> int:
        """Read and reset a counter (e.g. drops not yet reported)."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
            db.execute("DELETE FROM counters WHERE name = ?", (name,))
        return int(row[0]) if row else 0

    def bump(self, name: str, delta: int = 1) -> None:
        with self._tx() as db:
            self._count(db, name, delta)

    # ---- sealing and sending ----------------------------------------------------------------------

    def pending_events(self, cap: int = 1_000_000_000) -> tuple[int, int]:
        """(count up to `cap`, created_ns of the oldest) of events not yet sealed; cheap for small caps."""
        count = self.db.execute("SELECT count(*) FROM (SELECT 1 FROM events LIMIT ?)", (cap,)).fetchone()[0]
        oldest = self.db.execute("SELECT created_ns FROM events ORDER BY id LIMIT 1").fetchone()
        return int(count), int(oldest[0]) if oldest else 0

    def seal(self, max_events: int) -> SealedEnvelope | None:
        """Seal up to `max_events` of the oldest events into the chain's next envelope."""
        with self._tx() as db:
            rows = db.execute("SELECT id, body FROM events ORDER BY id LIMIT ?", (max_events,)).fetchall()
            if not rows:
                return None
            bodies = [bytes(body) for _, body in rows]
            envelope = self._seal_payload(db, _payload(bodies), len(rows))
            db.execute("DELETE FROM events WHERE id <= ?", (rows[-1][0],))
            self.used_bytes += len(envelope.raw) - sum(len(b) for b in bodies)
        return envelope

    def _seal_payload(self, db: sqlite3.Connection, payload: bytes, count: int) -> SealedEnvelope:
        chain = ChainState(self.chain.chain_id, self.chain.last_seq, self.chain.last_hash)
        raw = seal(self.agent_id, payload, chain, self.signing_key, count).SerializeToString()
        db.execute(
            "INSERT INTO envelopes (seq, chain_id, raw, payload, events, created_ns) VALUES (?, ?, ?, ?, ?, ?)",
            (chain.last_seq, chain.chain_id, raw, payload, count, time.time_ns()),
        )
        db.execute("UPDATE chain SET last_seq = ?, last_hash = ? WHERE id = 1", (chain.last_seq, chain.last_hash))
        self.chain = chain
        return SealedEnvelope(chain.last_seq, chain.chain_id, raw, count)

    def unacked(self, after_seq: int = 0, limit: int = 64) -> list[SealedEnvelope]:
        rows = self.db.execute(
            "SELECT seq, chain_id, raw, events FROM envelopes WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
        ).fetchall()
        return [SealedEnvelope(int(s), bytes(c), bytes(r), int(n)) for s, c, r, n in rows]

    def ack(self, seq: int) -> int:
        """Forget envelopes up to `seq` (the hub has them); return their event count."""
        with self._tx() as db:
            row = db.execute(
                "SELECT coalesce(sum(events), 0), coalesce(sum(length(raw)), 0) FROM envelopes WHERE seq <= ?", (seq,)
            ).fetchone()
            db.execute("DELETE FROM envelopes WHERE seq <= ?", (seq,))
            self._count(db, "acked", int(row[0]))
            self.used_bytes -= int(row[1])
        return int(row[0])

    def dead_letter(self, seq: int, reason: str) -> None:
        """Keep an envelope the hub refused for good, then restart the chain for the rest."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO dead_letters (seq, chain_id, raw, events, reason, created_ns) "
                "SELECT seq, chain_id, raw, events, ?, ? FROM envelopes WHERE seq = ?",
                (reason, time.time_ns(), seq),
            )
            db.execute("DELETE FROM envelopes WHERE seq = ?", (seq,))
            self._count(db, "dead_letters", 1)
            self._restart_chain(db)

    def restart_chain(self) -> None:
        """A new chain (seq 1): the hub lost ours, or an envelope was dead-lettered."""
        with self._tx() as db:
            self._restart_chain(db)

    def _restart_chain(self, db: sqlite3.Connection) -> None:
        pending = db.execute("SELECT payload, events FROM envelopes ORDER BY seq").fetchall()
        db.execute("DELETE FROM envelopes")
        self.chain = self._new_chain()
        for payload, count in pending:
            self._seal_payload(db, bytes(payload), int(count))
        self.used_bytes = self._scan_bytes()

    def sizes(self) -> tuple[int, int]:
        """(events waiting: unsealed + sealed-unacked, bytes used)."""
        row = self.db.execute(
            "SELECT (SELECT count(*) FROM events) + (SELECT coalesce(sum(events), 0) FROM envelopes)"
        ).fetchone()
        return int(row[0]), self.used_bytes

    def dead_letter_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM dead_letters").fetchone()[0])

    def close(self) -> None:
        self.db.close()
