"""The demo-only broker is enough for a persistent QoS 1 subscriber."""

import asyncio

import aiomqtt

from extrabalance.demo_broker import DemoBroker
from extrabalance.recharge.events import topic_matches as _topic_matches


def test_wildcards():
    assert _topic_matches("extrabalance/recharge/+", "extrabalance/recharge/in-a")
    assert not _topic_matches("extrabalance/recharge/+", "extrabalance/recharge/a/b")
    assert _topic_matches("extrabalance/#", "extrabalance/recharge/a/b")
    assert not _topic_matches("a/+", "b/c")


async def test_persistent_session_gets_what_was_published_while_away():
    broker = DemoBroker()
    port = await broker.start()
    try:
        async with aiomqtt.Client("127.0.0.1", port, identifier="sub", clean_session=False) as sub:
            await sub.subscribe("t/+", qos=1)
        async with aiomqtt.Client("127.0.0.1", port, identifier="pub") as pub:
            for i in range(5):
                await pub.publish("t/x", str(i).encode(), qos=1)
        got = []
        async with aiomqtt.Client("127.0.0.1", port, identifier="sub", clean_session=False) as sub:
            async def read():
                async for message in sub.messages:
                    got.append(message.payload)
                    if len(got) == 5:
                        return
            await asyncio.wait_for(read(), 5)
        assert got == [b"0", b"1", b"2", b"3", b"4"]
    finally:
        await broker.stop()
