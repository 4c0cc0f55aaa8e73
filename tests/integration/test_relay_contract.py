"""The before-queue promise, held against a backend that fails the way mail servers fail.

A client gets 250 at end-of-data only if the backend accepted the same bytes for every
recipient the client was told 250 at RCPT; a transient backend fault reaches the client
as 4xx, never 5xx; a backend connection that saw an error is never used again.
"""

import smtplib
import socket
import ssl
import time

import pytest

from tests.support.fault_backend import Fault, FaultBackend
from tests.support.gate import GateProcess

BODY = b"Subject: contract\r\n\r\nbody line\r\n"


@pytest.fixture
def backend():
    with FaultBackend(users={"alice@example.test", "bob@example.test"}) as running:
        yield running


@pytest.fixture
def gate(backend, tmp_path):
    # One worker, so that every session shares one backend connection pool.
    with GateProcess(tmp_path, f"127.0.0.1:{backend.port}", workers=1,
                     allowlist=["127.0.0.0/8"]) as running:
        yield running


def client(gate) -> smtplib.SMTP:
    session = smtplib.SMTP("127.0.0.1", gate.port, local_hostname="client.test", timeout=20)
    session.ehlo()
    return session


def send_data(session: smtplib.SMTP) -> int:
    code, _ = session.docmd("DATA")
    if code != 354:
        return code
    session.send(BODY + b".\r\n")
    return session.getreply()[0]


def test_a_lost_backend_transaction_never_loses_an_accepted_recipient(gate, backend):
    backend.plan("rcpt:2", Fault.hangup())
    with client(gate) as session:
        session.mail("s@outside.test")
        told_250 = set()
        for recipient in ("alice@example.test", "bob@example.test", "bob@example.test"):
            code, _ = session.rcpt(recipient)
            assert code < 500, f"a hang-up became a permanent failure for {recipient}"
            if code == 250:
                told_250.add(recipient)
        final = send_data(session)
    assert "alice@example.test" in told_250
    if final == 250:
        delivered = {r for d in backend.deliveries for r in d.recipients}
        assert told_250 <= delivered, f"told 250, never delivered: {told_250 - delivered}"
    else:
        assert 400 <= final < 500


def test_a_transient_sender_refusal_stays_transient_for_every_recipient(gate, backend):
    backend.plan("mail", Fault.reply("452 4.3.1 Insufficient system storage"))
    with client(gate) as session:
        session.mail("s@outside.test")
        codes = [session.rcpt(r)[0] for r in ("alice@example.test", "bob@example.test",
                                               "alice@example.test")]
    assert all(400 <= code < 500 for code in codes), codes


def next_session_is_in_step_on_a_new_connection(gate, backend) -> None:
    """The next message's replies are its own, and it does not reuse the old connection."""
    time.sleep(0.2)  # the previous session's end reaches the gate's pool
    connections_before = backend.connections
    with client(gate) as session:
        session.mail("s@outside.test")
        # carol passes the gate's list, but the backend refuses her: her answer is 550
        assert session.rcpt("carol@example.test")[0] == 550
        assert session.rcpt("bob@example.test")[0] == 250
        assert send_data(session) == 250
    assert backend.connections == connections_before + 1, "the failed connection was reused"
    assert [d.recipients for d in backend.deliveries] == [["bob@example.test"]]


@pytest.mark.parametrize("fault", [Fault.lines(100), Fault.overlong(), Fault.malformed(),
                                   Fault.late(5)], ids=["100 lines", "overlong", "malformed",
                                                        "timeout"])
def test_a_connection_that_failed_rset_is_never_reused(gate, backend, fault):
    with client(gate) as session:  # a transaction reset by the client resets the backend's
        session.mail("s@outside.test")
        assert session.rcpt("alice@example.test")[0] == 250
        backend.plan("rset", fault)
        session.rset()
    next_session_is_in_step_on_a_new_connection(gate, backend)


def test_a_malformed_reply_in_a_transaction_closes_the_connection(gate, backend):
    backend.plan("rcpt:2", Fault.lines(100))
    with client(gate) as session:
        session.mail("s@outside.test")
        assert session.rcpt("alice@example.test")[0] == 250
        assert 400 <= session.rcpt("bob@example.test")[0] < 500
    next_session_is_in_step_on_a_new_connection(gate, backend)


def test_a_reply_out_of_turn_during_data_fails_the_message(gate, backend):
    backend.plan("chunk", Fault.reply("250 2.0.0 not an answer to anything"))
    with client(gate) as session:
        session.mail("s@outside.test")
        assert session.rcpt("alice@example.test")[0] == 250
        assert session.docmd("DATA")[0] == 354
        session.send(BODY)
        time.sleep(0.3)  # the backend's word out of turn arrives before the final dot
        session.send(b".\r\n")
        assert 400 <= session.getreply()[0] < 500
    assert backend.deliveries == []
    next_session_is_in_step_on_a_new_connection(gate, backend)


def _read_replies(sock: socket.socket | ssl.SSLSocket, count: int, timeout: float = 10) -> list[bytes]:
    """The next `count` complete replies (multi-line replies joined)."""
    sock.settimeout(timeout)
    buffer, replies = b"", []
    while len(replies) < count:
        data = sock.recv(65536)
        if not data:
            break
        buffer += data
        while b"\r\n" in buffer and len(replies) < count:
            line, buffer = buffer.split(b"\r\n", 1)
            if line[3:4] != b"-":
                replies.append(line)
    return replies


def test_plaintext_sent_after_starttls_is_never_run_inside_tls(gate, backend):
    backend.plan("rcpt:1", Fault.late(1.0))  # keeps the session busy while the NOOP arrives
    with socket.create_connection(("127.0.0.1", gate.port), timeout=10) as raw:
        _read_replies(raw, 1)  # banner
        raw.sendall(b"EHLO client.test\r\n")
        _read_replies(raw, 1)
        raw.sendall(b"MAIL FROM:<s@outside.test>\r\nRCPT TO:<alice@example.test>\r\n"
                    b"RSET\r\nSTARTTLS\r\n")
        time.sleep(0.3)
        raw.sendall(b"NOOP\r\n")  # the attacker's injection, after STARTTLS, in plaintext
        replies = _read_replies(raw, 4)
        assert replies[-1].startswith(b"220"), replies
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with context.wrap_socket(raw, server_hostname="mx.example.test") as tls:
            try:
                injected = _read_replies(tls, 1, timeout=1.5)
            except TimeoutError:
                injected = []
            assert injected == [], "a command sent before the handshake ran inside TLS"
            tls.sendall(b"EHLO client.test\r\n")
            assert _read_replies(tls, 1)[0].startswith(b"250 ")


def test_a_reload_with_a_cross_key_error_changes_nothing(backend, tmp_path):
    with GateProcess(tmp_path, f"127.0.0.1:{backend.port}", workers=1) as gate:
        bad = dict(gate.settings)
        bad["limits"] = {**gate.settings["limits"], "max_connections_per_ip": 1}
        bad["dha"] = {"tarpit_after": 9, "suspect_after": 5}
        gate.write_config(bad)
        gate.reload()
        assert "reload refused" in gate.log_text()
        assert "dha.suspect_after" in gate.log_text()
        # The running limits stay: a second connection from one address is still served.
        with client(gate) as first, client(gate) as second:
            assert first.noop()[0] == 250 and second.noop()[0] == 250
