#!/usr/bin/env python3
"""Portcullis against its peers, measured in the same run on the same machine.

Throughput: Postfix's smtp-source sends through four targets, each relaying to its own
Postfix smtp-sink: (a) Portcullis as shipped (SQLite reputation store), (a') the same
with the redis store (below), (b) Postfix postscreen -> smtpd with a before-queue
smtpd_proxy_filter, the same recipient list and no anvil limits, (c) smtp-sink directly
(the ceiling). The load shapes, by their --shapes key:

  s20     one 2 KiB message per session, 1 recipient, 20 parallel sessions
  s100    the same at 100 parallel sessions
  reuse   10 messages per session, 20 sessions: smtp-source -d -m 200 -s 20, repeated
  rcpt50  50 recipients per 2 KiB message (alice@, 2alice@ ... 50alice@), 20 sessions
  mib     1 MiB messages, one per session, 10 sessions; also MB/s (10^6 payload bytes/s)
  idle    silent connections held open (below)

After a warm-up, each round runs every shape against every target in turn, so that
changing machine load hits all of them alike. Per shape and target it prints the median
and min-max over rounds of msgs/s (MB/s for mib; recipients/s for rcpt50 too), the ratio
Portcullis/Postfix, the CPU time per message of the target's whole process tree (from
/proc, reaped children included) and, apart, of its relay smtp-sink (Postfix opens a
backend connection per message, Portcullis pools them), and the peak memory (PSS).

The redis store: "Portcullis (redis store)" (--targets key portcullis-redis, on by
default) has the same settings but reputation.store: redis, on a private redis-server
the bench starts and stops. A table compares it with the SQLite one per shape
(throughput redis/SQLite, flagged below STORE_BOUND) and gives the store's round trips
and commands per message, read from redis-server's INFO commandstats before and after
each run: a MULTI ... EXEC pipeline is one round trip whatever it holds, a PING is one.
The gate's own round_trips metric would miss its subscriber connections' PINGs. The
load is legitimate mail (every recipient valid), so the store has next to nothing to
write: its round trips are mostly the heartbeat PINGs of each gate process, counted in.
redis-server's CPU is not in the target's tree; that table gives it per message. The
idle test runs against the SQLite one only.

Idle connections: opens many silent connections from several 127.0.0.x addresses,
counts which got a banner, a refusal or nothing, the bytes per idle connection held, and
how long a legitimate delivery from another address takes meanwhile.

The relay floor: "Python relay floor" (--targets key floor, on by default) is
bench/relay_floor.py, a transparent proxy on uvloop's protocols with a backend
connection per client and nothing else: no SMTP, no policy. What Portcullis spends
beyond it is the cost of its work; the floor against Postfix is what Python allows here.

With --baseline REV, Portcullis as of git revision REV runs too, as one more target, so
that a change is measured against what it changes in the same run.

Usage: bench/throughput.py [--quick] [--shapes KEY,...] [--messages N] [--rounds N]
                           [--warmup N] [--idle N] [--targets sink,postfix,...]
                           [--baseline REV]
(as root; `make bench` installs what it needs and runs it)
"""

from __future__ import annotations

import argparse
import atexit
import os
import resource
import selectors
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.support import redis_server
from tests.support.postfix import PostfixInstance
from tests.support.redis_server import RedisServer
from tests.support.tools import free_port, port_accepts, wait_until

DOMAIN = "example.test"
RECIPIENT = f"alice@{DOMAIN}"
SENDER = "load@client.sender.test"
HOST = "127.0.0.1"
PEER = "Postfix postscreen+proxy"  # the target Portcullis is compared with
OURS = "Portcullis"  # as shipped: reputation.store: sqlite
OURS_REDIS = "Portcullis (redis store)"  # the same with reputation.store: redis
FLOOR = "Python relay floor"  # bench/relay_floor.py: bytes across, nothing else
STORE_BOUND = 0.9  # redis-store throughput below this share of SQLite's is flagged
LEGIT_SOURCE = "127.0.0.250"  # the legitimate client of the idle test
IDLE_SOURCES = [f"127.0.0.{n}" for n in range(2, 22)]  # where idle connections come from
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Shape:
    """A load shape: how smtp-source sends the messages of one measured run."""

    key: str
    legend: str
    sessions: int  # in parallel
    messages: int  # per measured run at the default --messages
    size: int = 2048  # payload bytes per message
    recipients: int = 1  # per message
    per_session: int = 1  # messages per connection; above 1, batches of smtp-source -d
    units: tuple[str, ...] = ("msgs/s",)  # the first in the main table, the others apart


SHAPES = (
    Shape("s20", "one 2 KiB message per session, 1 recipient, 20 sessions", 20, 3000),
    Shape("s100", "the same at 100 sessions", 100, 3000),
    Shape("reuse", "10 messages per session, 20 sessions (-d -m 200 -s 20, repeated)", 20,
          3000, per_session=10),
    Shape("rcpt50", "50 recipients per 2 KiB message, 20 sessions", 20, 600, recipients=50,
          units=("msgs/s", "rcpts/s")),
    Shape("mib", "1 MiB messages (-l 1048576), one per session, 10 sessions", 10, 150,
          size=1 << 20, units=("MB/s", "msgs/s")),
)
IDLE_SHAPE = "idle"  # the idle-connection test, selected with --shapes like a load shape
DEFAULT_MESSAGES = SHAPES[0].messages  # --messages scales every shape's count by N/this
QUICK_MESSAGES = 1000


