"""Message, recipient and TLS rates per client, through the real gate, with real clients
and the real Postfix backend. The unit is 4 s here, not a minute (limits.rate_time_unit):
the behaviour is the same, the test is faster.
"""

from __future__ import annotations

import smtplib
import ssl
import time

import pytest

from tests.support.gate import GateProcess
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

UNIT = 4.0
SENDER = "news@sender.example.net"


def rates(**caps) -> dict:
    return {"rate_time_unit": UNIT, "message_rate_per_ip": 0, "recipient_rate_per_ip": 0,
            "tls_rate_per_ip": 0, **caps}


def start_of_a_window() -> None:
    """Wait for a fresh window, so that the whole test's count lies in one."""
    time.sleep(UNIT - time.time() % UNIT + 0.05)


def client(gate: GateProcess, source: str) -> smtplib.SMTP:
    connection = smtplib.SMTP("127.0.0.1", gate.port, local_hostname="mta.sender.example.net",
                              source_address=(source, 0), timeout=20)
    connection.ehlo()
    return connection


def send(connection: smtplib.SMTP, n: int, recipients=("alice@example.test",)) -> int:
    """One message; the first refusal's code, or 250."""
    code, _ = connection.mail(SENDER)
    if code != 250:
        return code
    for recipient in recipients:
        code, _ = connection.rcpt(recipient)
        if code != 250:
            return code
    return connection.data(f"Subject: rate {n}\r\n\r\nmessage {n}\r\n".encode())[0]


def test_over_the_message_rate_mail_gets_421_and_the_retry_arrives(postfix_backend, tmp_path):
    with GateProcess(tmp_path, f"127.0.0.1:{postfix_backend.port}",
                     limits={"pregreet_delay": 0, **rates(message_rate_per_ip=3)}) as gate:
        start_of_a_window()
        connection = client(gate, "127.0.5.1")
        codes = [send(connection, n) for n in range(3)]
        refused = connection.mail(SENDER)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            connection.noop()  # 421 closes
        # Another client is not affected.
        other = client(gate, "127.0.6.1")
        assert send(other, 99) == 250
        other.quit()
        # The sender retries once the unit has passed: the message arrives.
        time.sleep(2 * UNIT)
        retry = client(gate, "127.0.5.1")
        retried = send(retry, 3)
        retry.quit()
        labels = [line["labels"] for line in gate.session_lines()]

    assert codes == [250, 250, 250]
    assert refused[0] == 421 and b"4.7.0" in refused[1]
    assert retried == 250
    assert len(postfix_backend.wait_for("alice", 5)) == 5  # 3 + the other's + the retry
    assert any("MSG_RATE" in found for found in labels)


def test_over_the_recipient_rate_rcpt_gets_452(postfix_backend, tmp_path):
    with GateProcess(tmp_path, f"127.0.0.1:{postfix_backend.port}",
                     limits={"pregreet_delay": 0, **rates(recipient_rate_per_ip=4)}) as gate:
        start_of_a_window()
        connection = client(gate, "127.0.5.2")
        connection.mail(SENDER)
        codes = [connection.rcpt(address)[0] for address in
                 ("alice@example.test", "bob@example.test", "carol@example.test",
                  "nobody@example.test", "alice@example.test")]
        accepted = connection.data(b"Subject: four\r\n\r\nto the first recipients\r\n")[0]
        connection.quit()
        # The sender sends to the refused recipient later: it arrives.
        time.sleep(2 * UNIT)
        later = client(gate, "127.0.5.2")
        retried = send(later, 1)
        later.quit()
    # The fourth RCPT counts (an unknown recipient is still a recipient); the fifth is over.
    assert codes == [250, 250, 250, 550, 452]
    assert accepted == retried == 250
    assert len(postfix_backend.wait_for("carol")) == 1
    assert len(postfix_backend.wait_for("alice", 2)) == 2


def test_over_the_tls_rate_starttls_gets_454_and_mail_still_flows(postfix_backend, tmp_path):
    # One worker: each connection is a new one, and workers share counts within about a
    # second (reputation.sync_interval), longer than this test's unit allows.
    with GateProcess(tmp_path, f"127.0.0.1:{postfix_backend.port}", workers=1,
                     limits={"pregreet_delay": 0, **rates(tls_rate_per_ip=2)}) as gate:
        start_of_a_window()
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        answers = []
        for _ in range(3):
            connection = client(gate, "127.0.5.3")
            try:
                answers.append(connection.starttls(context=context)[0])
            except smtplib.SMTPResponseException as e:
                answers.append(e.smtp_code)
            connection.ehlo()
            answers.append(send(connection, len(answers)))
            connection.quit()
    assert answers == [220, 250, 220, 250, 454, 250]  # over the cap: mail goes on, plain


def test_the_allowlist_is_exempt(postfix_backend, tmp_path):
    with GateProcess(tmp_path, f"127.0.0.1:{postfix_backend.port}", allowlist=["127.0.7.0/24"],
                     limits={"pregreet_delay": 0, **rates(message_rate_per_ip=1)}) as gate:
        start_of_a_window()
        connection = client(gate, "127.0.7.1")
        assert [send(connection, n) for n in range(3)] == [250, 250, 250]
        connection.quit()


def test_a_fleet_counts_a_client_over_both_gates(postfix_backend, tmp_path):
    """With the fleet's store, the rate is the client's across appliances."""
    for appliance in ("a", "b"):
        (tmp_path / appliance).mkdir()
    with RedisServer(tmp_path / "redis") as store:
        shared = {"reputation": store.settings(),
                  "limits": {"pregreet_delay": 0, **rates(message_rate_per_ip=4)}}
        with GateProcess(tmp_path / "a", f"127.0.0.1:{postfix_backend.port}", **shared) as one, \
                GateProcess(tmp_path / "b", f"127.0.0.1:{postfix_backend.port}",
                            **shared) as other:
            start_of_a_window()
            first = client(one, "127.0.5.4")
            codes = [send(first, n) for n in range(3)]
            first.quit()
            time.sleep(1.5)  # counts are sent once a second
            second = client(other, "127.0.5.4")
            codes += [send(second, n) for n in range(3, 5)]
    assert codes == [250, 250, 250, 250, 421]
