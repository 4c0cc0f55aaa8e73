#!/usr/bin/env python3
"""The DHA engine's hot path, and what its store costs the event loop.

For each store it prints, in operations per second on this machine:
- connect: DhaEngine.check_connect for distinct clients (the per-connection read);
- miss: DhaEngine.before_rcpt + invalid_recipient (two events and the stage reads);
and the 99th percentile and longest single call: how long the event loop is held.

Stores, measured in the same run:
- memory: MemoryStore (no persistence);
- sqlite: SqliteStore, Portcullis's store (memory reads, write-behind thread, WAL);
- peer, sqlite write-through: the obvious alternative that reads and writes SQLite on
  every call (WAL, synchronous=NORMAL, one commit per write), to show why the store
  keeps its hot path in memory.

Usage: .venv/bin/python bench/reputation.py [--clients N]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time

from portcullis import config
from portcullis.policy.dha import DhaEngine
from portcullis.policy.reputation import Ban, MemoryStore, ReputationStore, SqliteStore
from portcullis.policy.score import ConnectionScore


class WriteThroughStore(ReputationStore):
    """The peer: every read and write goes to SQLite, each write committed at once."""

    def __init__(self, path: str, retention: float):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE bans (key TEXT PRIMARY KEY, until REAL, label TEXT)")
        self.db.execute("CREATE TABLE events (key TEXT, at REAL)")
        self.db.execute("CREATE INDEX events_key ON events (key, at)")
        self.retention = retention

    def add_event(self, key, at):
        self.db.execute("INSERT INTO events VALUES (?, ?)", (key, at))

    def count_events(self, key, since):
        return self.db.execute("SELECT COUNT(*) FROM events WHERE key = ? AND at >= ?",
                               (key, since)).fetchone()[0]

    def ban(self, key, until, label):
        self.db.execute("INSERT OR REPLACE INTO bans VALUES (?, ?, ?)", (key, until, label))

    def ban_of(self, key, now):
        row = self.db.execute("SELECT until, label FROM bans WHERE key = ? AND until > ?",
                              (key, now)).fetchone()
        return Ban(key, *row) if row else None

    def active_bans(self, now):
        return [Ban(*row) for row in self.db.execute(
            "SELECT key, until, label FROM bans WHERE until > ?", (now,))]

    def purge(self, now):
        self.db.execute("DELETE FROM events WHERE at < ?", (now - self.retention,))

    def close(self):
        self.db.close()


def measure(name: str, store: ReputationStore, clients: int) -> None:
    settings = config.Config()
    engine = DhaEngine(settings, store, on_ban=lambda address, seconds: None)
    addresses = [f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in range(clients)]
    for operation in ("connect", "miss"):
        durations = []
        started = time.perf_counter()
        for address in addresses:
            before = time.perf_counter()
            if operation == "connect":
                engine.check_connect(address)
            else:
                score = ConnectionScore(settings.score)
                engine.before_rcpt(address, score)
                engine.invalid_recipient(address, score)
            durations.append(time.perf_counter() - before)
        elapsed = time.perf_counter() - started
        durations.sort()
        p99 = durations[int(len(durations) * 0.99)]
        print(f"{name:28} {operation:8} {clients / elapsed:>10,.0f}/s   call p99 "
              f"{p99 * 1e6:7.1f} us, longest {durations[-1] * 1000:6.2f} ms")
    flushed = time.perf_counter()
    store.close()
    print(f"{name:28} close (flush to disk) {time.perf_counter() - flushed:.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20_000)
    args = parser.parse_args()
    window = config.Dha().window
    with tempfile.TemporaryDirectory() as directory:
        measure("memory", MemoryStore(window), args.clients)
        measure("sqlite (write-behind)", SqliteStore(f"{directory}/a.db", window),
                args.clients)
        measure("peer: sqlite write-through", WriteThroughStore(f"{directory}/b.db", window),
                args.clients)
    return 0


if __name__ == "__main__":
    sys.exit(main())
