"""Per-client state stays bounded whatever clients send (issue 9, findings 1 and 2).

Each table keyed by a client's address is purged by age in every process and capped in
size; an IPv6 client is its /64 (limits.ipv6_client_prefix), so rotating addresses
inside one network buys an attacker nothing. Memory is measured with tracemalloc, so the
tests hold for any implementation: past the cap, more clients cost no more memory.
"""

import ipaddress
import tracemalloc

from portcullis import config
from portcullis.admission import ConnectionTable
from portcullis.policy.dha import DhaEngine
from portcullis.policy.reputation import open_store
from portcullis.policy.score import ConnectionScore, Stage

BASE = "relay_domains: [example.test]\nbackend: {servers: ['127.0.0.1:25']}\n"
T0 = 1_800_000_000.0
SETTLED = 512 * 1024  # bytes a bounded table may still grow by once full


def settings(extra: str = "") -> config.Config:
    return config.loads(BASE + "reputation: {store: memory}\n" + extra)


class Clock:
    now = T0

    def __call__(self) -> float:
        return self.now


def ipv4(n: int) -> str:
    """A host in a different /24 of 10.0.0.0/8 for each n below 65,536."""
    return str(ipaddress.IPv4Address(0x0A000001 + (n << 8)))


def ipv6_network(n: int) -> str:
    """A different /64 inside 2001:db8::/32 for each n: a host per network."""
    return str(ipaddress.IPv6Address((0x20010DB8 << 96) + (n << 64) + 1))


def growth(clients: int, step) -> int:
    """Bytes allocated by the second half of `clients` calls of step(n), after the first."""
    tracemalloc.start()
    try:
        for n in range(clients // 2):
            step(n)
        middle = tracemalloc.get_traced_memory()[0]
        for n in range(clients // 2, clients):
            step(n)
        return tracemalloc.get_traced_memory()[0] - middle
    finally:
        tracemalloc.stop()


def worker_engine(extra: str = ""):
    """A harvest-defence engine as a worker has it: it never sees check_connect."""
    conf = settings(extra)
    clock = Clock()
    return DhaEngine(conf, open_store(conf, clock), clock=clock), clock


def test_a_worker_forgets_harvest_counts_past_the_window():
    # Finding 1: 20,000 clients over 2,000 s with a 100 s window; a worker only ever
    # calls before_rcpt and invalid_recipient, and must still forget old clients.
    engine, clock = worker_engine("dha: {window: 100}\n")
    conf = settings()

    def one_miss(n: int) -> None:
        clock.now = T0 + n / 10
        score = ConnectionScore(conf.score)
        engine.before_rcpt(ipv4(n), score)
        engine.invalid_recipient(ipv4(n), score)

    assert growth(12_000, one_miss) < SETTLED


def test_harvest_counts_are_capped_within_the_window():
    # 20,000 clients inside one window: the cap, not the age, bounds the table.
    engine, clock = worker_engine("dha: {window: 3600}\nlimits: {max_tracked_clients: 1000}\n")
    conf = settings()

    def one_miss(n: int) -> None:
        clock.now = T0 + n / 1000
        engine.invalid_recipient(ipv4(n), ConnectionScore(conf.score))

    assert growth(12_000, one_miss) < SETTLED
    assert engine.store.take_evictions()["harvest"] > 0


def test_bans_are_capped():
    engine, _ = worker_engine("limits: {max_tracked_clients: 1000}\n")
    assert growth(12_000, lambda n: engine.ban(ipv4(n), "TEST")) < SETTLED


def test_pregreet_passes_of_one_ipv6_network_are_one_entry():
    # Finding 2: an IPv6 host has a /64; each of its addresses must not cost an entry.
    table = ConnectionTable(settings())

    def rotate(n: int) -> None:
        table.pregreet_pass(f"2001:db8:1:2::{n:x}", 0.0)
        table.pregreet_fail(f"2001:db8:1:9::{n:x}", 0.0)

    assert growth(8_000, rotate) < SETTLED
    assert not table.needs_pregreet("2001:db8:1:2:ffff::1", 1.0)
    assert table.needs_pregreet("2001:db8:1:3::1", 1.0)


def test_pregreet_and_rate_tables_are_capped():
    table = ConnectionTable(settings("limits: {max_tracked_clients: 1000}\n"))

    def new_client(n: int) -> None:
        address = ipv6_network(n) if n % 2 else ipv4(n)
        table.judge(address, 0.0)  # a token bucket per client
        table.pregreet_pass(address, 0.0)
        table.pregreet_fail(ipv4(n + 30_000), 0.0)

    assert growth(12_000, new_client) < SETTLED
    evicted = table.take_evictions()
    assert evicted["pregreet"] > 0 and evicted["connection_rate"] > 0


def test_an_ipv6_client_rotating_addresses_is_one_client():
    # Ten misses from ten addresses of one /64 are ten misses of one client: banned,
    # where per-address keys would have let it go on to the prefix threshold (30).
    engine, _ = worker_engine()
    conf = settings()
    for n in range(10):
        score = ConnectionScore(conf.score)
        address = f"2001:db8:5:6::{n + 1:x}"
        verdict = engine.before_rcpt(address, score)
        if verdict.reply is None:  # the directory is asked, and does not know it
            verdict = engine.invalid_recipient(address, score)
    assert verdict.stage is Stage.BAN
    assert engine.check_connect("2001:db8:5:6:abcd::1").stage is Stage.BAN
    assert engine.check_connect("2001:db8:5:7::1").stage is Stage.PASS


def test_the_per_ip_caps_count_an_ipv6_network_as_one_client():
    table = ConnectionTable(settings("limits: {max_connections_per_ip: 2, "
                                     "max_connections_per_prefix: 100}\n"))
    table.opened("2001:db8:1:2::1", True)
    table.opened("2001:db8:1:2::2", True)
    assert table.judge("2001:db8:1:2::3", 0.0).label == "CONN_CAP_IP"
    table.closed("2001:db8:1:2::1", True)
    assert table.judge("2001:db8:1:2::3", 0.0).label == ""


def test_the_client_prefix_is_configurable():
    table = ConnectionTable(settings("limits: {ipv6_client_prefix: 128}\n"))
    table.pregreet_pass("2001:db8:1:2::1", 0.0)
    assert table.needs_pregreet("2001:db8:1:2::2", 1.0)
    assert not table.needs_pregreet("2001:db8:1:2::1", 1.0)


def test_a_returning_client_keeps_its_pass_while_new_ones_come_and_go():
    # Least recently USED goes: a regular client, seen between waves of new ones, stays.
    table = ConnectionTable(settings("limits: {max_tracked_clients: 100}\n"))
    table.pregreet_pass("192.0.2.1", 0.0)
    for wave in range(5):
        for n in range(60):
            table.pregreet_pass(ipv4(wave * 60 + n), 0.0)
        assert not table.needs_pregreet("192.0.2.1", 1.0)


def test_the_admission_process_keeps_bans_but_not_others_harvest_counts(tmp_path):
    conf = config.loads(BASE + f"state_dir: {tmp_path}\n")  # the SQLite store
    clock = Clock()
    worker, gate = open_store(conf, clock), open_store(conf, clock, read_events=False)
    try:
        worker.add_event("192.0.2.7", T0)
        worker.ban("192.0.2.8", T0 + 60, "TEST")
        worker.flush()
        gate.flush()
        assert gate.ban_of("192.0.2.8", T0) is not None
        assert gate.count_events("192.0.2.7", T0 - 1) == 0
    finally:
        worker.close()
        gate.close()
