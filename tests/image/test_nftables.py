"""The firewall ruleset is loaded, default-deny, with synproxy, caps and ban sets."""

import ipaddress
import json
import pathlib

import pytest
import yaml

ANSIBLE = pathlib.Path(__file__).resolve().parents[2] / "ansible"

# The site settings both the firewall and the gate are rendered from (the ban names,
# per-source caps): group_vars, which the roles' defaults only back up.
SITE = yaml.safe_load((ANSIBLE / "group_vars" / "all" / "appliance.yml").read_text())
TABLE = SITE["appliance_ban_table"]
# The gate's table, wherever it is: the image's whole firewall, or one table on a host.
pytestmark = pytest.mark.host
BAN4, BAN6 = SITE["appliance_ban_set_ipv4"], SITE["appliance_ban_set_ipv6"]


@pytest.fixture(scope="module")
def ruleset(host):
    return host.check_output(f"nft list table inet {TABLE}")


@pytest.fixture(scope="module")
def objects(host):
    listing = json.loads(host.check_output(f"nft -j list table inet {TABLE}"))
    return listing["nftables"]


def chains(objects):
    return {o["chain"]["name"]: o["chain"] for o in objects if "chain" in o}


def sets(objects):
    return {o["set"]["name"]: o["set"] for o in objects if "set" in o}


def test_loaded_at_boot(host):
    """Debian's nftables.service on the image; on a host (host.yml), the role's own unit
    loads only this table, after the host's ruleset."""
    assert host.service("nftables").is_enabled or host.service("portcullis-nftables").is_enabled


@pytest.mark.parametrize("name,kind", [(BAN4, "ipv4_addr"), (BAN6, "ipv6_addr")])
def test_ban_sets(objects, name, kind):
    ban = sets(objects)[name]
    assert ban["type"] == kind
    assert "timeout" in ban["flags"]


def test_ban_sets_checked_first(ruleset):
    raw = ruleset.split("chain prerouting_raw")[1]
    rules = [line.strip() for line in raw.splitlines()[2:5]]
    assert rules[0] == f"ip saddr @{BAN4} drop"
    assert rules[1] == f"ip6 saddr @{BAN6} drop"


def test_ban_element_takes_a_timeout(host):
    host.check_output(f"nft add element inet {TABLE} {BAN4} {{ 192.0.2.77 timeout 60s }}")
    try:
        assert "192.0.2.77" in host.check_output(f"nft list set inet {TABLE} {BAN4}")
    finally:
        host.run(f"nft delete element inet {TABLE} {BAN4} {{ 192.0.2.77 }}")


def test_default_deny(objects):
    for name in ("input", "forward", "output"):
        assert chains(objects)[name]["policy"] == "drop", name


def test_smtp_behind_synproxy(ruleset, nftables):
    assert "notrack" in ruleset
    assert (f"synproxy mss {nftables['nftables_synproxy_mss']} "
            f"wscale {nftables['nftables_synproxy_wscale']} timestamp sack-perm") in ruleset


def test_per_source_caps(ruleset):
    """IPv4 sources per address, IPv6 per client prefix (nft lists the mask compressed)."""
    cap = SITE["appliance_max_connections_per_source"]
    mask = ipaddress.IPv6Network(f"::/{SITE['appliance_ipv6_client_prefix']}").netmask
    assert f"add @smtp_conns4 {{ ip saddr ct count over {cap} }}" in ruleset
    assert f"add @smtp_conns6 {{ ip6 saddr & {mask} ct count over {cap} }}" in ruleset
    assert "update @smtp_rate4 { ip saddr limit rate over" in ruleset
    assert f"update @smtp_rate6 {{ ip6 saddr & {mask} limit rate over" in ruleset


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
