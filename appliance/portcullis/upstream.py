"""The before-queue relay to the internal mail server.

A backend transaction starts when the first recipient passes local policy and ends
with the backend's answer to the end of DATA, which becomes the client's answer.
Every wait has a deadline; any failure becomes BackendUnavailable, which the session
turns into a 4xx, so the sender retries and nothing is lost. Connections that ended
a transaction cleanly are kept for reuse, which halves the TCP work per message.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from .config import Backend, HostPort
from .smtp.commands import MailFrom
from .smtp.replies import Reply

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


class BackendConnection:
    def __init__(self, server: HostPort, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, config: Backend):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.config = config
        self.pipelining = False
        self.idle_since = 0.0
        self.broken = False

    @property
    def usable(self) -> bool:
        return not (self.broken or self.reader.at_eof() or self.writer.is_closing())

    async def read_reply(self, timeout: float) -> Reply:
        try:
            async with asyncio.timeout(timeout):
                lines: list[bytes] = []
                while True:
                    line = await self.reader.readline()
                    if not line.endswith(b"\n") or len(line) > MAX_REPLY_LINE:
                        raise BackendUnavailable(f"{self.server}: connection closed or bad reply")
                    if len(line) < 4 or not line[:3].isdigit() or line[3:4] not in b" -\r\n":
                        raise BackendUnavailable(f"{self.server}: malformed reply {line[:40]!r}")
                    lines.append(line)
                    if line[3:4] != b"-":
                        break
                    if len(lines) > MAX_REPLY_LINES:
                        raise BackendUnavailable(f"{self.server}: reply too long")
        except TimeoutError:
            self.broken = True
            raise BackendUnavailable(f"{self.server}: no reply within {timeout:g}s") from None
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as e:
            self.broken = True
            raise BackendUnavailable(f"{self.server}: {e}") from None
        reply = parse_reply(lines)
        if reply.code == 421:
            self.broken = True
        return reply

    async def command(self, line: str, timeout: float | None = None) -> Reply:
        self.writer.write(line.encode("ascii") + b"\r\n")
        return await self.read_reply(timeout or self.config.command_timeout)

    async def send_data(self, data: bytes) -> None:
        """Write message content; wait while the backend's socket buffer is full."""
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > 256 * 1024:
            try:
                async with asyncio.timeout(self.config.data_timeout):
                    await self.writer.drain()
            except (TimeoutError, ConnectionError) as e:
                self.broken = True
                raise BackendUnavailable(f"{self.server}: stalled during DATA ({e!r})") from None

    def abort(self) -> None:
        """Drop the connection without finishing DATA: the backend discards the message."""
        self.broken = True
        self.writer.transport.abort()


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
                async with asyncio.timeout(self.config.connect_timeout):
                    reader, writer = await asyncio.open_connection(
                        server.host, server.port, limit=MAX_REPLY_LINE * 4)
            except OSError as e:  # TimeoutError is an OSError too
                problems.append(f"{server}: {e.strerror or 'connect timed out'}")
                continue
            connection = BackendConnection(server, reader, writer, self.config)
            try:
                banner = await connection.read_reply(self.config.connect_timeout)
                if banner.code != 220:
                    raise BackendUnavailable(f"{server}: banner {banner}")
                hello = await connection.command(f"EHLO {self.config.helo}")
                if hello.code != 250:
                    raise BackendUnavailable(f"{server}: EHLO answered {hello}")
                connection.pipelining = "PIPELINING" in hello.text.upper().split("\n")
                return connection
            except BackendUnavailable as e:
                connection.abort()
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

    async def begin(self, sender: MailFrom, recipient: str) -> tuple[BackendConnection, Reply, Reply]:
        """Open a transaction: MAIL FROM and the first RCPT TO, pipelined when offered.

        Returns the connection with the MAIL and RCPT replies. A pooled connection
        that turns out to be dead is replaced once; nothing was accepted on it.
        """
        for attempt in (1, 2):
            connection = self._take_idle() if attempt == 1 else None
            reused = connection is not None
            connection = connection or await self._connect()
            try:
                return (connection, *await self._mail_and_rcpt(connection, sender, recipient))
            except BackendUnavailable:
                connection.abort()
                if not reused:
                    raise
        raise AssertionError("unreachable")

    async def _mail_and_rcpt(self, connection: BackendConnection, sender: MailFrom,
                             recipient: str) -> tuple[Reply, Reply]:
        mail = f"MAIL FROM:<{sender.address}>"
        if sender.size is not None:
            mail += f" SIZE={sender.size}"
        if sender.body:
            mail += f" BODY={sender.body}"
        if connection.pipelining:
            connection.writer.write(f"{mail}\r\nRCPT TO:<{recipient}>\r\n".encode("ascii"))
            mail_reply = await connection.read_reply(self.config.command_timeout)
            rcpt_reply = await connection.read_reply(self.config.command_timeout)
            return mail_reply, rcpt_reply
        mail_reply = await connection.command(mail)
        if not mail_reply.is_positive:
            return mail_reply, mail_reply
        return mail_reply, await connection.command(f"RCPT TO:<{recipient}>")

    async def finish(self, connection: BackendConnection, reset: bool) -> None:
        """Return a connection to the pool after a transaction (RSET first if it is open)."""
        if reset and connection.usable:
            try:
                if (await connection.command("RSET")).code != 250:
                    connection.broken = True
            except BackendUnavailable:
                pass
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
