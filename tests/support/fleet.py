"""A fleet of appliances in network namespaces sharing one Valkey/Redis store.

    hub namespace: bridge 10.252.0.0/24
      10.252.0.254   redis-server (the fleet's store) and Postfix (the internal server)
      10.252.0.100   the attacker          10.252.0.101   a legitimate sender
    gate1..gateN namespaces: 10.252.0.1 ... , each with its own ban helper, nftables
      ban sets and gate (`portcullis serve`, reputation.store: redis; metrics on :9325)

Each gate is a lab.Lab whose client namespace is the hub, so Lab's helpers (run_client,
banned_in_kernel, session_lines) work per gate.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support import netns
from tests.support.gate import merged
from tests.support.lab import Lab, start_gate
from tests.support.postfix import PostfixBackend
from tests.support.redis_server import RedisServer

SERVICES = "10.252.0.254"
ATTACKER = "10.252.0.100"
SENDER = "10.252.0.101"
# The hub is a fresh namespace: every port is free there.


@dataclass
class Fleet:
    hub: netns.Namespace
    store: RedisServer
    backend: PostfixBackend
    gates: list[Lab]

    def metric(self, gate: Lab, name: str) -> float:
        """A sample's value on the gate's Prometheus endpoint (its series summed)."""
        fetch = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
                 f"'http://{gate.gate}:9325/metrics', timeout=5).read().decode())")
        page = self.hub.run(["python3", "-c", fetch]).stdout
        return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
                   if line.startswith((name + " ", name + "{")))


@contextlib.contextmanager
def fleet_lab(workdir: Path, gates: int = 3, **gate_settings) -> Iterator[Fleet]:
    with contextlib.ExitStack() as stack:
        hub = stack.enter_context(netns.namespace("hub"))
        hub.run(["ip", "link", "add", "br0", "type", "bridge"])
        hub.run(["ip", "link", "set", "br0", "up"])
        for address in (SERVICES, ATTACKER, SENDER):
            hub.run(["ip", "addr", "add", f"{address}/24", "dev", "br0"])
        hub.address = ATTACKER
        store = stack.enter_context(
            RedisServer(workdir / "redis", host=SERVICES, port=6379, run_in=hub.prefix([])))
        backend = PostfixBackend(host=SERVICES, port=25, run_in=hub.prefix([]))
        stack.callback(backend.close)
        backend.start()
        fleet = Fleet(hub, store, backend, [])
        for number in range(1, gates + 1):
            appliance = stack.enter_context(netns.namespace(f"gate{number}"))
            _link(hub, appliance, f"10.252.0.{number}")
            log_path = start_gate(appliance, f"{SERVICES}:{backend.port}",
                                  workdir / f"gate{number}",
                                  merged({"reputation": store.settings(),
                                          "listen": [f"{appliance.address}:25"],
                                          "metrics": {"listen": f"{appliance.address}:9325"}},
                                         gate_settings))
            stack.callback(appliance.stop_processes)
            fleet.gates.append(Lab(appliance, hub, backend, log_path))
        yield fleet


def _link(hub: netns.Namespace, appliance: netns.Namespace, address: str) -> None:
    """A veth from the appliance to the hub's bridge; the appliance gets `address`."""
    link = secrets.token_hex(3)
    hub_end, appliance_end = f"pch{link}", f"pcg{link}"
    hub.run(["ip", "link", "add", hub_end, "type", "veth", "peer", "name", appliance_end,
             "netns", appliance.name])
    hub.run(["ip", "link", "set", hub_end, "master", "br0", "up"])
    appliance.run(["ip", "addr", "add", f"{address}/24", "dev", appliance_end])
    appliance.run(["ip", "link", "set", appliance_end, "up"])
    appliance.address = address
