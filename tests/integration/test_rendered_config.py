"""The firewall and the gate agree on the values they share (issue 9, finding 6).

Both files are rendered by ansible-playbook itself, with the real roles, their
defaults and group_vars/all/appliance.yml: the ruleset (role nftables) and
portcullis.yaml (role portcullis). Then the ruleset is checked by `nft -c`, the gate's
file is loaded by `portcullis.config.loads`, and the values both use are read from
each and compared: ban table and sets, SMTP and metrics ports, the per-source
connection cap, rate and burst, and the IPv6 client prefix of the meters.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from portcullis import config as gate_config

from tests.support import netns

ANSIBLE_DIR = Path(__file__).resolve().parents[2] / "ansible"
GROUP_VARS = ANSIBLE_DIR / "group_vars"
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
NFT = shutil.which("nft") or "/usr/sbin/nft"
PER_SECOND = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}

pytestmark = [
    netns.requires_root,   # nft -c talks to the kernel
    pytest.mark.skipif(ANSIBLE_PLAYBOOK is None,
                       reason="ansible-playbook not installed (scripts/install-deps ansible)"),
]

# The roles are listed so that their defaults load as in site.yml; --tags render runs
# only the two template tasks (and the roles' argument checks, tagged always).
RENDER_PLAYBOOK = """\
- name: Render the firewall's and the gate's configuration
  hosts: all
  gather_facts: false
  roles: [nftables, portcullis]
  tasks:
    - name: The ruleset
      ansible.builtin.template:
        src: "{{ roles_dir }}/nftables/templates/nftables.conf.j2"
        dest: "{{ out_dir }}/nftables.conf"
        mode: "0600"
      tags: [render]
    - name: The gate's configuration
      ansible.builtin.template:
        src: "{{ roles_dir }}/portcullis/templates/portcullis.yaml.j2"
        dest: "{{ out_dir }}/portcullis.yaml"
        mode: "0600"
      tags: [render]
"""


def render(work: Path, extra_vars: dict | None = None, group_vars: bool = True) -> tuple[str, str]:
    """Render both templates with ansible-playbook; returns (nftables.conf, portcullis.yaml)."""
    out = work / "out"
    out.mkdir(parents=True)
    if group_vars:   # playbook-adjacent, as site.yml has them: a link to the real directory
        (work / "group_vars").symlink_to(GROUP_VARS)
    (work / "render.yml").write_text(RENDER_PLAYBOOK)
    variables = {"roles_dir": str(ANSIBLE_DIR / "roles"), "out_dir": str(out), **(extra_vars or {})}
    result = subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", "localhost,", "-c", "local", "--tags", "render",
         "-e", json.dumps(variables), str(work / "render.yml")],
        check=False, cwd=work, capture_output=True, text=True, timeout=300,
        env={**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"},
    )
    assert result.returncode == 0, f"ansible-playbook failed:\n{result.stdout}\n{result.stderr}"
    return (out / "nftables.conf").read_text(), (out / "portcullis.yaml").read_text()


def nft_check(path: Path) -> None:
    result = subprocess.run([NFT, "-c", "-f", str(path)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"nft -c rejects the rendered ruleset:\n{result.stderr}"


def one(pattern: str, text: str) -> re.Match:
    matches = list(re.finditer(pattern, text, re.MULTILINE))
    assert len(matches) == 1, f"expected one match of {pattern!r} in the ruleset, found {len(matches)}"
    return matches[0]


def prefix_of(mask: str) -> int:
    """The prefix length of an IPv6 netmask such as ffff:ffff:ffff:ffff:0:0:0:0."""
    bits = int(ipaddress.IPv6Address(mask))
    length = bits.bit_count()
    assert bits == ((1 << 128) - 1) ^ ((1 << (128 - length)) - 1), f"{mask} is not a prefix mask"
    return length


def firewall_values(ruleset: str, ssh_port: int) -> dict:
    """The shared values as the ruleset's text has them."""
    table = one(r"^table inet (\S+) \{", ruleset)[1]
    ban4 = one(r"^\s*ip saddr @(\S+) drop$", ruleset)[1]
    ban6 = one(r"^\s*ip6 saddr @(\S+) drop$", ruleset)[1]
    for name, kind in ((ban4, "ipv4_addr"), (ban6, "ipv6_addr")):
        one(rf"^\s*set {name} \{{\s*type {kind}\s*flags timeout\b", ruleset)
    # Per source: IPv4 by address, IPv6 by the client prefix (ip6 saddr & mask).
    conns4 = one(r"add @smtp_conns4 \{ ip saddr ct count over (\d+) \}", ruleset)
    conns6 = one(r"add @smtp_conns6 \{ ip6 saddr & ([0-9a-f:]+) ct count over (\d+) \}", ruleset)
    rate = r"limit rate over (\d+)/(\w+) burst (\d+) packets \}"
    rate4 = one(r"update @smtp_rate4 \{ ip saddr " + rate, ruleset)
    rate6 = one(r"update @smtp_rate6 \{ ip6 saddr & ([0-9a-f:]+) " + rate, ruleset)
    assert conns4[1] == conns6[2], "IPv4 and IPv6 connection caps differ"
    assert rate4.groups() == rate6.groups()[1:], "IPv4 and IPv6 rate meters differ"
    assert conns6[1] == rate6[1], "the two IPv6 meters use different masks"
    # SMTP: the SYN jump, synproxy, the accept rule and synproxy's SYN-ACKs.
    smtp_ports = {int(m[1]) for m in re.finditer(
        r'^\s*(?:iif|oif)name "[^"]+" tcp [sd]port (\d+) (?:tcp flags|ct state invalid|accept)', ruleset,
        re.MULTILINE)}
    management = {int(m[1]) for m in re.finditer(
        r"@admin_networks[46] tcp dport (\d+) ct state new accept", ruleset)} - {ssh_port}
    assert len(management) <= 1, f"more than one management port besides SSH: {management}"
    return {
        "ban table": table,
        "ban set ipv4": ban4,
        "ban set ipv6": ban6,
        "smtp ports": smtp_ports,
        "metrics port": management.pop() if management else None,
        "connections per source": int(conns4[1]),
        "rate per source": int(rate4[1]) / PER_SECOND[rate4[2]],
        "burst per source": int(rate4[3]),
        "ipv6 client prefix": prefix_of(conns6[1]),
    }


