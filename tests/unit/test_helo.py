"""HELO/EHLO rules: pure functions, no DNS."""

import pytest
from portcullis.config import HeloChecks
from portcullis.policy.findings import Action
from portcullis.policy.helo import check_helo, is_valid_domain, parse_address_literal
from portcullis.policy.score import Signal

OWN_NAMES = ["mx.example.org", "Gate.Example.Org."]
OWN_ADDRS = ["198.51.100.25", "2001:db8:25::25"]
CLIENT = "203.0.113.7"


def found(helo, client=CLIENT, rules=None):
    findings = check_helo(helo, client, OWN_NAMES, OWN_ADDRS, rules or HeloChecks())
    return [(finding.label, finding.action) for finding in findings]


@pytest.mark.parametrize("helo", [
    "mail.client.test", "MAIL.Client.TEST", "mail.client.test.", "a.b", "xn--bcher-kva.test",
    "host_name.client.test", "1mail.client.test", "mail-1.client.test", "[203.0.113.7]",
    "[IPv6:::ffff:203.0.113.7]", "a" * 63 + ".test",
])
def test_good_names_pass(helo):
    assert found(helo) == []


@pytest.mark.parametrize("helo", [
    "", ".", "mail..client.test", "-mail.client.test", "mail-.client.test",
    "mail client.test", "mail.client.test..", "mail@client.test", "mail.client.123",
    "999.1.1.1", "a" * 64 + ".test", ("a" * 60 + ".") * 5 + "test", "müller.test",
    "[203.0.113.7", "[300.1.1.1]", "[IPv6:203.0.113.7]", "[2001:db8::7]", "[mail.test]",
])
def test_bad_syntax(helo):
    assert found(helo) == [("HELO_SYNTAX", Action.REJECT)]


def test_a_name_without_a_dot_is_not_fully_qualified():
    assert found("localhost") == [("HELO_NOT_FQDN", Action.SCORE)]
    assert found("WORKSTATION7") == [("HELO_NOT_FQDN", Action.SCORE)]


@pytest.mark.parametrize("helo", ["mx.example.org", "MX.EXAMPLE.ORG.", "gate.example.org"])
def test_our_own_name_from_elsewhere_is_forged(helo):
    assert found(helo) == [("HELO_OURS", Action.REJECT)]


def test_our_own_name_from_ourselves_is_fine():
    assert found("mx.example.org", client="127.0.0.1") == []
    assert found("mx.example.org", client="198.51.100.25") == []


def test_a_bare_ip_is_refused():
    assert found("203.0.113.7") == [("HELO_BARE_IP", Action.REJECT)]
    assert found("2001:db8::7") == [("HELO_BARE_IP", Action.REJECT)]
    assert found("198.51.100.25") == [("HELO_BARE_IP", Action.REJECT),
                                      ("HELO_OURS", Action.REJECT)]


def test_address_literals():
    assert found("[203.0.113.7]", client="::ffff:203.0.113.7") == []
    assert found("[IPv6:2001:db8::7]", client="2001:db8:0::7") == []
    assert found("[203.0.113.8]") == [("HELO_LITERAL_MISMATCH", Action.SCORE)]
    assert found("[198.51.100.25]") == [("HELO_OURS", Action.REJECT)]
    assert found("[IPv6:2001:db8:25::25]") == [("HELO_OURS", Action.REJECT)]
    assert found("[198.51.100.25]", client="198.51.100.25") == []


def test_each_rule_takes_its_action_from_the_config():
    rules = HeloChecks(syntax="tempfail", not_fqdn="off", ours="score", bare_ip="off",
                       literal_mismatch="reject")
    assert found("bad..name", rules=rules) == [("HELO_SYNTAX", Action.TEMPFAIL)]
    assert found("localhost", rules=rules) == []
    assert found("mx.example.org", rules=rules) == [("HELO_OURS", Action.SCORE)]
    assert found("203.0.113.7", rules=rules) == []
    assert found("[203.0.113.8]", rules=rules) == [("HELO_LITERAL_MISMATCH", Action.REJECT)]


def test_findings_carry_the_bad_helo_signal_and_a_detail():
    (finding,) = check_helo("localhost", CLIENT, OWN_NAMES, OWN_ADDRS, HeloChecks())
    assert finding.signal is Signal.BAD_HELO
    assert finding.detail == "'localhost' is not a fully qualified domain name"


def test_helpers():
    assert is_valid_domain("mail.client.test") and not is_valid_domain("mail.client.test..")
    assert str(parse_address_literal("[IPv6:2001:DB8::1]")) == "2001:db8::1"
    assert parse_address_literal("[ipv6:2001:db8::1]") is not None
    assert parse_address_literal("203.0.113.7") is None
