"""What a client check found, in a form the session acts on and logs.

Each finding has a log label (FCRDNS_FAIL, DNSBL, HELO_NOT_FQDN, DNS_TIMEOUT...), the
action the configuration gives that check, and the score signal it stands for:

    REJECT    refuse (the session picks the phase and the 5xx reply)
    TEMPFAIL  answer 4xx; the sender retries
    SCORE     add `signal` to the connection score (score.py) and carry on
    NONE      neutral: only logged (a DNS timeout, an allowlist hit, a rank below threshold)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .score import Signal


class Action(enum.IntEnum):
    """Ordered by severity, so max() of several actions is the one to take."""

    NONE = 0
    SCORE = 1
    TEMPFAIL = 2
    REJECT = 3

    @classmethod
    def configured(cls, setting: str) -> Action | None:
        """The action for a config value of CHECK_ACTIONS; None when the check is off."""
        return None if setting == "off" else cls[setting.upper()]


@dataclass(frozen=True)
class Finding:
    label: str
    action: Action
    signal: Signal | None  # what to add to the score when action is SCORE
    detail: str


def strongest_action(findings: list[Finding]) -> Action:
    return max((finding.action for finding in findings), default=Action.NONE)
