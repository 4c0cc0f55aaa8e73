"""A scriptable SMTP backend that fails the way real mail servers fail.

It listens on 127.0.0.1:<free port> and, by default, behaves like a well-behaved
Postfix: it offers PIPELINING, accepts every recipient (or only `users`, with 550 for
the others), and records each message it answers 250 at end-of-data.

A fault is planned for one step of the protocol and used once:

    backend.plan("rcpt:2", Fault.hangup())        # the 2nd RCPT of a transaction
    backend.plan("mail", Fault.reply("452 4.3.1 Insufficient system storage"))
    backend.plan("end", Fault.late(5))             # answer the final dot after 5 s

Steps: banner, ehlo, mail, rcpt (any), rcpt:N (the N-th in a transaction), data,
chunk:N (the N-th line of the message: the fault's reply, then a hang-up; "chunk" is
the first), end (the final dot), rset, quit, and xforward and xclient for a backend
made with `extensions=` offering them. A fault
planned with `sender=` applies only to that sender's transaction, so that clients
running side by side each meet their own faults.
Fault kinds: reply (any code), hangup, stall (never answer), late (answer after a
delay), malformed, overlong (a 2,000-octet line), lines (an N-line reply).

`extensions` adds EHLO lines, such as "XFORWARD NAME ADDR PORT PROTO HELO"; an offered
XFORWARD is answered 250 and an offered XCLIENT 220 (a new session), and each delivery
records the lines that introduced its client (`forward`), and the gate's Received
header (`trace`) apart from the client's bytes (`data`).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Self

from tests.support.tools import free_port

PIPELINING_EHLO = ("backend.test", "PIPELINING", "SIZE 104857600", "8BITMIME",
                   "ENHANCEDSTATUSCODES")


@dataclass(frozen=True)
class Fault:
    kind: str
    text: str = ""  # for "reply", and for "late": what to answer (empty: the normal answer)
    seconds: float = 0.0  # for "late"
    count: int = 0  # for "lines"

    @classmethod
    def reply(cls, text: str) -> Fault:
        return cls("reply", text=text)

    @classmethod
    def hangup(cls) -> Fault:
        return cls("hangup")

    @classmethod
    def stall(cls) -> Fault:
        return cls("stall")

    @classmethod
    def late(cls, seconds: float, reply: str = "") -> Fault:
        return cls("late", text=reply, seconds=seconds)

    @classmethod
    def malformed(cls) -> Fault:
        return cls("malformed")

    @classmethod
    def overlong(cls) -> Fault:
        return cls("overlong")

    @classmethod
    def lines(cls, count: int) -> Fault:
        return cls("lines", count=count)

    @property
    def is_transient(self) -> bool:
        """True unless the fault is a permanent (5xx) refusal."""
        return not (self.kind in ("reply", "late") and self.text.startswith("5"))


@dataclass
class Delivery:
    """A message the backend answered 250 at end-of-data."""

    sender: str
    recipients: list[str]
    data: bytes  # as received after `trace`: dot-stuffed, CRLF endings, without the final dot
    connection: int
    trace: bytes = b""  # the gate's Received header on top of the message, if any
    forward: list[str] = field(default_factory=list)  # XFORWARD/XCLIENT lines before MAIL


@dataclass
class _Transaction:
    sender: str
    recipients: list[str] = field(default_factory=list)
    rcpt_count: int = 0


class _Hangup(Exception):
    pass


class FaultBackend:
    def __init__(self, users: set[str] | None = None, host: str = "127.0.0.1",
                 extensions: Sequence[str] = ()):
        self.host, self.port = host, free_port(host)
        self.users = users  # accepted recipients; None accepts all
        self.ehlo = (*PIPELINING_EHLO, *extensions)
        self.offered = {line.split()[0].upper() for line in extensions}
        self.deliveries: list[Delivery] = []
        self.connections = 0
        self.fired: list[tuple[str, str, Fault]] = []  # (sender, step, fault) as used
        self._faults: dict[tuple[str | None, str], Fault] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-backend",
                                        daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # --- control, from the test's thread ------------------------------------------------

    def start(self) -> Self:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(asyncio.start_server(
            self._serve, self.host, self.port, limit=1 << 20), self._loop).result(5)
        return self

    def stop(self) -> None:
        async def shut() -> None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            sessions = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in sessions:
                task.cancel()
            await asyncio.gather(*sessions, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def plan(self, step: str, fault: Fault, sender: str | None = None) -> None:
        with self._lock:
            self._faults[sender, step] = fault

    def forget(self, sender: str) -> None:
        """Drop the faults planned for `sender` that its transaction never reached."""
        with self._lock:
            for key in [key for key in self._faults if key[0] == sender]:
                del self._faults[key]

    def take_deliveries(self) -> list[Delivery]:
        """The messages recorded so far, forgotten here."""
        with self._lock:
            taken, self.deliveries = self.deliveries, []
        return taken

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # --- the server, on its own loop ----------------------------------------------------

    def _take(self, transaction: _Transaction | None, *steps: str) -> Fault | None:
        sender = transaction.sender if transaction else None
        with self._lock:
            for key in [(sender, step) for step in steps] + [(None, step) for step in steps]:
                if key in self._faults:
                    fault = self._faults.pop(key)
                    self.fired.append((sender or "", key[1], fault))
                    return fault
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        with self._lock:
            self.connections += 1
            number = self.connections
        try:
            await self._answer(writer, self._take(None, "banner"), "220 backend.test ESMTP")
            await self._session(reader, writer, number)
        except (_Hangup, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _session(self, reader, writer, number: int) -> None:
        transaction: _Transaction | None = None
        forward: list[str] = []  # the XFORWARD/XCLIENT lines since the last transaction
        while True:
            line = await reader.readline()
            if not line:
                return
            command = line.decode("utf-8", "replace").rstrip("\r\n")
            verb = command[:4].upper()
            extension = command.split(" ", 1)[0].upper()
            if extension in self.offered:
                fault = self._take(None, extension.lower())
                if _accepts(fault, "250"):
                    forward.append(command)
                if extension == "XCLIENT":
                    transaction = None  # the session starts afresh
                await self._answer(writer, fault, "220 backend.test ESMTP"
                                   if extension == "XCLIENT" else "250 2.0.0 Ok")
            elif verb == "EHLO":
                await self._answer(writer, self._take(None, "ehlo"), "250-" + "\r\n250-".join(
                    self.ehlo[:-1]) + "\r\n250 " + self.ehlo[-1])
            elif verb == "HELO":
                await self._answer(writer, self._take(None, "ehlo"), "250 backend.test")
            elif verb == "MAIL":
                attempt = _Transaction(_path(command))
                fault = self._take(attempt, "mail")
                if _accepts(fault, "250"):
                    transaction = attempt
                await self._answer(writer, fault, "250 2.1.0 Ok")
            elif verb == "RCPT":
                if transaction is None:
                    await self._answer(writer, None, "503 5.5.1 Error: need MAIL command")
                    continue
                transaction.rcpt_count += 1
                recipient = _path(command)
                fault = self._take(transaction, f"rcpt:{transaction.rcpt_count}", "rcpt")
                known = self.users is None or recipient in self.users
                normal = "250 2.1.5 Ok" if known else "550 5.1.1 User unknown"
                if _accepts(fault, normal):
                    transaction.recipients.append(recipient)
                await self._answer(writer, fault, normal)
            elif verb == "DATA":
                if transaction is None or not transaction.recipients:
                    await self._answer(writer, None, "554 5.5.1 Error: no valid recipients")
                    continue
                fault = self._take(transaction, "data")
                await self._answer(writer, fault, "354 End data with <CR><LF>.<CR><LF>")
                if not _accepts(fault, "354"):
                    continue
                data = await self._message(reader, writer, transaction)
                fault = self._take(transaction, "end")
                if _accepts(fault, "250"):
                    trace, data = _split_trace(data)
                    with self._lock:
                        self.deliveries.append(Delivery(
                            transaction.sender, transaction.recipients, data, number,
                            trace, forward))
                transaction, forward = None, []
                await self._answer(writer, fault, "250 2.0.0 Ok: queued")
            elif verb == "RSET":
                fault = self._take(transaction, "rset")
                transaction, forward = None, []
                await self._answer(writer, fault, "250 2.0.0 Ok")
            elif verb == "QUIT":
                await self._answer(writer, self._take(None, "quit"), "221 2.0.0 Bye")
                return
            elif verb == "NOOP":
                await self._answer(writer, None, "250 2.0.0 Ok")
            else:
                await self._answer(writer, None, "502 5.5.2 Error: command not recognized")

    async def _message(self, reader, writer, transaction: _Transaction) -> bytes:
        chunks = []
        for number in itertools.count(1):
            line = await reader.readline()
            if not line:
                raise _Hangup
            steps = (f"chunk:{number}", "chunk") if number == 1 else (f"chunk:{number}",)
            fault = self._take(transaction, *steps)
            if fault is not None:  # as Postfix does mid-DATA: a last word, then close
                await self._answer(writer, fault, "")
                raise _Hangup
            if line == b".\r\n":
                return b"".join(chunks)
            chunks.append(line)
        raise AssertionError("unreachable")

    async def _answer(self, writer: asyncio.StreamWriter, fault: Fault | None, normal: str) -> None:
        """Write the normal reply, or what the fault says instead."""
        if fault is None:
            reply = normal
        elif fault.kind == "reply":
            reply = fault.text
        elif fault.kind == "late":
            await asyncio.sleep(fault.seconds)
            reply = fault.text or normal
        elif fault.kind == "hangup":
            raise _Hangup
        elif fault.kind == "stall":
            await asyncio.sleep(3600)
            raise _Hangup
        elif fault.kind == "malformed":
            reply = "hello, this is not SMTP"
        elif fault.kind == "overlong":
            reply = "250 " + "x" * 2000
        elif fault.kind == "lines":
            reply = "\r\n".join(f"250-line {i}" for i in range(fault.count - 1)) + "\r\n250 last"
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        if reply:
            writer.write(reply.encode() + b"\r\n")
            await writer.drain()


def _accepts(fault: Fault | None, normal: str) -> bool:
    """Whether the backend takes the step as done, whatever the gate makes of its answer."""
    if fault is None:
        return normal.startswith(("2", "3"))
    if fault.kind in ("overlong", "lines"):  # both say 250
        return True
    if fault.kind in ("reply", "late"):
        return (fault.text or normal).startswith(("2", "3"))
    return False


def _split_trace(data: bytes) -> tuple[bytes, bytes]:
    """The gate's Received header on top of `data`, and the rest."""
    if not data.startswith(b"Received: "):
        return b"", data
    end = data.find(b"\r\n") + 2
    while data[end:end + 1] in (b" ", b"\t"):
        end = data.find(b"\r\n", end) + 2
    return (data[:end], data[end:]) if b"(Portcullis)" in data[:end] else (b"", data)


def _path(command: str) -> str:
    start, end = command.find("<"), command.find(">")
    return command[start + 1:end] if 0 <= start < end else ""
