"""A TCP connection as the gate sees it: bytes in, bytes out, and STARTTLS.

An asyncio protocol with a small read buffer of its own, so that its owner knows and
decides what happens to every byte received. Two things need that:
- STARTTLS: reading stops and everything received so far is discarded before the 220
  is written, so nothing sent in plaintext after the command can be processed inside
  TLS (CVE-2011-0411), whatever the session awaited meanwhile;
- the backend relay: a reply that arrived out of turn is seen, and the connection
  that carried it is never trusted again.
"""

from __future__ import annotations

import asyncio
import ssl

from .deadlines import deadlines

READ_LIMIT = 1 << 16  # bytes buffered before reading from the socket pauses


class ByteStream(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._received = bytearray()
        self._eof = False
        self._reading_paused = False
        self._data_waiter: asyncio.Future | None = None
        self._drain_waiter: asyncio.Future | None = None
        self._writing_paused = False

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._received += data
        if len(self._received) > READ_LIMIT and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake_reader()
        self._writing_paused = False
        self._wake_writer()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    # --- for the owner --------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return len(self._received)

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._received

    @property
    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    async def read(self, timeout: float) -> bytes:
        """What arrived since the last read; b"" once the client closed its side.
        TimeoutError when nothing arrives within `timeout` seconds (deadlines.py)."""
        if not self._received and not self._eof:
            self._data_waiter = asyncio.get_running_loop().create_future()
            slot = deadlines.add(self._time_out, timeout)
            try:
                await self._data_waiter
            finally:
                deadlines.remove(self._time_out, slot)
                self._data_waiter = None
        data = bytes(self._received)
        self._received.clear()
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    @property
    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size()

    async def drain(self) -> None:
        """Wait until the transport takes more writes."""
        if self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        while self._writing_paused:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    async def start_tls(self, context: ssl.SSLContext, ready: bytes) -> None:
        """Stop reading, discard what was read, write `ready` (the 220) and shake hands."""
        self.transport.pause_reading()
        self._reading_paused = False  # the TLS transport reads afresh
        self._received.clear()
        self.transport.write(ready)
        loop = asyncio.get_running_loop()
        self.transport = await loop.start_tls(self.transport, self, context, server_side=True)

    def get_extra_info(self, name: str, default=None):
        return self.transport.get_extra_info(name, default)

    def close(self) -> None:
        self.transport.close()

    def abort(self) -> None:
        self.transport.abort()

    def _time_out(self) -> None:
        if self._data_waiter is not None and not self._data_waiter.done():
            self._data_waiter.set_exception(TimeoutError())

    def _wake_reader(self) -> None:
        if self._data_waiter is not None and not self._data_waiter.done():
            self._data_waiter.set_result(None)

    def _wake_writer(self) -> None:
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
