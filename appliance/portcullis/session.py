"""One SMTP session: the I/O loop around the sans-IO core, and nothing else.

The core (smtp/) turns bytes into events; the policy chain (policy/chain.py) judges
each phase; the relay transaction (relay.py) carries a message to the backend and
holds the before-queue contract. The session reads, writes, keeps time, hands each
event to the right one of them, and leaves one log line. Nothing is queued here.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import ClassVar

from . import logs, metrics, smtp
from .config import Config
from .forwarding import ClientFacts, received_header
from .policy import RecipientDirectory
from .policy.chain import Client, PolicyChain
from .policy.dha import DhaEngine
from .policy.dns_checks import DnsChecker
from .policy.greylist import Greylist
from .policy.rates import ClientRates
from .relay import RelayTransaction
from .smtp import replies
from .smtp.replies import Reply
from .stream import ByteStream
from .upstream import BackendPool

__all__ = ["Client", "Services", "Session"]

log = logging.getLogger("portcullis.session")

INTERNAL_ERROR = Reply(421, "4.3.0", "Internal error, closing connection, try again later")
WRITE_BUFFER_LIMIT = 64 * 1024  # wait for the client to read beyond this


@dataclass
class Services:
    """What every session of a worker shares."""

    config: Config
    recipients: RecipientDirectory
    backend: BackendPool
    tls: ssl.SSLContext | None
    tally: metrics.Tally
    dha: DhaEngine
    dns: DnsChecker
    greylist: Greylist
    rates: ClientRates
    limits: smtp.ProtocolLimits = field(init=False)

    def __post_init__(self) -> None:
        limits = self.config.limits
        self.limits = smtp.ProtocolLimits(
            max_message_size=limits.max_message_size,
            max_recipients=limits.max_recipients,
            max_strikes=limits.max_strikes,
            max_commands=limits.max_commands,
        )


class SessionTimeout(Exception):
    def __init__(self, label: str):
        super().__init__(label)
        self.label = label


@dataclass
class Transaction:
    """One MAIL transaction, for the log line, and its relay to the backend."""

    relay: RelayTransaction
    recipients: list[dict] = field(default_factory=list)
    reply: str = ""


class Session:
    def __init__(self, services: Services, connection: ByteStream, client: Client,
                 session_id: str = "", accepted: float | None = None, greeted: bool = False):
        """`greeted`: the gate sent the banner already (gate.py), `accepted` seconds
        (Unix time) ago; the session's time limits count from then."""
        self.services = services
        self.id = session_id  # the gate's, in this session's log line
        self.accepted = accepted or time.time()  # Unix time the gate accepted the connection
        self.greeted = greeted
        self.config = services.config
        self.connection = connection
        self.client = client
        self.core = smtp.SmtpServer(
            self.config.hostname, services.limits,
            tls_available=services.tls is not None,
            postmaster_domain=self.config.relay_domains[0],
        )
        self.policy = PolicyChain(self.config, services.dha, services.dns,
                                  services.recipients, client, self._reason, services.greylist,
                                  services.rates)
        self.started = time.monotonic() - max(0.0, time.time() - self.accepted)
        limits = self.config.limits
        self.deadline = self.started + limits.session_timeout
        self.idle_timeout = (
            limits.stress_command_timeout if client.stress else limits.command_timeout)
        self.helo = ""
        self.esmtp = False  # greeted with EHLO
        self.transaction: Transaction | None = None
        self.transactions: list[dict] = []
        self.labels: dict[str, int] = {}  # reason label -> times, in order of first use
        self.bytes_in = 0
        self.data_started = 0.0  # when the client got 354, and bytes_in then
        self.bytes_before_data = 0

    # --- the loop -----------------------------------------------------------

    async def run(self) -> None:
        try:
            banner = replies.banner(self.config.hostname)
            if self.greeted:
                self.core.last_reply = banner
            else:
                self.core.send(banner)
            await self._serve()
        except SessionTimeout as timeout:
            self._reason(timeout.label)
            self.core.close_with(
                replies.timed_out(self.config.hostname))
        except (ConnectionError, ssl.SSLError) as e:
            self._reason("DISCONNECT")
            log.debug("client %s: %s", self.client.ip, e)
        except Exception:  # a bug here must cost the client a retry, never a message
            log.exception("session with %s failed", self.client.ip)
            self._reason("INTERNAL_ERROR")
            self.core.close_with(INTERNAL_ERROR)
        finally:
            await self._end_transaction()
            self.policy.close()
            await self._close()
            self._log_line()

    async def _serve(self) -> None:
        core = self.core
        while True:
            event = core.next_event()
            if event is smtp.NEED_DATA:
                if self._write_out():
                    await self._drain()
                if self.transaction is not None and core.state is smtp.State.DATA:
                    await self.transaction.relay.flush()
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
            data = await self.connection.read(timeout)
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

    def _write_out(self) -> bool:
        """Write the replies queued; whether the client lags so far behind that the
        session must wait for it (_drain) before it reads on."""
        out = self.core.data_to_send()
        if out:
            self.connection.write(out)
            return self.connection.write_buffer_size > WRITE_BUFFER_LIMIT
        return False

    async def _drain(self) -> None:
        try:
            async with asyncio.timeout(self.idle_timeout):
                await self.connection.drain()
        except TimeoutError:
            raise SessionTimeout("WRITE_TIMEOUT") from None

    async def _flush(self) -> None:
        if self._write_out():
            await self._drain()

    # --- events ---------------------------------------------------------------

    async def _on_hello(self, event: smtp.Hello) -> None:
        await self._end_transaction()
        self.helo = event.name
        self.esmtp = event.extended
        local = self.connection.get_extra_info("sockname") or ("",)
        refusal = self.policy.judge_hello(event.name, local[0])
        self.core.respond(refusal or self.core.hello_reply(event))

    async def _on_mail(self, event: smtp.Mail) -> None:
        refusal = await self.policy.judge_mail()
        if refusal is not None:
            self.core.respond(refusal)
            return
        # Who the client is, for the backend and the Received header, which counts
        # toward the size limit.
        tls = self.connection.get_extra_info("ssl_object")
        client = ClientFacts(self.client.ip, self.client.port, self.helo, self.esmtp,
                             f"{tls.version()} with cipher {tls.cipher()[0]}" if tls else "",
                             self.policy.client_name)
        trace = received_header(client, self.config.hostname, self.id)
        limit = self.config.limits.max_message_size
        if (event.sender.size or 0) + len(trace) > limit:
            self._answer(replies.SIZE_EXCEEDED, "SIZE")
            return
        self.core.reserve(len(trace))
        relay = RelayTransaction(self.services.backend, event.sender, self.services.tally,
                                 client, trace)
        self.transaction = Transaction(relay)
        self.core.respond(replies.SENDER_OK)

    async def _on_rcpt(self, event: smtp.Rcpt) -> None:
        transaction = self.transaction
        address = event.recipient.address
        reply, label = await self.policy.judge_recipient(address,
                                                         transaction.relay.sender.address)
        if reply is None:
            reply, label = await self._backend(transaction.relay.add_recipient(address))
        transaction.recipients.append({"to": address, "reply": reply.code, "label": label})
        self._answer(reply, label)

    async def _on_data_begin(self, event: smtp.DataBegin) -> None:
        reply, label = await self._backend(self.transaction.relay.start_data())
        if reply.code == 354:
            self.data_started = time.monotonic()
            self.bytes_before_data = self.bytes_in
        self._answer(reply, label)

    async def _on_data_chunk(self, event: smtp.DataChunk) -> None:
        await self.transaction.relay.send(event.data)

    async def _on_data_end(self, event: smtp.DataEnd) -> None:
        reply, label = await self._backend(self.transaction.relay.finish())
        self.transaction.reply = str(reply)
        self._answer(reply, label)
        await self._end_transaction()

    async def _on_message_refused(self, event: smtp.MessageRefused) -> None:
        self._reason(event.label)
        if self.transaction:
            self.transaction.reply = str(event.reply)
        await self._end_transaction()

    async def _on_starttls(self, event: smtp.StartTls) -> None:
        refusal, label = self.policy.judge_tls()
        if refusal is not None:
            self._answer(refusal, label)
            return
        self.core.respond(replies.READY_TLS)
        ready = self.core.data_to_send()  # the replies pipelined before, and the 220
        try:
            async with asyncio.timeout(self.idle_timeout):
                await self.connection.start_tls(self.services.tls, ready)
        except (TimeoutError, ssl.SSLError, ConnectionError, OSError) as e:
            self._reason("TLS_FAILED")
            raise ConnectionError(f"TLS handshake failed: {e!r}") from None
        self.core.tls_started()

    async def _on_reset(self, event: smtp.Reset) -> None:
        await self._end_transaction()

    async def _on_violation(self, event: smtp.Violation) -> None:
        # A closing violation (421, or 521 mid-DATA) ends the session; run() then ends
        # the relay transaction, aborting it if DATA had begun.
        self._reason(event.label)
        closing = self.policy.judge_violation(event.label)
        if closing is not None:
            self.core.close_with(closing)

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

    async def _backend(self, step: Awaitable[tuple[Reply, str]]) -> tuple[Reply, str]:
        """A relay step's answer; how long it waited goes to the backend reply histogram."""
        started = time.monotonic()
        answer = await step
        self.services.tally.observe(metrics.BACKEND_REPLY, time.monotonic() - started)
        return answer

    def _answer(self, reply: Reply, label: str) -> None:
        if label:
            self._reason(label)
        self.core.respond(reply)

    def _reason(self, label: str) -> None:
        self.labels[label] = self.labels.get(label, 0) + 1
        self.services.tally.reason(label)

    async def _end_transaction(self) -> None:
        """Close the current transaction and its relay (reset, pooled or dropped)."""
        transaction, self.transaction = self.transaction, None
        if transaction is None:
            return
        self.transactions.append({
            "from": transaction.relay.sender.address,
            "rcpts": transaction.recipients,
            "size": transaction.relay.size,
            "reply": transaction.reply,
        })
        await transaction.relay.close()

    async def _close(self) -> None:
        try:
            await self._flush()
            self.connection.close()
        except (ConnectionError, SessionTimeout, RuntimeError):
            self.connection.abort()

    def _log_line(self) -> None:
        duration = time.monotonic() - self.started
        self.services.tally.add(metrics.SESSIONS)
        self.services.tally.observe(metrics.SESSION_DURATION, duration)
        if not log.isEnabledFor(logging.INFO):
            return
        log.info("session", extra=logs.fields(
            session=self.id,
            client=self.client.ip,
            port=self.client.port,
            start=logs.timestamp(self.accepted),
            helo=self.helo,
            tls=self.core.tls_active,
            mail=self.transactions,
            labels=self.labels,
            score=self.policy.score.describe(),
            bytes=self.bytes_in,
            duration=round(duration, 3),
            reply=str(self.core.last_reply or ""),
        ))