def message_count(shape: Shape, messages: int) -> int:
    """Messages per measured run of `shape` when s20's is `messages`."""
    return max(1, round(shape.messages * messages / DEFAULT_MESSAGES))


def scaled(messages: int) -> str:
    """The shapes whose message count differs from --messages, with theirs at `messages`."""
    return ", ".join(f"{shape.key} {message_count(shape, messages)}" for shape in SHAPES
                     if shape.messages != DEFAULT_MESSAGES)


# smtp-source -r N sends to alice@, then 2alice@ ... Nalice@; both targets list them all.
USERS = ("alice", *(f"{n}alice" for n in range(2, max(s.recipients for s in SHAPES) + 1)),
         "bob", "carol")


class NotRunnable(Exception):
    """A target could not be started; the message says why."""


# --- processes and memory ---------------------------------------------------------

def process_tree(root: int) -> list[int]:
    """root and all its descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def cpu_seconds(root: int) -> float:
    """CPU time of a process tree: user and system time of each process and of its
    reaped children (utime, stime, cutime, cstime), so processes that exited count too."""
    ticks = 0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLOCK_TICKS


def pss_bytes(root: int) -> int:
    """Proportional set size of a process tree: shared pages counted once overall."""
    total = 0
    for pid in process_tree(root):
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return total


# --- the targets --------------------------------------------------------------------

class SmtpSink:
    """Postfix's smtp-sink on a free port, counting the messages it swallowed."""

    def __init__(self, workdir: Path, name: str):
        self.port = free_port(HOST)
        self.output = workdir / f"sink-{name}.out"
        with open(self.output, "wb") as output:
            self.process = subprocess.Popen(
                ["smtp-sink", "-c", "-u", "nobody", "-m", "2000", f"{HOST}:{self.port}", "2000"],
                stdout=output, stderr=subprocess.STDOUT)
        atexit.register(self.close)
        wait_until(lambda: port_accepts(HOST, self.port), 10, "smtp-sink to listen")

    def messages(self) -> int:
        """Messages received so far (from smtp-sink's -c counter line)."""
        counters = self.output.read_bytes().replace(b"\r", b"\n").split()
        received = [word for word in counters if word.startswith(b"mesg=")]
        return int(received[-1][5:]) if received else 0

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@dataclass
class StoreUse:
    """What redis-server did so far (or between two readings): its commands by name
    (INFO commandstats), all its commands, connections accepted, and its CPU seconds."""

    calls: Counter
    commands: int
    connections: int
    cpu: float

    def __sub__(self, earlier: StoreUse) -> StoreUse:
        return StoreUse(self.calls - earlier.calls, self.commands - earlier.commands,
                        self.connections - earlier.connections, self.cpu - earlier.cpu)

    def __add__(self, other: StoreUse) -> StoreUse:
        return StoreUse(self.calls + other.calls, self.commands + other.commands,
                        self.connections + other.connections, self.cpu + other.cpu)

    def round_trips(self) -> int:
        """Requests the gate waited for: a MULTI ... EXEC pipeline (its writes and its
        PUBLISH) is one, a PING is one."""
        return self.calls["exec"] + self.calls["ping"]

    def gate_commands(self) -> int:
        """Every command the server ran, those queued in pipelines included, but the
        bench's own INFO."""
        return self.commands - self.calls["info"]


class FleetStore:
    """The redis-store target's private redis-server (tests/support/redis_server.py),
    read through its admin user: the gate's ACL user may not run INFO."""

    def __init__(self, workdir: Path):
        try:
            self.server = RedisServer(workdir)
            atexit.register(self.stop)
            self.server.start()
            self.admin = redis.Redis(self.server.host, self.server.port,
                                     username=redis_server.ADMIN_USER,
                                     password=redis_server.ADMIN_PASSWORD, socket_timeout=10,
                                     decode_responses=True)
            self.admin.ping()
        except (RuntimeError, OSError, redis.RedisError) as problem:
            self.stop()
            raise NotRunnable(f"no private redis-server: {problem}") from None

    def gate_settings(self) -> dict:
        """The gate's reputation section: this server, the shipped timeout (not the tests')."""
        settings = self.server.settings()
        del settings["redis"]["timeout"]
        return settings

    def mark(self) -> None:
        """Start counting for since_mark()."""
        self.marked = (self.use(), time.monotonic())

    def since_mark(self) -> tuple[StoreUse, float]:
        """What the server did since mark(), and in how many seconds."""
        use, at = self.marked
        return self.use() - use, time.monotonic() - at

    def use(self) -> StoreUse:
        """The server's counters now; one INFO on the admin's open connection."""
        info = self.admin.info("stats", "commandstats")
        calls = Counter({name.removeprefix("cmdstat_"): stats["calls"]
                         for name, stats in info.items() if name.startswith("cmdstat_")})
        return StoreUse(calls, info["total_commands_processed"],
                        info["total_connections_received"], cpu_seconds(self.server.process.pid))

    def stop(self) -> None:
        if self.server.process is not None:
            self.server.stop()


@dataclass
class Target:
    name: str
    port: int
    pid: int  # root of the process tree whose memory is measured
    sink: SmtpSink
    settle: float = 3.0  # seconds an idle connection may wait for its banner
    close: Callable[[], None] = field(default=lambda: None, repr=False)
    store: FleetStore | None = None  # the redis-server of a redis-store target


