"""The reputation store: bans and recent events per key (an address or a prefix).

`ReputationStore` is the interface the DHA engine uses. Three implementations:

- `MemoryStore`: everything in process memory; lost on restart.
- `SqliteStore`: the same memory for every read, so the hot path never touches disk,
  plus write-behind into SQLite (WAL) from a thread, so the event loop only appends to
  a queue. On open it loads what has not expired, so bans survive a restart. Several
  worker processes may open one file: each reads the others' new rows every
  `reputation.sync_interval` seconds.

- `fleet.RedisStore`: the same memory, shared by a fleet of appliances through
  Valkey or Redis (policy/fleet.py).

Times are wall-clock seconds (time.time()), since they outlive the process.
"""

from __future__ import annotations

import bisect
import collections
import logging
import os
import pathlib
import queue
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from ..bounded import BoundedTable
from ..config import ConfigError

log = logging.getLogger("portcullis.reputation")

DATABASE_NAME = "reputation.db"
PURGE_INTERVAL = 60.0  # seconds between deletions of expired rows
# A lifted ban stays as a row (label UNBANNED) this long past its time, so that every
# process reads the removal before a purge deletes it: above the largest sync_interval.
REMOVAL_GRACE = 120.0
UNBANNED = "UNBANNED"
FLUSH_TIMEOUT = 10.0
MAX_BATCH = 1000  # writes per transaction
RATE_UNIT = 60.0  # seconds rates are counted over by default (limits.rate_time_unit)


class ReputationStoreError(ConfigError):
    """The store cannot be opened; the message names the key, the file and the cause."""


@dataclass(frozen=True, slots=True)
class Ban:
    key: str
    until: float  # wall-clock time the ban ends
    label: str  # why, e.g. DHA_BAN


class ReputationStore(ABC):
    """Bans and timestamped events per key. Reads must be fast: they run per connection.

    A fleet's store also tells of other appliances' decisions: on_ban(ban) for a ban,
    on_unban(key) for a lifted one, on_pregreet(client, passed, until) for a pre-greet
    result. `shared` is true while it reaches the fleet."""

    on_ban: Callable[[Ban], None] | None = None
    on_unban: Callable[[str], None] | None = None
    on_pregreet: Callable[[str, bool, float], None] | None = None
    shared = False

    @abstractmethod
    def add_event(self, key: str, at: float) -> None:
        """Remember that something (an invalid recipient) happened for key at `at`."""

    @abstractmethod
    def count_events(self, key: str, since: float) -> int:
        """How many events key has had at or after `since`."""

    @abstractmethod
    def ban(self, key: str, until: float, label: str) -> None:
        """Ban key until `until`; an existing longer ban is kept."""

    def unban(self, key: str) -> None:
        """Lift the ban on key, if any (an administrator's call)."""
        raise NotImplementedError(f"{type(self).__name__} cannot lift bans")

    @abstractmethod
    def ban_of(self, key: str, now: float) -> Ban | None:
        """The ban on key in force at `now`, or None."""

    @abstractmethod
    def active_bans(self, now: float) -> list[Ban]:
        """Every ban in force at `now`."""

    @abstractmethod
    def purge(self, now: float) -> None:
        """Forget expired bans and events older than the retention."""

    def sync(self) -> None:
        """Take in what other processes wrote, without waiting (call it often)."""

    @abstractmethod
    def count(self, kind: str, key: str, now: float, amount: int = 1) -> float:
        """Add amount to key's count of a kind (messages, recipients, ...), and return
        its count over the last `rate_unit` seconds: exact within a fixed window, the
        previous window's share weighted by how much of it is still in the last minute."""

    @abstractmethod
    def mark(self, kind: str, key: str, value: float, until: float) -> None:
        """Remember key of a kind (greylist.MARKS) until `until`, with a value such as
        when it was first seen. Of two marks in force, the one with the lower value
        stays: the first sighting wins, wherever it was made."""

    @abstractmethod
    def mark_of(self, kind: str, key: str) -> tuple[float, float] | None:
        """(value, until) of key's mark of a kind, or None; expired ones too, until
        purged."""

    def note_pregreet(self, client: str, passed: bool, until: float) -> None:
        """Share a pre-greet result with other gates (only a fleet's store does)."""

    def take_evictions(self) -> dict[str, int]:
        """Keys dropped because a table was full, per table, since the last call."""
        return {}

    def take_counts(self) -> dict[str, int]:
        """The store's own counters (round trips, outages) since the last call."""
        return {}

    def start(self) -> None:
        """Begin background work that needs the running event loop."""

    def flush(self) -> None:
        """Block until earlier writes are stored and others' writes are visible."""

    def close(self) -> None:
        """Flush and release resources."""

    async def aclose(self) -> None:
        """close(), from inside the event loop."""
        self.close()


