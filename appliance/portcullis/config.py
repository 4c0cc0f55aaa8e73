"""The configuration file: one YAML document, validated against a schema.

Every key has a type and a default; README.md documents each of them. An invalid
value raises ConfigError naming the file, the line and the dotted key, so that
`portcullis check-config` and `portcullis serve` can print it without a traceback.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
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
    """Parse "host:port", "[v6]:port", or a bare host when default_port is given."""
    text = str(text).strip()
    if text.startswith("["):
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
    return HostPort(host, int(port_text))


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1 << 30


def default_max_connections() -> int:
    """Size the global cap to memory: about 64 KiB per connection, up to a quarter of RAM."""
    return max(256, min(50_000, _memory_bytes() // 4 // (64 * 1024)))


# --- schema -------------------------------------------------------------------
# Each section is a dataclass; field metadata carries the constraint checked at load.

def _c(default: Any = None, *, minimum: float | None = None, choices: tuple = (), factory=None):
    meta = {"minimum": minimum, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Limits:
    max_connections: int = _c(factory=default_max_connections, minimum=1)
    max_connections_per_ip: int = _c(20, minimum=1)
    max_connections_per_prefix: int = _c(60, minimum=1)
    ipv4_prefix: int = _c(24, minimum=8)
    ipv6_prefix: int = _c(64, minimum=16)
    # An IPv6 client is its /ipv6_client_prefix network, for pre-greet, rate and harvest
    # state: one host gets a whole /64 and could rotate through it.
    ipv6_client_prefix: int = _c(64, minimum=16)
    # Entries each per-client table (pre-greet, rates, harvest counts, bans) may hold in
    # each process; past it the least recently used goes (metric state_evictions_total).
    max_tracked_clients: int = _c(100_000, minimum=100)
    connection_rate_per_ip: float = _c(5.0, minimum=0.01)  # new connections per second
    connection_burst_per_ip: int = _c(30, minimum=1)
    max_recipients: int = _c(100, minimum=1)
    max_message_size: int = _c(25 * 1024 * 1024, minimum=1024)
    max_strikes: int = _c(5, minimum=1)
    max_commands: int = _c(2000, minimum=10)
    command_timeout: float = _c(60.0, minimum=0.1)
    session_timeout: float = _c(600.0, minimum=1)
    min_data_rate: int = _c(512, minimum=0)  # bytes per second, averaged over DATA
    pregreet_delay: float = _c(3.0, minimum=0)
    pregreet_ttl: float = _c(86400.0, minimum=0)
    stress_threshold: float = _c(0.75, minimum=0)  # fraction of max_connections
    stress_command_timeout: float = _c(10.0, minimum=0.1)
    listen_backlog: int = _c(4096, minimum=16)


@dataclass
class Backend:
    servers: list[HostPort] = _c(factory=list)
    connect_timeout: float = _c(5.0, minimum=0.1)
    command_timeout: float = _c(30.0, minimum=0.1)
    data_timeout: float = _c(120.0, minimum=0.1)
    helo: str = ""


@dataclass
class LdapDirectory:
    """Where recipients are looked up when `recipients.source` is ldap.

    The filter's `{addr}` is replaced by the RFC 4515-escaped address. The default suits
    directories with the `mail` and `mailAlternateAddress` attributes (Sun/qmail schemas).
    Every search is bounded by `timeout` seconds; past it the recipient gets a 451.
    Unknown answers are cached for less time than found ones, so a new mailbox is
    reachable within `negative_ttl` seconds; `cache_size` bounds the cache in entries.
    """

    url: str = "ldap://127.0.0.1:389"  # ldap:// or ldaps://
    bind_dn: str = ""  # empty: anonymous bind
    password_file: str = ""  # first line is the bind password
    base: str = ""
    filter: str = "(|(mail={addr})(mailAlternateAddress={addr}))"
    starttls: bool = False
    ca_file: str = ""  # empty: the system trust store
    timeout: float = _c(3.0, minimum=0.1)
    pool_size: int = _c(4, minimum=1)  # connections, and threads running searches
    positive_ttl: float = _c(600.0, minimum=0)
    negative_ttl: float = _c(120.0, minimum=0)
    cache_size: int = _c(20_000, minimum=0)  # about 250 bytes an entry; 0: no cache


@dataclass
class Recipients:
    source: str = _c("static", choices=("static", "ldap"))
    file: str = "/etc/portcullis/recipients"
    ldap: LdapDirectory = field(default_factory=LdapDirectory)


@dataclass
class Tls:
    enabled: bool = True
    cert_file: str = ""
    key_file: str = ""
    generated_dir: str = "/var/lib/portcullis/tls"


@dataclass
class Metrics:
    listen: HostPort | None = None


# --- policy sections (directory-harvest defence, DNS checks) ------------------
# Added by the policy modules' authors; each is a dataclass with defaults.

# Directory-harvest defence, one reputation score, and the ban helper. The reasons for
# each default are in the docstrings of portcullis.policy.dha, .score and .reputation.

@dataclass
class Reputation:
    store: str = _c("sqlite", choices=("sqlite", "memory"))  # sqlite: state_dir/reputation.db
    ban_ttl: float = _c(3600.0, minimum=1)  # seconds a DHA or score ban lasts
    sync_interval: float = _c(1.0, minimum=0.05)  # seconds between reads of other workers' writes


@dataclass
class Dha:
    enabled: bool = True
    window: float = _c(600.0, minimum=1)  # seconds invalid recipients are remembered
    tarpit_after: int = _c(3, minimum=1)  # invalid recipients per client address
    suspect_after: int = _c(5, minimum=1)
    ban_after: int = _c(10, minimum=1)
    prefix_tarpit_after: int = _c(10, minimum=1)  # per /24 (IPv4) or /64 (IPv6), limits.*_prefix
    prefix_suspect_after: int = _c(20, minimum=1)
    prefix_ban_after: int = _c(30, minimum=1)
    tarpit_step: float = _c(1.0, minimum=0)  # seconds added per invalid recipient
    tarpit_max: float = _c(5.0, minimum=0)
    suspect_delay: float = _c(5.0, minimum=0)  # the one delay every suspect RCPT gets


@dataclass
class ScoreWeights:
    pregreet: float = _c(10.0, minimum=0)
    dnsbl: float = _c(8.0, minimum=0)
    no_reverse_dns: float = _c(3.0, minimum=0)
    bad_helo: float = _c(3.0, minimum=0)
    invalid_recipient: float = _c(2.0, minimum=0)
    strike: float = _c(2.0, minimum=0)


@dataclass
class Score:
    tarpit: float = _c(5.0, minimum=0)
    tempfail: float = _c(10.0, minimum=0)
    ban: float = _c(20.0, minimum=0)
    tarpit_delay: float = _c(2.0, minimum=0)
    weights: ScoreWeights = field(default_factory=ScoreWeights)


@dataclass
class BanHelper:
    table: str = "portcullis"  # an nftables table of family inet
    set_ipv4: str = "portcullis_ban4"
    set_ipv6: str = "portcullis_ban6"
    never_ban: list[Network] = _c(factory=list)  # in addition to the top-level allowlist
    min_seconds: int = _c(1, minimum=1)
    max_seconds: int = _c(7 * 86400, minimum=1)
    rate: float = _c(5.0, minimum=0.001)  # bans per second, sustained
    burst: int = _c(50, minimum=1)
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
    timeout: float = _c(5.0, minimum=0.1)  # seconds for the PTR and forward lookups together


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
    threshold: int = _c(1, minimum=1)
    action: str = _c("score", choices=CHECK_ACTIONS)
    timeout: float = _c(5.0, minimum=0.1)


@dataclass
class DnsChecks:
    """The resolver the DNS checks use, and the checks. Empty nameservers: those of
    /etc/resolv.conf (on the appliance, best a local caching resolver)."""

    nameservers: list[HostPort] = _c(factory=list)  # IP:port; port 53 is the usual
    cache_size: int = _c(10_000, minimum=0)  # answers kept by the resolver; 0: none
    fcrdns: FcrdnsCheck = field(default_factory=FcrdnsCheck)
    helo: HeloChecks = field(default_factory=HeloChecks)
    dnsbl: DnsListCheck = field(default_factory=DnsListCheck)


@dataclass
class Config:
    hostname: str = "localhost"
    listen: list[HostPort] = _c(factory=lambda: [HostPort("0.0.0.0", 25)])
    workers: int = _c(0, minimum=0)  # 0 = one per CPU
    relay_domains: list[str] = _c(factory=list)
    allowlist: list[Network] = _c(factory=list)
    state_dir: str = "/var/lib/portcullis"
    ban_socket: str = ""
    log_level: str = _c("info", choices=("debug", "info", "warning", "error"))
    recipients: Recipients = field(default_factory=Recipients)
    backend: Backend = field(default_factory=Backend)
    limits: Limits = field(default_factory=Limits)
    tls: Tls = field(default_factory=Tls)
    metrics: Metrics = field(default_factory=Metrics)
    # --- policy section fields ---
    reputation: Reputation = field(default_factory=Reputation)
    dha: Dha = field(default_factory=Dha)
    score: Score = field(default_factory=Score)
    ban_helper: BanHelper = field(default_factory=BanHelper)
    dns: DnsChecks = field(default_factory=DnsChecks)

    def is_relay_domain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.relay_domains


# --- loading ------------------------------------------------------------------

def load(path: str = DEFAULT_PATH) -> Config:
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return loads(text, path)


def loads(text: str | bytes, path: str = "<config>") -> Config:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    if node is None:
        node = yaml.MappingNode("tag:yaml.org,2002:map", [])
    config = _build(Config, node, path, "")
    _check_whole(config, path)
    return config


def _build(cls: type, node: yaml.Node, path: str, prefix: str):
    if not isinstance(node, yaml.MappingNode):
        raise _error(path, node, prefix or "(top level)", "must be a mapping of keys")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise _error(path, key_node, prefix.rstrip(".") or "(top level)",
                         "keys must be plain names")
        key = key_node.value
        dotted = f"{prefix}{key}"
        if key not in known:
            raise _error(path, key_node, dotted, "unknown key")
        if key in values:
            raise _error(path, key_node, dotted, "given twice")
        values[key] = _convert(hints[key], known[key].metadata, value_node, path, dotted)
    return cls(**values)


_SCALAR_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _convert(hint, meta, node: yaml.Node, path: str, dotted: str):
    origin = get_origin(hint)
    args = get_args(hint)
    if is_dataclass(hint) and hint not in (HostPort, DnsListSite):
        return _build(hint, node, path, dotted + ".")
    if origin is list:
        if isinstance(node, yaml.ScalarNode) and node.value == "":
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise _error(path, node, dotted, "must be a list")
        return [_convert(args[0], {}, item, path, dotted) for item in node.value]
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
        converted = _scalar(hint, value)
    except (ValueError, TypeError) as e:
        raise _error(path, node, dotted, str(e)) from None
    minimum = meta.get("minimum")
    if minimum is not None and converted < minimum:
        raise _error(path, node, dotted, f"must be at least {minimum}, got {converted}")
    choices = meta.get("choices")
    if choices and converted not in choices:
        raise _error(path, node, dotted, f"must be one of {', '.join(choices)}, got '{converted}'")
    return converted


def _plain_value(node: yaml.Node, path: str, dotted: str):
    """The node as a plain Python value, as yaml.safe_load would make it."""
    try:
        return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
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
        return float(value)
    if hint is str:
        if value is None or isinstance(value, (dict, list)):
            raise ValueError(f"must be a string, got '{value}'")
        return str(value)
    raise TypeError(f"unsupported type {hint}")


def _error(path: str, node: yaml.Node, dotted: str, problem: str) -> ConfigError:
    return ConfigError(f"{path} line {node.start_mark.line + 1}: key '{dotted}': {problem}")


def _check_whole(config: Config, path: str) -> None:
    """Rules that span keys. Fail closed: a gate without them would relay wrongly."""
    if not config.relay_domains:
        raise ConfigError(f"{path}: key 'relay_domains': list at least one domain to accept mail for")
    config.relay_domains = [d.lower().rstrip(".") for d in config.relay_domains]
    if not config.backend.servers:
        raise ConfigError(f"{path}: key 'backend.servers': list at least one host:port")
    if not config.listen:
        raise ConfigError(f"{path}: key 'listen': list at least one host:port")
    if not config.backend.helo:
        config.backend.helo = config.hostname
    if config.recipients.source == "ldap" and not config.recipients.ldap.base:
        raise ConfigError(f"{path}: key 'recipients.ldap.base': required when source is ldap")
    if config.workers == 0:
        config.workers = os.cpu_count() or 1
    _check_ascending(path, "dha", config.dha, ("tarpit_after", "suspect_after", "ban_after"))
    _check_ascending(path, "dha", config.dha,
                     ("prefix_tarpit_after", "prefix_suspect_after", "prefix_ban_after"))
    _check_ascending(path, "score", config.score, ("tarpit", "tempfail", "ban"))


def _check_ascending(path: str, section: str, settings, keys: tuple[str, ...]) -> None:
    """Thresholds that must not decrease, such as the stages of the harvest defence."""
    for low_key, high_key in itertools.pairwise(keys):
        low, high = getattr(settings, low_key), getattr(settings, high_key)
        if high < low:
            raise ConfigError(f"{path}: key '{section}.{high_key}' ({high}) must not be "
                              f"below '{section}.{low_key}' ({low})")
