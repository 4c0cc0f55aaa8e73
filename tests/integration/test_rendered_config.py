"""The firewall and the gate agree on the values they share (issue 9, finding 6).

Both files are rendered by ansible-playbook itself, with the real roles, their
defaults and group_vars/all/appliance.yml: the ruleset (role nftables) and
portcullis.yaml (role portcullis). Then the ruleset is checked by `nft -c`, the gate's
file is loaded by `portcullis.config.loads`, and the values both use are read from
each and compared: ban table and sets, SMTP and metrics ports, the per-source
connection cap, rate and burst, and the IPv6 client prefix of the meters.

The fleet's shared store (role valkey) the same way: its server configuration, as
rendered, runs in Debian's redis-server and lets in the gate with the settings of the
gate's rendered file, for its commands on its keys, and nothing else.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from portcullis import config as gate_config

from tests.support import netns
from tests.support.tools import free_port, port_accepts, require_tool, stop_process, wait_until

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
  roles: [nftables, portcullis, valkey]
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
    - name: The fleet store's configuration
      ansible.builtin.template:
        src: "{{ roles_dir }}/valkey/templates/valkey.conf.j2"
        dest: "{{ out_dir }}/valkey.conf"
        mode: "0600"
      tags: [render]
"""


def render(work: Path, extra_vars: dict | None = None, group_vars: bool = True) -> tuple[str, str]:
    """Render the templates with ansible-playbook; returns (nftables.conf, portcullis.yaml).
    The fleet store's configuration is left in work/out/valkey.conf."""
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
    # No fleet store by default: the gate's own store (SQLite), no store port, no way out to one.
    assert "reputation" not in yaml.safe_load((tmp_path / "out" / "portcullis.yaml").read_text())
    assert "fleet" not in (tmp_path / "out" / "nftables.conf").read_text()
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


# --- the fleet's shared store -------------------------------------------------------------

FLEET_PASSWORD = "fleet-test-password"
# The gate's ban script has this shape (appliance/portcullis/policy/fleet.py).
BAN_SCRIPT = """
local current = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[1])
return current
"""


@pytest.mark.parametrize(("url", "ca_file", "rule"), [
    ("redis://10.0.3.20:6380/0", "", "ip daddr 10.0.3.20 tcp dport 6380 accept"),
    ("rediss://[2001:db8::20]/0", "/etc/portcullis/fleet-store/ca.pem",
     "ip6 daddr 2001:db8::20 tcp dport 6379 accept"),
])
def test_a_fleet_store_reaches_the_gate_and_the_firewall(tmp_path, url, ca_file, rule):
    """appliance_fleet_store_url: the gate's reputation.redis keys, as the gate's loader
    reads them, and the firewall's way out to the store; the store's own port stays closed."""
    ruleset, gate_text = render(tmp_path, {
        "appliance_fleet_store_url": url, "appliance_fleet_store_username": "mx-fleet",
        "appliance_fleet_store_key_prefix": "mx:", "portcullis_redis_ca_file": ca_file,
        "portcullis_redis_timeout": 0.25})
    nft_check(tmp_path / "out" / "nftables.conf")
    one(rf"^\s*{re.escape(rule)}$", ruleset)
    assert not re.search(r"saddr \{[^}]*\} tcp dport", ruleset), "the store's port is open"
    reputation = gate_config.loads(gate_text).reputation
    redis = reputation.redis
    assert reputation.store == "redis"
    assert (redis.url, redis.username, redis.password_file, redis.ca_file, redis.key_prefix,
            redis.timeout) == (url, "mx-fleet", "/etc/portcullis/fleet-store/password", ca_file,
                               "mx:", 0.25)


