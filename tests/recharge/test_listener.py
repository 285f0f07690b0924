"""The recharge listener against a real private Mosquitto: ack after the handler,
in receipt order; redelivery after failures; nothing lost across restarts."""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections import Counter

import aiomqtt
import paho.mqtt.client as paho
import pytest

from extrabalance.recharge.events import RechargeEvent, to_payload
from extrabalance.recharge.listener import (
    DEAD_LETTER_PAYLOAD_MAX_BYTES,
    MqttSettings,
    RechargeListener,
)
from simulators.recharge_publisher import RechargePublisher
from tests.mqtt_broker import MosquittoBroker
from tests.recharge.support import fast_settings, make_event, running, wait_until


def publisher_for(broker: MosquittoBroker) -> RechargePublisher:
    return RechargePublisher(broker.host, broker.port, "in-sim", ack_timeout_s=1.0)


async def test_acks_in_receipt_order_while_handlers_run_concurrently(
    broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    received_mids: list[int] = []
    acked_mids: list[int] = []
    original_on_message = paho.Client._handle_on_message
    original_ack = paho.Client.ack

    def record_receipt(self: paho.Client, message: paho.MQTTMessage) -> None:
        if message.topic.startswith("extrabalance/recharge/in-"):
            received_mids.append(message.mid)
        original_on_message(self, message)

    def record_ack(self: paho.Client, mid: int, qos: int) -> paho.MQTTErrorCode:
        acked_mids.append(mid)
        return original_ack(self, mid, qos)

    monkeypatch.setattr(paho.Client, "_handle_on_message", record_receipt)
    monkeypatch.setattr(paho.Client, "ack", record_ack)

    started: list[str] = []  # handlers start in receipt order
    handled: list[str] = []
    running_now = 0
    running_max = 0
    rng = random.Random(7)

    async def handle(event: RechargeEvent) -> None:
        nonlocal running_now, running_max
        started.append(event.event_id)
        running_now += 1
        running_max = max(running_max, running_now)
        # Random commit times, so later messages often finish before earlier ones.
        await asyncio.sleep(rng.uniform(0, 0.02))
        running_now -= 1
        handled.append(event.event_id)

    listener = RechargeListener(fast_settings(broker), handle, expected_currency="EGP")
    async with running(listener), publisher_for(broker) as publisher:
        await publisher.publish_many(make_event(i) for i in range(200))
        await wait_until(lambda: listener.stats()["acked"] == 200, "200 acks")

    assert sorted(handled) == sorted(make_event(i).event_id for i in range(200))
    assert handled != started, "handlers finished in receipt order; nothing to reorder"
    assert running_max > 1
    assert acked_mids == received_mids
    assert listener.stats()["handled"] == 200


async def test_no_ack_until_the_handler_returns(broker: MosquittoBroker) -> None:
    # The first delivery is still inside its handler when the broker goes away. Had
    # the client acknowledged on receipt, the broker would not deliver it again.
    release = asyncio.Event()
    calls: list[str] = []

    async def handle(event: RechargeEvent) -> None:
        calls.append(event.event_id)
        if len(calls) == 1:
            await release.wait()

    listener = RechargeListener(fast_settings(broker), handle, expected_currency="EGP")
    async with running(listener):
        async with publisher_for(broker) as publisher:
            await publisher.publish(make_event(1))
        await wait_until(lambda: len(calls) == 1, "first delivery in the handler")
        assert listener.stats()["acked"] == 0
        await asyncio.to_thread(broker.stop)  # graceful: the session is saved
        release.set()
        await asyncio.to_thread(broker.start)
        await wait_until(lambda: len(calls) == 2, "redelivery after the broker restart")
        await wait_until(lambda: listener.stats()["connected"] is True, "reconnected")

    assert calls == [make_event(1).event_id] * 2
    assert listener.stats()["reconnects"] >= 1
    assert listener.stats()["redelivered"] == 1  # the broker flagged the re-send DUP


@pytest.mark.parametrize("protocol_version", [4, 5])
async def test_a_failed_handler_gets_the_message_again(
    broker: MosquittoBroker, protocol_version: int
) -> None:
    attempts: Counter[str] = Counter()
    committed: set[str] = set()
    failing = make_event(2).event_id

    async def handle(event: RechargeEvent) -> None:
        attempts[event.event_id] += 1
        if event.event_id == failing and attempts[failing] == 1:
            raise RuntimeError("ledger unavailable")
        committed.add(event.event_id)  # idempotent, like the ledger

    settings = fast_settings(broker, protocol_version=protocol_version)
    listener = RechargeListener(settings, handle, expected_currency="EGP")
    expected = {make_event(i).event_id for i in range(1, 6)}
    async with running(listener), publisher_for(broker) as publisher:
        await publisher.publish_many((make_event(i) for i in range(1, 6)), window_max=1)
        await wait_until(lambda: committed == expected, "all five committed")

    assert attempts[failing] == 2
    assert attempts[make_event(1).event_id] == 1  # acked before the failure: not resent
    stats = listener.stats()
    assert stats["handler_failures"] == 1
    assert stats["reconnects"] >= 1
    assert stats["redelivered"] >= 1


async def test_invalid_payloads_go_to_the_dead_letter_topic(broker: MosquittoBroker) -> None:
    handled: list[str] = []
    invalid: list[tuple[bytes, str, str]] = []

    async def handle(event: RechargeEvent) -> None:
        handled.append(event.event_id)

    settings = fast_settings(broker)
    listener = RechargeListener(
        settings,
        handle,
        expected_currency="EGP",
        on_invalid=lambda payload, topic, reason: invalid.append((payload, topic, reason)),
    )
    usd = to_payload(make_event(9)).replace(b'"EGP"', b'"USD"')
    bad = [b"garbage", b"\xff\xfe\x00", usd]
    dead: list[dict[str, str]] = []
    async with aiomqtt.Client(broker.host, broker.port) as observer:
        await observer.subscribe(settings.dead_letter_topic, qos=1)
        async with running(listener), publisher_for(broker) as publisher:
            await publisher.publish_payload("in-a", bad[0])
            await publisher.publish(make_event(1))
            await publisher.publish_payload("in-a", bad[1])
            await publisher.publish_payload("in-b", bad[2])
            await publisher.publish(make_event(2))
            async with asyncio.timeout(20):
                async for message in observer.messages:
                    assert isinstance(message.payload, bytes)
                    dead.append(json.loads(message.payload))
                    if len(dead) == 3:
                        break
            await wait_until(lambda: listener.stats()["acked"] >= 8, "all acked")
            assert listener.stats()["connected"] is True

    assert handled == [make_event(1).event_id, make_event(2).event_id]
    assert [base64.b64decode(d["payload_b64"]) for d in dead] == bad
    assert [d["topic"] for d in dead] == [
        "extrabalance/recharge/in-a",
        "extrabalance/recharge/in-a",
        "extrabalance/recharge/in-b",
    ]
    assert "not JSON" in dead[0]["reason"]
    assert "not UTF-8" in dead[1]["reason"]
    assert "'USD'" in dead[2]["reason"]
    assert [(p, r) for p, _, r in invalid] == [
        (base64.b64decode(d["payload_b64"]), d["reason"]) for d in dead
    ]
    stats = listener.stats()
    assert (stats["received"], stats["invalid"], stats["dead_lettered"]) == (5, 3, 3)
    # 5 recharge messages + our own 3 dead letters (matched by the wildcard, skipped)
    assert stats["acked"] == 8


@pytest.mark.parametrize("protocol_version", [4, 5])
async def test_events_published_while_the_node_is_down_arrive_after_start(
    broker: MosquittoBroker, protocol_version: int
) -> None:
    count = 1000 if protocol_version == 4 else 200
    seen: Counter[str] = Counter()

    async def handle(event: RechargeEvent) -> None:
        seen[event.event_id] += 1

    settings = fast_settings(broker, protocol_version=protocol_version)
    first = RechargeListener(settings, handle, expected_currency="EGP")
    async with running(first):
        pass  # creates the persistent session, then the node stops
    async with publisher_for(broker) as publisher:
        await publisher.publish_many(make_event(i) for i in range(count))

    second = RechargeListener(settings, handle, expected_currency="EGP")
    async with running(second):
        await wait_until(lambda: len(seen) == count, f"{count} events handled")
        await wait_until(lambda: second.stats()["acked"] == count, "all acked")
    assert set(seen) == {make_event(i).event_id for i in range(count)}


async def test_broker_restart_mid_stream_loses_nothing(broker: MosquittoBroker) -> None:
    seen: Counter[str] = Counter()

    async def handle(event: RechargeEvent) -> None:
        seen[event.event_id] += 1

    listener = RechargeListener(fast_settings(broker), handle, expected_currency="EGP")
    async with running(listener), publisher_for(broker) as publisher:
        publishing = asyncio.create_task(
            publisher.publish_many((make_event(i) for i in range(1000)), window_max=20)
        )
        await wait_until(lambda: len(seen) >= 300, "a third handled")
        await asyncio.to_thread(broker.restart)
        assert await publishing == 1000
        await wait_until(lambda: len(seen) == 1000, "all 1000 handled")
    assert set(seen) == {make_event(i).event_id for i in range(1000)}
    assert listener.stats()["reconnects"] >= 1
    print(f"duplicates seen by the handler: {sum(seen.values()) - len(seen)}")


def test_settings_refuse_what_would_break_the_guarantees() -> None:
    with pytest.raises(ValueError, match="client_id"):
        MqttSettings(client_id="")
    with pytest.raises(ValueError, match="dead_letter_topic"):
        MqttSettings(dead_letter_topic="extrabalance/recharge/#")
    with pytest.raises(ValueError, match="protocol_version"):
        MqttSettings(protocol_version=3)
    with pytest.raises(ValueError, match="inflight_max"):
        MqttSettings(inflight_max=0)
    with pytest.raises(ValueError, match="session_expiry_s"):
        MqttSettings(session_expiry_s=0)


async def test_a_handler_over_its_time_limit_counts_as_failed(broker: MosquittoBroker) -> None:
    attempts: Counter[str] = Counter()

    async def handle(event: RechargeEvent) -> None:
        attempts[event.event_id] += 1
        if attempts[event.event_id] == 1:
            await asyncio.sleep(10)  # a hung ledger call

    settings = fast_settings(broker, handle_timeout_s=0.2)
    listener = RechargeListener(settings, handle, expected_currency="EGP")
    async with running(listener), publisher_for(broker) as publisher:
        await publisher.publish(make_event(1))
        await wait_until(lambda: listener.stats()["acked"] == 1, "acked on the second attempt")
    assert attempts[make_event(1).event_id] == 2
    assert listener.stats()["handler_failures"] == 1


async def test_stop_finishes_and_acks_running_handlers(broker: MosquittoBroker) -> None:
    started = asyncio.Event()
    seen: Counter[str] = Counter()

    async def slow_commit(event: RechargeEvent) -> None:
        started.set()
        await asyncio.sleep(0.2)
        seen[event.event_id] += 1

    settings = fast_settings(broker)
    listener = RechargeListener(settings, slow_commit, expected_currency="EGP")
    task = asyncio.create_task(listener.run())
    await wait_until(lambda: bool(listener.stats()["connected"]), "subscribed")
    async with publisher_for(broker) as publisher:
        await publisher.publish_many(make_event(i) for i in range(5))
    await started.wait()
    await listener.stop()
    await asyncio.wait_for(task, 10)
    stats = listener.stats()
    assert stats["acked"] == stats["handled"]
    assert stats["connected"] is False

    # Whatever the first run acknowledged is not delivered again; the rest is.
    again = RechargeListener(settings, slow_commit, expected_currency="EGP")
    async with running(again):
        await wait_until(lambda: len(seen) == 5, "all five handled")
    assert sum(seen.values()) == 5, "an acknowledged event was delivered twice"


async def test_the_listener_waits_for_a_broker_that_is_not_up_yet(
    broker: MosquittoBroker,
) -> None:
    broker.stop()
    handled: list[str] = []

    async def handle(event: RechargeEvent) -> None:
        handled.append(event.event_id)

    listener = RechargeListener(fast_settings(broker), handle, expected_currency="EGP")
    task = asyncio.create_task(listener.run())
    await wait_until(lambda: listener.stats()["reconnects"] >= 2, "two refused attempts")
    assert listener.stats()["connected"] is False
    await asyncio.to_thread(broker.start)
    await wait_until(lambda: bool(listener.stats()["connected"]), "connected")
    async with publisher_for(broker) as publisher:
        await publisher.publish(make_event(1))
    await wait_until(lambda: handled == [make_event(1).event_id], "handled")
    await listener.stop()
    await asyncio.wait_for(task, 10)


async def test_a_raising_on_invalid_callback_does_not_stop_the_listener(
    broker: MosquittoBroker,
) -> None:
    handled: list[str] = []

    async def handle(event: RechargeEvent) -> None:
        handled.append(event.event_id)

    def broken_callback(payload: bytes, topic: str, reason: str) -> None:
        raise RuntimeError("metrics backend down")

    listener = RechargeListener(
        fast_settings(broker), handle, expected_currency="EGP", on_invalid=broken_callback
    )
    async with running(listener), publisher_for(broker) as publisher:
        await publisher.publish_payload("in-a", b"{}")
        await publisher.publish(make_event(1))
        await wait_until(lambda: handled == [make_event(1).event_id], "valid event handled")
    assert listener.stats()["dead_lettered"] == 1
    assert listener.stats()["reconnects"] == 0


async def test_stop_before_run_is_not_lost(broker: MosquittoBroker) -> None:
    async def handle(event: RechargeEvent) -> None:
        raise AssertionError("never called")

    listener = RechargeListener(fast_settings(broker), handle, expected_currency="EGP")
    await listener.stop()  # e.g. a shutdown that races the start-up
    await asyncio.wait_for(listener.run(), 5)
    assert listener.stats()["connected"] is False


async def test_recharges_from_unknown_or_impersonated_ins_are_dead_lettered(
    broker: MosquittoBroker,
) -> None:
    """Issue 22, finding 2: an `in_node` that is no configured IN (here a spreadsheet
    formula) was handled and became the subscriber's learned route. Now it is dead-
    lettered with the reason, as is an IN speaking on another IN's topic; and a huge
    payload's dead letter carries its first bytes and its real size, not all of it."""
    handled: list[str] = []

    async def handle(event: RechargeEvent) -> None:
        handled.append(event.event_id)

    settings = fast_settings(broker)
    listener = RechargeListener(settings, handle, expected_currency="EGP",
                                in_nodes=frozenset({"in-a", "in-b"}))
    formula = to_payload(make_event(1, in_node="=cmd|' /C calc'!A0"))
    impostor = to_payload(make_event(2, in_node="in-b"))
    huge = b"x" * 1_000_000
    dead: list[dict[str, object]] = []
    async with aiomqtt.Client(broker.host, broker.port) as observer:
        await observer.subscribe(settings.dead_letter_topic, qos=1)
        async with running(listener), publisher_for(broker) as publisher:
            await publisher.publish_payload("in-a", formula)
            await publisher.publish_payload("in-a", impostor)  # in-b's event on in-a's topic
            await publisher.publish_payload("in-a", huge)
            await publisher.publish(make_event(3, in_node="in-b"))
            async with asyncio.timeout(20):
                async for message in observer.messages:
                    assert isinstance(message.payload, bytes)
                    dead.append(json.loads(message.payload))
                    if len(dead) == 3:
                        break
            await wait_until(lambda: listener.stats()["handled"] >= 1, "the valid event")

    assert handled == [make_event(3, in_node="in-b").event_id]
    assert "is not a configured IN node" in str(dead[0]["reason"])
    assert "does not match the topic" in str(dead[1]["reason"])
    assert base64.b64decode(str(dead[0]["payload_b64"])) == formula
    assert dead[2]["payload_size"] == 1_000_000 and dead[2]["payload_truncated"] is True
    assert len(base64.b64decode(str(dead[2]["payload_b64"]))) == DEAD_LETTER_PAYLOAD_MAX_BYTES
