"""Greylisting's engine (policy/greylist.py) over the in-memory and SQLite stores."""

import pytest
from portcullis import config
from portcullis.policy.greylist import Greylist, Outcome
from portcullis.policy.reputation import MemoryStore, SqliteStore

BASE = ("hostname: mx.example.test\nrelay_domains: [example.test]\n"
        "backend: {servers: ['127.0.0.1:2525']}\n"
        "greylist: {enabled: true, delay: 300, retry_window: 14400, pass_ttl: 3110400}\n")
T0 = 1_800_000_000.0
SENDER, RECIPIENT = "news@sender.example.net", "alice@example.test"


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


def engine(clock, store=None):
    counted = []
    store = store or MemoryStore(600, clock=clock)
    return Greylist(config.loads(BASE, "t.yaml"), store, counted.append, clock), counted


def test_first_early_retried_then_the_client_passes(clock):
    greylist, counted = engine(clock)
    assert greylist.judge("192.0.2.1", SENDER, RECIPIENT) is Outcome.FIRST
    clock.now += 299
    assert greylist.judge("192.0.2.1", SENDER, RECIPIENT) is Outcome.EARLY
    clock.now += 1
    assert greylist.judge("192.0.2.1", SENDER, RECIPIENT) is Outcome.RETRIED
    # The client's /24 has passed: another recipient, sender or address in it passes.
    assert greylist.judge("192.0.2.99", "other@else.example", "bob@example.test") \
        is Outcome.PASS
    clock.now = T0 + 300 + 3110400 - 1
    assert greylist.judge("192.0.2.1", "x@y.example", "carol@example.test") is Outcome.PASS
    clock.now += 1  # pass_ttl is over
    assert greylist.judge("192.0.2.1", "x@y.example", "carol@example.test") is Outcome.FIRST
    assert counted == ["seen", "passed", "seen"]


def test_a_retry_after_the_window_starts_over(clock):
    greylist, counted = engine(clock)
    greylist.judge("198.51.100.7", SENDER, RECIPIENT)
    clock.now += 14400
    assert greylist.judge("198.51.100.7", SENDER, RECIPIENT) is Outcome.EXPIRED
    clock.now += 299
    assert greylist.judge("198.51.100.7", SENDER, RECIPIENT) is Outcome.EARLY
    clock.now += 1
    assert greylist.judge("198.51.100.7", SENDER, RECIPIENT) is Outcome.RETRIED
    assert counted == ["seen", "expired", "passed"]


def test_triplets_are_apart(clock):
    greylist, _ = engine(clock)
    greylist.judge("192.0.2.1", SENDER, RECIPIENT)
    clock.now += 300
    assert greylist.judge("192.0.2.1", SENDER, "bob@example.test") is Outcome.FIRST
    assert greylist.judge("192.0.2.1", "<>", RECIPIENT) is Outcome.FIRST
    assert greylist.judge("203.0.113.1", SENDER, RECIPIENT) is Outcome.FIRST
    # Case does not make a new triplet; the /24 is the client, not the address.
    assert greylist.judge("192.0.2.200", SENDER.upper(), RECIPIENT.upper()) is Outcome.RETRIED


def test_ipv6_clients_are_their_64(clock):
    greylist, _ = engine(clock)
    greylist.judge("2001:db8:1:2::1", SENDER, RECIPIENT)
    clock.now += 300
    assert greylist.judge("2001:db8:1:2:ffff::9", SENDER, RECIPIENT) is Outcome.RETRIED
    assert greylist.judge("2001:db8:1:3::1", SENDER, RECIPIENT) is Outcome.FIRST


@pytest.mark.parametrize(("name", "exempt"), [
    ("mail-ej1-f41.google.com", True), ("google.com", True), ("GOOGLE.COM.", True),
    ("notgoogle.com", False), ("google.com.evil.example", False), ("", False)])
def test_large_senders_by_name(clock, name, exempt):
    greylist, _ = engine(clock)
    assert greylist.is_exempt_name(name) is exempt


def test_processes_share_the_state_through_sqlite(clock, tmp_path):
    """A retry that another worker takes passes: the first sighting is in the file."""
    path = str(tmp_path / "reputation.db")
    first = SqliteStore(path, 600, clock=clock, sync_interval=0.05)
    second = SqliteStore(path, 600, clock=clock, sync_interval=0.05)
    try:
        one, _ = engine(clock, first)
        other, _ = engine(clock, second)
        assert one.judge("192.0.2.1", SENDER, RECIPIENT) is Outcome.FIRST
        first.flush()
        second.flush()
        clock.now += 300
        assert other.judge("192.0.2.1", SENDER, RECIPIENT) is Outcome.RETRIED
        second.flush()
        first.flush()
        assert one.judge("192.0.2.50", "a@b.example", "c@example.test") is Outcome.PASS
    finally:
        first.close()
        second.close()


def test_the_first_sighting_wins_a_merge(clock):
    store = MemoryStore(600, clock=clock)
    store.mark("greylist", "k", T0 + 10, T0 + 100)
    store.merge_mark("greylist", "k", T0 + 20, T0 + 110, T0)  # a later sighting elsewhere
    assert store.mark_of("greylist", "k") == (T0 + 10, T0 + 100)
    store.merge_mark("greylist", "k", T0 + 5, T0 + 95, T0)  # an earlier one
    assert store.mark_of("greylist", "k") == (T0 + 5, T0 + 95)
    clock.now = T0 + 200  # expired: any new mark replaces it
    store.mark("greylist", "k", T0 + 200, T0 + 300)
    assert store.mark_of("greylist", "k") == (T0 + 200, T0 + 300)
    store.purge(T0 + 300)
    assert store.mark_of("greylist", "k") is None
