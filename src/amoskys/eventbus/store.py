"""Durable event storage behind a small interface; SQLite in WAL mode is the embedded default.

Only the ingest writer thread writes (one connection); queries use per-thread read connections,
which WAL lets run beside the writer. Another sink (e.g. NATS JetStream) implements `Store`.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from amoskys.eventbus.rows import EventRow
from amoskys.v1 import bus_pb2, events_pb2

__all__ = [
    "AcceptedEnvelope",
    "AgentUpdate",
    "ChainRecord",
    "SqliteStore",
    "Store",
    "StoreFullError",
    "StoreReads",
    "StoreUnavailableError",
    "TextIndex",
]

log = logging.getLogger(__name__)

TextIndex = Literal["trigram", "none"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts_ns INTEGER NOT NULL,
    received_ns INTEGER NOT NULL,
    host TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    agent TEXT NOT NULL,
    kind TEXT NOT NULL,
    severity INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    text TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts_ns);
CREATE INDEX IF NOT EXISTS events_host_ts ON events (host, ts_ns);
CREATE INDEX IF NOT EXISTS events_agent_ts ON events (agent_id, ts_ns);
CREATE INDEX IF NOT EXISTS events_kind_ts ON events (kind, ts_ns);
CREATE INDEX IF NOT EXISTS events_notable_ts ON events (ts_ns) WHERE severity >= 4;
CREATE TABLE IF NOT EXISTS envelopes (
    agent_id TEXT NOT NULL,
    chain_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    digest BLOB NOT NULL,
    received_ns INTEGER NOT NULL,
    PRIMARY KEY (agent_id, chain_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS envelopes_received ON envelopes (received_ns);
CREATE TABLE IF NOT EXISTS chains (
    agent_id TEXT PRIMARY KEY,
    chain_id BLOB NOT NULL,
    last_seq INTEGER NOT NULL,
    last_hash BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY,
    host TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT '',
    version TEXT NOT NULL DEFAULT '',
    first_seen_ns INTEGER NOT NULL,
    last_seen_ns INTEGER NOT NULL,
    last_heartbeat_ns INTEGER NOT NULL DEFAULT 0,
    heartbeat_interval_s INTEGER NOT NULL DEFAULT 0,
    events_total INTEGER NOT NULL DEFAULT 0,
    envelopes_total INTEGER NOT NULL DEFAULT 0,
    alerts_total INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0,
    cert_not_after_ns INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stream_positions (
    stream TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending_parts (
    first_id INTEGER PRIMARY KEY,
    last_id INTEGER NOT NULL
);
"""
# `pending_parts`: the event ids reserved by a commit made in parts (`commit_parts`) whose last part has not
# committed yet. Written with its first part, deleted with its last; a row found when the store opens is a
# commit cut short (a crash): its events are deleted, and as its envelopes were neither recorded nor acked,
# their agents send them again.

# Text search index: every 3-character sequence of `events.text` (already lower-cased, so case_sensitive 1),
# without positions (detail=none: half the size and twice the insert rate of detail=full); a needle
# becomes the AND of its trigrams, and `instr` keeps the exact substring meaning on the rows found.
# External content: the index keeps no copy of the text. `commit` and `prune` update it with one
# statement each in their own transaction (triggers would cost 6x: FTS5 writes its pending terms out
# at every statement, and a trigger is one statement per row).
# FTS5 reads a text only up to a NUL, which is why `searchable_text` writes none.
BUILD_TEXT_INDEX = """
BEGIN IMMEDIATE;
CREATE VIRTUAL TABLE events_fts USING fts5(
    text, content='events', content_rowid='id', tokenize='trigram case_sensitive 1', detail=none, columnsize=0
);
INSERT INTO events_fts (events_fts) VALUES ('rebuild');
COMMIT;
"""
DROP_TEXT_INDEX = "DROP TABLE events_fts"
INDEX_NEW_EVENTS = (
    "INSERT INTO events_fts (rowid, text) SELECT id, text FROM events WHERE id BETWEEN ? AND ? AND text != ''"
)
PRUNE_OLD = "SELECT id FROM events WHERE received_ns < ? ORDER BY id LIMIT ?"
PRUNE_OLDEST = "SELECT id FROM events ORDER BY id LIMIT ?"
TRIGRAM = 3
MAX_NEEDLE_TRIGRAMS = 16  # a longer needle is narrowed by its first 16 distinct trigrams, then `instr`
INDEX_PROBE = 5000  # more candidates than this: scan newest-first with `instr` (a common word fills a page fast)

