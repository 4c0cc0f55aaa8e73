"""Connections to the internal mail server: connect, read replies with hard limits,
and keep connections that ended a transaction cleanly for reuse, which halves the
TCP work per message. Every wait has a deadline, and any failure becomes
BackendUnavailable. What a failure means for the client is relay.py's business.

Before each MAIL the backend learns who the client is (forwarding.py), XCLIENT or
XFORWARD as backend.forward_client says, on a new connection and a pooled one alike:
a pooled connection is re-introduced for every message, so it never carries one
client's identity into another client's message. An answer other than XCLIENT's 220
or XFORWARD's 250 is a fault like any other.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time

from . import forwarding
from .config import Backend, HostPort
from .forwarding import ClientFacts
from .smtp.commands import MailFrom
from .smtp.replies import Reply
from .stream import ByteStream

log = logging.getLogger("portcullis.upstream")

MAX_REPLY_LINES = 64
MAX_REPLY_LINE = 1024
_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3}) ")


class BackendUnavailable(Exception):
    """The backend could not be reached or did not answer in time."""


def parse_reply(lines: list[bytes]) -> Reply:
    code = int(lines[0][:3])
    texts = []
    enhanced = ""
    for raw in lines:
        text = raw[4:].decode("utf-8", "replace").rstrip("\r\n")
        match = _ENHANCED.match(text + " ")
        if match:
            enhanced = match.group(1)
            text = text[match.end():] if len(text) >= match.end() else ""
        texts.append(text)
    return Reply(code, enhanced, "\n".join(texts))


class MalformedReply(Exception):
    """The backend's bytes are not an SMTP reply within the limits."""


class ReplyReader:
    """Bytes from the backend in, whole replies out (sans-IO), with hard limits:
    lines of at most MAX_REPLY_LINE octets, at most MAX_REPLY_LINES lines, one code."""

    def __init__(self) -> None:
        self._unread = bytearray()
        self._lines: list[bytes] = []  # of the reply being read

    def feed(self, data: bytes) -> None:
        self._unread += data

    @property
    def pending(self) -> bool:
        """Bytes received that no reply has taken yet."""
        return bool(self._unread or self._lines)

    def next_reply(self) -> Reply | None:
        """The next complete reply, or None until more bytes come; MalformedReply."""
        unread, lines = self._unread, self._lines
        while True:
            end = unread.find(b"\n", 0, MAX_REPLY_LINE)
            if end < 0:
                if len(unread) >= MAX_REPLY_LINE:
                    raise MalformedReply("reply line too long")
                return None
            line = bytes(unread[: end + 1])
            del unread[: end + 1]
            if (len(line) < 4 or line[:1] not in b"2345" or not line[:3].isdigit()
                    or line[3:4] not in b" -\r\n"
                    or (lines and line[:3] != lines[0][:3])):
                raise MalformedReply(f"malformed reply {line[:40]!r}")
            lines.append(line)
            if line[3:4] != b"-":
                self._lines = []
                return parse_reply(lines)
            if len(lines) >= MAX_REPLY_LINES:
                raise MalformedReply(f"reply of more than {MAX_REPLY_LINES} lines")


