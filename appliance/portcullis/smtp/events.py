"""What the sans-IO SMTP core reports to the session, one event at a time."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from . import commands
from .replies import Reply


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
