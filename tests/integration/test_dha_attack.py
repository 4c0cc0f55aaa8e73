"""A real directory harvest attack, across network namespaces.

The appliance namespace runs the gate, the ban helper, an nftables ruleset with the
ban sets, and a real Postfix as the internal mail server. The client namespace holds
an attacker and a legitimate sender on two addresses. The host's ruleset is never
touched. Figures (probes answered, seconds to the kernel ban) are printed for the
closing note; the assertions are about behaviour.
"""

import json
import sys
import threading
import time

import pytest
import yaml

from tests.support import netns
from tests.support.postfix import PostfixBackend

pytestmark = [pytest.mark.netns, netns.requires_root]

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
ATTACKER, LEGITIMATE = "10.251.0.2", "10.251.0.3"
VALID = ["alice@example.test", "bob@example.test", "carol@example.test"]
PROBES = 300
BAN_AFTER = 10


class ClientSide:
    """Runs Python snippets inside the client namespace and returns their JSON output."""

    def __init__(self, namespace: netns.Namespace):
        self.namespace = namespace

    def run(self, code: str, timeout: float = 120) -> dict:
        result = self.namespace.run([sys.executable, "-c", code], timeout=timeout)
        return json.loads(result.stdout)


HARVEST = """
import json, smtplib, socket, sys, time
gate, source, probes, valid = {gate!r}, {source!r}, {probes!r}, {valid!r}
answers, refused, started = [], [], time.monotonic()
queue = list(probes)
while queue and time.monotonic() - started < 150:
    try:
        client = smtplib.SMTP(gate, 25, local_hostname="harvester.test",
                              source_address=(source, 0), timeout=8)
        client.ehlo()
        client.mail("spammer@outside.test")
    except (OSError, smtplib.SMTPException) as e:
        refused.append([time.monotonic() - started, type(e).__name__])
        if len(refused) >= 3:
            break
        continue
    try:
        for _ in range(25):
            if not queue:
                break
            address = queue.pop(0)
            sent = time.monotonic()
            code, text = client.rcpt(address)
            answers.append({{"to": address, "valid": address in valid, "code": code,
                            "text": text.decode(), "took": time.monotonic() - sent,
                            "at": time.time()}})
            if code == 421:
                break
        client.quit()
    except (OSError, smtplib.SMTPException):
        pass
print(json.dumps({{"answers": answers, "refused": refused}}))
"""

NO_BANNER = """
import json, socket
try:
    s = socket.create_connection(({gate!r}, 25), timeout=3, source_address=({source!r}, 0))
    s.settimeout(3)
    print(json.dumps({{"banner": s.recv(100).decode()}}))
except OSError as e:
    print(json.dumps({{"error": type(e).__name__}}))
"""

DELIVER = """
import json, smtplib
with smtplib.SMTP({gate!r}, 25, local_hostname="friend.test", source_address=({source!r}, 0),
                  timeout=30) as client:
    refused = client.sendmail("friend@partner.test", ["alice@example.test"],
                              b"Subject: legitimate {n}\\r\\n\\r\\nhello {n}\\r\\n")
print(json.dumps({{"refused": refused}}))
"""


@pytest.fixture
def attack_lab(tmp_path):
    with netns.veth_pair() as (appliance, client):
        interface = client.run(["ip", "-o", "-4", "addr", "show", "scope", "global"]).stdout.split()[1]
        client.run(["ip", "addr", "add", f"{LEGITIMATE}/24", "dev", interface])
        appliance.run(["nft", "-f", "-"], input=RULESET)
        backend = PostfixBackend(run_in=appliance.prefix([]))
        backend.start()
        try:
            recipients = tmp_path / "recipients"
            recipients.write_text("".join(f"{a}\n" for a in VALID))
            ban_socket = tmp_path / "ban.sock"
            config = tmp_path / "portcullis.yaml"
            config.write_text(yaml.safe_dump({
                "hostname": "mx.example.test",
                "listen": [f"{appliance.address}:25"],
                "relay_domains": ["example.test"],
                "workers": 2,
                "recipients": {"file": str(recipients)},
                "backend": {"servers": [f"127.0.0.1:{backend.port}"]},
                "state_dir": str(tmp_path / "state"),
                "tls": {"generated_dir": str(tmp_path / "tls")},
                "ban_socket": str(ban_socket),
                "ban_helper": {"socket_group": ""},
                "limits": {"pregreet_delay": 0},
            }))
            log = open(tmp_path / "gate.log", "wb")  # noqa: SIM115 - closed below
            appliance.popen([sys.executable, "-m", "portcullis.cli", "ban-helper", "-c", str(config)],
                            stdout=log, stderr=log)
            appliance.popen([sys.executable, "-m", "portcullis.cli", "serve", "-c", str(config)],
                            stdout=log, stderr=log)
            deadline = time.monotonic() + 20
            while not ban_socket.exists() or "listening on" not in (tmp_path / "gate.log").read_text():
                assert time.monotonic() < deadline, (tmp_path / "gate.log").read_text()
                time.sleep(0.2)
            time.sleep(1)  # workers start
            yield appliance, ClientSide(client), backend, tmp_path / "gate.log"
        finally:
            appliance.stop_processes()
            backend.close()


