"""The agent's outbox: SQLite in the state directory; an event is collected once it is here.

Collected events wait in `events` until the batcher seals them into an envelope (`envelopes`,
with the chain position persisted in the same transaction), and leave only when the hub acks
them. Envelopes the hub calls INVALID move to `dead_letters` and the chain restarts. Agents'
positions (e.g. a log offset) live in `state`, written in the same transaction as their events.

The bounds cover everything stored: `used_bytes` is the sum of the event bodies, the sealed
envelopes and the dead letters (each payload is stored once, inside its signed envelope). When
full (`outbox.max_bytes`) or for data older than `outbox.max_age_days`, the policy is explicit:
`drop_oldest` (default: recent telemetry matters most) deletes the oldest data first (dead
letters, then sealed envelopes, then unsealed events; after dropping sealed envelopes the rest are
re-sealed on a new chain, as after a dead letter, once, before the next envelope is sealed or
sent), `drop_newest` refuses new events and drops from the newest end. Every dropped event is
counted (`dropped` here, a metric, and an `agent.dropped` alert once the hub is reachable).
Nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from google.protobuf.message import DecodeError

from amoskys.config import OutboxConfig
from amoskys.envelope import ChainState, Signer, seal
from amoskys.errors import AmoskysError
from amoskys.v1 import envelope_pb2

__all__ = ["Added", "Outbox", "OutboxError", "SealedEnvelope"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, body BLOB NOT NULL, created_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS envelopes (
    seq INTEGER PRIMARY KEY, chain_id BLOB NOT NULL, raw BLOB NOT NULL, events INTEGER NOT NULL,
    created_ns INTEGER NOT NULL
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


@dataclass(frozen=True, slots=True)
class _Held:
    """A table of held data, in the order drop_oldest empties them: its key, size and event count."""

    table: str
    key: str
    size: str
    events: str


HELD = (
    _Held("dead_letters", "id", "length(raw)", "events"),  # never sent again: the first to go
    _Held("envelopes", "seq", "length(raw)", "events"),
    _Held("events", "id", "length(body)", "1"),
)


BROKEN = b""  # the chain's last_hash (NULL in the file) once the bound dropped envelopes: restarted before use


class OutboxError(AmoskysError):
    """The outbox cannot be written (disk full, I/O error, corrupt file)."""


@dataclass(frozen=True, slots=True)
class SealedEnvelope:
    seq: int
    chain_id: bytes
    raw: bytes
    events: int


class Added(NamedTuple):
    stored: int  # of the events given (the rest were refused: drop_newest)
    dropped: int  # events the bounds dropped, these refused ones and older ones alike


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
            self._drop_payload_copies()
        except sqlite3.Error as exc:
            raise OutboxError(f"{path}: cannot open the outbox: {exc}") from exc
        except OSError as exc:
            raise OutboxError(f"{path}: cannot create the outbox directory: {exc.strerror}") from exc
        self.chain = self._load_chain()
        self.used_bytes = self._scan_bytes()  # kept up to date by every write below

    def _drop_payload_copies(self) -> None:
        """Earlier outboxes kept each sealed payload twice (`envelopes.payload`); the envelope has it."""
        if any(row[1] == "payload" for row in self.db.execute("PRAGMA table_info(envelopes)")):
            self.db.execute("ALTER TABLE envelopes DROP COLUMN payload")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; whatever fails inside it (also a stored envelope that no longer
        parses) rolls it back, and an SQLite error becomes an OutboxError."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            yield self.db
            self.db.execute("COMMIT")
        except BaseException as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
                self._reload()
            if isinstance(exc, sqlite3.Error):
                raise OutboxError(f"{self.path}: {exc}") from exc
            raise

    def _reload(self) -> None:
        """After a rollback: the chain and the byte count as stored, not as the failed write left them."""
        with contextlib.suppress(sqlite3.Error):
            self.chain = self._load_chain()
            self.used_bytes = self._scan_bytes()

    def _load_chain(self) -> ChainState:
        row = self.db.execute("SELECT chain_id, last_seq, last_hash FROM chain WHERE id = 1").fetchone()
        if row is None:
            return self._new_chain()
        return ChainState(bytes(row[0]), int(row[1]), BROKEN if row[2] is None else bytes(row[2]))

    def _new_chain(self) -> ChainState:
        chain = ChainState.fresh()
        self.db.execute(
            "INSERT INTO chain (id, chain_id, last_seq, last_hash) VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE "
            "SET chain_id = excluded.chain_id, last_seq = excluded.last_seq, last_hash = excluded.last_hash",
            (chain.chain_id, chain.last_seq, chain.last_hash),
        )
        return chain

    # ---- collecting and the bounds ------------------------------------------------------------------

    def add(self, bodies: Sequence[bytes], state: dict[str, str] | None = None) -> Added:
        """Store serialized events (and the agent's position) in one transaction; say how many were stored
        and how many events the bounds dropped (the oldest under drop_oldest, the newest under drop_newest)."""
        now = time.time_ns()
        with self._tx() as db:
            dropped = self._drop_aged(db)
            accepted = self._fitting(bodies) if self.config.when_full == "drop_newest" else list(bodies)
            dropped += len(bodies) - len(accepted)
            db.executemany("INSERT INTO events (body, created_ns) VALUES (?, ?)", [(b, now) for b in accepted])
            self.used_bytes += sum(len(b) for b in accepted)
            dropped += self._keep_bound(db)
            self._count(db, "dropped", dropped)
            for key, value in (state or {}).items():
                db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))
        return Added(len(accepted), dropped)

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
        """Drop data collected more than max_age_days ago, wherever it is held."""
        cutoff = time.time_ns() - int(self.config.max_age_days * 86400 * 1e9)
        dropped = 0
        for held in HELD:
            oldest = db.execute(f"SELECT created_ns FROM {held.table} ORDER BY {held.key} LIMIT 1").fetchone()  # noqa: S608
            if oldest and oldest[0] < cutoff:
                dropped += self._drop_rows(db, held, "created_ns < ?", cutoff)
        return dropped

    def _keep_bound(self, db: sqlite3.Connection, reserve: int = 0) -> int:
        """Drop whole rows until used_bytes + reserve <= max_bytes: from the old end of HELD under
        drop_oldest, else from the new end; return the events dropped."""
        newest = self.config.when_full == "drop_newest"
        dropped = 0
        for held in reversed(HELD) if newest else HELD:
            excess = self.used_bytes + reserve - self.config.max_bytes
            if excess <= 0:
                break
            last = self._last_to_drop(db, held, excess, newest)
            if last is not None:
                dropped += self._drop_rows(db, held, f"{held.key} {'>=' if newest else '<='} ?", last)
        return dropped

    @staticmethod
    def _last_to_drop(db: sqlite3.Connection, held: _Held, excess: int, newest: bool) -> int | None:
        """The key of the last row to drop from one end of `held` to free `excess` bytes (or all of it)."""
        order = "DESC" if newest else "ASC"
        rows = db.execute(f"SELECT {held.key}, {held.size} FROM {held.table} ORDER BY {held.key} {order}")  # noqa: S608
        freed, last = 0, None
        for key, size in rows:
            if freed >= excess:
                break
            freed += size
            last = key
        rows.close()
        return last

    def _drop_rows(self, db: sqlite3.Connection, held: _Held, condition: str, value: int) -> int:
        """Delete the rows of `held` matching `condition`. Dropped envelopes break the chain: it is marked
        (last_hash NULL) and restarted when next sealed or sent, once however often the bound drops."""
        where = f"FROM {held.table} WHERE {condition}"  # fixed names and conditions
        query = f"SELECT count(*), coalesce(sum({held.events}), 0), coalesce(sum({held.size}), 0) {where}"
        rows, events, size = db.execute(query, (value,)).fetchone()
        db.execute(f"DELETE {where}", (value,))
        self.used_bytes -= int(size)
        if rows and held.table == "envelopes":
            db.execute("UPDATE chain SET last_hash = NULL WHERE id = 1")
            self.chain = ChainState(self.chain.chain_id, self.chain.last_seq, BROKEN)
        return int(events)

    def _scan_bytes(self) -> int:
        parts = " + ".join(f"(SELECT coalesce(sum({h.size}), 0) FROM {h.table})" for h in HELD)  # noqa: S608
        return int(self.db.execute(f"SELECT {parts}").fetchone()[0])

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

    def sealed_count(self) -> int:
        """Envelopes sealed and not yet acked."""
        return int(self.db.execute("SELECT count(*) FROM envelopes").fetchone()[0])

    def seal(self, max_events: int) -> tuple[SealedEnvelope | None, int]:
        """Seal up to `max_events` of the oldest events into the chain's next envelope; return it (None if
        nothing waits) and how many events the bound dropped to make room for its framing (header,
        signature, a few bytes an event), which the events' own bytes do not cover."""
        with self._tx() as db:
            dropped = 0
            while True:
                self._mend_chain(db)
                rows = db.execute(
                    "SELECT id, body, created_ns FROM events ORDER BY id LIMIT ?", (max_events,)
                ).fetchall()
                if not rows:
                    break
                bodies = [bytes(body) for _, body, _ in rows]
                size = sum(len(b) for b in bodies)
                raw, chain = self._sign(_payload(bodies), len(bodies))
                if self.used_bytes + len(raw) - size <= self.config.max_bytes:
                    db.execute("DELETE FROM events WHERE id <= ?", (rows[-1][0],))
                    self.used_bytes += len(raw) - size
                    self._count(db, "dropped", dropped)
                    return self._append(db, raw, chain, len(rows), int(rows[0][2])), dropped
                freed = self._keep_bound(db, reserve=len(raw) - size)
                if not freed:  # cannot happen while events are held; never loop on it
                    break
                dropped += freed
            self._count(db, "dropped", dropped)
        return None, dropped

    def _sign(self, payload: bytes, count: int) -> tuple[bytes, ChainState]:
        """The signed envelope that would come next in the chain, and the chain after it."""
        envelope, chain = seal(self.agent_id, payload, self.chain, self.signing_key, count)
        return envelope.SerializeToString(), chain

    def _advance(self, db: sqlite3.Connection, chain: ChainState) -> None:
        db.execute("UPDATE chain SET last_seq = ?, last_hash = ? WHERE id = 1", (chain.last_seq, chain.last_hash))
        self.chain = chain

    def _append(
        self, db: sqlite3.Connection, raw: bytes, chain: ChainState, count: int, created_ns: int
    ) -> SealedEnvelope:
        """Store a signed envelope as the chain's next; `created_ns` is when its oldest event was collected."""
        db.execute(
            "INSERT INTO envelopes (seq, chain_id, raw, events, created_ns) VALUES (?, ?, ?, ?, ?)",
            (chain.last_seq, chain.chain_id, raw, count, created_ns),
        )
        self._advance(db, chain)
        return SealedEnvelope(chain.last_seq, chain.chain_id, raw, count)

    def _mend_chain(self, db: sqlite3.Connection) -> None:
        if self.chain.last_hash == BROKEN:
            self._restart_chain(db)

    def unacked(self, after_seq: int = 0, limit: int = 64) -> list[SealedEnvelope]:
        """Sealed envelopes after `after_seq`, in order (re-sealed first if the bound dropped some)."""
        if self.chain.last_hash == BROKEN:
            with self._tx() as db:
                self._mend_chain(db)
        rows = self.db.execute(
            "SELECT seq, chain_id, raw, events FROM envelopes WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
        ).fetchall()
        return [SealedEnvelope(int(s), bytes(c), bytes(r), int(n)) for s, c, r, n in rows]

    def ack(self, seq: int, chain_id: bytes) -> int:
        """Forget envelopes up to `seq` of chain `chain_id` (the hub has them); return their event count.
        An ack for a chain restarted since (dead letter, drop) forgets nothing."""
        with self._tx() as db:
            row = db.execute(
                "SELECT coalesce(sum(events), 0), coalesce(sum(length(raw)), 0) FROM envelopes "
                "WHERE chain_id = ? AND seq <= ?",
                (chain_id, seq),
            ).fetchone()
            db.execute("DELETE FROM envelopes WHERE chain_id = ? AND seq <= ?", (chain_id, seq))
            self._count(db, "acked", int(row[0]))
            self.used_bytes -= int(row[1])
        return int(row[0])

    def dead_letter(self, seq: int, reason: str) -> None:
        """Keep an envelope the hub refused for good, then restart the chain for the rest."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO dead_letters (seq, chain_id, raw, events, reason, created_ns) "
                "SELECT seq, chain_id, raw, events, ?, created_ns FROM envelopes WHERE seq = ?",
                (reason, seq),
            )
            db.execute("DELETE FROM envelopes WHERE seq = ?", (seq,))
            self._count(db, "dead_letters", 1)
            self._restart_chain(db)

    def restart_chain(self) -> None:
        """A new chain (seq 1): the hub lost ours, or an envelope was dead-lettered or dropped."""
        with self._tx() as db:
            self._restart_chain(db)

    def _restart_chain(self, db: sqlite3.Connection) -> None:
        """Re-seal the envelopes still held, in order, as seq 1, 2, ... of a new chain (one at a time: the
        new seq is never above the old one, so renumbering in order cannot collide)."""
        seqs = [int(row[0]) for row in db.execute("SELECT seq FROM envelopes ORDER BY seq")]
        self.chain = self._new_chain()
        for old_seq in seqs:
            raw, count = db.execute("SELECT raw, events FROM envelopes WHERE seq = ?", (old_seq,)).fetchone()
            new_raw, chain = self._sign(self._stored_payload(old_seq, raw), int(count))
            db.execute(
                "UPDATE envelopes SET seq = ?, chain_id = ?, raw = ? WHERE seq = ?",
                (chain.last_seq, chain.chain_id, new_raw, old_seq),
            )
            self._advance(db, chain)
        self.used_bytes = self._scan_bytes()

    def _stored_payload(self, seq: int, raw: bytes) -> bytes:
        try:
            return envelope_pb2.Envelope.FromString(raw).payload
        except DecodeError as exc:
            raise OutboxError(f"{self.path}: sealed envelope {seq} is corrupt ({exc}); nothing was changed") from exc

    def sizes(self) -> tuple[int, int]:
        """(events waiting: unsealed + sealed-unacked, bytes used)."""
        row = self.db.execute(
            "SELECT (SELECT count(*) FROM events) + (SELECT coalesce(sum(events), 0) FROM envelopes)"
        ).fetchone()
        return int(row[0]), self.used_bytes

    def dead_letter_count(self) -> int:
        """Envelopes dead-lettered since the outbox was created (some may since have been dropped)."""
        return self.counter("dead_letters")

    def close(self) -> None:
        self.db.close()
