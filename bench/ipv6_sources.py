#!/usr/bin/env python3
"""The gate's memory under many IPv6 clients: bounded per-client state, measured (issue 9).

In a network namespace of its own, with an AnyIP route (`ip -6 route add local
2001:db8:100::/48 dev lo`), `portcullis serve` listens on [::1] and relays to Postfix's
smtp-sink. An asyncio driver then makes N connections (--sources, 50,000), each from its
own IPv6 address in its own /64 of the /48 (2001:db8:100:<n>::1), 200 at a time: wait
for the banner, EHLO, MAIL FROM, one RCPT TO an unknown address (550 expected), QUIT.
Each source is a new client in the gate's per-client tables (pre-greet passes, rate
buckets, harvest counts), and `limits.max_tracked_clients` (--cap, 10,000) is set low
so that the load overflows it five times.

At 0 sources and after every --step sources (10,000) the load pauses and it measures:
the gate's PSS (admission process and workers, /proc/PID/smaps_rollup), the evictions
per table from the metrics endpoint (portcullis_state_evictions_total), and one
legitimate delivery from another address to the valid recipient (250 required; the
seconds it took). Halfway through every step one more legitimate delivery runs while the
load goes on ("under load"). It prints the table, then the bytes per tracked client
(PSS growth from 0 to the first row at or past the cap, divided by the cap) and whether
the PSS stopped growing after the cap.

The peer: Postfix postscreen -> smtpd with a before-queue smtpd_proxy_filter to its own
smtp-sink, set up as bench/throughput.py's Postfix target but listening on [::1]
(postscreen_greet_wait 1 s, its minimum), gets the same sources; its PSS (the master's
whole process tree, and postscreen alone) is printed side by side. --no-peer skips it.

What is set, and why: pre-greet 0.2 s (the pre-greet table is filled, the run stays
short); reputation store sqlite in a temporary state_dir (the appliance default; every
process then holds every client's harvest count; --store memory gives each worker its
own); global and per-client caps far above the load; FCrDNS off and no DNS lists
(nothing in the namespace answers DNS, so the resolver cache is not exercised); TLS off.

Reading the figures: the legitimate client's time includes a pre-greet wait whenever
its pass was evicted (after --cap newer passes). Every process keeps its own 4096-entry
caches of address -> client and prefix, so below a cap of about 4,100 (--quick) the PSS
still grows past the cap until they are full. The evictions are counted per process:
with the sqlite store the admission process and every worker hold each harvest count.
The full run takes about 7 minutes on 2 cores (the peer 5 of them), --quick about 1.

Nothing is asserted about the figures. It exits non-zero, saying why, if a legitimate
delivery fails, the gate dies, or a step breaks. The namespace, every process and every
temporary directory go away at the end, also on Ctrl-C or an error.

Usage: .venv/bin/python bench/ipv6_sources.py [--quick] [--sources N] [--cap N] [--step N]
                                              [--concurrency N] [--store sqlite|memory]
                                              [--no-peer]
(as root; `make bench-memory` installs what it needs and runs it; --quick: 5,000
sources, cap 1,000)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.throughput import SmtpSink, process_tree, pss_bytes, raise_fd_limit
from tests.support.postfix import PostfixInstance
from tests.support.tools import free_port, port_accepts, stop_process, wait_until

DOMAIN = "example.org"
RECIPIENT = f"alice@{DOMAIN}"  # the one valid recipient
SENDER = "load@sender.bench.test"
HOST = "::1"  # where the gate and the peer listen, inside the namespace
ANYIP = "2001:db8:100::/48"  # routed to lo inside the namespace: every address is ours
MAX_SOURCES = 0xFFFD  # /64s 1..0xfffd are sources; 0xfffe warms up, 0xffff is legitimate
WARMUP = 0xFFFE  # the warm-up session's source number
LEGIT_SOURCE = "2001:db8:100:ffff::25"
STEP_TIMEOUT = 30.0  # seconds for each step of a source's session
SETTLE = 2.5  # seconds before a measurement: workers report and the gate purges each second
TABLES = ("pregreet", "connection_rate", "harvest", "bans", "ban_pushes")


class BenchError(Exception):
    """A step broke; the message says which and why."""


def source_address(number: int) -> str:
    return f"2001:db8:100:{number:x}::1"


# --- one source's session, and the legitimate delivery ------------------------------

async def read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    """One SMTP reply (multi-line ones whole): its code and its last line."""
    for _ in range(100):
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            text = line.decode(errors="replace").strip()
            return (int(line[:3]) if line[:3].isdigit() else 0), text
    raise ConnectionError("reply of more than 100 lines")


async def one_source(number: int, port: int) -> str:
    """A session from source `number`: "ok" if it went as expected, else what went wrong."""
    steps = ((None, 220, "banner"), (b"EHLO client.bench.test", 250, "EHLO"),
             (f"MAIL FROM:<{SENDER}>".encode(), 250, "MAIL"),
             (f"RCPT TO:<nobody{number}@{DOMAIN}>".encode(), 550, "RCPT"),
             (b"QUIT", 221, "QUIT"))
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setblocking(False)
    writer = None
    step = "connect"
    try:
        sock.bind((source_address(number), 0))
        async with asyncio.timeout(STEP_TIMEOUT * (len(steps) + 1)):
            await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
            reader, writer = await asyncio.open_connection(sock=sock)
            for command, expected, step in steps:
                if command is not None:
                    writer.write(command + b"\r\n")
                async with asyncio.timeout(STEP_TIMEOUT):
                    code, text = await read_reply(reader)
                if code != expected:
                    return f"{step}: {text[:70]}"
        return "ok"
    except TimeoutError:
        return f"{step}: no reply within {STEP_TIMEOUT:g} s"
    except (OSError, ConnectionError) as problem:
        return f"{step}: {getattr(problem, 'strerror', None) or problem}"
    finally:
        if writer is not None:
            writer.close()
        else:
            sock.close()


def deliver(port: int, source: str = LEGIT_SOURCE, timeout: float = 60) -> float:
    """One message to the valid recipient with smtplib; the seconds it took, end to end.
    Raises unless every reply was positive (the end of data 250)."""
    message = (f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: legitimate\r\n\r\n"
               "hello\r\n").encode()
    started = time.monotonic()
    with smtplib.SMTP(HOST, port, timeout=timeout, source_address=(source, 0),
                      local_hostname="legit.bench.test") as client:
        client.sendmail(SENDER, [RECIPIENT], message)
    return time.monotonic() - started


async def deliver_aside(port: int) -> float | str:
    """deliver() in a process of its own, so the driver's busy event loop does not delay
    it: the seconds, or what went wrong."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--legit", str(port), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        async with asyncio.timeout(90):
            output, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        return "no answer within 90 s"
    try:
        return float(json.loads(output)["seconds"])
    except (ValueError, KeyError, TypeError):
        return output.decode(errors="replace").strip()[-200:] or f"exit {process.returncode}"


