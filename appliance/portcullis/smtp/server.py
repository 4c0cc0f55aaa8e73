"""The sans-IO SMTP server: bytes in, events out, replies back.

The session feeds received bytes with `receive_data`, pulls events with `next_event`,
answers the events that need a decision with `respond`, and writes whatever
`data_to_send` returns. No sockets, no clocks, no policy. Framing is in framing.py,
the state tables in state.py, command syntax in commands.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import commands, replies
from .commands import SyntaxProblem
from .events import (
    NEED_DATA,
    NEEDS_REPLY,
    PAUSED,
    Closed,
    DataBegin,
    DataChunk,
    DataEnd,
    Hello,
    Mail,
    MessageRefused,
    Rcpt,
    Reset,
    StartTls,
    TlsEstablished,
    Violation,
)
from .framing import CommandLines, MessageEnd, MessageLines, Problem
from .replies import Reply
from .state import ALLOWED, State, next_state


@dataclass(frozen=True, slots=True)
class ProtocolLimits:
    max_command_line: int = 512  # octets including CRLF, RFC 5321 4.5.3.1.4
    max_text_line: int = 1000  # octets including CRLF, RFC 5321 4.5.3.1.6
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_strikes: int = 5
    max_commands: int = 2000


_CLOSING_BARE_LINE_ENDING = Reply(521, "5.5.2", "Bare CR or LF in message content; closing")


class SmtpServer:
    def __init__(
        self,
        hostname: str,
        limits: ProtocolLimits = ProtocolLimits(),
        *,
        tls_available: bool = False,
        postmaster_domain: str | None = None,
    ):
        self.hostname = hostname
        self.limits = limits
        self.tls_available = tls_available
        self.tls_active = False
        self.postmaster_domain = postmaster_domain or hostname
        self.state = State.CONNECTED
        self.strikes = 0
        self.commands = 0
        self.recipients = 0  # accepted in the current transaction
        self.rejected_recipients = 0  # refused in the current transaction
        self._in = bytearray()
        self._out = bytearray()
        self._eof = False
        self._pending: object | None = None  # event awaiting respond()
        self._command_lines = CommandLines(limits.max_command_line)
        self._message_lines = MessageLines(limits.max_text_line, limits.max_message_size)
        self._reserved = 0  # octets the application adds to the next message
        self._closing = False
        self.last_reply: Reply | None = None

    # --- input and output -----------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; b"" means the peer closed its side."""
        if data:
            self._in += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def send(self, reply: Reply) -> None:
        """Queue a reply that is not an answer to an event (the banner, a timeout)."""
        self._queue(reply)

    def _queue(self, reply: Reply) -> None:
        self._out += reply.wire
        self.last_reply = reply

    @property
    def pending(self) -> object | None:
        return self._pending

    # --- events ---------------------------------------------------------------

    def next_event(self):
        if self.state is State.CLOSED:
            return Closed("closed")
        if self._pending is not None:
            return PAUSED
        if self._closing:
            return self._closed("protocol")
        if self.state is State.DATA:
            event = self._next_data_event()
        elif self.state is State.TLS_HANDSHAKE:
            return NEED_DATA
        else:
            event = self._next_command_event()
        if event is NEED_DATA and self._eof:
            return self._closed("eof")
        if isinstance(event, NEEDS_REPLY):
            self._pending = event
        return event

    def respond(self, reply: Reply) -> None:
        """Answer the pending event and take the transition the table gives."""
        event = self._pending
        if event is None:
            raise RuntimeError("respond() called with no event pending")
        self._pending = None
        self._queue(reply)
        self._transition(event, reply)
        if isinstance(event, Rcpt):
            if reply.is_positive:
                self.recipients += 1
            else:
                self.rejected_recipients += 1
        if reply.code in (421, 521):
            self._closing = True
        if isinstance(event, StartTls) and reply.is_positive:
            self._in.clear()  # bytes pipelined after STARTTLS are discarded (CVE-2011-0411)

    def close_with(self, reply: Reply) -> None:
        """End the session from the application's side (a timeout, a ban) after `reply`."""
        self._pending = None
        self._queue(reply)
        self._closing = True

    def reserve(self, octets: int) -> None:
        """Count `octets` the application adds to the transaction's message (a trace
        header) toward max_message_size, as if the client had sent them."""
        self._reserved = octets

    def hello_reply(self, event: Hello) -> Reply:
        """The positive answer to HELO, or to EHLO with the extensions we offer."""
        if not event.extended:
            return Reply(250, "", self.hostname)
        lines = [
            self.hostname,
            "PIPELINING",
            f"SIZE {self.limits.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]
        if self.tls_available and not self.tls_active:
            lines.append("STARTTLS")
        return Reply(250, "", "\n".join(lines))

    def tls_started(self) -> None:
        """The TLS handshake completed: forget everything said before it (RFC 3207 4.2)."""
        if self.state is not State.TLS_HANDSHAKE:
            raise RuntimeError("tls_started() outside a STARTTLS handshake")
        self.tls_active = True
        self._in.clear()
        self._transition(TlsEstablished(), replies.OK)

    def _transition(self, event: object, reply: Reply) -> None:
        state = next_state(self.state, event, reply)
        if state is self.state:
            return
        if state in (State.GREETED, State.CONNECTED):
            self.recipients = 0
            self.rejected_recipients = 0
        if state is State.DATA:
            self._message_lines.start(self._reserved)
        self.state = state

    # --- commands -----------------------------------------------------------------

    def _next_command_event(self):
        while True:
            line = self._command_lines.next_line(self._in)
            if line is None:
                return NEED_DATA
            if line is Problem.LINE_TOO_LONG:
                return self._strike(line.value, replies.LINE_TOO_LONG)
            if line is Problem.BAD_BYTES:
                return self._strike(line.value, replies.BAD_BYTES)
            self.commands += 1
            if self.commands > self.limits.max_commands:
                return self._close("TOO_MANY_COMMANDS", replies.TOO_MANY_COMMANDS)
            event = self._command(line)
            if event is not None:
                return event

    def _command(self, line: str):
        verb, argument = commands.split_command(line)
        allowed = ALLOWED.get(verb)
        if allowed is None:
            return self._strike("UNKNOWN_COMMAND", replies.UNKNOWN_COMMAND)
        states, refusal = allowed
        if self.state not in states:
            if verb == "DATA" and self.state is State.MAIL and self.rejected_recipients:
                refusal = replies.NO_VALID_RECIPIENTS
            elif verb == "STARTTLS" and self.tls_active:
                refusal = replies.TLS_ALREADY
            elif verb == "MAIL" and self.state in (State.MAIL, State.RCPT):
                refusal = replies.NESTED_MAIL
            return self._strike("BAD_SEQUENCE", refusal)
        try:
            return getattr(self, "_cmd_" + verb.lower())(argument)
        except SyntaxProblem as problem:
            return self._strike(problem.label, problem.reply)

    def _cmd_helo(self, argument: str, extended: bool = False):
        return Hello(commands.parse_helo(argument), extended)

    def _cmd_ehlo(self, argument: str):
        return self._cmd_helo(argument, extended=True)

    def _cmd_mail(self, argument: str):
        mail = commands.parse_mail(argument)
        if mail.size is not None and mail.size > self.limits.max_message_size:
            self._queue(replies.SIZE_EXCEEDED)
            return Violation("SIZE", replies.SIZE_EXCEEDED)
        return Mail(mail)

    def _cmd_rcpt(self, argument: str):
        rcpt = commands.parse_rcpt(argument, self.postmaster_domain)
        if self.recipients >= self.limits.max_recipients:
            self._queue(replies.TOO_MANY_RECIPIENTS)
            return Violation("TOO_MANY_RECIPIENTS", replies.TOO_MANY_RECIPIENTS)
        return Rcpt(rcpt)

    def _cmd_data(self, argument: str):
        if argument:
            raise SyntaxProblem(replies.SYNTAX)
        return DataBegin()

    def _cmd_starttls(self, argument: str):
        if argument:
            raise SyntaxProblem(replies.SYNTAX)
        if not self.tls_available:
            self._queue(replies.TLS_UNAVAILABLE)
            return None
        return StartTls()

    def _cmd_rset(self, argument: str):
        self._queue(replies.RESET_OK)
        if self.state in (State.MAIL, State.RCPT):
            self._transition(Reset(), replies.RESET_OK)
            return Reset()
        return None

    def _cmd_noop(self, argument: str):
        self._queue(replies.OK)

    def _cmd_help(self, argument: str):
        self._queue(replies.HELP)

    def _cmd_vrfy(self, argument: str):
        self._queue(replies.CANNOT_VRFY)  # reveals nothing

    def _cmd_expn(self, argument: str):
        self._queue(replies.NOT_IMPLEMENTED)

    def _cmd_quit(self, argument: str):
        self._queue(replies.BYE)
        return self._closed("quit")

    def _closed(self, reason: str) -> Closed:
        closed = Closed(reason)
        self._transition(closed, replies.OK)
        return closed

    def _strike(self, label: str, reply: Reply) -> Violation:
        self.strikes += 1
        if self.strikes >= self.limits.max_strikes:
            return self._close(label, replies.TOO_MANY_ERRORS)
        self._queue(reply)
        return Violation(label, reply)

    def _close(self, label: str, reply: Reply) -> Violation:
        self._queue(reply)
        self._closing = True
        return Violation(label, reply)

    # --- message content --------------------------------------------------------

    def _next_data_event(self):
        result = self._message_lines.next_chunk(self._in)
        if result is None:
            return NEED_DATA
        if isinstance(result, bytes):
            return DataChunk(result)
        if result is Problem.BARE_LF:
            return self._close("BARE_LF", _CLOSING_BARE_LINE_ENDING)
        assert isinstance(result, MessageEnd)
        if result.problem is None:
            return DataEnd()
        reply = (replies.SIZE_EXCEEDED if result.problem is Problem.SIZE
                 else replies.DATA_LINE_TOO_LONG)
        self._queue(reply)
        refused = MessageRefused(result.problem.value, reply)
        self._transition(refused, reply)
        return refused
