"""FifoWindow: the shared window of requests in flight (SMPP, the MQTT publisher)."""

from __future__ import annotations

import asyncio

import pytest

from extrabalance.window import FifoWindow


async def test_waiters_get_slots_in_arrival_order():
    window = FifoWindow(1)
    await window.acquire()
    order: list[int] = []

    async def take(n: int) -> None:
        await window.acquire()
        order.append(n)
        window.release()

    tasks = [asyncio.create_task(take(n)) for n in range(4)]
    await asyncio.sleep(0)
    assert window.waiting == 4 and window.free == 0
    window.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3] and window.free == 1 and window.waiting == 0


async def test_a_waiter_cancelled_after_it_was_handed_a_slot_passes_it_on():
    window = FifoWindow(1)
    await window.acquire()
    first = asyncio.create_task(window.acquire())
    second = asyncio.create_task(window.acquire())
    await asyncio.sleep(0)
    window.release()  # handed to `first` ...
    first.cancel()  # ... which is cancelled before it runs
    await asyncio.sleep(0)
    await second
    assert first.cancelled() and window.free == 0 and window.waiting == 0
    window.release()
    assert window.free == 1


def test_a_window_needs_a_slot():
    with pytest.raises(ValueError):
        FifoWindow(0)
