"""The reputation store: in-memory semantics, and SQLite persistence across restarts."""

import sqlite3

import pytest
from portcullis import config
from portcullis.policy.reputation import (
    DATABASE_NAME,
    MemoryStore,
    ReputationStoreError,
    SqliteStore,
    open_store,
    read_bans,
)

T0 = 1_800_000_000.0  # a fixed wall-clock time


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sqlite_store(tmp_path):
    stores = []

    def open_one(clock=None, retention=600.0, **kwargs):
        store = SqliteStore(str(tmp_path / DATABASE_NAME), retention,
                            clock=clock or Clock(), **kwargs)
        stores.append(store)
        return store

    yield open_one
    for store in stores:
        store.close()


# -- memory semantics (shared by both stores) -------------------------------------------

@pytest.fixture(params=["memory", "sqlite"])
def store(request, sqlite_store):
    if request.param == "memory":
        return MemoryStore(retention=600.0)
    return sqlite_store()


def test_events_are_counted_from_a_given_time(store):
    for offset in (0, 10, 20, 30):
        store.add_event("192.0.2.1", T0 + offset)
    assert store.count_events("192.0.2.1", T0) == 4
    assert store.count_events("192.0.2.1", T0 + 15) == 2
    assert store.count_events("192.0.2.1", T0 + 31) == 0
    assert store.count_events("192.0.2.2", T0) == 0


def test_events_older_than_the_retention_are_dropped(store):
    store.add_event("k", T0)
    store.add_event("k", T0 + 601)
    assert store.count_events("k", 0) == 1
    store.purge(T0 + 1202)
    assert store.count_events("k", 0) == 0


def test_only_the_newest_events_per_key_are_kept():
    store = MemoryStore(retention=600.0, max_events_per_key=3)
    for offset in range(5):
        store.add_event("k", T0 + offset)
    assert store.count_events("k", 0) == 3
    assert store.count_events("k", T0 + 2) == 3


def test_a_ban_holds_until_it_expires(store):
    store.ban("192.0.2.1", T0 + 3600, "DHA_BAN")
    ban = store.ban_of("192.0.2.1", T0 + 3599)
    assert (ban.key, ban.until, ban.label) == ("192.0.2.1", T0 + 3600, "DHA_BAN")
    assert store.ban_of("192.0.2.1", T0 + 3600) is None
    assert store.ban_of("192.0.2.2", T0) is None


def test_a_shorter_ban_does_not_shorten_a_longer_one(store):
    store.ban("k", T0 + 3600, "DHA_BAN")
    store.ban("k", T0 + 60, "SCORE_BAN")
    assert store.ban_of("k", T0 + 100).until == T0 + 3600
    store.ban("k", T0 + 7200, "SCORE_BAN")
    assert store.ban_of("k", T0 + 100).label == "SCORE_BAN"


def test_active_bans_lists_only_unexpired_ones(store):
    store.ban("a", T0 + 10, "DHA_BAN")
    store.ban("b", T0 + 100, "DHA_BAN")
    assert [ban.key for ban in store.active_bans(T0 + 50)] == ["b"]


def test_unban_lifts_a_ban_and_a_later_ban_holds_again(store):
    store.ban("192.0.2.1", T0 + 3600, "DHA_BAN")
    store.unban("192.0.2.1")
    store.unban("192.0.2.9")  # no ban: nothing to do
    assert store.ban_of("192.0.2.1", T0) is None
    assert store.active_bans(T0) == []
    store.ban("192.0.2.1", T0 + 60, "ADMIN_BAN")
    assert store.ban_of("192.0.2.1", T0).until == T0 + 60


# -- persistence -----------------------------------------------------------------------

def test_bans_and_events_survive_a_restart(sqlite_store):
    clock = Clock()
    first = sqlite_store(clock)
    first.ban("192.0.2.1", T0 + 3600, "DHA_BAN")
    first.ban("192.0.2.0/24", T0 + 3600, "DHA_BAN")
    for offset in range(4):
        first.add_event("192.0.2.1", T0 + offset)
    first.close()

    clock.now = T0 + 100
    second = sqlite_store(clock)
    assert second.ban_of("192.0.2.1", clock.now).label == "DHA_BAN"
    assert second.ban_of("192.0.2.0/24", clock.now).until == T0 + 3600
    assert second.count_events("192.0.2.1", T0) == 4


def test_expired_state_is_not_loaded_after_a_restart(sqlite_store):
    clock = Clock()
    first = sqlite_store(clock)
    first.ban("192.0.2.1", T0 + 60, "DHA_BAN")
    first.add_event("192.0.2.1", T0)
    first.close()

    clock.now = T0 + 601
    second = sqlite_store(clock)
    assert second.active_bans(clock.now) == []
    assert second.count_events("192.0.2.1", 0) == 0


def test_the_database_uses_wal_and_expired_rows_are_deleted(sqlite_store, tmp_path):
    clock = Clock()
    store = sqlite_store(clock)
    store.ban("old", T0 + 1, "DHA_BAN")
    store.add_event("old", T0)
    store.close()
    clock.now = T0 + 700
    sqlite_store(clock).flush()  # a new store purges on its first round
    with sqlite3.connect(tmp_path / DATABASE_NAME) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT COUNT(*) FROM bans").fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM events").fetchone() == (0,)


