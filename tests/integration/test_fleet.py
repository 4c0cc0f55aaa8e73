"""Three appliances behind one domain's MX records share one Valkey/Redis store.

Each gate runs in its own network namespace with its own ban helper and nftables ban
set; the store, the internal Postfix, the attacker and a legitimate sender sit on a
bridge (tests/support/fleet.py). Figures (probes answered fleet-wide before the ban,
seconds until every kernel set has it) are printed for the closing note; the
assertions are about behaviour.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time

import pytest

from tests.support import netns
from tests.support.fleet import ATTACKER, SENDER, fleet_lab

pytestmark = [pytest.mark.netns, netns.requires_root]

BAN_AFTER = 10
DHA = {"ban_after": BAN_AFTER, "prefix_ban_after": 3 * BAN_AFTER, "prefix_suspect_after": 20,
       "prefix_tarpit_after": 15, "tarpit_step": 0.1, "tarpit_max": 0.3,
       "suspect_delay": 0.3}
PROCESSES_PER_GATE = 3  # the admission process and two workers

HARVEST = """
import json, smtplib, time
gates, source, only = {gates!r}, {source!r}, {only!r}
probes, refused_in_a_row, started = [], 0, time.monotonic()
while time.monotonic() - started < 90 and len(probes) < 60 and refused_in_a_row < len(gates):
    gate = gates[len(probes) % len(gates)] if only is None else only
    probe = {{"gate": gate}}
    try:
        client = smtplib.SMTP(gate, 25, local_hostname="harvester.test",
                              source_address=(source, 0), timeout=3)
        client.ehlo()
        client.mail("spammer@outside.test")
        probe["sent"] = time.time()
        probe["code"] = client.rcpt(f"nobody{{len(probes)}}@example.test")[0]
        client.close()
    except (OSError, smtplib.SMTPException) as e:
        probe["code"] = getattr(e, "smtp_code", None) or type(e).__name__
    refused_in_a_row = 0 if probe["code"] in (250, 450, 550) else refused_in_a_row + 1
    probes.append(probe)
print(json.dumps(probes))
"""

SEND = """
import json, smtplib
gates, source, count = {gates!r}, {source!r}, {count!r}
codes = []
for n in range(count):
    with smtplib.SMTP(gates[n % len(gates)], 25, local_hostname="mail.sender.test",
                      source_address=(source, 0), timeout=30) as client:
        client.ehlo()
        refused = client.sendmail("news@sender.test", ["alice@example.test"],
                                  f"Subject: fleet {{n}}\\r\\n\\r\\nmessage {{n}}\\r\\n")
        codes.append(250 if not refused else refused)
print(json.dumps(codes))
"""


class KernelWatch:
    """Polls each gate's nftables ban set; when did `address` first appear in each?"""

    def __init__(self, gates, address: str):
        self.gates, self.address = gates, address
        self.first_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def _watch(self) -> None:
        while not self._stop.is_set() and len(self.first_seen) < len(self.gates):
            for gate in self.gates:
                if gate.gate not in self.first_seen and self.address in gate.banned_in_kernel():
                    self.first_seen[gate.gate] = time.time()
            time.sleep(0.02)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.first_seen) < len(self.gates) and time.monotonic() < deadline:
            time.sleep(0.05)


def harvest(fleet, gates: list[str], only: str | None = None) -> list[dict]:
    code = HARVEST.format(gates=gates, source=ATTACKER, only=only)
    return fleet.gates[0].run_client(code, timeout=150)


def answered_before_ban(probes: list[dict]) -> list[dict]:
    """The probes answered as an ordinary miss (550, or 450 once suspect)."""
    first_refusal = next(n for n, probe in enumerate(probes)
                         if probe["code"] not in (450, 550))
    return probes[:first_refusal]


def test_a_harvest_spread_over_three_gates_is_banned_on_all_three(tmp_path):
    with fleet_lab(tmp_path, dha=DHA) as fleet:
        addresses = [gate.gate for gate in fleet.gates]
        with KernelWatch(fleet.gates, ATTACKER) as watch:
            probes = harvest(fleet, addresses)
            watch.wait(5)
        answered = answered_before_ban(probes)
        banning = probes[len(answered)]
        after = probes[len(answered) + 1:]
        propagation = {gate: seen - banning["sent"] for gate, seen in watch.first_seen.items()}
        print(f"\nfleet harvest: {len(answered)} probes answered over {len(addresses)} gates "
              f"before the ban (ban_after {BAN_AFTER}); the ban came at probe "
              f"{len(answered) + 1} from {banning['gate']} with {banning['code']}; seconds "
              f"until each kernel set had it: "
              + ", ".join(f"{gate} {seconds:.3f}" for gate, seconds in propagation.items()))
        print(json.dumps(probes))

        assert {probe["gate"] for probe in answered} == set(addresses)  # spread over all
        assert len(answered) < BAN_AFTER  # fleet-wide: the ban_after-th miss is the ban
        assert banning["code"] == 421
        assert after and all(probe["code"] not in (250, 450, 550) for probe in after)
        assert set(watch.first_seen) == set(addresses)
        assert max(propagation.values()) < 1.0


