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

from .addresses import TokenBucket, prefix_of_text
from .config import Config


@dataclass(frozen=True, slots=True)
class Verdict:
    label: str  # "" to admit
    reply: bytes = b""


ADMIT = Verdict("")


class ConnectionTable:
    """Open connections per client and per prefix, new-connection rates, pre-greet passes."""

    def __init__(self, config: Config):
        self.configure(config)
        self.total = 0
        self.per_ip: dict[str, int] = defaultdict(int)
        self.per_prefix: dict[str, int] = defaultdict(int)
        self.pregreet_passed: dict[str, float] = {}  # ip -> expiry
        self.pregreet_failed: dict[str, float] = {}  # ip -> expiry: suspicious until then

    def configure(self, config: Config) -> None:
        self.buckets: dict[str, TokenBucket] = {}  # rates may have changed
        self.config = config
        self.limits = config.limits
        self.allowlist = config.allowlist
        hostname = config.hostname
        self.reply_cap = f"421 4.7.0 {hostname} Too many connections, try later\r\n".encode()
        self.reply_rate = f"421 4.7.0 {hostname} Connection rate limit exceeded, try later\r\n".encode()
        self.reply_pregreet = f"554 5.5.1 {hostname} Protocol error: talked before the greeting\r\n".encode()

    # --- classification ---------------------------------------------------------

    def is_allowlisted(self, ip: str) -> bool:
        if not self.allowlist:
            return False
        address = ipaddress.ip_address(ip)
        return any(address in network for network in self.allowlist)

    def prefix_of(self, ip: str) -> str:
        return prefix_of_text(ip, self.limits.ipv4_prefix, self.limits.ipv6_prefix)

    @property
    def stressed(self) -> bool:
        return self.total >= self.limits.stress_threshold * self.limits.max_connections

    def needs_pregreet(self, ip: str, now: float) -> bool:
        if self.limits.pregreet_delay <= 0:
            return False
        expiry = self.pregreet_passed.get(ip)
        return expiry is None or expiry < now

    def pregreet_pass(self, ip: str, now: float) -> None:
        self.pregreet_passed[ip] = now + self.limits.pregreet_ttl

    def pregreet_fail(self, ip: str, now: float) -> None:
        self.pregreet_passed.pop(ip, None)
        self.pregreet_failed[ip] = now + self.limits.pregreet_ttl

    def pregreet_failed_recently(self, ip: str) -> bool:
        return ip in self.pregreet_failed

    # --- admission --------------------------------------------------------------

    def judge(self, ip: str, now: float) -> Verdict:
        """Decide on a new connection from a client that is not allowlisted."""
        limits = self.limits
        if self.total >= limits.max_connections:
            return Verdict("CONN_CAP", self.reply_cap)
        if self.per_ip.get(ip, 0) >= limits.max_connections_per_ip:
            return Verdict("CONN_CAP_IP", self.reply_cap)
        if self.per_prefix.get(self.prefix_of(ip), 0) >= limits.max_connections_per_prefix:
            return Verdict("CONN_CAP_PREFIX", self.reply_cap)
        if not self._take_token(ip, now):
            return Verdict("CONN_RATE", self.reply_rate)
        return ADMIT

    def _take_token(self, ip: str, now: float) -> bool:
        bucket = self.buckets.get(ip)
        if bucket is None:
            limits = self.limits
            bucket = self.buckets[ip] = TokenBucket(
                limits.connection_rate_per_ip, limits.connection_burst_per_ip, now)
        return bucket.take(now)

    def opened(self, ip: str, counted: bool) -> None:
        self.total += 1
        if counted:
            self.per_ip[ip] += 1
            self.per_prefix[self.prefix_of(ip)] += 1

    def closed(self, ip: str, counted: bool) -> None:
        self.total -= 1
        if counted:
            _decrement(self.per_ip, ip)
            _decrement(self.per_prefix, self.prefix_of(ip))

    def prune(self, now: float) -> None:
        """Forget full token buckets and expired pre-greet passes (bounded memory)."""
        for ip in [ip for ip, bucket in self.buckets.items() if bucket.is_full(now)]:
            del self.buckets[ip]
        for remembered in (self.pregreet_passed, self.pregreet_failed):
            for ip in [ip for ip, expiry in remembered.items() if expiry < now]:
                del remembered[ip]


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
