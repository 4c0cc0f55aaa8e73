"""Logs an admin can grep: one JSON object per line, every record.

Each line has time, level, process (gate, worker-N), logger and message, then the
record's structured fields (`log.info("session", extra=fields(client=...))`). Under
systemd, when stderr is the journal stream (JOURNAL_STREAM), each line goes to
journald's native socket with its PRIORITY, so `journalctl -p warning` filters by
level and `journalctl -o cat` shows the bare JSON; otherwise, and for a line too big
for a datagram, it is written to stderr in one write(), so processes never mix lines.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
import time
from collections import Counter

from .addresses import TokenBucket

JOURNAL_SOCKET = "/run/systemd/journal/socket"


def fields(**values) -> dict:
    """`extra=` for a record: these fields join its JSON line."""
    return {"fields": values}


def timestamp(seconds: float) -> str:
    """A Unix time as ISO 8601 UTC with milliseconds: 2024-05-01T12:00:00.123Z."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def priority(level: int) -> int:
    """The syslog priority of a logging level (journald's PRIORITY=)."""
    if level >= logging.CRITICAL:
        return 2
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    return 6 if level >= logging.INFO else 7


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": timestamp(record.created), "level": record.levelname.lower(),
                "process": self.process, "logger": record.name, "message": record.getMessage()}
        for key, value in getattr(record, "fields", {}).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"), default=str)


class LineHandler(logging.Handler):
    """Each record as one line, written to a descriptor with one write()."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record), record.levelno)
        except Exception:  # noqa: BLE001 - logging's rule: a record that fails never raises
            self.handleError(record)

    def write(self, line: str, level: int) -> None:
        data = (line + "\n").encode()
        while data:
            data = data[os.write(self.fd, data):]


class JournalHandler(LineHandler):
    """journald's native protocol: one datagram of KEY=value lines per record."""

    def __init__(self, fd: int):
        super().__init__(fd)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def write(self, line: str, level: int) -> None:
        message = f"PRIORITY={priority(level)}\nSYSLOG_IDENTIFIER=portcullis\nMESSAGE={line}\n"
        try:
            self.sock.sendto(message.encode(), JOURNAL_SOCKET)
        except OSError:  # too big for a datagram, or journald restarting
            super().write(line, level)


def stderr_is_journal() -> bool:
    """systemd connected stderr to the journal: JOURNAL_STREAM names its device:inode."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        status = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return f"{status.st_dev}:{status.st_ino}" == f"{device}:{inode}"


def setup(level: str, process: str) -> None:
    """Every record of this process as a JSON line, to the journal or stderr."""
    fd = sys.stderr.fileno()
    handler = JournalHandler(fd) if stderr_is_journal() else LineHandler(fd)
    handler.setFormatter(JsonFormatter(process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Nothing in the line needs the caller's file and line, or thread and process
    # names: not working them out makes a record several times cheaper (the logging
    # HOWTO's "Optimization"). Every session leaves a line.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root.setLevel(getattr(logging, level.upper()))


class RateLimitedLines:
    """Lines per label through a token bucket each (`burst`, then `rate` a second).

    A suppressed line is counted; flush() writes one summary line with those counts
    (its `labels`, like the lines it stands for), at most every `interval` seconds.
    So a flood costs a few lines a second, and the per-label sums stay exact.
    """

    def __init__(self, logger: logging.Logger, rate: float = 1.0, burst: int = 20,
                 interval: float = 10.0, clock=time.monotonic):
        self.logger = logger
        self.rate, self.burst, self.interval = rate, burst, interval
        self.clock = clock
        self.buckets: dict[str, TokenBucket] = {}
        self.suppressed: Counter[str] = Counter()
        self.flushed = clock()

    def info(self, label: str, message: str, **values) -> None:
        now = self.clock()
        bucket = self.buckets.get(label)
        if bucket is None:
            bucket = self.buckets[label] = TokenBucket(self.rate, self.burst, now)
        if bucket.take(now):
            self.logger.info(message, extra=fields(**values))
        else:
            self.suppressed[label] += 1

    def flush(self, force: bool = False) -> None:
        now = self.clock()
        if self.suppressed and (force or now - self.flushed >= self.interval):
            self.logger.warning("lines suppressed", extra=fields(labels=dict(self.suppressed)))
            self.suppressed.clear()
            self.flushed = now
