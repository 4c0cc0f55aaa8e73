"""Directory-harvest defence: count invalid recipients per client (an IPv4 address, or
an IPv6 /64: limits.ipv6_client_prefix) and per prefix (/24 for IPv4, /64 for IPv6:
limits.ipv4_prefix, ipv6_prefix) across sessions, over a sliding window of dha.window
seconds, and answer in stages, postscreen style:

    PASS      below dha.tarpit_after invalid recipients
    TARPIT    label DHA_TARPIT: each RCPT answer waits tarpit_step seconds per invalid
              recipient from tarpit_after on (1 s, 2 s, ...), at most tarpit_max
    SUSPECT   label DHA_SUSPECT (Stage.TEMPFAIL): every RCPT gets 450 4.7.1 after suspect_delay, whether
              the address exists or not
    BAN       label DHA_BAN: the address is banned for reputation.ban_ttl seconds; the
              gate refuses it before the banner (label BANNED) and the ban helper puts
              it in the nftables set, so later connections die in the kernel

A prefix has its own, higher thresholds (prefix_*_after); the harsher of the two stages
applies. The connection's score (score.py) is merged in: its TEMPFAIL acts like SUSPECT
and its BAN bans (label SCORE_BAN).

No oracle. The engine decides each RCPT's delay and, from SUSPECT on, its reply before
the directory is consulted, so neither the code nor the timing can depend on whether
the address exists. From SUSPECT on, the directory is not consulted at all, and every
RCPT counts toward the ban as a probe, so not even the moment of the ban depends on
which probed addresses exist.

Why the defaults are what they are:
- window 600 s, ban_after 10, ban_ttl 3600 s: ten misses in ten minutes is far above
  what typos produce and far below what a harvest needs; an hour makes a harvester's
  list of addresses go stale while a misjudged server only queues for an hour.
- tarpit_after 3: two typos cost nothing; from the third miss a prober slows down.
- suspect_after 5: from then on the prober learns nothing. A legitimate mailing with
  five stale addresses in ten minutes gets 450 and retries later; nothing is lost.
- prefix thresholds 10 / 20 / 30: a /24 or /64 holds many clients (hosters, NAT), so
  the bar is three times the per-address one, yet an attacker rotating addresses
  inside one prefix is still caught.
- tarpit_step 1 s, tarpit_max 5 s, suspect_delay 5 s: far inside RFC 5321's 5-minute
  RCPT timeout, so no legitimate client fails; with limits.max_connections_per_ip (20)
  a prober gets at most 4 answers a second. suspect_delay equals tarpit_max, so the
  switch to SUSPECT does not show in the timing.

The session's side of the contract:

    verdict = engine.check_connect(ip)            # before the banner
    if verdict.stage is Stage.BAN: send verdict.reply (421) and close

    verdict = engine.before_rcpt(ip, score)       # when RCPT TO arrives
    if verdict.reply: after verdict.delay (from the command's arrival) send verdict.reply,
        do NOT consult the directory; close if verdict.disconnect
    else: run the lookup and a verdict.delay timer together, answer when both are done;
        on UNKNOWN: verdict = engine.invalid_recipient(ip, score)
                    send verdict.reply if set (421, then close) else the usual 550

    score.add(Signal.X); verdict = engine.after_signal(ip, score)   # other checks
    if verdict.disconnect: send verdict.reply and close
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..addresses import canonical, client_of, prefix_of_text
from ..bounded import BoundedTable
from ..config import Network
from ..smtp.replies import Reply
from .reputation import Ban, ReputationStore
from .score import ConnectionScore, Signal, Stage

log = logging.getLogger("portcullis.dha")

# One reply for every RCPT from a suspect client, valid or not.
TRY_LATER = Reply(450, "4.7.1", "Service temporarily unavailable, try again later")
# For a banned client, before the banner or when the ban falls during the session.
CLOSING = Reply(421, "4.7.1", "Service not available, closing transmission channel")

BANNED = "BANNED"
DHA_LABELS = {Stage.TARPIT: "DHA_TARPIT", Stage.TEMPFAIL: "DHA_SUSPECT", Stage.BAN: "DHA_BAN"}

PURGE_INTERVAL = 60.0  # seconds between sweeps of expired memory
REPUSH_INTERVAL = 60.0  # a banned address that still reaches the gate is re-sent this often


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the session does now. `label` goes into its log line and metrics."""

    stage: Stage
    label: str | None = None
    delay: float = 0.0  # seconds from the command's arrival to its answer
    reply: Reply | None = None  # when set, the answer, whatever the directory says

    @property
    def disconnect(self) -> bool:
        return self.stage is Stage.BAN


