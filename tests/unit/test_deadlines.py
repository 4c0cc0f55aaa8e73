"""Shared deadline slots: an expiry is called after its timeout, never before it and
at most one slot late; one removed in time is never called; expiries whose deadlines
share a slot share one timer."""

import asyncio
import functools

import pytest
from portcullis.deadlines import RESOLUTION, Deadlines


async def wait_for_expiry(deadlines: Deadlines, timeout: float) -> float:
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    started = loop.time()
    deadlines.add(functools.partial(waiter.set_exception, TimeoutError()), timeout)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(waiter, 5)  # a waiter never failed shows as 5 s
    return loop.time() - started


@pytest.mark.parametrize("timeout", [0.0, 0.05, 0.25])
def test_a_waiter_fails_after_its_timeout_and_at_most_a_slot_late(timeout):
    waited = asyncio.run(wait_for_expiry(Deadlines(), timeout))
    assert timeout <= waited < timeout + RESOLUTION + 0.05


def test_a_removed_waiter_is_forgotten_and_never_fails():
    async def scenario():
        deadlines = Deadlines()
        loop = asyncio.get_running_loop()
        kept, removed = loop.create_future(), loop.create_future()
        deadlines.add(functools.partial(kept.set_exception, TimeoutError()), 0.1)
        expire = functools.partial(removed.set_result, None)
        deadlines.remove(expire, deadlines.add(expire, 0.1))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(kept, 5)
        await asyncio.sleep(2 * RESOLUTION)
        return removed.done(), deadlines._slots

    done, slots = asyncio.run(scenario())
    assert not done and slots == {}


def test_waiters_in_one_slot_share_one_timer():
    async def scenario():
        deadlines = Deadlines()
        loop = asyncio.get_running_loop()
        expiries = {functools.partial(loop.create_future().set_result, None): 0
                    for _ in range(1000)}
        for expire in expiries:
            expiries[expire] = deadlines.add(expire, 1.0)
        timers = len(loop._scheduled)  # asyncio's own loop: its timer heap
        for expire, slot in expiries.items():
            deadlines.remove(expire, slot)
        return set(expiries.values()), timers

    slots, timers = asyncio.run(scenario())
    assert len(slots) <= 2  # the clock may cross a slot boundary while adding
    assert timers == len(slots)
