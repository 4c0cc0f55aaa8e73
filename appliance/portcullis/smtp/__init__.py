"""The sans-IO SMTP core: events (events.py), state tables (state.py), framing
(framing.py), command syntax (commands.py), replies, and the server that ties them."""

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
from .server import ProtocolLimits, SmtpServer
from .state import State

__all__ = [
    "NEEDS_REPLY", "NEED_DATA", "PAUSED", "Closed", "DataBegin", "DataChunk", "DataEnd",
    "Hello", "Mail", "MessageRefused", "ProtocolLimits", "Rcpt", "Reset", "SmtpServer",
    "StartTls", "State", "TlsEstablished", "Violation",
]