# --- the load ---------------------------------------------------------------------------

@dataclass
class Chunk:
    seconds: float = 0.0
    outcomes: Counter = field(default_factory=Counter)
    under_load: float | str | None = None  # the legitimate delivery halfway through

    @property
    def unexpected(self) -> int:
        return sum(count for outcome, count in self.outcomes.items() if outcome != "ok")


async def drive(first: int, last: int, port: int, concurrency: int) -> Chunk:
    """Sources first..last, `concurrency` at a time; a legitimate delivery at halfway."""
    chunk = Chunk()
    numbers = iter(range(first, last + 1))
    halfway = (last - first + 1) // 2
    aside: list[asyncio.Task] = []

    async def runner() -> None:
        for number in numbers:
            chunk.outcomes[await one_source(number, port)] += 1
            if sum(chunk.outcomes.values()) == halfway:
                aside.append(asyncio.ensure_future(deliver_aside(port)))

    timeout = (last - first + 1) / 20 + 120  # at least 20 sources a second
    started = time.monotonic()
    runners = [asyncio.ensure_future(runner()) for _ in range(concurrency)]
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*runners)
            chunk.seconds = time.monotonic() - started
            if aside:
                chunk.under_load = await aside[0]
    except TimeoutError:
        raise BenchError(f"sources {first}-{last} did not finish within {timeout:.0f} s "
                         f"({sum(chunk.outcomes.values())} done)") from None
    finally:
        for task in runners + aside:
            task.cancel()
        await asyncio.gather(*runners, *aside, return_exceptions=True)
    return chunk


