"""The fleet's reputation store (policy/fleet.py) against a real redis-server.

Several stores in one event loop stand for the processes of several appliances (each
appliance its own state_dir); the server is killed, hung and restarted to see what each
keeps doing meanwhile.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import yaml
from portcullis import config
from portcullis.policy import reputation
from portcullis.policy.fleet import RedisStore

from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

WINDOW = 600.0


@pytest.fixture
def server(tmp_path):
    with RedisServer(tmp_path / "redis") as running:
        yield running


def store(server: RedisServer, appliance: str, read_events: bool = True,
          **overrides) -> RedisStore:
    """A process of `appliance` (its state_dir under the server's directory)."""
    document = {"hostname": "mx.example.test", "relay_domains": ["example.test"],
                "backend": {"servers": ["127.0.0.1:2525"]},
                "state_dir": str(server.workdir / appliance),
                "reputation": server.settings(**overrides)}
    opened = reputation.open_store(config.loads(yaml.safe_dump(document), "fleet.yaml"),
                                   read_events=read_events)
    assert isinstance(opened, RedisStore)
    return opened


async def until(predicate, timeout: float = 5.0) -> float:
    """Seconds until predicate() holds; AssertionError after timeout."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def started(*stores: RedisStore) -> None:
    for each in stores:
        each.start()
    await until(lambda: all(each.shared for each in stores))


def test_events_are_counted_fleet_wide_once(server):
    async def scenario():
        a, b = store(server, "a"), store(server, "b")
        await started(a, b)
        now = time.time()
        for n in range(3):
            a.add_event("192.0.2.7", now + n)
        b.add_event("192.0.2.7", now + 3)
        await until(lambda: a.count_events("192.0.2.7", now) == 4
                    and b.count_events("192.0.2.7", now) == 4)
        # A late process loads them: each counted once, though also published meanwhile.
        c = store(server, "c")
        await started(c)
        await asyncio.sleep(0.1)
        counted = c.count_events("192.0.2.7", now)
        stored = int(server.cli("ZCARD", "portcullis:ev:192.0.2.7"))
        ttl = int(server.cli("PTTL", "portcullis:ev:192.0.2.7"))
        for each in (a, b, c):
            await each.aclose()
        return counted, stored, ttl

    counted, stored, ttl = asyncio.run(scenario())
    assert (counted, stored) == (4, 4)
    assert 0 < ttl <= WINDOW * 1000 + 1


def test_a_ban_reaches_every_process_and_the_longer_one_wins(server):
    async def scenario():
        a, b = store(server, "a"), store(server, "b", read_events=False)
        told = []
        b.on_ban = told.append
        await started(a, b)
        now = time.time()
        a.ban("198.51.100.9", now + 3600, "DHA_BAN")
        took = await until(lambda: b.ban_of("198.51.100.9", now) is not None)
        a.ban("198.51.100.9", now + 60, "ADMIN_BAN")  # shorter: the store keeps the hour
        await asyncio.sleep(0.2)
        stored = server.cli("GET", "portcullis:ban:198.51.100.9")
        for each in (a, b):
            await each.aclose()
        return took, told, stored, now

    took, told, stored, now = asyncio.run(scenario())
    assert took < 1.0
    assert [(ban.key, ban.label) for ban in told] == [("198.51.100.9", "DHA_BAN")]
    until_text, label = stored.split(" ")
    assert label == "DHA_BAN" and float(until_text) == pytest.approx(now + 3600)


def test_an_unban_reaches_every_process(server):
    async def scenario():
        a, b = store(server, "a"), store(server, "b")
        await started(a, b)
        now = time.time()
        a.ban("203.0.113.5", now + 3600, "DHA_BAN")
        await until(lambda: b.ban_of("203.0.113.5", now) is not None)
        b.unban("203.0.113.5")
        await until(lambda: a.ban_of("203.0.113.5", now) is None)
        await asyncio.sleep(0.1)
        exists = server.cli("EXISTS", "portcullis:ban:203.0.113.5")
        for each in (a, b):
            await each.aclose()
        return exists

    assert asyncio.run(scenario()) == "0"


def test_pregreet_results_are_shared(server):
    async def scenario():
        a, b = store(server, "a", read_events=False), store(server, "b", read_events=False)
        heard = []
        b.on_pregreet = lambda client, passed, until_: heard.append((client, passed))
        await started(a, b)
        a.note_pregreet("192.0.2.1", True, time.time() + 60)
        a.note_pregreet("192.0.2.2", False, time.time() + 60)
        await until(lambda: len(heard) == 2)
        late = store(server, "late", read_events=False)
        loaded = []
        late.on_pregreet = lambda client, passed, until_: loaded.append((client, passed))
        await started(late)
        for each in (a, b, late):
            await each.aclose()
        return heard, sorted(loaded)

    heard, loaded = asyncio.run(scenario())
    assert heard == [("192.0.2.1", True), ("192.0.2.2", False)]
    assert loaded == [("192.0.2.1", True), ("192.0.2.2", False)]


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_lost_server_never_blocks_and_what_was_decided_meanwhile_is_shared(server, fault):
    async def scenario():
        a, b = store(server, "a"), store(server, "b")
        told = []
        b.on_ban = told.append
        await started(a, b)
        server.kill() if fault == "killed" else server.pause()
        lost = await until(lambda: not a.shared and not b.shared, timeout=10)
        # Meanwhile each counts locally, and no call waits on the network.
        now = time.time()
        slowest = 0.0
        for n in range(20):
            began = time.perf_counter()
            a.add_event("192.0.2.66", now + n / 1000)
            a.count_events("192.0.2.66", now)
            slowest = max(slowest, time.perf_counter() - began)
        a.ban("192.0.2.66", now + 3600, "DHA_BAN")
        local = a.count_events("192.0.2.66", now), b.count_events("192.0.2.66", now)
        held = a.unsent
        if fault == "killed":
            server.start()
        else:
            server.resume()
        await until(lambda: a.shared and b.shared, timeout=40)
        await until(lambda: b.ban_of("192.0.2.66", now) is not None, timeout=5)
        await until(lambda: b.count_events("192.0.2.66", now) == 20, timeout=5)
        await until(lambda: a.unsent == 0, timeout=5)
        counts = a.take_counts()
        for each in (a, b):
            await each.aclose()
        return lost, slowest, local, held, told, counts

    lost, slowest, local, held, told, counts = asyncio.run(scenario())
    assert held == 21  # 20 events and the ban, kept until the server takes them
    assert lost < 0.3 + 1.0 + 1.0  # timeout + heartbeat, and a margin for the test's polling
    assert slowest < 0.01
    assert local == (20, 0)
    assert [ban.key for ban in told] == ["192.0.2.66"]
    assert counts["outages"] == 1


def test_a_malformed_message_is_counted_and_ignored(server):
    async def scenario():
        a, b = store(server, "a"), store(server, "b")
        await started(a, b)
        server.cli("PUBLISH", "portcullis:events", "not json")
        server.cli("PUBLISH", "portcullis:events", '["x", [["e"]]]')
        a.add_event("192.0.2.3", time.time())
        await until(lambda: b.count_events("192.0.2.3", 0) == 1)
        counts = b.take_counts()
        for each in (a, b):
            await each.aclose()
        return counts

    assert asyncio.run(scenario())["bad_messages"] == 2


def test_a_server_that_refuses_the_password_means_local_counting(server, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")

    async def scenario():
        a = store(server, "a", password_file=str(wrong))
        a.start()
        await asyncio.sleep(1.0)
        a.add_event("192.0.2.4", time.time())
        result = a.shared, a.count_events("192.0.2.4", 0)
        await a.aclose()
        return result

    assert asyncio.run(scenario()) == (False, 1)


def test_processes_of_one_appliance_count_each_event_once(server):
    """They hear each other both through their SQLite file and on the channel: an event
    is counted once, also after a process loads from the file and from the server."""

    async def scenario():
        worker1, worker2 = store(server, "a"), store(server, "a")
        other = store(server, "b")
        await started(worker1, worker2, other)
        now = time.time()
        worker1.add_event("192.0.2.8", now)
        worker2.add_event("192.0.2.8", now + 1)
        await until(lambda: other.count_events("192.0.2.8", now) == 2)
        await asyncio.to_thread(worker1.flush)
        await asyncio.to_thread(worker2.flush)
        restarted = store(server, "a")  # loads both from SQLite and from the server
        await started(restarted)
        await asyncio.sleep(0.1)
        counts = [each.count_events("192.0.2.8", now)
                  for each in (worker1, worker2, other, restarted)]
        for each in (worker1, worker2, other, restarted):
            await each.aclose()
        return counts

    assert asyncio.run(scenario()) == [2, 2, 2, 2]


def test_tls_with_the_configured_ca(tmp_path):
    """rediss:// verifies the server against reputation.redis.ca_file; a server the CA
    did not sign is refused, and the gate counts locally."""
    from tests.support.slapd import TestCertificates

    trusted, stranger = TestCertificates(tmp_path / "ca"), TestCertificates(tmp_path / "other")

    async def scenario(server, **overrides):
        a, b = store(server, "a", **overrides), store(server, "b", **overrides)
        a.start()
        b.start()
        await asyncio.sleep(1.0)
        a.ban("192.0.2.9", time.time() + 60, "DHA_BAN")
        await asyncio.sleep(0.3)
        result = a.shared, b.ban_of("192.0.2.9", time.time()) is not None
        for each in (a, b):
            await each.aclose()
        return result

    with RedisServer(tmp_path / "tls", tls=trusted) as server:
        assert server.url.startswith("rediss://")
        assert asyncio.run(scenario(server)) == (True, True)
        assert asyncio.run(scenario(server, ca_file=str(stranger.ca_cert))) == (False, False)


def test_writes_the_server_refuses_are_dropped_not_retried(server):
    """An ACL without a command the store needs: the batch is refused, counted and
    dropped, and later writes still flow."""

    async def scenario():
        a, b = store(server, "a"), store(server, "b")
        await started(a, b)
        server.cli("ACL", "SETUSER", "gate", "-eval", admin=True)
        a.ban("192.0.2.10", time.time() + 60, "DHA_BAN")
        await asyncio.sleep(0.3)
        a.add_event("192.0.2.11", time.time())
        await until(lambda: b.count_events("192.0.2.11", 0) == 1)
        result = a.take_counts(), b.ban_of("192.0.2.10", time.time()), a.shared
        for each in (a, b):
            await each.aclose()
        return result

    counts, ban_heard, shared = asyncio.run(scenario())
    assert counts["rejected"] == 1 and ban_heard is None and shared


def test_junk_in_the_store_is_skipped_when_loading(server):
    server.cli("SET", "portcullis:ban:not-an-address", f"{time.time() + 60} DHA_BAN")
    server.cli("SET", "portcullis:ban:192.0.2.12", "soon DHA_BAN")
    server.cli("SET", "portcullis:ban:192.0.2.13", f"{time.time() + 60} DHA_BAN")

    async def scenario():
        a = store(server, "a")
        await started(a)
        result = a.ban_of("192.0.2.13", time.time()) is not None, a.take_counts()
        await a.aclose()
        return result

    loaded, counts = asyncio.run(scenario())
    assert loaded and counts["bad_messages"] == 2


def test_marks_and_counts_are_shared_and_marks_loaded(server):
    """Greylisting's marks and the rates' counts (policy/greylist.py, rates.py)."""

    async def scenario():
        a, b = store(server, "a"), store(server, "b")
        await started(a, b)
        now = time.time()
        a.mark("greylist", "triplet-1", now, now + 60)
        b.mark("greylist", "triplet-1", now + 5, now + 65)  # later: the first one stays
        for _ in range(3):
            a.count("messages", "192.0.2.20", now)
        await until(lambda: b.mark_of("greylist", "triplet-1") == (now, now + 60))
        await until(lambda: b.count("messages", "192.0.2.20", now, 0) == 3, timeout=3)
        late = store(server, "late")
        await started(late)
        loaded = late.mark_of("greylist", "triplet-1")
        for each in (a, b, late):
            await each.aclose()
        return loaded, now

    loaded, now = asyncio.run(scenario())
    assert loaded == (now, now + 60)