def banned_in_kernel(appliance: netns.Namespace) -> dict:
    listed = json.loads(appliance.run(["nft", "-j", "list", "set", "inet", "portcullis",
                                       "portcullis_ban4"]).stdout)
    (entry,) = [item["set"] for item in listed["nftables"] if "set" in item]
    return {e["elem"]["val"]: e["elem"] for e in entry.get("elem", [])}


def drop_counter(appliance: netns.Namespace) -> int:
    listed = json.loads(appliance.run(["nft", "-j", "list", "chain", "inet", "portcullis",
                                       "input"]).stdout)
    for item in listed["nftables"]:
        rule = item.get("rule")
        if rule and "@portcullis_ban4" in json.dumps(rule["expr"]):
            return next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    raise AssertionError("no ban rule in the ruleset")


def test_harvest_is_banned_in_the_kernel_without_an_oracle(attack_lab):
    appliance, client, backend, gate_log = attack_lab
    gate = appliance.address
    # Invalid addresses, with a valid one every seventh probe.
    probes = [VALID[i % 3] if i % 7 == 6 else f"user{i}@example.test" for i in range(PROBES)]

    legitimate: list[dict] = []
    stop = threading.Event()

    def legitimate_sender() -> None:
        n = 0
        while not stop.is_set() and n < 40:
            legitimate.append(client.run(DELIVER.format(gate=gate, source=LEGITIMATE, n=n)))
            n += 1
            stop.wait(2)

    sender = threading.Thread(target=legitimate_sender)
    sender.start()
    kernel_ban_seen: list[float] = []

    def watch_kernel() -> None:
        started = time.monotonic()
        while not stop.is_set() and time.monotonic() - started < 200:
            if ATTACKER in banned_in_kernel(appliance):
                kernel_ban_seen.append(time.time())
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch_kernel)
    watcher.start()
    try:
        result = client.run(HARVEST.format(gate=gate, source=ATTACKER, probes=probes, valid=VALID),
                            timeout=200)
    finally:
        time.sleep(4)  # the legitimate sender keeps going after the ban
        stop.set()
        sender.join(60)
        watcher.join(10)
    answers = result["answers"]

    # Banned at the BAN_AFTER-th probe that counted: a miss, or any RCPT once suspect.
    index = next((i for i, a in enumerate(answers) if a["code"] == 421), None)
    assert index is not None, "the harvester was never disconnected"
    counted = [a for a in answers[:index + 1] if not a["valid"] or a["code"] in (450, 421)]
    assert len(counted) <= BAN_AFTER
    assert len(answers) < PROBES  # most probes never got an answer

    # No oracle: once suspect (after the first 450), valid and invalid look the same.
    suspect = next(i for i, a in enumerate(answers) if a["code"] == 450)
    after = answers[suspect + 1:index]
    assert {(a["code"], a["text"]) for a in after} == {(450, after[0]["text"])}
    assert any(a["valid"] for a in after) and any(not a["valid"] for a in after)
    spread = [a["took"] for a in after]
    assert max(spread) - min(spread) < 1.0

    # The kernel drops the attacker: no banner, counted by the ban rule.
    assert ATTACKER in banned_in_kernel(appliance)
    assert 3000 <= banned_in_kernel(appliance)[ATTACKER]["timeout"] <= 3600
    before = drop_counter(appliance)
    probe = client.run(NO_BANNER.format(gate=gate, source=ATTACKER))
    assert "banner" not in probe, probe
    assert drop_counter(appliance) > before
    assert result["refused"], "later sessions were not refused"

    # The legitimate sender was served throughout, and nothing bounced anywhere.
    assert legitimate and all(r["refused"] == {} for r in legitimate)
    assert len(backend.wait_for("alice", len(legitimate), timeout=30)) == len(legitimate)
    backend.assert_no_bounce(settle=2)
    delivered = b"".join(backend.messages("alice") + backend.messages("bob") + backend.messages("carol"))
    assert b"spammer@outside.test" not in delivered

    ban_probe_sent = answers[index]["at"] - answers[index]["took"]
    log_lines = [json.loads(line.split("portcullis.session: ", 1)[1])
                 for line in gate_log.read_text().splitlines() if "portcullis.session: {" in line]
    labels = {label for line in log_lines if line["client"] == ATTACKER for label in line["labels"]}
    assert {"DHA_TARPIT", "DHA_SUSPECT", "DHA_BAN"} <= labels
    print(f"\nDHA figures: {index} probes answered before the ban "
          f"({sum(not a['valid'] for a in answers[:index])} invalid); "
          f"in the kernel {kernel_ban_seen[0] - ban_probe_sent:.2f} s after the "
          f"{len(counted)}th counted probe was sent; "
          f"{len(legitimate)} legitimate deliveries, all accepted")
