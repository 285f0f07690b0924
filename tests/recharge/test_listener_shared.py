"""Two nodes' recharge listeners on one broker in one shared-subscription group
(`shared_group`, `$share/<group>/<topic>`): each recharge is handled by exactly one of
them, both take a share, and a PUBACK still follows the handler's commit: a recharge
whose handler fails on one node is redelivered (to a node of the group) and committed
once. Without the group every node gets every recharge."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from extrabalance.recharge.events import RechargeEvent
from extrabalance.recharge.listener import MqttSettings, RechargeListener
from simulators.recharge_publisher import RechargePublisher
from tests.mqtt_broker import MosquittoBroker
from tests.recharge.support import fast_settings, make_event, running, wait_until

EVENTS = 300


def test_the_group_is_a_topic_level() -> None:
    with pytest.raises(ValueError, match="shared_group"):
        MqttSettings(shared_group="a/b")
    settings = MqttSettings(shared_group="eb", topics=("extrabalance/recharge/+", "other/#"))
    assert settings.subscription_filters() == (
        "$share/eb/extrabalance/recharge/+", "$share/eb/other/#")
    assert MqttSettings().subscription_filters() == ("extrabalance/recharge/+",)
    # the node's [mqtt] section: off by default, a bad group refused at load
    from extrabalance.config import ConfigError, load_settings

    assert load_settings().mqtt.shared_group is None
    assert load_settings(overrides={"mqtt": {"shared_group": "eb"}}).mqtt.shared_group == "eb"
    with pytest.raises(ConfigError, match="shared_group"):
        load_settings(overrides={"mqtt": {"shared_group": "eb/1"}})


def _listeners(broker: MosquittoBroker, handler, **changes: object):  # type: ignore[no-untyped-def]
    return {
        node: RechargeListener(
            fast_settings(broker, client_id=f"eb-node-{node}", shared_group="extrabalance",
                          **changes),
            handler(node), expected_currency="EGP")
        for node in ("a", "b")
    }


async def _publish(broker: MosquittoBroker, count: int) -> None:
    async with RechargePublisher(broker.host, broker.port, "in-sim",
                                 ack_timeout_s=5.0) as publisher:
        await publisher.publish_many(make_event(i) for i in range(count))


@pytest.mark.parametrize("protocol_version", [4, 5])
async def test_each_recharge_is_handled_by_one_node_of_the_group(
    broker: MosquittoBroker, protocol_version: int
) -> None:
    committed: Counter[str] = Counter()  # event → commits, over both nodes
    by_node: Counter[str] = Counter()

    def handler(node: str):  # type: ignore[no-untyped-def]
        async def handle(event: RechargeEvent) -> None:
            await asyncio.sleep(0.001)  # the ledger commit
            committed[event.event_id] += 1
            by_node[node] += 1

        return handle

    listeners = _listeners(broker, handler, protocol_version=protocol_version)
    async with running(listeners["a"]), running(listeners["b"]):
        await _publish(broker, EVENTS)
        await wait_until(lambda: sum(x.stats()["acked"] for x in listeners.values()) == EVENTS,
                         f"{EVENTS} recharges acknowledged")

    assert set(committed) == {make_event(i).event_id for i in range(EVENTS)}
    assert set(committed.values()) == {1}, "a recharge was handled by two nodes"
    assert by_node["a"] > 0 and by_node["b"] > 0, by_node  # the group shares the work
    assert sum(x.stats()["received"] for x in listeners.values()) == EVENTS


async def test_a_recharge_whose_commit_failed_is_not_acknowledged_and_comes_back(
    broker: MosquittoBroker,
) -> None:
    """Node A's ledger fails once: that recharge is not acknowledged, the broker sends
    it again and it is committed; no recharge is lost. (Redeliveries may repeat a
    committed one: the ledger's event id makes that a replay, as on one node.)"""
    committed: set[str] = set()  # idempotent, like the ledger's recoveries.event_id
    failed: list[str] = []

    def handler(node: str):  # type: ignore[no-untyped-def]
        async def handle(event: RechargeEvent) -> None:
            await asyncio.sleep(0.001)
            if node == "a" and not failed:
                failed.append(event.event_id)
                raise RuntimeError("ledger unavailable")
            committed.add(event.event_id)

        return handle

    listeners = _listeners(broker, handler)
    async with running(listeners["a"]), running(listeners["b"]):
        await _publish(broker, 100)
        await wait_until(lambda: len(committed) == 100, "every recharge committed")
    assert failed and failed[0] in committed
    assert listeners["a"].stats()["handler_failures"] == 1


async def test_a_member_that_is_away_gets_its_share_when_it_returns(
    broker: MosquittoBroker,
) -> None:
    """What Mosquitto 2.0 does with a group member that is away (docs/recharge.md): it
    keeps giving it its turn, and that share waits in the member's persistent session
    until it reconnects: nothing is lost, but those recharges are paid back late."""
    seen: dict[str, set[str]] = {"a": set(), "b": set()}

    def handler(node: str):  # type: ignore[no-untyped-def]
        async def handle(event: RechargeEvent) -> None:
            seen[node].add(event.event_id)

        return handle

    listeners = _listeners(broker, handler)
    async with running(listeners["b"]):
        async with running(listeners["a"]):
            pass  # node A subscribed once, then stopped: its session stays
        await _publish(broker, 40)
        await wait_until(lambda: len(seen["b"]) == 20, "B's turns")
        await asyncio.sleep(0.3)
        assert len(seen["b"]) == 20 and not seen["a"]  # A's turns wait for A
        back = _listeners(broker, handler)["a"]
        async with running(back):
            await wait_until(lambda: len(seen["a"]) == 20, "A's share after it returned")
    assert seen["a"].isdisjoint(seen["b"])
    assert seen["a"] | seen["b"] == {make_event(i).event_id for i in range(40)}


async def test_without_a_group_every_node_gets_every_recharge(broker: MosquittoBroker) -> None:
    seen: Counter[str] = Counter()

    async def handle(event: RechargeEvent) -> None:
        seen[event.event_id] += 1

    a = RechargeListener(fast_settings(broker, client_id="eb-node-a"), handle,
                         expected_currency="EGP")
    b = RechargeListener(fast_settings(broker, client_id="eb-node-b"), handle,
                         expected_currency="EGP")
    async with running(a), running(b):
        async with RechargePublisher(broker.host, broker.port, "in-sim",
                                     ack_timeout_s=5.0) as publisher:
            await publisher.publish_many(make_event(i) for i in range(20))
        await wait_until(lambda: sum(seen.values()) == 40, "both nodes got all 20")
    assert set(seen.values()) == {2}
