"""Greylisting through the real gate, with real clients and the real Postfix backend.

Delays are seconds here, not minutes (greylist.delay 2 s, retry_window 8 s): the
behaviour is the same, the test is faster.
"""

from __future__ import annotations

import re
import smtplib
import time
import urllib.request

import pytest

from tests.support.gate import GateProcess
from tests.support.postfix import PostfixSender
from tests.support.redis_server import RedisServer
from tests.support.tools import free_port, wait_until

pytestmark = pytest.mark.integration

DELAY, WINDOW = 2.0, 8.0
GREYLIST = {"enabled": True, "delay": DELAY, "retry_window": WINDOW}
SENDER = "news@sender.example.net"


def attempt(gate: GateProcess, recipient: str, source: str = "127.0.0.1",
            body: str = "") -> tuple[int, bytes]:
    """One delivery attempt, as an MTA makes it: the RCPT's answer, and the end of DATA's
    when the recipient was taken."""
    with smtplib.SMTP("127.0.0.1", gate.port, local_hostname="mta.sender.example.net",
                      source_address=(source, 0), timeout=20) as client:
        client.ehlo()
        client.mail(SENDER)
        code, text = client.rcpt(recipient)
        if code != 250:
            return code, text
        return client.data(f"Subject: {body}\r\n\r\n{body}\r\n".encode())


def greylist_metrics(gate: GateProcess) -> dict[str, float]:
    page = urllib.request.urlopen(f"http://{gate.settings['metrics']['listen']}/metrics",
                                  timeout=5).read().decode()
    found = re.findall(r'^portcullis_greylist_total\{event="(\w+)"\} (\S+)$', page, re.MULTILINE)
    return {event: float(value) for event, value in found}


def test_first_early_in_time_then_the_client_passes(postfix_backend, tmp_path):
    with GateProcess(tmp_path, f"127.0.0.1:{postfix_backend.port}", greylist=GREYLIST,
                     metrics={"listen": f"127.0.0.1:{free_port()}"}) as gate:
        first = attempt(gate, "alice@example.test", body="greylisted")
        unknown = attempt(gate, "nobody@example.test")  # no oracle: the same answer
        early = attempt(gate, "alice@example.test")
        time.sleep(DELAY)
        in_time = attempt(gate, "alice@example.test", body="greylisted")
        time.sleep(1.2)  # the gate's processes share within reputation.sync_interval
        another = attempt(gate, "bob@example.test", body="after the pass")
        labels = [rcpt["label"] for line in gate.session_lines()
                  for mail in line["mail"] for rcpt in mail["rcpts"]]
        time.sleep(2.5)  # workers report their counts every second
        counted = greylist_metrics(gate)

    assert first[0] == unknown[0] == early[0] == 451
    assert first[1] == unknown[1] == early[1]
    assert b"4.7.1 Greylisted" in first[1]
    assert in_time[0] == another[0] == 250
    assert len(postfix_backend.wait_for("alice")) == 1  # delivered once
    assert len(postfix_backend.wait_for("bob")) == 1
    assert labels.count("GREYLISTED") == 3
    # Two triplets seen (alice's, nobody's), one passed, none expired.
    assert counted == {"seen": 2, "passed": 1, "expired": 0}


def test_a_retry_after_the_window_starts_over(postfix_backend, tmp_path):
    with GateProcess(tmp_path, f"127.0.0.1:{postfix_backend.port}", greylist=GREYLIST) as gate:
        assert attempt(gate, "alice@example.test", source="127.0.1.5")[0] == 451
        time.sleep(WINDOW + 0.5)
        assert attempt(gate, "alice@example.test", source="127.0.1.5")[0] == 451
        time.sleep(DELAY)
        assert attempt(gate, "alice@example.test", source="127.0.1.5", body="late")[0] == 250
    assert len(postfix_backend.wait_for("alice")) == 1


def test_the_allowlist_is_not_greylisted(postfix_backend, tmp_path):
    with GateProcess(tmp_path, f"127.0.0.1:{postfix_backend.port}", greylist=GREYLIST,
                     allowlist=["127.0.2.0/24"]) as gate:
        assert attempt(gate, "alice@example.test", source="127.0.2.1", body="ok")[0] == 250
        assert attempt(gate, "alice@example.test", source="127.0.3.1")[0] == 451


def test_a_postfix_sender_retries_and_the_mail_arrives_once(postfix_backend, tmp_path):
    """A real MTA as the sender: its queue retries by itself."""
    with GateProcess(tmp_path, f"127.0.0.1:{postfix_backend.port}", greylist=GREYLIST) as gate, \
            PostfixSender(f"127.0.0.1:{gate.port}") as sender:
        wait_until(sender.ready, 20, "the sending Postfix")
        submitted = time.monotonic()
        with smtplib.SMTP("127.0.0.1", sender.port, timeout=20) as client:
            client.sendmail(SENDER, ["carol@example.test"],
                            b"Subject: queued\r\n\r\nfrom a real queue\r\n")
        delivered = postfix_backend.wait_for("carol", timeout=60)
        took = time.monotonic() - submitted
        time.sleep(2)  # a duplicate would arrive with the next queue run
        statuses = sender.deliveries()
    print(f"\nPostfix's mail arrived {took:.1f} s after submission; its attempts: {statuses}")
    assert len(postfix_backend.messages("carol")) == 1 and b"from a real queue" in delivered[0]
    assert statuses[0] == "deferred" and statuses[-1] == "sent"
    assert took >= DELAY


def test_a_retry_through_another_gate_passes_with_the_shared_store(postfix_backend, tmp_path):
    """Two appliances share greylisting through the fleet's store: the retry of a
    message first tried on one MX may land on the other, and passes there."""
    for appliance in ("a", "b"):
        (tmp_path / appliance).mkdir()
    with RedisServer(tmp_path / "redis") as store:
        shared = {"greylist": GREYLIST, "reputation": store.settings()}
        with GateProcess(tmp_path / "a", f"127.0.0.1:{postfix_backend.port}", **shared) as one, \
                GateProcess(tmp_path / "b", f"127.0.0.1:{postfix_backend.port}",
                            **shared) as other:
            assert attempt(one, "alice@example.test", source="127.0.4.1")[0] == 451
            time.sleep(DELAY)
            assert attempt(other, "alice@example.test", source="127.0.4.1",
                           body="second MX")[0] == 250
    assert len(postfix_backend.wait_for("alice")) == 1