PASSED = Verdict(Stage.PASS)


@dataclass(frozen=True, slots=True)
class _Client:
    address: str  # canonical form; IPv4-mapped IPv6 becomes IPv4
    key: str  # the client: the IPv4 address, or the IPv6 /64 (limits.ipv6_client_prefix)
    prefix: str  # e.g. 192.0.2.0/24
    exempt: bool

    @property
    def keys(self) -> tuple[str, ...]:
        """What an event is counted against: the client, and its prefix if wider."""
        return (self.key,) if self.prefix == self.key else (self.key, self.prefix)


class DhaEngine:
    """Staged response to invalid recipients and to the connection score; see module doc.

    on_ban(address, seconds) is called for each address to put in the nftables set
    (firewall.BanClient.request_ban); it must not block.
    """

    def __init__(self, config, store: ReputationStore,
                 on_ban: Callable[[str, int], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.settings = config.dha
        self.ban_ttl = config.reputation.ban_ttl
        self.ipv4_prefix = config.limits.ipv4_prefix
        self.ipv6_prefix = config.limits.ipv6_prefix
        self.ipv6_client_prefix = config.limits.ipv6_client_prefix
        self.exempt: tuple[Network, ...] = tuple(config.allowlist)
        self.store = store
        self.on_ban = on_ban
        self.clock = clock
        # address -> when last sent to the firewall
        self._pushed = BoundedTable(config.limits.max_tracked_clients)
        # Every connection and RCPT asks who its client is: remember the answer.
        self._client = functools.lru_cache(maxsize=4096)(self._client_of)
        self._next_purge = 0.0

    # -- the session's calls ---------------------------------------------------------

    def check_connect(self, address: str) -> Verdict:
        """Before the banner: BAN (label BANNED, reply 421) if the address or its prefix
        is banned, else PASS."""
        client = self._client(address)
        now = self.clock()
        self.housekeeping(now)
        if client.exempt:
            return PASSED
        ban = self.store.ban_of(client.key, now) or self.store.ban_of(client.prefix, now)
        if ban is None:
            return PASSED
        # The kernel should have dropped it: the address is new in a banned prefix, or
        # the nftables set lost it (reboot, failed push). Send it (again).
        self._push(client.address, ban.until, now)
        return Verdict(Stage.BAN, BANNED, reply=CLOSING)

    def before_rcpt(self, address: str, score: ConnectionScore) -> Verdict:
        """When RCPT TO arrives, before any directory lookup."""
        client = self._client(address)
        if client.exempt:
            return PASSED
        now = self.clock()
        self.housekeeping(now)
        stage = self._dha_stage(client, now)
        if stage >= Stage.TEMPFAIL:
            # Suspect: count this RCPT as a probe, without knowing if the address exists.
            self._record(client, now)
            stage = self._dha_stage(client, now)
        return self._decide(client, now, stage, score, before_lookup=True)

    def invalid_recipient(self, address: str, score: ConnectionScore) -> Verdict:
        """After the directory said a recipient does not exist (not on TEMPFAIL)."""
        client = self._client(address)
        if client.exempt:
            return PASSED
        now = self.clock()
        self.housekeeping(now)
        score.add(Signal.INVALID_RECIPIENT)
        self._record(client, now)
        return self._decide(client, now, self._dha_stage(client, now), score,
                            before_lookup=False)

    def after_signal(self, address: str, score: ConnectionScore) -> Verdict:
        """After any other check added to the score: bans when the score reached BAN."""
        client = self._client(address)
        if client.exempt:
            return PASSED
        now = self.clock()
        self.housekeeping(now)
        return self._decide(client, now, self._dha_stage(client, now), score,
                            before_lookup=False)

    def ban(self, address: str, label: str) -> None:
        """Ban an address for reputation.ban_ttl (an administrator's or a check's call)."""
        client = self._client(address)
        if not client.exempt:
            self._ban(client, self.clock(), label, prefix_too=False)

    def enforce(self, ban: Ban) -> None:
        """Send a ban decided elsewhere (another appliance of a fleet) to the firewall,
        as restore_bans does: an address's; a prefix's waits for its clients to connect."""
        if "/" not in ban.key and not self._client(ban.key).exempt:
            now = self.clock()
            self._push(ban.key, ban.until, now)

    def lifted(self, key: str) -> None:
        """A ban on key was lifted elsewhere: a new one is sent to the firewall at once."""
        self._pushed.pop(key, None)

    def housekeeping(self, now: float | None = None) -> None:
        """Take in other processes' writes, and every PURGE_INTERVAL forget what expired.
        Every entry point calls it, and every process's timer too, so an idle process
        forgets as well."""
        now = self.clock() if now is None else now
        self.store.sync()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_INTERVAL
        self.store.purge(now)
        horizon = now - REPUSH_INTERVAL
        self._pushed.drop_where(lambda pushed_at: pushed_at <= horizon)

    def take_evictions(self) -> dict[str, int]:
        """Entries dropped because a table was full, per table, since the last call."""
        return {**self.store.take_evictions(), "ban_pushes": self._pushed.take_evictions()}

    def restore_bans(self) -> int:
        """At start: send every active address ban to the firewall (the nftables set is
        empty after a reboot). Returns how many were sent."""
        now = self.clock()
        sent = 0
        for ban in self.store.active_bans(now):
            if "/" not in ban.key:
                self._push(ban.key, ban.until, now)
                sent += 1
        return sent

    # -- internals -------------------------------------------------------------------

    def _client_of(self, address: str) -> _Client:
        ip = canonical(address)
        text = str(ip)
        return _Client(text, client_of(text, self.ipv6_client_prefix),
                       prefix_of_text(text, self.ipv4_prefix, self.ipv6_prefix),
                       any(ip in net for net in self.exempt))

    def _dha_stage(self, client: _Client, now: float) -> Stage:
        if not self.settings.enabled:
            return Stage.PASS
        return max(self._address_stage(client, now), self._prefix_stage(client, now))

    def _address_stage(self, client: _Client, now: float) -> Stage:
        s = self.settings
        count = self.store.count_events(client.key, now - s.window)
        return _stage(count, s.tarpit_after, s.suspect_after, s.ban_after)

    def _prefix_stage(self, client: _Client, now: float) -> Stage:
        s = self.settings
        count = self.store.count_events(client.prefix, now - s.window)
        return _stage(count, s.prefix_tarpit_after, s.prefix_suspect_after, s.prefix_ban_after)

    def _tarpit_delay(self, client: _Client, now: float) -> float:
        s = self.settings
        since = now - s.window
        over = max(self.store.count_events(client.key, since) - s.tarpit_after,
                   self.store.count_events(client.prefix, since) - s.prefix_tarpit_after)
        return min(s.tarpit_max, s.tarpit_step * (over + 1)) if over >= 0 else 0.0

    def _record(self, client: _Client, now: float) -> None:
        if self.settings.enabled:
            for key in client.keys:
                self.store.add_event(key, now)

    def _decide(self, client: _Client, now: float, dha_stage: Stage, score: ConnectionScore,
                before_lookup: bool) -> Verdict:
        score_stage = score.stage
        stage = max(dha_stage, score_stage)
        if stage is Stage.PASS:
            return PASSED
        label = DHA_LABELS[dha_stage] if dha_stage >= score_stage else score.label
        if stage is Stage.BAN:
            by_prefix = dha_stage is Stage.BAN and self._prefix_stage(client, now) is Stage.BAN
            self._ban(client, now, label, prefix_too=by_prefix)
            delay = self.settings.suspect_delay if before_lookup else 0.0
            return Verdict(Stage.BAN, label, delay, CLOSING)
        if stage is Stage.TEMPFAIL:
            return Verdict(Stage.TEMPFAIL, label, self.settings.suspect_delay, TRY_LATER)
        dha_delay = self._tarpit_delay(client, now) if dha_stage is Stage.TARPIT else 0.0
        return Verdict(Stage.TARPIT, label, max(dha_delay, score.delay))

    def _ban(self, client: _Client, now: float, label: str, prefix_too: bool) -> None:
        """Ban for ban_ttl from the first trigger; a ban in force is not extended."""
        keys = client.keys if prefix_too else (client.key,)
        until = now + self.ban_ttl
        for key in keys:
            if self.store.ban_of(key, now) is None:
                self.store.ban(key, until, label)
                log.info("%s %s banned for %ss", label, key, int(self.ban_ttl))
        ban = self.store.ban_of(client.key, now)
        self._push(client.address, ban.until if ban else until, now)

    def _push(self, address: str, until: float, now: float) -> None:
        """Send a ban to the firewall, at most once per REPUSH_INTERVAL per address."""
        last = self._pushed.get(address)
        if self.on_ban is None or (last is not None and now - last < REPUSH_INTERVAL):
            return
        seconds = int(until - now)
        if seconds >= 1:
            self._pushed[address] = now
            self.on_ban(address, seconds)


def _stage(count: int, tarpit_after: int, suspect_after: int, ban_after: int) -> Stage:
    if count >= ban_after:
        return Stage.BAN
    if count >= suspect_after:
        return Stage.TEMPFAIL
    if count >= tarpit_after:
        return Stage.TARPIT
    return Stage.PASS