class MemoryStore(ReputationStore):
    """The in-memory store. Events older than `retention` seconds are dropped, and at
    most `max_events_per_key` newest events are kept per key (the engine needs counts
    only up to its highest threshold). At most `max_keys` keys have events, and as many
    have bans: past that, the key used least recently is forgotten."""

    def __init__(self, retention: float, max_events_per_key: int = 256,
                 max_keys: int = 100_000, clock: Callable[[], float] = time.time,
                 rate_unit: float = RATE_UNIT):
        self.retention = retention
        self.rate_unit = rate_unit
        self._clock = clock
        self.max_events_per_key = max_events_per_key
        self._events = BoundedTable(max_keys)  # key -> sorted timestamps
        self._bans = BoundedTable(max_keys)  # key -> Ban
        self._marks: dict[str, BoundedTable] = {}  # kind -> key -> (value, until)
        # kind -> key -> [window number, its count, the previous window's count]
        self._counters: dict[str, BoundedTable] = {}

    def add_event(self, key: str, at: float) -> None:
        times = self._events.get(key, [])
        bisect.insort(times, at)
        oldest_kept = bisect.bisect_left(times, at - self.retention)
        excess = max(oldest_kept, len(times) - self.max_events_per_key)
        if excess > 0:
            del times[:excess]
        self._events[key] = times  # now the most recent key

    def count_events(self, key: str, since: float) -> int:
        times = self._events.get(key)
        if not times:
            return 0
        return len(times) - bisect.bisect_left(times, since)

    def merge_event(self, key: str, at: float) -> None:
        """Another process's event, counted once however often it is seen (an event
        is known by its key and its time)."""
        times = self._events.get(key)
        if not times or at not in times:
            MemoryStore.add_event(self, key, at)

    def ban(self, key: str, until: float, label: str) -> None:
        current = self._bans.get(key)
        if current is None or until > current.until:
            self._bans[key] = Ban(key, until, label)

    def unban(self, key: str) -> None:
        self._bans.pop(key, None)

    def ban_of(self, key: str, now: float) -> Ban | None:
        ban = self._bans.get(key)
        if ban is None:
            return None
        if ban.until <= now:
            del self._bans[key]
            return None
        return ban

    def active_bans(self, now: float) -> list[Ban]:
        return [ban for ban in self._bans.values() if ban.until > now]

    def count(self, kind: str, key: str, now: float, amount: int = 1) -> float:
        self.merge_count(kind, key, int(now // self.rate_unit), amount)
        _, current, previous = self._counters[kind][key]
        share = 1.0 - (now % self.rate_unit) / self.rate_unit
        return current + previous * share

    def merge_count(self, kind: str, key: str, window: int, amount: int) -> None:
        """Add amount to key's count in fixed window number `window` (now, or the one
        before); an older window no longer counts."""
        table = self._table(self._counters, kind)
        entry = table.get(key)  # updated in place: get() already made it the newest
        if entry is None:
            entry = table[key] = [window, 0, 0]
        if window > entry[0]:
            entry[:] = [window, 0, entry[1] if window == entry[0] + 1 else 0]
        if window == entry[0]:
            entry[1] += amount
        elif window == entry[0] - 1:
            entry[2] += amount

    def mark(self, kind: str, key: str, value: float, until: float) -> None:
        self.merge_mark(kind, key, value, until, self._clock())

    def merge_mark(self, kind: str, key: str, value: float, until: float, now: float) -> None:
        """Keep the lower value of two marks in force (see mark)."""
        table = self._table(self._marks, kind)
        current = table.get(key)
        if current is None or current[1] <= now or value < current[0]:
            table[key] = (value, until)

    def mark_of(self, kind: str, key: str) -> tuple[float, float] | None:
        table = self._marks.get(kind)
        return None if table is None else table.get(key)

    def _table(self, tables: dict[str, BoundedTable], kind: str) -> BoundedTable:
        table = tables.get(kind)
        if table is None:
            table = tables[kind] = BoundedTable(self._events.capacity)
        return table

    def purge(self, now: float) -> None:
        horizon = now - self.retention
        self._events.drop_where(lambda times: times[-1] < horizon)
        self._bans.drop_where(lambda ban: ban.until <= now)
        for table in self._marks.values():
            table.drop_where(lambda mark: mark[1] <= now)
        window = int(now // self.rate_unit)
        for table in self._counters.values():
            table.drop_where(lambda entry: entry[0] < window - 1)

    def take_evictions(self) -> dict[str, int]:
        return {"harvest": self._events.take_evictions(), "bans": self._bans.take_evictions(),
                "greylist": sum(table.take_evictions() for table in self._marks.values()),
                "rates": sum(table.take_evictions() for table in self._counters.values())}


_SCHEMA = """
CREATE TABLE IF NOT EXISTS bans (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    until REAL NOT NULL,
    label TEXT NOT NULL,
    writer TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    at REAL NOT NULL,
    writer TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
CREATE TABLE IF NOT EXISTS counts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    window INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    writer TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS marks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    value REAL NOT NULL,
    until REAL NOT NULL,
    writer TEXT NOT NULL,
    UNIQUE (kind, key)
);
"""

_STOP = object()


class SqliteStore(MemoryStore):
    """MemoryStore with write-behind persistence to one SQLite file (see module doc)."""

    def __init__(self, path: str, retention: float, max_events_per_key: int = 256,
                 max_keys: int = 100_000, sync_interval: float = 1.0,
                 clock: Callable[[], float] = time.time, read_events: bool = True,
                 rate_unit: float = RATE_UNIT):
        super().__init__(retention, max_events_per_key, max_keys, clock, rate_unit)
        self.path = path
        self.read_events = read_events  # False: others' events are not kept (bans only)
        self.sync_interval = sync_interval
        self.write_errors = 0  # batches lost to a disk or database error
        self._writer_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._writes: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox: collections.deque = collections.deque()  # others' rows, from the thread
        self._last_ban_id = 0
        self._last_event_id = 0
        self._last_mark_id = 0
        self._last_count_id = 0
        # (kind, key, window) -> amount not yet written: the writer takes them in one
        # row each per round, so a busy client costs no row per message
        self._counts_to_write: collections.Counter = collections.Counter()
        self._counts_lock = threading.Lock()  # the writer thread takes them
        self._closed = False
        self._db = self._open()
        self._load()
        self._thread = threading.Thread(target=self._write_loop, name="reputation-writer",
                                        daemon=True)
        self._thread.start()

    # -- opening -------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o750, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                 timeout=5.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise ReputationStoreError(
                f"key 'state_dir': cannot open the reputation store {self.path}: {e}"
            ) from None
        return db

    def _load(self) -> None:
        now = self._clock()
        try:
            with self._db:
                self._db.execute("BEGIN")
                for key, until, label in self._db.execute(
                        "SELECT key, until, label FROM bans WHERE until > ?", (now,)):
                    super().ban(key, until, label)
                if self.read_events:
                    for key, at in self._db.execute(
                            "SELECT key, at FROM events WHERE at > ? ORDER BY at",
                            (now - self.retention,)):
                        super().add_event(key, at)
                for kind, key, value, until in self._db.execute(
                        "SELECT kind, key, value, until FROM marks WHERE until > ?", (now,)):
                    super().merge_mark(kind, key, value, until, now)
                for kind, key, window, amount in self._db.execute(
                        "SELECT kind, key, window, amount FROM counts WHERE window >= ?",
                        (int(now // self.rate_unit) - 1,)):
                    super().merge_count(kind, key, window, amount)
                (self._last_ban_id, self._last_event_id, self._last_mark_id,
                 self._last_count_id) = self._max_ids()
        except sqlite3.Error as e:
            self._db.close()
            raise ReputationStoreError(f"cannot read reputation store {self.path}: {e}") from None

    def _max_ids(self) -> tuple[int, int, int, int]:
        return tuple(self._db.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}").fetchone()[0]
                     for table in ("bans", "events", "marks", "counts"))

    # -- the interface: memory first, disk later -------------------------------------

    def add_event(self, key: str, at: float) -> None:
        self._apply_inbox()
        super().add_event(key, at)
        self._writes.put(("event", key, at))

    def count_events(self, key: str, since: float) -> int:
        self._apply_inbox()
        return super().count_events(key, since)

    def ban(self, key: str, until: float, label: str) -> None:
        self._apply_inbox()
        super().ban(key, until, label)
        self._writes.put(("ban", key, until, label))

    def unban(self, key: str) -> None:
        self._apply_inbox()
        super().unban(key)
        self._writes.put(("unban", key, self._clock()))

    def ban_of(self, key: str, now: float) -> Ban | None:
        self._apply_inbox()
        return super().ban_of(key, now)

    def count(self, kind: str, key: str, now: float, amount: int = 1) -> float:
        self._apply_inbox()
        with self._counts_lock:
            self._counts_to_write[kind, key, int(now // self.rate_unit)] += amount
        return super().count(kind, key, now, amount)

    def mark(self, kind: str, key: str, value: float, until: float) -> None:
        self._apply_inbox()
        super().mark(kind, key, value, until)
        self._writes.put(("mark", kind, key, value, until))

    def mark_of(self, kind: str, key: str) -> tuple[float, float] | None:
        self._apply_inbox()
        return super().mark_of(kind, key)

    def active_bans(self, now: float) -> list[Ban]:
        self._apply_inbox()
        return super().active_bans(now)

    def sync(self) -> None:
        self._apply_inbox()

    def purge(self, now: float) -> None:
        self._apply_inbox()
        super().purge(now)

    def flush(self) -> None:
        """Wait (up to FLUSH_TIMEOUT) until queued writes are committed and other
        processes' rows are read. Blocking: for shutdown and tests, not the hot path."""
        if self._closed:
            return
        done = threading.Event()
        self._writes.put(("barrier", done))
        if not done.wait(FLUSH_TIMEOUT):
            log.warning("reputation store %s: flush timed out after %ss", self.path,
                        FLUSH_TIMEOUT)
        self._apply_inbox()

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._writes.put(_STOP)
        self._thread.join(FLUSH_TIMEOUT)
        if not self._thread.is_alive():
            self._db.close()

    def _apply_inbox(self) -> None:
        """Merge rows other processes wrote, as collected by the writer thread."""
        inbox = self._inbox
        while inbox:
            kind, *row = inbox.popleft()
            if kind == "ban":
                super().ban(*row)
            elif kind == "unban":
                super().unban(*row)
            elif kind == "mark":
                self.merge_mark(*row, self._clock())
            elif kind == "count":
                self.merge_count(*row)
            else:
                self.merge_event(*row)

    # -- the writer thread -----------------------------------------------------------

    def _write_loop(self) -> None:
        next_sync = next_purge = 0.0
        while True:
            try:
                batch = [self._writes.get(timeout=self.sync_interval)]
            except queue.Empty:
                batch = []
            while batch and len(batch) < MAX_BATCH and batch[-1] is not _STOP:
                try:
                    batch.append(self._writes.get_nowait())
                except queue.Empty:
                    break
            barriers = [op[1] for op in batch if op is not _STOP and op[0] == "barrier"]
            self._guarded(self._write, batch)
            now = time.monotonic()
            if barriers or now >= next_sync:
                self._guarded(self._read_others)
                next_sync = now + self.sync_interval
            if now >= next_purge:
                self._guarded(self._purge_rows)
                next_purge = now + PURGE_INTERVAL
            for done in barriers:
                done.set()
            if batch and batch[-1] is _STOP:
                return

    def _guarded(self, step, *args) -> None:
        """Run one database step; a failure is logged and counted, never raised, so a
        full disk costs persistence but not mail flow."""
        try:
            step(*args)
        except sqlite3.Error as e:
            self.write_errors += 1
            log.error("reputation store %s: %s failed: %s", self.path, step.__name__, e)
            if self._db.in_transaction:
                self._db.rollback()

    def _write(self, batch: list) -> None:
        events = [(op[1], op[2], self._writer_id) for op in batch
                  if op is not _STOP and op[0] == "event"]
        bans = [op for op in batch if op is not _STOP and op[0] in ("ban", "unban")]
        marks = [op[1:] for op in batch if op is not _STOP and op[0] == "mark"]
        with self._counts_lock:
            counts, self._counts_to_write = self._counts_to_write, collections.Counter()
        if not events and not bans and not marks and not counts:
            return
        replace = "INSERT OR REPLACE INTO bans (key, until, label, writer) VALUES (?, ?, ?, ?)"
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT INTO events (key, at, writer) VALUES (?, ?, ?)",
                                 events)
            # A replaced row gets a new id, so other readers see it. A ban keeps the
            # longer one; a removal always replaces, with its time as `until`.
            for kind, key, until, *label in bans:
                row = self._db.execute("SELECT until FROM bans WHERE key = ?", (key,)).fetchone()
                if kind == "unban" or row is None or until > row[0]:
                    self._db.execute(replace, (key, until, label[0] if label else UNBANNED,
                                               self._writer_id))
            self._db.executemany(
                "INSERT INTO counts (kind, key, window, amount, writer) VALUES (?, ?, ?, ?, ?)",
                [(*row, amount, self._writer_id) for row, amount in counts.items()])
            now = self._clock()
            for kind, key, value, until in marks:  # the lower value of two in force stays
                row = self._db.execute("SELECT value, until FROM marks WHERE kind = ? AND "
                                       "key = ?", (kind, key)).fetchone()
                if row is None or row[1] <= now or value < row[0]:
                    self._db.execute("INSERT OR REPLACE INTO marks (kind, key, value, until, "
                                     "writer) VALUES (?, ?, ?, ?, ?)",
                                     (kind, key, value, until, self._writer_id))

    def _read_others(self) -> None:
        with self._db:
            self._db.execute("BEGIN")
            for key, until, label in self._db.execute(
                    "SELECT key, until, label FROM bans WHERE id > ? AND writer != ?",
                    (self._last_ban_id, self._writer_id)):
                self._inbox.append(("unban", key) if label == UNBANNED
                                   else ("ban", key, until, label))
            if self.read_events:
                for key, at in self._db.execute(
                        "SELECT key, at FROM events WHERE id > ? AND writer != ? AND at > ?",
                        (self._last_event_id, self._writer_id,
                         self._clock() - self.retention)):
                    self._inbox.append(("event", key, at))
            for row in self._db.execute(
                    "SELECT kind, key, value, until FROM marks WHERE id > ? AND writer != ?",
                    (self._last_mark_id, self._writer_id)):
                self._inbox.append(("mark", *row))
            for row in self._db.execute(
                    "SELECT kind, key, window, amount FROM counts WHERE id > ? AND writer != ?",
                    (self._last_count_id, self._writer_id)):
                self._inbox.append(("count", *row))
            (self._last_ban_id, self._last_event_id, self._last_mark_id,
             self._last_count_id) = self._max_ids()

    def _purge_rows(self) -> None:
        now = self._clock()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM bans WHERE until <= ?", (now - REMOVAL_GRACE,))
            self._db.execute("DELETE FROM events WHERE at <= ?", (now - self.retention,))
            self._db.execute("DELETE FROM marks WHERE until <= ?", (now,))
            self._db.execute("DELETE FROM counts WHERE window < ?",
                             (int(now // self.rate_unit) - 1,))


def read_bans(path: str, now: float) -> list[Ban]:
    """The bans in force at `now` in the SQLite store at `path`, soonest to end first,
    read without writing anything (for the operator's commands)."""
    uri = pathlib.Path(os.path.abspath(path)).as_uri() + "?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, timeout=5.0)
        try:
            rows = db.execute("SELECT key, until, label FROM bans WHERE until > ? AND label != ?"
                              " ORDER BY until", (now, UNBANNED)).fetchall()
        finally:
            db.close()
    except sqlite3.Error as e:
        raise ReputationStoreError(f"cannot read the reputation store {path}: {e}") from None
    return [Ban(*row) for row in rows]


def open_store(config, clock: Callable[[], float] = time.time,
               read_events: bool = True) -> ReputationStore:
    """The store config.reputation asks for, sized for config.dha's window and thresholds.
    Without read_events, other processes' harvest counts are not kept: the admission
    process needs only the bans.

    Raises ReputationStoreError when the SQLite file cannot be opened. A fleet's store
    connects once start() is called in the running event loop.
    """
    dha = config.dha
    retention = dha.window
    max_events = max(dha.ban_after, dha.prefix_ban_after) + 1
    max_keys = config.limits.max_tracked_clients
    if config.reputation.store == "memory":
        return MemoryStore(retention, max_events, max_keys, clock, config.limits.rate_time_unit)
    unit = config.limits.rate_time_unit
    path = os.path.join(config.state_dir, DATABASE_NAME)
    if config.reputation.store == "redis":
        from .fleet import RedisStore
        return RedisStore(config.reputation.redis, path, retention, max_events, max_keys,
                          config.reputation.sync_interval, clock, read_events, unit)
    return SqliteStore(path, retention, max_events, max_keys, config.reputation.sync_interval,
                       clock, read_events, unit)
