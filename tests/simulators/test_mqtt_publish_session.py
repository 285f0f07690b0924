"""The sans-IO MQTT 3.1.1 publishing session of the IN simulator."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulators.mqtt_publish_session import (
    PACKET_ID_MAX,
    Acked,
    Connected,
    ConnectionRefused,
    Pong,
    ProtocolViolation,
    PublisherSession,
    State,
    encode_remaining_length,
    encode_string,
)

TOPIC = encode_string("extrabalance/recharge/in-a")
CONNACK_OK = bytes((0x20, 2, 0, 0))


def puback(packet_id: int) -> bytes:
    return bytes((0x40, 2)) + packet_id.to_bytes(2, "big")


def decode_remaining_length(data: bytes) -> tuple[int, int]:
    value = 0
    for used, byte in enumerate(data, start=1):
        value |= (byte & 0x7F) << (7 * (used - 1))
        if not byte & 0x80:
            return value, used
    raise ValueError("incomplete")


def connected(window_max: int = 100) -> PublisherSession:
    session = PublisherSession("in-sim", keepalive_s=30, window_max=window_max)
    session.connect()
    assert session.receive(CONNACK_OK) == [Connected()]
    return session


def test_connect_is_mqtt_311_with_a_clean_session() -> None:
    data = PublisherSession("in-sim-a", keepalive_s=45).connect()
    length, used = decode_remaining_length(data[1:])
    body = data[1 + used :]
    assert data[0] == 0x10 and len(body) == length
    assert body[:6] == b"\x00\x04MQTT" and body[6] == 4
    assert body[7] == 0x02  # clean session, no will, no credentials
    assert int.from_bytes(body[8:10], "big") == 45
    assert body[10:] == encode_string("in-sim-a")


@given(st.integers(min_value=0, max_value=268_435_455))
def test_remaining_length_round_trips(length: int) -> None:
    encoded = encode_remaining_length(length)
    assert 1 <= len(encoded) <= 4
    assert decode_remaining_length(encoded) == (length, len(encoded))


@given(st.binary(max_size=300))
def test_publish_is_qos1_with_topic_packet_id_and_payload(payload: bytes) -> None:
    session = connected()
    packet_id, data = session.publish(TOPIC, payload)
    length, used = decode_remaining_length(data[1:])
    body = data[1 + used :]
    assert data[0] == 0x32 and len(body) == length
    assert body[: len(TOPIC)] == TOPIC
    assert int.from_bytes(body[len(TOPIC) : len(TOPIC) + 2], "big") == packet_id
    assert body[len(TOPIC) + 2 :] == payload


def test_the_window_bounds_publishes_awaiting_puback() -> None:
    session = connected(window_max=3)
    ids = [session.publish(TOPIC, b"x")[0] for _ in range(3)]
    assert len(set(ids)) == 3 and not session.can_publish
    with pytest.raises(RuntimeError, match="window full"):
        session.publish(TOPIC, b"x")
    assert session.receive(puback(ids[1])) == [Acked(ids[1])]
    assert session.can_publish
    assert session.publish(TOPIC, b"x")[0] not in {ids[0], ids[2]}


def test_packet_ids_wrap_around_and_skip_those_in_flight() -> None:
    session = connected(window_max=2)
    first, _ = session.publish(TOPIC, b"x")  # stays in flight throughout
    for _ in range(PACKET_ID_MAX + 5):
        packet_id, _ = session.publish(TOPIC, b"x")
        assert packet_id != first and 1 <= packet_id <= PACKET_ID_MAX
        session.receive(puback(packet_id))


def test_packets_split_anywhere_and_coalesced_are_all_seen() -> None:
    session = PublisherSession("in-sim", window_max=10)
    session.connect()
    stream = CONNACK_OK + puback(1) + bytes((0xD0, 0)) + puback(2)
    events = []
    for i in range(len(stream)):  # one byte at a time
        events += session.receive(stream[i : i + 1])
    assert events == [Connected(), Acked(1), Pong(), Acked(2)]
    assert session.state is State.CONNECTED


def test_a_refused_connection_closes_the_session() -> None:
    session = PublisherSession("in-sim")
    session.connect()
    with pytest.raises(ConnectionRefused) as refused:
        session.receive(bytes((0x20, 2, 0, 5)))  # not authorised
    assert refused.value.return_code == 5 and session.state is State.CLOSED


@pytest.mark.parametrize(
    ("state_bytes", "data"),
    [
        (b"", puback(1)),  # PUBACK before CONNACK
        (CONNACK_OK, CONNACK_OK),  # a second CONNACK
        (CONNACK_OK, bytes((0x30, 3, 0, 1, 0x61))),  # a PUBLISH: we subscribe to nothing
        (CONNACK_OK, bytes((0x40, 3, 0, 1, 0))),  # PUBACK of the wrong length
        (CONNACK_OK, bytes((0x41, 2, 0, 1))),  # PUBACK with reserved flags set
        (CONNACK_OK, bytes((0x40, 0xFF, 0xFF, 0xFF, 0xFF, 0x01))),  # 5-byte length
    ],
)
def test_anything_a_publisher_may_not_receive_is_a_violation(
    state_bytes: bytes, data: bytes
) -> None:
    session = PublisherSession("in-sim")
    session.connect()
    session.receive(state_bytes)
    with pytest.raises(ProtocolViolation):
        session.receive(data)
    assert session.state is State.CLOSED


@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_session(data: bytes) -> None:
    session = PublisherSession("in-sim")
    session.connect()
    try:
        events = session.receive(data)
    except ProtocolViolation:
        assert session.state is State.CLOSED
    else:
        assert all(isinstance(e, Connected | Acked | Pong) for e in events)


def test_a_forgotten_packet_id_is_free_and_its_late_puback_harmless() -> None:
    session = connected(window_max=1)
    packet_id, _ = session.publish(TOPIC, b"x")
    session.forget(packet_id)
    assert session.can_publish
    assert session.receive(puback(packet_id)) == [Acked(packet_id)]
    assert session.state is State.CONNECTED
