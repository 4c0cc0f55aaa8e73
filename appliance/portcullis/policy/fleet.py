"""The fleet's shared reputation store: Valkey or Redis (`reputation.store: redis`).

Several appliances behind several MX records count one attacker together. Each gate
process keeps the fleet's state in memory, on top of its appliance's SQLite store
(SqliteStore), so every read on the hot path is local and no SMTP reply waits on the
network:

    write (add_event, ban, unban, note_pregreet)
      -> memory and the appliance's SQLite file, as on a single appliance (so bans
         survive a restart, and the appliance's processes share while the server is away)
      -> a queue; a task sends it in one MULTI pipeline per batch, which also PUBLISHes
         the batch on the fleet's channel
    every process of every gate SUBSCRIBEs to the channel and merges the others'
      batches into its memory (within milliseconds); a ban reaches on_ban, which the
      admission process points at the ban helper, so the ban lands in every kernel set

Keys under reputation.redis.key_prefix (default "portcullis:"):

    ev:<client or prefix>   sorted set, one member per invalid recipient, scored by its
                            time; trimmed to dha.window and to the newest events the
                            thresholds need, expiring with the window
    ban:<client or prefix>  "<until> <label>", expiring at <until>; a Lua script keeps
                            the longer of two bans, atomically
    pg:<client>             "<until> <1 passed | 0 failed>": the pre-greet result
    mk:<kind>:<key>         "<value> <until>", expiring at <until>: a mark (greylisting's
                            triplets and passes); a Lua script keeps the lower value
    ct:<kind>:<key>:<n>     a client's count of a kind (messages, recipients, TLS) in
                            window n (limits.rate_time_unit); INCRBY, expiring after two.
                            Counts are sent once a second, summed, and a gate's
                            processes share them on the channel only (not through
                            SQLite, which would count them twice); they are not loaded.
    events                  the channel (JSON batches: [writer, [operation, ...]])

On (re)connect a process subscribes first, then loads the bans, events and pre-greet
results in force, so it misses nothing in between. An event seen twice (loaded,
published, or read from the SQLite file) is counted once: it is known by its time.

Failure never stops mail. Each appliance counts by itself, as a single one does, when
the server is down, slow or unreachable: every exchange is bounded by
reputation.redis.timeout, a heartbeat every HEARTBEAT seconds notices a silent
partition, and the loss is logged once and counted (`outages`). Writes made meanwhile wait in a bounded queue (bans by key, so
none is lost to a flood of events) and are sent and published when the server is back;
reconnection backs off from BACKOFF_MIN to BACKOFF_MAX seconds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import itertools
import json
import logging
import re
import time
from collections.abc import Callable

from ..bounded import BoundedTable
from .reputation import RATE_UNIT, Ban, MemoryStore, ReputationStoreError, SqliteStore

log = logging.getLogger("portcullis.fleet")

HEARTBEAT = 1.0  # seconds of silence before the connection is checked with a PING
BACKOFF_MIN = 0.5  # seconds before the first reconnection
BACKOFF_MAX = 10.0
MAX_BATCH = 500  # operations per pipeline and per published message
MAX_QUEUED = 100_000  # events and pre-greet results waiting while the server is away
SCAN_COUNT = 1000

# Set KEYS[1] to "<until> <label>", expiring at until (ms), unless a longer ban is there.
_KEEP_LONGER_BAN = """
local current = redis.call('GET', KEYS[1])
if current and tonumber(string.match(current, '^%S+')) >= tonumber(ARGV[1]) / 1000 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[1])
return 1
"""
# Set KEYS[1] to "<value> <until>", expiring at until (ms), unless a lower value is there.
_KEEP_LOWER_MARK = """
local current = redis.call('GET', KEYS[1])
if current and tonumber(string.match(current, '^%S+')) <= tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[3], 'PXAT', ARGV[2])
return 1
"""
_MARK_KIND = re.compile(r"[a-z_]{1,32}")
MAX_MARK_KEY = 128


class RedisStore(SqliteStore):
    """The appliance's store, shared with the fleet; see the module doc. on_ban,
    on_unban and on_pregreet are called for other processes' decisions (bans and
    pre-greet results also when loaded on (re)connect); none may block."""

    def __init__(self, settings, path: str, retention: float, max_events_per_key: int = 256,
                 max_keys: int = 100_000, sync_interval: float = 1.0,
                 clock: Callable[[], float] = time.time, read_events: bool = True,
                 rate_unit: float = RATE_UNIT):
        super().__init__(path, retention, max_events_per_key, max_keys, sync_interval, clock,
                         read_events, rate_unit)
        self.settings = settings
        self.shared = False  # connected, subscribed and loaded
        self._password = _first_line(settings.password_file) if settings.password_file else None
        self._channel = settings.key_prefix + "events"
        self._queued: collections.deque = collections.deque()  # events, pre-greet results
        self._queued_bans = BoundedTable(max_keys)  # key -> its last ban or unban
        self._counts_to_send: collections.Counter = collections.Counter()  # (kind, key, n)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._client = None
        self._pubsub = None
        self._sequence = 0  # makes each event's member in its sorted set unique
        self._counts = collections.Counter()  # see take_counts

    # -- the interface: memory and SQLite now, the fleet soon -----------------------

    def add_event(self, key: str, at: float) -> None:
        super().add_event(key, at)
        self._queue(("e", key, at))

    def ban(self, key: str, until: float, label: str) -> None:
        super().ban(key, until, label)
        self._queue_ban(key, ("b", key, until, label))

    def unban(self, key: str) -> None:
        super().unban(key)
        self._queue_ban(key, ("u", key))

    def note_pregreet(self, client: str, passed: bool, until: float) -> None:
        self._queue(("p", client, passed, until))

    def mark(self, kind: str, key: str, value: float, until: float) -> None:
        super().mark(kind, key, value, until)
        self._queue(("m", key, kind, value, until))

    def count(self, kind: str, key: str, now: float, amount: int = 1) -> float:
        self._apply_inbox()
        if len(self._counts_to_send) >= MAX_QUEUED:  # the server has been away: stale
            self._counts["dropped"] += len(self._counts_to_send)
            self._counts_to_send.clear()
        self._counts_to_send[kind, key, int(now // self.rate_unit)] += amount
        return MemoryStore.count(self, kind, key, now, amount)

    @property
    def unsent(self) -> int:
        """Writes queued for the server that it has not taken yet (rate counts apart)."""
        return len(self._queued) + len(self._queued_bans)

    def take_counts(self) -> dict[str, int]:
        """round_trips, outages, dropped (queue full), rejected (refused by the server),
        bad_messages (unreadable on the channel or in the store), since the last call."""
        counts, self._counts = dict(self._counts), collections.Counter()
        return counts

    def _queue(self, operation: tuple) -> None:
        if len(self._queued) >= MAX_QUEUED:
            self._queued.popleft()
            self._counts["dropped"] += 1
        self._queued.append(operation)
        self._poke()

    def _queue_ban(self, key: str, operation: tuple) -> None:
        self._queued_bans[key] = operation
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # -- running -----------------------------------------------------------------------

    def start(self) -> None:
        """Begin sharing, in the running event loop; until connected, count locally."""
        self._wake = asyncio.Event()
        self._task = asyncio.ensure_future(self._keep_shared())

    async def aclose(self) -> None:
        """Let the sender send what is queued (within the timeout, if connected), then
        disconnect and close the SQLite store."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.timeout):
                    while self.shared and (self._queued or self._queued_bans):
                        await asyncio.sleep(0.01)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        super().close()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        super().close()

    async def _keep_shared(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            began = time.monotonic()
            try:
                await self._exchange(await self._connect())
            except Exception as e:  # noqa: BLE001 - sharing must outlive any failure
                self._lost(e)
            finally:
                await self._disconnect()
            if time.monotonic() - began > BACKOFF_MAX:  # it had worked for a while
                backoff = BACKOFF_MIN
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, BACKOFF_MAX)

    async def _connect(self):
        """Connect, subscribe, load the fleet's state; the pubsub to read from."""
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        settings = self.settings
        tls = {"ssl_ca_certs": settings.ca_file} if settings.ca_file else {}
        self._client = redis.Redis.from_url(
            settings.url, username=settings.username or None, password=self._password,
            socket_timeout=settings.timeout, socket_connect_timeout=settings.timeout,
            max_connections=settings.pool_size, retry=Retry(NoBackoff(), 0),
            decode_responses=True, **tls)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        await self._bounded(self._pubsub.subscribe(self._channel))
        await self._load_fleet()
        if not self.shared:
            self.shared = True
            log.info("reputation store %s: sharing with the fleet", where(settings.url))
        return self._pubsub

    async def _disconnect(self) -> None:
        pubsub, client, self._pubsub, self._client = self._pubsub, self._client, None, None
        for connection in (pubsub, client):
            if connection is not None:
                with contextlib.suppress(*_failures()):
                    await connection.aclose()

    def _lost(self, error: Exception) -> None:
        """Log the loss once per outage; a failure that is not the server's, with its
        traceback (a bug must not pass for an outage)."""
        unexpected = None if isinstance(error, _failures()) else error
        if self.shared:
            self.shared = False
            self._counts["outages"] += 1
            log.error("reputation store %s: %s; counting locally until it is back",
                      where(self.settings.url), _reason(error), exc_info=unexpected)
        else:
            log.log(logging.ERROR if unexpected else logging.DEBUG, "reputation store %s: %s",
                    where(self.settings.url), _reason(error), exc_info=unexpected)

    async def _exchange(self, pubsub) -> None:
        """Send and receive until either fails."""
        sending = asyncio.ensure_future(self._send_forever())
        receiving = asyncio.ensure_future(self._receive_forever(pubsub))
        try:
            done, _ = await asyncio.wait((sending, receiving),
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises its failure
        finally:
            sending.cancel()
            receiving.cancel()
            await asyncio.gather(sending, receiving, return_exceptions=True)

    async def _bounded(self, awaitable):
        async with asyncio.timeout(self.settings.timeout):
            return await awaitable

    # -- sending -------------------------------------------------------------------------

    async def _send_forever(self) -> None:
        while True:
            await self._send_queued()
            self._wake.clear()
            try:
                async with asyncio.timeout(HEARTBEAT):
                    await self._wake.wait()
            except TimeoutError:
                if not self._counts_to_send:
                    await self._bounded(self._client.ping())
                    self._counts["round_trips"] += 1

    async def _send_queued(self) -> None:
        """Send everything queued, a batch per round trip; a batch leaves the queue once
        the server took it, or refused it (an ACL without a command it needs): a batch
        that can never succeed must not stall the rest."""
        from redis.exceptions import ResponseError

        counts, self._counts_to_send = self._counts_to_send, collections.Counter()
        counted = [("c", key, kind, window, amount)
                   for (kind, key, window), amount in counts.items()]
        while self._queued_bans or self._queued or counted:
            bans = list(itertools.islice(self._queued_bans.items(), MAX_BATCH))
            events = list(itertools.islice(self._queued, MAX_BATCH - len(bans)))
            room = MAX_BATCH - len(bans) - len(events)
            sums, counted = counted[:room], counted[room:]
            operations = [operation for _, operation in bans] + events + sums
            pipe = self._client.pipeline(transaction=True)
            for operation in operations:
                self._stage(pipe, operation)
            pipe.publish(self._channel, json.dumps([self._writer_id, operations]))
            try:
                await self._bounded(pipe.execute())
            except ResponseError as e:  # refused, not lost: never retry it
                self._counts["rejected"] += len(operations)
                log.error("reputation store %s refused %d writes: %s",
                          where(self.settings.url), len(operations), e)
            self._counts["round_trips"] += 1
            # What was queued meanwhile stays: a newer ban of the same key, new events.
            for key, operation in bans:
                if self._queued_bans.get(key) is operation:
                    del self._queued_bans[key]
            for operation in events:
                if self._queued and self._queued[0] is operation:
                    self._queued.popleft()

    def _stage(self, pipe, operation: tuple) -> None:
        prefix = self.settings.key_prefix
        kind, key, *rest = operation
        if kind == "e":
            (at,) = rest
            name = prefix + "ev:" + key
            self._sequence += 1
            pipe.zadd(name, {f"{at!r} {self._writer_id} {self._sequence}": at})
            pipe.zremrangebyscore(name, "-inf", f"({at - self.retention!r}")
            pipe.zremrangebyrank(name, 0, -self.max_events_per_key - 1)
            pipe.pexpire(name, int(self.retention * 1000) + 1)
        elif kind == "b":
            until, label = rest
            pipe.eval(_KEEP_LONGER_BAN, 1, prefix + "ban:" + key, int(until * 1000),
                      f"{until!r} {label}")
        elif kind == "u":
            pipe.delete(prefix + "ban:" + key)
        elif kind == "c":
            count_kind, window, amount = rest
            name = f"{prefix}ct:{count_kind}:{key}:{window}"
            pipe.incrby(name, amount)
            pipe.expire(name, int(2 * self.rate_unit) + 1)
        elif kind == "m":
            mark_kind, value, until = rest
            pipe.eval(_KEEP_LOWER_MARK, 1, f"{prefix}mk:{mark_kind}:{key}", repr(value),
                      max(int(until * 1000), 1), repr(until))
        else:
            passed, until = rest
            pipe.set(prefix + "pg:" + key, f"{until!r} {int(passed)}",
                     pxat=max(int(until * 1000), 1))

    # -- receiving -------------------------------------------------------------------------

    async def _receive_forever(self, pubsub) -> None:
        while True:
            message = await pubsub.get_message(timeout=HEARTBEAT)
            if message is None:  # silence: is the server still there?
                await self._bounded(pubsub.ping())
                message = await pubsub.get_message(timeout=self.settings.timeout)
                if message is None:
                    raise TimeoutError("no answer to a PING on the channel")
            if message["type"] == "message":
                self._merge_published(message["data"])

    def _merge_published(self, data: str) -> None:
        try:
            writer, operations = json.loads(data)
            if writer == self._writer_id:
                return
            for kind, key, *rest in operations:
                self._merge(kind, key, rest)
        except (ValueError, TypeError) as e:
            self._bad(f"a malformed message on {self._channel}: {e}")

    def _merge(self, kind: str, key: str, rest: list) -> None:
        """One operation another process made; ValueError or TypeError if malformed."""
        if not isinstance(key, str):
            raise TypeError(f"key {key!r} is not a string")
        if kind == "m":
            mark_kind, value, until = rest
            if not _MARK_KIND.fullmatch(str(mark_kind)) or len(key) > MAX_MARK_KEY:
                raise ValueError(f"not a mark: {mark_kind!r} {key!r}")
            self.merge_mark(mark_kind, key, float(value), float(until), self._clock())
            return
        ipaddress.ip_network(key)  # a client or a prefix, nothing else
        if kind == "c":
            count_kind, window, amount = rest
            if not _MARK_KIND.fullmatch(str(count_kind)):
                raise ValueError(f"not a count: {count_kind!r}")
            self.merge_count(count_kind, key, int(window), int(amount))
        elif kind == "e":
            (at,) = rest
            if self.read_events:
                self.merge_event(key, float(at))
        elif kind == "b":
            until, label = rest
            self._merge_ban(Ban(key, float(until), str(label)))
        elif kind == "u":
            if self._bans.get(key) is not None:
                MemoryStore.unban(self, key)
                if self.on_unban is not None:
                    self.on_unban(key)
        elif kind == "p":
            passed, until = rest
            if self.on_pregreet is not None:
                self.on_pregreet(key, bool(passed), float(until))
        else:
            raise ValueError(f"unknown operation {kind!r}")

    def _merge_ban(self, ban: Ban) -> None:
        current = self._bans.get(ban.key)
        MemoryStore.ban(self, ban.key, ban.until, ban.label)
        if self.on_ban is not None and (current is None or ban.until > current.until):
            self.on_ban(ban)

    def _bad(self, what: str) -> None:
        self._counts["bad_messages"] += 1
        log.warning("reputation store %s: %s", where(self.settings.url), what)

    # -- loading ---------------------------------------------------------------------------

    async def _load_fleet(self) -> None:
        """Merge what is in force on the server: bans, events, pre-greet results. What
        cannot be read is counted and skipped."""
        now = self._clock()
        loads = [("ban:", "b", "get")]
        if self.read_events:
            loads.append(("ev:", "e", "zrange"))
        if self.on_pregreet is not None:
            loads.append(("pg:", "p", "get"))
        if self.read_events:  # the workers': greylisting runs there
            loads.append(("mk:", "m", "get"))
        for kind_prefix, kind, read in loads:
            name_prefix = self.settings.key_prefix + kind_prefix
            async for name, value in self._scan(name_prefix + "*", read):
                key = name[len(name_prefix):]
                try:
                    if kind == "m":  # mk:<kind>:<key>
                        mark_kind, _, key = key.partition(":")
                        value = f"{value} {mark_kind}"
                    for rest in _stored_operations(kind, value, now, now - self.retention):
                        self._merge(kind, key, rest)
                except (ValueError, TypeError) as e:
                    self._bad(f"cannot read {name}: {e}")

    async def _scan(self, pattern: str, read: str):
        """(key, value) for at most max_keys keys matching pattern, a batch per trip."""
        cursor, seen = 0, 0
        while True:
            cursor, names = await self._bounded(
                self._client.scan(cursor, match=pattern, count=SCAN_COUNT))
            names = names[:max(0, self._events.capacity - seen)]
            seen += len(names)
            if names:
                pipe = self._client.pipeline(transaction=False)
                for name in names:
                    if read == "get":
                        pipe.get(name)
                    else:
                        pipe.zrange(name, 0, -1, withscores=True)
                values = await self._bounded(pipe.execute())
                for name, value in zip(names, values, strict=True):
                    if value:
                        yield name, value
            if cursor == 0 or seen >= self._events.capacity:
                return


def _first_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip()
    except (OSError, UnicodeError) as e:
        raise ReputationStoreError(f"key 'reputation.redis.password_file': {e}") from None


def _stored_operations(kind: str, value, now: float, since: float) -> list[list]:
    """The operations a stored value stands for, as published ones carry them; those
    no longer in force are left out."""
    if kind == "e":
        return [[at] for _, at in value if at >= since]
    if kind == "m":  # "<value> <until> <kind>"
        mark_value, until, mark_kind = value.split(" ")
        return [[mark_kind, float(mark_value), float(until)]] if float(until) > now else []
    until, _, rest = value.partition(" ")
    if float(until) <= now:
        return []
    return [[float(until), rest]] if kind == "b" else [[rest == "1", float(until)]]


def _failures() -> tuple[type[BaseException], ...]:
    """What a lost, slow or refusing server raises (redis-py is imported only when used)."""
    from redis.exceptions import RedisError
    return RedisError, OSError, TimeoutError


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


def where(url: str) -> str:
    """The URL without credentials, for log lines."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


@contextlib.contextmanager
def connected(store: RedisStore):
    """For the operator's commands, outside any event loop: the store connected and
    loaded; what was written is sent at the end. ReputationStoreError when the server
    cannot be reached within the timeout."""
    loop = asyncio.new_event_loop()
    try:
        try:
            loop.run_until_complete(store._connect())
        except _failures() as e:
            raise ReputationStoreError(
                f"key 'reputation.redis.url': cannot reach {where(store.settings.url)}: "
                f"{_reason(e)}") from None
        yield store
        try:
            loop.run_until_complete(store._send_queued())
        except _failures() as e:
            raise ReputationStoreError(
                f"cannot write to {where(store.settings.url)}: {_reason(e)}") from None
    finally:
        loop.run_until_complete(store._disconnect())
        loop.close()