class BackendConnection:
    """One SMTP connection to the backend. Any fault (timeout, hang-up, a malformed,
    over-long or over-many-line reply, a 421, a reply out of turn) closes it at once,
    so a connection that might be out of step with its replies is never used again."""

    def __init__(self, server: HostPort, stream: ByteStream, config: Backend):
        self.server = server
        self.stream = stream
        self.config = config
        self.extensions: dict[str, str] = {}  # EHLO keyword -> its parameters
        self.idle_since = 0.0
        self.transactions = 0  # begun on it: more than one means the pool reused it
        self.broken = False
        self._replies = ReplyReader()

    @property
    def usable(self) -> bool:
        """Fit to carry a new transaction: open, and with nothing said out of turn."""
        return not (self.broken or self.stream.is_closing or self.stream.at_eof
                    or self._said_out_of_turn)

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    @property
    def _said_out_of_turn(self) -> bool:
        return self._replies.pending or self.stream.buffered > 0

    async def read_reply(self, timeout: float) -> Reply:
        try:
            reply = self._replies.next_reply()
            if reply is None:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout
                while reply is None:
                    data = await self.stream.read(deadline - loop.time())
                    if not data:
                        raise self._fail("connection closed")
                    self._replies.feed(data)
                    reply = self._replies.next_reply()
        except TimeoutError:
            raise self._fail(f"no reply within {timeout:g}s") from None
        except MalformedReply as e:
            raise self._fail(str(e)) from None
        except ConnectionError as e:
            raise self._fail(str(e) or type(e).__name__) from None
        if reply.code == 421:
            self.abort()  # the server is closing the connection
        return reply

    def _fail(self, problem: str) -> BackendUnavailable:
        self.abort()
        return BackendUnavailable(f"{self.server}: {problem}")

    async def command(self, line: str, timeout: float | None = None) -> Reply:
        self.write(line.encode("ascii") + b"\r\n")
        return await self.read_reply(timeout or self.config.command_timeout)

    def expect(self, reply: Reply, code: int, step: str) -> None:
        if reply.code != code:
            raise self._fail(f"{step} answered {reply}")

    async def hello(self, name: str = "") -> None:
        """EHLO, and the extensions it offers: with backend.helo after the banner, and
        with the client's name after XCLIENT (the backend takes it as the HELO)."""
        reply = await self.command(f"EHLO {name or self.config.helo}")
        self.expect(reply, 250, "EHLO")
        self.extensions = {}
        for line in reply.text.split("\n")[1:]:
            keyword, _, parameters = line.partition(" ")
            self.extensions[keyword.upper()] = parameters.upper()

    async def introduce(self, client: ClientFacts | None) -> tuple[str, ...]:
        """Tell the backend who the client of the next transaction is. XCLIENT is sent
        here: the backend starts a new session, 220, and wants the client's EHLO or
        HELO again (Postfix takes that name as the HELO, not XCLIENT's). XFORWARD
        lines are returned, to be sent ahead of MAIL (pipelined when offered); the
        backend forgets them when the transaction ends. A mode other than auto that
        the backend does not offer is a fault: its client rules must not be bypassed."""
        mode = self.config.forward_client
        if client is None or mode == "off":
            return ()
        verb = forwarding.choose(mode, self.extensions)
        if verb is None:
            if mode == "auto":
                return ()
            raise self._fail(f"{mode.upper()} not offered (backend.forward_client: {mode})")
        lines = forwarding.commands(verb, self.extensions[verb], client)
        if verb == "XFORWARD":
            return lines
        for line in lines:
            self.expect(await self.command(line), 220, "XCLIENT")
        if client.esmtp:
            await self.hello(client.helo)
        else:  # HELO keeps PROTO=SMTP (EHLO would make it ESMTP); the extensions stay
            self.expect(await self.command(f"HELO {client.helo}"), 250, "HELO")
        return ()

    async def send_data(self, data: bytes) -> None:
        """Write message content; wait while the backend's socket buffer is full."""
        self.write(data)
        if self.stream.write_buffer_size > 256 * 1024:
            try:
                async with asyncio.timeout(self.config.data_timeout):
                    await self.stream.drain()
            except (TimeoutError, ConnectionError) as e:
                raise self._fail(f"stalled during DATA ({e!r})") from None

    async def end_data(self, content: bytes = b"") -> Reply:
        """Write the rest of the content and the final dot, in one write; the backend's
        answer to the whole message. A reply that came before the dot answers something
        else, so it makes the message fail."""
        if self._said_out_of_turn:
            raise self._fail("replied during DATA, before the final dot")
        self.write(content + b".\r\n")
        return await self.read_reply(self.config.data_timeout)

    def write(self, data: bytes) -> None:
        """Send bytes; BackendUnavailable when the backend has closed the connection."""
        if self.stream.is_closing:
            raise self._fail("connection closed")
        self.stream.write(data)

    def abort(self) -> None:
        """Drop the connection; a backend mid-DATA discards the message."""
        self.broken = True
        self.stream.abort()


async def open_connection(server: HostPort, config: Backend,
                          timeout: float) -> tuple[BackendConnection, Reply]:
    """A connection to `server` and its banner, a 220 within `timeout` of connecting;
    BackendUnavailable, naming the server and why, otherwise."""
    try:
        async with asyncio.timeout(timeout):
            _, stream = await asyncio.get_running_loop().create_connection(
                ByteStream, server.host, server.port)
    except TimeoutError:
        raise BackendUnavailable(f"{server}: no connection within {timeout:g}s") from None
    except OSError as e:  # asyncio's strerror is "Connect call failed (addr)": say why
        raise BackendUnavailable(
            f"{server}: {os.strerror(e.errno) if e.errno else e}") from None
    connection = BackendConnection(server, stream, config)
    banner = await connection.read_reply(timeout)  # a fault aborts the connection
    if banner.code != 220:
        connection.abort()
        raise BackendUnavailable(f"{server}: banner {banner}")
    return connection, banner


