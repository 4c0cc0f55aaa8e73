"""Timeouts for many waiters at once, at a tenth of a second's resolution.

A timer per waiting connection costs about 600 bytes in uvloop (a handle and a libuv
timer), and ten thousand idle clients each wait. Here a waiter's expiry callback joins
the slot its deadline falls in, and one timer per slot calls every callback still in
it. A deadline fires up to one RESOLUTION late, never early.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

RESOLUTION = 0.1  # seconds

Expiry = Callable[[], object]


class Deadlines:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: dict[int, set[Expiry]] = {}

    def add(self, expire: Expiry, timeout: float) -> int:
        """Call `expire()` in `timeout` seconds unless removed before; returns the slot
        to give to remove(). `expire` must be hashable: a bound method or a partial."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop: the old one's timers are gone
            self._loop, self._slots = loop, {}
        slot = math.ceil((loop.time() + max(timeout, 0.0)) / RESOLUTION)
        expiries = self._slots.get(slot)
        if expiries is None:
            expiries = self._slots[slot] = set()
            loop.call_at(slot * RESOLUTION, self._expire, slot)
        expiries.add(expire)
        return slot

    def remove(self, expire: Expiry, slot: int) -> None:
        """The wait ended in time: forget it."""
        expiries = self._slots.get(slot)
        if expiries is not None:
            expiries.discard(expire)

    def _expire(self, slot: int) -> None:
        for expire in self._slots.pop(slot, ()):
            expire()


deadlines = Deadlines()  # one per process: every stream and the gate share its slots
