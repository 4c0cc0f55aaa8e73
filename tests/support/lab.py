"""An appliance in a network namespace, with clients in another: for attack tests.

The appliance namespace runs the gate (`portcullis serve`), the ban helper, an
nftables ruleset with the ban sets, a real Postfix as the internal mail server, and
optionally a DNS server; the client namespace has one or more client addresses.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.support import netns
from tests.support.dns_server import DnsServer, Records
from tests.support.gate import merged
from tests.support.postfix import PostfixBackend

RULESET = """
table inet portcullis {
    set portcullis_ban4 { type ipv4_addr; flags timeout; }
    set portcullis_ban6 { type ipv6_addr; flags timeout; }
    chain input {
        type filter hook input priority filter; policy accept;
        ip saddr @portcullis_ban4 counter drop comment "banned"
        ip6 saddr @portcullis_ban6 counter drop comment "banned"
    }
}
"""
VALID = ["alice@example.test", "bob@example.test", "carol@example.test"]


@dataclass
class Lab:
    appliance: netns.Namespace
    client: netns.Namespace
    backend: PostfixBackend
    log_path: Path

    @property
    def gate(self) -> str:
        return self.appliance.address

    def run_client(self, code: str, timeout: float = 120) -> dict:
        """Run a Python snippet in the client namespace; it prints one JSON object."""
        result = self.client.run([sys.executable, "-c", code], timeout=timeout)
        return json.loads(result.stdout)

    def session_lines(self) -> list[dict]:
        # The log holds the ban helper's plain lines too, and the gate's JSON ones.
        lines = (json.loads(line) for line in self.log_path.read_text().splitlines()
                 if line.startswith("{"))
        return [line for line in lines if line["message"] == "session"]

    def banned_in_kernel(self) -> dict:
        listed = json.loads(self.appliance.run(
            ["nft", "-j", "list", "set", "inet", "portcullis", "portcullis_ban4"]).stdout)
        (entry,) = [item["set"] for item in listed["nftables"] if "set" in item]
        return {e["elem"]["val"]: e["elem"] for e in entry.get("elem", [])}

    def drop_counter(self) -> int:
        listed = json.loads(self.appliance.run(
            ["nft", "-j", "list", "chain", "inet", "portcullis", "input"]).stdout)
        for item in listed["nftables"]:
            rule = item.get("rule")
            if rule and "@portcullis_ban4" in json.dumps(rule["expr"]):
                return next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
        raise AssertionError("no ban rule in the ruleset")


@contextlib.contextmanager
def appliance_lab(workdir: Path, appliance_address: str = "10.251.0.1/24",
                  client_addresses: tuple[str, ...] = ("10.251.0.2/24",),
                  dns_records: Records | None = None, **gate_settings) -> Iterator[Lab]:
    with netns.veth_pair(appliance_address, client_addresses[0]) as (appliance, client):
        interface = client.run(["ip", "-o", "-4", "addr", "show", "scope", "global"]
                               ).stdout.split()[1]
        for extra in client_addresses[1:]:
            client.run(["ip", "addr", "add", extra, "dev", interface])
        with contextlib.ExitStack() as stack:
            backend = PostfixBackend(run_in=appliance.prefix([]))
            stack.callback(backend.close)
            backend.start()
            settings = {}
            if dns_records is not None:
                dns = stack.enter_context(
                    DnsServer(workdir / "dns", dns_records, run_in=appliance.prefix([])))
                settings["dns"] = {"nameservers": [dns.nameserver]}
            log_path = start_gate(appliance, f"127.0.0.1:{backend.port}", workdir,
                                  merged(settings, gate_settings))
            stack.callback(appliance.stop_processes)
            yield Lab(appliance, client, backend, log_path)


def start_gate(appliance: netns.Namespace, backend_server: str, workdir: Path,
               settings: dict) -> Path:
    """The ban helper, its nftables sets and the gate in `appliance`, relaying to
    backend_server (host:port); the log file both write to."""
    appliance.run(["nft", "-f", "-"], input=RULESET)
    workdir.mkdir(parents=True, exist_ok=True)
    recipients = workdir / "recipients"
    recipients.write_text("".join(f"{address}\n" for address in VALID))
    ban_socket = workdir / "ban.sock"
    config = workdir / "portcullis.yaml"
    config.write_text(yaml.safe_dump(merged({
        "hostname": "mx.example.test",
        "listen": [f"{appliance.address}:25"],
        "relay_domains": ["example.test"],
        "workers": 2,
        "recipients": {"file": str(recipients)},
        "backend": {"servers": [backend_server]},
        "state_dir": str(workdir / "state"),
        "tls": {"generated_dir": str(workdir / "tls")},
        "ban_socket": str(ban_socket),
        "ban_helper": {"socket_group": ""},
        "limits": {"pregreet_delay": 0},
    }, settings)))
    log_path = workdir / "gate.log"
    with open(log_path, "wb") as log:
        for command in ("ban-helper", "serve"):
            appliance.popen([sys.executable, "-m", "portcullis.cli", command, "-c", str(config)],
                            stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while not ban_socket.exists() or "listening on" not in log_path.read_text():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gate did not start:\n{log_path.read_text()}")
        time.sleep(0.2)
    time.sleep(1)  # the workers start
    return log_path
