"""Bytes to SMTP units, with hard limits: command lines, and message content.

A command line is at most 512 octets and a text line in DATA at most 1000 (RFC 5321
4.5.3.1). Input that breaks them is refused, never silently chopped, and memory stays
bounded by those limits whatever the peer sends. Both framers work on the server's
input buffer in place and keep only the little state a line split across reads needs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Problem(enum.Enum):
    LINE_TOO_LONG = "LINE_TOO_LONG"
    BAD_BYTES = "BAD_BYTES"  # NUL, bare CR or 8-bit octets in a command
    BARE_LF = "BARE_LF"  # bare CR or LF in message content: possible SMTP smuggling
    SIZE = "SIZE"


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """The final dot arrived; `problem` is the first limit the message broke, if any."""

    problem: Problem | None


class CommandLines:
    def __init__(self, max_line: int):
        self.max_line = max_line  # octets including CRLF
        self._discarding = False  # skipping the rest of an overlong line

    def next_line(self, buf: bytearray) -> str | Problem | None:
        """The next command line without CRLF, a Problem, or None until more arrives."""
        limit = self.max_line
        if self._discarding:
            newline = buf.find(b"\n")
            if newline < 0:
                buf.clear()
                return None
            del buf[: newline + 1]
            self._discarding = False
        newline = buf.find(b"\n", 0, limit)
        if newline < 0:
            if len(buf) < limit:
                return None
            rest = buf.find(b"\n", limit)
            if rest < 0:
                self._discarding = True  # its end has not arrived yet
                buf.clear()
            else:
                del buf[: rest + 1]
            return Problem.LINE_TOO_LONG
        raw = bytes(buf[:newline])
        del buf[: newline + 1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw.isascii() or b"\0" in raw or b"\r" in raw:
            return Problem.BAD_BYTES
        return raw.decode("ascii")


class MessageLines:
    """Message content up to the final dot, passed on in chunks of whole, valid lines.

    Once a line is too long or the message too big, the rest is read and dropped, and
    MessageEnd names the problem. A bare CR or LF ends everything (Problem.BARE_LF):
    DATA ends only at CRLF.CRLF, so no second message can be smuggled inside.
    """

    # Below this many octets in the buffer (a few lines) the line loop is as quick.
    fast_path_min = 512

    def __init__(self, max_line: int, max_size: int):
        self.max_line = max_line
        self.max_size = max_size
        self.start()

    def start(self, size: int = 0) -> None:
        """A new message, `size` octets of which are already spoken for."""
        self.problem: Problem | None = None
        self.size = size  # unstuffed octets so far
        self._line_start = True  # the next byte starts a line

    def next_chunk(self, buf: bytearray) -> bytes | MessageEnd | Problem | None:
        """Whole valid lines as one chunk, MessageEnd, Problem.BARE_LF, or None until
        more arrives."""
        if len(buf) >= self.fast_path_min and self.problem is None and self._line_start:
            chunk = self._clean_lines(buf)
            if chunk is not None:
                return chunk
        return self._next_chunk_by_lines(buf)

    def _clean_lines(self, buf: bytearray) -> bytes | None:
        """The chunk `_next_chunk_by_lines` would return, found with a few whole-buffer
        bytes operations instead of a loop per line; None whenever there is any doubt.

        Only for a clean stretch of lines: every line break CRLF, every line (CRLF
        included, a stuffed dot not discounted) within max_line, the size within
        max_size, and any partial line after it short enough to wait for.
        """
        if buf.startswith(b".\r\n"):
            return None  # the end of message: the line loop reports it
        end = buf.rfind(b"\n") + 1  # after the last whole line
        if end == 0:
            return None
        final_dot = -1
        dots = int(buf[0] == 46)  # lines that start with a (stuffed) dot
        # In clean lines every LF. is a CRLF. Start at the first dot: memchr finds
        # it (or that there is none) far quicker than a search for three octets.
        first = buf.find(b".", 1, end)
        if first >= 0:
            first = buf.find(b"\r\n.", max(first - 2, 0), end)
        if first >= 0:
            final_dot = buf.find(b"\r\n.\r\n", first, end)
            if final_dot >= 0:
                end = final_dot + 2  # the final dot stays in the buffer
            dots += buf.count(b"\r\n.", first, end)
        if final_dot < 0 and len(buf) - end > self.max_line:
            return None  # a partial line already too long
        with memoryview(buf) as view:
            chunk = bytes(view[:end])
        lines = chunk.splitlines()  # breaks at CRLF, and at a bare CR or LF
        if sum(map(len, lines)) + 2 * len(lines) != end:
            return None  # some break is a bare CR or LF
        if max(map(len, lines)) + 2 > self.max_line:
            return None
        size = self.size + end - dots
        if size > self.max_size:
            return None
        self.size = size
        del buf[:end]
        return chunk

    def _next_chunk_by_lines(self, buf: bytearray) -> bytes | MessageEnd | Problem | None:
        """The reference framing, a line at a time; `next_chunk` gives the same results
        and leaves the same state for every input."""
        limit = self.max_line
        start = 0
        end_of_message = False
        problem = self.problem
        size = self.size
        while True:
            newline = buf.find(b"\n", start)
            if newline < 0:
                if len(buf) - start > limit:
                    # An unfinished line this long can never become valid: drop it,
                    # but keep a trailing CR, which may pair with the next LF.
                    problem = problem or Problem.LINE_TOO_LONG
                    start = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
                    self._line_start = False
                break
            line_start = self._line_start
            self._line_start = True
            if newline == start or buf[newline - 1] != 13 or buf.find(b"\r", start, newline - 1) >= 0:
                buf.clear()
                return Problem.BARE_LF
            length = newline + 1 - start
            if line_start and length == 3 and buf[start] == 46:  # ".\r\n"
                end_of_message = True
                break
            if line_start and buf[start] == 46:
                length -= 1  # the dot doubled for transparency counts toward no limit
            if length > limit or not line_start:
                problem = problem or Problem.LINE_TOO_LONG
            size += length
            if size > self.max_size:
                problem = problem or Problem.SIZE
            start = newline + 1
        self.size = size
        self.problem = problem
        if problem is None and start:
            chunk = bytes(buf[:start])
            del buf[:start]  # a final dot stays in the buffer for the next call
            return chunk
        if not end_of_message:
            del buf[:start]
            return None
        del buf[: start + 3]
        return MessageEnd(problem)