# --- the targets -------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    port: int
    process: subprocess.Popen | None  # the gate; None for Postfix
    root_pid: int  # root of the process tree whose PSS is measured
    log: Path
    metrics_port: int = 0
    close: Callable[[], None] = field(default=lambda: None, repr=False)
    instance: PostfixInstance | None = None  # the Postfix peer's
    start_pss: int | None = None  # PSS of the 0 row


def portcullis_executable() -> str:
    path = REPO / ".venv" / "bin" / "portcullis"
    if not path.exists():
        raise BenchError(f"{path} not found (run scripts/install-deps test)")
    return str(path)


def start_gate(workdir: Path, args: argparse.Namespace) -> Target:
    sink = SmtpSink(workdir, "portcullis")
    port, metrics_port = free_port(HOST), free_port(HOST)
    recipients = workdir / "recipients"
    recipients.write_text(f"{RECIPIENT}\n")
    state = workdir / "gate-state"
    state.mkdir()
    caps = 4 * args.concurrency + 1000
    config = {
        "hostname": "portcullis.bench.test",
        "listen": [f"[{HOST}]:{port}"],
        "relay_domains": [DOMAIN],
        "recipients": {"source": "static", "file": str(recipients)},
        "backend": {"servers": [f"127.0.0.1:{sink.port}"]},
        "state_dir": str(state),
        "tls": {"enabled": False},
        "metrics": {"listen": f"[{HOST}]:{metrics_port}"},
        "reputation": {"store": args.store},
        "dns": {"nameservers": ["127.0.0.1:53"], "fcrdns": {"action": "off"}},
        "limits": {
            "max_tracked_clients": args.cap,
            "pregreet_delay": args.pregreet_delay,
            "max_connections": caps,
            "max_connections_per_ip": caps,
            "max_connections_per_prefix": caps,
        },
    }
    config_file = workdir / "portcullis.yaml"
    config_file.write_text(yaml.safe_dump(config))
    log = workdir / "portcullis.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([portcullis_executable(), "serve", "-c", str(config_file)],
                                   stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)

    def close() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(25)
            except subprocess.TimeoutExpired:
                pass
        for pid in process_tree(process.pid)[1:]:  # workers left behind, if any
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
            process.wait(10)
        sink.close()

    target = Target("Portcullis", port, process, process.pid, log, metrics_port, close)
    try:
        wait_until(lambda: process.poll() is not None or (
            port_accepts(HOST, port) and port_accepts(HOST, metrics_port)), 30,
            "portcullis to listen")
        if process.poll() is not None:
            raise BenchError(f"`portcullis serve` exited with status {process.returncode}"
                             + log_tail(log))
    except BaseException:
        close()
        raise
    return target


