"""A real directory harvest attack, across network namespaces.

The appliance namespace runs the gate, the ban helper, an nftables ruleset with the
ban sets, and a real Postfix as the internal mail server. The client namespace holds
an attacker and a legitimate sender on two addresses. The host's ruleset is never
touched. Figures (probes answered, seconds to the kernel ban) are printed for the
closing note; the assertions are about behaviour.
"""

import threading
import time

import pytest

from tests.support import netns
from tests.support.lab import VALID, appliance_lab

pytestmark = [pytest.mark.netns, netns.requires_root]

ATTACKER, LEGITIMATE = "10.251.0.2", "10.251.0.3"
PROBES = 300
BAN_AFTER = 10


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
    with appliance_lab(tmp_path, "10.251.0.1/24", (f"{ATTACKER}/24", f"{LEGITIMATE}/24")) as lab:
        yield lab


def test_harvest_is_banned_in_the_kernel_without_an_oracle(attack_lab):
    lab = attack_lab
    gate, backend = lab.gate, lab.backend
    # Invalid addresses, with a valid one every seventh probe.
    probes = [VALID[i % 3] if i % 7 == 6 else f"user{i}@example.test" for i in range(PROBES)]

    legitimate: list[dict] = []
    stop = threading.Event()

    def legitimate_sender() -> None:
        n = 0
        while not stop.is_set() and n < 40:
            legitimate.append(lab.run_client(DELIVER.format(gate=gate, source=LEGITIMATE, n=n)))
            n += 1
            stop.wait(2)

    sender = threading.Thread(target=legitimate_sender)
    sender.start()
    kernel_ban_seen: list[float] = []

    def watch_kernel() -> None:
        started = time.monotonic()
        while not stop.is_set() and time.monotonic() - started < 200:
            if ATTACKER in lab.banned_in_kernel():
                kernel_ban_seen.append(time.time())
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch_kernel)
    watcher.start()
    try:
        result = lab.run_client(
            HARVEST.format(gate=gate, source=ATTACKER, probes=probes, valid=VALID), timeout=200)
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
    assert ATTACKER in lab.banned_in_kernel()
    assert 3000 <= lab.banned_in_kernel()[ATTACKER]["timeout"] <= 3600
    before = lab.drop_counter()
    probe = lab.run_client(NO_BANNER.format(gate=gate, source=ATTACKER))
    assert "banner" not in probe, probe
    assert lab.drop_counter() > before
    assert result["refused"], "later sessions were not refused"

    # The legitimate sender was served throughout, and nothing bounced anywhere.
    assert legitimate and all(r["refused"] == {} for r in legitimate)
    assert len(backend.wait_for("alice", len(legitimate), timeout=30)) == len(legitimate)
    backend.assert_no_bounce(settle=2)
    delivered = b"".join(backend.messages("alice") + backend.messages("bob") + backend.messages("carol"))
    assert b"spammer@outside.test" not in delivered

    ban_probe_sent = answers[index]["at"] - answers[index]["took"]
    labels = {label for line in lab.session_lines() if line["client"] == ATTACKER
              for label in line["labels"]}
    assert {"DHA_TARPIT", "DHA_SUSPECT", "DHA_BAN"} <= labels
    print(f"\nDHA figures: {index} probes answered before the ban "
          f"({sum(not a['valid'] for a in answers[:index])} invalid); "
          f"in the kernel {kernel_ban_seen[0] - ban_probe_sent:.2f} s after the "
          f"{len(counted)}th counted probe was sent; "
          f"{len(legitimate)} legitimate deliveries, all accepted")
