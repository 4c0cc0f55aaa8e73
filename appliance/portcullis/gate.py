"""The gate process: listens, admits or refuses, greets, and hands sockets to workers.

Workers are separate processes (`portcullis worker`), each joined to the gate by a
SOCK_SEQPACKET pair. The gate sends each admitted socket with SCM_RIGHTS and a
small JSON header; a worker answers "done" when the session ends and ships its
counters every second. The gate alone holds the per-client state, so the limits
hold across workers, and it alone serves the metrics.

The gate also sends the banner and holds the connection until the client's first
command arrives, which it leaves unread for the worker (as postscreen holds a client
until it passes). A client that never speaks costs about 1.5 KiB here, and
nothing in a worker, however many there are.
"""

from __future__ import annotations

import array
import asyncio
import functools
import json
import logging
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from . import config as configuration
from . import logs, tls
from .addresses import canonical, listening_socket
from .admission import ConnectionTable
from .config import Config, ConfigError
from .deadlines import deadlines
from .firewall import BanClient
from .metrics import Registry, Tally
from .operator import StatusWriter
from .policy import reputation
from .policy.dha import DhaEngine

log = logging.getLogger("portcullis.gate")

CONTROL_MESSAGE = 65536
CONTROL_BUFFER = 1 << 20  # room for a burst of handed-over sockets
RESPAWN_DELAY = 1.0
HOUSEKEEPING_INTERVAL = 1.0  # seconds between purges and metric updates


NO_WORKER_REPLY = b"421 4.3.2 Service temporarily unavailable\r\n"


@dataclass
class Worker:
    number: int
    process: subprocess.Popen
    control: socket.socket
    generation: int  # of the configuration it started with
    active: int = 0
    ready: bool = False  # its signal handlers are installed
    # Admitted sockets waiting for room on the control socket, oldest first.
    outbox: deque[tuple[bytes, socket.socket, Connection]] = field(default_factory=deque)
    waiting_to_write: bool = False


@dataclass(slots=True)
class Connection:
    ip: str
    port: int
    session: str  # its id in the gate's refusal line or the worker's session line
    started: float  # Unix time of the accept
    counted: bool = False  # counted against the per-client caps (not allowlisted)
    worker: Worker | None = None
    silence: functools.partial | None = None  # called if a greeted client says nothing


@dataclass
class Listener:
    sock: socket.socket
    address: str


