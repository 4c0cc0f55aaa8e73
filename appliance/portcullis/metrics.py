"""Metrics for Prometheus, and the management endpoint that serves them.

Workers count locally (`Tally`: counters, and histograms as bucket counts) and ship
the deltas to the admission process every second; the admission process owns the
registry and serves it on `metrics.listen`: `/metrics`, `/healthz`, 404 otherwise.
So one endpoint shows the whole gate, with no shared memory.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from . import __version__, upstream
from .addresses import listening_socket
from .config import Backend, HostPort

# Tally keys: "reason:<LABEL>" for refusals and decisions, "evicted:<table>" for entries
# a full per-client table dropped, "store:<event>" and "greylist:<event>", plus these.
RELAYED = "relayed"
RELAYED_BYTES = "relayed_bytes"
BACKEND_ERRORS = "backend_errors"
BACKEND_OPENED = "backend_opened"  # a message's backend transaction on a new connection
BACKEND_REUSED = "backend_reused"  # ... on a pooled one
SESSIONS = "sessions"
DIRECTORY_CACHE_HITS = "directory_cache_hits"
DIRECTORY_CACHE_MISSES = "directory_cache_misses"

# Every reason label the code gives (tests/unit/test_monitoring.py checks the list against
# the source), so each portcullis_decisions_total series exists from the start.
REASONS = (
    # admission (gate.py, admission.py, policy/dha.py)
    "BANNED", "CONN_CAP", "CONN_CAP_IP", "CONN_CAP_PREFIX", "CONN_RATE", "PREGREET", "HANGUP",
    "NO_WORKER",
    # the SMTP core: strikes and refusals
    "LINE_TOO_LONG", "BAD_BYTES", "UNKNOWN_COMMAND", "BAD_SEQUENCE", "SYNTAX", "ADDRESS_ROUTING",
    "BARE_LF", "SIZE", "TOO_MANY_RECIPIENTS", "TOO_MANY_COMMANDS",
    # how a session ended
    "IDLE_TIMEOUT", "DATA_TOO_SLOW", "SESSION_DEADLINE", "WRITE_TIMEOUT", "DISCONNECT",
    "TLS_FAILED", "INTERNAL_ERROR",
    # policy: recipients, DNS and HELO checks
    "RELAY_DENIED", "UNKNOWN_RCPT", "DIRECTORY_TEMPFAIL", "FCRDNS_FAIL", "DNSBL", "DNSBL_RANK",
    "DNSWL", "DNS_TIMEOUT", "DNS_ERROR", "HELO_SYNTAX", "HELO_NOT_FQDN", "HELO_OURS",
    "HELO_BARE_IP", "HELO_LITERAL_MISMATCH",
    # harvest defence and score
    "DHA_TARPIT", "DHA_SUSPECT", "DHA_BAN", "SCORE_TARPIT", "SCORE_TEMPFAIL", "SCORE_BAN",
    "GREYLISTED", "MSG_RATE", "RCPT_RATE", "TLS_RATE",
    # the backend
    "BACKEND_DOWN", "BACKEND_REFUSED", "BACKEND_SENDER_REFUSED",
)
# The per-client tables that count evictions (admission.py, policy/dha.py, reputation.py).
EVICTION_TABLES = ("pregreet", "connection_rate", "harvest", "bans", "ban_pushes", "greylist",
                   "rates")
GREYLIST_EVENTS = ("seen", "passed", "expired")  # policy/greylist.py
# What a fleet's reputation store counts (policy/fleet.py).
STORE_EVENTS = ("round_trips", "outages", "dropped", "rejected", "bad_messages")


class HistogramSpec(NamedTuple):
    name: str
    documentation: str
    bounds: tuple[float, ...]


# Tally keys of the histograms workers observe.
SESSION_DURATION = "session_duration"
BACKEND_REPLY = "backend_reply"
RECIPIENT_LOOKUP = "recipient_lookup"
HISTOGRAMS = {
    SESSION_DURATION: HistogramSpec(
        "portcullis_session_duration_seconds", "SMTP sessions a worker served, from accept to close",
        (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)),
    BACKEND_REPLY: HistogramSpec(
        "portcullis_backend_reply_seconds",
        "Time a client's RCPT, DATA or end-of-data answer waited on the backend "
        "(a message's first RCPT includes connecting and MAIL)",
        (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)),
    RECIPIENT_LOOKUP: HistogramSpec(
        "portcullis_recipient_lookup_seconds", "Recipient directory lookups (cached or not)",
        (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
         2.5, 5)),
}

PROBE_INTERVAL = 5.0  # seconds a backend probe's answer is reused
PROBE_TIMEOUT = 3.0
REQUEST_LIMIT = 8192  # octets of an HTTP request head
REQUEST_TIMEOUT = 10.0


class Tally:
    """Counts and histogram observations in one process, drained as deltas."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        # histogram key -> observations per bucket (the last one +Inf), then their sum
        self.histograms: dict[str, list[float]] = {}

    def add(self, key: str, amount: int = 1) -> None:
        if amount:
            self.counts[key] += amount

    def reason(self, label: str) -> None:
        self.counts["reason:" + label] += 1

    def evicted(self, evictions: dict[str, int]) -> None:
        for table, amount in evictions.items():
            self.add("evicted:" + table, amount)

    def store(self, counts: dict[str, int]) -> None:
        """A reputation store's own counters (ReputationStore.take_counts)."""
        for name, amount in counts.items():
            self.add("store:" + name, amount)

    def observe(self, histogram: str, seconds: float) -> None:
        bounds = HISTOGRAMS[histogram].bounds
        shipped = self.histograms.setdefault(histogram, [0] * (len(bounds) + 2))
        shipped[bisect_left(bounds, seconds)] += 1
        shipped[-1] += seconds

    def drain(self) -> dict:
        """A report of what was counted since the last drain ({} when nothing was)."""
        report: dict = {}
        if self.counts:
            report["tally"] = dict(self.counts)
        if self.histograms:
            report["histograms"] = self.histograms
        self.counts.clear()
        self.histograms = {}
        return report


