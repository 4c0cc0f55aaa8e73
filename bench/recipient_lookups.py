#!/usr/bin/env python3
"""The LDAP recipient directory under a harvest-like RCPT stream, against a real slapd.

The stream: --lookups RCPT addresses, --valid-share of them real mailboxes (500 in the
tree), the rest drawn from 5000 harvested names, so unknown addresses repeat as in a
directory-harvest attack. --sessions tasks look them up concurrently. Measured in the
same run, on the same slapd:

- portcullis: LdapRecipientDirectory with its cache (default TTLs) and a pool of 4;
- portcullis, no cache: the same with cache_size 0, so every lookup is a search;
- peer, inline ldap3: the obvious plugin, one synchronous ldap3 connection searched on
  the event loop itself, which stalls every other session while it waits.

For each it prints lookups per second, the cache hit rate, the 50th and 99th percentile
lookup latency, and the longest stall of the event loop (how late a 5 ms timer fired).

Usage: .venv/bin/python bench/recipient_lookups.py [--lookups N] [--sessions N]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ldap3

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from portcullis.config import LdapDirectory
from portcullis.policy import Lookup
from portcullis.policy.ldap_directory import (
    LdapRecipientDirectory,
    escape_filter_value,
)

from tests.support.slapd import GATE_DN, GATE_PASSWORD, SUFFIX, Person, Slapd

MAILBOXES = 500
HARVESTED_NAMES = 5000
TICK = 0.005


class InlineLdap:
    """The peer: a synchronous search on the event loop, no pool, no cache."""

    def __init__(self, settings: LdapDirectory):
        self.filter = settings.filter
        self.connection = ldap3.Connection(ldap3.Server(settings.url), GATE_DN, GATE_PASSWORD,
                                           auto_bind=True, read_only=True)
        self.cache_hit_rate = 0.0

    async def lookup(self, address: str) -> Lookup:
        query = self.filter.replace("{addr}", escape_filter_value(address.lower()))
        self.connection.search(SUFFIX, query, attributes=[ldap3.NO_ATTRIBUTES], size_limit=1)
        return Lookup.VALID if self.connection.entries else Lookup.UNKNOWN

    def close(self) -> None:
        self.connection.unbind()


def rcpt_stream(count: int, valid_share: float) -> list[str]:
    chooser = random.Random(25)
    valid = [f"user{i}@example.test" for i in range(MAILBOXES)]
    harvested = [f"h{i}x{chooser.randrange(10**6)}@example.test" for i in range(HARVESTED_NAMES)]
    return [chooser.choice(valid) if chooser.random() < valid_share else chooser.choice(harvested)
            for _ in range(count)]


async def measure(directory, addresses: list[str], sessions: int) -> dict:
    latencies: list[float] = []
    stalls: list[float] = []
    answers: dict[Lookup, int] = {}

    last_tick = [time.monotonic()]

    async def ticker():
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            stalls.append(now - last_tick[0] - TICK)
            last_tick[0] = now

    async def session(share: list[str]):
        for address in share:
            started = time.monotonic()
            answer = await directory.lookup(address)
            latencies.append(time.monotonic() - started)
            answers[answer] = answers.get(answer, 0) + 1

    ticking = asyncio.create_task(ticker())
    started = time.monotonic()
    await asyncio.gather(*(session(addresses[i::sessions]) for i in range(sessions)))
    elapsed = time.monotonic() - started
    ticking.cancel()
    stalls.append(time.monotonic() - last_tick[0] - TICK)  # a loop blocked to the end
    latencies.sort()
    return {
        "rate": len(addresses) / elapsed,
        "hit_rate": directory.cache_hit_rate,
        "p50": statistics.median(latencies),
        "p99": latencies[int(len(latencies) * 0.99) - 1],
        "stall": max(stalls, default=0.0),
        "answers": answers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lookups", type=int, default=20000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--valid-share", type=float, default=0.4)
    parser.add_argument("--pool-size", type=int, default=LdapDirectory.pool_size)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ldap-") as workdir:
        people = [Person(f"user{i}", f"user{i}@example.test") for i in range(MAILBOXES)]
        slapd = Slapd(Path(workdir), people)
        slapd.start()
        password_file = Path(workdir) / "password"
        password_file.write_text(GATE_PASSWORD)
        settings = LdapDirectory(url=slapd.url, bind_dn=GATE_DN, password_file=str(password_file),
                                 base=SUFFIX, pool_size=args.pool_size)
        addresses = rcpt_stream(args.lookups, args.valid_share)
        targets = [
            ("portcullis", lambda: LdapRecipientDirectory(settings)),
            ("portcullis, no cache",
             lambda: LdapRecipientDirectory(LdapDirectory(**{**vars(settings), "cache_size": 0}))),
            ("peer, inline ldap3", lambda: InlineLdap(settings)),
        ]
        print(f"{args.lookups} RCPT lookups, {args.sessions} sessions, "
              f"{args.valid_share:.0%} real mailboxes, pool of {args.pool_size}, {slapd.url}")
        print(f"{'target':<22} {'lookups/s':>10} {'hit rate':>9} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'loop stall ms':>14}")
        try:
            for name, make in targets:
                directory = make()
                try:
                    result = asyncio.run(measure(directory, addresses, args.sessions))
                finally:
                    directory.close()
                print(f"{name:<22} {result['rate']:>10.0f} {result['hit_rate']:>9.1%} "
                      f"{result['p50'] * 1000:>8.2f} {result['p99'] * 1000:>8.2f} "
                      f"{result['stall'] * 1000:>14.1f}")
                if Lookup.TEMPFAIL in result["answers"]:
                    print(f"  ({result['answers'][Lookup.TEMPFAIL]} lookups answered TEMPFAIL)")
        finally:
            slapd.stop()


if __name__ == "__main__":
    main()
