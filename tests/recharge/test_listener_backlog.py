"""A backlog of bad payloads against a real private Mosquitto: the listener's memory
stays bounded (the broker pushes a QoS 1 backlog well past its in-flight limit, so the
node pauses its own reads) and every bad payload is still dead-lettered."""

from __future__ import annotations

import asyncio

import aiomqtt

from extrabalance.recharge.events import RechargeEvent, to_payload
from extrabalance.recharge.listener import RechargeListener
from tests.mqtt_broker import MosquittoBroker
from tests.recharge.support import fast_settings, make_event, running, wait_until

BACKLOG = 1500
INBOX_MAX = 40


async def test_a_backlog_is_read_in_bounded_steps_and_fully_dead_lettered(
    broker: MosquittoBroker,
) -> None:
    handled: list[str] = []
    # The first event's handler waits until the whole backlog is at the broker, and the
    # node's window (10) is smaller than the broker's in-flight limit (100): the broker
    # keeps pushing while nothing can be acknowledged, so the inbox must fill and the
    # reads must pause, however fast or loaded the machine is.
    published = asyncio.Event()

    async def handle(event: RechargeEvent) -> None:
        await published.wait()
        handled.append(event.event_id)

    settings = fast_settings(broker, inbox_max=INBOX_MAX, inflight_max=10)
    listener = RechargeListener(settings, handle, expected_currency="EGP")
    dead = 0
    async with aiomqtt.Client(broker.host, broker.port, identifier="observer",
                              clean_session=False) as observer:
        await observer.subscribe(settings.dead_letter_topic, qos=1)

        async def count_dead() -> None:
            nonlocal dead
            async for _ in observer.messages:
                dead += 1

        counter = asyncio.create_task(count_dead())
        async with running(listener):
            async with aiomqtt.Client(broker.host, broker.port, identifier="in") as publisher:
                publisher.pending_calls_threshold = 200
                window = asyncio.Semaphore(100)

                async def publish(payload: bytes) -> None:
                    try:
                        await publisher.publish("extrabalance/recharge/in-a", payload, qos=1)
                    finally:
                        window.release()

                jobs = []
                for i in range(BACKLOG):
                    await window.acquire()
                    payload = b"not json %d" % i if i % 100 else to_payload(make_event(i))
                    jobs.append(asyncio.create_task(publish(payload)))
                await asyncio.gather(*jobs)
            published.set()
            invalid = BACKLOG - BACKLOG // 100
            await wait_until(lambda: dead >= invalid and listener.stats()["dead_lettered"]
                             >= invalid, f"{invalid} dead letters", timeout_s=60)
            stats = listener.stats()
        counter.cancel()
    assert stats["dead_lettered"] == stats["invalid"] == invalid
    assert len(handled) == BACKLOG // 100
    # bounded: paho hands over a few packets per read after the pause
    assert stats["inbox_peak"] <= INBOX_MAX + 10, stats
    assert stats["read_pauses"] > 0, stats
    assert stats["reconnects"] == 0, stats


async def test_a_node_restarting_onto_a_backlog_larger_than_its_inbox_reconnects(
    broker: MosquittoBroker,
) -> None:
    """The broker sends a persistent session's backlog before the SUBACK: the listener
    must drain it (pausing its reads) while it waits, or it never gets subscribed."""
    handled: set[str] = set()

    async def handle(event: RechargeEvent) -> None:
        handled.add(event.event_id)

    settings = fast_settings(broker, inbox_max=INBOX_MAX)
    first = RechargeListener(settings, handle, expected_currency="EGP")
    async with running(first):  # creates the persistent session, then goes away
        await wait_until(lambda: first.stats()["connected"], "first session up")
    count = INBOX_MAX * 10
    async with aiomqtt.Client(broker.host, broker.port, identifier="in") as publisher:
        for i in range(count):
            await publisher.publish("extrabalance/recharge/in-a", to_payload(make_event(i)), qos=1)
    again = RechargeListener(settings, handle, expected_currency="EGP")
    async with running(again):
        await wait_until(lambda: len(handled) == count, f"{count} handled", timeout_s=30)
        stats = again.stats()
    assert stats["connected"] and stats["reconnects"] == 0, stats
    assert stats["inbox_peak"] <= INBOX_MAX + 10, stats
