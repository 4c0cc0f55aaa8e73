"""The sans-IO SMTP core, driven with bytes only."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from portcullis import smtp
from portcullis.smtp import ProtocolLimits, SmtpServer, State, commands, replies
from portcullis.smtp.replies import Reply


class Driver:
    """Feeds bytes and answers events the way a permissive session would."""

    def __init__(self, limits: ProtocolLimits | None = None, tls: bool = False):
        self.server = SmtpServer("mx.test", limits or ProtocolLimits(), tls_available=tls,
                                 postmaster_domain="example.test")
        self.events: list = []
        self.content = bytearray()
        self.answers: dict[type, Reply] = {}

    def feed(self, data: bytes) -> bytes:
        self.server.receive_data(data)
        return self.pump()

    def pump(self) -> bytes:
        server = self.server
        while True:
            event = server.next_event()
            if event in (smtp.NEED_DATA, smtp.PAUSED):
                break
            self.events.append(event)
            if isinstance(event, smtp.Closed):
                break
            if isinstance(event, smtp.DataChunk):
                self.content += event.data
            if type(event) in self.answers:
                server.respond(self.answers[type(event)])
            elif isinstance(event, smtp.Hello):
                server.respond(server.hello_reply(event))
            elif isinstance(event, smtp.DataBegin):
                server.respond(replies.START_DATA)
            elif isinstance(event, smtp.StartTls):
                server.respond(replies.READY_TLS)
            elif isinstance(event, smtp.NEEDS_REPLY):
                server.respond(replies.OK)
        return server.data_to_send()

    def codes(self, out: bytes) -> list[int]:
        return [int(line[:3]) for line in out.split(b"\r\n") if line[3:4] == b" "]

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]


TRANSACTION = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n"


def test_full_transaction_with_pipelining():
    d = Driver()
    out = d.feed(TRANSACTION + b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert d.codes(out) == [250, 250, 250, 354, 250, 221]
    assert bytes(d.content) == b"Subject: hi\r\n\r\nbody\r\n"
    assert d.server.state is State.CLOSED


def test_ehlo_advertises_extensions_and_no_version():
    d = Driver(tls=True)
    out = d.feed(b"EHLO c.test\r\n").decode()
    for extension in ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SIZE 26214400", "STARTTLS"):
        assert f"250-{extension}\r\n" in out or f"250 {extension}\r\n" in out
    assert "portcullis" not in out.lower()


def test_dot_stuffing_passes_through_wire_format_and_8bit_is_byte_exact():
    d = Driver()
    body = b"..leading dot\r\n...two\r\n\xc3\xa9t\xe9 \xff\x80\r\n.x\r\n"
    d.feed(TRANSACTION + body + b".\r\n")
    assert bytes(d.content) == body  # dot-stuffed as received: relayed as is
    assert len(d.of(smtp.DataEnd)) == 1


def test_end_of_data_split_across_reads():
    d = Driver()
    d.feed(TRANSACTION + b"line\r")
    d.feed(b"\n.")
    assert not d.of(smtp.DataEnd)
    d.feed(b"\r\n")
    assert len(d.of(smtp.DataEnd)) == 1
    assert bytes(d.content) == b"line\r\n"


@pytest.mark.parametrize("smuggled", [
    b"a\n.\r\nMAIL FROM:<x@evil>\r\n",
    b"a\r\n.\nMAIL FROM:<x@evil>\r\n",
    b"a\r.\r\nMAIL FROM:<x@evil>\r\n",
    b"bare\rcr inside\r\n",
])
def test_bare_cr_or_lf_in_data_refuses_and_closes(smuggled):
    d = Driver()
    out = d.feed(TRANSACTION + smuggled + b".\r\n")
    assert d.codes(out)[-1] == 521
    assert not d.of(smtp.DataEnd)
    assert [v.label for v in d.of(smtp.Violation)] == ["BARE_LF"]
    assert isinstance(d.events[-1], smtp.Closed)
    assert len(d.of(smtp.Mail)) == 1  # the smuggled MAIL never became a command


def test_data_line_over_1000_octets_rejects_message_and_session_continues():
    d = Driver()
    out = d.feed(TRANSACTION + b"x" * 999 + b"\r\nok\r\n.\r\nNOOP\r\n")
    assert d.codes(out)[-2:] == [550, 250]
    assert [e.label for e in d.of(smtp.MessageRefused)] == ["LINE_TOO_LONG"]
    assert d.server.state is State.GREETED


def test_data_line_of_exactly_1000_octets_is_fine():
    d = Driver()
    out = d.feed(TRANSACTION + b"x" * 998 + b"\r\n.\r\n")
    assert d.codes(out)[-1] == 250


def test_the_dot_doubled_for_transparency_does_not_count_toward_the_line_limit():
    # RFC 5321 4.5.3.1.6: 1000 octets with CRLF, "not counting the leading dot
    # duplicated for transparency". Found by the relay model test.
    d = Driver()
    out = d.feed(TRANSACTION + b".." + b"x" * 997 + b"\r\n.\r\n")
    assert d.codes(out)[-1] == 250
    assert not d.of(smtp.MessageRefused)
    d = Driver()
    out = d.feed(TRANSACTION + b".." + b"x" * 998 + b"\r\n.\r\n")
    assert d.codes(out)[-1] == 550


def test_unterminated_giant_data_line_is_dropped_not_buffered():
    d = Driver()
    d.feed(TRANSACTION)
    for _ in range(100):
        d.feed(b"y" * 10_000)
        assert len(d.server._in) <= 1001
    out = d.feed(b"\r\n.\r\n")
    assert d.codes(out) == [550]


def test_size_limit_enforced_while_streaming():
    d = Driver(ProtocolLimits(max_message_size=2000))
    d.feed(TRANSACTION)
    for _ in range(50):
        d.feed(b"z" * 98 + b"\r\n")
    out = d.feed(b".\r\n")
    assert d.codes(out) == [552]
    assert len(d.content) <= 2000  # nothing past the limit was passed on
    assert [e.label for e in d.of(smtp.MessageRefused)] == ["SIZE"]


def test_reserved_octets_count_toward_the_size_limit():
    # 1,900 octets fit a 2,000 limit alone, not with the 200 the gate adds (its header).
    d = Driver(ProtocolLimits(max_message_size=2000))
    d.server.reserve(200)
    d.feed(TRANSACTION)
    for _ in range(19):
        d.feed(b"z" * 98 + b"\r\n")
    assert d.codes(d.feed(b".\r\n")) == [552]
    assert [e.label for e in d.of(smtp.MessageRefused)] == ["SIZE"]


def test_declared_size_over_limit_refused_at_mail():
    d = Driver(ProtocolLimits(max_message_size=5000))
    out = d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test> SIZE=5001\r\n")
    assert d.codes(out) == [250, 552]
    assert d.server.state is State.GREETED


def test_command_line_over_512_octets():
    d = Driver()
    out = d.feed(b"EHLO c\r\nNOOP " + b"a" * 600 + b"\r\nNOOP\r\n")
    assert d.codes(out) == [250, 500, 250]
    assert out.count(b"500 5.5.2") == 1
    assert d.server.strikes == 1


def test_command_line_of_exactly_512_octets_is_accepted():
    d = Driver()
    out = d.feed(b"NOOP " + b"a" * 505 + b"\r\n")
    assert d.codes(out) == [250]


@pytest.mark.parametrize("line", [b"NOOP \x00\r\n", b"NOOP \xe9\r\n", b"NO\rOP\r\n"])
def test_nul_and_8bit_in_commands_rejected(line):
    d = Driver()
    out = d.feed(line)
    assert out.startswith(b"500 5.5.2")


def test_strikes_close_with_421():
    d = Driver(ProtocolLimits(max_strikes=3))
    out = d.feed(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert d.codes(out) == [500, 500, 421]
    assert isinstance(d.events[-1], smtp.Closed)


def test_recipient_limit_gives_452():
    d = Driver(ProtocolLimits(max_recipients=2))
    out = d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n" + b"RCPT TO:<u@example.test>\r\n" * 3)
    assert d.codes(out) == [250, 250, 250, 250, 452]


def test_sequence_errors():
    d = Driver()
    out = d.feed(b"MAIL FROM:<a@b.test>\r\nEHLO c\r\nRCPT TO:<u@x.test>\r\nDATA\r\n")
    assert d.codes(out) == [503, 250, 503, 503]


def test_data_after_only_refused_recipients_says_no_valid_recipients():
    d = Driver()
    d.answers[smtp.Rcpt] = Reply(550, "5.1.1", "unknown")
    out = d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@x.test>\r\nDATA\r\n")
    assert d.codes(out) == [250, 250, 550, 554]


def test_vrfy_and_expn_reveal_nothing():
    d = Driver()
    out = d.feed(b"VRFY root\r\nEXPN staff\r\n")
    assert d.codes(out) == [252, 502]
    assert not d.events


def test_mail_parameters():
    d = Driver()
    out = d.feed(b"EHLO c\r\nMAIL FROM:<> BODY=8BITMIME SIZE=10\r\n")
    assert d.codes(out) == [250, 250]
    assert d.of(smtp.Mail)[0].sender.body == "8BITMIME"
    assert d.of(smtp.Mail)[0].sender.address == ""
    d.feed(b"RSET\r\nMAIL FROM:<a@b.test> FOO=1\r\nMAIL FROM:a@b.test\r\n")
    assert [v.reply.code for v in d.of(smtp.Violation)] == [555, 501]


def test_postmaster_without_domain():
    d = Driver()
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<Postmaster>\r\n")
    assert d.of(smtp.Rcpt)[0].recipient.address == "postmaster@example.test"


def test_rset_drops_transaction():
    d = Driver()
    out = d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRSET\r\nRCPT TO:<u@example.test>\r\n")
    assert d.codes(out) == [250, 250, 250, 503]
    assert len(d.of(smtp.Reset)) == 1


def test_starttls_discards_pipelined_commands_and_resets():
    d = Driver(tls=True)
    out = d.feed(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<injected@evil>\r\n")
    assert d.codes(out) == [250, 220]
    assert d.server.state is State.TLS_HANDSHAKE
    d.server.tls_started()
    assert d.server.state is State.CONNECTED
    out = d.feed(b"MAIL FROM:<a@b.test>\r\n")
    assert d.codes(out) == [503]  # HELO is needed again; the injected MAIL is gone
    assert not d.of(smtp.Mail)
    out = d.feed(b"EHLO c\r\n")
    assert b"STARTTLS" not in out


def test_starttls_unavailable_without_context():
    d = Driver(tls=False)
    out = d.feed(b"EHLO c\r\nSTARTTLS\r\n")
    assert d.codes(out) == [250, 454]
    assert b"STARTTLS" not in out.split(b"\r\n")[0]


def test_pending_event_pauses_parsing():
    server = SmtpServer("mx.test")
    server.receive_data(b"EHLO c\r\nNOOP\r\n")
    event = server.next_event()
    assert isinstance(event, smtp.Hello)
    assert server.next_event() is smtp.PAUSED
    server.respond(server.hello_reply(event))
    assert server.next_event() is smtp.NEED_DATA
    assert server.data_to_send().endswith(b"250 2.0.0 OK\r\n")


def test_eof_closes():
    d = Driver()
    d.feed(b"EHLO c\r\n")
    d.feed(b"")
    assert isinstance(d.events[-1], smtp.Closed)
    assert d.events[-1].reason == "eof"


# --- property tests -------------------------------------------------------------

LIMITS = ProtocolLimits(max_message_size=4096, max_recipients=5, max_strikes=4, max_commands=60)

smtp_words = st.sampled_from([
    b"EHLO c.test\r\n", b"HELO c\r\n", b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<u@example.test>\r\n",
    b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n", b"STARTTLS\r\n", b".\r\n", b"..\r\n", b"\r\n", b"\n",
    b"\r", b"\x00", b"\xff", b"x" * 600, b"y" * 1200, b"QUIT\r\n", b"MAIL FROM:<> SIZE=99999\r\n",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(smtp_words, st.binary(max_size=300)), max_size=40),
       st.lists(st.integers(min_value=1, max_value=700), max_size=10))
def test_random_streams_never_raise_and_stay_bounded(pieces, cuts):
    d = Driver(LIMITS, tls=True)
    stream = b"".join(pieces)
    position = 0
    for cut in cuts + [len(stream)]:
        chunk, stream = stream[:cut], stream[cut:]
        position += len(chunk)
        d.server.receive_data(chunk)
        d.pump()
        if d.server.state is State.TLS_HANDSHAKE:
            d.server.tls_started()
        assert len(d.server._in) <= max(len(chunk) + 1200, 2000)
        assert d.server.recipients <= LIMITS.max_recipients
        assert d.server.strikes <= LIMITS.max_strikes
        assert d.server.commands <= LIMITS.max_commands + 1
        if d.server.state is State.CLOSED:
            break
    assert len(d.content) <= LIMITS.max_message_size + 1000


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=200).filter(lambda b: b"\r" not in b and b"\n" not in b),
                max_size=20),
       st.integers(min_value=1, max_value=50))
def test_any_clean_body_round_trips_in_any_split(lines, step):
    body = b"".join(("." + line.decode("latin-1")).encode("latin-1") + b"\r\n"
                    if line.startswith(b".") else line + b"\r\n" for line in lines)
    d = Driver()
    d.feed(TRANSACTION)
    wire = body + b".\r\n"
    for i in range(0, len(wire), step):
        d.feed(wire[i:i + step])
    assert len(d.of(smtp.DataEnd)) == 1
    assert bytes(d.content) == body


@pytest.mark.parametrize("path, normal", [
    ("alice@Example.TEST.", "alice@example.test"),
    ('"alice"@example.test', "alice@example.test"),
    ('"al\\ice"@example.test', "alice@example.test"),
    ("Alice@example.test", "Alice@example.test"),  # local parts keep their case
    ('"a b"@example.test', '"a b"@example.test'),
])
def test_recipients_take_one_normal_form(path, normal):
    assert commands.parse_rcpt(f"TO:<{path}>", "example.test").address == normal


@pytest.mark.parametrize("path", ["u%evil.example@example.test", '"u@evil.example"@example.test',
                                  "evil.example!u@example.test", "@relay.example:u@example.test"])
def test_routing_in_a_recipient_is_a_550_strike(path):
    d = Driver()
    out = d.feed(f"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<{path}>\r\n".encode())
    assert d.codes(out)[-1] == 550 and b"5.1.3" in out
    assert [v.label for v in d.of(smtp.Violation)] == ["ADDRESS_ROUTING"]
    assert not d.of(smtp.Rcpt)
