"""The recharge publisher (IN simulator): at-least-once, bounded waits."""

from __future__ import annotations

import asyncio
from typing import Self

import pytest

from extrabalance.recharge.events import RechargeEvent, parse_recharge
from extrabalance.recharge.listener import RechargeListener
from simulators.recharge_publisher import PublishDeadlineExceeded, RechargePublisher
from tests.mqtt_broker import MosquittoBroker
from tests.recharge.support import fast_settings, make_event, running, wait_until


async def test_every_event_reaches_a_subscriber_across_a_broker_restart(
    broker: MosquittoBroker,
) -> None:
    received: set[str] = set()

    async def handle(event: RechargeEvent) -> None:
        received.add(event.event_id)

    # The observer is the node's listener: a persistent session that acknowledges only
    # after its handler. (aiomqtt acknowledges on receipt and drops what it had queued
    # when the connection goes, so it would lose events the publisher got PUBACKs for.)
    observer = RechargeListener(fast_settings(broker, "observer"), handle,
                                expected_currency="EGP")
    async with running(observer):
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
        await wait_until(lambda: len(received) == 2000, "every event observed")
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


class _FakeBroker:
    """Just enough of an MQTT 3.1.1 broker to watch a publisher's window and retries:
    CONNACK to every CONNECT; PUBACKs held back until the publisher has sent all it
    may (`hold_s` without a new PUBLISH), or never on the first `silent_connections`."""

    def __init__(self, *, hold_s: float = 0.02, silent_connections: int = 0) -> None:
        self.hold_s = hold_s
        self.silent_connections = silent_connections
        self.connections = 0
        self.payloads: list[bytes] = []
        self.unacked_max = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        silent = self.connections <= self.silent_connections
        unacked: list[int] = []
        try:
            while True:
                try:
                    first, body = await asyncio.wait_for(self._packet(reader), self.hold_s)
                except TimeoutError:
                    if not silent:  # the publisher waits: acknowledge all it sent
                        writer.write(b"".join(bytes((0x40, 2)) + i.to_bytes(2, "big")
                                              for i in unacked))
                        unacked.clear()
                    continue
                if first >> 4 == 1:
                    writer.write(bytes((0x20, 2, 0, 0)))
                elif first >> 4 == 3:
                    topic_length = int.from_bytes(body[:2], "big")
                    packet_id = int.from_bytes(body[2 + topic_length : 4 + topic_length], "big")
                    self.payloads.append(body[4 + topic_length :])
                    unacked.append(packet_id)
                    self.unacked_max = max(self.unacked_max, len(unacked))
                elif first >> 4 == 12:
                    writer.write(bytes((0xD0, 0)))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    @staticmethod
    async def _packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
        first = (await reader.readexactly(1))[0]
        length, shift = 0, 0
        while True:
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return first, await reader.readexactly(length)


async def test_publishes_are_pipelined_up_to_the_window_and_no_further() -> None:
    async with _FakeBroker() as fake, RechargePublisher(
        "127.0.0.1", fake.port, "in-sim", window_max=8
    ) as publisher:
        async with asyncio.timeout(10):
            # More concurrent publishes than the window: the rest wait for a slot.
            await asyncio.gather(*(publisher.publish(make_event(i)) for i in range(50)))
    assert fake.unacked_max == 8
    assert len(fake.payloads) == 50 and publisher.counts["published"] == 50
    assert publisher.counts["retries"] == 0 and fake.connections == 1


async def test_a_missing_puback_is_retried_on_a_new_connection_until_it_comes() -> None:
    async with _FakeBroker(silent_connections=2) as fake, RechargePublisher(
        "127.0.0.1", fake.port, "in-sim", window_max=4, ack_timeout_s=0.2,
        backoff_initial_s=0.01, backoff_max_s=0.02,
    ) as publisher:
        async with asyncio.timeout(10):
            assert await publisher.publish_many(make_event(i) for i in range(10)) == 10
    assert fake.connections == 3
    # Every event reached the broker at least once on the connection that acked it,
    # and the four in flight on each silent connection were sent again (at least once).
    sent = [parse_recharge(p, expected_currency="EGP").event_id for p in fake.payloads]
    assert set(sent) == {make_event(i).event_id for i in range(10)}
    assert len(sent) == 10 + 4 * 2
    assert publisher.counts["retries"] == 4 * 2 and publisher.counts["published"] == 10


async def test_a_broker_that_goes_quiet_is_noticed_by_ping() -> None:
    async with _FakeBroker(silent_connections=0) as fake:
        publisher = RechargePublisher(
            "127.0.0.1", fake.port, "in-sim", ack_timeout_s=0.2, keepalive_s=1
        )
        await publisher.publish(make_event(1))
        await asyncio.sleep(0.8)  # idle past keepalive / 2: a PINGREQ keeps it alive
        await publisher.publish(make_event(2))
        assert fake.connections == 1
        await publisher.close()


def test_the_publisher_runs_on_uvloop() -> None:
    # The IN simulator's process runs uvloop, whose transports are not asyncio's classes.
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test_publishes_are_pipelined_up_to_the_window_and_no_further())
