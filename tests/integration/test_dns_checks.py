"""DNS checks against a real DNS server (dnsmasq, tests/support/dns_server.py) on loopback."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from portcullis.config import (
    DnsChecks,
    DnsListCheck,
    DnsListSite,
    FcrdnsCheck,
    HostPort,
    parse_host_port,
)
from portcullis.policy.dns_checks import DnsChecker
from portcullis.policy.findings import Action, strongest_action
from portcullis.policy.score import Signal

from tests.support.dns_server import DnsServer, Records, Silence

TIMEOUT = 0.5
BIG_ANSWER = [f"10.9.{i // 200}.{i % 200}" for i in range(120)] + ["192.0.2.17"]

RECORDS = Records(
    addresses={
        "mail.good.test": ["192.0.2.10"],
        "mail6.good.test": ["2001:db8::10"],
        "liar.test": ["192.0.2.99"],
        "b.multi.test": ["192.0.2.14"],
        "big.test": BIG_ANSWER,  # about 2 kB: truncated over UDP, served over TCP
        # DNS lists
        "20.2.0.192.bl.test": ["127.0.0.2"],
        "21.2.0.192.bl.test": ["127.0.0.12"],
        "22.2.0.192.bl.test": ["127.0.0.3"],
        "22.2.0.192.bl2.test": ["127.0.0.2"],
        "23.2.0.192.bl.test": ["127.0.0.2"],
        "23.2.0.192.wl.test": ["127.0.10.2"],
        "24.2.0.192.bl.test": ["127.0.0.2", "127.0.0.11"],
        "0.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test": ["127.0.0.4"],
    },
    pointers={
        "192.0.2.10": ["mail.good.test"],
        "2001:db8::10": ["mail6.good.test"],
        "192.0.2.11": ["liar.test"],
        "192.0.2.13": ["nowhere.test"],
        "192.0.2.14": ["a.multi.test", "b.multi.test"],
        "192.0.2.15": ["host.slow.test"],
        "192.0.2.17": ["big.test"],
    },
    unanswered=["slow.test", "16.2.0.192.in-addr.arpa", "slowbl.test", "slowbl2.test",
                "slowbl3.test", "slowbl4.test", "slowwl.test"],
)


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory):
    with DnsServer(tmp_path_factory.mktemp("dns"), RECORDS) as server:
        yield server


def settings(server: DnsServer, sites=(), fcrdns="reject", **dnsbl) -> DnsChecks:
    dnsbl = {"action": "reject", "timeout": TIMEOUT, **dnsbl}
    return DnsChecks(
        nameservers=[parse_host_port(server.nameserver)],
        fcrdns=FcrdnsCheck(action=fcrdns, timeout=TIMEOUT),
        dnsbl=DnsListCheck(sites=[DnsListSite.from_text(site) for site in sites], **dnsbl),
    )


def lists_only(server: DnsServer, sites, **dnsbl) -> DnsChecks:
    return settings(server, sites, fcrdns="off", **dnsbl)


def check(checks: DnsChecks, client_ip: str):
    return asyncio.run(DnsChecker(checks).check_client(client_ip)).findings


def labels(findings) -> list[tuple[str, Action]]:
    return [(finding.label, finding.action) for finding in findings]


# --- FCrDNS -------------------------------------------------------------------------

@pytest.mark.parametrize("client_ip", [
    "192.0.2.10", "::ffff:192.0.2.10", "2001:db8::10",
    "192.0.2.14",  # the second of two PTR names confirms
])
def test_fcrdns_passes(dns_server, client_ip):
    assert check(settings(dns_server), client_ip) == []


@pytest.mark.parametrize("client_ip, name", [
    ("192.0.2.10", "mail.good.test"), ("192.0.2.14", "b.multi.test"), ("192.0.2.11", ""),
])
def test_the_verified_name_is_the_ptr_name_that_resolves_back(dns_server, client_ip, name):
    # It goes to the backend (XCLIENT NAME) and into the Received header.
    checks = asyncio.run(DnsChecker(settings(dns_server)).check_client(client_ip))
    assert checks.name == name


@pytest.mark.parametrize("client_ip, detail", [
    ("192.0.2.12", "no PTR record for 192.0.2.12"),
    ("192.0.2.11", "liar.test. (PTR of 192.0.2.11) does not resolve back to it"),
    ("192.0.2.13", "nowhere.test. (PTR of 192.0.2.13) does not resolve back to it"),
    ("2001:db8::11", "no PTR record for 2001:db8::11"),
])
def test_fcrdns_fails(dns_server, client_ip, detail):
    (finding,) = check(settings(dns_server), client_ip)
    assert (finding.label, finding.action, finding.signal) == (
        "FCRDNS_FAIL", Action.REJECT, Signal.NO_REVERSE_DNS)
    assert finding.detail == detail


def test_fcrdns_action_comes_from_the_config(dns_server):
    scored = replace(settings(dns_server), fcrdns=FcrdnsCheck(action="score", timeout=TIMEOUT))
    assert labels(check(scored, "192.0.2.12")) == [("FCRDNS_FAIL", Action.SCORE)]
    off = replace(settings(dns_server), fcrdns=FcrdnsCheck(action="off"))
    assert check(off, "192.0.2.12") == []


def test_fcrdns_follows_a_forward_answer_that_needs_tcp(dns_server):
    before = dns_server.queries().count("query[A] big.test")
    assert check(settings(dns_server), "192.0.2.17") == []
    # Asked twice: over UDP (truncated, the client address not in it) and again over TCP.
    assert dns_server.queries().count("query[A] big.test") - before == 2


@pytest.mark.parametrize("client_ip", ["192.0.2.15", "192.0.2.16"])  # forward, reverse silent
def test_fcrdns_timeout_is_neutral(dns_server, client_ip):
    (finding,) = check(settings(dns_server), client_ip)
    assert (finding.label, finding.action, finding.signal) == ("DNS_TIMEOUT", Action.NONE, None)
    assert finding.detail.startswith("fcrdns: ")


# --- DNS lists ----------------------------------------------------------------------

LISTS = ["bl.test=127.0.0.[2..11]*2", "bl2.test*2", "wl.test=127.0.[0..255].[1..3]*-3"]


def test_a_listing_within_the_reply_filter_counts(dns_server):
    (finding,) = check(lists_only(dns_server, LISTS, threshold=2), "192.0.2.20")
    assert (finding.label, finding.action, finding.signal) == ("DNSBL", Action.REJECT,
                                                               Signal.DNSBL)
    assert finding.detail == "rank 2, threshold 2: bl.test=127.0.0.2*2"


def test_a_reply_outside_the_filter_does_not_count(dns_server):
    assert check(lists_only(dns_server, LISTS, threshold=1), "192.0.2.21") == []  # 127.0.0.12


def test_a_site_counts_once_even_with_two_matching_replies(dns_server):
    (finding,) = check(lists_only(dns_server, LISTS, threshold=3), "192.0.2.24")
    assert (finding.label, finding.action) == ("DNSBL_RANK", Action.NONE)
    assert finding.detail.startswith("rank 2, threshold 3: bl.test=127.0.0.")


def test_weights_add_up_to_the_threshold(dns_server):
    below = check(lists_only(dns_server, LISTS, threshold=3), "192.0.2.20")  # rank 2
    assert labels(below) == [("DNSBL_RANK", Action.NONE)]
    reached = check(lists_only(dns_server, LISTS, threshold=3), "192.0.2.22")  # rank 2 + 2
    assert labels(reached) == [("DNSBL", Action.REJECT)]
    assert reached[-1].detail == "rank 4, threshold 3: bl.test=127.0.0.3*2, bl2.test=127.0.0.2*2"


def test_an_allowlist_offsets_a_blocklist(dns_server):
    findings = check(lists_only(dns_server, LISTS, threshold=1), "192.0.2.23")  # 2 - 3
    assert labels(findings) == [("DNSWL", Action.NONE), ("DNSBL_RANK", Action.NONE)]
    assert findings[0].detail == "wl.test=127.0.10.2*-3"
    assert findings[1].detail == "rank -1, threshold 1: bl.test=127.0.0.2*2"
    assert strongest_action(findings) is Action.NONE


def test_one_query_per_zone_however_many_sites_use_it(dns_server):
    sites = ["bl.test=127.0.0.2*1", "bl.test=127.0.0.3*5", "bl.test*1"]
    before = dns_server.queries().count("query[A] 20.2.0.192.bl.test from")
    findings = check(lists_only(dns_server, sites, threshold=1), "192.0.2.20")
    assert dns_server.queries().count("query[A] 20.2.0.192.bl.test from") - before == 1
    assert [f.detail for f in findings] == [
        "rank 2, threshold 1: bl.test=127.0.0.2*1, bl.test=127.0.0.2*1"]


def test_an_ipv6_client_is_looked_up_by_nibbles(dns_server):
    (finding,) = check(lists_only(dns_server, LISTS, threshold=2), "2001:db8::20")
    assert finding.detail == "rank 2, threshold 2: bl.test=127.0.0.4*2"


def test_the_dns_list_action_comes_from_the_config(dns_server):
    findings = check(lists_only(dns_server, LISTS, threshold=2, action="tempfail"), "192.0.2.20")
    assert labels(findings) == [("DNSBL", Action.TEMPFAIL)]
    assert check(lists_only(dns_server, LISTS, threshold=2, action="off"), "192.0.2.20") == []


# --- timeouts never reject ----------------------------------------------------------

def test_a_silent_list_is_neutral_and_the_others_still_count(dns_server):
    sites = ["slowbl.test*5", "bl.test=127.0.0.[2..11]*2"]
    findings = check(lists_only(dns_server, sites, threshold=2), "192.0.2.20")
    assert labels(findings) == [("DNS_TIMEOUT", Action.NONE), ("DNSBL", Action.REJECT)]
    assert findings[0].detail.startswith("dnsbl slowbl.test: ")


def test_a_silent_allowlist_prevents_a_verdict_it_could_have_changed(dns_server):
    sites = LISTS + ["slowwl.test*-3"]
    findings = check(lists_only(dns_server, sites, threshold=3), "192.0.2.22")  # rank 4, 4 - 3 < 3
    assert labels(findings) == [("DNS_TIMEOUT", Action.NONE), ("DNSBL_RANK", Action.NONE)]
    assert findings[-1].detail.endswith("not acted on: an allowlist did not answer")
    # A rank the silent allowlist could not have offset still counts.
    sites = LISTS + ["slowwl.test*-1"]
    findings = check(lists_only(dns_server, sites, threshold=3), "192.0.2.22")  # 4 - 1 >= 3
    assert labels(findings) == [("DNS_TIMEOUT", Action.NONE), ("DNSBL", Action.REJECT)]


def test_silent_lists_are_queried_concurrently(dns_server):
    sites = ["slowbl.test", "slowbl2.test", "slowbl3.test", "slowbl4.test"]
    started = time.monotonic()
    findings = check(lists_only(dns_server, sites), "192.0.2.10")
    elapsed = time.monotonic() - started
    assert labels(findings) == [("DNS_TIMEOUT", Action.NONE)] * 4
    assert elapsed < 3 * TIMEOUT  # one timeout, not four after one another


def test_a_dead_nameserver_never_rejects(dns_server):
    silence = Silence()
    try:
        dead = replace(settings(dns_server, LISTS + ["slowbl.test*9"], threshold=1),
                       nameservers=[HostPort(silence.host, silence.port)])
        findings = check(dead, "192.0.2.20")
    finally:
        silence.close()
    assert {finding.label for finding in findings} == {"DNS_TIMEOUT"}
    assert strongest_action(findings) is Action.NONE


def test_a_refusing_nameserver_gives_dns_error_not_a_verdict(dns_server):
    # dnsmasq refuses names outside its local domains, as a resolver refusing us would.
    sites = ["bl.example.org*9"]
    findings = check(lists_only(dns_server, sites, threshold=1), "192.0.2.10")
    assert labels(findings) == [("DNS_ERROR", Action.NONE)]
