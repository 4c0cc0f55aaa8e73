"""The before-queue relay: one message's transaction with the backend, and its contract.

- The client gets 250 at end-of-data only if the backend accepted the same bytes for
  every recipient the client was told 250 at RCPT: each RCPT answer that passed local
  policy is the backend's own answer, in the one backend transaction of the message.
- Once that transaction is lost (hang-up, timeout, malformed reply, 421), it stays
  lost: every later RCPT and the DATA get 451, so no recipient can be accepted on a
  second backend transaction that the first one's recipients are missing from.
- A transient backend outcome reaches the client as 4xx, never 5xx. The backend's own
  permanent refusals (550 user unknown) pass through.
- A connection goes back to the pool only after a clean end: a final reply read, or
  an open transaction reset with 250. Anything else closes it.
- The backend learns who the client is before MAIL (upstream.py, forwarding.py); a
  refused XCLIENT or XFORWARD is a fault like a hang-up. The message goes on with the
  gate's Received header on top (the SMTP core counts it toward the size limit).

Backend fault, and what the client is told:

    MAIL refused 4xx/5xx     that reply, for this RCPT and every later one
    RCPT refused 4xx/5xx     that reply, for this recipient only
    DATA refused 4xx/5xx     that reply; the recipients stay accepted
    end-of-data 4xx/5xx      that reply
    hang-up, timeout, malformed or over-long reply, 421, at any step:
                             451 4.4.1 at RCPT and DATA, 451 4.4.2 at end-of-data,
                             and 451 for every later RCPT and DATA of the message
"""

from __future__ import annotations

import dataclasses
import logging

from . import metrics
from .forwarding import ClientFacts
from .smtp.commands import MailFrom
from .smtp.replies import Reply
from .upstream import BackendConnection, BackendPool, BackendUnavailable

log = logging.getLogger("portcullis.relay")

BACKEND_DOWN = Reply(451, "4.4.1", "Mail server temporarily unavailable, try later")
BACKEND_FAILED_DATA = Reply(451, "4.4.2", "Mail server connection failed, message not accepted, try later")
_DATA_FAILED = BACKEND_FAILED_DATA, "BACKEND_DOWN"
# Message content goes to the backend once per read from the client (flush()), or
# sooner when this much is held; the last of it with the final dot. A small message
# sent at once is one write: header, content and dot together.
DATA_WRITE_SIZE = 64 * 1024


class RelayTransaction:
    def __init__(self, pool: BackendPool, sender: MailFrom, tally: metrics.Tally,
                 client: ClientFacts | None = None, trace: bytes = b""):
        """`trace`: the Received header to put on top of the message."""
        self.pool = pool
        self.sender = sender
        self.tally = tally
        self.client = client
        self.trace = trace
        self.size = 0  # octets of message content from the client
        self._connection: BackendConnection | None = None
        self._refusal: tuple[Reply, str] | None = None  # for every later RCPT and DATA
        self._open = False  # the backend has a transaction that RSET must end
        self._in_data = False  # the backend said 354 and awaits the final dot
        self._unsent: list[bytes] = []  # content held back to go out with what follows
        self._unsent_size = 0

    async def add_recipient(self, address: str) -> tuple[Reply, str]:
        """The backend's answer for one recipient that passed local policy, and a label."""
        if self._refusal is not None:
            return self._refusal
        try:
            if self._connection is None:
                sender = self.sender
                if sender.size is not None:  # the backend gets the header too
                    sender = dataclasses.replace(sender, size=sender.size + len(self.trace))
                self._connection, mail, reply = await self.pool.begin(sender, address, self.client)
                self.tally.add(metrics.BACKEND_REUSED if self._connection.transactions > 1
                               else metrics.BACKEND_OPENED)
                if mail.code == 421 or (mail.is_positive and mail.code != 250):
                    return self._lose(f"MAIL answered {mail}")
                if not mail.is_positive:
                    self._refusal = mail, "BACKEND_SENDER_REFUSED"
                    return self._refusal
                self._open = True
            else:
                reply = await self._connection.command(f"RCPT TO:<{address}>")
        except BackendUnavailable as e:
            return self._lose(str(e))
        if reply.code == 421 or (reply.is_positive and reply.code not in (250, 251)):
            return self._lose(f"RCPT answered {reply}")
        return reply, "" if reply.is_positive else "BACKEND_REFUSED"

    async def start_data(self) -> tuple[Reply, str]:
        if self._refusal is not None:
            return self._refusal
        try:
            reply = await self._connection.command("DATA")
        except BackendUnavailable as e:
            return self._lose(str(e))
        if reply.code == 354:
            self._in_data = True
            self._hold(self.trace)
            return reply, ""
        if reply.code == 421 or reply.is_positive:
            return self._lose(f"DATA answered {reply}")
        return reply, "BACKEND_REFUSED"

    async def send(self, chunk: bytes) -> None:
        """Pass message content on; after a failure, drop it (finish() then says 451)."""
        self.size += len(chunk)
        if not self._in_data:
            return
        self._hold(chunk)
        if self._unsent_size >= DATA_WRITE_SIZE:
            await self.flush()

    async def flush(self) -> None:
        """Pass on the content held so far: the session calls this before it waits for
        the client, so nothing waits on the gate, and a reply the backend gives out of
        turn can be seen before the final dot."""
        if not self._unsent:
            return
        try:
            await self._connection.send_data(self._take_unsent())
        except BackendUnavailable as e:
            self._lose(str(e))

    def _hold(self, data: bytes) -> None:
        self._unsent.append(data)
        self._unsent_size += len(data)

    def _take_unsent(self) -> bytes:
        unsent, self._unsent, self._unsent_size = self._unsent, [], 0
        return b"".join(unsent)

    async def finish(self) -> tuple[Reply, str]:
        """Write the final dot. The backend's answer is the client's, unless it is unsure."""
        if not self._in_data:
            return _DATA_FAILED
        self._in_data = False
        try:
            reply = await self._connection.end_data(self._take_unsent())
        except BackendUnavailable as e:
            return self._lose(str(e), answer=_DATA_FAILED)
        if reply.code == 421 or 300 <= reply.code < 400:
            return self._lose(f"end of DATA answered {reply}", answer=_DATA_FAILED)
        self._open = False
        if not reply.is_positive:
            return reply, "BACKEND_REFUSED"
        self.tally.add(metrics.RELAYED)
        self.tally.add(metrics.RELAYED_BYTES, self.size)
        return reply, ""

    async def close(self) -> None:
        """End the transaction: a clean connection goes back to the pool, others close."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._in_data:
            connection.abort()  # closing mid-DATA makes the backend discard the message
            return
        if self._open:
            try:
                reset = await connection.command("RSET")
            except BackendUnavailable:
                return
            if reset.code != 250:
                connection.abort()
                return
        self.pool.give_back(connection)

    def _lose(self, problem: str, answer: tuple[Reply, str] | None = None) -> tuple[Reply, str]:
        """The backend transaction is gone: 451 for every later step, and `answer` (the
        same 451 unless given) for this one."""
        log.warning("backend transaction lost: %s", problem)
        self.tally.add(metrics.BACKEND_ERRORS)
        if self._connection is not None:
            self._connection.abort()
            self._connection = None
        self._open = self._in_data = False
        self._take_unsent()  # dropped
        self._refusal = BACKEND_DOWN, "BACKEND_DOWN"
        return answer or self._refusal