def test_mail_flows_and_the_defence_holds_when_the_store_dies_mid_attack(tmp_path):
    # Without the store, a gate's processes share through their SQLite file, read every
    # sync_interval: shorter than the tarpit's delays, so the count is exact at the ban.
    with fleet_lab(tmp_path, dha=DHA, reputation={"sync_interval": 0.1}) as fleet:
        addresses = [gate.gate for gate in fleet.gates]
        first, others = fleet.gates[0], fleet.gates[1:]
        # A harvest on the first gate; the store dies once it has seen the first probe.
        probes: list[dict] = []
        attack = threading.Thread(
            target=lambda: probes.extend(harvest(fleet, addresses, only=first.gate)))
        with KernelWatch([first], ATTACKER) as watch:
            attack.start()
            deadline = time.monotonic() + 20
            while fleet.store.cli("EXISTS", f"portcullis:ev:{ATTACKER}") != "1":
                assert time.monotonic() < deadline, "the harvest never reached the store"
                time.sleep(0.01)
            fleet.store.kill()
            lost_at = time.monotonic()
            # Legitimate mail through every gate: each message accepted, delivered once.
            codes = first.run_client(SEND.format(gates=addresses, source=SENDER, count=6))
            attack.join(150)
            watch.wait(5)
        assert codes == [250] * 6
        delivered = fleet.backend.wait_for("alice", 6, timeout=20)
        subjects = sorted(re.search(rb"Subject: (fleet \d+)", m).group(1) for m in delivered)
        assert subjects == [f"fleet {n}".encode() for n in range(6)]
        # The harvest defence kept working on the gate by itself.
        assert len(answered_before_ban(probes)) < BAN_AFTER
        assert first.gate in watch.first_seen
        assert all(ATTACKER not in gate.banned_in_kernel() for gate in others)
        for gate in fleet.gates:
            log = gate.log_path.read_text()
            assert log.count("counting locally until it is back") == PROCESSES_PER_GATE
            assert fleet.metric(gate, "portcullis_reputation_store_shared") == 0
        time.sleep(3)  # workers report their counts every second
        assert fleet.metric(first, 'portcullis_reputation_store_total{event="outages"}') \
            == PROCESSES_PER_GATE
        # The store comes back: the ban decided meanwhile reaches the other gates.
        time.sleep(max(0.0, 6 - (time.monotonic() - lost_at)))
        fleet.store.start()
        restarted = time.monotonic()
        with KernelWatch(others, ATTACKER) as watch:
            watch.wait(40)
        print(f"\nstore down {restarted - lost_at:.1f} s; the ban decided meanwhile reached "
              f"the other gates' kernel sets {time.monotonic() - restarted:.1f} s after the "
              "store restarted")
        assert set(watch.first_seen) == {gate.gate for gate in others}
        time.sleep(1.5)  # the gauge is set every second
        assert all(fleet.metric(gate, "portcullis_reputation_store_shared") == 1
                   for gate in fleet.gates)


def operator(gate, *args: str) -> str:
    """`portcullis ARGS -c <the gate's config>`, run on that gate's appliance."""
    config = str(gate.log_path.parent / "portcullis.yaml")
    result = gate.appliance.run([sys.executable, "-m", "portcullis.cli", *args, "-c", config],
                                check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_operators_bans_reach_the_whole_fleet(tmp_path):
    client = "10.252.0.77"
    with fleet_lab(tmp_path) as fleet:
        first, others = fleet.gates[0], fleet.gates[1:]
        assert "redis redis://10.252.0.254:6379/0: reachable" in operator(first, "status")
        with KernelWatch(fleet.gates, client) as watch:
            operator(first, "bans", "add", client, "600")
            added_at = time.time()
            watch.wait(5)
        assert set(watch.first_seen) == {gate.gate for gate in fleet.gates}
        listed = operator(others[1], "bans", "list")
        assert f"{client} " in listed and "ADMIN_BAN" in listed
        operator(first, "bans", "remove", client)
        removed = time.monotonic()
        deadline = removed + 5
        while time.monotonic() < deadline and any(
                client in gate.banned_in_kernel() for gate in fleet.gates):
            time.sleep(0.05)
        print(f"\noperator's ban in every kernel set {max(watch.first_seen.values()) - added_at:.2f}"
              f" s after the command returned (negative: before); lifted everywhere "
              f"{time.monotonic() - removed:.2f} s after")
        assert all(client not in gate.banned_in_kernel() for gate in fleet.gates)
        assert operator(others[0], "bans", "list") == "no bans\n"
