"""Connection admission: the cheap decisions made before any SMTP is parsed.

One admission process owns every per-client counter, so the limits hold however
many workers there are (the Postfix postscreen model). It accepts each connection,
applies the allowlist, the global cap, the per-IP and per-prefix caps, the per-IP
new-connection rate and the pre-greet test, then either refuses with one line and
a close, or passes the socket to a worker.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from dataclasses import dataclass

from .addresses import TokenBucket, client_of, prefix_of_text
from .bounded import BoundedTable
from .config import Config
from .smtp import replies


@dataclass(frozen=True, slots=True)
class Verdict:
    label: str  # "" to admit
    reply: bytes = b""


ADMIT = Verdict("")


class ConnectionTable:
    """Open connections per client and per prefix, new-connection rates, pre-greet passes.

    A client is an IPv4 address or an IPv6 network (addresses.client_of). The open counts
    shrink as connections close; the other tables are purged by prune() and hold at most
    limits.max_tracked_clients entries each.
    """

    def __init__(self, config: Config):
        capacity = config.limits.max_tracked_clients
        self.pregreet_passed = BoundedTable(capacity)  # client -> expiry
        self.pregreet_failed = BoundedTable(capacity)  # client -> expiry: suspicious until then
        self.configure(config)
        self.total = 0
        self.per_ip: dict[str, int] = defaultdict(int)
        self.per_prefix: dict[str, int] = defaultdict(int)

    def configure(self, config: Config) -> None:
        self.config = config
        self.limits = config.limits
        self.allowlist = config.allowlist
        self.buckets = BoundedTable(self.limits.max_tracked_clients)  # rates may have changed
        self.pregreet_passed.capacity = self.pregreet_failed.capacity = self.buckets.capacity
        hostname = config.hostname
        self.reply_cap = f"421 4.7.0 {hostname} Too many connections, try later\r\n".encode()
        self.reply_rate = f"421 4.7.0 {hostname} Connection rate limit exceeded, try later\r\n".encode()
        self.reply_pregreet = f"554 5.5.1 {hostname} Protocol error: talked before the greeting\r\n".encode()
        self.banner = replies.banner(hostname).wire
        self.reply_timeout = replies.timed_out(hostname).wire

    # --- classification ---------------------------------------------------------

    def is_allowlisted(self, ip: str) -> bool:
        if not self.allowlist:
            return False
        address = ipaddress.ip_address(ip)
        return any(address in network for network in self.allowlist)

    def client_of(self, ip: str) -> str:
        return client_of(ip, self.limits.ipv6_client_prefix)

    def prefix_of(self, ip: str) -> str:
        return prefix_of_text(ip, self.limits.ipv4_prefix, self.limits.ipv6_prefix)

    @property
    def stressed(self) -> bool:
        return self.total >= self.limits.stress_threshold * self.limits.max_connections

    def needs_pregreet(self, ip: str, now: float) -> bool:
        if self.limits.pregreet_delay <= 0:
            return False
        expiry = self.pregreet_passed.get(self.client_of(ip))
        return expiry is None or expiry < now

    def pregreet_pass(self, ip: str, now: float) -> None:
        self.note_pregreet(self.client_of(ip), True, now + self.limits.pregreet_ttl)

    def pregreet_fail(self, ip: str, now: float) -> None:
        self.note_pregreet(self.client_of(ip), False, now + self.limits.pregreet_ttl)

    def note_pregreet(self, client: str, passed: bool, expiry: float) -> None:
        """A client's pre-greet result, valid until expiry: this gate's own, or in a
        fleet another gate's."""
        if passed:
            self.pregreet_passed[client] = expiry
        else:
            self.pregreet_passed.pop(client, None)
            self.pregreet_failed[client] = expiry

    def pregreet_failed_recently(self, ip: str) -> bool:
        return self.client_of(ip) in self.pregreet_failed

    # --- admission --------------------------------------------------------------

    def judge(self, ip: str, now: float) -> Verdict:
        """Decide on a new connection from a client that is not allowlisted."""
        limits = self.limits
        client = self.client_of(ip)
        if self.total >= limits.max_connections:
            return Verdict("CONN_CAP", self.reply_cap)
        if self.per_ip.get(client, 0) >= limits.max_connections_per_ip:
            return Verdict("CONN_CAP_IP", self.reply_cap)
        if self.per_prefix.get(self.prefix_of(ip), 0) >= limits.max_connections_per_prefix:
            return Verdict("CONN_CAP_PREFIX", self.reply_cap)
        if not self._take_token(client, now):
            return Verdict("CONN_RATE", self.reply_rate)
        return ADMIT

    def _take_token(self, client: str, now: float) -> bool:
        bucket = self.buckets.get(client)
        if bucket is None:
            limits = self.limits
            bucket = self.buckets[client] = TokenBucket(
                limits.connection_rate_per_ip, limits.connection_burst_per_ip, now)
        return bucket.take(now)

    def opened(self, ip: str, counted: bool) -> None:
        self.total += 1
        if counted:
            self.per_ip[self.client_of(ip)] += 1
            self.per_prefix[self.prefix_of(ip)] += 1

    def closed(self, ip: str, counted: bool) -> None:
        self.total -= 1
        if counted:
            _decrement(self.per_ip, self.client_of(ip))
            _decrement(self.per_prefix, self.prefix_of(ip))

    def prune(self, now: float) -> None:
        """Forget full token buckets and expired pre-greet passes (bounded memory)."""
        self.buckets.drop_where(lambda bucket: bucket.is_full(now))
        self.pregreet_passed.drop_where(lambda expiry: expiry < now)
        self.pregreet_failed.drop_where(lambda expiry: expiry < now)

    def take_evictions(self) -> dict[str, int]:
        """Entries dropped because a table was full, per table, since the last call."""
        return {"pregreet": (self.pregreet_passed.take_evictions()
                             + self.pregreet_failed.take_evictions()),
                "connection_rate": self.buckets.take_evictions()}


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
