#!/usr/bin/env python3
"""Memory of the per-client state under an address-rotating attack, in-process.

Pushes N distinct client addresses (default 1,000,000: half IPv4 spread over 10.0.0.0/8,
half IPv6 rotating inside one /48) through the objects that keep per-client state: the
admission table (caps, rate bucket, pre-greet pass or failure) and the harvest-defence
engine with its reputation store (one invalid recipient per client, a ban now and then).
Every address is a new client arriving at 10,000 a second, so the time purge cannot help
and only the cap (limits.max_tracked_clients) bounds the tables.

It prints, every tenth of the run, the resident memory (VmRSS), the entries per table
and the evictions, then the growth per tracked client. With --baseline REV, the same run
is made against the code of git revision REV, side by side (e.g. the unbounded tables
before the cap).

Usage: bench/bounded_state.py [--clients N] [--cap N] [--baseline REV]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IPV6_48 = int(ipaddress.IPv6Address("2001:db8:77::"))
ARRIVALS_PER_SECOND = 10_000


def client_address(n: int) -> str:
    """The n-th attacking address: even n IPv4, odd n IPv6 inside 2001:db8:77::/48."""
    if n % 2 == 0:
        return str(ipaddress.IPv4Address(0x0A000000 + n // 2 % (1 << 24)))
    # Rotate through the /48's 65,536 /64s, a new interface id each time round.
    network, host = (n // 2) % 65_536, n // 2 // 65_536 + 1
    return str(ipaddress.IPv6Address(IPV6_48 + (network << 64) + host))


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(clients: int, cap: int | None) -> list[dict]:
    """Run the attack in this process; one row of figures per tenth of it."""
    from portcullis import config
    from portcullis.admission import ConnectionTable
    from portcullis.policy.dha import DhaEngine
    from portcullis.policy.reputation import open_store
    from portcullis.policy.score import ConnectionScore

    text = ("relay_domains: [example.org]\nbackend: {servers: ['127.0.0.1:25']}\n"
            "reputation: {store: memory}\n")
    if cap is not None:
        text += f"limits: {{max_tracked_clients: {cap}}}\n"
    settings = config.loads(text)
    now = 1_800_000_000.0
    table = ConnectionTable(settings)
    engine = DhaEngine(settings, open_store(settings, lambda: now), clock=lambda: now)
    tables = {"pregreet_passed": table.pregreet_passed, "pregreet_failed": table.pregreet_failed,
              "rate": table.buckets, "harvest": engine.store._events,
              "bans": engine.store._bans}
    rows, start = [], rss_bytes()
    for n in range(clients):
        now = 1_800_000_000.0 + n / ARRIVALS_PER_SECOND
        ip = client_address(n)
        engine.check_connect(ip)
        table.judge(ip, now)
        table.opened(ip, True)
        if n % 10:
            table.pregreet_pass(ip, now)
        else:
            table.pregreet_fail(ip, now)
        score = ConnectionScore(settings.score)
        if engine.before_rcpt(ip, score).reply is None:
            engine.invalid_recipient(ip, score)
        if n % 50 == 0:
            engine.ban(ip, "BENCH")
        table.closed(ip, True)
        if (n + 1) % (clients // 10) == 0:
            table.prune(now)
            rows.append({"clients": n + 1, "rss": rss_bytes() - start,
                         "entries": {name: len(t) for name, t in tables.items()},
                         "evictions": sum(getattr(t, "evictions", 0) for t in tables.values())})
    return rows


def run_at(source: Path, clients: int, cap: int | None) -> list[dict]:
    """measure() in a fresh interpreter importing portcullis from `source`."""
    command = [sys.executable, __file__, "--measure", "--clients", str(clients)]
    if cap is not None:
        command += ["--cap", str(cap)]
    env = {**os.environ, "PYTHONPATH": str(source / "appliance")}
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(output.stdout)


def print_rows(name: str, rows: list[dict]) -> None:
    print(f"\n{name}")
    print(f"{'clients':>10} {'RSS growth':>11} {'entries, all tables':>20} {'evictions':>10}")
    for row in rows:
        print(f"{row['clients']:>10,} {row['rss'] / 2**20:>7.1f} MiB "
              f"{sum(row['entries'].values()):>20,} {row['evictions']:>10,}")
    last = rows[-1]
    print("  per table at the end: " + ", ".join(f"{name} {count:,}" for name, count
                                                in last["entries"].items()))
    print(f"  {last['rss'] / sum(last['entries'].values()):.0f} bytes of RSS growth "
          "per entry held")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1_000_000)
    parser.add_argument("--cap", type=int, help="limits.max_tracked_clients (default: its default)")
    parser.add_argument("--baseline", metavar="REV", help="also run the code of git revision REV")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clients < 10:
        parser.error("--clients must be at least 10")
    if args.measure:
        print(json.dumps(measure(args.clients, args.cap)))
        return 0
    print(f"{args.clients:,} distinct clients, half IPv6 inside one /48, "
          f"{ARRIVALS_PER_SECOND:,} new ones a second")
    print_rows("Portcullis (this tree)", run_at(REPO, args.clients, args.cap))
    if args.baseline:
        with tempfile.TemporaryDirectory() as worktree:
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach",
                            worktree, args.baseline], check=True)
            try:
                # The baseline may not know the cap; it runs with its own defaults.
                print_rows(f"Portcullis at {args.baseline}", run_at(Path(worktree),
                                                                    args.clients, None))
            finally:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                                worktree], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
