"""The SMTP state machine: its states and every transition, in tables.

Everything that affects the state machine and its transitions lives in this file, in
the manner of h11's _state.py. The server (server.py) looks transitions up here and
takes them; framing (framing.py) and command syntax (commands.py) live elsewhere.
"""

from __future__ import annotations

import enum

from . import replies
from .events import (
    Closed,
    DataBegin,
    DataEnd,
    Hello,
    Mail,
    MessageRefused,
    Rcpt,
    Reset,
    StartTls,
    TlsEstablished,
)
from .replies import Reply


class State(enum.Enum):
    CONNECTED = "connected"  # banner sent, no HELO yet
    GREETED = "greeted"  # HELO/EHLO accepted, no transaction
    MAIL = "mail"  # sender accepted
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # receiving message content
    TLS_HANDSHAKE = "tls"  # 220 sent for STARTTLS, waiting for the handshake
    CLOSED = "closed"

    # Members are singletons: hash by identity, in C, not by name in Python as Enum
    # does; every command looks its state up in the tables below.
    __hash__ = object.__hash__


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


def next_state(state: State, event: object, reply: Reply) -> State:
    """The state after `event` was answered with `reply`."""
    key = (state, type(event))
    if key in AFTER_ANY_REPLY:
        return AFTER_ANY_REPLY[key]
    if reply.is_positive and key in TRANSITIONS:
        return TRANSITIONS[key]
    return state
