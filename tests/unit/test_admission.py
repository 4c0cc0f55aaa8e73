"""Admission decisions: caps, rates, allowlist, pre-greet passes."""

from portcullis import config
from portcullis.addresses import TokenBucket
from portcullis.admission import ConnectionTable

BASE = "relay_domains: [example.test]\nbackend: {servers: ['127.0.0.1:25']}\n"


def table(limits: str = "", extra: str = "") -> ConnectionTable:
    return ConnectionTable(config.loads(BASE + extra + (f"limits: {{{limits}}}\n" if limits else "")))


def test_per_ip_cap_and_release():
    t = table("max_connections_per_ip: 2, connection_burst_per_ip: 100")
    for _ in range(2):
        assert t.judge("192.0.2.1", 0).label == ""
        t.opened("192.0.2.1", counted=True)
    verdict = t.judge("192.0.2.1", 0)
    assert verdict.label == "CONN_CAP_IP" and verdict.reply.startswith(b"421 ")
    assert t.judge("192.0.2.2", 0).label == ""  # another address is unaffected
    t.closed("192.0.2.1", counted=True)
    assert t.judge("192.0.2.1", 0).label == ""


def test_per_prefix_cap_ipv4_and_ipv6():
    t = table("max_connections_per_prefix: 2, max_connections_per_ip: 10")
    t.opened("192.0.2.1", True)
    t.opened("192.0.2.200", True)
    assert t.judge("192.0.2.77", 0).label == "CONN_CAP_PREFIX"
    assert t.judge("198.51.100.1", 0).label == ""
    t.opened("2001:db8:1:2::1", True)
    t.opened("2001:db8:1:2:ffff::9", True)
    assert t.judge("2001:db8:1:2::3", 0).label == "CONN_CAP_PREFIX"
    assert t.judge("2001:db8:1:3::3", 0).label == ""


def test_global_cap():
    t = table("max_connections: 3, max_connections_per_ip: 3")
    for i in range(3):
        t.opened(f"192.0.2.{i}", True)
    assert t.judge("203.0.113.9", 0).label == "CONN_CAP"
    assert t.stressed


def test_rate_limit_token_bucket_refills():
    t = table("connection_rate_per_ip: 2, connection_burst_per_ip: 3")
    labels = [t.judge("192.0.2.1", 10.0).label for _ in range(4)]
    assert labels == ["", "", "", "CONN_RATE"]
    assert t.judge("192.0.2.1", 10.6).label == ""  # 0.6 s refills one token at 2/s
    assert t.judge("192.0.2.1", 10.6).label == "CONN_RATE"


def test_allowlist_matches_networks():
    t = table(extra="allowlist: [10.0.0.0/8, '2001:db8::/32']\n")
    assert t.is_allowlisted("10.1.2.3")
    assert t.is_allowlisted("2001:db8::5")
    assert not t.is_allowlisted("192.0.2.1")


def test_pregreet_pass_is_remembered_until_it_expires():
    t = table("pregreet_delay: 2, pregreet_ttl: 100")
    assert t.needs_pregreet("192.0.2.1", 0)
    t.pregreet_pass("192.0.2.1", 0)
    assert not t.needs_pregreet("192.0.2.1", 50)
    assert t.needs_pregreet("192.0.2.1", 101)
    t.pregreet_fail("192.0.2.1", 60)
    assert t.needs_pregreet("192.0.2.1", 61)
    assert t.pregreet_failed_recently("192.0.2.1")
    t.prune(161)
    assert not t.pregreet_failed_recently("192.0.2.1")


def test_prune_forgets_idle_state():
    t = table("connection_rate_per_ip: 1, connection_burst_per_ip: 2, pregreet_ttl: 5")
    t.judge("192.0.2.1", 0)
    t.pregreet_pass("192.0.2.1", 0)
    t.prune(100)
    assert not t.buckets and not t.pregreet_passed


def test_token_bucket_refills_at_its_rate_up_to_its_burst():
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert [bucket.take(0.5) for _ in range(2)] == [True, False]  # one token back
    assert not bucket.is_full(0.5)
    assert bucket.is_full(100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