def test_the_store_admits_the_gate_to_its_keys_only(tmp_path):
    """The valkey role's configuration, as rendered with the site's fleet settings, runs in
    Debian's redis-server. The gate, with its rendered settings, logs in and runs its
    commands on its keys and channel; other keys and channels, dangerous commands, the
    default user and a wrong password are refused. The firewall opens the store's port
    to the fleet's networks only, on the management side."""
    redis_server = require_tool("redis-server", "redis-server")
    redis = pytest.importorskip("redis")
    port = free_port()
    password_file = tmp_path / "fleet.password"
    password_file.write_text(FLEET_PASSWORD + "\n")
    ruleset, gate_text = render(tmp_path / "site", {
        "valkey_enabled": True, "appliance_fleet_store_password": FLEET_PASSWORD,
        "appliance_mgmt_address": "127.0.0.1", "appliance_fleet_store_port": port,
        "appliance_fleet_store_url": f"redis://127.0.0.1:{port}/0",
        "appliance_fleet_store_password_file": str(password_file),
        "appliance_fleet_networks": ["10.0.4.0/24", "2001:db8:4::/48"]})
    nft_check(tmp_path / "site" / "out" / "nftables.conf")
    mgmt = yaml.safe_load((GROUP_VARS / "all" / "appliance.yml").read_text())["appliance_mgmt_interface"]
    one(rf'^\s*iifname "{mgmt}" ip saddr {{ 10\.0\.4\.0/24 }} tcp dport {port} ct state new accept$', ruleset)
    one(rf'^\s*iifname "{mgmt}" ip6 saddr {{ 2001:db8:4::/48 }} tcp dport {port} ct state new accept$', ruleset)
    store_config = tmp_path / "site" / "out" / "valkey.conf"
    assert FLEET_PASSWORD not in store_config.read_text()

    server = subprocess.Popen(
        [redis_server, str(store_config), "--dir", str(tmp_path), "--pidfile", str(tmp_path / "redis.pid"),
         "--supervised", "no"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: port_accepts("127.0.0.1", port) or server.poll() is not None, 10,
                   "redis-server to listen")
        assert server.poll() is None, f"redis-server refused the rendered configuration:\n{server.stdout.read()}"
        settings = gate_config.loads(gate_text).reputation.redis
        gate = redis.Redis.from_url(
            settings.url, username=settings.username, decode_responses=True, socket_timeout=5,
            password=Path(settings.password_file).read_text().splitlines()[0])
        prefix, until_ms = settings.key_prefix, int((time.time() + 600) * 1000)
        events = gate.pubsub()
        events.subscribe(prefix + "events")
        assert events.get_message(timeout=5)["type"] == "subscribe"
        pipe = gate.pipeline(transaction=True)
        pipe.zadd(prefix + "ev:192.0.2.1", {"1.0 w 1": 1.0})
        pipe.zremrangebyscore(prefix + "ev:192.0.2.1", "-inf", "(0")
        pipe.zremrangebyrank(prefix + "ev:192.0.2.1", 0, -257)
        pipe.pexpire(prefix + "ev:192.0.2.1", 600_000)
        pipe.eval(BAN_SCRIPT, 1, prefix + "ban:192.0.2.1", until_ms, "1.0 DHA")
        pipe.delete(prefix + "ban:192.0.2.9")
        pipe.set(prefix + "pg:192.0.2.2", "1.0 1", pxat=until_ms)
        pipe.publish(prefix + "events", "[]")
        pipe.execute()
        assert gate.get(prefix + "ban:192.0.2.1") == "1.0 DHA"
        assert gate.zrange(prefix + "ev:192.0.2.1", 0, -1, withscores=True) == [("1.0 w 1", 1.0)]
        assert set(gate.scan(0, match=prefix + "*", count=1000)[1]) == {
            prefix + "ev:192.0.2.1", prefix + "ban:192.0.2.1", prefix + "pg:192.0.2.2"}
        assert gate.ping()
        assert events.get_message(timeout=5) == {
            "type": "message", "pattern": None, "channel": prefix + "events", "data": "[]"}

        for command in (("SET", "other:key", "1"), ("GET", "other:key"), ("PUBLISH", "other", "x"),
                        ("FLUSHALL",), ("KEYS", "*"), ("CONFIG", "GET", "*"), ("ACL", "LIST"),
                        ("SHUTDOWN",), ("MONITOR",)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                gate.execute_command(*command)
        for password, username in ((None, None), ("", "default"), ("wrong", settings.username)):
            with pytest.raises(redis.exceptions.AuthenticationError):
                redis.Redis(port=port, username=username, password=password, socket_timeout=5).ping()
    finally:
        stop_process(server)


CHECKS_PLAYBOOK = """\
- name: The fleet store's checks
  hosts: all
  gather_facts: false
  tasks:
    - name: Checks
      ansible.builtin.include_role:
        name: valkey
        tasks_from: checks
"""


@pytest.mark.parametrize(("addresses", "refused"), [
    (["10.0.3.15"], False),
    (["10.0.3.15", "0.0.0.0"], True),
    (["::"], True),
    (["*"], True),
    (["-::*"], True),
])
def test_the_store_refuses_a_wildcard_address(tmp_path, addresses, refused):
    (tmp_path / "checks.yml").write_text(CHECKS_PLAYBOOK)
    variables = {"valkey_enabled": True, "valkey_gate_password": FLEET_PASSWORD,
                 "valkey_bind_addresses": addresses}
    result = subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", "localhost,", "-c", "local", "-e", json.dumps(variables),
         str(tmp_path / "checks.yml")],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"},
    )
    assert (result.returncode != 0) == refused, result.stdout
    assert ("valkey_bind_addresses must list the management address" in result.stdout) == refused
