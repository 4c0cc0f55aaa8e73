"""Parsing of SMTP command arguments (RFC 5321 section 4.1), pure functions.

Each parser returns a value or raises SyntaxProblem with the reply to give.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from . import replies
from .replies import Reply

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class SyntaxProblem(Exception):
    def __init__(self, reply: Reply, label: str = "SYNTAX"):
        super().__init__(str(reply))
        self.reply = reply
        self.label = label  # for the log and the metrics


@dataclass(slots=True)
class MailFrom:
    address: str  # "" for the null sender <>
    size: int | None = None
    body: str | None = None


@dataclass(slots=True)
class RcptTo:
    address: str
    params: dict[str, str] = field(default_factory=dict)


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_STRING = rf"{_ATOM}(?:\.{_ATOM})*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*\.?"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_MAILBOX = re.compile(rf"(?P<local>{_DOT_STRING}|{_QUOTED})@(?P<domain>{_DOMAIN}|{_LITERAL})")
_QUOTED_PAIR = re.compile(r"\\(.)")
_SOURCE_ROUTE = re.compile(rf"@{_DOMAIN}(?:,@{_DOMAIN})*:")
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_HELO_NAME = re.compile(rf"(?:{_DOMAIN}|{_LITERAL})")

BAD_ADDRESS = Reply(501, "5.1.3", "Bad address syntax")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_HELO = Reply(501, "5.5.4", "Syntax: EHLO hostname")
BAD_SIZE = Reply(501, "5.5.4", "Bad SIZE parameter")
BAD_BODY = Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
ROUTED_ADDRESS = Reply(550, "5.1.3", "Routing in the recipient address is not accepted")


def split_command(line: str) -> tuple[str, str]:
    """Split "VERB argument" into an upper-case verb and the raw argument."""
    verb, _, argument = line.partition(" ")
    return verb.upper(), argument.strip(" ")


def parse_helo(argument: str) -> str:
    """The HELO/EHLO name. Syntax is checked loosely here; policy judges it."""
    name = argument.split(" ", 1)[0]
    if not name or len(name) > MAX_DOMAIN:
        raise SyntaxProblem(BAD_HELO)
    return name


def valid_helo_syntax(name: str) -> bool:
    return _HELO_NAME.fullmatch(name) is not None


def _split_path(argument: str, keyword: str, bad: Reply) -> tuple[str, list[str]]:
    """Split "FROM:<path> params" into the path text and the parameter words."""
    head, colon, rest = argument.partition(":")
    if not colon or head.strip().upper() != keyword:
        raise SyntaxProblem(Reply(501, "5.5.4", f"Syntax: {'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}:<address>"))
    rest = rest.lstrip(" ")
    if not rest.startswith("<"):
        raise SyntaxProblem(bad)
    end = rest.find(">")
    if end < 0:
        raise SyntaxProblem(bad)
    return rest[1:end], rest[end + 1 :].split()


def _mailbox(path: str, bad: Reply) -> tuple[str, bool]:
    """The mailbox in its one normal form, and whether the path carried routing.

    Normal form: the domain lower-cased and without a trailing dot; the local part as
    sent (RFC 5321 lets it be case-sensitive; directories compare it without case).
    Routing is a source route (@relay:user@domain), or a local part that a backend
    may route onward: the percent hack (user%elsewhere), a bang path (elsewhere!user)
    or a quoted "@".
    """
    if len(path) > MAX_PATH:
        raise SyntaxProblem(bad)
    route = _SOURCE_ROUTE.match(path)
    if route:
        path = path[route.end():]
    match = _MAILBOX.fullmatch(path)
    if not match or len(match["local"]) > MAX_LOCAL_PART or len(match["domain"]) > MAX_DOMAIN:
        raise SyntaxProblem(bad)
    local = match["local"]
    routed = route is not None or any(c in local for c in "%!@")
    if local.startswith('"'):  # "user" is user: unquote what needs no quotes
        unquoted = _QUOTED_PAIR.sub(r"\1", local[1:-1])
        if re.fullmatch(_DOT_STRING, unquoted):
            local = unquoted
    return f"{local}@{match['domain'].lower().rstrip('.')}", routed


def _params(words: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for word in words:
        key, eq, value = word.partition("=")
        if not _ESMTP_KEYWORD.fullmatch(key) or (eq and not _ESMTP_VALUE.fullmatch(value)):
            raise SyntaxProblem(replies.SYNTAX)
        params[key.upper()] = value
    return params


def parse_mail(argument: str) -> MailFrom:
    path, words = _split_path(argument, "FROM", BAD_SENDER)
    address = "" if path == "" else _mailbox(path, BAD_SENDER)[0]
    mail = MailFrom(address)
    for key, value in _params(words).items():
        if key == "SIZE":
            if not value.isdigit() or len(value) > 20:
                raise SyntaxProblem(BAD_SIZE)
            mail.size = int(value)
        elif key == "BODY":
            if value.upper() not in ("7BIT", "8BITMIME"):
                raise SyntaxProblem(BAD_BODY)
            mail.body = value.upper()
        else:
            raise SyntaxProblem(replies.UNKNOWN_PARAMETER)
    return mail


def parse_rcpt(argument: str, postmaster_domain: str) -> RcptTo:
    path, words = _split_path(argument, "TO", BAD_ADDRESS)
    if path.lower() == "postmaster":  # RFC 5321 4.5.1: must be accepted without a domain
        address = f"postmaster@{postmaster_domain}"
    else:
        address, routed = _mailbox(path, BAD_ADDRESS)
        if routed:  # never forwarded: a backend could relay it onward (open relay)
            raise SyntaxProblem(ROUTED_ADDRESS, "ADDRESS_ROUTING")
    params = _params(words)
    if params:  # we advertise no RCPT parameters (no DSN)
        raise SyntaxProblem(replies.UNKNOWN_PARAMETER)
    return RcptTo(address, params)


def domain_of(address: str) -> str:
    """The domain of a normalised address (see _mailbox)."""
    return address.rpartition("@")[2]
