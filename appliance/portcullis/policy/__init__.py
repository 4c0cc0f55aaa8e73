"""Policy checks, one module per concern, each answering for one SMTP phase.

Contracts the session relies on:
- A recipient directory has `async lookup(address) -> Lookup`, `reload()` and `close()`.
  It answers TEMPFAIL, never UNKNOWN, when it cannot tell (directory down or slow).
"""

import enum


class Lookup(enum.Enum):
    VALID = "valid"
    UNKNOWN = "unknown"
    TEMPFAIL = "tempfail"
