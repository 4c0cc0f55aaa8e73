"""The configuration file: one YAML document, validated against a schema.

Every key has a type and a default, numbers have bounds; README.md documents each key.
Validation has two steps, and `portcullis check-config`, `serve`, a worker's start and
a SIGHUP reload all run both, through load():

- loads(): the schema and every rule that needs no I/O: types, bounds, syntax (host and
  domain names, LDAP URL and filter, nftables names), rules across keys;
- check(): what needs the system: the files the keys name can be read and loaded, the
  directories written or created, listen hosts resolve, no two listeners share a port.

A problem raises ConfigError naming the file, the line and the dotted key, so that the
commands can print it without a traceback. Relative file paths are taken from the
configuration file's directory.
"""

from __future__ import annotations

import difflib
import errno
import functools
import grp
import ipaddress
import itertools
import math
import os
import re
import socket
import ssl
import stat
import tempfile
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, get_args, get_origin, get_type_hints

import yaml

DEFAULT_PATH = "/etc/portcullis/portcullis.yaml"


class ConfigError(Exception):
    """A configuration problem, phrased for the administrator."""


# --- value types --------------------------------------------------------------

@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_host_port(text: str, default_port: int | None = None) -> HostPort:
    """Parse "host:port", "[v6]:port", or a bare host when default_port is given. The host
    is an IP address or a host name; brackets go only around an IPv6 address."""
    text = str(text).strip()
    bracketed = text.startswith("[")
    if bracketed:
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"'{text}' needs a port, as host:port")
        return HostPort(host, default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"'{text}' has an invalid port")
    if not host:
        raise ValueError(f"'{text}' has no host")
    _check_host(host, bracketed, text)
    return HostPort(host, int(port_text))


def _check_host(host: str, bracketed: bool, text: str) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if bracketed and (address is None or address.version != 6):
        raise ValueError(f"'{text}': brackets go only around an IPv6 address")
    if address is None:
        try:
            domain_name(host)
        except ValueError:
            raise ValueError(f"'{host}' is not an IP address or host name") from None


_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def domain_name(text: str) -> str:
    """`text` without its trailing dot, if it is a domain name: labels of letters, digits
    and inner hyphens, 1-63 characters each, 253 in all, the last not all digits."""
    name = text.removesuffix(".")
    labels = name.split(".")
    if (len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):
        raise ValueError(f"'{text}' is not a domain name (letters, digits and hyphens, "
                         "separated by dots)")
    return name


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1 << 30


