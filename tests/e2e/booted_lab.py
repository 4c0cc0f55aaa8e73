"""The appliance booted in a lab (vm/lab, what `make lab` runs), for the attack tests.

Clients run in threads inside the lab namespace (netns.call_in_netns), so that each can
bind any address of the client range; the administrator's view (nft, /metrics, the
journal) comes over SSH on the management network.
"""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.appliance import ADMIN, SSH, TOP
from tests.support.netns import call_in_netns

LAB = TOP / "vm" / "lab"
SMTP_TIMEOUT = 120


class BootedLab:
    def __init__(self, name: str):
        self.name = name
        self.record: dict = {}

    def up(self, disk: Path, gate_config: Path, timeout: float) -> float:
        """Create the lab and boot `disk` in it; seconds to the banner."""
        result = subprocess.run([sys.executable, str(LAB), "--name", self.name, "up",
                                 "--disk", str(disk), "--gate-config", str(gate_config),
                                 "--timeout", str(timeout)],
                                capture_output=True, text=True, timeout=timeout + 120,
                                check=False)
        self.record = json.loads((Path("/run/portcullis-lab") / self.name / "lab.json")
                                 .read_text()) if result.returncode == 0 else {}
        if result.returncode != 0:
            raise RuntimeError(f"vm/lab up failed: {result.stderr}{result.stdout}")
        return self.record["boot_to_banner_seconds"]

    def wait_for_ssh(self, timeout: float) -> None:
        """sshd starts after the network is online, often after the gate's banner."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ssh("true", timeout=30)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no SSH to {self.record['appliance_mgmt']} within "
                                       f"{timeout} s") from None
                time.sleep(3)

    def down(self) -> None:
        subprocess.run([sys.executable, str(LAB), "--name", self.name, "down"],
                       capture_output=True, text=True, timeout=120, check=False)

    @property
    def gate(self) -> str:
        return self.record["appliance_public"]

    def call(self, function, *args):
        """function(*args) inside the lab namespace: its sockets may bind client addresses."""
        return call_in_netns(self.name, function, *args)

    def run(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True,
                              text=True, timeout=timeout, check=False)

    # --- the administrator's view ------------------------------------------------------

    def ssh(self, command: str, timeout: float = 120) -> str:
        result = self.run([*SSH, f"{ADMIN}@{self.record['appliance_mgmt']}", command],
                          timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"ssh {command!r} failed ({result.returncode}): {result.stderr}")
        return result.stdout

    def nft_counters(self) -> dict[str, int]:
        """Packets dropped by each per-source rule of the SMTP SYN chain, by its set."""
        rules = json.loads(self.ssh("sudo nft -j list chain inet portcullis smtp_syn"))
        counters = {}
        for item in rules["nftables"]:
            rule = item.get("rule")
            if not rule:
                continue
            text = json.dumps(rule["expr"])
            found = re.search(r'"set": "@(smtp_\w+)"', text)
            packets = [e["counter"]["packets"] for e in rule["expr"] if "counter" in e]
            if found and packets:
                counters[found.group(1)] = packets[0]
        return counters

    def ban_set(self) -> str:
        return self.ssh("sudo nft list set inet portcullis portcullis_ban4")

    def metrics(self) -> dict[str, float]:
        """The gate's /metrics (on the box's loopback), as {series: value}."""
        text = self.ssh("python3 -c \"import urllib.request; print(urllib.request.urlopen("
                        "'http://127.0.0.1:9325/metrics', timeout=60).read().decode())\"")
        series = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                series[name] = float(value)
        return series

    def delivered(self, user: str) -> list[bytes]:
        """Messages the lab's Postfix delivered to user@example.test."""
        new = Path(self.record["postfix"]["maildirs"]) / user / "new"
        return [path.read_bytes() for path in sorted(new.iterdir())] if new.is_dir() else []


def deliver(gate: str, source: str, recipient: str, subject: str) -> None:
    """One message through the gate from `source` (call it in the lab); raises unless the
    gate accepted it."""
    with smtplib.SMTP(gate, 25, local_hostname="client.example.net", timeout=SMTP_TIMEOUT,
                      source_address=(source, 0)) as client:
        client.sendmail("sender@example.net", [recipient],
                        f"Subject: {subject}\r\n\r\nfrom {source}\r\n")


def decision(metrics: dict[str, float], reason: str) -> float:
    return metrics.get(f'portcullis_decisions_total{{reason="{reason}"}}', 0.0)
