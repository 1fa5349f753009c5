#!/usr/bin/env python3
"""The outbox's bound on disk: a hub outage into a full outbox, file sizes against `outbox.max_bytes`.

    python benchmarks/outbox.py                  # 4 MiB bound, ~35-byte events, 1,500 flushes
    python benchmarks/outbox.py --padding 300    # ~340-byte events

As the runtime does during an outage: 16 envelopes sealed before the hub went away, then only
collecting (flushes of 100 events), every flush over the bound. Prints the counted bytes, the
database and WAL file sizes after a checkpoint, their ratio to the bound, the WAL's largest size
during the run, and the time a flush takes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from amoskys import keys
from amoskys.agents.runtime.outbox import Outbox
from amoskys.config import OutboxConfig
from amoskys.v1 import events_pb2


def event(n: int, padding: int) -> bytes:
    labels = {"pad": "x" * padding} if padding else {}
    body = events_pb2.Event(event_id=f"h-proc-{n:07d}", ts_ns=time.time_ns(), host="h", agent="proc", labels=labels)
    return body.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-bytes", type=int, default=4 * 2**20)
    parser.add_argument("--rounds", type=int, default=1500)
    parser.add_argument("--padding", type=int, default=0, help="bytes of label added to each ~35-byte event")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        keys.write_private_key(work / "sign.key", keys.generate_signing_key())
        signer = keys.load_signing_key(work / "sign.key")
        box = Outbox(work / "outbox.db", OutboxConfig(max_bytes=args.max_bytes), "bench-1", signer)
        box.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        empty = (work / "outbox.db").stat().st_size
        box.add([event(n, args.padding) for n in range(8000)])
        for _ in range(16):
            box.seal(500)
        started, n, peak_wal = time.perf_counter(), 8000, 0
        for _ in range(args.rounds):
            box.add([event(n + i, args.padding) for i in range(100)])
            n += 100
            peak_wal = max(peak_wal, (work / "outbox.db-wal").stat().st_size)
        per_flush_ms = (time.perf_counter() - started) / args.rounds * 1000
        box.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db, wal = ((work / name).stat().st_size for name in ("outbox.db", "outbox.db-wal"))
        held, dropped, ratio = box.sizes()[0], box.counter("dropped"), (db + wal) / args.max_bytes
        print(f"event size              {len(event(n, args.padding))} bytes")
        print(f"bound                   {args.max_bytes} bytes")
        print(f"counted                 {box.used_bytes} bytes (events held: {held}, dropped: {dropped})")
        print(f"file after checkpoint   {db + wal} bytes (db {db}, wal {wal}): {ratio:.2f}x the bound")
        print(f"WAL at its largest      {peak_wal} bytes (between SQLite's automatic checkpoints)")
        print(f"empty outbox file       {empty} bytes")
        print(f"flush of 100 events     {per_flush_ms:.2f} ms (synchronous=FULL)")
        box.close()


if __name__ == "__main__":
    main()
