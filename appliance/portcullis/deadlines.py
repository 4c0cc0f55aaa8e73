"""Timeouts for many waiters at once, at a tenth of a second's resolution.

A timer per waiting connection costs about 600 bytes in uvloop (a handle and a libuv
timer), and ten thousand idle clients each wait. Here a waiter joins the slot its
deadline falls in, and one timer per slot fails every waiter still in it. A deadline
fires up to one RESOLUTION late, never early.
"""

from __future__ import annotations

import asyncio
import math

RESOLUTION = 0.1  # seconds


class Deadlines:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: dict[int, set[asyncio.Future]] = {}

    def add(self, waiter: asyncio.Future, timeout: float) -> int:
        """Fail `waiter` with TimeoutError unless it is done within `timeout` seconds;
        returns the slot to give to remove()."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop: the old one's timers are gone
            self._loop, self._slots = loop, {}
        slot = math.ceil((loop.time() + max(timeout, 0.0)) / RESOLUTION)
        waiters = self._slots.get(slot)
        if waiters is None:
            waiters = self._slots[slot] = set()
            loop.call_at(slot * RESOLUTION, self._expire, slot)
        waiters.add(waiter)
        return slot

    def remove(self, waiter: asyncio.Future, slot: int) -> None:
        """`waiter` is done or no longer waits: forget it."""
        waiters = self._slots.get(slot)
        if waiters is not None:
            waiters.discard(waiter)

    def _expire(self, slot: int) -> None:
        for waiter in self._slots.pop(slot, ()):
            if not waiter.done():
                waiter.set_exception(TimeoutError())


deadlines = Deadlines()  # one per process: every stream and the gate share its slots
