"""The firewall ruleset is loaded, default-deny, with synproxy, caps and ban sets."""

import json

import pytest


@pytest.fixture(scope="module")
def ruleset(host):
    return host.check_output("nft list table inet portcullis")


@pytest.fixture(scope="module")
def objects(host):
    listing = json.loads(host.check_output("nft -j list table inet portcullis"))
    return listing["nftables"]


def chains(objects):
    return {o["chain"]["name"]: o["chain"] for o in objects if "chain" in o}


def sets(objects):
    return {o["set"]["name"]: o["set"] for o in objects if "set" in o}


def test_loaded_at_boot(host):
    assert host.service("nftables").is_enabled


@pytest.mark.parametrize("name,kind", [("portcullis_ban4", "ipv4_addr"),
                                       ("portcullis_ban6", "ipv6_addr")])
def test_ban_sets(objects, name, kind):
    ban = sets(objects)[name]
    assert ban["type"] == kind
    assert "timeout" in ban["flags"]


def test_ban_sets_checked_first(ruleset):
    raw = ruleset.split("chain prerouting_raw")[1]
    rules = [line.strip() for line in raw.splitlines()[2:5]]
    assert rules[0] == "ip saddr @portcullis_ban4 drop"
    assert rules[1] == "ip6 saddr @portcullis_ban6 drop"


def test_ban_element_takes_a_timeout(host):
    host.check_output("nft add element inet portcullis portcullis_ban4 { 192.0.2.77 timeout 60s }")
    try:
        assert "192.0.2.77" in host.check_output("nft list set inet portcullis portcullis_ban4")
    finally:
        host.run("nft delete element inet portcullis portcullis_ban4 { 192.0.2.77 }")


def test_default_deny(objects):
    for name in ("input", "forward", "output"):
        assert chains(objects)[name]["policy"] == "drop", name


def test_smtp_behind_synproxy(ruleset, nftables):
    assert "notrack" in ruleset
    assert (f"synproxy mss {nftables['nftables_synproxy_mss']} "
            f"wscale {nftables['nftables_synproxy_wscale']} timestamp sack-perm") in ruleset


def test_per_source_caps(ruleset, nftables):
    cap = nftables["nftables_smtp_max_connections_per_source"]
    assert f"add @smtp_conns4 {{ ip saddr ct count over {cap} }}" in ruleset
    assert f"add @smtp_conns6 {{ ip6 saddr ct count over {cap} }}" in ruleset
    assert "update @smtp_rate4 { ip saddr limit rate over" in ruleset


def test_ssh_only_from_admin_networks_on_management(ruleset, nftables):
    ssh_rules = [line.strip() for line in ruleset.splitlines()
                 if f"tcp dport {nftables['nftables_ssh_port']} " in line]
    assert ssh_rules
    interface = nftables['nftables_mgmt_interface']
    assert all(f'iifname "{interface}"' in rule and "@admin_networks" in rule for rule in ssh_rules)


def test_drops_logged_with_a_rate_limit(ruleset):
    assert 'log prefix "portcullis drop in: "' in ruleset
    assert 'log prefix "portcullis drop out: "' in ruleset
    assert all("limit rate" in line for line in ruleset.splitlines() if " log prefix " in line)
