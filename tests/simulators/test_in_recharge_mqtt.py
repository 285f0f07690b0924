"""Recharges from the IN simulator reach a real (private) MQTT broker as the node expects."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from extrabalance.recharge.events import parse_recharge
from simulators.in_node import InNodeSpec, InSimulator, MqttTarget, MsisdnRange
from tests.mqtt_broker import MosquittoBroker, start_broker_or_skip


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    started = start_broker_or_skip(tmp_path / "broker")
    try:
        yield started
    finally:
        started.kill()


async def test_recharges_are_published_per_in_node(broker: MosquittoBroker) -> None:
    specs = [
        InNodeSpec("in-a", "in-a.test", "test", ranges=(MsisdnRange(prefix="2010"),)),
        InNodeSpec("in-b", "in-b.test", "test", ranges=(MsisdnRange(prefix="2011"),)),
    ]
    sim = InSimulator(specs, None, mqtt=MqttTarget(broker.host, broker.port))
    # No start(): recharges need no Diameter, and publishers connect lazily.
    received: list[tuple[str, bytes]] = []
    async with aiomqtt.Client(broker.host, broker.port, identifier="test-sub") as sub:
        await sub.subscribe("extrabalance/recharge/+", qos=1)
        a = await sim.recharge("201000000001", 2500)
        b = await sim.recharge("201100000001", 100)
        async with asyncio.timeout(5):
            async for message in sub.messages:
                received.append((str(message.topic), bytes(message.payload)))  # type: ignore[arg-type]
                if len(received) == 2:
                    break
    await sim.close()
    topics = sorted(t for t, _ in received)
    assert topics == ["extrabalance/recharge/in-a.test", "extrabalance/recharge/in-b.test"]
    events = {e.event_id: e for e in (parse_recharge(p, expected_currency="EGP") for _, p in received)}
    assert events[a.event_id] == a and events[b.event_id] == b
    assert sim.stats["in-a"]["recharges_published"] == 1