INSERT_EVENT = (
    "INSERT INTO events (id, ts_ns, received_ns, host, agent_id, agent, kind, severity, event_id, text, body) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The first id a commit may not show yet (Subscribe replay stops before it): the lowest id reserved by a
# commit still in parts. Ids are handed out in order, so every id below it is final.
HORIZON = "(SELECT coalesce(min(first_id), 9223372036854775807) FROM pending_parts)"
UPSERT_AGENT = """
INSERT INTO agents (agent_id, host, kind, version, first_seen_ns, last_seen_ns, last_heartbeat_ns,
                    heartbeat_interval_s, events_total, envelopes_total, alerts_total, last_seq,
                    cert_not_after_ns)
VALUES (:agent_id, :host, :kind, :version, :now, :now, :heartbeat_ns, :interval_s, :events, 1, :alerts,
        :seq, :cert_not_after_ns)
ON CONFLICT (agent_id) DO UPDATE SET
    host = CASE WHEN excluded.host != '' THEN excluded.host ELSE host END,
    kind = CASE WHEN excluded.kind != '' THEN excluded.kind ELSE kind END,
    version = CASE WHEN excluded.version != '' THEN excluded.version ELSE version END,
    last_seen_ns = excluded.last_seen_ns,
    last_heartbeat_ns = MAX(last_heartbeat_ns, excluded.last_heartbeat_ns),
    heartbeat_interval_s = CASE WHEN excluded.heartbeat_interval_s > 0
                                THEN excluded.heartbeat_interval_s ELSE heartbeat_interval_s END,
    events_total = events_total + excluded.events_total,
    envelopes_total = envelopes_total + excluded.envelopes_total,
    alerts_total = alerts_total + excluded.alerts_total,
    last_seq = excluded.last_seq,
    cert_not_after_ns = CASE WHEN excluded.cert_not_after_ns > 0
                             THEN excluded.cert_not_after_ns ELSE cert_not_after_ns END
"""
EVENT_COLUMNS = "id, agent_id, received_ns, body"
AGENT_COLUMNS = (
    "agent_id", "host", "kind", "version", "first_seen_ns", "last_seen_ns", "last_heartbeat_ns",
    "heartbeat_interval_s", "events_total", "envelopes_total", "last_seq", "alerts_total", "cert_not_after_ns",
)  # fmt: skip
PRUNE_CHUNK = 20_000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # SQLite INTEGER
MAX_TOKEN_CHARS = 64  # base64 of "ts:cursor", two int64s
NOTABLE_SEVERITY = 4  # SEVERITY_WARNING: warnings and worse have their own (small, partial) index


class StoreUnavailableError(Exception):
    """The store cannot take writes now (disk full, I/O error); nothing was written."""


class StoreFullError(StoreUnavailableError):
    """The filesystem under the store is full."""


@dataclass(frozen=True, slots=True)
class ChainRecord:
    chain_id: bytes
    last_seq: int
    last_hash: bytes


@dataclass(slots=True)
class AgentUpdate:
    """Registry facts carried by one accepted envelope."""

    host: str = ""
    kind: str = ""
    version: str = ""
    heartbeat_ns: int = 0
    interval_s: int = 0
    events: int = 0
    alerts: int = 0
    cert_not_after_ns: int = 0


@dataclass(slots=True)
class AcceptedEnvelope:
    """One envelope to store: its events, its chain position, its registry facts."""

    agent_id: str
    chain_id: bytes
    seq: int
    digest: bytes
    rows: Sequence[EventRow]
    agent: AgentUpdate = field(default_factory=AgentUpdate)
    first_cursor: int = 0


class Store(Protocol):
    def load_chains(self) -> dict[str, ChainRecord]: ...
    def stored_digest(self, agent_id: str, chain_id: bytes, seq: int) -> bytes | None: ...
    def commit(
        self,
        accepted: Sequence[AcceptedEnvelope],
        chains: dict[str, ChainRecord],
        now_ns: int,
        position: tuple[str, int] | None = None,
    ) -> None: ...
    def commit_parts(
        self, accepted: Sequence[AcceptedEnvelope], chains: dict[str, ChainRecord], now_ns: int, part_events: int
    ) -> Iterator[None]: ...
    def query(
        self, flt: bus_pb2.EventFilter, page_size: int, page_token: str
    ) -> tuple[list[bus_pb2.StoredEvent], str]: ...
    def after_cursor(self, cursor: int, flt: bus_pb2.EventFilter, limit: int) -> list[bus_pb2.StoredEvent]: ...
    def first_cursor_since(self, since_ns: int) -> int: ...
    def last_cursor(self) -> int: ...
    def list_agents(self) -> list[bus_pb2.AgentInfo]: ...
    def count_events(self) -> int: ...
    def size_bytes(self) -> int: ...
    def prune(self, older_than_ns: int, max_bytes: int) -> int: ...
    def checkpoint(self) -> None: ...
    def close(self) -> None: ...


def _encode_token(ts_ns: int, cursor: int) -> str:
    return base64.urlsafe_b64encode(f"{ts_ns}:{cursor}".encode()).decode()


def _decode_token(token: str) -> tuple[int, int]:
    """(ts_ns, cursor) of a page token; ValueError for anything that is not one of ours."""
    try:
        if len(token) > MAX_TOKEN_CHARS:
            raise ValueError(token)
        ts_text, _, cursor_text = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        ts_ns, cursor = int(ts_text), int(cursor_text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("invalid page token") from exc
    if not (INT64_MIN <= ts_ns <= INT64_MAX and 0 <= cursor <= INT64_MAX):
        raise ValueError("invalid page token")
    return ts_ns, cursor


def _where(flt: bus_pb2.EventFilter) -> tuple[list[str], list[object]]:
    """SQL conditions for a filter (all conjunctive); the text condition is a plain substring scan."""
    clauses: list[str] = []
    params: list[object] = []
    if flt.since_ns:
        clauses.append("ts_ns >= ?")
        params.append(flt.since_ns)
    if flt.until_ns:
        clauses.append("ts_ns < ?")
        params.append(flt.until_ns)
    for column, values in (
        ("host", flt.hosts),
        ("agent_id", flt.agent_ids),
        ("kind", flt.kinds),
        ("agent", flt.agents),
    ):
        if values:
            clauses.append(f"{column} IN ({', '.join('?' * len(values))})")
            params.extend(values)
    if flt.min_severity:
        clauses.append("severity >= ?")
        params.append(int(flt.min_severity))
        if flt.min_severity >= NOTABLE_SEVERITY:
            clauses.append(f"severity >= {NOTABLE_SEVERITY}")  # lets SQLite use the partial index
    if flt.text:
        clauses.append("instr(text, ?) > 0")
        params.append(flt.text.lower())
    return clauses, params


def _trigram_query(needle: str) -> str | None:
    """An FTS5 query for rows holding every trigram of `needle` (None when the index cannot narrow it)."""
    if len(needle) < TRIGRAM or "\0" in needle:  # FTS5 reads its query string up to the first NUL
        return None
    grams = dict.fromkeys(needle[i : i + TRIGRAM] for i in range(len(needle) - TRIGRAM + 1))
    return " AND ".join('"' + gram.replace('"', '""') + '"' for gram in list(grams)[:MAX_NEEDLE_TRIGRAMS])


def _stored(row: tuple[int, str, int, bytes]) -> bus_pb2.StoredEvent:
    return bus_pb2.StoredEvent(
        cursor=row[0], agent_id=row[1], received_ns=row[2], event=events_pb2.Event.FromString(row[3])
    )


class SqliteStore:
    """The embedded store: one SQLite database in WAL mode."""

    def __init__(self, path: Path, synchronous: str = "full", text_index: TextIndex = "trigram") -> None:
        self.path = path
        self.synchronous = synchronous
        self.text_index = text_index
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = self._connect()
        self._writer.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints run beside, not inside, commits
        self._checkpointer: sqlite3.Connection | None = None
        self._readers = threading.local()
        self._all_readers: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._reserved_through = 0  # the highest event id handed out (a commit in parts reserves its ids ahead)
        self._stranded: list[int] = []  # `pending_parts` of failed commits not deleted yet (disk full)
        with self._writer:
            self._writer.executescript(SCHEMA)
        self._apply_text_index()
        self._discard_unfinished()

    def _discard_unfinished(self) -> None:
        """Delete the events of commits in parts that were cut short (a crash between parts): none of their
        envelopes was recorded or acked, so their agents send them again and they are stored once."""
        ranges = self._writer.execute("SELECT first_id, last_id FROM pending_parts").fetchall()
        if not ranges:
            return
        deleted = sum(self._discard(first, last) for first, last in ranges)
        log.warning("deleted the events of a commit cut short between its parts", extra={"events": deleted})

    def _discard(self, first: int, last: int) -> int:
        """Delete the events reserved from `first` to `last` and the reservation, in one transaction."""
        with self._transaction() as conn:
            deleted = self._delete(conn, "SELECT id FROM events WHERE id BETWEEN ? AND ?", (first, last))
            conn.execute("DELETE FROM pending_parts WHERE first_id = ?", (first,))
        return deleted

    def _apply_text_index(self) -> None:
        """Build the text index once when it is wanted and missing (a store from before it); drop it when not."""
        conn = self._writer
        exists = conn.execute("SELECT 1 FROM sqlite_schema WHERE name = 'events_fts'").fetchone() is not None
        if exists == (self.text_index == "trigram"):
            return
        if exists:
            conn.execute(DROP_TEXT_INDEX)
            log.info("text index dropped (store.text_index: none)", extra={"path": str(self.path)})
            return
        started = time.monotonic()
        log.info("building the text index", extra={"path": str(self.path), "events": self.count_events()})
        conn.executescript(BUILD_TEXT_INDEX)  # from the rows already stored (none in a new store)
        log.info("text index built", extra={"path": str(self.path), "seconds": round(time.monotonic() - started, 1)})

    def _connect(self) -> sqlite3.Connection:
        fresh = not self.path.exists()
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        if fresh:
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {'FULL' if self.synchronous == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA cache_size = -65536")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._readers, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only = 1")
            self._readers.conn = conn
            with self._lock:
                self._all_readers.append(conn)
        return conn

    def load_chains(self) -> dict[str, ChainRecord]:
        rows = self._writer.execute("SELECT agent_id, chain_id, last_seq, last_hash FROM chains")
        return {agent: ChainRecord(bytes(chain), seq, bytes(last)) for agent, chain, seq, last in rows}

    def stored_digest(self, agent_id: str, chain_id: bytes, seq: int) -> bytes | None:
        row = self._writer.execute(
            "SELECT digest FROM envelopes WHERE agent_id = ? AND chain_id = ? AND seq = ?",
            (agent_id, chain_id, seq),
        ).fetchone()
        return bytes(row[0]) if row else None

    def stream_position(self, stream: str) -> int:
        """The last stream sequence committed by `commit(..., position=...)` (0: none)."""
        row = self._writer.execute("SELECT seq FROM stream_positions WHERE stream = ?", (stream,)).fetchone()
        return int(row[0]) if row else 0

    def indexed_digest(self, agent_id: str, chain_id: bytes, seq: int) -> bytes | None:
        """`stored_digest` from any thread (a reader connection): what another process committed."""
        row = (
            self._reader()
            .execute(
                "SELECT digest FROM envelopes WHERE agent_id = ? AND chain_id = ? AND seq = ?",
                (agent_id, chain_id, seq),
            )
            .fetchone()
        )
        return bytes(row[0]) if row else None

    def indexed_chain(self, agent_id: str) -> ChainRecord | None:
        """One agent's chain head as committed, from any thread."""
        row = (
            self._reader()
            .execute("SELECT chain_id, last_seq, last_hash FROM chains WHERE agent_id = ?", (agent_id,))
            .fetchone()
        )
        return ChainRecord(bytes(row[0]), int(row[1]), bytes(row[2])) if row else None

    def rows_after(self, cursor: int, limit: int) -> list[tuple[int, str, int, EventRow]]:
        """(cursor, agent_id, received_ns, row) of the events after `cursor`, in store order: what another
        process committed, for live Subscribe."""
        sql = (
            "SELECT id, agent_id, received_ns, ts_ns, host, agent, kind, severity, event_id, text, body "  # noqa: S608
            f"FROM events WHERE id > ? AND id < {HORIZON} ORDER BY id LIMIT ?"
        )
        rows = self._reader().execute(sql, (cursor, limit)).fetchall()
        return [(r[0], r[1], r[2], EventRow(r[3], r[4], r[5], r[6], r[7], r[8], r[9], bytes(r[10]))) for r in rows]

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._writer
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                raise StoreFullError(f"{self.path}: {exc}") from exc
            raise StoreUnavailableError(f"{self.path}: {exc}") from exc

    def commit(
        self,
        accepted: Sequence[AcceptedEnvelope],
        chains: dict[str, ChainRecord],
        now_ns: int,
        position: tuple[str, int] | None = None,
    ) -> None:
        """Write envelopes, their events, chain heads and registry rows in one transaction; with `position`
        (stream, sequence), also how far the indexer has read that stream (`stream_position`)."""
        self._discard_stranded()
        with self._transaction() as conn:
            if position is not None:
                conn.execute(
                    "INSERT INTO stream_positions (stream, seq) VALUES (?, ?) "
                    "ON CONFLICT (stream) DO UPDATE SET seq = excluded.seq",
                    position,
                )
            first = self._next_id(conn)
            _place(accepted, first)
            rows = _event_rows(accepted)
            conn.executemany(INSERT_EVENT, _insert_params(rows, first, now_ns))
            self._index_text(conn, first, first + len(rows) - 1)
            self._record(conn, accepted, chains, now_ns)

    def commit_parts(
        self, accepted: Sequence[AcceptedEnvelope], chains: dict[str, ChainRecord], now_ns: int, part_events: int
    ) -> Iterator[None]:
        """`commit` as transactions of at most `part_events` events each: each step of the generator commits
        one part, and it yields between parts, where the caller may commit other envelopes (their ids come
        after the range this commit reserves with its first part, so each envelope's ids stay contiguous).

        The last part records the envelopes, the chain heads and the registry rows and ends the reservation;
        until then nothing of it counts as stored: `pending_parts` holds its range, which queries and
        Subscribe replay leave out and a store opened after a crash deletes. A part that fails raises
        StoreUnavailableError once the parts before it are deleted (should that fail too, a full disk, the
        next commit deletes them first). Abandoned between parts, they stay pending until the store opens.
        """
        rows = _event_rows(accepted)
        if len(rows) <= part_events:
            self.commit(accepted, chains, now_ns)
            return
        self._discard_stranded()
        first = 0
        try:
            for start in range(0, len(rows), part_events):
                last_part = start + part_events >= len(rows)
                with self._transaction() as conn:
                    if start == 0:
                        first = self._reserve(conn, len(rows))
                        _place(accepted, first)
                    part = rows[start : start + part_events]
                    conn.executemany(INSERT_EVENT, _insert_params(part, first + start, now_ns))
                    self._index_text(conn, first + start, first + start + len(part) - 1)
                    if last_part:
                        self._record(conn, accepted, chains, now_ns)
                        conn.execute("DELETE FROM pending_parts WHERE first_id = ?", (first,))
                if not last_part:
                    yield
        except StoreUnavailableError:
            self._stranded.append(first)
            with suppress(StoreUnavailableError):
                self._discard_stranded()
            raise

    def _discard_stranded(self) -> None:
        """Delete the parts committed before a failed one (StoreUnavailableError while that fails)."""
        while self._stranded:
            first = self._stranded[0]
            row = self._writer.execute("SELECT last_id FROM pending_parts WHERE first_id = ?", (first,)).fetchone()
            if row is not None:
                self._discard(first, int(row[0]))
            self._stranded.pop(0)

    def _reserve(self, conn: sqlite3.Connection, count: int) -> int:
        """Reserve `count` ids for a commit in parts (a `pending_parts` row); return the first."""
        first = self._next_id(conn)
        conn.execute("INSERT INTO pending_parts (first_id, last_id) VALUES (?, ?)", (first, first + count - 1))
        self._reserved_through = first + count - 1
        return first

    def _next_id(self, conn: sqlite3.Connection) -> int:
        """The next free event id: past every stored one and every one reserved by a commit in parts."""
        self._reserved_through = max(self._reserved_through, self._last_id(conn))
        return self._reserved_through + 1

    def _index_text(self, conn: sqlite3.Connection, first: int, last: int) -> None:
        if self.text_index == "trigram" and last >= first:
            conn.execute(INDEX_NEW_EVENTS, (first, last))

    def _record(
        self,
        conn: sqlite3.Connection,
        accepted: Sequence[AcceptedEnvelope],
        chains: dict[str, ChainRecord],
        now_ns: int,
    ) -> None:
        """The envelopes' records, their agents' registry rows and the chain heads."""
        for item in accepted:
            if item.seq:
                conn.execute(
                    "INSERT INTO envelopes (agent_id, chain_id, seq, digest, received_ns) VALUES (?, ?, ?, ?, ?)",
                    (item.agent_id, item.chain_id, item.seq, item.digest, now_ns),
                )
                self._upsert_agent(conn, item, now_ns)
        conn.executemany(
            "INSERT INTO chains (agent_id, chain_id, last_seq, last_hash) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (agent_id) DO UPDATE SET chain_id = excluded.chain_id, "
            "last_seq = excluded.last_seq, last_hash = excluded.last_hash",
            [(agent, c.chain_id, c.last_seq, c.last_hash) for agent, c in chains.items()],
        )

    @staticmethod
    def _last_id(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])

    def _delete(self, conn: sqlite3.Connection, selection: str, params: tuple[int, ...]) -> int:
        """Delete the events whose ids `selection` selects, first from the text index; return the count."""
        if self.text_index == "trigram":
            unindex = f"INSERT INTO events_fts (events_fts, rowid, text) SELECT 'delete', id, text FROM events WHERE id IN ({selection}) AND text != ''"  # noqa: E501, S608
            conn.execute(unindex, params)
        return conn.execute(f"DELETE FROM events WHERE id IN ({selection})", params).rowcount  # noqa: S608

    @staticmethod
    def _upsert_agent(conn: sqlite3.Connection, item: AcceptedEnvelope, now_ns: int) -> None:
        a = item.agent
        conn.execute(
            UPSERT_AGENT,
            {
                "agent_id": item.agent_id, "host": a.host, "kind": a.kind, "version": a.version, "now": now_ns,
                "heartbeat_ns": a.heartbeat_ns, "interval_s": a.interval_s, "events": a.events,
                "alerts": a.alerts, "seq": item.seq, "cert_not_after_ns": a.cert_not_after_ns,
            },
        )  # fmt: skip

    def query(self, flt: bus_pb2.EventFilter, page_size: int, page_token: str) -> tuple[list[bus_pb2.StoredEvent], str]:
        """Newest first, keyset-paged on (ts_ns, id): every committed envelope's events, none of a commit
        still in parts (`commit_parts`)."""
        ts_ns, cursor = _decode_token(page_token) if page_token else (0, 0)
        with self._snapshot() as conn:
            source, clauses, params = self._filter(conn, flt)
            if page_token:
                clauses.append("(ts_ns < ? OR (ts_ns = ? AND id < ?))")
                params += [ts_ns, ts_ns, cursor]
            for first, last in conn.execute("SELECT first_id, last_id FROM pending_parts").fetchall():
                clauses.append("id NOT BETWEEN ? AND ?")
                params += [first, last]
            where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
            sql = f"SELECT {EVENT_COLUMNS}, ts_ns FROM {source} {where} ORDER BY ts_ns DESC, id DESC LIMIT ?"  # noqa: S608
            rows = conn.execute(sql, [*params, page_size + 1]).fetchall()
        events = [_stored(row[:4]) for row in rows[:page_size]]
        token = _encode_token(rows[page_size - 1][4], rows[page_size - 1][0]) if len(rows) > page_size else ""
        return events, token

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """This thread's reader in a read transaction: its statements see one state of the store."""
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def after_cursor(self, cursor: int, flt: bus_pb2.EventFilter, limit: int) -> list[bus_pb2.StoredEvent]:
        """Stored events after `cursor` in store order (for Subscribe replay), up to the first id of a commit
        still in parts: a cursor never passes an event that is yet to show."""
        conn = self._reader()
        source, clauses, params = self._filter(conn, flt, after=cursor)
        clauses.append(f"id > ? AND id < {HORIZON}")
        sql = f"SELECT {EVENT_COLUMNS} FROM {source} WHERE {' AND '.join(clauses)} ORDER BY id LIMIT ?"  # noqa: S608
        return [_stored(row) for row in conn.execute(sql, [*params, cursor, limit])]

    def _filter(
        self, conn: sqlite3.Connection, flt: bus_pb2.EventFilter, after: int = 0
    ) -> tuple[str, list[str], list[object]]:
        """The table and `_where`, narrowed to the text index's candidates when the needle is rare enough to pay.

        Narrowed, the table is `events NOT INDEXED`: the candidates are looked up by id, never one of
        the (kind, time) or (host, time) indexes scanned with the candidates as a mere check.
        """
        clauses, params = _where(flt)
        match = _trigram_query(flt.text.lower()) if flt.text and self.text_index == "trigram" else None
        if match is None:
            return "events", clauses, params
        probe = "SELECT count(*) FROM (SELECT rowid FROM events_fts WHERE events_fts MATCH ? AND rowid > ? LIMIT ?)"
        if conn.execute(probe, (match, after, INDEX_PROBE)).fetchone()[0] >= INDEX_PROBE:
            return "events", clauses, params  # common: scanning in the query's order finds a page sooner
        clauses.append("id IN (SELECT rowid FROM events_fts WHERE events_fts MATCH ? AND rowid > ?)")
        return "events NOT INDEXED", clauses, [*params, match, after]

    def first_cursor_since(self, since_ns: int) -> int:
        """The cursor just before the first event received at or after `since_ns`."""
        row = self._reader().execute("SELECT min(id) FROM events WHERE ts_ns >= ?", (since_ns,)).fetchone()
        return int(row[0]) - 1 if row and row[0] else self.last_cursor()

    def last_cursor(self) -> int:
        """The last cursor Subscribe may pass: below every commit still in parts."""
        row = self._reader().execute(f"SELECT min(coalesce((SELECT max(id) FROM events), 0), {HORIZON} - 1)").fetchone()  # noqa: S608
        return int(row[0])

    def list_agents(self) -> list[bus_pb2.AgentInfo]:
        sql = f"SELECT {', '.join(AGENT_COLUMNS)} FROM agents ORDER BY host, agent_id"  # noqa: S608
        return [bus_pb2.AgentInfo(**dict(zip(AGENT_COLUMNS, row, strict=True))) for row in self._reader().execute(sql)]

    def count_events(self) -> int:
        # Two scalar subqueries: each is one b-tree descent (0.2 ms on 10M rows); max(id) - min(id) in one
        # SELECT makes SQLite scan the table (1.2 s).
        sql = "SELECT coalesce((SELECT max(id) FROM events), 0) - coalesce((SELECT min(id) FROM events), 1) + 1"
        row = self._reader().execute(sql).fetchone()
        return max(int(row[0]), 0)

    def size_bytes(self) -> int:
        """Bytes in use (pages not on the freelist), plus the WAL."""
        conn = self._reader()
        pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
        wal = self.path.with_name(self.path.name + "-wal")
        return int(pages * conn.execute("PRAGMA page_size").fetchone()[0]) + (wal.stat().st_size if wal.exists() else 0)

    def prune(self, older_than_ns: int, max_bytes: int) -> int:
        """Delete events older than the cutoff, then oldest-first while over `max_bytes`; return count."""
        deleted = 0
        while True:
            with self._transaction() as conn:
                count = self._delete(conn, PRUNE_OLD, (older_than_ns, PRUNE_CHUNK))
                conn.execute("DELETE FROM envelopes WHERE received_ns < ?", (older_than_ns,))
            deleted += count
            if count < PRUNE_CHUNK:
                break
        while (used := self.size_bytes()) > max_bytes and (count := self.count_events()) > 0:
            excess_events = math.ceil((used - max_bytes) / max(used / count, 1)) + 1  # the oldest, about the excess
            with self._transaction() as conn:
                deleted += self._delete(conn, PRUNE_OLDEST, (min(excess_events, PRUNE_CHUNK),))
            self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if deleted:
            self._writer.execute("PRAGMA incremental_vacuum")
            self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    def checkpoint(self) -> None:
        """Copy the WAL into the database without blocking the writer (PASSIVE); call it regularly."""
        if self._checkpointer is None:
            self._checkpointer = self._connect()
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        with self._lock:
            for conn in self._all_readers:
                conn.close()
            self._all_readers.clear()
        self._writer.close()


def _place(accepted: Sequence[AcceptedEnvelope], first_id: int) -> None:
    """Give each envelope its `first_cursor`: its events take the ids from `first_id` on, in order."""
    next_id = first_id
    for item in accepted:
        item.first_cursor = next_id if item.rows else 0
        next_id += len(item.rows)


def _event_rows(accepted: Sequence[AcceptedEnvelope]) -> list[tuple[str, EventRow]]:
    """The envelopes' (agent_id, row) pairs, in the order `_place` gives them ids."""
    return [(item.agent_id, row) for item in accepted for row in item.rows]


def _insert_params(rows: Sequence[tuple[str, EventRow]], first_id: int, now_ns: int) -> Iterator[tuple[object, ...]]:
    """INSERT_EVENT's parameters for (agent_id, row) pairs, ids from `first_id`."""
    for event_id, (agent_id, (ts_ns, host, agent, kind, severity, source_id, text, body)) in enumerate(rows, first_id):
        yield (event_id, ts_ns, now_ns, host, agent_id, agent, kind, severity, source_id, text, body)


T = TypeVar("T")


class StoreReads:
    """The threads the hub reads its store on (queries, replay, the registry, maintenance): a pool of its own,
    so the hub can wait for every read under way before the store closes its connections (closing a
    connection while another thread uses it can crash the process)."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="store-read")

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def call(self, fn: Callable[..., T], *args: object, timeout_s: float) -> T:
        """`fn(*args)` on the pool, from a thread outside the event loop (a metrics scrape: a new thread each
        time, where the store would keep a reader connection per thread until it closes)."""
        return self._pool.submit(fn, *args).result(timeout=timeout_s)

    async def finish(self) -> None:
        await asyncio.to_thread(self._pool.shutdown, wait=True)
