"""Messages, recipients and new TLS sessions per client per minute, as Postfix's anvil
and Haraka's limit plugin count them (limits.message_rate_per_ip, recipient_rate_per_ip,
tls_rate_per_ip; 0 turns one off). The minute is limits.rate_time_unit, as Postfix's
anvil_rate_time_unit: counted in fixed windows, the previous window weighted by how much
of it is still within the last unit.

A client is an address, or an IPv6 network of limits.ipv6_client_prefix. It is counted
across its connections in the reputation store, so a gate's processes share the counts
(within about a second), and with the fleet's store every appliance does. The allowlist
is exempt. Over a cap:

    MAIL      421 4.7.0 and close    label MSG_RATE
    RCPT      452 4.7.0              label RCPT_RATE
    STARTTLS  454 4.7.0 (RFC 3207)   label TLS_RATE

Each refusal adds the `rate` signal to the connection's score. Every attempt counts,
refused or not, so a client that keeps pushing stays over its cap; one that waits, as an
MTA's queue does, gets through within the minute. Nothing is lost: every answer is 4xx.

Why the defaults are what they are:
- 120 messages a minute (2 a second, sustained) is far above what one legitimate server
  sends to one organisation, and caps a compromised relay at a pace the backend takes
  easily.
- 600 recipients a minute: five a message on average at the message cap; a mailing with
  100 recipients per message is slowed, not refused (452 asks for the rest later).
- 120 new TLS sessions a minute: one per message at the message cap; each handshake
  costs the gate a public-key operation, so a client that handshakes and leaves is
  stopped before it costs a core.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..addresses import client_of
from ..smtp.replies import Reply
from .reputation import ReputationStore

MESSAGES, RECIPIENTS, TLS = "messages", "recipients", "tls"
REFUSALS = {
    MESSAGES: (Reply(421, "4.7.0", "Too many messages from your address, try again later"),
               "MSG_RATE"),
    RECIPIENTS: (Reply(452, "4.7.0", "Too many recipients from your address, try again "
                                     "later"), "RCPT_RATE"),
    TLS: (Reply(454, "4.7.0", "Too many TLS sessions from your address, try again later"),
          "TLS_RATE"),
}


class ClientRates:
    def __init__(self, config, store: ReputationStore, clock: Callable[[], float] = time.time):
        limits = config.limits
        self.caps = {MESSAGES: limits.message_rate_per_ip,
                     RECIPIENTS: limits.recipient_rate_per_ip, TLS: limits.tls_rate_per_ip}
        self.ipv6_client_prefix = limits.ipv6_client_prefix
        self.store = store
        self.clock = clock

    def refusal(self, kind: str, ip: str) -> tuple[Reply, str] | None:
        """Count one more of a kind for the client; its refusal and label when that puts
        it over the cap."""
        cap = self.caps[kind]
        if not cap:
            return None
        counted = self.store.count(kind, client_of(ip, self.ipv6_client_prefix), self.clock())
        return REFUSALS[kind] if counted > cap else None
