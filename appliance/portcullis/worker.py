"""A worker process: receives admitted sockets from the gate and runs their sessions."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from collections import deque

from . import config as configuration
from . import metrics, tls
from .config import Config, ConfigError
from .firewall import BanClient
from .metrics import Tally, TimedDirectory
from .policy import reputation
from .policy.dha import DhaEngine
from .policy.dns_checks import DnsChecker
from .policy.greylist import Greylist
from .policy.rates import ClientRates
from .policy.recipients import StaticRecipients
from .session import Client, Services, Session
from .stream import ByteStream
from .upstream import BackendPool

log = logging.getLogger("portcullis.worker")

REPORT_INTERVAL = 1.0
# Sessions that end within this long of each other are reported "done" together: one
# message to the gate (and one wake-up of it) per batch, not per session, under load.
DONE_BATCH_DELAY = 0.005
SHUTDOWN_GRACE = 10.0
MAX_DONE_PER_REPORT = 2000  # keeps a report well inside the gate's 64 KiB read


def recipient_directory(config: Config):
    if config.recipients.source == "ldap":
        from .policy.ldap_directory import LdapRecipientDirectory
        return LdapRecipientDirectory(config.recipients.ldap)
    return StaticRecipients(config.recipients.file)


def make_services(config: Config, tally: Tally, store: reputation.ReputationStore,
                  bans: BanClient | None) -> Services:
    """Everything a worker's sessions share; ConfigError when a part cannot be set up."""
    return Services(
        config=config,
        recipients=TimedDirectory(recipient_directory(config), tally),
        backend=BackendPool(config.backend),
        tls=tls.server_context(config.tls, config.hostname),
        tally=tally,
        dha=DhaEngine(config, store, bans.request_ban if bans else None),
        dns=DnsChecker(config.dns),
        greylist=Greylist(config, store, lambda event: tally.add("greylist:" + event)),
        rates=ClientRates(config, store),
    )


class WorkerProcess:
    def __init__(self, config: Config, config_path: str, control: socket.socket):
        self.config_path = config_path
        self.control = control
        self.loop = asyncio.get_event_loop()
        self.tally = Tally()
        self._directory_counts = (0, 0)  # cache hits and misses already reported
        self.done: list[int] = []
        self.outbox: deque[bytes] = deque()  # reports waiting for room on the control socket
        self._waiting_to_send = False
        self.sessions: set[asyncio.Task] = set()
        self.store = reputation.open_store(config)
        self.bans = BanClient(config.ban_socket) if config.ban_socket else None
        self.services = self._services(config)

    def _services(self, config: Config) -> Services:
        return make_services(config, self.tally, self.store, self.bans)

    async def run(self) -> None:
        self.control.setblocking(False)
        self.loop.add_reader(self.control.fileno(), self._receive)
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        stop = asyncio.Event()
        self.loop.add_signal_handler(signal.SIGTERM, stop.set)
        self.loop.add_signal_handler(signal.SIGINT, stop.set)
        self._gate_gone = stop
        self.store.start()
        self.control.send(b'{"ready": true}')
        reporter = asyncio.ensure_future(self._report_periodically())
        await stop.wait()
        self.loop.remove_reader(self.control.fileno())
        if self.sessions:
            await asyncio.wait(self.sessions, timeout=SHUTDOWN_GRACE)
        reporter.cancel()
        self.control.settimeout(1.0)  # the last reports wait for room, within reason
        self._report()
        await self.store.aclose()
        if self.bans:
            await self.bans.close()

    def reload(self) -> None:
        try:
            config = configuration.load(self.config_path)
            services = self._services(config)
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        old = self.services
        self._tally_directory()
        self.services = services  # new sessions use it; running ones finish with theirs
        self._directory_counts = (0, 0)
        old.recipients.close()
        log.info("configuration reloaded")

    def _receive(self) -> None:
        while True:
            try:
                header, fds, _flags, _addr = socket.recv_fds(self.control, 4096, 4)
            except BlockingIOError:
                return
            except OSError:
                header, fds = b"", []
            if not header:
                log.error("the gate went away; stopping")
                self._gate_gone.set()
                return
            if not fds:
                continue
            info = json.loads(header)
            sock = socket.socket(fileno=fds[0])
            for extra in fds[1:]:
                socket.socket(fileno=extra).close()
            task = asyncio.ensure_future(self._serve(sock, info))
            self.sessions.add(task)
            task.add_done_callback(self.sessions.discard)

    async def _serve(self, sock: socket.socket, info: dict) -> None:
        try:
            connection = ByteStream()
            await self.loop.connect_accepted_socket(lambda: connection, sock)
            client = Client(info["ip"], info["port"], info["stress"], info["allowlisted"],
                            info["pregreet_failed"])
            await Session(self.services, connection, client,
                          info.get("session", str(info["id"])), info.get("start"),
                          greeted=True).run()
        except Exception:  # one broken session must never take the worker down
            log.exception("session for %s failed", info.get("ip"))
            sock.close()
        finally:
            # The gate's per-client counts wait for this; batch what ends together.
            if not self.done:
                self.loop.call_later(DONE_BATCH_DELAY, self._report)
            self.done.append(info["id"])

    async def _report_periodically(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            dha = self.services.dha
            dha.housekeeping()  # an idle worker forgets too
            self.tally.evicted(dha.take_evictions())
            self.tally.store(self.store.take_counts())
            self._report()

    def _tally_directory(self) -> None:
        """Add the directory's cache hits and misses since the last report (LDAP only)."""
        directory = self.services.recipients
        hits, misses = getattr(directory, "cache_hits", 0), getattr(directory, "cache_misses", 0)
        seen_hits, seen_misses = self._directory_counts
        self.tally.add(metrics.DIRECTORY_CACHE_HITS, hits - seen_hits)
        self.tally.add(metrics.DIRECTORY_CACHE_MISSES, misses - seen_misses)
        self._directory_counts = (hits, misses)

    def _report(self) -> None:
        self._tally_directory()
        done, self.done = self.done, []
        for start in range(0, len(done), MAX_DONE_PER_REPORT):
            self.outbox.append(json.dumps({"done": done[start:start + MAX_DONE_PER_REPORT]})
                               .encode())
        report = self.tally.drain()  # counts and histogram buckets: bounded in size
        if report:
            self.outbox.append(json.dumps(report).encode())
        self._send_reports()

    def _send_reports(self) -> None:
        """Send queued reports in order; when the socket is full, go on once it drains.
        A lost `done` would leave its connection counted in the gate until restart."""
        fd = self.control.fileno()
        while self.outbox:
            try:
                self.control.send(self.outbox[0])
            except BlockingIOError:
                if not self._waiting_to_send:
                    self._waiting_to_send = True
                    self.loop.add_writer(fd, self._send_reports)
                return
            except OSError as e:
                log.error("cannot report to the gate: %s", e)
                return
            self.outbox.popleft()
        if self._waiting_to_send:
            self._waiting_to_send = False
            self.loop.remove_writer(fd)