def gate_values(config: gate_config.Config) -> dict:
    """The same values as the gate reads them from portcullis.yaml."""
    return {
        "ban table": config.ban_helper.table,
        "ban set ipv4": config.ban_helper.set_ipv4,
        "ban set ipv6": config.ban_helper.set_ipv6,
        "smtp ports": {listen.port for listen in config.listen},
        "metrics port": config.metrics.listen.port if config.metrics.listen else None,
        "connections per source": config.limits.max_connections_per_ip,
        "rate per source": config.limits.connection_rate_per_ip,
        "burst per source": config.limits.connection_burst_per_ip,
        "ipv6 client prefix": config.limits.ipv6_client_prefix,
    }


# The gate's keys that must be written out, not left to config.py's defaults.
EXPLICIT = {
    "ban_helper": ("table", "set_ipv4", "set_ipv6"),
    "limits": ("max_connections_per_ip", "connection_rate_per_ip", "connection_burst_per_ip",
               "ipv6_client_prefix"),
}


def load_both(tmp_path: Path, extra_vars: dict | None = None, group_vars: bool = True) -> tuple[dict, dict]:
    ruleset, gate_text = render(tmp_path, extra_vars, group_vars)
    nft_check(tmp_path / "out" / "nftables.conf")
    raw = yaml.safe_load(gate_text)
    for section, keys in EXPLICIT.items():
        missing = [key for key in keys if key not in raw.get(section, {})]
        assert not missing, f"portcullis.yaml leaves {section}.{missing} to the gate's defaults"
    ssh_port = yaml.safe_load((ANSIBLE_DIR / "roles/nftables/defaults/main.yml").read_text())["nftables_ssh_port"]
    return firewall_values(ruleset, ssh_port), gate_values(gate_config.loads(gate_text))


def test_firewall_and_gate_agree_with_the_site_settings(tmp_path):
    firewall, gate = load_both(tmp_path)
    assert firewall == gate
    site = yaml.safe_load((GROUP_VARS / "all" / "appliance.yml").read_text())
    assert firewall == {
        "ban table": site["appliance_ban_table"],
        "ban set ipv4": site["appliance_ban_set_ipv4"],
        "ban set ipv6": site["appliance_ban_set_ipv6"],
        "smtp ports": {site["appliance_smtp_port"]},
        "metrics port": site["appliance_metrics_port"] or None,
        "connections per source": site["appliance_max_connections_per_source"],
        "rate per source": site["appliance_connection_rate_per_source"],
        "burst per source": site["appliance_connection_burst_per_source"],
        "ipv6 client prefix": site["appliance_ipv6_client_prefix"],
    }


def test_role_defaults_agree_without_group_vars(tmp_path):
    """Each role standalone, on its own defaults, still matches the other."""
    firewall, gate = load_both(tmp_path, group_vars=False)
    assert firewall == gate


OVERRIDES = {
    "appliance_ban_table": ("ban table", "gatefw"),
    "appliance_ban_set_ipv4": ("ban set ipv4", "blocked4"),
    "appliance_ban_set_ipv6": ("ban set ipv6", "blocked6"),
    "appliance_smtp_port": ("smtp ports", 2525),
    "appliance_metrics_port": ("metrics port", 9325),
    "appliance_max_connections_per_source": ("connections per source", 7),
    "appliance_connection_rate_per_source": ("rate per source", 3),
    "appliance_connection_burst_per_source": ("burst per source", 11),
    "appliance_ipv6_client_prefix": ("ipv6 client prefix", 56),
}


def test_one_site_setting_changes_both_files(tmp_path):
    """Each appliance_* value given with -e reaches both the ruleset and the gate."""
    before, _ = load_both(tmp_path / "site")
    firewall, gate = load_both(tmp_path / "changed", {name: value for name, (_, value) in OVERRIDES.items()})
    assert firewall == gate
    for name, (key, value) in OVERRIDES.items():
        expected = {value} if key == "smtp ports" else value
        assert firewall[key] == expected != before[key], f"{name} did not reach both files"