def start_postfix(workdir: Path, concurrency: int) -> Target:
    """bench/throughput.py's Postfix target (postscreen -> smtpd -> before-queue
    smtpd_proxy_filter -> smtp-sink), on [::1], with the same one valid recipient, and
    postscreen's queue limits (200 by default) far above the load, as the gate's caps."""
    sink = SmtpSink(workdir, "postfix")
    port = free_port(HOST)
    queue_limit = str(4 * concurrency + 1000)
    services = (f"[{HOST}]:{port} inet n - n - 1 postscreen\n"
                "smtpd      pass  - - n - - smtpd\n"
                "dnsblog    unix  - - n - 0 dnsblog\n"
                "tlsproxy   unix  - - n - 0 tlsproxy\n"
                "relay      unix  - - n - - smtp\n")
    instance = PostfixInstance({}, services, name="postfix-ipv6")
    try:
        recipients = instance.postmap("relay_recipients", {RECIPIENT: "OK"})
        instance.postconf({
            "inet_protocols": "all",
            "mynetworks": "",
            "relay_domains": DOMAIN,
            "relay_recipient_maps": recipients,
            "relay_transport": f"relay:[127.0.0.1]:{sink.port}",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": "reject_unlisted_recipient",
            "smtpd_proxy_filter": f"127.0.0.1:{sink.port}",
            "smtpd_proxy_timeout": "100s",
            "postscreen_greet_action": "enforce",
            "postscreen_greet_wait": "1s",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_client_message_rate_limit": "0",
            "smtpd_client_recipient_rate_limit": "0",
            "postscreen_client_connection_count_limit": "0",
            "postscreen_pre_queue_limit": queue_limit,
            "postscreen_post_queue_limit": queue_limit,
            "default_process_limit": "200",
        })
        instance.start()
        wait_until(lambda: port_accepts(HOST, port), 30, "postscreen to listen")
    except BaseException:
        instance.close()
        sink.close()
        raise

    def close() -> None:
        instance.close()
        sink.close()
    return Target("Postfix postscreen+proxy", port, None, instance.master_pid() or 0,
                  instance.log_file, close=close, instance=instance)


def log_tail(log: Path, lines: int = 8) -> str:
    tail = log.read_text(errors="replace").strip().splitlines()[-lines:] if log.exists() else []
    return "; its log ends:\n      " + "\n      ".join(tail) if tail else ""


# --- measurements ---------------------------------------------------------------------------

@dataclass
class Row:
    sources: int
    pss: int
    pss_front: int  # the admission process alone, or postscreen alone
    evictions: dict[str, float]
    legit: float
    chunk: Chunk | None = None
    note: str = ""


def evictions(metrics_port: int) -> dict[str, float]:
    url = f"http://[{HOST}]:{metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except OSError as problem:
        raise BenchError(f"the metrics endpoint {url} did not answer: {problem}") from None
    found = re.findall(r'^portcullis_state_evictions_total\{table="([^"]+)"\} (\S+)$', text,
                       re.MULTILINE)
    return {table: float(value) for table, value in found}


def measure(target: Target, sources: int, chunk: Chunk | None) -> Row:
    if target.process is not None and target.process.poll() is not None:
        raise BenchError(f"the gate exited with status {target.process.returncode} after "
                         f"{sources} sources" + log_tail(target.log))
    time.sleep(SETTLE)
    if target.process is not None:
        total = pss_bytes(target.root_pid)
        front = total - sum(pss_bytes(pid) for pid in process_tree(target.root_pid)[1:])
        evicted = evictions(target.metrics_port)
        note = ""
    else:
        instance = target.instance
        target.root_pid = instance.master_pid() or target.root_pid
        total = pss_bytes(target.root_pid)
        front = sum(pss_bytes(pid) for pid in instance.children("postscreen"))
        evicted = {}
        note = f"{len(instance.children('smtpd'))} smtpd"
    try:
        legit = deliver(target.port)
    except (OSError, smtplib.SMTPException) as problem:
        raise BenchError(f"{target.name}: the legitimate delivery after {sources} sources "
                         f"failed: {problem!r}") from None
    return Row(sources, total, front, evicted, legit, chunk, note)


