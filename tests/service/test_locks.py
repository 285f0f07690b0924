"""SubscriberLocks: one holder per subscriber, others run alongside, the map empties."""

import asyncio

import pytest

from extrabalance.service.locks import SubscriberLocks


async def test_one_holder_per_subscriber_and_map_empties():
    locks = SubscriberLocks()
    inside: dict[str, int] = {}
    peak: dict[str, int] = {}

    async def work(m: str) -> None:
        async with locks.hold(m):
            inside[m] = inside.get(m, 0) + 1
            peak[m] = max(peak.get(m, 0), inside[m])
            await asyncio.sleep(0)
            inside[m] -= 1

    await asyncio.gather(*(work(m) for m in ["a", "b", "a", "c", "a", "b"] * 20))
    assert peak == {"a": 1, "b": 1, "c": 1}
    assert len(locks) == 0


async def test_different_subscribers_run_concurrently():
    locks = SubscriberLocks()
    both_in = asyncio.Event()
    entered = 0

    async def work(m: str) -> None:
        nonlocal entered
        async with locks.hold(m):
            entered += 1
            if entered == 2:
                both_in.set()
            await asyncio.wait_for(both_in.wait(), 1)

    await asyncio.gather(work("a"), work("b"))


async def test_bound_makes_new_subscribers_wait():
    locks = SubscriberLocks(subscribers_max=1)
    release = asyncio.Event()
    order: list[str] = []

    async def first() -> None:
        async with locks.hold("a"):
            order.append("a in")
            await release.wait()
        order.append("a out")

    async def second() -> None:
        async with locks.hold("b"):
            order.append("b in")

    t1 = asyncio.create_task(first())
    await asyncio.sleep(0)
    t2 = asyncio.create_task(second())
    await asyncio.sleep(0.01)
    assert order == ["a in"] and len(locks) == 1
    release.set()
    await asyncio.gather(t1, t2)
    assert order == ["a in", "a out", "b in"] and len(locks) == 0


async def test_cancelled_waiter_leaves_no_entry():
    locks = SubscriberLocks()
    release = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("a"):
            await release.wait()

    async def waiter() -> None:
        async with locks.hold("a"):
            pytest.fail("must not get in")

    h = asyncio.create_task(holder())
    await asyncio.sleep(0)
    w = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    release.set()
    await h
    assert len(locks) == 0


async def test_exception_inside_releases():
    locks = SubscriberLocks()
    with pytest.raises(ValueError):
        async with locks.hold("a"):
            raise ValueError("boom")
    assert len(locks) == 0
    async with locks.hold("a"):
        pass
