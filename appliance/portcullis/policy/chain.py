"""The order of judgement for one connection, phase by phase.

    connect  DNS checks (FCrDNS, DNS lists) start at once, for Internet clients only
    HELO     HELO/EHLO name checks
    STARTTLS the client's TLS rate
    MAIL     the client's message rate → the connection checks' findings: reject,
             tempfail or score
    RCPT     the client's recipient rate → relay domain → the connection's refusal →
             score and harvest defence → greylisting → directory

The session asks once per command; an answer of None means "pass". Every finding and
verdict is noted under its label, and scored findings go into the connection's score,
which the harvest defence turns into tarpit, tempfail or ban.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..addresses import is_public
from ..config import Config
from ..smtp import commands
from ..smtp.replies import Reply
from . import Lookup, RecipientDirectory
from .dha import DhaEngine, Verdict
from .dns_checks import DnsChecker
from .findings import Action, Finding, strongest_action
from .greylist import GREYLISTED, GREYLISTED_OUTCOMES, Greylist
from .rates import MESSAGES, RECIPIENTS, TLS, ClientRates
from .score import ConnectionScore, Signal

RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
CLIENT_REJECTED = Reply(554, "5.7.1", "Client host rejected")
CLIENT_TEMPFAILED = Reply(450, "4.7.1", "Client host check failed, try again later")
HELO_REJECTED = Reply(550, "5.7.1", "HELO/EHLO name rejected")
HELO_TEMPFAILED = Reply(450, "4.7.1", "HELO/EHLO name check failed, try again later")
UNKNOWN_RECIPIENT = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
DIRECTORY_TEMPFAIL = Reply(451, "4.4.3", "Recipient directory temporarily unavailable, try later")

# Violations that count as strikes against the connection's score.
STRIKES = frozenset({"LINE_TOO_LONG", "BAD_BYTES", "UNKNOWN_COMMAND", "BAD_SEQUENCE", "SYNTAX",
                     "ADDRESS_ROUTING"})


@dataclass(slots=True)
class Client:
    ip: str
    port: int
    stress: bool = False  # the gate is near its connection cap: tighter timeouts
    allowlisted: bool = False
    pregreet_failed: bool = False  # recently talked before the banner


async def _hold_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class PolicyChain:
    def __init__(self, config: Config, dha: DhaEngine, dns: DnsChecker,
                 directory: RecipientDirectory, client: Client, note: Callable[[str], None],
                 greylist: Greylist, rates: ClientRates):
        self.config = config
        self.dha = dha
        self.greylist = greylist
        self.rates = rates
        self.dns = dns
        self.directory = directory
        self.client = client
        self.note = note  # records a label in the session's log line and the metrics
        self.score = ConnectionScore(config.score)
        if client.pregreet_failed:
            self.score.add(Signal.PREGREET)
        # Private, loopback and allowlisted addresses have no public DNS reputation.
        self._client_checks: asyncio.Future | None = None
        if not client.allowlisted and is_public(client.ip):
            self._client_checks = asyncio.ensure_future(dns.check_client(client.ip))
        self._client_refusal: tuple[Reply, str] | None = None  # for every RCPT
        self.client_name = ""  # forward-confirmed reverse DNS name, known after judge_mail
        self._dnswl = False  # a DNS allowlist vouches for the client (after judge_mail)

    def close(self) -> None:
        if self._client_checks is not None:
            self._client_checks.cancel()

    def judge_hello(self, name: str, local_address: str) -> Reply | None:
        if self.client.allowlisted:
            return None
        findings = self.dns.check_helo(name, self.client.ip, [self.config.hostname],
                                       [local_address])
        action, closing = self._weigh(findings)
        if closing is not None:
            return closing
        if action is Action.REJECT:
            return HELO_REJECTED
        if action is Action.TEMPFAIL:
            return HELO_TEMPFAILED
        return None

    def judge_tls(self) -> tuple[Reply | None, str]:
        """At STARTTLS: a refusal and its label when the client is over its TLS rate."""
        return self._over_rate(TLS) or (None, "")

    async def judge_mail(self) -> Reply | None:
        """The client's message rate (421 and close when over it); then the connection
        checks, awaited at the first MAIL, whose refusal applies at RCPT."""
        over = self._over_rate(MESSAGES)
        if over is not None:
            self.note(over[1])
            return over[0]
        if self._client_checks is None:
            return None
        checks, self._client_checks = await self._client_checks, None
        findings, self.client_name = checks.findings, checks.name
        self._dnswl = any(finding.label == "DNSWL" for finding in findings)
        action, closing = self._weigh(findings)
        if closing is not None:
            return closing
        label = next((f.label for f in findings if f.action is action), "")
        if action is Action.REJECT:
            self._client_refusal = CLIENT_REJECTED, label
        elif action is Action.TEMPFAIL:
            self._client_refusal = CLIENT_TEMPFAILED, label
        return None

    async def judge_recipient(self, address: str, sender: str) -> tuple[Reply | None, str]:
        """A refusal and its label, or (None, "") to pass the recipient to the backend.

        No oracle: the delay, and for a suspect or greylisted client the reply itself,
        are fixed before the directory is asked, so valid and invalid addresses look
        the same.
        """
        arrived = time.monotonic()
        over = self._over_rate(RECIPIENTS)
        if over is not None:
            return over
        if not self.config.is_relay_domain(commands.domain_of(address)):
            return RELAY_DENIED, "RELAY_DENIED"
        if self._client_refusal is not None:
            return self._client_refusal
        verdict = self._noted(self.dha.before_rcpt(self.client.ip, self.score))
        if verdict.reply is not None:
            if verdict.delay:
                await _hold_until(arrived + verdict.delay)
            return verdict.reply, verdict.label
        if self._greylisted(sender, address):
            if verdict.delay:
                await _hold_until(arrived + verdict.delay)
            return GREYLISTED, "GREYLISTED"
        lookup = await self.directory.lookup(address)
        if verdict.delay:
            await _hold_until(arrived + verdict.delay)
        if lookup is Lookup.UNKNOWN:
            after = self._noted(self.dha.invalid_recipient(self.client.ip, self.score))
            return after.reply or UNKNOWN_RECIPIENT, "UNKNOWN_RCPT"
        if lookup is Lookup.TEMPFAIL:
            return DIRECTORY_TEMPFAIL, "DIRECTORY_TEMPFAIL"
        return None, ""

    def _over_rate(self, kind: str) -> tuple[Reply, str] | None:
        """Count one of a kind for the client; when over its cap, the refusal and its
        label, and the score's rate signal."""
        if self.client.allowlisted:
            return None
        over = self.rates.refusal(kind, self.client.ip)
        if over is not None:
            self.score.add(Signal.RATE)
        return over

    def _greylisted(self, sender: str, recipient: str) -> bool:
        greylist = self.greylist
        if (not greylist.enabled or self.client.allowlisted or self._dnswl
                or (self.client_name and greylist.is_exempt_name(self.client_name))):
            return False
        return greylist.judge(self.client.ip, sender, recipient) in GREYLISTED_OUTCOMES

    def judge_violation(self, label: str) -> Reply | None:
        """A strike scores; the reply to close with when the score reached a ban."""
        if label not in STRIKES:
            return None
        self.score.add(Signal.STRIKE)
        verdict = self._noted(self.dha.after_signal(self.client.ip, self.score))
        return verdict.reply if verdict.disconnect else None

    def _weigh(self, findings: list[Finding]) -> tuple[Action, Reply | None]:
        """Note every finding and score the scored ones. The strongest action, and the
        reply to close with when the score reached a ban."""
        scored = False
        for finding in findings:
            self.note(finding.label)
            if finding.action is Action.SCORE and finding.signal is not None:
                self.score.add(finding.signal)
                scored = True
        if scored:
            verdict = self._noted(self.dha.after_signal(self.client.ip, self.score))
            if verdict.disconnect:
                return Action.REJECT, verdict.reply
        return strongest_action(findings), None

    def _noted(self, verdict: Verdict) -> Verdict:
        if verdict.label:
            self.note(verdict.label)
        return verdict
