"""HELO/EHLO name rules (RFC 5321 4.1.1.1 and 4.1.3). Pure: no DNS, no I/O.

The argument must be a domain name or an address literal, `[192.0.2.1]` or
`[IPv6:2001:db8::1]`. Labels are checked for RFC 1123 syntax, with two leniencies that
real servers need (as Postfix allows them): an underscore inside a label and one
trailing dot. A last label made only of digits is refused: no top-level domain is
numeric, and `999.1.1.1` is a malformed address rather than a name.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable

from ..addresses import IPAddress, canonical
from ..config import HeloChecks
from .findings import Action, Finding
from .score import Signal

_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
MAX_NAME_LENGTH = 253  # RFC 1035: 255 octets in wire form


def check_helo(name: str, client_ip: str, own_names: Iterable[str], own_addrs: Iterable[str],
               rules: HeloChecks) -> list[Finding]:
    """Findings for the HELO argument `name` of a client at `client_ip`.

    own_names and own_addrs are this gateway's host names and addresses: a remote
    client that claims one of them is forging. Mail from the gateway itself (its own
    or a loopback address) may of course use them.
    """
    findings: list[Finding] = []

    def found(rule: str, label: str, detail: str) -> None:
        action = Action.configured(getattr(rules, rule))
        if action is not None:
            findings.append(Finding(label, action, Signal.BAD_HELO, detail))

    client = canonical(client_ip)
    ours = {canonical(address) for address in own_addrs}
    client_is_us = client.is_loopback or client in ours

    if name.startswith("["):
        literal = parse_address_literal(name)
        if literal is None:
            found("syntax", "HELO_SYNTAX", f"'{name}' is not a valid address literal")
            return findings
        literal = canonical(literal)
        if literal != client and literal in ours and not client_is_us:
            found("ours", "HELO_OURS", f"'{name}' is this gateway's address")
        elif literal != client:
            found("literal_mismatch", "HELO_LITERAL_MISMATCH",
                  f"'{name}' is not the client address {client}")
        return findings

    bare = _ip_address(name)
    if bare is not None:
        found("bare_ip", "HELO_BARE_IP", f"'{name}' is an address without [brackets]")
        if canonical(name) in ours and not client_is_us:
            found("ours", "HELO_OURS", f"'{name}' is this gateway's address")
        return findings

    if not is_valid_domain(name):
        found("syntax", "HELO_SYNTAX", f"'{name}' is not a valid host name")
        return findings
    domain = name.rstrip(".").lower()
    if domain in {own.rstrip(".").lower() for own in own_names} and not client_is_us:
        found("ours", "HELO_OURS", f"'{name}' is this gateway's name")
    if "." not in domain:
        found("not_fqdn", "HELO_NOT_FQDN", f"'{name}' is not a fully qualified domain name")
    return findings


def is_valid_domain(name: str) -> bool:
    domain = name.removesuffix(".")
    if not domain or len(domain) > MAX_NAME_LENGTH:
        return False
    labels = domain.split(".")
    return all(_LABEL.match(label) for label in labels) and not labels[-1].isdigit()


def parse_address_literal(text: str) -> IPAddress | None:
    """The address in `[192.0.2.1]` or `[IPv6:2001:db8::1]`; None if it is not one."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        address = _ip_address(inner[5:])
        return address if isinstance(address, ipaddress.IPv6Address) else None
    address = _ip_address(inner)
    return address if isinstance(address, ipaddress.IPv4Address) else None


@functools.lru_cache(maxsize=4096)
def _ip_address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
