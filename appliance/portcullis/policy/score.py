"""One reputation score per connection, and the stage it puts the connection in.

Every check adds a weighted signal to the connection's score (`config.score.weights`);
the score's stage decides what the session does next:

    PASS       score below score.tarpit: answer normally
    TARPIT     score >= score.tarpit: wait score.tarpit_delay before each RCPT answer
    TEMPFAIL   score >= score.tempfail: answer 450 4.7.1 to every RCPT, valid or not
    BAN        score >= score.ban: close the connection and ban the address

The directory-harvest engine (`dha.py`) merges this stage with its own, which counts
invalid recipients across sessions; the session asks the engine, never the score alone.

Why the default weights and thresholds are what they are:
- pregreet 10: a client that talks before the banner breaks RFC 5321 4.3.1 and is a
  bot in practice; alone it reaches TEMPFAIL, and a real server that retries later
  loses nothing.
- dnsbl 8: a listing is strong evidence but lists have false positives, so alone it
  only tarpits; with one more weak signal (no reverse DNS, bad HELO) it tempfails.
- no_reverse_dns 3, bad_helo 3: common on small legitimate servers. Alone they do
  nothing; both together (6) earn a tarpit, never a refusal.
- invalid_recipient 2: a typo or two costs nothing visible. Within one session, 3
  misses tarpit, 5 tempfail and 10 ban, the same counts as the cross-session DHA
  defaults (dha.tarpit_after, suspect_after, ban_after).
- strike 2: a protocol error (unknown command, bad syntax); limits.max_strikes ends
  the session anyway.
- rate 2: a client over a message, recipient or TLS rate (rates.py): by itself only
  slowed down, like a strike.
- Thresholds 5 / 10 / 20: a ban needs two strong signals and misconduct within the
  session (pregreet + dnsbl + one invalid recipient), so no single check's false
  positive can ban anyone.
"""

from __future__ import annotations

import enum

from ..config import Score


class Stage(enum.IntEnum):
    """How hard the gate treats a client; higher is harsher. Shared with dha.py."""

    PASS = 0
    TARPIT = 1
    TEMPFAIL = 2
    BAN = 3


class Signal(enum.Enum):
    """What a check observed. Each value names its weight in config.score.weights."""

    PREGREET = "pregreet"
    DNSBL = "dnsbl"
    NO_REVERSE_DNS = "no_reverse_dns"
    BAD_HELO = "bad_helo"
    INVALID_RECIPIENT = "invalid_recipient"
    STRIKE = "strike"
    RATE = "rate"


LABELS = {Stage.TARPIT: "SCORE_TARPIT", Stage.TEMPFAIL: "SCORE_TEMPFAIL", Stage.BAN: "SCORE_BAN"}


class ConnectionScore:
    """The running score of one connection. Create one per connection."""

    __slots__ = ("_settings", "signals", "value")

    def __init__(self, settings: Score):
        self._settings = settings
        self.value = 0.0
        self.signals: dict[str, int] = {}  # signal name -> times seen, for the log line

    def add(self, signal: Signal, weight: float | None = None) -> Stage:
        """Count one observation; weight overrides the configured one (e.g. per DNSBL zone)."""
        if weight is None:
            weight = getattr(self._settings.weights, signal.value)
        self.value += weight
        self.signals[signal.value] = self.signals.get(signal.value, 0) + 1
        return self.stage

    @property
    def stage(self) -> Stage:
        settings = self._settings
        if self.value >= settings.ban:
            return Stage.BAN
        if self.value >= settings.tempfail:
            return Stage.TEMPFAIL
        if self.value >= settings.tarpit:
            return Stage.TARPIT
        return Stage.PASS

    @property
    def label(self) -> str | None:
        return LABELS.get(self.stage)

    @property
    def delay(self) -> float:
        """Seconds to hold each RCPT answer at this score (the TARPIT delay or none)."""
        return self._settings.tarpit_delay if self.stage >= Stage.TARPIT else 0.0

    def describe(self) -> str:
        """For the session's log line, e.g. "12 pregreet bad_helo invalid_recipient*2"."""
        parts = [f"{self.value:g}"]
        for name, count in self.signals.items():
            parts.append(name if count == 1 else f"{name}*{count}")
        return " ".join(parts)
