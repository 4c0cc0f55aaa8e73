"""SMTP replies: a code, an RFC 3463 enhanced status code, and text."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str = ""
    text: str = ""
    _wire: bytes = field(default=b"", init=False, repr=False, compare=False)

    @property
    def wire(self) -> bytes:
        """encode(), worked out once: most replies are constants sent many times."""
        if not self._wire:
            object.__setattr__(self, "_wire", self.encode())
        return self._wire

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    def lines(self) -> list[str]:
        return self.text.split("\n") if self.text else [""]

    def encode(self, enhanced: bool = True) -> bytes:
        prefix = f"{self.enhanced} " if enhanced and self.enhanced else ""
        lines = self.lines()
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}".rstrip(" ") + "\r\n")
        return "".join(out).encode("ascii", "replace")

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ").strip()


def banner(hostname: str) -> Reply:
    """The greeting: the gate sends it, a session started on its own sends it itself."""
    return Reply(220, "", f"{hostname} ESMTP")


def timed_out(hostname: str) -> Reply:
    """To a client silent for the command timeout, from the gate or a session."""
    return Reply(421, "4.4.2", f"{hostname} Timeout, closing connection")


# Replies the protocol core gives by itself. The session builds the rest.
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
RESET_OK = Reply(250, "2.0.0", "Reset")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "Bye")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
CANNOT_VRFY = Reply(252, "2.1.5", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "See RFC 5321")

LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BAD_BYTES = Reply(500, "5.5.2", "Command contains invalid characters")
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command unrecognized")
SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed limit")
DATA_LINE_TOO_LONG = Reply(550, "5.6.0", "Message has a line longer than 1000 octets")
BARE_LINE_ENDING = Reply(550, "5.6.0", "Message contains a bare CR or LF; use CRLF")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_COMMANDS = Reply(421, "4.7.0", "Too many commands, closing connection")
