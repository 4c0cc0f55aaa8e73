"""Policy checks, one module per concern, each answering for one SMTP phase; chain.py
puts them in order for a connection."""

from __future__ import annotations

import enum
from typing import Protocol


class Lookup(enum.Enum):
    VALID = "valid"
    UNKNOWN = "unknown"
    TEMPFAIL = "tempfail"


class RecipientDirectory(Protocol):
    """Where the valid recipients are listed: a static file or LDAP.

    lookup() answers TEMPFAIL, never UNKNOWN, when it cannot tell (directory down or
    slow), so that a sender is never refused for good because of an outage.
    """

    async def lookup(self, address: str) -> Lookup: ...

    def reload(self) -> None: ...

    def close(self) -> None: ...