def start_sink_target(workdir: Path) -> Target:
    sink = SmtpSink(workdir, "direct")
    return Target("smtp-sink directly", sink.port, sink.process.pid, sink, close=sink.close)


def start_postfix_proxy(workdir: Path) -> Target:
    """Postfix 3.7 postscreen -> smtpd -> before-queue smtpd_proxy_filter -> smtp-sink."""
    sink = SmtpSink(workdir, "postfix")
    port = free_port(HOST)
    services = (f"{HOST}:{port} inet n - n - 1 postscreen\n"
                "smtpd      pass  - - n - - smtpd\n"
                "dnsblog    unix  - - n - 0 dnsblog\n"
                "tlsproxy   unix  - - n - 0 tlsproxy\n"
                "relay      unix  - - n - - smtp\n")
    instance = PostfixInstance({}, services, name="postfix-proxy")
    recipients = instance.postmap("relay_recipients", {f"{u}@{DOMAIN}": "OK" for u in USERS})
    instance.postconf({
        "mynetworks": "",  # the load counts as Internet traffic
        "relay_domains": DOMAIN,
        "relay_recipient_maps": recipients,
        "relay_transport": f"relay:[{HOST}]:{sink.port}",  # used only if mail were queued
        "smtpd_relay_restrictions": "reject_unauth_destination",
        "smtpd_recipient_restrictions": "reject_unlisted_recipient",
        "smtpd_proxy_filter": f"{HOST}:{sink.port}",
        "smtpd_proxy_timeout": "100s",
        "smtpd_peername_lookup": "yes",
        "postscreen_greet_action": "enforce",
        # One generator address: no anvil limits, and smtpd processes for 100 sessions.
        "smtpd_client_connection_count_limit": "0",
        "smtpd_client_connection_rate_limit": "0",
        "smtpd_client_message_rate_limit": "0",
        "smtpd_client_recipient_rate_limit": "0",
        "postscreen_client_connection_count_limit": "0",
        "default_process_limit": "200",
    })
    instance.start()
    wait_until(lambda: port_accepts(HOST, port), 20, "postscreen to listen")

    def close() -> None:
        instance.close()
        sink.close()
    # postscreen makes a new address wait postscreen_greet_wait (6 s) before its banner.
    return Target(PEER, port, instance.master_pid(), sink, settle=9.0, close=close)


def start_floor(workdir: Path) -> Target:
    """bench/relay_floor.py, one process per CPU, relaying to its own smtp-sink."""
    sink = SmtpSink(workdir, "floor")
    port = free_port(HOST)
    process = subprocess.Popen([sys.executable, str(REPO / "bench" / "relay_floor.py"),
                                str(port), str(sink.port)])

    def close() -> None:
        for pid in process_tree(process.pid):  # the forked processes too
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        process.wait()
        sink.close()

    try:
        wait_until(lambda: process.poll() is not None or port_accepts(HOST, port), 10,
                   "the relay floor to listen")
    except TimeoutError:
        close()
        raise NotRunnable("bench/relay_floor.py did not listen within 10 s") from None
    if process.poll() is not None:
        close()
        raise NotRunnable(f"bench/relay_floor.py exited with status {process.returncode}")
    return Target(FLOOR, port, process.pid, sink, close=close)