def test_two_processes_on_one_file_see_each_others_writes(sqlite_store):
    worker_a, worker_b = sqlite_store(), sqlite_store()
    worker_a.ban("192.0.2.1", T0 + 3600, "DHA_BAN")
    worker_a.add_event("192.0.2.1", T0)
    worker_b.add_event("192.0.2.1", T0 + 1)
    worker_a.flush()
    worker_b.flush()
    worker_a.flush()
    assert worker_b.ban_of("192.0.2.1", T0).label == "DHA_BAN"
    assert worker_a.count_events("192.0.2.1", T0) == 2
    assert worker_b.count_events("192.0.2.1", T0) == 2


def test_a_later_ban_by_another_process_replaces_the_row(sqlite_store):
    worker_a, worker_b = sqlite_store(), sqlite_store()
    worker_a.ban("k", T0 + 60, "DHA_BAN")
    worker_a.flush()
    worker_b.flush()
    worker_b.ban("k", T0 + 3600, "SCORE_BAN")
    worker_b.flush()
    worker_a.flush()
    assert worker_a.ban_of("k", T0 + 100).label == "SCORE_BAN"


def test_a_removal_reaches_the_other_processes_and_outlives_a_purge(sqlite_store):
    clock = Clock()
    gate, worker = sqlite_store(clock), sqlite_store(clock)
    gate.ban("192.0.2.1", T0 + 3600, "DHA_BAN")
    gate.ban("192.0.2.2", T0 + 3600, "DHA_BAN")
    gate.flush()
    worker.flush()
    assert worker.ban_of("192.0.2.1", T0) is not None
    operator = sqlite_store(clock)  # the CLI: a short-lived process of its own
    operator.unban("192.0.2.1")
    operator.close()
    clock.now = T0 + 61
    sqlite_store(clock).flush()  # another process's first round purges what expired
    gate.flush()
    worker.flush()
    assert gate.ban_of("192.0.2.1", clock.now) is None
    assert worker.ban_of("192.0.2.1", clock.now) is None
    assert worker.ban_of("192.0.2.2", clock.now) is not None


def test_a_removal_is_not_loaded_after_a_restart_and_a_new_ban_replaces_it(sqlite_store,
                                                                           tmp_path):
    clock = Clock()
    first = sqlite_store(clock)
    first.ban("k", T0 + 3600, "DHA_BAN")
    first.unban("k")
    first.close()
    assert sqlite_store(clock).ban_of("k", T0) is None
    operator, other = sqlite_store(clock), sqlite_store(clock)
    operator.ban("k", T0 + 60, "ADMIN_BAN")
    operator.flush()
    other.flush()
    assert other.ban_of("k", T0).label == "ADMIN_BAN"
    assert [(ban.key, ban.label) for ban in read_bans(str(tmp_path / DATABASE_NAME), T0)] == [
        ("k", "ADMIN_BAN")]
    clock.now = T0 + 1000
    sqlite_store(clock).flush()  # expired rows and removals go, after REMOVAL_GRACE
    with sqlite3.connect(tmp_path / DATABASE_NAME) as db:
        assert db.execute("SELECT COUNT(*) FROM bans").fetchone() == (0,)


def test_read_bans_lists_bans_in_force_without_removals(sqlite_store, tmp_path):
    store = sqlite_store()
    store.ban("192.0.2.0/24", T0 + 300, "DHA_BAN")
    store.ban("192.0.2.1", T0 + 100, "SCORE_BAN")
    store.ban("192.0.2.2", T0 + 10, "DHA_BAN")
    store.ban("192.0.2.3", T0 + 200, "DHA_BAN")
    store.unban("192.0.2.3")
    store.flush()
    bans = read_bans(str(tmp_path / DATABASE_NAME), T0 + 50)
    assert [(ban.key, ban.until) for ban in bans] == [("192.0.2.1", T0 + 100),
                                                      ("192.0.2.0/24", T0 + 300)]


def test_read_bans_of_a_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(ReputationStoreError, match="cannot read the reputation store"):
        read_bans(str(tmp_path / "nothing" / DATABASE_NAME), T0)


def test_an_unwritable_location_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ReputationStoreError, match=f"cannot open the reputation store {blocker}/"):
        SqliteStore(str(blocker / DATABASE_NAME), 600.0)


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / DATABASE_NAME
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ReputationStoreError, match=rf"{path}: file is not a database"):
        SqliteStore(str(path), 600.0)


def test_open_store_follows_the_configuration(tmp_path):
    settings = config.Config(state_dir=str(tmp_path / "state"))
    store = open_store(settings)
    try:
        assert isinstance(store, SqliteStore)
        assert store.path == str(tmp_path / "state" / DATABASE_NAME)
        assert store.retention == settings.dha.window
    finally:
        store.close()
    settings.reputation.store = "memory"
    assert type(open_store(settings)) is MemoryStore
