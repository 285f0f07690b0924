"""The recharge publisher (IN simulator): at-least-once, bounded waits."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from extrabalance.recharge.events import parse_recharge
from simulators.recharge_publisher import PublishDeadlineExceeded, RechargePublisher
from tests.mqtt_broker import MosquittoBroker
from tests.recharge.support import make_event


async def test_every_event_reaches_a_subscriber_across_a_broker_restart(
    broker: MosquittoBroker,
) -> None:
    received: set[str] = set()

    # A persistent observer session, so events published while it reconnects are kept.
    def observer() -> aiomqtt.Client:
        return aiomqtt.Client(broker.host, broker.port, identifier="observer", clean_session=False)

    async def observe() -> None:
        while len(received) < 2000:
            try:
                async with observer() as client:
                    await client.subscribe("extrabalance/recharge/+", qos=1)
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        received.add(
                            parse_recharge(message.payload, expected_currency="EGP").event_id
                        )
                        if len(received) == 2000:
                            return
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    async with observer() as client:
        await client.subscribe("extrabalance/recharge/+", qos=1)
    watching = asyncio.create_task(observe())
    # ack_timeout_s is far longer than the whole test may take: the publisher must
    # notice the dropped connection itself, not wait for missing PUBACKs to time out.
    async with RechargePublisher(
        broker.host, broker.port, "in-sim", ack_timeout_s=60.0, publish_deadline_s=60.0
    ) as publisher:
        async with asyncio.timeout(20):
            publishing = asyncio.create_task(
                publisher.publish_many(make_event(i) for i in range(2000))
            )
            while publisher.counts["published"] < 500:
                await asyncio.sleep(0.005)
            await asyncio.to_thread(broker.restart)
            assert await publishing == 2000
            await watching
    assert received == {make_event(i).event_id for i in range(2000)}
    assert publisher.counts["retries"] >= 1
    assert publisher.counts["connects"] >= 2


async def test_publisher_gives_up_after_its_deadline(broker: MosquittoBroker) -> None:
    broker.stop()
    publisher = RechargePublisher(
        broker.host, broker.port, "in-sim", ack_timeout_s=0.1, publish_deadline_s=0.5
    )
    with pytest.raises(PublishDeadlineExceeded, match="publish_deadline_s=0.5"):
        await publisher.publish(make_event(1))
    assert publisher.counts["retries"] >= 1
    await publisher.close()


async def test_publish_many_stops_at_the_first_event_past_its_deadline(
    broker: MosquittoBroker,
) -> None:
    broker.stop()
    publisher = RechargePublisher(
        broker.host, broker.port, "in-sim", ack_timeout_s=0.1, publish_deadline_s=0.3
    )
    with pytest.raises(PublishDeadlineExceeded):
        await publisher.publish_many(make_event(i) for i in range(50))
    assert publisher.counts["published"] == 0
    await publisher.close()


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window_max"):
        RechargePublisher("127.0.0.1", 1883, "in-sim", window_max=0)
