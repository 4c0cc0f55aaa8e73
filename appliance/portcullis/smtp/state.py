"""The sans-IO SMTP server: bytes in, events out, replies back.

Everything that affects the state machine and its transitions lives in this file.
The session feeds received bytes with `receive_data`, pulls events with
`next_event`, answers the events that need a decision with `respond`, and writes
whatever `data_to_send` returns. No sockets, no clocks, no policy.

Framing limits are hard: a command line is at most 512 octets and a text line in
DATA at most 1000 (RFC 5321 4.5.3.1), and input that breaks them is refused, never
silently chopped. Memory use is bounded by those limits whatever the peer sends.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from . import commands, replies
from .commands import SyntaxProblem
from .replies import Reply


class State(enum.Enum):
    CONNECTED = "connected"  # banner sent, no HELO yet
    GREETED = "greeted"  # HELO/EHLO accepted, no transaction
    MAIL = "mail"  # sender accepted
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # receiving message content
    TLS_HANDSHAKE = "tls"  # 220 sent for STARTTLS, waiting for the handshake
    CLOSED = "closed"


# --- events -------------------------------------------------------------------

@dataclass(slots=True)
class Hello:
    name: str
    extended: bool


@dataclass(slots=True)
class Mail:
    sender: commands.MailFrom


@dataclass(slots=True)
class Rcpt:
    recipient: commands.RcptTo


@dataclass(slots=True)
class DataBegin:
    pass


@dataclass(slots=True)
class DataChunk:
    """Message content as it came off the wire: dot-stuffed, CRLF line endings."""

    data: bytes


@dataclass(slots=True)
class DataEnd:
    """The message ended well; answer with the backend's reply."""


@dataclass(slots=True)
class MessageRefused:
    """The message broke a limit (LINE_TOO_LONG, SIZE); the core queued `reply`."""

    label: str
    reply: Reply


@dataclass(slots=True)
class StartTls:
    pass


@dataclass(slots=True)
class Reset:
    """The transaction was dropped (RSET, or a new HELO/EHLO)."""


@dataclass(slots=True)
class TlsEstablished:
    """The handshake after STARTTLS completed (reported by the session)."""


@dataclass(slots=True)
class Violation:
    """The client broke a rule; the core queued `reply`. Closes when `reply` is 421/521."""

    label: str
    reply: Reply


@dataclass(slots=True)
class Closed:
    """The session is over: QUIT answered, EOF, or a closing violation."""

    reason: str


class _Sentinel(enum.Enum):
    NEED_DATA = "need data"  # feed more bytes
    PAUSED = "paused"  # answer the pending event first


NEED_DATA = _Sentinel.NEED_DATA
PAUSED = _Sentinel.PAUSED

# Events the session must answer with respond(); the core answers all others.
NEEDS_REPLY = (Hello, Mail, Rcpt, DataBegin, DataEnd, StartTls)

# --- the transition table ---------------------------------------------------
# (state, event type) -> state after a positive (2xx/3xx) reply.
# A negative reply leaves the state as it was.
TRANSITIONS: dict[tuple[State, type], State] = {
    (State.CONNECTED, Hello): State.GREETED,
    (State.GREETED, Hello): State.GREETED,
    (State.GREETED, Mail): State.MAIL,
    (State.MAIL, Rcpt): State.RCPT,
    (State.RCPT, Rcpt): State.RCPT,
    (State.RCPT, DataBegin): State.DATA,
    (State.CONNECTED, StartTls): State.TLS_HANDSHAKE,
    (State.GREETED, StartTls): State.TLS_HANDSHAKE,
    (State.TLS_HANDSHAKE, TlsEstablished): State.CONNECTED,
}
# Transitions taken whatever the reply: the transaction ends either way.
AFTER_ANY_REPLY: dict[tuple[State, type], State] = {
    (State.MAIL, Hello): State.GREETED,  # HELO/EHLO implies RSET (RFC 5321 4.1.4)
    (State.RCPT, Hello): State.GREETED,
    (State.MAIL, Reset): State.GREETED,
    (State.RCPT, Reset): State.GREETED,
    (State.DATA, DataEnd): State.GREETED,
    (State.DATA, MessageRefused): State.GREETED,
    **{(state, Closed): State.CLOSED for state in State},
}

