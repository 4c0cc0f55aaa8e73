"""The operator's commands against a real appliance: `portcullis bans`, `show-config` and
`status` run as subprocesses beside a real gate, ban helper and nftables (in network
namespaces), as an administrator runs them."""

import json
import re
import socket
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import get_type_hints

import pytest
import yaml
from portcullis.config import Config, DnsListSite, HostPort

from tests.support import netns
from tests.support.fault_backend import FaultBackend
from tests.support.gate import GateProcess
from tests.support.lab import appliance_lab
from tests.support.tools import wait_until

CLI = [sys.executable, "-m", "portcullis.cli"]


def portcullis(config: Path, *args: str, namespace: netns.Namespace | None = None
               ) -> subprocess.CompletedProcess:
    argv = [*CLI, *args, "-c", str(config)]
    if namespace is not None:
        return namespace.run(argv, check=False, timeout=60)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def succeeded(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def failed_clearly(result: subprocess.CompletedProcess, status: int = 1) -> str:
    """The one line a failing command prints: exit status non-zero, no traceback."""
    assert result.returncode == status, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("portcullis: ")
    return line


# --- bans ---------------------------------------------------------------------------------

GREETING = """
import json, socket
with socket.create_connection(("{gate}", 25), timeout=5) as s:
    print(json.dumps(s.makefile("rb").readline().decode()))
"""


@pytest.mark.netns
@netns.requires_root
def test_bans_added_and_removed_by_the_operator_reach_the_gate_and_the_kernel(tmp_path):
    with appliance_lab(tmp_path, ban_helper={"never_ban": ["198.51.100.0/24"]}) as lab:
        # The lab's rules drop what the set holds; without them the gate's own refusal
        # shows, and the set is read apart.
        lab.appliance.run(["nft", "flush", "chain", "inet", "portcullis", "input"])
        config, client = tmp_path / "portcullis.yaml", lab.client.address

        def cli(*args: str) -> subprocess.CompletedProcess:
            return portcullis(config, *args, namespace=lab.appliance)

        def greeting() -> str:
            return lab.run_client(GREETING.format(gate=lab.gate), timeout=30)

        assert greeting().startswith("220 ")
        assert succeeded(cli("bans", "list")) == "no bans\n"

        assert f"banned {client} until" in succeeded(cli("bans", "add", client, "600"))
        assert client in lab.banned_in_kernel()
        wait_until(lambda: greeting().startswith("421 4.7.1"), 5,
                   "the gate to refuse the banned client", interval=0.3)
        header, row = succeeded(cli("bans", "list")).splitlines()
        assert header.split()[:2] == ["ADDRESS/PREFIX", "LABEL"]
        key, label, _day, _time, left, in_kernel = row.split()
        assert (key, label, in_kernel) == (client, "ADMIN_BAN", "yes")
        assert 590 <= int(left.rstrip("s")) <= 600

        assert succeeded(cli("bans", "remove", client)) == (
            f"lifted in the store: {client}\ntaken out of the kernel set: {client}\n")
        assert client not in lab.banned_in_kernel()
        wait_until(lambda: greeting().startswith("220 "), 3, "the gate to serve the client",
                   interval=0.3)
        assert succeeded(cli("bans", "list")) == "no bans\n"
        assert failed_clearly(cli("bans", "remove", client)) == (
            f"portcullis: {client} is not banned")

        # What must never be banned is refused, and written nowhere.
        assert failed_clearly(cli("bans", "add", "198.51.100.7")) == (
            "portcullis: the ban helper refused: never-ban: 198.51.100.7 is in the never-ban "
            "network 198.51.100.0/24")
        assert failed_clearly(cli("bans", "add", lab.gate)) == (
            f"portcullis: the ban helper refused: never-ban: {lab.gate} is an address of this "
            "appliance, never banned")
        assert failed_clearly(cli("bans", "add", "mail.example")) == (
            "portcullis: 'mail.example' is not an IP address")
        assert succeeded(cli("bans", "list")) == "no bans\n"
        assert lab.banned_in_kernel() == {}


# --- status -------------------------------------------------------------------------------

def read_status(gate: GateProcess) -> str:
    return succeeded(portcullis(gate.config_path, "status"))


def state_line(state_dir: Path) -> str:
    """What status should say of the state directory, as util-linux's findmnt sees it."""
    found = subprocess.run(["findmnt", "--noheadings", "--nofsroot", "--output",
                            "FSTYPE,SOURCE", "--target", str(state_dir)],
                           capture_output=True, text=True, check=True).stdout.split()
    filesystem, source = found[0], found[1]
    if filesystem in ("tmpfs", "ramfs"):
        return (f"{state_dir} on {filesystem}: bans, reputation and the TLS pair are lost "
                "at reboot")
    return f"{state_dir} on {source} ({filesystem})"


def test_status_reports_the_running_gate(tmp_path):
    backend = FaultBackend().start()
    with GateProcess(tmp_path, f"127.0.0.1:{backend.port}",
                     ban_socket=str(tmp_path / "ban.sock")) as gate:
        wait_until(lambda: portcullis(gate.config_path, "status").returncode == 0, 10,
                   "the gate's status", interval=0.3)
        with socket.create_connection(("127.0.0.1", gate.port), timeout=5) as held:
            assert held.makefile("rb").readline().startswith(b"220 ")
            wait_until(lambda: "active connections: 1\n" in read_status(gate), 5,
                       "the held connection in the status", interval=0.3)
            status = read_status(gate)
        assert f"\nlisteners: 127.0.0.1:{gate.port}\n" in status
        assert "\nworkers: 2 of 2 alive\n" in status
        workers = re.findall(r"  worker \d: pid \d+, alive, (\d+) active connections", status)
        assert workers == ["0", "0"]  # the gate holds it until its first command
        assert "\n  greeted, awaiting a first command: 1\n" in status
        assert "\nstress mode: off\n" in status
        assert f"\nbackend 127.0.0.1:{backend.port}: reachable (220 backend.test ESMTP)\n" in (
            status)
        assert (f"\nstore: sqlite {tmp_path}/state/reputation.db: readable, 0 active bans; "
                "write errors: 0\n") in status
        assert f"\nstate: {state_line(tmp_path / 'state')}\n" in status

        backend.stop()
        assert (f"\nbackend 127.0.0.1:{backend.port}: unreachable (Connection refused)\n"
                in read_status(gate))
        # The gate runs, the ban helper does not.
        for command in (["bans", "list"], ["bans", "add", "192.0.2.1"],
                        ["bans", "remove", "192.0.2.1"]):
            assert failed_clearly(portcullis(gate.config_path, *command)) == (
                f"portcullis: cannot reach the ban helper at {tmp_path}/ban.sock: "
                "No such file or directory")
        pid = re.search(r"gate: running, pid (\d+)", status)[1]
    assert failed_clearly(portcullis(gate.config_path, "status")).startswith(
        f"portcullis: the gate is not running (process {pid} last wrote")


COMMANDS = (["status"], ["bans", "list"], ["bans", "add", "192.0.2.1"],
            ["bans", "remove", "192.0.2.1"])


def write_config(path: Path, **settings) -> Path:
    path.write_text(yaml.safe_dump({"relay_domains": ["example.test"],
                                    "backend": {"servers": ["127.0.0.1:2525"]},
                                    "ban_socket": str(path.parent / "ban.sock"),
                                    **settings}))
    return path


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_each_command_fails_clearly_without_a_gate(tmp_path, command):
    config = write_config(tmp_path / "portcullis.yaml", state_dir=str(tmp_path / "state"))
    assert failed_clearly(portcullis(config, *command)) == (
        f"portcullis: the gate is not running (no status file {tmp_path}/state/status.json)")


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_each_command_fails_clearly_on_an_unreadable_state_dir(tmp_path, command):
    (tmp_path / "file").write_text("")
    config = write_config(tmp_path / "portcullis.yaml", state_dir=str(tmp_path / "file"))
    assert failed_clearly(portcullis(config, *command)) == (
        f"portcullis: cannot read the gate's status file {tmp_path}/file/status.json: "
        "Not a directory")


def test_a_stale_status_file_means_the_gate_is_not_running(tmp_path):
    config = write_config(tmp_path / "portcullis.yaml", state_dir=str(tmp_path))
    (tmp_path / "status.json").write_text(json.dumps({"pid": 1, "time": 1000.0}))
    assert "the gate is not running (process 1 last wrote" in failed_clearly(
        portcullis(config, "status"))


# --- show-config --------------------------------------------------------------------------

SITE = "zen.example.test=127.0.0.[2..11]*3"


@pytest.fixture
def site_config(tmp_path) -> Path:
    (tmp_path / "recipients").write_text("alice@example.test\n")
    (tmp_path / "bind-password").write_text("s3cret-passw0rd\n")
    path = tmp_path / "portcullis.yaml"
    path.write_text(f"""\
hostname: mx.example.test
listen: ["127.0.0.1:2525"]
relay_domains: [example.test]
workers: 3
state_dir: state
recipients:
  source: ldap
  file: recipients
  ldap: {{base: "dc=example,dc=test", bind_dn: "cn=gate,dc=example,dc=test",
          password_file: bind-password}}
backend: {{servers: ["127.0.0.1:2526"], connect_timeout: 5}}
limits: {{max_recipients: 50, pregreet_delay: 0}}
tls: {{generated_dir: tls}}
dns: {{nameservers: ["127.0.0.1:53"], dnsbl: {{sites: ["{SITE}"]}}}}
""")
    return path


def schema_keys(cls: type = Config, prefix: str = "") -> set[str]:
    keys = set()
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.init:
            hint = hints[f.name]
            nested = is_dataclass(hint) and hint not in (HostPort, DnsListSite)
            keys |= schema_keys(hint, f"{prefix}{f.name}.") if nested else {prefix + f.name}
    return keys


def flat(values: dict, prefix: str = "") -> dict:
    result = {}
    for key, value in values.items():
        if isinstance(value, dict):
            result.update(flat(value, f"{prefix}{key}."))
        else:
            result[prefix + key] = value
    return result


def test_show_config_prints_every_key_with_defaults_filled_in(site_config, tmp_path):
    text = succeeded(portcullis(site_config, "show-config"))
    shown = flat(yaml.safe_load(text))
    assert set(shown) == schema_keys()
    assert {key: shown[key] for key in (
        "hostname", "workers", "state_dir", "recipients.ldap.password_file",
        "backend.servers", "backend.helo", "backend.connect_timeout", "limits.max_recipients",
        "limits.pregreet_delay", "dha.window", "score.weights.strike", "ban_helper.table",
        "metrics.listen", "dns.dnsbl.sites")} == {
        "hostname": "mx.example.test", "workers": 3, "state_dir": f"{tmp_path}/state",
        "recipients.ldap.password_file": f"{tmp_path}/bind-password",
        "backend.servers": ["127.0.0.1:2526"], "backend.helo": "mx.example.test",
        "backend.connect_timeout": 5, "limits.max_recipients": 50,
        "limits.pregreet_delay": 0, "dha.window": 600, "score.weights.strike": 2,
        "ban_helper.table": "portcullis", "metrics.listen": None, "dns.dnsbl.sites": [SITE]}
    assert "s3cret" not in text  # a secret's file is named, never read out
    # The output is itself a configuration, the same one.
    copy = tmp_path / "copy.yaml"
    copy.write_text(text)
    assert succeeded(portcullis(copy, "show-config")) == text


def test_show_config_n_prints_only_what_the_file_changes(site_config, tmp_path):
    changed = yaml.safe_load(succeeded(portcullis(site_config, "show-config", "-n")))
    assert changed == {  # backend.connect_timeout is set, to its default: not listed
        "hostname": "mx.example.test",
        "listen": ["127.0.0.1:2525"],
        "workers": 3,
        "relay_domains": ["example.test"],
        "state_dir": f"{tmp_path}/state",
        "recipients": {"source": "ldap", "file": f"{tmp_path}/recipients",
                       "ldap": {"bind_dn": "cn=gate,dc=example,dc=test",
                                "password_file": f"{tmp_path}/bind-password",
                                "base": "dc=example,dc=test"}},
        "backend": {"servers": ["127.0.0.1:2526"]},
        "limits": {"max_recipients": 50, "pregreet_delay": 0},
        "tls": {"generated_dir": f"{tmp_path}/tls"},
        "dns": {"nameservers": ["127.0.0.1:53"], "dnsbl": {"sites": [SITE]}},
    }


def test_show_config_fails_clearly_on_a_bad_file(tmp_path):
    config = write_config(tmp_path / "portcullis.yaml", limits={"max_recipients": "many"})
    assert failed_clearly(portcullis(config, "show-config", "-n"), status=2) == (
        f"portcullis: configuration error: {config} line 6: key 'limits.max_recipients': "
        "must be an integer, got 'many'")