async def greeting(server: HostPort, config: Backend, timeout: float) -> tuple[bool, str]:
    """Whether `server` greets with 220 within `timeout`, and its banner, or why not.
    A probe (for /healthz and `portcullis status`): it says QUIT and closes."""
    try:
        async with asyncio.timeout(timeout):
            connection, banner = await open_connection(server, config, timeout)
    except TimeoutError:
        return False, f"no banner within {timeout:g}s"
    except BackendUnavailable as e:
        return False, str(e).removeprefix(f"{server}: ")
    try:
        await connection.command("QUIT", timeout)
    except BackendUnavailable:
        pass
    connection.abort()
    return True, str(banner).splitlines()[0]


class BackendPool:
    MAX_IDLE = 64
    # As Postfix's smtp_connection_cache_time_limit: long enough to carry a burst,
    # short enough that a reconfigured backend is not held on its old settings.
    IDLE_SECONDS = 2.0

    def __init__(self, config: Backend):
        self.config = config
        self._idle: list[BackendConnection] = []
        self._sweeper: asyncio.TimerHandle | None = None

    async def _connect(self) -> BackendConnection:
        problems = []
        for server in self.config.servers:
            try:
                connection, _ = await open_connection(server, self.config,
                                                      self.config.connect_timeout)
                await connection.hello()  # a fault aborts the connection
                return connection
            except BackendUnavailable as e:
                problems.append(str(e))
        raise BackendUnavailable("; ".join(problems) or "no backend servers configured")

    def _take_idle(self) -> BackendConnection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.usable and now - connection.idle_since < self.IDLE_SECONDS:
                return connection
            connection.abort()
        return None

    async def begin(self, sender: MailFrom, recipient: str, client: ClientFacts | None = None
                    ) -> tuple[BackendConnection, Reply, Reply]:
        """Open a transaction for `client`: the introduction, MAIL FROM and the first
        RCPT TO, pipelined when offered.

        Returns the connection with the MAIL and RCPT replies. A pooled connection
        that turns out to be dead or closing is replaced once; nothing was accepted on it.
        """
        connection = self._take_idle()
        if connection is not None:
            try:
                mail_reply, rcpt_reply = await self._mail_and_rcpt(
                    connection, sender, recipient, client)
                if mail_reply.code != 421:
                    connection.transactions += 1
                    return connection, mail_reply, rcpt_reply
            except BackendUnavailable:
                pass
        connection = await self._connect()
        connection.transactions += 1
        return (connection, *await self._mail_and_rcpt(connection, sender, recipient, client))

    async def _mail_and_rcpt(self, connection: BackendConnection, sender: MailFrom,
                             recipient: str, client: ClientFacts | None) -> tuple[Reply, Reply]:
        forward = await connection.introduce(client)
        mail = f"MAIL FROM:<{sender.address}>"
        if sender.size is not None:
            mail += f" SIZE={sender.size}"
        if sender.body:
            mail += f" BODY={sender.body}"
        timeout = self.config.command_timeout
        if connection.pipelining:
            connection.write("".join(f"{line}\r\n" for line in [*forward, mail,
                                     f"RCPT TO:<{recipient}>"]).encode("ascii"))
            for _ in forward:
                connection.expect(await connection.read_reply(timeout), 250, "XFORWARD")
            mail_reply = await connection.read_reply(timeout)
            rcpt_reply = await connection.read_reply(timeout)
            return mail_reply, rcpt_reply
        for line in forward:
            connection.expect(await connection.command(line), 250, "XFORWARD")
        mail_reply = await connection.command(mail)
        if not mail_reply.is_positive:
            return mail_reply, mail_reply
        return mail_reply, await connection.command(f"RCPT TO:<{recipient}>")

    def give_back(self, connection: BackendConnection) -> None:
        """Keep a connection whose transaction ended cleanly for the next one."""
        if connection.usable and len(self._idle) < self.MAX_IDLE:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().call_later(
                    self.IDLE_SECONDS, self._sweep)
        else:
            connection.abort()

    def _sweep(self) -> None:
        """Close connections idle for longer than IDLE_SECONDS."""
        self._sweeper = None
        expired = time.monotonic() - self.IDLE_SECONDS
        keep = []
        for connection in self._idle:
            if connection.usable and connection.idle_since > expired:
                keep.append(connection)
            else:
                connection.abort()
        self._idle = keep
        if keep:
            self._sweeper = asyncio.get_running_loop().call_later(self.IDLE_SECONDS, self._sweep)

    def close(self) -> None:
        for connection in self._idle:
            connection.abort()
        self._idle.clear()
