"""The LDAP recipient directory (`recipients.source: ldap`).

A recipient exists when a search under `base` with the configured filter finds at least
one entry. ldap3 is synchronous, so each search runs on a small thread pool, one pooled
connection per thread at most; the asyncio loop only awaits. Every answer is bounded by
`timeout`: a directory that is down, slow, refuses our bind or fails the TLS check yields
TEMPFAIL (the session answers 451 4.4.3, the sender retries), never UNKNOWN, which would
bounce real mail. Nothing is remembered about an outage: the next lookup tries again, so
the directory is back in use as soon as it answers.

Answers are cached by lower-cased address (LDAP's mail attributes match case-insensitively),
found ones for `positive_ttl` and unknown ones for `negative_ttl`: a directory-harvest run
probes many unknown addresses, and each repeat must not cost a search. TEMPFAIL is never
cached.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import ssl
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import ldap3
from ldap3.core.exceptions import LDAPException

from ..config import ADDRESS_PLACEHOLDER, LdapDirectory
from . import Lookup

log = logging.getLogger("portcullis.ldap")

# RFC 4515 section 3: in an assertion value these five must be written as \XX (hex).
_FILTER_ESCAPES = str.maketrans({"\\": r"\5c", "*": r"\2a", "(": r"\28", ")": r"\29",
                                 "\0": r"\00"})

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")

# Search result codes that still carry a trustworthy answer (RFC 4511 appendix A).
_SUCCESS, _SIZE_LIMIT_EXCEEDED = 0, 4


def escape_filter_value(value: str) -> str:
    """Make `value` a literal assertion value: no wildcard, no filter syntax survives."""
    return value.translate(_FILTER_ESCAPES)


class DirectoryUnavailable(Exception):
    """The directory could not give an answer (unreachable, bind refused, search failed)."""


class AnswerCache:
    """Answers by key, found ones kept `positive_ttl` seconds and unknown ones `negative_ttl`.
    Holds at most `max_entries`; the least recently stored go first."""

    def __init__(self, positive_ttl: float, negative_ttl: float, max_entries: int):
        self._ttl = {Lookup.VALID: positive_ttl, Lookup.UNKNOWN: negative_ttl}
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[Lookup, float]] = OrderedDict()

    def get(self, key: str, now: float) -> Lookup | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        answer, expires = entry
        if now >= expires:
            del self._entries[key]
            return None
        return answer

    def put(self, key: str, answer: Lookup, now: float) -> None:
        ttl = self._ttl.get(answer, 0)
        if ttl <= 0 or self._max_entries == 0:
            return
        self._entries[key] = (answer, now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class LdapRecipientDirectory:
    """Recipient directory contract (see policy/__init__.py) over an LDAP server.

    Counters for metrics: `cache_hits`, `cache_misses` (lookups that went to the directory)
    and `tempfails` (lookups answered TEMPFAIL because the directory could not tell).
    The settings are those config.load() checked: URL, filter, files.
    """

    def __init__(self, settings: LdapDirectory):
        self._password = _read_password(settings)
        self._tls = _make_tls(settings)
        self.settings = settings
        self.cache_hits = 0
        self.cache_misses = 0
        self.tempfails = 0
        self._cache = AnswerCache(settings.positive_ttl, settings.negative_ttl,
                                  settings.cache_size)
        self._executor = ThreadPoolExecutor(settings.pool_size, thread_name_prefix="ldap")
        self._lock = threading.Lock()  # guards the idle connections and the generation
        self._idle: list[ldap3.Connection] = []
        self._generation = 0
        self._closed = False
        self._reachable = True  # only to log changes of state, not every failed lookup

    @property
    def cache_hit_rate(self) -> float:
        lookups = self.cache_hits + self.cache_misses
        return self.cache_hits / lookups if lookups else 0.0

    async def lookup(self, address: str) -> Lookup:
        if _CONTROL_CHARACTERS.search(address):
            # No mailbox has one (RFC 5321, 6531), and slapd would cut the value at a NUL
            # and match the address's prefix.
            return Lookup.UNKNOWN
        key = address.lower()
        cached = self._cache.get(key, time.monotonic())
        if cached is not None:
            self.cache_hits += 1
            return cached
        self.cache_misses += 1
        if self._closed:
            self.tempfails += 1
            return Lookup.TEMPFAIL
        loop = asyncio.get_running_loop()
        try:
            answer = await asyncio.wait_for(
                loop.run_in_executor(self._executor, self._search, key), self.settings.timeout
            )
        except (DirectoryUnavailable, TimeoutError) as e:
            self.tempfails += 1
            self._note_state(False, str(e) or f"no answer within {self.settings.timeout}s")
            return Lookup.TEMPFAIL
        except Exception:  # a bug here must cost a retry, never a wrong 550
            self.tempfails += 1
            log.exception("LDAP lookup of %r failed unexpectedly", address)
            return Lookup.TEMPFAIL
        self._note_state(True, "")
        self._cache.put(key, answer, time.monotonic())
        return answer

    def reload(self) -> None:
        """Re-read the password file, forget cached answers and reconnect on next use."""
        try:
            password = _read_password(self.settings)
        except (OSError, ValueError) as e:
            log.error("cannot read %s (%s); keeping the previous password",
                      self.settings.password_file, getattr(e, "strerror", None) or e)
        else:
            self._password = password
        self._cache.clear()
        self._drop_idle_connections()

    def close(self) -> None:
        # Searches already queued still finish (each within its timeout) so that no
        # lookup in flight sees a cancellation; new lookups answer TEMPFAIL.
        self._closed = True
        self._executor.shutdown(wait=False)
        self._drop_idle_connections()

    # --- on the pool threads ------------------------------------------------------

    def _search(self, address: str) -> Lookup:
        search_filter = self.settings.filter.replace(
            ADDRESS_PLACEHOLDER, escape_filter_value(address))
        # Pooled connections may have died with a restarted server: on a failure, drop
        # them all and try once more on a new connection.
        for _attempt in range(2):
            connection, generation, reused = self._take_connection()
            try:
                connection.search(
                    self.settings.base, search_filter, ldap3.SUBTREE,
                    attributes=[ldap3.NO_ATTRIBUTES], size_limit=1,
                    time_limit=math.ceil(self.settings.timeout),
                )
                result = connection.result
                found = any(item["type"] == "searchResEntry"
                            for item in connection.response or ())
            except LDAPException as e:
                _unbind_quietly(connection)
                if reused:
                    self._drop_idle_connections()
                    continue
                raise DirectoryUnavailable(f"search failed: {e}") from None
            self._give_back(connection, generation)
            if result["result"] not in (_SUCCESS, _SIZE_LIMIT_EXCEEDED):
                raise DirectoryUnavailable(
                    f"search failed: {result['description']} {result['message']}".strip())
            return Lookup.VALID if found else Lookup.UNKNOWN
        raise DirectoryUnavailable("search failed on a new connection too")

    def _take_connection(self) -> tuple[ldap3.Connection, int, bool]:
        with self._lock:
            generation = self._generation
            if self._idle:
                return self._idle.pop(), generation, True
        return self._connect(), generation, False

    def _give_back(self, connection: ldap3.Connection, generation: int) -> None:
        with self._lock:
            if generation == self._generation:
                self._idle.append(connection)
                return
        _unbind_quietly(connection)

    def _connect(self) -> ldap3.Connection:
        settings = self.settings
        auto_bind = ldap3.AUTO_BIND_TLS_BEFORE_BIND if settings.starttls else ldap3.AUTO_BIND_NO_TLS
        try:
            return ldap3.Connection(
                _make_server(settings, self._tls), user=settings.bind_dn or None,
                password=self._password or None, auto_bind=auto_bind,
                client_strategy=ldap3.SYNC, read_only=True,
                # ldap3 needs whole seconds here; lookup() enforces the exact timeout.
                receive_timeout=math.ceil(settings.timeout), raise_exceptions=False,
                auto_referrals=False,
            )
        except LDAPException as e:
            raise DirectoryUnavailable(f"cannot connect to {settings.url}: {e}") from None

    def _drop_idle_connections(self) -> None:
        """Unbind the idle connections; those in use are unbound when given back."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._generation += 1
        for connection in idle:
            _unbind_quietly(connection)

    def _note_state(self, reachable: bool, reason: str) -> None:
        if reachable == self._reachable:
            return
        self._reachable = reachable
        if reachable:
            log.warning("LDAP directory %s answers again", self.settings.url)
        else:
            log.error("LDAP directory %s cannot answer (%s); recipients get 451 until it does",
                      self.settings.url, reason)


def _read_password(settings: LdapDirectory) -> str:
    """The first line of password_file without its line end; "" for an anonymous bind."""
    if not settings.password_file:
        return ""
    with open(settings.password_file, encoding="utf-8") as f:
        return f.readline().rstrip("\r\n")


def _make_tls(settings: LdapDirectory) -> ldap3.Tls | None:
    if not (settings.starttls or settings.url.lower().startswith("ldaps://")):
        return None
    # No ca_file means the system's trust store; the server name is always checked.
    return ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=settings.ca_file or None)


def _make_server(settings: LdapDirectory, tls: ldap3.Tls | None) -> ldap3.Server:
    """A new Server object per connection: ldap3 marks a server's address unusable for
    some seconds after a failed connect, which would delay recovery after an outage."""
    return ldap3.Server(settings.url, tls=tls, connect_timeout=settings.timeout,
                        get_info=ldap3.NONE)


def _unbind_quietly(connection: ldap3.Connection) -> None:
    try:
        connection.unbind()
    except LDAPException:
        pass
