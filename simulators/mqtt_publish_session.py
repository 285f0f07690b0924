"""An MQTT 3.1.1 publishing session at QoS 1, sans-IO: bytes in, bytes and events out.

What this file owns: the wire format of the few packets a QoS 1 publisher exchanges
with its broker (CONNECT, PUBLISH, PINGREQ and DISCONNECT out; CONNACK, PUBACK and
PINGRESP in), the packet identifiers of the PUBLISHes awaiting their PUBACK, and the
session's state. It does no I/O and reads no clock; `simulators/recharge_publisher.py`
adapts it to asyncio (connection, timers, retries).

Why not paho: the IN simulator publishes thousands of recharges a second and paho
(through aiomqtt) spent most of the simulator's CPU on it: a message object with a
`threading.Condition` per publish, an asyncio timeout per wait, one `send()` per packet.
This session encodes a PUBLISH in a few byte operations and leaves batching the writes
to its adapter. It is for the simulator only: the node keeps aiomqtt.

Theory of operation
-------------------
* **Only what a QoS 1 publisher needs.** No subscriptions, no QoS 2, no MQTT 5, no
  will. Any packet the broker may not send to such a client (MQTT 3.1.1 §3) is a
  protocol violation: the session closes and the adapter drops the connection.
* **Clean session, so no resend within a session.** The adapter re-publishes whatever
  had no PUBACK on a new connection with a new packet identifier; the receiver absorbs
  the duplicate by `event_id`. So the DUP flag is never set.
* **A bounded window.** At most `window_max` PUBLISHes await their PUBACK; `publish`
  refuses beyond it (the adapter queues). Identifiers are taken round-robin from
  1..65535, skipping those still in flight.
* **Transitions are a table** (`TRANSITIONS`): (state, packet type received) → new
  state. A pair missing from it is a protocol violation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "Acked",
    "Connected",
    "ConnectionRefused",
    "Event",
    "Pong",
    "ProtocolViolation",
    "PublisherSession",
    "State",
]

PACKET_ID_MAX = 65_535
REMAINING_LENGTH_MAX = 268_435_455  # four varint bytes (§2.2.3)
PROTOCOL_LEVEL_311 = 4

# Packet types (§2.2.1), the high nibble of the first byte.
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

PUBLISH_QOS1 = (PUBLISH << 4) | 0x02  # DUP 0, QoS 1, RETAIN 0
CONNECT_FLAG_CLEAN_SESSION = 0x02
PINGREQ_BYTES = bytes((PINGREQ << 4, 0))
DISCONNECT_BYTES = bytes((DISCONNECT << 4, 0))


class State(enum.Enum):
    CONNECTING = "connecting"  # CONNECT sent, waiting for CONNACK
    CONNECTED = "connected"
    CLOSED = "closed"  # refused, violated or disconnected: make a new session


# (state, packet type received) -> state after it. Anything else is a violation.
TRANSITIONS: dict[tuple[State, int], State] = {
    (State.CONNECTING, CONNACK): State.CONNECTED,
    (State.CONNECTED, PUBACK): State.CONNECTED,
    (State.CONNECTED, PINGRESP): State.CONNECTED,
}


class ProtocolViolation(ConnectionError):
    """The broker sent something a QoS 1 publisher cannot accept; drop the connection."""


class ConnectionRefused(ProtocolViolation):
    """CONNACK with a non-zero return code (§3.2.2.3)."""

    def __init__(self, return_code: int) -> None:
        super().__init__(f"broker refused the connection: CONNACK return code {return_code}")
        self.return_code = return_code


@dataclass(frozen=True, slots=True)
class Connected:
    """CONNACK accepted: PUBLISHes may go out."""


@dataclass(frozen=True, slots=True)
class Acked:
    """PUBACK for the PUBLISH that carried `packet_id`."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class Pong:
    """PINGRESP: the broker is alive."""


Event = Connected | Acked | Pong
_PONG = Pong()
_CONNECTED = Connected()


def encode_remaining_length(length: int) -> bytes:
    """The variable-length integer of a fixed header (§2.2.3)."""
    if not 0 <= length <= REMAINING_LENGTH_MAX:
        raise ValueError(f"remaining length {length} outside 0..{REMAINING_LENGTH_MAX}")
    out = bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(out)


def encode_string(text: str | bytes) -> bytes:
    """A UTF-8 string with its two-byte length prefix (§1.5.3)."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > 0xFFFF:
        raise ValueError("MQTT strings are at most 65535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def encode_connect(client_id: str, keepalive_s: int) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session, no will, no credentials."""
    if not 0 <= keepalive_s <= 0xFFFF:
        raise ValueError("keepalive_s must be in 0..65535")
    body = (
        encode_string("MQTT")
        + bytes((PROTOCOL_LEVEL_311, CONNECT_FLAG_CLEAN_SESSION))
        + keepalive_s.to_bytes(2, "big")
        + encode_string(client_id)
    )
    return bytes((CONNECT << 4,)) + encode_remaining_length(len(body)) + body


