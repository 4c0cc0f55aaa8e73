"""Fuzz target: the sans-IO SMTP core, fed arbitrary bytes in arbitrary pieces, with the
session's answers interleaved (positive or negative, as the fuzzer chooses).

Invariants on every input: nothing raises; the core stays in a state of its table;
every reply it writes is CRLF-framed with lines of at most 512 octets; it never
asks for an answer while one is pending; the session ends once the input ends.
"""

import sys

import atheris

with atheris.instrument_imports():
    from portcullis import smtp
    from portcullis.smtp import replies
    from portcullis.smtp.replies import Reply

LIMITS = smtp.ProtocolLimits(max_message_size=4096, max_recipients=5, max_strikes=5,
                             max_commands=200)
NEGATIVE = [Reply(450, "4.7.1", "try later"), Reply(550, "5.1.1", "unknown"),
            Reply(421, "4.3.0", "closing"), Reply(554, "5.7.1", "denied")]


def positive(server: smtp.SmtpServer, event) -> Reply:
    if isinstance(event, smtp.Hello):
        return server.hello_reply(event)
    if isinstance(event, smtp.DataBegin):
        return replies.START_DATA
    if isinstance(event, smtp.StartTls):
        return replies.READY_TLS
    return replies.OK


def check_output(out: bytes) -> None:
    if not out:
        return
    assert out.endswith(b"\r\n"), out[-40:]
    for line in out[:-2].split(b"\r\n"):
        assert len(line) + 2 <= 512, len(line)
        assert line[:3].isdigit() and line[3:4] in (b" ", b"-", b""), line[:40]


def drain(server: smtp.SmtpServer, fdp: atheris.FuzzedDataProvider) -> bool:
    """Take events until the core needs bytes; False once the session closed."""
    for _ in range(10_000):
        event = server.next_event()
        assert server.state in smtp.State
        if event is smtp.NEED_DATA:
            return True
        assert event is not smtp.PAUSED
        if isinstance(event, smtp.Closed):
            return False
        if isinstance(event, smtp.NEEDS_REPLY):
            choice = fdp.ConsumeIntInRange(0, len(NEGATIVE))
            reply = positive(server, event) if choice == 0 else NEGATIVE[choice - 1]
            server.respond(reply)
            if isinstance(event, smtp.StartTls) and reply.is_positive:
                server.tls_started()
        check_output(server.data_to_send())
    raise AssertionError("the core produced 10,000 events from one input")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    server = smtp.SmtpServer("mx.fuzz.test", LIMITS, tls_available=True,
                             postmaster_domain="example.test")
    while fdp.remaining_bytes():
        piece = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 600))
        server.receive_data(piece)
        if not drain(server, fdp):
            return
    server.receive_data(b"")
    assert not drain(server, fdp), "the session outlived the end of its input"


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