def default_max_connections() -> int:
    """Size the global cap to memory: about 64 KiB per connection, up to a quarter of RAM."""
    return max(256, min(50_000, _memory_bytes() // 4 // (64 * 1024)))


# --- value checks, run on each value as it is read (ValueError: the problem) ------

def _relay_domain(text: str) -> str:
    return domain_name(text).lower()


def _optional_domain_name(text: str) -> str:
    return text and domain_name(text)


def _ip_and_port(server: HostPort) -> HostPort:
    try:
        ipaddress.ip_address(server.host)
    except ValueError:
        raise ValueError(f"'{server}' must be an IP address and port, like 127.0.0.1:53") from None
    return server


ADDRESS_PLACEHOLDER = "{addr}"  # where an LDAP filter takes the recipient address


def _ldap_url(url: str) -> str:
    import ldap3
    from ldap3.core.exceptions import LDAPException

    if not url.lower().startswith(("ldap://", "ldaps://")):
        raise ValueError(f"'{url}' must start with ldap:// or ldaps://")
    try:
        server = ldap3.Server(url, get_info=ldap3.NONE)
    except (LDAPException, ValueError) as e:
        raise ValueError(f"'{url}': {e or 'not a valid URL'}") from None
    if not server.host:
        raise ValueError(f"'{url}' names no server")
    return url


def _ldap_filter(text: str) -> str:
    from ldap3.core.exceptions import LDAPException
    from ldap3.operation.search import parse_filter

    if ADDRESS_PLACEHOLDER not in text:
        raise ValueError(f"must contain {ADDRESS_PLACEHOLDER}, where the recipient address goes")
    try:
        parse_filter(text.replace(ADDRESS_PLACEHOLDER, "user@example.org"),
                     None, True, True, None, False)
    except (LDAPException, ValueError, IndexError) as e:
        raise ValueError(f"not a valid LDAP filter: {e}") from None
    return text


_NFT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")


def _nft_name(text: str) -> str:
    if not _NFT_NAME.fullmatch(text):
        raise ValueError(f"'{text}' is not an nftables name (a letter, then letters, digits or _)")
    return text


# --- schema -------------------------------------------------------------------
# Each section is a dataclass; field metadata carries the constraints checked at load.

def _c(default: Any = None, *, minimum: float | None = None, maximum: float | None = None,
       choices: tuple = (), check=None, path: bool = False, factory=None):
    """A field and its constraints: bounds for a number, choices, a value check (value ->
    value in normal form; the YAML value must then be a string), and `path` for a file or
    directory path, a relative one taken from the configuration file's directory."""
    meta = {"minimum": minimum, "maximum": maximum, "choices": choices, "check": check,
            "path": path}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# Upper bounds shared by several keys.
DAY = 86400.0
YEAR = 365 * DAY
MAX_DELAY = 240.0  # seconds a reply is held: inside RFC 5321's 5-minute client timeouts
MAX_TIMEOUT = 3600.0
MAX_COUNT = 1_000_000  # thresholds and per-client counts
MAX_SCORE = 1000.0  # score thresholds and weights
MAX_ENTRIES = 10_000_000  # cached answers and tracked clients


@dataclass
class Limits:
    max_connections: int = _c(factory=default_max_connections, minimum=1, maximum=MAX_COUNT)
    max_connections_per_ip: int = _c(20, minimum=1, maximum=MAX_COUNT)
    max_connections_per_prefix: int = _c(60, minimum=1, maximum=MAX_COUNT)
    ipv4_prefix: int = _c(24, minimum=8, maximum=32)
    ipv6_prefix: int = _c(64, minimum=16, maximum=128)
    # An IPv6 client is its /ipv6_client_prefix network, for pre-greet, rate and harvest
    # state: one host gets a whole /64 and could rotate through it.
    ipv6_client_prefix: int = _c(64, minimum=16, maximum=128)
    # Entries each per-client table (pre-greet, rates, harvest counts, bans) may hold in
    # each process; past it the least recently used goes (metric state_evictions_total).
    max_tracked_clients: int = _c(100_000, minimum=100, maximum=MAX_ENTRIES)
    # new connections per second
    connection_rate_per_ip: float = _c(5.0, minimum=0.01, maximum=10_000)
    connection_burst_per_ip: int = _c(30, minimum=1, maximum=MAX_COUNT)
    # per client per rate_time_unit (a minute), across its connections (and a fleet's
    # appliances); 0: no cap.
    # Why these numbers: policy/rates.py
    rate_time_unit: float = _c(60.0, minimum=1, maximum=3600)  # seconds the rates count over
    message_rate_per_ip: int = _c(120, minimum=0, maximum=MAX_COUNT)
    recipient_rate_per_ip: int = _c(600, minimum=0, maximum=MAX_COUNT)
    tls_rate_per_ip: int = _c(120, minimum=0, maximum=MAX_COUNT)
    max_recipients: int = _c(100, minimum=1, maximum=100_000)
    max_message_size: int = _c(25 * 1024 * 1024, minimum=1024, maximum=1 << 34)  # 16 GiB
    max_strikes: int = _c(5, minimum=1, maximum=1000)
    max_commands: int = _c(2000, minimum=10, maximum=MAX_COUNT)
    command_timeout: float = _c(60.0, minimum=0.1, maximum=MAX_TIMEOUT)
    session_timeout: float = _c(600.0, minimum=1, maximum=DAY)
    # bytes per second, averaged over DATA
    min_data_rate: int = _c(512, minimum=0, maximum=1 << 30)
    pregreet_delay: float = _c(3.0, minimum=0, maximum=MAX_DELAY)
    pregreet_ttl: float = _c(86400.0, minimum=0, maximum=YEAR)
    stress_threshold: float = _c(0.75, minimum=0, maximum=1)  # fraction of max_connections
    stress_command_timeout: float = _c(10.0, minimum=0.1, maximum=MAX_TIMEOUT)
    listen_backlog: int = _c(4096, minimum=16, maximum=65535)


@dataclass
class Backend:
    servers: list[HostPort] = _c(factory=list)
    connect_timeout: float = _c(5.0, minimum=0.1, maximum=300)
    command_timeout: float = _c(30.0, minimum=0.1, maximum=MAX_TIMEOUT)
    data_timeout: float = _c(120.0, minimum=0.1, maximum=MAX_TIMEOUT)
    helo: str = _c("", check=_optional_domain_name)  # empty: hostname
    # tell the backend who the client is (forwarding.py); auto: XCLIENT, else XFORWARD,
    # whichever it offers; xclient/xforward: required, 451 without it; off: neither
    forward_client: str = _c("auto", choices=("auto", "xforward", "xclient", "off"))


@dataclass
class LdapDirectory:
    """Where recipients are looked up when `recipients.source` is ldap.

    The filter's `{addr}` is replaced by the RFC 4515-escaped address. The default suits
    directories with the `mail` and `mailAlternateAddress` attributes (Sun/qmail schemas).
    Every search is bounded by `timeout` seconds; past it the recipient gets a 451.
    Unknown answers are cached for less time than found ones, so a new mailbox is
    reachable within `negative_ttl` seconds; `cache_size` bounds the cache in entries.
    """

    url: str = _c("ldap://127.0.0.1:389", check=_ldap_url)  # ldap:// or ldaps://
    bind_dn: str = ""  # empty: anonymous bind
    password_file: str = _c("", path=True)  # first line is the bind password
    base: str = ""
    filter: str = _c("(|(mail={addr})(mailAlternateAddress={addr}))", check=_ldap_filter)
    starttls: bool = False
    ca_file: str = _c("", path=True)  # empty: the system trust store
    timeout: float = _c(3.0, minimum=0.1, maximum=300)
    pool_size: int = _c(4, minimum=1, maximum=256)  # connections, and threads running searches
    positive_ttl: float = _c(600.0, minimum=0, maximum=7 * DAY)
    negative_ttl: float = _c(120.0, minimum=0, maximum=7 * DAY)
    # about 250 bytes an entry; 0: no cache
    cache_size: int = _c(20_000, minimum=0, maximum=MAX_ENTRIES)


@dataclass
class Recipients:
    source: str = _c("static", choices=("static", "ldap"))
    file: str = _c("/etc/portcullis/recipients", path=True)
    ldap: LdapDirectory = field(default_factory=LdapDirectory)


SELF_SIGNED_PAIR = ("selfsigned.crt", "selfsigned.key")  # in tls.generated_dir


@dataclass
class Tls:
    enabled: bool = True
    cert_file: str = _c("", path=True)
    key_file: str = _c("", path=True)
    generated_dir: str = _c("/var/lib/portcullis/tls", path=True)


@dataclass
class Metrics:
    listen: HostPort | None = None


# --- policy sections (directory-harvest defence, DNS checks) ------------------
# Added by the policy modules' authors; each is a dataclass with defaults.

# Directory-harvest defence, one reputation score, and the ban helper. The reasons for
# each default are in the docstrings of portcullis.policy.dha, .score and .reputation.

def _redis_url(url: str) -> str:
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise ValueError(f"'{url}': {e}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"'{url}' must start with redis:// or rediss://")
    if not parts.hostname:
        raise ValueError(f"'{url}' names no server")
    if parts.password:
        raise ValueError(f"'{url}' carries a password: put it in 'password_file'")
    return url


def _key_prefix(text: str) -> str:
    if not 1 <= len(text) <= 64 or any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError(f"'{text}' must be 1-64 printable characters without spaces")
    return text


@dataclass
class RedisStore:
    """The shared store of a fleet (`reputation.store: redis`): Valkey or Redis 7+.
    The hot path never waits on it; `timeout` bounds every exchange with the server, and
    past it the gate counts locally until the server is back (policy/fleet.py)."""

    url: str = _c("redis://127.0.0.1:6379/0", check=_redis_url)  # redis:// or rediss:// (TLS)
    username: str = ""  # ACL user; empty: the default user
    password_file: str = _c("", path=True)  # first line is the password
    ca_file: str = _c("", path=True)  # for rediss://; empty: the system trust store
    key_prefix: str = _c("portcullis:", check=_key_prefix)
    timeout: float = _c(0.5, minimum=0.01, maximum=30)  # seconds per exchange
    pool_size: int = _c(4, minimum=1, maximum=64)  # connections per process


@dataclass
class Reputation:
    # sqlite: state_dir/reputation.db; redis: a fleet's shared Valkey/Redis (reputation.redis)
    store: str = _c("sqlite", choices=("sqlite", "memory", "redis"))
    ban_ttl: float = _c(3600.0, minimum=1, maximum=YEAR)  # seconds a DHA or score ban lasts
    # seconds between reads of other workers' writes
    sync_interval: float = _c(1.0, minimum=0.05, maximum=60)
    redis: RedisStore = field(default_factory=RedisStore)


@dataclass
class Dha:
    enabled: bool = True
    window: float = _c(600.0, minimum=1, maximum=7 * DAY)  # seconds misses are remembered
    tarpit_after: int = _c(3, minimum=1, maximum=MAX_COUNT)  # invalid recipients per address
    suspect_after: int = _c(5, minimum=1, maximum=MAX_COUNT)
    ban_after: int = _c(10, minimum=1, maximum=MAX_COUNT)
    # per /24 (IPv4) or /64 (IPv6), limits.*_prefix
    prefix_tarpit_after: int = _c(10, minimum=1, maximum=MAX_COUNT)
    prefix_suspect_after: int = _c(20, minimum=1, maximum=MAX_COUNT)
    prefix_ban_after: int = _c(30, minimum=1, maximum=MAX_COUNT)
    # seconds added per invalid recipient, and the most
    tarpit_step: float = _c(1.0, minimum=0, maximum=MAX_DELAY)
    tarpit_max: float = _c(5.0, minimum=0, maximum=MAX_DELAY)
    # the one delay every suspect RCPT gets
    suspect_delay: float = _c(5.0, minimum=0, maximum=MAX_DELAY)


# Senders whose retries come from other addresses of a pool: greylisting them delays
# their mail for hours. Matched against the forward-confirmed reverse DNS name.
LARGE_SENDERS = ("google.com", "outlook.com", "yahoo.com", "amazonses.com", "sendgrid.net",
                 "mailgun.net", "mcsv.net", "icloud.com", "protonmail.ch")


@dataclass
class Greylist:
    """Greylisting (policy/greylist.py): off by default; its defaults are spamd's and
    postgrey's."""

    enabled: bool = False
    delay: float = _c(300.0, minimum=0, maximum=DAY)  # seconds before a retry passes
    retry_window: float = _c(14400.0, minimum=1, maximum=7 * DAY)  # ... and after which not
    pass_ttl: float = _c(36 * DAY, minimum=1, maximum=YEAR)  # a client that passed: no delays
    # domains (and their subdomains) of forward-confirmed client names never greylisted
    exempt_names: list[str] = _c(factory=lambda: list(LARGE_SENDERS), check=_relay_domain)


@dataclass
class ScoreWeights:
    pregreet: float = _c(10.0, minimum=0, maximum=MAX_SCORE)
    dnsbl: float = _c(8.0, minimum=0, maximum=MAX_SCORE)
    no_reverse_dns: float = _c(3.0, minimum=0, maximum=MAX_SCORE)
    bad_helo: float = _c(3.0, minimum=0, maximum=MAX_SCORE)
    invalid_recipient: float = _c(2.0, minimum=0, maximum=MAX_SCORE)
    strike: float = _c(2.0, minimum=0, maximum=MAX_SCORE)
    rate: float = _c(2.0, minimum=0, maximum=MAX_SCORE)


@dataclass
class Score:
    tarpit: float = _c(5.0, minimum=0, maximum=MAX_SCORE)
    tempfail: float = _c(10.0, minimum=0, maximum=MAX_SCORE)
    ban: float = _c(20.0, minimum=0, maximum=MAX_SCORE)
    tarpit_delay: float = _c(2.0, minimum=0, maximum=MAX_DELAY)
    weights: ScoreWeights = field(default_factory=ScoreWeights)


@dataclass
class BanHelper:
    table: str = _c("portcullis", check=_nft_name)  # an nftables table of family inet
    set_ipv4: str = _c("portcullis_ban4", check=_nft_name)
    set_ipv6: str = _c("portcullis_ban6", check=_nft_name)
    never_ban: list[Network] = _c(factory=list)  # in addition to the top-level allowlist
    min_seconds: int = _c(1, minimum=1, maximum=int(YEAR))
    max_seconds: int = _c(7 * 86400, minimum=1, maximum=int(YEAR))
    rate: float = _c(5.0, minimum=0.001, maximum=10_000)  # bans per second, sustained
    burst: int = _c(50, minimum=1, maximum=MAX_COUNT)
    socket_group: str = "portcullis"  # may connect to ban_socket; "" keeps the helper's group


# DNS and HELO checks on the client (portcullis.policy.dns_checks, .helo). Each check's
# action is one of CHECK_ACTIONS: reject (554 / 550), tempfail (450), score (add the
# check's signal to the connection score, config.score.weights) or off. A DNS timeout
# or server failure never rejects: it is logged as DNS_TIMEOUT / DNS_ERROR and counts
# as no finding.

CHECK_ACTIONS = ("reject", "tempfail", "score", "off")


@dataclass(frozen=True)
class DnsListSite:
    """One DNS list in postscreen's syntax, `zone[=reply pattern][*weight]`, e.g.
    `zen.spamhaus.org=127.0.0.[2..11]*3` or `list.dnswl.org=127.0.[0..255].[1..3]*-2`.

    Each octet of the pattern is a number or a bracketed list of numbers and ranges,
    `[2;4..7]`; without a pattern any reply counts. A negative weight makes it an
    allowlist (DNSWL) that lowers the client's rank.
    """

    zone: str
    octets: tuple[tuple[tuple[int, int], ...], ...] | None  # per octet: (low, high) ranges
    weight: int = 1

    @classmethod
    def from_text(cls, text: str) -> DnsListSite:
        text = str(text).strip()
        rest, star, weight_text = text.partition("*")
        zone, equals, pattern = rest.partition("=")
        zone = zone.strip().lower().rstrip(".")
        labels = zone.split(".")
        if len(labels) < 2 or not all(0 < len(label) < 64 for label in labels):
            raise ValueError(f"'{text}': '{zone}' is not a DNS zone like zen.spamhaus.org")
        weight = 1
        if star:
            try:
                weight = int(weight_text)
            except ValueError:
                raise ValueError(f"'{text}': the weight after * must be an integer") from None
            if weight == 0:
                raise ValueError(f"'{text}': a weight of 0 would make the list useless")
        octets = _reply_pattern(pattern.strip(), text) if equals else None
        return cls(zone, octets, weight)

    def matches(self, reply: ipaddress.IPv4Address) -> bool:
        if self.octets is None:
            return True
        return all(any(low <= octet <= high for low, high in ranges)
                   for octet, ranges in zip(reply.packed, self.octets, strict=True))


_REPLY_OCTET = r"(\d+|\[[0-9.;]+\])"  # 127 or [2..11] or [2;4..7]
_REPLY_PATTERN = re.compile(r"\.".join([_REPLY_OCTET] * 4))


def _reply_pattern(pattern: str, text: str) -> tuple[tuple[tuple[int, int], ...], ...]:
    problem = f"'{text}': the reply pattern must look like 127.0.0.[2..11] or 127.0.0.[2;4]"
    match = _REPLY_PATTERN.fullmatch(pattern)
    if match is None:
        raise ValueError(problem)
    octets = []
    for part in match.groups():
        items = part[1:-1].split(";") if part.startswith("[") and part.endswith("]") else [part]
        ranges = []
        for item in items:
            low, dots, high = item.partition("..")
            if not low.isdigit() or (dots and not high.isdigit()):
                raise ValueError(problem)
            low_value, high_value = int(low), int(high if dots else low)
            if not low_value <= high_value <= 255:
                raise ValueError(f"'{text}': range {item} is not within 0..255, low..high")
            ranges.append((low_value, high_value))
        octets.append(tuple(ranges))
    return tuple(octets)


@dataclass
class FcrdnsCheck:
    """Forward-confirmed reverse DNS: a PTR name of the client address must resolve back
    to it. Default `score` (signal no_reverse_dns): many small legitimate senders lack it."""

    action: str = _c("score", choices=CHECK_ACTIONS)
    # seconds for the PTR and forward lookups together
    timeout: float = _c(5.0, minimum=0.1, maximum=60)


@dataclass
class HeloChecks:
    """What the HELO/EHLO name must be (RFC 5321 4.1.1.1, 4.1.3); signal bad_helo.

    Rejected by default: what RFC 5321 forbids outright (bad syntax, a bare IP address)
    and a client claiming to be this gateway, which only forgers do. Scored: a name
    without a dot (some legitimate servers send their short host name) and an address
    literal that is not the client's address (normal behind NAT).
    """

    syntax: str = _c("reject", choices=CHECK_ACTIONS)
    not_fqdn: str = _c("score", choices=CHECK_ACTIONS)
    ours: str = _c("reject", choices=CHECK_ACTIONS)
    bare_ip: str = _c("reject", choices=CHECK_ACTIONS)
    literal_mismatch: str = _c("score", choices=CHECK_ACTIONS)


@dataclass
class DnsListCheck:
    """DNSBL and DNSWL sites queried in parallel. The client's rank is the sum of the
    weights of the sites that list it; at `threshold` or above, `action` applies (signal
    dnsbl). No sites by default: each list has its own terms of use, and most refuse
    queries that come through public resolvers. Threshold 1 as in postscreen."""

    sites: list[DnsListSite] = _c(factory=list)
    threshold: int = _c(1, minimum=1, maximum=1000)
    action: str = _c("score", choices=CHECK_ACTIONS)
    timeout: float = _c(5.0, minimum=0.1, maximum=60)


@dataclass
class DnsChecks:
    """The resolver the DNS checks use, and the checks. Empty nameservers: those of
    /etc/resolv.conf (on the appliance, best a local caching resolver)."""

    nameservers: list[HostPort] = _c(factory=list, check=_ip_and_port)  # port 53 is the usual
    cache_size: int = _c(10_000, minimum=0, maximum=MAX_ENTRIES)  # answers kept; 0: none
    fcrdns: FcrdnsCheck = field(default_factory=FcrdnsCheck)
    helo: HeloChecks = field(default_factory=HeloChecks)
    dnsbl: DnsListCheck = field(default_factory=DnsListCheck)


@dataclass
class Config:
    hostname: str = _c("localhost", check=domain_name)
    listen: list[HostPort] = _c(factory=lambda: [HostPort("0.0.0.0", 25)])
    workers: int = _c(0, minimum=0, maximum=1024)  # 0 = one per CPU
    relay_domains: list[str] = _c(factory=list, check=_relay_domain)
    allowlist: list[Network] = _c(factory=list)
    state_dir: str = _c("/var/lib/portcullis", path=True)
    ban_socket: str = _c("", path=True)
    log_level: str = _c("info", choices=("debug", "info", "warning", "error"))
    recipients: Recipients = field(default_factory=Recipients)
    backend: Backend = field(default_factory=Backend)
    limits: Limits = field(default_factory=Limits)
    tls: Tls = field(default_factory=Tls)
    metrics: Metrics = field(default_factory=Metrics)
    # --- policy section fields ---
    reputation: Reputation = field(default_factory=Reputation)
    dha: Dha = field(default_factory=Dha)
    greylist: Greylist = field(default_factory=Greylist)
    score: Score = field(default_factory=Score)
    ban_helper: BanHelper = field(default_factory=BanHelper)
    dns: DnsChecks = field(default_factory=DnsChecks)
    # The file, and the line of each dotted key in it, for errors found after the build.
    source: str = field(default="<config>", init=False, repr=False, compare=False)
    lines: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def is_relay_domain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.relay_domains

    def value(self, dotted: str):
        return functools.reduce(getattr, dotted.split("."), self)

    def error(self, dotted: str, problem: str) -> ConfigError:
        """A problem with `dotted`, at its line, or its section's if the file leaves it out."""
        key = dotted
        while key and key not in self.lines:
            key = key.rpartition(".")[0]
        where = f" line {self.lines[key]}" if key else ""
        return ConfigError(f"{self.source}{where}: key '{dotted}': {problem}")


# --- loading ------------------------------------------------------------------

def load(path: str = DEFAULT_PATH, *, io_checks: bool = True) -> Config:
    """The configuration as `serve` runs it: loads(), then check() unless io_checks is
    false (the ban helper, which reads none of those files, checks its own part)."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    config = loads(text, path)
    return check(config) if io_checks else config


def loads(text: str | bytes, path: str = "<config>") -> Config:
    """The schema and every rule that needs no I/O; `path` names the file in errors and
    anchors relative paths."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:  # the parser recurses per level of nesting
        raise ConfigError(f"{path}: nested too deeply to be a configuration") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    if node is None:
        node = yaml.MappingNode("tag:yaml.org,2002:map", [])
    lines: dict[str, int] = {}
    config = _build(Config, node, path, "", lines)
    config.source, config.lines = path, lines
    _check_rules(config)
    return config


def _build(cls: type, node: yaml.Node, path: str, prefix: str, lines: dict[str, int]):
    if not isinstance(node, yaml.MappingNode):
        raise _error(path, node, prefix or "(top level)", "must be a mapping of keys")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    values: dict[str, Any] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise _error(path, key_node, prefix.rstrip(".") or "(top level)",
                         "keys must be plain names")
        key = key_node.value
        dotted = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise _error(path, key_node, dotted, f"unknown key{hint}")
        if key in values:
            raise _error(path, key_node, dotted, "given twice")
        lines[dotted] = key_node.start_mark.line + 1
        if is_dataclass(hints[key]) and hints[key] not in (HostPort, DnsListSite):
            values[key] = _build(hints[key], value_node, path, dotted + ".", lines)
        else:
            values[key] = _convert(hints[key], known[key].metadata, value_node, path, dotted)
    return cls(**values)


def _convert(hint, meta, node: yaml.Node, path: str, dotted: str):
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is list:
        if isinstance(node, yaml.ScalarNode) and node.value == "":
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise _error(path, node, dotted, "must be a list")
        return [_convert(args[0], meta, item, path, dotted) for item in node.value]
    if args and type(None) in args:  # X | None
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return None
        hint = next(a for a in args if a is not type(None))
    if origin is dict:
        return _plain_value(node, path, dotted)
    if not isinstance(node, yaml.ScalarNode):
        raise _error(path, node, dotted, "must be a single value")
    value = _plain_value(node, path, dotted)
    try:
        return _constrained(_scalar(hint, value), value, meta, path)
    except (ValueError, TypeError) as e:
        raise _error(path, node, dotted, str(e)) from None


def _constrained(value, written, meta, config_path: str):
    """`value` after the field's constraints (see _c); ValueError names the problem."""
    minimum, maximum = meta.get("minimum"), meta.get("maximum")
    if minimum is not None and value < minimum:
        raise ValueError(f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"must be at most {maximum}, got {value}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ValueError(f"must be one of {', '.join(choices)}, got '{value}'")
    check = meta.get("check")
    if check:
        if isinstance(value, str) and not isinstance(written, str):
            raise ValueError(f"must be a string, got '{value}'")
        value = check(value)
    if meta.get("path") and value:
        if "\0" in value:
            raise ValueError("a path cannot hold a NUL character")
        value = os.path.abspath(os.path.join(os.path.dirname(config_path), value))
    return value


def _plain_value(node: yaml.Node, path: str, dotted: str):
    """The node as a plain Python value, as yaml.safe_load would make it."""
    try:
        return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
    except RecursionError:
        raise _error(path, node, dotted, "nested too deeply") from None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or "not a plain YAML value"
        raise _error(path, node, dotted, problem) from None


def _scalar(hint, value):
    if hint is HostPort:
        return parse_host_port(value)
    if hint is DnsListSite:
        return DnsListSite.from_text(value)
    if hint == Network:
        try:
            return ipaddress.ip_network(str(value), strict=False)
        except ValueError:
            raise ValueError(f"'{value}' is not a network address like 10.0.0.0/8") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"must be true or false, got '{value}'")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got '{value}'")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got '{value}'")
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = math.inf
        if not math.isfinite(number):
            raise ValueError(f"must be a finite number, got '{value}'")
        return number
    if hint is str:
        if value is None or isinstance(value, (dict, list)):
            raise ValueError(f"must be a string, got '{value}'")
        return str(value)
    raise TypeError(f"unsupported type {hint}")


def _error(path: str, node: yaml.Node, dotted: str, problem: str) -> ConfigError:
    return ConfigError(f"{path} line {node.start_mark.line + 1}: key '{dotted}': {problem}")


def _check_rules(config: Config) -> None:
    """Rules that span keys. Fail closed: a gate without them would relay wrongly."""
    for dotted, problem in (("relay_domains", "list at least one domain to accept mail for"),
                            ("backend.servers", "list at least one host:port"),
                            ("listen", "list at least one host:port")):
        if not config.value(dotted):
            raise config.error(dotted, problem)
    _both_or_neither(config, "tls.cert_file", "tls.key_file", "")
    if config.recipients.source == "ldap":
        ldap = config.recipients.ldap
        if not ldap.base:
            raise config.error("recipients.ldap.base", "required when source is ldap")
        if ldap.starttls and ldap.url.lower().startswith("ldaps://"):
            raise config.error("recipients.ldap.starttls",
                               "use either ldaps:// or starttls, not both")
        _both_or_neither(config, "recipients.ldap.bind_dn", "recipients.ldap.password_file",
                         " for an anonymous bind")
    _check_ascending(config, "dha", ("tarpit_after", "suspect_after", "ban_after"))
    _check_ascending(config, "dha",
                     ("prefix_tarpit_after", "prefix_suspect_after", "prefix_ban_after"))
    _check_ascending(config, "score", ("tarpit", "tempfail", "ban"))
    _check_ascending(config, "greylist", ("delay", "retry_window"))
    if not config.backend.helo:
        config.backend.helo = config.hostname
    if config.workers == 0:
        config.workers = os.cpu_count() or 1


def _both_or_neither(config: Config, first: str, second: str, neither: str) -> None:
    if bool(config.value(first)) != bool(config.value(second)):
        missing = second if config.value(first) else first
        raise config.error(missing, f"give both '{first}' and '{second}', or neither{neither}")


def _check_ascending(config: Config, section: str, keys: tuple[str, ...]) -> None:
    """Thresholds that must not decrease, such as the stages of the harvest defence."""
    for low_key, high_key in itertools.pairwise(keys):
        low, high = (config.value(f"{section}.{key}") for key in (low_key, high_key))
        if high < low:
            raise config.error(f"{section}.{high_key}",
                               f"must not be below '{section}.{low_key}' ({low:g}), got {high:g}")


# --- what needs the system ----------------------------------------------------

def check(config: Config) -> Config:
    """What `serve` needs from the system before it binds; ConfigError on the first problem.
    Nothing is created: a directory that does not exist only has to be creatable."""
    _check_listeners(config)
    if config.reputation.store in ("sqlite", "redis"):
        _check_directory(config, "state_dir")
    if config.recipients.source == "static":
        from .policy.recipients import RecipientListError, parse_recipient_list
        try:
            parse_recipient_list(_read(config, "recipients.file"), config.recipients.file)
        except RecipientListError as e:
            raise config.error("recipients.file", str(e)) from None
    else:
        _check_client_files(config, "recipients.ldap")
    if config.reputation.store == "redis":
        _check_client_files(config, "reputation.redis")
    if config.tls.enabled:
        _check_tls_pair(config)
    if not config.dns.nameservers:
        import dns.resolver
        try:
            dns.resolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            raise config.error("dns.nameservers", "empty, and /etc/resolv.conf names no "
                                                  "nameserver: list at least one IP:port") from None
    return config


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _check_listeners(config: Config) -> None:
    """Listen hosts resolve, and no two sockets share a port on the same address or on a
    wildcard (0.0.0.0, ::) of its family. SMTP listeners on IPv6 take only IPv6; the
    metrics endpoint on :: takes IPv4 too."""
    taken: list[tuple[IPAddress, int, HostPort]] = []
    endpoints = [("listen", listener, socket.AF_INET6 if ":" in listener.host else socket.AF_INET)
                 for listener in config.listen]
    if config.metrics.listen:
        endpoints.append(("metrics.listen", config.metrics.listen, socket.AF_UNSPEC))
    for dotted, endpoint, family in endpoints:
        address = _resolve(config, dotted, endpoint, family)
        claims = [address]
        if dotted == "metrics.listen" and address == ipaddress.IPv6Address("::"):
            claims.append(ipaddress.IPv4Address("0.0.0.0"))
        for claim in claims:
            for other, port, listener in taken:
                if port == endpoint.port and claim.version == other.version and (
                        claim == other or claim.is_unspecified or other.is_unspecified):
                    raise config.error(dotted, f"{endpoint} clashes with the SMTP listener "
                                               f"{listener}: the same port on the same "
                                               "or any address")
        taken.append((address, endpoint.port, endpoint))


def _resolve(config: Config, dotted: str, endpoint: HostPort, family: int) -> IPAddress:
    try:
        return ipaddress.ip_address(endpoint.host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, family, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise config.error(dotted, f"cannot resolve {endpoint.host}: {reason}") from None
    return ipaddress.ip_address(infos[0][4][0].split("%")[0])


def _check_directory(config: Config, dotted: str) -> None:
    """A directory this process can write in, or create."""
    path = os.path.abspath(config.value(dotted))
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:
        if not os.path.isdir(parent):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        if parent == path:
            tempfile.TemporaryFile(dir=path).close()
        else:
            os.rmdir(tempfile.mkdtemp(dir=parent))
    except OSError as e:
        verb = "write to" if parent == path else "create"
        raise config.error(dotted, f"cannot {verb} {path}: {e.strerror}") from None


def _read(config: Config, dotted: str, errors: str = "replace") -> str:
    """The text of the file `dotted` names."""
    path = config.value(dotted)
    if not path:
        raise config.error(dotted, "name a file")
    try:
        with open(path, encoding="utf-8", errors=errors) as f:
            return f.read()
    except OSError as e:
        raise config.error(dotted, f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise config.error(dotted, f"cannot read {path}: not UTF-8 text") from None


def _check_client_files(config: Config, section: str) -> None:
    """A client's password file and CA file (LDAP, Redis) can be read and loaded."""
    settings = config.value(section)
    if settings.password_file:
        _read(config, f"{section}.password_file", errors="strict")
    if settings.ca_file:
        _read(config, f"{section}.ca_file")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(settings.ca_file)
        except ssl.SSLError as e:
            raise config.error(f"{section}.ca_file", f"{settings.ca_file}: not a PEM CA "
                                                     f"certificate ({e.reason})") from None


def _check_tls_pair(config: Config) -> None:
    """The configured pair loads; or the generated one, or its directory can be made."""
    tls = config.tls
    if tls.cert_file:
        dotted = "tls.cert_file"
        _read(config, "tls.cert_file")
        _read(config, "tls.key_file")
        cert, key = tls.cert_file, tls.key_file
    else:
        dotted = "tls.generated_dir"
        cert, key = (os.path.join(tls.generated_dir, name) for name in SELF_SIGNED_PAIR)
        if not (os.path.exists(cert) and os.path.exists(key)):
            _check_directory(config, dotted)
            return
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        reason = getattr(e, "reason", None) or e.strerror
        raise config.error(dotted, f"{cert} and {key}: not a PEM certificate and its key "
                                   f"({reason})") from None


def check_ban_helper(config: Config) -> Config:
    """What `portcullis ban-helper` needs besides the schema: a socket path that is free or
    holds a stale socket, and the socket's group."""
    if not config.ban_socket:
        raise config.error("ban_socket", "set the path of the ban helper's Unix socket")
    try:
        if not stat.S_ISSOCK(os.lstat(config.ban_socket).st_mode):
            raise config.error("ban_socket", f"{config.ban_socket} exists and is not a socket")
    except FileNotFoundError:
        pass
    group = config.ban_helper.socket_group
    if group:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise config.error("ban_helper.socket_group", f"no group named '{group}'") from None
    return config
