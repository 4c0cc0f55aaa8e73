"""The Postfix backend fixture itself: delivery, refusal, modes, no bounce."""

import smtplib

import pytest

from tests.support.postfix import Blackhole, as_sent

MESSAGE = (b"From: sender@client.test\r\nTo: alice@example.test\r\nSubject: fixture\r\n"
           b"\r\nfirst line\r\n.a line that smtplib dot-stuffs\r\n\xc3\xa9 8-bit\r\n")


def send(backend, recipients, message=MESSAGE):
    with smtplib.SMTP(backend.host, backend.port, timeout=10) as client:
        return client.sendmail("sender@client.test", recipients, message)


def test_delivers_the_message_byte_exact(postfix_backend):
    send(postfix_backend, ["alice@example.test"])
    (delivered,) = postfix_backend.wait_for("alice", 1)
    assert as_sent(delivered) == MESSAGE
    assert postfix_backend.messages("bob") == []
    postfix_backend.assert_no_bounce()


def test_refuses_an_unknown_user_without_bouncing(postfix_backend):
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(postfix_backend, ["mallory@example.test"])
    code, _ = refused.value.recipients["mallory@example.test"]
    assert code == 550
    postfix_backend.assert_no_bounce()


@pytest.mark.parametrize("mode, error", [
    ("tempfail_rcpt", smtplib.SMTPRecipientsRefused),
    ("tempfail_data", smtplib.SMTPDataError),
    ("tempfail_end_of_data", smtplib.SMTPDataError),
])
def test_tempfail_modes_answer_4xx(postfix_backend, mode, error):
    postfix_backend.set_mode(mode)
    with pytest.raises(error) as failure:
        send(postfix_backend, ["alice@example.test"])
    code = (failure.value.recipients["alice@example.test"][0]
            if isinstance(failure.value, smtplib.SMTPRecipientsRefused) else failure.value.smtp_code)
    assert 400 <= code < 500
    assert postfix_backend.messages("alice") == []
    postfix_backend.assert_no_bounce()


def test_stopped_backend_refuses_connections_and_restarts(postfix_backend):
    postfix_backend.stop()
    with pytest.raises(ConnectionRefusedError):
        send(postfix_backend, ["alice@example.test"])
    postfix_backend.start()
    send(postfix_backend, ["bob@example.test"])
    assert len(postfix_backend.wait_for("bob", 1)) == 1


def test_reset_empties_mailboxes_and_restores_normal_mode(postfix_backend):
    send(postfix_backend, ["carol@example.test"])
    postfix_backend.wait_for("carol", 1)
    postfix_backend.set_mode("tempfail_rcpt")
    postfix_backend.reset()
    assert postfix_backend.messages("carol") == []
    send(postfix_backend, ["carol@example.test"])
    assert len(postfix_backend.wait_for("carol", 1)) == 1


def test_blackhole_accepts_and_never_answers():
    no_banner = pytest.raises(smtplib.SMTPServerDisconnected, match="timed out")
    with Blackhole() as blackhole, no_banner:
        smtplib.SMTP(blackhole.host, blackhole.port, timeout=0.5)