def encode_publish(topic: bytes, packet_id: int, payload: bytes) -> bytes:
    """PUBLISH at QoS 1; `topic` already carries its length prefix (`encode_string`)."""
    length = len(topic) + 2 + len(payload)
    return b"".join(
        (
            bytes((PUBLISH_QOS1,)),
            encode_remaining_length(length),
            topic,
            packet_id.to_bytes(2, "big"),
            payload,
        )
    )


class PublisherSession:
    """One connection's worth of MQTT 3.1.1 publishing state (create one per connection).

    Call :meth:`connect` and send its bytes; feed every byte received to
    :meth:`receive`, which returns the events they complete; :meth:`publish` returns the
    packet identifier and the bytes to send.
    """

    def __init__(self, client_id: str, *, keepalive_s: int = 30, window_max: int = 100) -> None:
        if not 1 <= window_max <= PACKET_ID_MAX:
            raise ValueError(f"window_max must be in 1..{PACKET_ID_MAX}")
        self.client_id = client_id
        self.keepalive_s = keepalive_s
        self.window_max = window_max
        self.state = State.CONNECTING
        self.in_flight: set[int] = set()  # packet identifiers awaiting PUBACK
        self._next_id = 1
        self._buffer = bytearray()
        self._connect_sent = False

    @property
    def can_publish(self) -> bool:
        return self.state is State.CONNECTED and len(self.in_flight) < self.window_max

    def connect(self) -> bytes:
        if self._connect_sent:
            raise RuntimeError("CONNECT is sent once per session")
        self._connect_sent = True
        return encode_connect(self.client_id, self.keepalive_s)

    def publish(self, topic: bytes, payload: bytes) -> tuple[int, bytes]:
        """(packet identifier, PUBLISH bytes). `topic` as made by `encode_string`."""
        if self.state is not State.CONNECTED:
            raise RuntimeError(f"cannot publish in state {self.state.value}")
        if len(self.in_flight) >= self.window_max:
            raise RuntimeError("window full: wait for a PUBACK")
        packet_id = self._next_id
        while packet_id in self.in_flight:  # terminates: the window is below 65535
            packet_id = packet_id % PACKET_ID_MAX + 1
        self._next_id = packet_id % PACKET_ID_MAX + 1
        self.in_flight.add(packet_id)
        return packet_id, encode_publish(topic, packet_id, payload)

    def forget(self, packet_id: int) -> None:
        """Stop waiting for this PUBACK (its publish gave up); a late one is ignored."""
        self.in_flight.discard(packet_id)

    def ping(self) -> bytes:
        return PINGREQ_BYTES

    def disconnect(self) -> bytes:
        self.state = State.CLOSED
        return DISCONNECT_BYTES

    def receive(self, data: bytes) -> list[Event]:
        """Every event the bytes complete. Raises ProtocolViolation (the session is then
        CLOSED) on anything a QoS 1 publisher may not receive."""
        buffer = self._buffer
        buffer += data
        events: list[Event] = []
        position = 0
        end = len(buffer)
        try:
            while end - position >= 2:
                first = buffer[position]
                # Remaining length: 1-4 bytes, 7 bits each, high bit = more follows.
                length = 0
                shift = 0
                cursor = position + 1
                while True:
                    if cursor >= end:
                        return events  # the length itself is not complete yet
                    byte = buffer[cursor]
                    length |= (byte & 0x7F) << shift
                    cursor += 1
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise self._violation("remaining length longer than four bytes")
                if end - cursor < length:
                    return events  # wait for the rest of the packet
                body = bytes(buffer[cursor : cursor + length])
                position = cursor + length
                events.append(self._packet(first, body))
            return events
        finally:
            del buffer[:position]

    def _packet(self, first: int, body: bytes) -> Event:
        packet_type = first >> 4
        state = TRANSITIONS.get((self.state, packet_type))
        if state is None:
            raise self._violation(f"packet type {packet_type} in state {self.state.value}")
        if packet_type == PUBACK:
            if first != PUBACK << 4 or len(body) != 2:
                raise self._violation("malformed PUBACK")
            packet_id = int.from_bytes(body, "big")
            # A PUBACK for an identifier we gave up on (forget) is ignored.
            self.in_flight.discard(packet_id)
            return Acked(packet_id)
        if packet_type == PINGRESP:
            if first != PINGRESP << 4 or body:
                raise self._violation("malformed PINGRESP")
            return _PONG
        # CONNACK
        if first != CONNACK << 4 or len(body) != 2:
            raise self._violation("malformed CONNACK")
        if body[1] != 0:
            self.state = State.CLOSED
            raise ConnectionRefused(body[1])
        self.state = state
        return _CONNECTED

    def _violation(self, reason: str) -> ProtocolViolation:
        self.state = State.CLOSED
        return ProtocolViolation(reason)
