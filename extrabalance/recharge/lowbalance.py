"""Low-balance notifications from the IN (MQTT) → the `ad_low_balance` advertisement.

What this file owns: the low-balance event and its wire format, and the node's
subscriber for it. Topic `extrabalance/lowbalance/<in_node>`, QoS 1, UTF-8 JSON:

    {"event_id": "IN-A-LB-000123", "msisdn": "201001234567", "balance_minor": 35,
     "in_node": "in-a.operator.example", "timestamp": "2026-11-25T10:15:00Z"}

The subscriber is the recharge listener's machinery (persistent session, manual
PUBACK after the handler returned, acks in receipt order, dead-lettering, reconnect
with backoff) with this payload instead of a recharge. The handler returns only once
the ad decision is committed in the ledger, so a message is acknowledged only after
its decision is durable; `event_id` makes a redelivered message a no-op (the first
decision is replayed, no second SMS). It needs its own MQTT client id: two sessions
with one id would take each other's connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import structlog

# The field validators are shared with the recharge format on purpose: one definition
# of a valid MSISDN, event id and timestamp for every IN message.
from extrabalance.recharge.events import (
    AMOUNT_MAX_MINOR,
    EVENT_ID_MAX_CHARS,
    IN_NODE_MAX_CHARS,
    PAYLOAD_MAX_BYTES,
    InvalidRecharge,
    _integer,
    _msisdn,
    _object_without_duplicate_keys,
    _reject_constant,
    _required,
    _string,
    _timestamp,
)
from extrabalance.recharge.listener import MqttSettings, RechargeListener

__all__ = [
    "InvalidLowBalance",
    "LowBalanceEvent",
    "LowBalanceListener",
    "low_balance_payload",
    "parse_low_balance",
]

log = structlog.get_logger(__name__)

LOW_BALANCE_TOPICS = ("extrabalance/lowbalance/+",)
LOW_BALANCE_DEAD_LETTER_TOPIC = "extrabalance/lowbalance/dead"


class InvalidLowBalance(InvalidRecharge):
    """A payload that is not a low-balance event (dead-lettered like a bad recharge)."""


@dataclass(frozen=True, slots=True)
class LowBalanceEvent:
    event_id: str  # unique per IN: the idempotency key
    msisdn: str
    balance_minor: int
    in_node: str
    timestamp: datetime  # aware, UTC


def parse_low_balance(payload: bytes) -> LowBalanceEvent:
    """Decode and validate one payload; raises `InvalidLowBalance` (a reason for
    humans) for anything else, never another exception."""
    try:
        if len(payload) > PAYLOAD_MAX_BYTES:
            raise InvalidLowBalance(f"payload is {len(payload)} bytes, over {PAYLOAD_MAX_BYTES}")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidLowBalance(f"payload is not UTF-8 (byte {exc.start})") from None
        try:
            obj = json.loads(text, object_pairs_hook=_object_without_duplicate_keys,
                             parse_constant=_reject_constant)
        except InvalidRecharge:
            raise
        except (ValueError, RecursionError) as exc:
            raise InvalidLowBalance(f"payload is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise InvalidLowBalance(f"payload must be a JSON object, got {type(obj).__name__}")
        event_id = _string(obj, "event_id", EVENT_ID_MAX_CHARS)
        msisdn = _msisdn(obj)
        balance_minor = _integer(_required(obj, "balance_minor"), "balance_minor")
        if abs(balance_minor) > AMOUNT_MAX_MINOR:
            raise InvalidLowBalance(f"field 'balance_minor' is over the bound {AMOUNT_MAX_MINOR}")
        in_node = _string(obj, "in_node", IN_NODE_MAX_CHARS)
        timestamp = _timestamp(obj)
    except InvalidLowBalance:
        raise
    except InvalidRecharge as exc:  # the shared validators raise the recharge error
        raise InvalidLowBalance(exc.reason) from None
    return LowBalanceEvent(event_id, msisdn, balance_minor, in_node, timestamp)


def low_balance_payload(event: LowBalanceEvent) -> bytes:
    """The wire form (for the IN simulator, tests and benchmarks)."""
    stamp = event.timestamp.isoformat().replace("+00:00", "Z")
    return json.dumps({"event_id": event.event_id, "msisdn": event.msisdn,
                       "balance_minor": event.balance_minor, "in_node": event.in_node,
                       "timestamp": stamp}, separators=(",", ":")).encode("utf-8")


def low_balance_settings(base: MqttSettings, topics: tuple[str, ...] = LOW_BALANCE_TOPICS,
                         dead_letter_topic: str = LOW_BALANCE_DEAD_LETTER_TOPIC) -> MqttSettings:
    """The recharge session's broker settings with this subscriber's own client id
    and topics."""
    return replace(base, client_id=f"{base.client_id}-lowbalance", topics=tuple(topics),
                   dead_letter_topic=dead_letter_topic)


class LowBalanceListener(RechargeListener):
    """`handle(event)` must return only once the ad decision is committed."""

    def __init__(
        self,
        settings: MqttSettings,
        handle: Callable[[LowBalanceEvent], Awaitable[Any]],
        *,
        on_invalid: Callable[[bytes, str, str], None] | None = None,
    ) -> None:
        # The currency check of the recharge parser has no meaning here.
        super().__init__(settings, handle, expected_currency="", on_invalid=on_invalid)  # type: ignore[arg-type]

    async def _process(self, client: aiomqtt.Client, message: paho.MQTTMessage) -> None:
        # Same steps as RechargeListener._process, with this file's parser.
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = "<topic not UTF-8>"
        if topic == self._settings.dead_letter_topic:
            return
        payload = bytes(message.payload)
        self._counts["received"] += 1
        if message.dup:
            self._counts["redelivered"] += 1
        try:
            event = parse_low_balance(payload)
        except InvalidRecharge as exc:
            await self._dead_letter(client, payload, topic, exc.reason)
            return
        try:
            async with asyncio.timeout(self._settings.handle_timeout_s):
                await self._handle(event)  # type: ignore[arg-type]
        except Exception:
            self._counts["handler_failures"] += 1
            log.warning("lowbalance.handler_raised", event_id=event.event_id, topic=topic,
                        exc_info=True)
            raise
        self._counts["handled"] += 1