def run_load(target: Target, args: argparse.Namespace) -> list[Row]:
    print(f"\n{target.name}: warm-up, then {args.sources} sources in steps of {args.step}",
          flush=True)
    try:  # load the code paths (a delivery, a refused RCPT) before the 0 row
        deliver(target.port)
    except (OSError, smtplib.SMTPException) as problem:
        raise BenchError(f"{target.name}: the warm-up delivery failed: {problem!r}"
                         + log_tail(target.log)) from None
    outcome = asyncio.run(_warm_up(target.port))
    if outcome != "ok":
        raise BenchError(f"{target.name}: the warm-up session did not get its 550: {outcome}")
    rows = [measure(target, 0, None)]
    print_row(target, rows[-1], header=True)
    done = 0
    while done < args.sources:
        last = min(done + args.step, args.sources)
        chunk = asyncio.run(drive(done + 1, last, target.port, args.concurrency))
        done = last
        if isinstance(chunk.under_load, str):
            raise BenchError(f"{target.name}: the legitimate delivery under load (after about "
                             f"{done - args.step // 2} sources) failed: {chunk.under_load}")
        rows.append(measure(target, done, chunk))
        print_row(target, rows[-1])
        for outcome, count in chunk.outcomes.most_common(4):
            if outcome != "ok":
                print(f"      {count} sources: {outcome}", flush=True)
    return rows


async def _warm_up(port: int) -> str:
    return await one_source(WARMUP, port)


# --- the report -------------------------------------------------------------------------------

def mib(size: float) -> float:
    return size / 2**20


def print_row(target: Target, row: Row, header: bool = False) -> None:
    gate = target.process is not None
    if header:
        front = "adm" if gate else "postscreen"
        columns = "  ".join(f"{table:>15}" for table in TABLES) if gate else f"{'processes':>12}"
        print(f"{'sources':>8} {'PSS MiB':>8} {front + ' MiB':>14} {'delta MiB':>9}  {columns}"
              f"  {'legit s':>8} {'under load s':>12} {'step s':>7} {'unexpected':>10}",
              flush=True)
    if target.start_pss is None:
        target.start_pss = row.pss
    start = target.start_pss
    if gate:
        columns = "  ".join(f"{row.evictions.get(table, 0):15.0f}" for table in TABLES)
    else:
        columns = f"{row.note:>12}"
    chunk = row.chunk
    under = f"{chunk.under_load:12.3f}" if chunk and chunk.under_load is not None else f"{'-':>12}"
    seconds = f"{chunk.seconds:7.1f}" if chunk else f"{'-':>7}"
    unexpected = f"{chunk.unexpected:10}" if chunk else f"{'-':>10}"
    print(f"{row.sources:8} {mib(row.pss):8.1f} {mib(row.pss_front):14.1f} "
          f"{mib(row.pss - start):+9.1f}  {columns}  {row.legit:8.3f} {under} {seconds} "
          f"{unexpected}", flush=True)


def summarise(rows: list[Row], cap: int, store: str) -> None:
    start = rows[0].pss
    at_cap = next((row for row in rows if row.sources >= cap), None)
    print(f"\nPortcullis, cap {cap} clients per table (limits.max_tracked_clients), "
          f"reputation store {store}:")
    if at_cap is None:
        print("  the load never reached the cap: no figure per client")
        return
    growth = at_cap.pss - start
    print(f"  PSS growth from 0 to {at_cap.sources} sources: {mib(growth):.1f} MiB; "
          f"{growth / cap:,.0f} bytes per tracked client (growth / {cap} clients, all "
          f"tables and processes together)")
    end = rows[-1]
    if end is at_cap:
        print("  no row after the cap: cannot say whether the growth stopped")
        return
    after = end.pss - at_cap.pss
    before_rate = growth / at_cap.sources
    after_rate = after / (end.sources - at_cap.sources)
    share = after_rate / before_rate if before_rate > 0 else float("inf")
    verdict = ("yes, it stopped" if share <= 0.1 else
               "it slowed, but did not stop" if share <= 0.5 else "no, it kept growing")
    print(f"  PSS growth after the cap ({at_cap.sources} -> {end.sources} sources): "
          f"{mib(after):+.1f} MiB, {after_rate:,.0f} bytes per source against "
          f"{before_rate:,.0f} before it ({share:.0%})")
    print(f"  did PSS growth stop after the cap? {verdict}")
    if store == "memory":
        print("  (memory store: each worker counts only its own sessions' misses, so its "
              "harvest table fills later than the gate's tables)")