class TimedDirectory:
    """A recipient directory whose lookups are observed in the lookup histogram."""

    def __init__(self, directory, tally: Tally):
        self.directory = directory
        self.tally = tally

    async def lookup(self, address: str):
        started = time.monotonic()
        try:
            return await self.directory.lookup(address)
        finally:
            self.tally.observe(RECIPIENT_LOOKUP, time.monotonic() - started)

    def __getattr__(self, name: str):  # reload, close, cache counts
        return getattr(self.directory, name)


class MergedHistogram:
    """A histogram summed from the bucket counts workers ship (a custom collector:
    prometheus_client's Histogram cannot take counts)."""

    def __init__(self, spec: HistogramSpec):
        self.spec = spec
        self.counts = [0] * (len(spec.bounds) + 1)
        self.sum = 0.0

    def merge(self, shipped: list[float]) -> None:
        if len(shipped) != len(self.counts) + 1:
            return  # another version's buckets
        for index, amount in enumerate(shipped[:-1]):
            self.counts[index] += int(amount)
        self.sum += shipped[-1]

    def collect(self):
        cumulative = list(itertools.accumulate(self.counts))
        buckets = [(floatToGoString(bound), count)
                   for bound, count in zip(self.spec.bounds, cumulative, strict=False)]
        buckets.append(("+Inf", cumulative[-1]))
        yield HistogramMetricFamily(self.spec.name, self.spec.documentation, buckets=buckets,
                                    sum_value=self.sum)


class WorkerUsage:
    """CPU and memory of the worker processes, summed (process_* is the gate's own)."""

    TICKS = os.sysconf("SC_CLK_TCK")
    PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self) -> None:
        self.pids: Callable[[], list[int]] = list

    def collect(self):
        cpu = memory = 0.0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    values = stat.read().rsplit(")", 1)[1].split()  # from field 3, state
            except OSError:
                continue
            cpu += (int(values[11]) + int(values[12])) / self.TICKS  # utime, stime
            memory += int(values[21]) * self.PAGE  # rss
        yield CounterMetricFamily(
            "portcullis_workers_cpu_seconds",
            "CPU time of the running workers, summed (falls when a worker restarts)", value=cpu)
        yield GaugeMetricFamily(
            "portcullis_workers_resident_memory_bytes", "Resident memory of the workers, summed",
            value=memory)


