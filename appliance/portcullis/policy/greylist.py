"""Greylisting, as OpenBSD spamd and postgrey do it (`greylist.enabled`, off by default).

A triplet is (the client's network: its /24, or /64 for IPv6; the envelope sender; the
recipient). The first attempt of a triplet gets 451 4.7.1 at RCPT. A retry after
`greylist.delay` (5 minutes) and before `greylist.retry_window` (4 hours) passes, and
from then on the client's network passes for `greylist.pass_ttl` (36 days) without
delays: a real MTA retries from its queue, a spam-bot that fires and forgets does not.
A retry after the window counts as expired and starts over.

Exempt: the allowlist, clients a DNS allowlist vouches for (a DNSWL finding), and
clients whose forward-confirmed reverse DNS name is in, or under, `greylist.exempt_names`
(large senders retry from other addresses of a pool, which would start over each time).

No oracle: the chain asks greylisting before the directory, so a greylisted valid and
invalid recipient look the same. The state lives in the reputation store as marks, so
the gate's processes share it, and with the fleet's store every appliance does: a retry
that lands on another MX passes.

Why the defaults: 5 minutes is longer than a spam-bot waits and shorter than any MTA's
first retry interval (Postfix 5 min, Exim 15 min, sendmail 15 min); 4 hours leaves room
for slow queues; 36 days lets a monthly newsletter pass without a new delay.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from enum import Enum

from ..addresses import prefix_of_text
from ..smtp.replies import Reply
from .reputation import ReputationStore

GREYLISTED = Reply(451, "4.7.1", "Greylisted, please try again later")

TRIPLET = "greylist"  # mark: a triplet's first sighting (value), until the retry window ends
PASSED = "greylist_pass"  # mark: when a client's network passed, until pass_ttl after
MARKS = (TRIPLET, PASSED)


class Outcome(Enum):
    PASS = "pass"  # the client's network passed before
    FIRST = "first"  # a new triplet: greylisted
    EARLY = "early"  # retried before the delay: greylisted
    EXPIRED = "expired"  # retried after the window: greylisted again, starting over
    RETRIED = "retried"  # retried in time: passes, and the client's network with it


GREYLISTED_OUTCOMES = frozenset({Outcome.FIRST, Outcome.EARLY, Outcome.EXPIRED})


# What the metrics count (portcullis_greylist_total{event=...}).
EVENTS = {Outcome.FIRST: "seen", Outcome.RETRIED: "passed", Outcome.EXPIRED: "expired"}


class Greylist:
    """count(event) is called with "seen", "passed" or "expired" (EVENTS)."""

    def __init__(self, config, store: ReputationStore, count: Callable[[str], None],
                 clock: Callable[[], float] = time.time):
        self.settings = config.greylist
        self.enabled = self.settings.enabled
        self.store = store
        self.count = count
        self.clock = clock
        self._exempt_names = tuple(self.settings.exempt_names)

    def is_exempt_name(self, name: str) -> bool:
        """Whether a forward-confirmed client name is one of the large senders."""
        name = name.lower().rstrip(".")
        return any(name == domain or name.endswith("." + domain)
                   for domain in self._exempt_names)

    def judge(self, ip: str, sender: str, recipient: str) -> Outcome:
        """What this attempt of the triplet is; the caller has checked the exemptions."""
        outcome = self._judge(ip, sender, recipient)
        if outcome in EVENTS:
            self.count(EVENTS[outcome])
        return outcome

    def _judge(self, ip: str, sender: str, recipient: str) -> Outcome:
        settings = self.settings
        now = self.clock()
        network = prefix_of_text(ip, 24, 64)
        passed = self.store.mark_of(PASSED, network)
        if passed is not None and passed[1] > now:
            return Outcome.PASS
        triplet = _digest(network, sender, recipient)
        seen = self.store.mark_of(TRIPLET, triplet)
        if seen is None or seen[1] <= now:
            self.store.mark(TRIPLET, triplet, now, now + settings.retry_window)
            return Outcome.FIRST if seen is None else Outcome.EXPIRED
        if now - seen[0] < settings.delay:
            return Outcome.EARLY
        self.store.mark(PASSED, network, now, now + settings.pass_ttl)
        return Outcome.RETRIED


def _digest(network: str, sender: str, recipient: str) -> str:
    """The triplet's key: bounded in length whatever the addresses are."""
    text = f"{network}\0{sender.lower()}\0{recipient.lower()}"
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()
