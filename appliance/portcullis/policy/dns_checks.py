"""DNS checks on a connecting client, asynchronous and each bounded by its own timeout.

- FCrDNS: the PTR names of the client address, then the A (IPv4 client) or AAAA
  (IPv6 client) records of each name; it passes when one of them is the client address.
- DNS lists, as postscreen does them: every zone is queried once and in parallel; each
  site whose pattern matches a reply adds its weight to the client's rank (allowlists
  have negative weights); at `dnsbl.threshold` the configured action applies.
- HELO rules are in helo.py; `check_helo` is here too so that the session has one object.

What the DNS cannot tell never counts against the client: a timeout or a server
failure gives a neutral finding (DNS_TIMEOUT, DNS_ERROR) and no verdict. An allowlist
that does not answer is assumed to have listed the client, so a blocklist rank that
it might have offset does not reject.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import dns.reversename

from ..addresses import IPAddress, canonical
from ..config import DnsChecks, DnsListSite
from .findings import Action, Finding
from .helo import check_helo
from .score import Signal

MAX_PTR_NAMES = 5  # forward-checked names per client; more is a misconfiguration or abuse


class Unresolved(Exception):
    """The DNS did not say yes or no: `label` is DNS_TIMEOUT or DNS_ERROR."""

    def __init__(self, label: str, detail: str):
        super().__init__(detail)
        self.label = label
        self.detail = detail

    def finding(self, check: str) -> Finding:
        return Finding(self.label, Action.NONE, None, f"{check}: {self.detail}")


def make_resolver(settings: DnsChecks) -> dns.asyncresolver.Resolver:
    """A resolver on the configured nameservers (IP addresses, checked at load), or on
    those of /etc/resolv.conf."""
    if settings.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(server.host, server.port)
                                for server in settings.nameservers]
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.cache = dns.resolver.LRUCache(settings.cache_size) if settings.cache_size else None
    return resolver


@dataclass(frozen=True)
class ClientChecks:
    findings: list[Finding]
    name: str = ""  # the forward-confirmed reverse name, "" when there is none


async def _off(result):
    """What a check that is off finds, as an awaitable."""
    return result


class DnsChecker:
    """The client checks of one configuration. Reuse it for every connection."""

    def __init__(self, settings: DnsChecks, resolver: dns.asyncresolver.Resolver | None = None):
        self.settings = settings
        self.resolver = resolver or make_resolver(settings)
        self._fcrdns_action = Action.configured(settings.fcrdns.action)
        self._dnsbl_action = Action.configured(settings.dnsbl.action)
        self._zones = sorted({site.zone for site in settings.dnsbl.sites})

    async def check_client(self, client_ip: str) -> ClientChecks:
        """Run FCrDNS and the DNS lists concurrently: their findings, in that order, and
        the client's verified name."""
        address = canonical(client_ip)
        fcrdns = self.check_fcrdns(address) if self._fcrdns_action is not None else None
        dns_lists = (self.check_dns_lists(address)
                     if self._dnsbl_action is not None and self._zones else None)
        (name, fcrdns_findings), list_findings = await asyncio.gather(
            fcrdns or _off(("", [])), dns_lists or _off([]))
        return ClientChecks(fcrdns_findings + list_findings, name)

    def check_helo(self, helo: str, client_ip: str, own_names: Iterable[str],
                   own_addrs: Iterable[str]) -> list[Finding]:
        return check_helo(helo, client_ip, own_names, own_addrs, self.settings.helo)

    # --- forward-confirmed reverse DNS ---------------------------------------------

    async def check_fcrdns(self, address: IPAddress) -> tuple[str, list[Finding]]:
        """The PTR name that resolves back to the address ("" if none), and findings."""
        timeout = self.settings.fcrdns.timeout
        record = "A" if address.version == 4 else "AAAA"
        try:
            async with asyncio.timeout(timeout):
                reverse_name = dns.reversename.from_address(str(address))
                names = (await self._query(reverse_name, "PTR", timeout))[:MAX_PTR_NAMES]
                answers = await asyncio.gather(*(self._addresses(name, record, timeout)
                                                 for name in names))
        except TimeoutError:
            return "", [Unresolved("DNS_TIMEOUT",
                                   f"no answer within {timeout:g}s").finding("fcrdns")]
        except Unresolved as unresolved:
            return "", [unresolved.finding("fcrdns")]
        if not names:
            return "", self._fcrdns_fail(f"no PTR record for {address}")
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, list) and address in answer:
                return name.rstrip(".").lower(), []
        unresolved = [answer for answer in answers if isinstance(answer, Unresolved)]
        if unresolved:  # the name that would have confirmed it may be the one that failed
            return "", [unresolved[0].finding("fcrdns")]
        return "", self._fcrdns_fail(f"{', '.join(names)} (PTR of {address}) "
                                     f"do{'es' if len(names) == 1 else ''} not resolve back to it")

    def _fcrdns_fail(self, detail: str) -> list[Finding]:
        return [Finding("FCRDNS_FAIL", self._fcrdns_action, Signal.NO_REVERSE_DNS, detail)]

    # --- DNS lists --------------------------------------------------------------------

    async def check_dns_lists(self, address: IPAddress) -> list[Finding]:
        settings = self.settings.dnsbl
        prefix = reversed_labels(address)
        timeout = settings.timeout
        answers = await asyncio.gather(*(self._addresses(f"{prefix}.{zone}.", "A", timeout)
                                         for zone in self._zones))
        replies = dict(zip(self._zones, answers, strict=True))
        findings = [answer.finding(f"dnsbl {zone}") for zone, answer in replies.items()
                    if isinstance(answer, Unresolved)]
        listed: list[tuple[DnsListSite, ipaddress.IPv4Address]] = []
        silent_allowlists = 0  # the sum of the weights of allowlists that did not answer
        for site in settings.sites:
            answer = replies[site.zone]
            if isinstance(answer, Unresolved):
                silent_allowlists += min(site.weight, 0)
                continue
            match = next((reply for reply in answer if site.matches(reply)), None)
            if match is not None:
                listed.append((site, match))
        return findings + self._dns_list_verdict(listed, silent_allowlists)

    def _dns_list_verdict(self, listed, silent_allowlists: int) -> list[Finding]:
        threshold = self.settings.dnsbl.threshold
        rank = sum(site.weight for site, _ in listed)
        findings = []
        allowed = [_listing(site, reply) for site, reply in listed if site.weight < 0]
        if allowed:
            findings.append(Finding("DNSWL", Action.NONE, None, ", ".join(allowed)))
        blocked = [_listing(site, reply) for site, reply in listed if site.weight > 0]
        if not blocked:
            return findings
        detail = f"rank {rank}, threshold {threshold}: {', '.join(blocked)}"
        if rank + silent_allowlists >= threshold:
            findings.append(Finding("DNSBL", self._dnsbl_action, Signal.DNSBL, detail))
        elif rank >= threshold:
            findings.append(Finding("DNSBL_RANK", Action.NONE, None,
                                    detail + "; not acted on: an allowlist did not answer"))
        else:
            findings.append(Finding("DNSBL_RANK", Action.NONE, None, detail))
        return findings

    async def _addresses(self, name: str, record: str, timeout: float):
        """The A or AAAA records of `name` as addresses, or the Unresolved reason."""
        try:
            async with asyncio.timeout(timeout):
                answer = await self._query(name, record, timeout)
        except TimeoutError:
            return Unresolved("DNS_TIMEOUT", f"{record} {name}: no answer within {timeout:g}s")
        except Unresolved as unresolved:
            return unresolved
        return [ipaddress.ip_address(text) for text in answer]

    # --- one query ----------------------------------------------------------------------

    async def _query(self, name, record: str, lifetime: float) -> list[str]:
        """The answers as text; empty when the name or record does not exist."""
        try:
            answer = await self.resolver.resolve(name, record, search=False, lifetime=lifetime)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.Timeout:
            raise Unresolved("DNS_TIMEOUT", f"{record} {name}: no answer within "
                                            f"{lifetime:g}s") from None
        except dns.exception.DNSException as e:  # SERVFAIL, REFUSED, malformed replies
            raise Unresolved("DNS_ERROR", f"{record} {name}: {e}") from None
        return [rdata.to_text() for rdata in answer]


def reversed_labels(address: IPAddress) -> str:
    """192.0.2.1 -> 1.2.0.192; IPv6 as 32 reversed nibbles, as DNS lists expect."""
    if address.version == 4:
        return ".".join(reversed(str(address).split(".")))
    return ".".join(reversed(address.exploded.replace(":", "")))


def _listing(site: DnsListSite, reply: ipaddress.IPv4Address) -> str:
    return f"{site.zone}={reply}*{site.weight}"
