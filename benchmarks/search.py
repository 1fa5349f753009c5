#!/usr/bin/env python3
"""Text search on the store's trigram index, and what the index costs: JSON on stdout.

    python benchmarks/search.py --work /var/tmp/searchbench      # 1,000 hosts, 10,000,000 events; keeps the store
    python benchmarks/search.py --events 1000000 --hosts 100     # smaller, in a temp dir
    python benchmarks/search.py --ingest-only                    # only the commit rates with and without the index

1. Builds a store without the index (`text_index="none"`, the schema before the index) from the UI
   benchmark's events (`ui.rows`: 24 h over every host's agents, one planted `needle-4711`), unless
   `--work` already holds one.
2. Opens it with the index: the migration builds it from the stored rows (once; a rerun finds it
   built); its time and the store's size before and after are reported.
3. Times `SqliteStore.query` (a page of 50, newest first, as the UI and `amoskys query` ask) for a
   rare needle, a common word and a 2-character string, over the last hour and the last 24 h, and
   the rare needle over 24 h with the kind list the UI adds.
4. Commits the same events into fresh stores in envelopes of 500 events, one envelope per commit,
   alternating the index on and off, three runs each: events/s committed and CPU µs per event
   (the CPU figure is steadier than the rate on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from amoskys.eventbus.rows import EventRow
from amoskys.eventbus.store import AcceptedEnvelope, SqliteStore, TextIndex
from amoskys.ui.model import SHOWN_KINDS
from amoskys.v1 import bus_pb2

sys.path.insert(0, str(Path(__file__).parent))
from ui import DAY_NS, NEEDLE, percentiles, rows

HOUR_NS = DAY_NS // 24
NEEDLES = {"rare": NEEDLE, "common": "python3", "short": "ro"}
ENVELOPE = 500


def envelopes(hosts: int, events: int, now_ns: int) -> Iterator[list[AcceptedEnvelope]]:
    """Batches of up to ENVELOPE events per agent, about 200,000 events per yield."""
    names = [f"host-{n:04d}" for n in range(hosts)]
    batch: dict[str, list[EventRow]] = {}
    pending = 0
    for agent_id, row in rows(names, events, now_ns):
        batch.setdefault(agent_id, []).append(row)
        pending += 1
        if pending >= 200_000:
            yield [AcceptedEnvelope(a, b"", 0, b"", r) for a, r in batch.items()]
            batch, pending = {}, 0
    if batch:
        yield [AcceptedEnvelope(a, b"", 0, b"", r) for a, r in batch.items()]


def build(path: Path, hosts: int, events: int) -> float:
    """A store of the schema before the index; events/s."""
    store = SqliteStore(path, synchronous="normal", text_index="none")
    started = time.monotonic()
    for accepted in envelopes(hosts, events, time.time_ns()):
        store.commit(accepted, {}, time.time_ns())
    store.close()
    return events / (time.monotonic() - started)


def used_bytes(path: Path) -> int:
    """Pages in use, read without opening it as a store (which would build or drop the index)."""
    with sqlite3.connect(path) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages * conn.execute("PRAGMA page_size").fetchone()[0])


def searches(store: SqliteStore, repeats: int) -> dict[str, Any]:
    newest = store.query(bus_pb2.EventFilter(), 1, "")[0][0].event.ts_ns
    results: dict[str, Any] = {}
    for name, needle in NEEDLES.items():
        for window, span in (("1h", HOUR_NS), ("24h", DAY_NS)):
            flt = bus_pb2.EventFilter(since_ns=newest - span + 1, text=needle)
            times, found = [], 0
            for _ in range(repeats + 1):  # the first warms the cache and is not counted
                started = time.perf_counter()
                found = len(store.query(flt, 50, "")[0])
                times.append(time.perf_counter() - started)
            results[f"{name}_{window}"] = {"needle": needle, "found": found, **percentiles(times[1:])}
    return results


def searches_as_the_ui(store: SqliteStore, repeats: int) -> dict[str, Any]:
    """The rare needle over 24 h with the kind list the UI adds to every search."""
    newest = store.query(bus_pb2.EventFilter(), 1, "")[0][0].event.ts_ns
    flt = bus_pb2.EventFilter(since_ns=newest - DAY_NS + 1, kinds=SHOWN_KINDS, text=NEEDLES["rare"])
    times, found = [], 0
    for _ in range(repeats + 1):
        started = time.perf_counter()
        found = len(store.query(flt, 50, "")[0])
        times.append(time.perf_counter() - started)
    return {"rare_24h_ui_kinds": {"needle": NEEDLES["rare"], "found": found, **percentiles(times[1:])}}


def ingest_rate(work: Path, text_index: TextIndex, hosts: int, events: int) -> tuple[float, float]:
    """Events/s committed into a fresh store, one envelope of ENVELOPE events per commit, and CPU µs per event."""
    path = work / f"ingest-{text_index}.db"
    store = SqliteStore(path, synchronous="normal", text_index=text_index)
    batches = [envelope for accepted in envelopes(hosts, events, time.time_ns()) for envelope in accepted]
    chunks = [
        AcceptedEnvelope(e.agent_id, b"", 0, b"", e.rows[i : i + ENVELOPE])
        for e in batches
        for i in range(0, len(e.rows), ENVELOPE)
    ]
    started, cpu = time.perf_counter(), time.process_time()
    for chunk in chunks:
        store.commit([chunk], {}, time.time_ns())
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    store.close()
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    count = sum(len(c.rows) for c in chunks)
    return count / elapsed, cpu / count * 1e6


def ingest(work: Path, hosts: int, events: int, runs: int) -> dict[str, Any]:
    rates: dict[str, list[float]] = {"none": [], "trigram": []}
    cpu: dict[str, list[float]] = {"none": [], "trigram": []}
    for _ in range(runs):
        for text_index in ("none", "trigram"):
            rate, cpu_us = ingest_rate(work, text_index, hosts, events)
            rates[text_index].append(rate)
            cpu[text_index].append(cpu_us)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    cpu_medians = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "events_per_run": events,
        "events_per_s": {k: [round(r) for r in v] for k, v in rates.items()},
        "median_events_per_s": {k: round(v) for k, v in medians.items()},
        "cpu_us_per_event": {k: [round(c, 1) for c in v] for k, v in cpu.items()},
        "median_cpu_us_per_event": {k: round(v, 1) for k, v in cpu_medians.items()},
        "index_cost_percent": round(100 * (1 - medians["trigram"] / medians["none"]), 1),
        "index_cpu_cost_percent": round(100 * (cpu_medians["trigram"] / cpu_medians["none"] - 1), 1),
    }


def run(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"hosts": args.hosts, "events": args.events}
    if not args.ingest_only:
        path = work / "store" / "events.db"
        if not path.exists():
            result["build_events_per_s"] = round(build(path, args.hosts, args.events))
        result["store_bytes_before"] = used_bytes(path)
        started = time.monotonic()
        store = SqliteStore(path, synchronous="normal", text_index="trigram")
        result["migration_s"] = round(time.monotonic() - started, 1)
        result["store_bytes_after"] = store.size_bytes()
        result["search"] = searches(store, args.repeats) | searches_as_the_ui(store, args.repeats)
        store.close()
    result["ingest"] = ingest(work, args.hosts, args.ingest_events, args.runs)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=20, help="timed queries per needle and window")
    parser.add_argument("--ingest-events", type=int, default=100_000, help="events per ingest run")
    parser.add_argument("--runs", type=int, default=3, help="ingest runs per setting")
    parser.add_argument("--ingest-only", action="store_true")
    parser.add_argument("--work", type=Path, help="keep the store here and reuse it (default: a temp dir)")
    args = parser.parse_args()
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        result = run(args.work, args)
    else:
        with tempfile.TemporaryDirectory(prefix="amoskys-searchbench-") as tmp:
            result = run(Path(tmp), args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