def start_portcullis(workdir: Path, idle: int, baseline: str = "",
                     store: FleetStore | None = None) -> Target:
    """`portcullis serve` relaying to its own smtp-sink; NotRunnable if it cannot serve.

    With `baseline` (a git revision), the gate's code is that revision's, from a
    worktree, so that a change is measured against its parent in the same run. With
    `store`, its reputation store is that redis-server (stopped with the target).
    """
    executable = shutil.which("portcullis", path=f"{REPO}/.venv/bin:{os.environ['PATH']}")
    if executable is None:
        raise NotRunnable("no `portcullis` command (run scripts/install-deps test)")
    tag = f"portcullis-{baseline}" if baseline else "portcullis"
    if store is not None:
        tag += "-redis"
    environment = dict(os.environ)
    command = [executable]
    if baseline:
        source = workdir / tag
        checkout = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach",
                                   str(source), baseline], check=False, capture_output=True,
                                  text=True)
        if checkout.returncode != 0:
            raise NotRunnable(f"cannot check out {baseline}: {checkout.stderr.strip()}")
        atexit.register(subprocess.run, ["git", "-C", str(REPO), "worktree", "remove",
                                         "--force", str(source)], capture_output=True)
        environment["PYTHONPATH"] = str(source / "appliance")
        command = [sys.executable, "-m", "portcullis.cli"]
    sink = SmtpSink(workdir, tag)
    port = free_port(HOST)
    recipients = workdir / f"{tag}-recipients"
    recipients.write_text("".join(f"{user}@{DOMAIN}\n" for user in USERS))
    caps = max(20_000, 2 * idle)  # one generator address: per-IP caps out of the way
    config = {
        "hostname": "portcullis.bench.test",
        "listen": [f"{HOST}:{port}"],
        "relay_domains": [DOMAIN],
        "recipients": {"source": "static", "file": str(recipients)},
        "backend": {"servers": [f"{HOST}:{sink.port}"]},
        "allowlist": [],
        "state_dir": str(workdir / f"{tag}-state"),
        "tls": {"enabled": False},
        "limits": {
            "pregreet_delay": 0,
            "max_connections": caps,
            "max_connections_per_ip": caps,
            "max_connections_per_prefix": caps,
            "connection_rate_per_ip": 10_000.0,
            "connection_burst_per_ip": 1_000_000,
            # The load comes from one address: counted as in production, never capped.
            "message_rate_per_ip": 1_000_000,
            "recipient_rate_per_ip": 1_000_000,
            "tls_rate_per_ip": 1_000_000,
        },
    }
    if store is not None:
        config["reputation"] = store.gate_settings()
    (workdir / f"{tag}-state").mkdir(exist_ok=True)
    config_file = workdir / f"{tag}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    log_file = workdir / f"{tag}.log"
    with open(log_file, "wb") as log:
        process = subprocess.Popen([*command, "serve", "-c", str(config_file)],
                                   stdout=log, stderr=subprocess.STDOUT, env=environment)

    def close() -> None:
        errors = Counter(line.split(": ", 2)[-1][:100] for line in
                         log_file.read_text(errors="replace").splitlines()
                         if line.startswith(("ERROR", "CRITICAL")))
        for text, how_many in errors.most_common(3):
            print(f"    portcullis logged {how_many}x: {text}")
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                for pid in process_tree(process.pid):
                    os.kill(pid, 9)
        sink.close()
        if store is not None:
            store.stop()

    def failed(reason: str) -> NotRunnable:
        close()
        tail = log_file.read_text(errors="replace").strip().splitlines()[-8:]
        return NotRunnable(f"{reason}; its log ends:\n      " + "\n      ".join(tail))

    try:
        wait_until(lambda: process.poll() is not None or port_accepts(HOST, port), 20,
                   "portcullis to listen")
        if process.poll() is not None:
            raise failed(f"`portcullis serve` exited with status {process.returncode}")
        deliver(HOST, port, source=HOST, timeout=20)
        wait_until(lambda: sink.messages() >= 1, 10, "the probe message at the sink")
    except (OSError, smtplib.SMTPException, TimeoutError) as problem:
        raise failed(f"a probe message did not get through: {problem!r}") from None
    name = f"{OURS} @{baseline}" if baseline else OURS_REDIS if store else OURS
    return Target(name, port, process.pid, sink, close=close, store=store)


# --- throughput ------------------------------------------------------------------------

@dataclass
class Run:
    shape: Shape
    messages: int
    seconds: float
    relayed: int  # messages the sink received during the run
    peak_pss: int
    cpu: float  # CPU seconds of the target's process tree during the run
    sink_cpu: float | None  # the same of its relay smtp-sink; None if the sink is the target
    error: str = ""
    store: StoreUse | None = None  # what its redis-server did during the run, if it has one

    def figure(self, unit: str) -> float:
        """The run's rate in `unit`: msgs/s, rcpts/s or MB/s (10^6 payload bytes/s)."""
        if self.error:
            return 0.0
        per_second = self.messages / self.seconds
        return {"msgs/s": per_second, "rcpts/s": per_second * self.shape.recipients,
                "MB/s": per_second * self.shape.size / 1e6}[unit]