def side_by_side(gate: list[Row], peer: list[Row]) -> None:
    print("\nSide by side, the same sources (PSS MiB):")
    print(f"{'sources':>8} {'Portcullis':>11} {'delta':>7} {'Postfix tree':>13} {'delta':>7} "
          f"{'postscreen':>11} {'smtpd':>12}")
    for ours, theirs in zip(gate, peer, strict=False):
        print(f"{ours.sources:8} {mib(ours.pss):11.1f} {mib(ours.pss - gate[0].pss):+7.1f} "
              f"{mib(theirs.pss):13.1f} {mib(theirs.pss - peer[0].pss):+7.1f} "
              f"{mib(theirs.pss_front):11.1f} {theirs.note:>12}")
    print("(Postfix's PSS is mostly its smtpd processes, which stay up to max_idle 100 s; "
          "postscreen keeps its client cache on disk, btree:postscreen_cache)")


def gate_errors(log: Path) -> None:
    errors = Counter(line.split(": ", 2)[-1][:100] for line in
                     log.read_text(errors="replace").splitlines()
                     if line.startswith(("ERROR", "CRITICAL", "Traceback")))
    for text, count in errors.most_common(5):
        print(f"  portcullis logged {count}x: {text}")


# --- the process inside the namespace -------------------------------------------------------

def inside(args: argparse.Namespace) -> int:
    """Everything that runs in the namespace: targets, load, measurements, report."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    workdir = Path(args.workdir)
    raise_fd_limit(65536)
    started = time.monotonic()
    gate_rows: list[Row] = []
    peer_rows: list[Row] = []
    gate = peer = None
    try:
        gate = start_gate(workdir, args)
        try:
            gate_rows = run_load(gate, args)
        finally:
            gate_errors(gate.log)
            gate.close()
            gate = None
        if args.peer:
            peer = start_postfix(workdir, args.concurrency)
            try:
                peer_rows = run_load(peer, args)
            finally:
                peer.close()
                peer = None
    except BenchError as problem:
        print(f"\nipv6_sources: FAILED: {problem}", file=sys.stderr, flush=True)
        return 1
    finally:
        for target in (gate, peer):
            if target is not None:
                target.close()
    summarise(gate_rows, args.cap, args.store)
    if peer_rows:
        side_by_side(gate_rows, peer_rows)
    elif not args.peer:
        print("\n(the Postfix peer was skipped: --no-peer)")
    print(f"\nruntime {time.monotonic() - started:.0f} s; load average at the end "
          f"{os.getloadavg()[0]:.2f} (2 shared cores: other work makes the timings noisy)")
    return 0


# --- the process outside: the namespace and the clean-up ------------------------------------

def outside(args: argparse.Namespace) -> int:
    from tests.support import netns

    def stop(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    print(f"ipv6_sources: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"{args.sources} sources, cap {args.cap}, {args.concurrency} at a time, "
          f"steps of {args.step}", flush=True)
    with tempfile.TemporaryDirectory(prefix="portcullis-ipv6-") as workdir, \
            netns.namespace("v6") as ns:
        Path(workdir).chmod(0o755)  # Postfix daemons must enter it
        ns.run([netns.IP, "-6", "route", "add", "local", ANYIP, "dev", "lo"])
        # smtplib and Postfix bind to AnyIP addresses, which IPv6 allows only with this.
        ns.run(["sysctl", "-q", "-w", "net.ipv6.ip_nonlocal_bind=1"])
        forwarded = ["--sources", str(args.sources), "--cap", str(args.cap), "--step",
                     str(args.step), "--concurrency", str(args.concurrency), "--store",
                     args.store, "--pregreet-delay", str(args.pregreet_delay),
                     "--peer" if args.peer else "--no-peer"]
        environment = {**os.environ, "TMPDIR": workdir,
                       "PATH": f"/usr/sbin:/sbin:{os.environ.get('PATH', '')}"}
        child = ns.popen([sys.executable, __file__, "--inside", workdir, *forwarded],
                         env=environment)
        try:
            return child.wait()
        finally:
            if child.poll() is None:  # interrupted: let it stop its targets
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGTERM)
                try:
                    child.wait(60)
                except subprocess.TimeoutExpired:
                    stop_process(child, 1)
            leftovers(ns)


def leftovers(ns) -> None:
    """Stop whatever still runs in the namespace (all of it started by this script)."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        pids = ns_pids(ns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + 10
        while pids and ns_pids(ns) and time.monotonic() < deadline:
            time.sleep(0.2)


