"""The `dns` config section: DNS list syntax, defaults, and errors that name key and line."""

import asyncio
import ipaddress

import pytest
from portcullis.config import ConfigError, DnsChecks, DnsListSite, HostPort, loads
from portcullis.policy.dns_checks import DnsChecker, make_resolver, reversed_labels
from portcullis.policy.findings import Action, Finding, strongest_action

BASE = "relay_domains: [example.org]\nbackend: {servers: ['127.0.0.1:2525']}\n"


def replies_matching(text: str, replies: list[str]) -> list[str]:
    site = DnsListSite.from_text(text)
    return [reply for reply in replies if site.matches(ipaddress.IPv4Address(reply))]


def test_postscreen_site_syntax():
    site = DnsListSite.from_text("Zen.Spamhaus.Org.=127.0.0.[2..11]*3")
    assert (site.zone, site.weight) == ("zen.spamhaus.org", 3)
    assert DnsListSite.from_text("list.dnswl.org=127.0.[0..255].[1..3]*-2").weight == -2
    assert DnsListSite.from_text("bl.example.net").weight == 1


REPLIES = ["127.0.0.1", "127.0.0.2", "127.0.0.4", "127.0.0.11", "127.0.0.12", "127.0.9.3",
           "127.0.9.4", "127.255.255.254"]


@pytest.mark.parametrize("text, matching", [
    ("bl.test", REPLIES),
    ("bl.test=127.0.0.[2..11]", ["127.0.0.2", "127.0.0.4", "127.0.0.11"]),
    ("bl.test=127.0.0.[2;11..12]", ["127.0.0.2", "127.0.0.11", "127.0.0.12"]),
    ("bl.test=127.0.[0..255].[1..3]", ["127.0.0.1", "127.0.0.2", "127.0.9.3"]),
    ("bl.test=127.0.0.12*-1", ["127.0.0.12"]),
])
def test_reply_patterns(text, matching):
    assert replies_matching(text, REPLIES) == matching


@pytest.mark.parametrize("text, problem", [
    ("localhost", "is not a DNS zone"),
    ("bl..test", "is not a DNS zone"),
    ("bl.test*x", "the weight after * must be an integer"),
    ("bl.test*0", "a weight of 0"),
    ("bl.test=127.0.0", "the reply pattern must look like"),
    ("bl.test=127.0.0.[2-11]", "the reply pattern must look like"),
    ("bl.test=127.0.0.[11..2]", "range 11..2 is not within 0..255"),
    ("bl.test=127.0.0.256", "range 256 is not within 0..255"),
])
def test_bad_sites_name_the_key_and_line(text, problem):
    text = f"dns:\n  dnsbl:\n    sites:\n      - bl.ok.test\n      - '{text}'\n"
    with pytest.raises(ConfigError) as error:
        loads(BASE + text)
    assert "line 7: key 'dns.dnsbl.sites'" in str(error.value)
    assert problem in str(error.value)


def test_the_section_loads_with_its_defaults():
    config = loads(BASE + "dns:\n  nameservers: ['127.0.0.1:5353']\n  helo: {not_fqdn: reject}\n"
                          "  dnsbl: {sites: ['bl.test*2'], threshold: 2, action: tempfail}\n")
    assert config.dns.nameservers == [HostPort("127.0.0.1", 5353)]
    assert (config.dns.helo.not_fqdn, config.dns.helo.syntax) == ("reject", "reject")
    assert config.dns.dnsbl.sites == [DnsListSite("bl.test", None, 2)]
    assert (config.dns.dnsbl.threshold, config.dns.dnsbl.action) == (2, "tempfail")
    assert (config.dns.fcrdns.action, config.dns.fcrdns.timeout) == ("score", 5.0)
    assert loads(BASE).dns == DnsChecks()


@pytest.mark.parametrize("text, message", [
    ("dns:\n  fcrdns: {action: drop}\n", "line 4: key 'dns.fcrdns.action': must be one of"),
    ("dns:\n  dnsbl: {timeout: 0}\n", "line 4: key 'dns.dnsbl.timeout': must be at least 0.1"),
    ("dns:\n  nameservers: [127.0.0.1]\n",
     "line 4: key 'dns.nameservers': '127.0.0.1' needs a port"),
    ("dns:\n  helo: {fqdn: reject}\n", "line 4: key 'dns.helo.fqdn': unknown key"),
])
def test_bad_values_name_the_key_and_line(text, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("'", ".")):
        loads(BASE + text)


def test_a_nameserver_must_be_an_address():
    with pytest.raises(ConfigError, match="line 3: key 'dns.nameservers': 'dns.example.org:53' "
                                          "must be an IP address"):
        loads(BASE + "dns: {nameservers: ['dns.example.org:53']}\n")


def test_the_resolver_uses_only_the_configured_nameservers():
    resolver = make_resolver(DnsChecks(nameservers=[HostPort("127.0.0.2", 5353),
                                                    HostPort("::1", 53)], cache_size=0))
    assert [(ns.address, ns.port) for ns in resolver.nameservers] == [("127.0.0.2", 5353),
                                                                      ("::1", 53)]
    assert resolver.cache is None


def test_reversed_labels():
    assert reversed_labels(ipaddress.ip_address("192.0.2.1")) == "1.2.0.192"
    assert reversed_labels(ipaddress.ip_address("2001:db8::1")) == (
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2")


def test_checks_that_are_off_make_no_query():
    settings = DnsChecks(nameservers=[HostPort("127.0.0.1", 9)])
    settings.fcrdns.action = "off"  # and no DNS lists configured
    assert asyncio.run(DnsChecker(settings).check_client("192.0.2.1")).findings == []


def test_strongest_action():
    def finding(action):
        return Finding("X", action, None, "")
    assert strongest_action([]) is Action.NONE
    assert strongest_action([finding(Action.SCORE), finding(Action.REJECT),
                             finding(Action.TEMPFAIL)]) is Action.REJECT
    assert Action.configured("off") is None and Action.configured("tempfail") is Action.TEMPFAIL