# Where each command is allowed, and the reply when it is not.
_IN_SESSION = {State.CONNECTED, State.GREETED, State.MAIL, State.RCPT}
ALLOWED: dict[str, tuple[set[State], Reply]] = {
    "HELO": (_IN_SESSION, replies.BAD_SEQUENCE),
    "EHLO": (_IN_SESSION, replies.BAD_SEQUENCE),
    "MAIL": ({State.GREETED}, replies.NEED_HELO),
    "RCPT": ({State.MAIL, State.RCPT}, replies.NEED_MAIL),
    "DATA": ({State.RCPT}, replies.NEED_RCPT),
    "STARTTLS": ({State.CONNECTED, State.GREETED}, replies.BAD_SEQUENCE),
    "RSET": (_IN_SESSION, replies.BAD_SEQUENCE),
    "NOOP": (_IN_SESSION, replies.BAD_SEQUENCE),
    "HELP": (_IN_SESSION, replies.BAD_SEQUENCE),
    "VRFY": (_IN_SESSION, replies.BAD_SEQUENCE),
    "EXPN": (_IN_SESSION, replies.BAD_SEQUENCE),
    "QUIT": (_IN_SESSION, replies.BAD_SEQUENCE),
}


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
        self._discarding_line = False  # skipping the rest of an overlong command line
        self._data_problem: str | None = None
        self._data_size = 0
        self._data_line_start = True  # the next DATA byte starts a line
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
        self._out += reply.encode()
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

    # --- commands -----------------------------------------------------------------

    def _transition(self, event: object, reply: Reply) -> None:
        key = (self.state, type(event))
        if key in AFTER_ANY_REPLY:
            self._enter(AFTER_ANY_REPLY[key])
        elif reply.is_positive and key in TRANSITIONS:
            self._enter(TRANSITIONS[key])

    def _enter(self, state: State) -> None:
        if state in (State.GREETED, State.CONNECTED):
            self.recipients = 0
            self.rejected_recipients = 0
        if state is State.DATA:
            self._data_problem = None
            self._data_size = 0
            self._data_line_start = True
        self.state = state

    def _next_command_event(self):
        while True:
            line = self._take_command_line()
            if line is None:
                return NEED_DATA
            if isinstance(line, Violation):
                return line
            event = self._command(line)
            if event is not None:
                return event

    def _take_command_line(self):
        buf = self._in
        limit = self.limits.max_command_line
        newline = buf.find(b"\n", 0, len(buf) if self._discarding_line else limit)
        if self._discarding_line:
            if newline < 0:
                buf.clear()
                return None
            del buf[: newline + 1]
            self._discarding_line = False
            return self._take_command_line()
        if newline < 0:
            if len(buf) < limit:
                return None
            rest = buf.find(b"\n", limit)
            if rest < 0:
                self._discarding_line = True  # its end has not arrived yet
                buf.clear()
            else:
                del buf[: rest + 1]
            return self._strike("LINE_TOO_LONG", replies.LINE_TOO_LONG)
        raw = bytes(buf[:newline])
        del buf[: newline + 1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw.isascii() or b"\0" in raw or b"\r" in raw:
            return self._strike("BAD_BYTES", replies.BAD_BYTES)
        self.commands += 1
        if self.commands > self.limits.max_commands:
            return self._close("TOO_MANY_COMMANDS", replies.TOO_MANY_COMMANDS)
        return raw.decode("ascii")

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
            return self._strike("SYNTAX", problem.reply)

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
        """Validate complete lines and pass them on as one chunk, up to the final dot."""
        buf = self._in
        limit = self.limits.max_text_line
        start = 0
        end_of_message = False
        problem = self._data_problem
        size = self._data_size
        while True:
            newline = buf.find(b"\n", start)
            if newline < 0:
                if len(buf) - start > limit:
                    # An unfinished line this long can never become valid: drop it,
                    # but keep a trailing CR, which may pair with the next LF.
                    problem = problem or "LINE_TOO_LONG"
                    start = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
                    self._data_line_start = False
                break
            line_start = self._data_line_start
            self._data_line_start = True
            if newline == start or buf[newline - 1] != 13 or buf.find(b"\r", start, newline - 1) >= 0:
                buf.clear()
                return self._close("BARE_LF", _CLOSING_BARE_LINE_ENDING)
            length = newline + 1 - start
            if line_start and length == 3 and buf[start] == 46:  # ".\r\n"
                end_of_message = True
                break
            if length > limit or not line_start:
                problem = problem or "LINE_TOO_LONG"
            size += length - 1 if line_start and buf[start] == 46 else length  # unstuffed
            if size > self.limits.max_message_size:
                problem = problem or "SIZE"
            start = newline + 1
        self._data_size = size
        self._data_problem = problem
        if problem is None and start:
            chunk = bytes(buf[:start])
            del buf[:start]  # a final dot stays in the buffer for the next call
            return DataChunk(chunk)
        if not end_of_message:
            del buf[:start]
            return NEED_DATA
        del buf[: start + 3]
        if problem is None:
            return DataEnd()
        reply = replies.SIZE_EXCEEDED if problem == "SIZE" else replies.DATA_LINE_TOO_LONG
        self._queue(reply)
        refused = MessageRefused(problem, reply)
        self._transition(refused, reply)
        return refused