async def backend_answers(backend: Backend, timeout: float) -> bool:
    """Whether any backend server greets with 220."""
    for server in backend.servers:
        answered, _ = await upstream.greeting(server, backend, timeout)
        if answered:
            return True
    return False


class BackendProbe:
    """Backend reachability, probed at most every PROBE_INTERVAL seconds; whoever asks
    meanwhile shares the last answer or the running probe. Sets portcullis_backend_up."""

    def __init__(self, gauge: Gauge):
        self.gauge = gauge
        self.up = False
        self._due = 0.0
        self._running: asyncio.Future | None = None

    async def reachable(self, backend: Backend) -> bool:
        if self._running is None and time.monotonic() >= self._due:
            self._running = asyncio.ensure_future(self._probe(backend))
        if self._running is not None:
            await asyncio.shield(self._running)
        return self.up

    async def _probe(self, backend: Backend) -> None:
        try:
            self.up = await backend_answers(backend, min(backend.connect_timeout, PROBE_TIMEOUT))
        finally:
            self.gauge.set(1 if self.up else 0)
            self._due = time.monotonic() + PROBE_INTERVAL
            self._running = None


class Registry:
    """The Prometheus view, fed with tallies from every process."""

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series
        registry = self.registry = CollectorRegistry()

        def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> PromCounter:
            return PromCounter(name, documentation, labels, registry=registry)

        def gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, documentation, labels, registry=registry)

        self.reasons = counter("portcullis_decisions", "Refusals and policy decisions, by reason label",
                               ("reason",))
        self.relayed = counter("portcullis_messages_relayed", "Messages the backend accepted")
        self.relayed_bytes = counter("portcullis_relayed_bytes", "Message bytes the backend accepted")
        self.backend_errors = counter("portcullis_backend_errors",
                                      "Backend connections or replies that failed")
        self.sessions = counter("portcullis_sessions", "SMTP sessions served by workers")
        self.backend_opened = counter("portcullis_backend_connections_opened",
                                      "Backend transactions begun on a new connection")
        self.backend_reused = counter("portcullis_backend_connections_reused",
                                      "Backend transactions begun on a pooled connection")
        self.directory_cache_hits = counter("portcullis_directory_cache_hits",
                                            "Recipient lookups answered from the cache")
        self.directory_cache_misses = counter("portcullis_directory_cache_misses",
                                              "Recipient lookups that asked the directory")
        self.evictions = counter(
            "portcullis_state_evictions",
            "Entries dropped because a per-client table was full (limits.max_tracked_clients)",
            ("table",))
        self.store_counts = counter(
            "portcullis_reputation_store",
            "A fleet's reputation store (reputation.store: redis), by event: round_trips "
            "(exchanges with the server), outages (times it was lost), dropped (writes lost "
            "to a full queue while it was away), rejected (writes the server refused), "
            "bad_messages (unreadable on the channel or in the store)",
            ("event",))
        self.store_shared = gauge(
            "portcullis_reputation_store_shared",
            "1 while the admission process shares state through the fleet's store; 0 while "
            "it counts locally, or when the store is not a fleet's")
        self.greylist = counter(
            "portcullis_greylist",
            "Greylisting's triplets (greylist.enabled), by event: seen (a first attempt, "
            "answered 451), passed (a retry in time), expired (a retry after the window)",
            ("event",))
        self.worker_restarts = counter("portcullis_worker_restarts",
                                       "Workers that exited and were started again")
        for label in REASONS:
            self.reasons.labels(label)
        for table in EVICTION_TABLES:
            self.evictions.labels(table)
        for event in STORE_EVENTS:
            self.store_counts.labels(event)
        for event in GREYLIST_EVENTS:
            self.greylist.labels(event)
        self.active = gauge("portcullis_active_connections", "Connections open now")
        self.stress = gauge("portcullis_stress_mode", "1 while the gate is in stress mode")
        self.backend_up = gauge("portcullis_backend_up",
                                "1 when a backend server answered the last probe with 220")
        self.certificate_expiry = gauge(
            "portcullis_tls_certificate_expiry_timestamp_seconds",
            "When the STARTTLS certificate expires (Unix time)", ("file",))
        Info("portcullis_build", "The running version", registry=registry).info(
            {"version": __version__})
        ProcessCollector(registry=registry)
        self.worker_usage = WorkerUsage()
        registry.register(self.worker_usage)
        self.histograms = {key: MergedHistogram(spec) for key, spec in HISTOGRAMS.items()}
        for histogram in self.histograms.values():
            registry.register(histogram)
        self.backend = BackendProbe(self.backend_up)
        # Tally keys "<prefix>:<label>": a series of a labelled counter (see Tally).
        self._labelled = {"reason": self.reasons, "evicted": self.evictions,
                          "store": self.store_counts, "greylist": self.greylist}
        self._plain = {
            RELAYED: self.relayed,
            RELAYED_BYTES: self.relayed_bytes,
            BACKEND_ERRORS: self.backend_errors,
            BACKEND_OPENED: self.backend_opened,
            BACKEND_REUSED: self.backend_reused,
            SESSIONS: self.sessions,
            DIRECTORY_CACHE_HITS: self.directory_cache_hits,
            DIRECTORY_CACHE_MISSES: self.directory_cache_misses,
        }

    def merge(self, report: dict) -> None:
        """Add a Tally's drained report."""
        for key, amount in report.get("tally", {}).items():
            prefix, labelled, label = key.partition(":")
            if labelled and prefix in self._labelled:
                self._labelled[prefix].labels(label).inc(amount)
            elif key in self._plain:
                self._plain[key].inc(amount)
        for key, shipped in report.get("histograms", {}).items():
            if key in self.histograms:
                self.histograms[key].merge(shipped)

    def certificate(self, found: tuple[str, float] | None) -> None:
        """The STARTTLS certificate file and its expiry, or None with TLS off."""
        self.certificate_expiry.clear()
        if found:
            self.certificate_expiry.labels(found[0]).set(found[1])

    async def serve(self, listen: HostPort, health: Callable[[], Awaitable[str]]) -> None:
        """Serve /metrics and /healthz; `health` says why the gate cannot take mail ("" if
        it can), and refreshes the backend probe before each scrape too."""
        def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Awaitable[None]:
            return self._serve(reader, writer, health)

        if listen.host == "::":  # every address, IPv4 too (config.py)
            self.server = await asyncio.start_server(handle, None, listen.port,
                                                     limit=REQUEST_LIMIT, reuse_address=True)
            return
        # One address (the management one, by DHCP perhaps): bound before it is up.
        self.server = await asyncio.start_server(
            handle, sock=listening_socket(listen.host, listen.port), limit=REQUEST_LIMIT)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     health: Callable[[], Awaitable[str]]) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                method, path = _request_line(head)
                if method not in ("GET", "HEAD"):
                    status, content_type, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
                elif path == "/metrics":
                    await health()
                    status, content_type, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(
                        self.registry)
                elif path == "/healthz":
                    reason = await health()
                    status = "503 Service Unavailable" if reason else "200 OK"
                    content_type = "application/json"
                    body = json.dumps({"status": "unavailable", "reason": reason} if reason
                                      else {"status": "ok"}).encode() + b"\n"
                else:
                    status, content_type, body = "404 Not Found", "text/plain", b"not found\n"
                writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                             f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                             + (body if method != "HEAD" else b""))
                await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


def _request_line(head: bytes) -> tuple[str, str]:
    """Method and path (without the query) of an HTTP request head; ValueError if bad."""
    method, target, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    return method, target.split("?", 1)[0]
