"""Counters for Prometheus.

Workers count locally (`Tally`) and ship the deltas to the admission process
every second; the admission process owns the registry and serves it on the
management address. So one endpoint shows the whole gate, with no shared memory.
"""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client import Counter as PromCounter

from .config import HostPort

# Tally keys: "reason:<LABEL>" for refusals and decisions, "evicted:<table>" for entries
# a full per-client table dropped, plus these.
RELAYED = "relayed"
RELAYED_BYTES = "relayed_bytes"
BACKEND_ERRORS = "backend_errors"
SESSIONS = "sessions"
DIRECTORY_CACHE_HITS = "directory_cache_hits"
DIRECTORY_CACHE_MISSES = "directory_cache_misses"


class Tally:
    """Counts in one process, drained as deltas."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, key: str, amount: int = 1) -> None:
        if amount:
            self.counts[key] += amount

    def reason(self, label: str) -> None:
        self.counts["reason:" + label] += 1

    def evicted(self, evictions: dict[str, int]) -> None:
        for table, amount in evictions.items():
            self.add("evicted:" + table, amount)

    def drain(self) -> dict[str, int]:
        counts = dict(self.counts)
        self.counts.clear()
        return counts


class Registry:
    """The Prometheus view, fed with tallies from every process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reasons = PromCounter(
            "portcullis_decisions", "Refusals and policy decisions, by reason label",
            ["reason"], registry=self.registry)
        self.relayed = PromCounter(
            "portcullis_messages_relayed", "Messages the backend accepted",
            registry=self.registry)
        self.relayed_bytes = PromCounter(
            "portcullis_relayed_bytes", "Message bytes the backend accepted",
            registry=self.registry)
        self.backend_errors = PromCounter(
            "portcullis_backend_errors", "Backend connections or replies that failed",
            registry=self.registry)
        self.sessions = PromCounter(
            "portcullis_sessions", "SMTP sessions served by workers", registry=self.registry)
        self.directory_cache_hits = PromCounter(
            "portcullis_directory_cache_hits", "Recipient lookups answered from the cache",
            registry=self.registry)
        self.directory_cache_misses = PromCounter(
            "portcullis_directory_cache_misses", "Recipient lookups that asked the directory",
            registry=self.registry)
        self.evictions = PromCounter(
            "portcullis_state_evictions",
            "Entries dropped because a per-client table was full (limits.max_tracked_clients)",
            ["table"], registry=self.registry)
        self.active = Gauge(
            "portcullis_active_connections", "Connections open now", registry=self.registry)
        self.stress = Gauge(
            "portcullis_stress_mode", "1 while the gate is in stress mode", registry=self.registry)
        self._plain = {
            RELAYED: self.relayed,
            RELAYED_BYTES: self.relayed_bytes,
            BACKEND_ERRORS: self.backend_errors,
            SESSIONS: self.sessions,
            DIRECTORY_CACHE_HITS: self.directory_cache_hits,
            DIRECTORY_CACHE_MISSES: self.directory_cache_misses,
        }

    def merge(self, counts: dict[str, int]) -> None:
        for key, amount in counts.items():
            if key.startswith("reason:"):
                self.reasons.labels(key[7:]).inc(amount)
            elif key.startswith("evicted:"):
                self.evictions.labels(key[8:]).inc(amount)
            elif key in self._plain:
                self._plain[key].inc(amount)

    def serve(self, listen: HostPort) -> None:
        start_http_server(listen.port, listen.host, registry=self.registry)
