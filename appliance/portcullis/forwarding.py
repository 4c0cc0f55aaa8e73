"""Who the client is, as the backend learns it: XCLIENT or XFORWARD, and the Received
header the gate prepends to every message (RFC 5321 4.4). Sans-IO: facts in, command
lines and header bytes out; upstream.py sends them.

XCLIENT (Postfix, Exim, Haraka) replaces the backend's idea of its client, so its
access rules judge the real client; XFORWARD (Postfix) changes only its logging. The
gate sends one or the other before every MAIL, with every attribute it has, and
[UNAVAILABLE] for those it lacks: a pooled backend connection carries many clients'
messages, and each message restates its own client, so nothing of an earlier client
outlives its message. Neither extension has a TLS attribute in Postfix 3.7, so the TLS
version and cipher travel in the Received header only.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

from .addresses import canonical

UNAVAILABLE = "[UNAVAILABLE]"
MAX_VALUE = 255  # octets of an attribute value, as Postfix accepts (the READMEs' note 1)
MAX_COMMAND = 512  # octets of a command line with its CRLF (RFC 5321 4.5.3.1.4)
MAX_HEADER_LINE = 78  # RFC 5322 2.1.1: fold at this length where possible
_XTEXT_SPECIAL = frozenset(" +=")  # printable ASCII that xtext encodes
_NEUTERED = set(' <>()\\";@')  # as Postfix's NEUTER_CHARACTERS: would break the header


@dataclass(frozen=True, slots=True)
class ClientFacts:
    address: str  # the client's IP address, as the socket gave it
    port: int
    helo: str
    esmtp: bool  # greeted with EHLO
    tls: str = ""  # "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384" when TLS was used
    name: str = ""  # the verified (forward-confirmed) reverse name; "" when unknown


def xtext(value: str) -> str:
    """RFC 3461 4: "+", "=" and octets outside "!".."~" become "+" and two hex digits."""
    if value.isascii() and value.isprintable() and _XTEXT_SPECIAL.isdisjoint(value):
        return value  # the usual case: nothing to encode
    return "".join(chr(octet) if 33 <= octet <= 126 and octet not in b"+=" else f"+{octet:02X}"
                   for octet in value.encode("utf-8"))


def attributes(client: ClientFacts) -> dict[str, str]:
    """NAME, ADDR, PORT, PROTO and HELO, xtext-encoded. A value longer than Postfix
    takes goes as [UNAVAILABLE]: cut short, a name would be a wrong name."""
    address = canonical(client.address)
    values = {
        "NAME": client.name or UNAVAILABLE,
        "ADDR": f"IPV6:{address.compressed}" if address.version == 6 else str(address),
        "PORT": str(client.port),
        "PROTO": "ESMTP" if client.esmtp else "SMTP",
        "HELO": client.helo or UNAVAILABLE,
    }
    encoded = {name: xtext(value) for name, value in values.items()}
    return {name: value if len(value) <= MAX_VALUE else UNAVAILABLE
            for name, value in encoded.items()}


def choose(mode: str, extensions: dict[str, str]) -> str | None:
    """XCLIENT or XFORWARD, whichever `mode` (backend.forward_client) asks for and the
    backend offers with an ADDR attribute (`extensions`: EHLO keyword -> parameters);
    None to tell the backend nothing. Postfix offers each only to the hosts its
    smtpd_authorized_*_hosts allow, so offered means allowed."""
    for verb in ("XCLIENT", "XFORWARD"):
        if mode in ("auto", verb.lower()) and "ADDR" in extensions.get(verb, "").split():
            return verb
    return None


def commands(verb: str, offered: str, client: ClientFacts) -> tuple[str, ...]:
    """The XCLIENT or XFORWARD lines (without CRLF) that state `client`, with the
    attributes the backend offered, split so that no line exceeds MAX_COMMAND."""
    names = offered.upper().split()
    lines = [verb]
    for name, value in attributes(client).items():
        if name not in names:
            continue
        word = f" {name}={value}"
        if len(lines[-1]) + len(word) + 2 > MAX_COMMAND:
            lines.append(verb)
        lines[-1] += word
    return tuple(line for line in lines if line != verb)


def _neutered(text: str) -> str:
    if text.isascii() and text.isprintable() and _NEUTERED.isdisjoint(text):
        return text  # the usual case: nothing to neuter
    return "".join("?" if c in _NEUTERED or not "!" <= c <= "~" else c for c in text)


def received_header(client: ClientFacts, hostname: str, session_id: str,
                    when: datetime | None = None) -> bytes:
    """The trace header, its clauses folded onto lines of at most MAX_HEADER_LINE
    octets where they fit (a clause too long for a line is folded between its words):

        Received: from HELO (NAME [ADDR])
        \t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)
        \tby HOSTNAME (Portcullis) with ESMTPS id SESSION_ID;
        \tTue, 01 Dec 2026 10:00:00 +0000

    Without a verified name the TCP-info is the address literal alone, as RFC 5321
    4.4 has it. Every line starts with "Received:" or a tab, never with a dot."""
    literal = _address_literal(client.address)
    tcp_info = f"({_neutered(client.name)} {literal})" if client.name else f"({literal})"
    protocol = "ESMTPS" if client.tls else "ESMTP" if client.esmtp else "SMTP"
    clauses = [f"from {_neutered(client.helo) or 'unknown'} {tcp_info}"]
    if client.tls:
        clauses.append(f"(using {client.tls})")
    clauses += [f"by {hostname} (Portcullis)",
                f"with {protocol}" + (f" id {session_id};" if session_id else ";"),
                format_datetime(when) if when else _date_of(int(time.time()))]
    lines = ["Received:"]
    for clause in clauses:
        for unit in [clause] if len(clause) < MAX_HEADER_LINE else clause.split(" "):
            if len(lines[-1]) + 1 + len(unit) > MAX_HEADER_LINE:
                lines.append("\t" + unit)
            else:
                lines[-1] += " " + unit
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


@functools.lru_cache(maxsize=2)
def _date_of(second: int) -> str:
    """The RFC 5322 date of a Unix second in local time, remembered: many messages a second."""
    return format_datetime(datetime.fromtimestamp(second).astimezone())


@functools.lru_cache(maxsize=4096)
def _address_literal(address: str) -> str:
    """[192.0.2.1] or [IPv6:2001:db8::1], as RFC 5321 4.1.3 writes an address."""
    ip = canonical(address)
    return f"[IPv6:{ip.compressed}]" if ip.version == 6 else f"[{ip}]"
