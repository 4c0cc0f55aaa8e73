"""The static recipient list: one address per line, `@domain` for a whole domain.

The file is read at start, on SIGHUP (`reload()`), and whenever its modification
time changes (checked at most once a second, on lookup). A file that cannot be
read keeps the previous list and answers TEMPFAIL until a list was ever loaded.
"""

from __future__ import annotations

import logging
import os
import time

from . import Lookup

log = logging.getLogger("portcullis.recipients")


class RecipientListError(Exception):
    pass


def parse_recipient_list(text: str, source: str) -> tuple[frozenset[str], frozenset[str]]:
    """Return (addresses, whole domains). Raise RecipientListError naming the line."""
    addresses, domains = set(), set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip().lower()
        if not line:
            continue
        local, at, domain = line.rpartition("@")
        if not at or not domain or " " in line or "@" in local:
            raise RecipientListError(
                f"{source} line {number}: '{raw.strip()}' is not an address or @domain"
            )
        if local:
            addresses.add(line)
        else:
            domains.add(domain.rstrip("."))
    return frozenset(addresses), frozenset(domains)


class StaticRecipients:
    CHECK_INTERVAL = 1.0  # seconds between modification-time checks

    def __init__(self, path: str):
        self.path = path
        self._addresses: frozenset[str] | None = None
        self._domains: frozenset[str] = frozenset()
        self._mtime: float | None = None
        self._checked = 0.0
        self.reload()

    def reload(self) -> None:
        try:
            stat = os.stat(self.path)
            with open(self.path, encoding="utf-8", errors="replace") as f:
                addresses, domains = parse_recipient_list(f.read(), self.path)
        except OSError as e:
            log.error("recipient list %s unreadable (%s); keeping the previous list",
                      self.path, e.strerror)
            return
        except RecipientListError as e:
            log.error("%s; keeping the previous list", e)
            return
        self._addresses, self._domains = addresses, domains
        self._mtime = stat.st_mtime_ns
        log.info("recipient list %s: %d addresses, %d domains",
                 self.path, len(addresses), len(domains))

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.CHECK_INTERVAL:
            return
        self._checked = now
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            return
        if mtime != self._mtime:
            self.reload()

    async def lookup(self, address: str) -> Lookup:
        return self.lookup_now(address)

    def lookup_now(self, address: str) -> Lookup:
        self._reload_if_changed()
        if self._addresses is None:
            return Lookup.TEMPFAIL
        address = address.lower()
        domain = address.rpartition("@")[2].rstrip(".")
        if address in self._addresses or domain in self._domains:
            return Lookup.VALID
        return Lookup.UNKNOWN

    def close(self) -> None:
        pass
