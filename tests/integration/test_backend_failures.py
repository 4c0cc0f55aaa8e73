"""When the backend is down, refusing, or silent, the client gets 4xx in bounded time.

Never a 250 the backend did not give; the sender retries and nothing is lost.
"""

import smtplib
import time

import pytest

from tests.support.gate import GateProcess
from tests.support.postfix import Blackhole

BOUND = 15  # seconds: connect 2 + command 3 + data 3, with room for a slow machine


def attempt(gate, to="alice@example.test") -> tuple[int, bytes, float]:
    """One delivery attempt; the code and text of the first refusal, or of the end of DATA."""
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", gate.port, local_hostname="client.test", timeout=30) as client:
        client.ehlo()
        client.mail("s@outside.test")
        code, text = client.rcpt(to)
        if code == 250:
            code, text = client.docmd("DATA")
        if code == 354:
            client.send(b"Subject: retry me\r\n\r\nimportant\r\n.\r\n")
            code, text = client.getreply()
    return code, text, time.monotonic() - started


@pytest.fixture
def gate(postfix_backend, tmp_path):
    with GateProcess(tmp_path, f"127.0.0.1:{postfix_backend.port}") as running:
        yield running


def test_backend_stopped_then_back(gate, postfix_backend):
    postfix_backend.stop()
    code, text, took = attempt(gate)
    assert (code, text[:5]) == (451, b"4.4.1") and took < BOUND
    postfix_backend.start()
    code, _, _ = attempt(gate)
    assert code == 250
    assert len(postfix_backend.wait_for("alice")) == 1


@pytest.mark.parametrize("mode, stage", [
    ("tempfail_rcpt", "rcpt"), ("tempfail_data", "data"), ("tempfail_end_of_data", "data")])
def test_backend_tempfail_passes_through(gate, postfix_backend, mode, stage):
    postfix_backend.set_mode(mode)
    code, _, took = attempt(gate)
    assert 400 <= code < 500 and took < BOUND
    postfix_backend.set_mode("normal")
    assert attempt(gate)[0] == 250
    messages = postfix_backend.wait_for("alice")
    assert len(messages) == 1  # the tempfailed attempt left nothing behind
    postfix_backend.assert_no_bounce(settle=1)


def test_blackholed_backend_gives_4xx_in_bounded_time(postfix_backend, tmp_path):
    with Blackhole() as hole, GateProcess(tmp_path, f"127.0.0.1:{hole.port}") as gate:
        code, text, took = attempt(gate)
    assert (code, text[:5]) == (451, b"4.4.1")
    assert took < BOUND


def test_second_backend_used_when_first_is_down(postfix_backend, tmp_path):
    with Blackhole() as hole:
        hole.close()  # a port nobody listens on any more
        with GateProcess(tmp_path, f"127.0.0.1:{hole.port}",
                         backend={"servers": [f"127.0.0.1:{hole.port}",
                                              f"127.0.0.1:{postfix_backend.port}"]}) as gate:
            assert attempt(gate)[0] == 250
    assert len(postfix_backend.wait_for("alice")) == 1


def test_backend_dies_during_data_no_250(gate, postfix_backend):
    with smtplib.SMTP("127.0.0.1", gate.port, local_hostname="client.test", timeout=30) as client:
        client.ehlo()
        client.mail("s@outside.test")
        assert client.rcpt("alice@example.test")[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(b"Subject: half\r\n\r\nfirst half\r\n")
        postfix_backend.stop()
        client.send(b"second half\r\n")
        code, _ = client.docmd(".")
    assert 400 <= code < 500
    postfix_backend.start()
    time.sleep(1)
    assert postfix_backend.messages("alice") == []