@dataclass
class Gate:
    config: Config
    config_path: str
    table: ConnectionTable = field(init=False)
    registry: Registry = field(default_factory=Registry)
    workers: list[Worker] = field(default_factory=list)
    listeners: list[Listener] = field(default_factory=list)
    connections: dict[int, Connection] = field(default_factory=dict)
    next_id: int = 0
    generation: int = 0  # bumped by each successful reload
    stopping: bool = False
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))  # session id prefix

    def __post_init__(self) -> None:
        self.table = ConnectionTable(self.config)
        self.loop = asyncio.get_event_loop()
        self.store = reputation.open_store(self.config, read_events=False)  # bans only
        self.bans = BanClient(self.config.ban_socket) if self.config.ban_socket else None
        self.dha = self._dha_engine(self.config)
        # A fleet's store tells of other gates' bans and pre-greet results (self.dha is
        # replaced on reload: look it up each time).
        self.store.on_ban = lambda ban: self.dha.enforce(ban)
        self.store.on_unban = self._fleet_unban
        self.store.on_pregreet = self._fleet_pregreet
        self.refusals = logs.RateLimitedLines(log)  # a flood must not flood the journal
        self.registry.worker_usage.pids = lambda: [w.process.pid for w in self.workers
                                                   if w.process.poll() is None]

    def _dha_engine(self, config: Config) -> DhaEngine:
        return DhaEngine(config, self.store, self.bans.request_ban if self.bans else None)

    # --- start and stop ---------------------------------------------------------

    def bind(self) -> None:
        for address in self.config.listen:
            try:
                sock = listening_socket(address.host, address.port)
            except OSError as e:
                raise ConfigError(f"key 'listen': cannot listen on {address}: {e.strerror}") from None
            sock.listen(self.config.limits.listen_backlog)
            sock.setblocking(False)
            self.listeners.append(Listener(sock, str(address)))

    async def run(self) -> None:
        tls.server_context(self.config.tls, self.config.hostname)  # fail early; make the pair once
        self.bind()
        for number in range(self.config.workers):
            self._spawn(number)
        # After the spawn: reading the expiry loads cryptography's x509, and the workers
        # (which take the banner) start meanwhile.
        self.registry.certificate(tls.certificate_expiry(self.config.tls, self.config.hostname))
        if self.config.metrics.listen:
            await self.registry.serve(self.config.metrics.listen, self.health)
        for listener in self.listeners:
            self.loop.add_reader(listener.sock.fileno(), self._accept, listener)
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._stopped = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self._stopped.set)
        log.info("listening on %s with %d workers",
                 ", ".join(l.address for l in self.listeners), len(self.workers))
        self.store.start()
        restored = self.dha.restore_bans()  # the nftables set is empty after a reboot
        if restored:
            log.info("sent %d active bans to the ban helper", restored)
        housekeeping = asyncio.ensure_future(self._housekeeping())
        await self._stopped.wait()
        housekeeping.cancel()
        await self.stop()

    async def stop(self) -> None:
        self.stopping = True
        for listener in self.listeners:
            self.loop.remove_reader(listener.sock.fileno())
            listener.sock.close()
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for worker in self.workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
        await self.store.aclose()
        if self.bans:
            await self.bans.close()
        self.refusals.flush(force=True)
        log.info("stopped")

    def reload(self) -> None:
        """SIGHUP: re-read the configuration; keep the old one if the new one is bad."""
        try:  # build everything from the new file first; swap only if all of it works
            new = configuration.load(self.config_path)
            dha = self._dha_engine(new)
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        if [str(a) for a in new.listen] != [str(a) for a in self.config.listen]:
            log.warning("listen addresses changed; they take effect on restart")
        if _store_settings(new) != _store_settings(self.config):
            log.warning("reputation.store, .sync_interval, .redis or limits.rate_time_unit "
                        "changed; they take effect on restart")
        self.config, self.dha = new, dha
        self.table.configure(new)
        self.registry.certificate(tls.certificate_expiry(new.tls, new.hostname))
        self.generation += 1
        for worker in self.workers:
            self._bring_up_to_date(worker)
        log.info("configuration reloaded")

    def _bring_up_to_date(self, worker: Worker) -> None:
        """Tell a worker to reload, once it can take the signal."""
        if worker.ready and worker.generation != self.generation and worker.process.poll() is None:
            worker.process.send_signal(signal.SIGHUP)
            worker.generation = self.generation

    # --- workers ----------------------------------------------------------------

    def _spawn(self, number: int) -> None:
        gate_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        gate_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CONTROL_BUFFER)
        worker_end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CONTROL_BUFFER)
        command = [sys.executable, "-m", "portcullis.cli", "worker",
                   "-c", self.config_path, "--control-fd", str(worker_end.fileno()),
                   "--number", str(number)]
        process = subprocess.Popen(command, pass_fds=[worker_end.fileno()])
        worker_end.close()
        gate_end.setblocking(False)
        worker = Worker(number, process, gate_end, self.generation)
        if number < len(self.workers):
            self.workers[number] = worker
        else:
            self.workers.append(worker)
        self.loop.add_reader(gate_end.fileno(), self._from_worker, worker)

    def _from_worker(self, worker: Worker) -> None:
        while True:
            try:
                message = worker.control.recv(CONTROL_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:
                self._worker_died(worker)
                return
            report = json.loads(message)
            if report.get("ready"):
                worker.ready = True
                self._bring_up_to_date(worker)
            for connection_id in report.get("done", ()):
                self._closed(connection_id)
            self.registry.merge(report)

    def _worker_died(self, worker: Worker) -> None:
        self.loop.remove_reader(worker.control.fileno())
        if worker.waiting_to_write:
            self.loop.remove_writer(worker.control.fileno())
        worker.control.close()
        while worker.outbox:
            _, sock, connection = worker.outbox.popleft()
            self._refuse(sock, connection, NO_WORKER_REPLY, "NO_WORKER")
        for connection_id in [i for i, c in self.connections.items() if c.worker is worker]:
            self._closed(connection_id)
        if self.stopping:
            return
        code = worker.process.wait()
        log.error("worker %d exited with status %s; starting a new one", worker.number, code)
        self.registry.worker_restarts.inc()
        self.loop.call_later(RESPAWN_DELAY, self._spawn, worker.number)

    def _pick_worker(self) -> Worker | None:
        alive = [w for w in self.workers if w.control.fileno() >= 0]
        return min(alive, key=lambda w: w.active, default=None)

    # --- connections ------------------------------------------------------------

    def _accept(self, listener: Listener) -> None:
        for _ in range(64):  # bounded batch per wake-up, fair to the other listeners
            try:
                sock, peer = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: back off instead of spinning
                log.error("accept failed: %s", e)
                self.loop.remove_reader(listener.sock.fileno())
                self.loop.call_later(0.5, self.loop.add_reader, listener.sock.fileno(),
                                     self._accept, listener)
                return
            sock.setblocking(False)
            self._admit(sock, str(canonical(peer[0])), peer[1])

    def _admit(self, sock: socket.socket, ip: str, port: int) -> None:
        now = time.monotonic()
        table = self.table
        connection_id = self.next_id
        self.next_id += 1
        allowlisted = table.is_allowlisted(ip)
        connection = Connection(ip, port, f"{self.run_id}-{connection_id}", time.time(),
                                counted=not allowlisted)
        if not allowlisted:
            banned = self.dha.check_connect(ip)
            if banned.reply is not None:
                self._refuse(sock, connection, banned.reply.encode(), banned.label)
                return
            verdict = table.judge(ip, now)
            if verdict.label:
                self._refuse(sock, connection, verdict.reply, verdict.label)
                return
        self.connections[connection_id] = connection
        table.opened(ip, connection.counted)
        if not allowlisted and table.needs_pregreet(ip, now):
            self._pregreet(sock, connection_id)
        else:
            self._greet(sock, connection_id)

    def _refuse(self, sock: socket.socket, connection: Connection, reply: bytes,
                label: str) -> None:
        """Send the reply (if any) and close; count the label and log the refusal."""
        self.registry.reasons.labels(label).inc()
        self.refusals.info(label, "refused", session=connection.session, client=connection.ip,
                           port=connection.port, start=logs.timestamp(connection.started),
                           labels={label: 1}, reply=reply.decode("ascii", "replace").strip())
        if reply:
            try:
                sock.send(reply)
            except OSError:
                pass
        sock.close()

    def _pregreet(self, sock: socket.socket, connection_id: int) -> None:
        """Wait silently before the banner; a client that talks first is refused."""
        fd = sock.fileno()
        connection = self.connections[connection_id]

        def talked() -> None:
            self.loop.remove_reader(fd)
            timer.cancel()
            try:
                early = sock.recv(512)
            except OSError:
                early = b""
            self._closed(connection_id)
            if early:
                self._pregreet_result(connection.ip, passed=False)
                self._refuse(sock, connection, self.table.reply_pregreet, "PREGREET")
            else:
                self._refuse(sock, connection, b"", "HANGUP")

        def waited() -> None:
            self.loop.remove_reader(fd)
            self._pregreet_result(connection.ip, passed=True)
            self._greet(sock, connection_id)

        self.loop.add_reader(fd, talked)
        timer = self.loop.call_later(self.config.limits.pregreet_delay, waited)

    def _pregreet_result(self, ip: str, passed: bool) -> None:
        """Remember a pre-greet result here, and share it with a fleet's other gates."""
        if passed:
            self.table.pregreet_pass(ip, time.monotonic())
        else:
            self.table.pregreet_fail(ip, time.monotonic())
        self.store.note_pregreet(self.table.client_of(ip), passed,
                                 time.time() + self.config.limits.pregreet_ttl)

    def _fleet_unban(self, key: str) -> None:
        """Another appliance lifted a ban: lift it in this kernel set too."""
        self.dha.lifted(key)
        if self.bans:
            self.bans.request_unban(key)

    def _fleet_pregreet(self, client: str, passed: bool, until: float) -> None:
        """Another gate's pre-greet result (until: wall-clock time)."""
        self.table.note_pregreet(client, passed, time.monotonic() + until - time.time())

    def _greet(self, sock: socket.socket, connection_id: int) -> None:
        """Send the banner, then wait for the client's first bytes without reading them;
        one that stays silent for the command timeout is told so and closed."""
        connection = self.connections[connection_id]
        try:
            sock.send(self.table.banner)
        except OSError:  # gone already
            self._closed(connection_id)
            self._refuse(sock, connection, b"", "HANGUP")
            return
        limits = self.config.limits
        timeout = limits.stress_command_timeout if self.table.stressed else limits.command_timeout
        silence = connection.silence = functools.partial(self._silent, sock, connection_id)
        slot = deadlines.add(silence, timeout)
        self.loop.add_reader(sock.fileno(), self._spoke, sock, connection_id, slot)

    def _spoke(self, sock: socket.socket, connection_id: int, slot: int) -> None:
        """The client's first bytes (or its close) arrived: on to a worker, unread."""
        self.loop.remove_reader(sock.fileno())
        connection = self.connections[connection_id]
        deadlines.remove(connection.silence, slot)
        connection.silence = None
        self._dispatch(sock, connection_id)

    def _silent(self, sock: socket.socket, connection_id: int) -> None:
        self.loop.remove_reader(sock.fileno())
        connection = self.connections[connection_id]
        connection.silence = None
        self._closed(connection_id)
        self._refuse(sock, connection, self.table.reply_timeout, "IDLE_TIMEOUT")

    def _dispatch(self, sock: socket.socket, connection_id: int) -> None:
        connection = self.connections[connection_id]
        worker = self._pick_worker()
        if worker is None:
            log.error("no worker is running to take a connection")
            self._closed(connection_id)
            self._refuse(sock, connection, NO_WORKER_REPLY, "NO_WORKER")
            return
        header = json.dumps({
            "id": connection_id, "session": connection.session, "start": connection.started,
            "ip": connection.ip, "port": connection.port,
            "stress": self.table.stressed, "allowlisted": not connection.counted,
            "pregreet_failed": self.table.pregreet_failed_recently(connection.ip),
        }).encode()
        connection.worker = worker
        worker.active += 1
        worker.outbox.append((header, sock, connection))
        if len(worker.outbox) == 1:
            self._hand_over(worker)

    def _hand_over(self, worker: Worker) -> None:
        """Send queued sockets to a worker; when its socket is full, wait until writable."""
        fd = worker.control.fileno()
        while worker.outbox:
            header, sock, _ = worker.outbox[0]
            try:
                worker.control.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   array.array("i", [sock.fileno()]))])
            except BlockingIOError:
                if not worker.waiting_to_write:
                    worker.waiting_to_write = True
                    self.loop.add_writer(fd, self._hand_over, worker)
                return
            except OSError as e:  # the worker is gone; _worker_died refuses the rest
                log.error("cannot hand a connection to worker %d: %s", worker.number, e)
                return
            worker.outbox.popleft()
            sock.close()
        if worker.waiting_to_write:
            worker.waiting_to_write = False
            self.loop.remove_writer(fd)

    def _closed(self, connection_id: int) -> None:
        connection = self.connections.pop(connection_id, None)
        if connection is None:
            return
        if connection.worker is not None:
            connection.worker.active -= 1
        self.table.closed(connection.ip, connection.counted)

    async def _housekeeping(self) -> None:
        evictions = Tally()
        status = StatusWriter()  # state_dir/status.json, for `portcullis status` and `bans`
        while True:
            status.write(self)
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            self.table.prune(time.monotonic())
            self.dha.housekeeping()
            evictions.evicted(self.table.take_evictions())
            evictions.evicted(self.dha.take_evictions())
            evictions.store(self.store.take_counts())
            self.registry.merge(evictions.drain())
            self.registry.store_shared.set(1 if self.store.shared else 0)
            self.registry.active.set(self.table.total)
            self.registry.stress.set(1 if self.table.stressed else 0)
            self.refusals.flush()

    async def health(self) -> str:
        """Why the gate cannot take mail now, or "" when it can (for /healthz)."""
        if self.stopping or not self.listeners:
            return "not listening"
        down = [w.number for w in self.workers
                if w.process.poll() is not None or w.control.fileno() < 0]
        if down or not self.workers:
            return f"workers not running: {down}"
        if not await self.registry.backend.reachable(self.config.backend):
            return "backend unreachable"
        return ""


def _store_settings(config: Config) -> tuple:
    """What the reputation store was opened with: only a restart reopens it."""
    reputation = config.reputation
    return (reputation.store, reputation.sync_interval, reputation.redis,
            config.limits.rate_time_unit)
