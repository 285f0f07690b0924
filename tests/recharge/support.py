"""Shared pieces of the recharge tests: events, fast settings, bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from extrabalance.recharge.events import RechargeEvent
from extrabalance.recharge.listener import MqttSettings, RechargeListener
from tests.mqtt_broker import MosquittoBroker

WAIT_MAX_S = 20.0  # a bound on every wait, so a broken build fails instead of hanging


def make_event(index: int, *, in_node: str = "in-a", amount_minor: int = 1000) -> RechargeEvent:
    return RechargeEvent(
        event_id=f"{in_node}-{index:09d}",
        msisdn=f"2010{index % 10**8:08d}",
        amount_minor=amount_minor,
        currency="EGP",
        balance_after_minor=amount_minor,
        in_node=in_node,
        timestamp=datetime(2026, 11, 25, 10, 15, tzinfo=UTC),
    )


def fast_settings(
    broker: MosquittoBroker, client_id: str = "node-test", **changes: object
) -> MqttSettings:
    # Short backoffs and drains: the tests provoke reconnects on purpose.
    values: dict[str, object] = {
        "host": broker.host,
        "port": broker.port,
        "client_id": client_id,
        "reconnect_backoff_initial_s": 0.05,
        "reconnect_backoff_max_s": 0.3,
        "drain_timeout_s": 5.0,
        "keepalive_s": 5,
        **changes,
    }
    return MqttSettings(**values)  # type: ignore[arg-type]


async def wait_until(
    predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_MAX_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s} s waiting for: {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(listener: RechargeListener) -> AsyncIterator[asyncio.Task[None]]:
    """Run a listener for the body of a ``async with``; it is subscribed on entry."""
    task = asyncio.create_task(listener.run())
    try:
        await wait_until(
            lambda: bool(listener.stats()["connected"]) or task.done(), "listener subscribed"
        )
        if task.done():
            task.result()  # surfaces the error that stopped it
        yield task
    finally:
        await listener.stop()
        await asyncio.wait_for(task, WAIT_MAX_S)