def ns_pids(ns) -> list[int]:
    from tests.support import netns
    result = subprocess.run([netns.IP, "netns", "pids", ns.name], capture_output=True,
                            text=True, check=False, timeout=30)
    return [int(pid) for pid in result.stdout.split() if pid.isdigit() and int(pid) != os.getpid()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, help="IPv6 sources, one /64 each (50000)")
    parser.add_argument("--cap", type=int, help="limits.max_tracked_clients (10000)")
    parser.add_argument("--step", type=int, help="sources between measurements (sources/5)")
    parser.add_argument("--concurrency", type=int, default=200, help="sessions at a time")
    parser.add_argument("--store", choices=("sqlite", "memory"), default="sqlite",
                        help="reputation.store")
    parser.add_argument("--pregreet-delay", type=float, default=0.2,
                        help="limits.pregreet_delay, seconds")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure Postfix postscreen+proxy")
    parser.add_argument("--quick", action="store_true", help="5000 sources, cap 1000")
    parser.add_argument("--inside", metavar="WORKDIR", dest="workdir", help=argparse.SUPPRESS)
    parser.add_argument("--legit", metavar="PORT", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.legit:  # one delivery for deliver_aside()
        try:
            print(json.dumps({"seconds": deliver(args.legit)}))
        except (OSError, smtplib.SMTPException) as problem:
            print(json.dumps({"error": repr(problem)}))
            return 1
        return 0
    if args.sources is None:
        args.sources = 5000 if args.quick else 50_000
    if args.cap is None:
        args.cap = 1000 if args.quick else 10_000
    if args.step is None:
        args.step = max(1, args.sources // 5)
    if not 1 <= args.sources <= MAX_SOURCES:
        sys.exit(f"ipv6_sources: --sources must be 1..{MAX_SOURCES} (one /64 each in a /48)")
    if args.concurrency < 1 or args.step < 1:
        sys.exit("ipv6_sources: --concurrency and --step must be at least 1")
    if args.workdir:
        return inside(args)
    if os.geteuid() != 0:
        sys.exit("ipv6_sources: run as root (a network namespace, Postfix, smtp-sink -u nobody)")
    search = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    for tool, package in (("smtp-sink", "postfix"), ("postfix", "postfix"), ("ip", "iproute2"),
                          ("sysctl", "procps")):
        if shutil.which(tool, path=search) is None:
            sys.exit(f"ipv6_sources: {tool} not found: apt-get install {package} "
                     "(scripts/install-deps test bench)")
    try:
        return outside(args)
    except KeyboardInterrupt:
        print("\nipv6_sources: interrupted; the namespace, its processes and the temporary "
              "files are gone", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
