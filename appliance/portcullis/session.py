"""One SMTP session: socket I/O around the sans-IO core, policy, and the backend relay.

The walk for a message: the core parses, policy judges each recipient, the first
recipient that passes opens the backend transaction, DATA streams through, and the
client's final answer is the backend's. Nothing is queued here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import ClassVar

from . import metrics
from .config import Config
from .policy import Lookup
from .policy.dha import DhaEngine, Verdict
from .policy.dns_checks import DnsChecker
from .policy.findings import Action, Finding, strongest_action
from .policy.score import ConnectionScore, Signal
from .smtp import commands, replies
from .smtp import state as smtp
from .smtp.replies import Reply
from .upstream import BackendConnection, BackendPool, BackendUnavailable

log = logging.getLogger("portcullis.session")

READ_SIZE = 65536

RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
CLIENT_REJECTED = Reply(554, "5.7.1", "Client host rejected")
CLIENT_TEMPFAILED = Reply(450, "4.7.1", "Client host check failed, try again later")
HELO_REJECTED = Reply(550, "5.7.1", "HELO/EHLO name rejected")
HELO_TEMPFAILED = Reply(450, "4.7.1", "HELO/EHLO name check failed, try again later")
INTERNAL_ERROR = Reply(421, "4.3.0", "Internal error, closing connection, try again later")
UNKNOWN_RECIPIENT = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
DIRECTORY_TEMPFAIL = Reply(451, "4.4.3", "Recipient directory temporarily unavailable, try later")
BACKEND_DOWN = Reply(451, "4.4.1", "Mail server temporarily unavailable, try later")
BACKEND_FAILED_DATA = Reply(451, "4.4.2", "Mail server connection failed, message not accepted, try later")


@dataclass(slots=True)
class Client:
    ip: str
    port: int
    stress: bool = False  # the gate is near its connection cap: tighter timeouts
    allowlisted: bool = False
    pregreet_failed: bool = False  # recently talked before the banner


@dataclass
class Services:
    """What every session of a worker shares."""

    config: Config
    recipients: object  # a recipient directory (policy contract)
    backend: BackendPool
    tls: ssl.SSLContext | None
    tally: metrics.Tally
    dha: DhaEngine
    dns: DnsChecker
    limits: smtp.ProtocolLimits = field(init=False)

    def __post_init__(self) -> None:
        limits = self.config.limits
        self.limits = smtp.ProtocolLimits(
            max_message_size=limits.max_message_size,
            max_recipients=limits.max_recipients,
            max_strikes=limits.max_strikes,
            max_commands=limits.max_commands,
        )


# Violations that count as strikes against the connection's score.
STRIKES = frozenset({"LINE_TOO_LONG", "BAD_BYTES", "UNKNOWN_COMMAND", "BAD_SEQUENCE", "SYNTAX"})


async def _hold_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class SessionTimeout(Exception):
    def __init__(self, label: str):
        super().__init__(label)
        self.label = label


@dataclass
class Transaction:
    sender: str
    mail: commands.MailFrom
    recipients: list[dict] = field(default_factory=list)
    backend: BackendConnection | None = None
    backend_failed: bool = False
    backend_in_data: bool = False  # the backend said 354 and awaits the final dot
    size: int = 0
    reply: str = ""


class Session:
    def __init__(self, services: Services, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, client: Client):
        self.services = services
        self.config = services.config
        self.reader = reader
        self.writer = writer
        self.client = client
        self.core = smtp.SmtpServer(
            self.config.hostname, services.limits,
            tls_available=services.tls is not None,
            postmaster_domain=self.config.relay_domains[0],
        )
        self.started = time.monotonic()
        limits = self.config.limits
        self.deadline = self.started + limits.session_timeout
        self.idle_timeout = (
            limits.stress_command_timeout if client.stress else limits.command_timeout)
        self.helo = ""
        self.transaction: Transaction | None = None
        self.transactions: list[dict] = []
        self.labels: dict[str, int] = {}  # reason label -> times, in order of first use
        self.score = ConnectionScore(self.config.score)
        if client.pregreet_failed:
            self.score.add(Signal.PREGREET)
        # DNS checks run while the client talks, for Internet clients only: private,
        # loopback and allowlisted addresses have no public DNS reputation.
        self.client_checks: asyncio.Future | None = None
        if not client.allowlisted and ipaddress.ip_address(client.ip).is_global:
            self.client_checks = asyncio.ensure_future(services.dns.check_client(client.ip))
        self.client_refusal: tuple[Reply, str] | None = None  # for every RCPT, from checks
        self.bytes_in = 0
        self.data_started = 0.0  # when the client got 354, and bytes_in then
        self.bytes_before_data = 0

    # --- the loop -----------------------------------------------------------

    async def run(self) -> None:
        try:
            self.core.send(Reply(220, "", f"{self.config.hostname} ESMTP"))
            await self._serve()
        except SessionTimeout as timeout:
            self._reason(timeout.label)
            self.core.close_with(
                Reply(421, "4.4.2", f"{self.config.hostname} Timeout, closing connection"))
        except (ConnectionError, ssl.SSLError) as e:
            self._reason("DISCONNECT")
            log.debug("client %s: %s", self.client.ip, e)
        except Exception:  # a bug here must cost the client a retry, never a message
            log.exception("session with %s failed", self.client.ip)
            self._reason("INTERNAL_ERROR")
            self.core.close_with(INTERNAL_ERROR)
        finally:
            await self._end_transaction(aborted=True)
            if self.client_checks is not None:
                self.client_checks.cancel()
            await self._close()
            self._log_line()

    async def _serve(self) -> None:
        core = self.core
        while True:
            event = core.next_event()
            if event is smtp.NEED_DATA:
                await self._flush()
                core.receive_data(await self._read())
                continue
            if isinstance(event, smtp.Closed):
                if event.reason == "eof":
                    self._reason("HANGUP")
                return
            handler = self._handlers[type(event)]
            await handler(self, event)

    async def _read(self) -> bytes:
        now = time.monotonic()
        timeout = min(self.idle_timeout, self.deadline - now)
        if timeout <= 0:
            raise SessionTimeout("SESSION_DEADLINE")
        try:
            async with asyncio.timeout(timeout):
                data = await self.reader.read(READ_SIZE)
        except TimeoutError:
            raise SessionTimeout("SESSION_DEADLINE" if time.monotonic() >= self.deadline
                                 else "IDLE_TIMEOUT") from None
        self.bytes_in += len(data)
        if self.core.state is smtp.State.DATA:
            self._check_data_rate()
        return data

    def _check_data_rate(self) -> None:
        """Refuse a client that trickles its message slower than limits.min_data_rate."""
        elapsed = time.monotonic() - self.data_started
        minimum = self.config.limits.min_data_rate
        if minimum and elapsed > 10 and self.bytes_in - self.bytes_before_data < minimum * elapsed:
            raise SessionTimeout("DATA_TOO_SLOW")

    async def _flush(self) -> None:
        out = self.core.data_to_send()
        if out:
            self.writer.write(out)
            if self.writer.transport.get_write_buffer_size() > 64 * 1024:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        await self.writer.drain()
                except TimeoutError:
                    raise SessionTimeout("WRITE_TIMEOUT") from None

    # --- events ---------------------------------------------------------------

    async def _on_hello(self, event: smtp.Hello) -> None:
        await self._end_transaction(aborted=True)
        self.helo = event.name
        if not self.client.allowlisted:
            local = self.writer.get_extra_info("sockname") or ("",)
            findings = self.services.dns.check_helo(
                event.name, self.client.ip, [self.config.hostname], [local[0]])
            action = self._apply_findings(findings)
            if action is None:
                return
            if action is Action.REJECT:
                self.core.respond(HELO_REJECTED)
                return
            if action is Action.TEMPFAIL:
                self.core.respond(HELO_TEMPFAILED)
                return
        self.core.respond(self.core.hello_reply(event))

    async def _on_mail(self, event: smtp.Mail) -> None:
        if self.client_checks is not None:
            findings, self.client_checks = await self.client_checks, None
            action = self._apply_findings(findings)
            if action is None:
                return
            label = next((f.label for f in findings if f.action is action), "")
            if action is Action.REJECT:
                self.client_refusal = CLIENT_REJECTED, label
            elif action is Action.TEMPFAIL:
                self.client_refusal = CLIENT_TEMPFAILED, label
        self.transaction = Transaction(event.sender.address, event.sender)
        self.core.respond(replies.SENDER_OK)

    def _apply_findings(self, findings: list[Finding]) -> Action | None:
        """Log every finding and add the scored ones. Return the strongest action, or
        None when the score reached a ban and the pending command was answered 421."""
        scored = False
        for finding in findings:
            self._reason(finding.label)
            if finding.action is Action.SCORE and finding.signal is not None:
                self.score.add(finding.signal)
                scored = True
        if scored:
            verdict = self.services.dha.after_signal(self.client.ip, self.score)
            self._note(verdict)
            if verdict.disconnect:
                self.core.respond(verdict.reply)
                return None
        return strongest_action(findings)

    async def _on_rcpt(self, event: smtp.Rcpt) -> None:
        transaction = self.transaction
        address = event.recipient.address
        reply, label = await self._judge_recipient(address, time.monotonic())
        if reply is None:
            reply, label = await self._relay_recipient(transaction, address)
        transaction.recipients.append({"to": address, "reply": reply.code, "label": label})
        if label:
            self._reason(label)
        self.core.respond(reply)

    async def _judge_recipient(self, address: str, arrived: float) -> tuple[Reply | None, str]:
        """Local policy: the domain, then the harvest defence and the directory.

        No oracle: the delay, and for a suspect client the reply itself, are fixed
        before the directory is asked, so valid and invalid addresses look the same.
        None means pass.
        """
        if not self.config.is_relay_domain(commands.domain_of(address)):
            return RELAY_DENIED, "RELAY_DENIED"
        if self.client_refusal is not None:
            return self.client_refusal
        dha = self.services.dha
        verdict = dha.before_rcpt(self.client.ip, self.score)
        self._note(verdict)
        if verdict.reply is not None:
            await _hold_until(arrived + verdict.delay)
            return verdict.reply, verdict.label
        lookup = await self.services.recipients.lookup(address)
        await _hold_until(arrived + verdict.delay)
        if lookup is Lookup.UNKNOWN:
            after = dha.invalid_recipient(self.client.ip, self.score)
            self._note(after)
            if after.reply is not None:
                return after.reply, "UNKNOWN_RCPT"
            return UNKNOWN_RECIPIENT, "UNKNOWN_RCPT"
        if lookup is Lookup.TEMPFAIL:
            return DIRECTORY_TEMPFAIL, "DIRECTORY_TEMPFAIL"
        return None, ""

    def _note(self, verdict: Verdict) -> None:
        if verdict.label:
            self._reason(verdict.label)

    async def _relay_recipient(self, transaction: Transaction, address: str) -> tuple[Reply, str]:
        """Ask the backend; its answer is the client's answer."""
        try:
            if transaction.backend is None:
                connection, mail_reply, reply = await self.services.backend.begin(
                    transaction.mail, address)
                transaction.backend = connection
                if not mail_reply.is_positive:
                    return mail_reply, "BACKEND_SENDER_REFUSED"
            else:
                reply = await transaction.backend.command(f"RCPT TO:<{address}>")
        except BackendUnavailable as e:
            log.warning("backend unavailable: %s", e)
            self.services.tally.add(metrics.BACKEND_ERRORS)
            self._drop_backend(transaction)
            return BACKEND_DOWN, "BACKEND_DOWN"
        return reply, "" if reply.is_positive else "BACKEND_REFUSED"

    async def _on_data_begin(self, event: smtp.DataBegin) -> None:
        transaction = self.transaction
        if transaction.backend is None:  # the backend was lost after RCPT
            self.core.respond(BACKEND_DOWN)
            self._reason("BACKEND_DOWN")
            return
        try:
            reply = await transaction.backend.command("DATA")
        except BackendUnavailable as e:
            log.warning("backend unavailable at DATA: %s", e)
            self.services.tally.add(metrics.BACKEND_ERRORS)
            self._drop_backend(transaction)
            self.core.respond(BACKEND_DOWN)
            self._reason("BACKEND_DOWN")
            return
        if reply.code != 354:
            self.core.respond(reply)
            self._reason("BACKEND_REFUSED")
            return
        transaction.backend_in_data = True
        self.data_started = time.monotonic()
        self.bytes_before_data = self.bytes_in
        self.core.respond(replies.START_DATA)
        await self._flush()

    async def _on_data_chunk(self, event: smtp.DataChunk) -> None:
        transaction = self.transaction
        transaction.size += len(event.data)
        if transaction.backend_failed:
            return  # keep reading to the end, then answer 451
        try:
            await transaction.backend.send_data(event.data)
        except BackendUnavailable as e:
            log.warning("backend failed during DATA: %s", e)
            transaction.backend_failed = True

    async def _on_data_end(self, event: smtp.DataEnd) -> None:
        transaction = self.transaction
        reply = BACKEND_FAILED_DATA
        if not transaction.backend_failed:
            backend = transaction.backend
            try:
                backend.writer.write(b".\r\n")
                reply = await backend.read_reply(self.config.backend.data_timeout)
                transaction.backend_in_data = False
            except BackendUnavailable as e:
                log.warning("backend gave no final reply: %s", e)
                transaction.backend_failed = True
        if transaction.backend_failed:
            self.services.tally.add(metrics.BACKEND_ERRORS)
            self._reason("BACKEND_DOWN")
            self._drop_backend(transaction)
        elif reply.is_positive:
            self.services.tally.add(metrics.RELAYED)
            self.services.tally.add(metrics.RELAYED_BYTES, transaction.size)
        else:
            self._reason("BACKEND_REFUSED")
        transaction.reply = str(reply)
        self.core.respond(reply)
        await self._end_transaction(aborted=False)

    async def _on_message_refused(self, event: smtp.MessageRefused) -> None:
        self._reason(event.label)
        if self.transaction:
            self.transaction.reply = str(event.reply)
        await self._end_transaction(aborted=True)

    async def _on_starttls(self, event: smtp.StartTls) -> None:
        self.core.respond(replies.READY_TLS)
        await self._flush()
        try:
            async with asyncio.timeout(self.idle_timeout):
                await self.writer.start_tls(self.services.tls)
        except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as e:
            self._reason("TLS_FAILED")
            raise ConnectionError(f"TLS handshake failed: {e!r}") from None
        self.core.tls_started()

    async def _on_reset(self, event: smtp.Reset) -> None:
        await self._end_transaction(aborted=True)

    async def _on_violation(self, event: smtp.Violation) -> None:
        # A closing violation (421, or 521 mid-DATA) ends the session; run() then drops
        # the backend transaction, aborting it if DATA had begun.
        self._reason(event.label)
        if event.label in STRIKES:
            self.score.add(Signal.STRIKE)
            verdict = self.services.dha.after_signal(self.client.ip, self.score)
            self._note(verdict)
            if verdict.disconnect:
                self.core.close_with(verdict.reply)

    _handlers: ClassVar[dict] = {
        smtp.Hello: _on_hello,
        smtp.Mail: _on_mail,
        smtp.Rcpt: _on_rcpt,
        smtp.DataBegin: _on_data_begin,
        smtp.DataChunk: _on_data_chunk,
        smtp.DataEnd: _on_data_end,
        smtp.MessageRefused: _on_message_refused,
        smtp.StartTls: _on_starttls,
        smtp.Reset: _on_reset,
        smtp.Violation: _on_violation,
    }

    # --- bookkeeping ------------------------------------------------------------

    def _reason(self, label: str) -> None:
        self.labels[label] = self.labels.get(label, 0) + 1
        self.services.tally.reason(label)

    def _drop_backend(self, transaction: Transaction) -> None:
        if transaction.backend is not None:
            transaction.backend.abort()
            transaction.backend = None

    async def _end_transaction(self, aborted: bool) -> None:
        """Close the current transaction; an open backend transaction is reset or dropped."""
        transaction, self.transaction = self.transaction, None
        if transaction is None:
            return
        self.transactions.append({
            "from": transaction.sender,
            "rcpts": transaction.recipients,
            "size": transaction.size,
            "reply": transaction.reply,
        })
        backend = transaction.backend
        if backend is None:
            return
        if transaction.backend_in_data or transaction.backend_failed:
            backend.abort()  # mid-DATA: closing makes the backend discard the message
        else:
            await self.services.backend.finish(backend, reset=aborted)

    async def _close(self) -> None:
        try:
            await self._flush()
            self.writer.close()
        except (ConnectionError, SessionTimeout, RuntimeError):
            self.writer.transport.abort()

    def _log_line(self) -> None:
        self.services.tally.add(metrics.SESSIONS)
        if not log.isEnabledFor(logging.INFO):
            return
        log.info(json.dumps({
            "client": self.client.ip,
            "helo": self.helo,
            "tls": self.core.tls_active,
            "mail": self.transactions,
            "labels": self.labels,
            "score": self.score.describe(),
            "bytes": self.bytes_in,
            "duration": round(time.monotonic() - self.started, 3),
            "reply": str(self.core.last_reply or ""),
        }, separators=(",", ":")))