def source_command(target: Target, shape: Shape, messages: int) -> list[str]:
    """One smtp-source invocation sending `messages` in the shape's sessions."""
    sessions = min(shape.sessions, -(-messages // shape.per_session))
    reuse = ["-d"] if shape.per_session > 1 else []
    return ["smtp-source", "-4", *reuse, "-M", "client.sender.test", "-l", str(shape.size),
            "-m", str(messages), "-s", str(sessions), "-r", str(shape.recipients),
            "-f", SENDER, "-t", RECIPIENT, f"{HOST}:{target.port}"]


def smtp_source(target: Target, shape: Shape, messages: int, timeout: float) -> Run:
    """Send `messages` through the target with smtp-source, sampling its memory and CPU.

    With several messages per session, smtp-source -d runs again and again, each time
    with sessions x per_session messages, until `messages` are sent.
    """
    batch = shape.sessions * shape.per_session if shape.per_session > 1 else messages
    sink = target.sink.process.pid
    before = target.sink.messages()
    peak, sent, error = 0, 0, ""
    next_sample = 0.0
    store_before = target.store.use() if target.store else None
    cpu_before, sink_cpu_before = cpu_seconds(target.pid), cpu_seconds(sink)
    started = time.monotonic()
    deadline = started + timeout
    with tempfile.TemporaryFile() as errors:
        while sent < messages and not error:
            count = min(batch, messages - sent)
            generator = subprocess.Popen(source_command(target, shape, count),
                                         stdout=subprocess.DEVNULL, stderr=errors)
            while generator.poll() is None and time.monotonic() < deadline:
                if time.monotonic() >= next_sample:
                    peak = max(peak, pss_bytes(target.pid))
                    next_sample = time.monotonic() + 0.25
                try:
                    generator.wait(max(0.01, min(next_sample, deadline) - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if generator.poll() is None:
                generator.kill()
                generator.wait()
                error = f"timed out after {timeout:.0f} s"
            elif generator.returncode != 0:
                errors.seek(0)
                error = errors.read().decode(errors="replace").strip()[-300:]
                error = error or f"smtp-source exited with status {generator.returncode}"
            sent += count
        seconds = time.monotonic() - started
    # The sink counts a message when its "." arrives; allow the last ones a moment.
    try:
        wait_until(lambda: target.sink.messages() - before >= messages, 10, "the sink")
    except TimeoutError:
        error = error or "the sink received fewer messages than were sent"
    sink_cpu = cpu_seconds(sink) - sink_cpu_before if sink != target.pid else None
    store = target.store.use() - store_before if target.store else None
    return Run(shape, messages, seconds, target.sink.messages() - before, peak,
               cpu_seconds(target.pid) - cpu_before, sink_cpu, error, store)


def run_timeout(shape: Shape, messages: int) -> float:
    """Seconds a measured run may take: generous, and at least 1 MB/s of payload."""
    return 300 + messages * shape.size / 1e6


Results = dict[str, dict[str, list[Run]]]  # target name -> shape key -> runs


def measure_throughput(targets: list[Target], shapes: list[Shape], counts: dict[str, int],
                       rounds: int) -> Results:
    """Rounds of runs, shapes and targets interleaved so that drifting load hits all alike."""
    results: Results = {t.name: {shape.key: [] for shape in shapes} for t in targets}
    for round_number in range(1, rounds + 1):
        for shape in shapes:
            messages = counts[shape.key]
            for target in targets:
                run = smtp_source(target, shape, messages, run_timeout(shape, messages))
                unit = shape.units[0]
                detail = f"  ERROR: {run.error}" if run.error else ""
                store = (f", store: {run.store.round_trips()} round trips, "
                         f"{run.store.gate_commands()} commands" if run.store else "")
                print(f"  round {round_number}, {shape.key:6} {target.name:26} "
                      f"{number(run.figure(unit)):>6} {unit} ({run.relayed}/{messages} at "
                      f"the sink, {run.seconds:.1f} s, "
                      f"{run.cpu / messages * 1e6:.0f} µs CPU/msg{store}){detail}", flush=True)
                results[target.name][shape.key].append(run)
    return results


# --- idle connections ----------------------------------------------------------------

def deliver(host: str, port: int, source: str, timeout: float = 30) -> float:
    """Send one message with smtplib from `source`; return the seconds it took end to end."""
    message = (f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: legitimate\r\n\r\n"
               "hello\r\n").encode()
    started = time.monotonic()
    with smtplib.SMTP(host, port, timeout=timeout, source_address=(source, 0)) as client:
        client.sendmail(SENDER, [RECIPIENT], message)
    return time.monotonic() - started


@dataclass
class IdleResult:
    opened: int
    banners: int = 0
    refused: int = 0  # 4xx/5xx greeting
    closed: int = 0  # closed or reset without a reply
    silent: int = 0  # no reply at all within the settle time
    still_open: int = 0  # of the banners, connections still open after the delivery test
    failed_connect: int = 0
    pss_before: int = 0
    pss_held: int = 0
    latency: list[float] = field(default_factory=list)
    latency_error: str = ""
    refusals: Counter = field(default_factory=Counter)  # refusal text -> how many

    def latency_text(self) -> str:
        if not self.latency:
            return f"failed: {self.latency_error}"
        return f"{statistics.median(self.latency):.3f} s (median of {len(self.latency)})"


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted))
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def hold_idle_connections(target: Target, count: int) -> IdleResult:
    """Open `count` silent connections, classify the first reply, measure while held."""
    result = IdleResult(opened=0, pss_before=pss_bytes(target.pid))
    selector = selectors.DefaultSelector()
    sockets: list[socket.socket] = []
    greetings: dict[int, bytes] = {}  # fd -> the greeting's last line, b"" if closed
    partial: dict[int, bytes] = {}
    try:
        for number in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.bind((IDLE_SOURCES[number % len(IDLE_SOURCES)], 0))
                sock.connect_ex((HOST, target.port))
            except OSError:
                sock.close()
                result.failed_connect += 1
                continue
            sockets.append(sock)
            selector.register(sock, selectors.EVENT_READ)
            if number % 500 == 499:  # let the server accept between bursts
                _read_greetings(selector, greetings, partial, 0.05)
        result.opened = len(sockets)
        deadline = time.monotonic() + target.settle
        while time.monotonic() < deadline and len(greetings) < len(sockets):
            _read_greetings(selector, greetings, partial, 0.2)
        welcomed = []
        for sock in sockets:
            greeting = greetings.get(sock.fileno())
            if greeting is None:
                result.silent += 1
            elif greeting.startswith(b"2"):
                result.banners += 1
                welcomed.append(sock)
            elif greeting[:1] in (b"4", b"5"):
                result.refused += 1
                result.refusals[greeting[:70].decode(errors="replace")] += 1
            else:
                result.closed += 1
        result.pss_held = pss_bytes(target.pid)
        try:
            result.latency = [deliver(HOST, target.port, LEGIT_SOURCE) for _ in range(3)]
        except (OSError, smtplib.SMTPException) as problem:
            result.latency_error = repr(problem)
        result.still_open = sum(_open_and_quiet(sock) for sock in welcomed)
    finally:
        selector.close()
        for sock in sockets:
            sock.close()
    return result


def _open_and_quiet(sock: socket.socket) -> bool:
    """True if the server has neither closed the connection nor said more since."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # closed, or the server said more (a timeout, a 421)


def _read_greetings(selector: selectors.BaseSelector, greetings: dict[int, bytes],
                    partial: dict[int, bytes], timeout: float) -> None:
    """Read what readable sockets sent; a greeting is complete at its last line ("220 ...").

    postscreen sends a "220-" first line and holds the rest back, so only the last line
    of a multi-line reply says whether the client was let in.
    """
    for key, _ in selector.select(timeout):
        sock, fd = key.fileobj, key.fd
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        received = partial.get(fd, b"") + data
        last_lines = [line for line in received.split(b"\r\n")[:-1] if line[3:4] != b"-"]
        if not data or last_lines:
            greetings[fd] = last_lines[0] if last_lines else b""
            selector.unregister(sock)
        else:
            partial[fd] = received


def measure_idle(target: Target, count: int) -> IdleResult:
    print(f"  {target.name}: holding {count} idle connections...", flush=True)
    deliver(HOST, target.port, LEGIT_SOURCE, timeout=30)  # postscreen: pass once, cached
    result = hold_idle_connections(target, count)
    print(f"  {target.name}: {result.banners} banners, {result.refused} refused, "
          f"{result.closed} closed, {result.silent} silent, {result.failed_connect} not "
          f"opened; {result.still_open} still open at the end; legitimate delivery "
          f"meanwhile: {result.latency_text()}", flush=True)
    for text, how_many in result.refusals.most_common(3):
        print(f"    {how_many} refused with: {text}")
    time.sleep(1)  # let the server notice the closes before the next test
    return result


# --- report ------------------------------------------------------------------------------

def mib(size: int) -> str:
    return f"{size / 2**20:.0f} MB"


def number(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def spread(values: list[float]) -> str:
    """median (min-max)"""
    return f"{number(statistics.median(values))} ({number(min(values))}-{number(max(values))})"


def ratio_rows(medians: dict[str, list[float | None]]) -> dict[str, list[str]]:
    """Per column, Portcullis over the Postfix peer and over the baseline, its redis
    store over its SQLite store, and the relay floor over the peer, where measured."""
    baseline = next((row for name, row in medians.items() if name.startswith(f"{OURS} @")),
                    None)
    rows = {}
    for label, ours, theirs in (
            ("ratio Portcullis/Postfix", medians.get(OURS), medians.get(PEER)),
            ("ratio Portcullis/baseline", medians.get(OURS), baseline),
            ("ratio redis/SQLite store", medians.get(OURS_REDIS), medians.get(OURS)),
            ("ratio floor/Postfix", medians.get(FLOOR), medians.get(PEER))):
        if ours and theirs:
            rows[label] = [f"{a / b:.2f}" if a and b else "n/a"
                           for a, b in zip(ours, theirs, strict=True)]
    return rows


def print_table(title: str, columns: list[str], rows: dict[str, list[str]],
                corner: str = "target") -> None:
    """Rows of targets (and ratios), right-aligned columns as wide as their widest cell."""
    widths = [max(len(column), *(len(cells[i]) for cells in rows.values()))
              for i, column in enumerate(columns)]
    print(f"\n=== {title} ===")
    for name, cells in {corner: columns, **rows}.items():
        print(f"{name:26}" + "".join(f"  {cell:>{width}}"
                                     for cell, width in zip(cells, widths, strict=True)))


def micros_per_message(runs: list[Run], seconds: Callable[[Run], float | None]
                       ) -> float | None:
    """Median over the runs that succeeded of `seconds` of CPU per message, in µs."""
    values = [(seconds(run), run.messages) for run in runs if not run.error]
    micros = [used / messages * 1e6 for used, messages in values if used is not None]
    return statistics.median(micros) if micros else None


def print_throughput(results: Results, shapes: list[Shape]) -> None:
    print("\nshapes (smtp-source; every target relays to its own smtp-sink):")
    for shape in shapes:
        print(f"  {shape.key:7} {shape.legend}")
    main = [(shape, shape.units[0]) for shape in shapes]
    extra = [(shape, unit) for shape in shapes for unit in shape.units[1:]]
    for title, columns in (("throughput: median (min-max) over rounds", main),
                           ("the same runs in other units", extra)):
        if not columns:
            continue
        rows, medians = {}, {}
        for name, by_shape in results.items():
            figures = [[run.figure(unit) for run in by_shape[shape.key]]
                       for shape, unit in columns]
            failed = ["!" if any(run.error for run in by_shape[shape.key]) else ""
                      for shape, _ in columns]
            rows[name] = [spread(values) + mark for values, mark in zip(figures, failed,
                                                                         strict=True)]
            medians[name] = [statistics.median(values) for values in figures]
        if columns is main:
            rows.update(ratio_rows(medians))
        print_table(title, [f"{shape.key} {unit}" for shape, unit in columns], rows)

    rows, medians = {}, {}
    for name, by_shape in results.items():
        medians[name] = [micros_per_message(by_shape[s.key], lambda run: run.cpu)
                         for s in shapes]
        sinks = [micros_per_message(by_shape[s.key], lambda run: run.sink_cpu) for s in shapes]
        rows[name] = [("n/a" if ours is None else f"{ours:.0f}")
                      + ("" if sink is None else f" / {sink:.0f}")
                      for ours, sink in zip(medians[name], sinks, strict=True)]
    rows.update(ratio_rows(medians))
    print_table("CPU µs per message, median over rounds: the target's process tree / its "
                "relay smtp-sink", [shape.key for shape in shapes], rows)

    # Lowest peak over rounds: Postfix keeps idle smtpd processes (max_idle 100 s), so a
    # run after a 100-session one would carry their memory.
    rows = {name: [mib(min(run.peak_pss for run in by_shape[s.key])) for s in shapes]
            for name, by_shape in results.items()}
    print_table("peak PSS during a run, lowest over rounds", [s.key for s in shapes], rows)
    print("(! = a run failed, see above. CPU: utime+stime+cutime+cstime from /proc; a "
          "target's relay sink is not in its tree; smtp-sink directly is its own sink)")


def small_number(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.4f}"


def print_store(results: Results, shapes: list[Shape],
                whole: tuple[StoreUse, float] | None) -> None:
    """The redis-store target against the SQLite one, and what its store did per message;
    `whole`: what redis-server did over the whole measurement, and in how many seconds."""
    with_redis, with_sqlite = results.get(OURS_REDIS), results.get(OURS)
    if not with_redis:
        return
    rows = {}
    if with_sqlite:
        cells = []
        for shape in shapes:
            unit = shape.units[0]
            ours = statistics.median(run.figure(unit) for run in with_redis[shape.key])
            theirs = statistics.median(run.figure(unit) for run in with_sqlite[shape.key])
            ratio = ours / theirs if ours and theirs else None
            cells.append("n/a" if ratio is None
                         else f"{ratio:.2f}" + ("*" if ratio < STORE_BOUND else ""))
        rows["throughput redis/SQLite"] = cells

    # The store's figures summed over rounds: a run may be shorter than a heartbeat.
    totals = []
    for shape in shapes:
        runs = [run for run in with_redis[shape.key] if run.store and not run.error]
        use = sum((run.store for run in runs[1:]), runs[0].store) if runs else None
        totals.append((use, sum(run.messages for run in runs), sum(run.seconds for run in runs)))
    figures = {
        "round trips/msg": lambda use, messages, _: use.round_trips() / messages,
        "  MULTI pipelines/msg": lambda use, messages, _: use.calls["exec"] / messages,
        "  PINGs/msg": lambda use, messages, _: use.calls["ping"] / messages,
        "commands/msg": lambda use, messages, _: use.gate_commands() / messages,
        "round trips/s": lambda use, _, seconds: use.round_trips() / seconds,
        "redis-server CPU µs/msg": lambda use, messages, _: use.cpu / messages * 1e6,
    }
    for label, figure in figures.items():
        rows[label] = [small_number(figure(*total) if total[0] else None) for total in totals]
    print_table(f"{OURS_REDIS} against {OURS} (SQLite store): throughput from the medians, "
                "the store's figures summed over rounds", [shape.key for shape in shapes],
                rows, corner="shape")
    if whole:
        use, seconds = whole
        print(f"over the whole measurement ({seconds:.0f} s, the other targets' runs "
              f"included): {use.round_trips()} round trips ({use.calls['ping']} PINGs, "
              f"{use.calls['exec']} pipelines), {use.round_trips() / seconds:.1f}/s")
    reconnected = sum(1 for runs in with_redis.values() for run in runs
                      if run.store and run.store.connections)
    if reconnected:
        print(f"! the gate (re)connected to redis-server during {reconnected} run(s): its "
              "connection setup and state load are in commands, not in round trips")
    print("(From redis-server itself, INFO commandstats before and after each run, the "
          "bench's own INFO left out;\n not from the gate's portcullis_reputation_store_total"
          '{event="round_trips"}, which misses the PINGs on each process\'s\n subscriber '
          "connection and reaches the metrics seconds late. Round trips = EXEC + PING: a "
          "MULTI pipeline is\n one whatever it holds (its writes and its PUBLISH); commands: "
          "all the server ran, pipelined ones included.\n Every gate process (admission, "
          "workers) PINGs on its command connection after a second without a write\n and on "
          "its subscriber connection after a second without a message. All recipients are "
          "valid here, so\n the store has next to nothing to write (its writes are "
          "invalid-recipient events, bans, pre-greet results):\n its round trips are mostly "
          "heartbeats, fewer per message the faster the run. redis-server's CPU is not\n in "
          f"the target's tree (the CPU table above). * = below {STORE_BOUND:.0%} of the SQLite "
          "store's throughput)")


def print_idle(idle: dict[str, IdleResult]) -> None:
    print("\n=== idle connections (silent clients from "
          f"{IDLE_SOURCES[0]}-{IDLE_SOURCES[-1]}; banner = a complete 2xx greeting) ===")
    print(f"{'target':26} {'opened':>7} {'banner':>7} {'held':>7} {'refused':>8} "
          f"{'silent':>7} {'PSS idle->held':>15} {'bytes/idle conn':>16}  legitimate delivery")
    for name, result in idle.items():
        per_banner = (result.pss_held - result.pss_before) / max(result.banners, 1) / 1024
        memory = f"{mib(result.pss_before)}->{mib(result.pss_held)}"
        print(f"{name:26} {result.opened:7} {result.banners:7} {result.still_open:7} "
              f"{result.refused:8} {result.silent:7} {memory:>15} "
              f"{f'{per_banner:.1f} KiB':>16}  {result.latency_text()}")
    print("(bytes per idle connection: PSS held - PSS idle, over the banners, in KiB)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="shapes: " + "; ".join(f"{s.key}: {s.legend}" for s in SHAPES)
        + f"; {IDLE_SHAPE}: silent connections held open")
    every_shape = ",".join([*(shape.key for shape in SHAPES), IDLE_SHAPE])
    parser.add_argument("--shapes", default=every_shape,
                        help=f"comma-separated subset of {every_shape} (all)")
    parser.add_argument("--messages", type=int,
                        help=f"messages per measured run ({DEFAULT_MESSAGES}: "
                        + ", ".join(s.key for s in SHAPES if s.messages == DEFAULT_MESSAGES)
                        + f"); the others scale with it ({scaled(DEFAULT_MESSAGES)})")
    parser.add_argument("--rounds", type=int, help="measured runs per figure (3)")
    parser.add_argument("--warmup", type=int, help="warm-up messages per target (500)")
    parser.add_argument("--idle", type=int, help="idle connections to hold (10000)")
    parser.add_argument("--idle-peer", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the idle test against the Postfix peer")
    parser.add_argument("--targets", default="sink,postfix,portcullis,portcullis-redis,floor",
                        help="comma-separated subset of sink,postfix,portcullis,portcullis-redis,"
                        "floor (all; portcullis-redis: reputation.store redis, a private "
                        "redis-server; floor: bench/relay_floor.py)")
    parser.add_argument("--baseline", metavar="REV",
                        help="also measure Portcullis as of this git revision")
    parser.add_argument("--quick", action="store_true",
                        help=f"short run: 1 round of {QUICK_MESSAGES} messages "
                        f"({scaled(QUICK_MESSAGES)}), 200 warm-up, 1000 idle")
    args = parser.parse_args()
    defaults = (QUICK_MESSAGES, 200, 1000, 1) if args.quick else (DEFAULT_MESSAGES, 500, 10_000, 3)
    for name, default in zip(("messages", "warmup", "idle", "rounds"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    keys = args.shapes.split(",")
    unknown = set(keys) - set(every_shape.split(","))
    if unknown:
        sys.exit(f"bench: unknown shape(s) {', '.join(unknown)}; known: {every_shape}")
    shapes = [shape for shape in SHAPES if shape.key in keys]
    counts = {shape.key: message_count(shape, args.messages) for shape in shapes}
    if IDLE_SHAPE not in keys:
        args.idle = 0
    for tool in ("smtp-source", "smtp-sink", "postfix"):
        if shutil.which(tool, path=f"/usr/sbin:{os.environ['PATH']}") is None:
            sys.exit(f"bench: {tool} not found: apt-get install postfix "
                     "(scripts/install-deps test bench)")
    if os.geteuid() != 0:
        sys.exit("bench: run as root (private Postfix instances, smtp-sink -u nobody)")
    os.environ["PATH"] = f"/usr/sbin:{os.environ['PATH']}"
    fd_limit = raise_fd_limit(args.idle + 1000)  # inherited by the targets started below
    if fd_limit < args.idle + 100:
        print(f"bench: open-file limit is {fd_limit}; holding {fd_limit - 200} idle connections")
        args.idle = fd_limit - 200

    print(f"bench: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"{args.rounds} rounds of "
          + (", ".join(f"{shape.key} {counts[shape.key]}" for shape in shapes) or "nothing")
          + f" messages; {args.idle} idle connections", flush=True)
    idle: dict[str, IdleResult] = {}
    with tempfile.TemporaryDirectory(prefix="portcullis-bench-") as workdir:
        workdir = Path(workdir)
        workdir.chmod(0o755)
        starters = {
            "sink": ("smtp-sink directly", lambda: start_sink_target(workdir), False),
            "postfix": (PEER, lambda: start_postfix_proxy(workdir), args.idle_peer),
            "portcullis": (OURS, lambda: start_portcullis(workdir, args.idle), True),
            # The idle test does not touch the store: run it once, with the SQLite one.
            "portcullis-redis": (OURS_REDIS, lambda: start_portcullis(
                workdir, args.idle, store=FleetStore(workdir / "redis")), False),
            "floor": (FLOOR, lambda: start_floor(workdir), False),
        }
        keys = args.targets.split(",")
        if args.baseline:
            starters["baseline"] = (f"{OURS} @{args.baseline}", lambda: start_portcullis(
                workdir, args.idle, args.baseline), False)
            keys.append("baseline")
        unknown = set(keys) - set(starters)
        if unknown:
            sys.exit(f"bench: unknown target(s) {', '.join(unknown)}; known: "
                     f"{', '.join(starters)}")
        running: list[tuple[Target, bool]] = []
        try:
            for key in keys:
                name, start, idle_test = starters[key]
                try:
                    target = start()
                except NotRunnable as reason:
                    print(f"\nNOT MEASURED: {name} is not runnable: {reason}", flush=True)
                    continue
                print(f"{name}: started; warm-up with {args.warmup} messages", flush=True)
                smtp_source(target, SHAPES[0], args.warmup, timeout=300)  # s20
                running.append((target, idle_test))
            stores = [target.store for target, _ in running if target.store]
            for store in stores:
                store.mark()
            results = measure_throughput([target for target, _ in running], shapes, counts,
                                         args.rounds)
            store_whole = stores[0].since_mark() if stores else None
            while running:
                target, idle_test = running.pop(0)
                try:
                    if idle_test and args.idle > 0:
                        idle[target.name] = measure_idle(target, args.idle)
                except (OSError, smtplib.SMTPException, TimeoutError) as problem:
                    print(f"  {target.name}: idle test failed: {problem!r}", flush=True)
                finally:
                    target.close()
        finally:
            for target, _ in running:
                target.close()
    if shapes and results:
        print_throughput(results, shapes)
        print_store(results, shapes, store_whole)
    if idle:
        print_idle(idle)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f} "
          "(other work on this machine makes every figure noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
