"""The recharge event and its wire format (UTF-8 JSON on MQTT).

This module owns the one payload format the prepaid IN publishes on
``extrabalance/recharge/<in_node>`` (see docs/protocols.md, "MQTT"). It is pure: bytes in,
a validated :class:`RechargeEvent` or an :class:`InvalidRecharge` with a reason out,
and the reverse. The node's listener and the bundled recharge publisher (a simulator)
both use it, so the two sides cannot drift apart.

Validation is strict where money or identity is concerned (integer minor units, a
currency that must be the node's, a digits-only MSISDN, an aware timestamp, no
duplicate keys) and lenient about unknown extra keys, so that an IN which adds a
field in a later release is not dead-lettered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "AMOUNT_MAX_MINOR",
    "PAYLOAD_MAX_BYTES",
    "InvalidRecharge",
    "RechargeEvent",
    "origin_problem",
    "parse_recharge",
    "to_payload",
    "topic_matches",
]

# Bounds, named so the reason a payload was refused can say which one it broke.
PAYLOAD_MAX_BYTES = 4096  # a real event is ~200 bytes; anything this big is not one
EVENT_ID_MAX_CHARS = 128
IN_NODE_MAX_CHARS = 255
MSISDN_MIN_DIGITS = 8
MSISDN_MAX_DIGITS = 15  # ITU-T E.164
# 10^12 minor units is ten billion in any two-decimal currency: no single recharge is
# near it, and the bound keeps arithmetic on amounts far away from any overflow in SQL.
AMOUNT_MAX_MINOR = 10**12


class InvalidRecharge(ValueError):
    """A payload that is not a valid recharge event; ``reason`` says why, for humans."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RechargeEvent:
    """One recharge reported by a prepaid IN node.

    ``event_id`` is unique per IN node and is the idempotency key: the same event may
    be delivered more than once (MQTT QoS 1 is at-least-once) and must be applied once.
    """

    event_id: str
    msisdn: str
    amount_minor: int
    currency: str
    balance_after_minor: int | None
    in_node: str
    timestamp: datetime  # aware, normalised to UTC by parse_recharge


def _reject_constant(name: str) -> Any:
    # json accepts NaN/Infinity by default; they are not JSON and never a valid amount.
    raise InvalidRecharge(f"payload is not JSON: {name} is not a JSON value")


def _object_without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python's json keeps the last of duplicate keys silently; for a money message two
    # different "amount" values are an ambiguity we refuse rather than guess at.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidRecharge(f"duplicate key {key!r}")
        result[key] = value
    return result


def _required(obj: dict[str, Any], key: str) -> Any:
    if key not in obj:
        raise InvalidRecharge(f"missing field {key!r}")
    return obj[key]


def _string(obj: dict[str, Any], key: str, max_chars: int) -> str:
    value = _required(obj, key)
    if not isinstance(value, str):
        raise InvalidRecharge(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value or value != value.strip():
        raise InvalidRecharge(f"field {key!r} must be non-empty without surrounding spaces")
    if len(value) > max_chars:
        raise InvalidRecharge(f"field {key!r} is longer than {max_chars} characters")
    if not value.isprintable():
        raise InvalidRecharge(f"field {key!r} contains control characters")
    return value


def _integer(value: Any, key: str) -> int:
    # bool is a subclass of int in Python; `true` is not an amount.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRecharge(
            f"field {key!r} must be an integer count of minor units, got {value!r}"
        )
    return value


def _msisdn(obj: dict[str, Any]) -> str:
    value = _required(obj, "msisdn")
    if not isinstance(value, str):
        raise InvalidRecharge(f"field 'msisdn' must be a string, got {type(value).__name__}")
    # str.isdigit() accepts other scripts' digits (e.g. Arabic-Indic); E.164 is ASCII.
    if not (value.isascii() and value.isdigit()):
        raise InvalidRecharge("field 'msisdn' must contain ASCII digits only")
    if not MSISDN_MIN_DIGITS <= len(value) <= MSISDN_MAX_DIGITS:
        raise InvalidRecharge(
            f"field 'msisdn' must have {MSISDN_MIN_DIGITS} to {MSISDN_MAX_DIGITS} digits,"
            f" got {len(value)}"
        )
    return value


def _timestamp(obj: dict[str, Any]) -> datetime:
    value = _required(obj, "timestamp")
    if not isinstance(value, str):
        raise InvalidRecharge(f"field 'timestamp' must be a string, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRecharge(
            f"field 'timestamp' is not an ISO 8601 date-time: {value!r}"
        ) from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        # A local time without offset is ambiguous across the IN's and the node's zones.
        raise InvalidRecharge("field 'timestamp' has no UTC offset (use 'Z' or '+hh:mm')")
    return parsed.astimezone(UTC)


def parse_recharge(payload: bytes, *, expected_currency: str) -> RechargeEvent:
    """Decode and validate one recharge payload.

    Raises :class:`InvalidRecharge` with a human-readable reason for anything that is
    not a well-formed recharge in ``expected_currency``; never any other exception.
    """
    if len(payload) > PAYLOAD_MAX_BYTES:
        raise InvalidRecharge(f"payload is {len(payload)} bytes, over {PAYLOAD_MAX_BYTES}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRecharge(f"payload is not UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_object_without_duplicate_keys,
            parse_constant=_reject_constant,
        )
    except InvalidRecharge:
        raise
    except (ValueError, RecursionError) as exc:
        raise InvalidRecharge(f"payload is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidRecharge(f"payload must be a JSON object, got {type(obj).__name__}")

    event_id = _string(obj, "event_id", EVENT_ID_MAX_CHARS)
    msisdn = _msisdn(obj)

    amount_minor = _integer(_required(obj, "amount"), "amount")
    if amount_minor <= 0:
        # A recharge adds credit; zero or negative is a correction, not a recharge,
        # and must never trigger a payback.
        raise InvalidRecharge(f"field 'amount' must be positive, got {amount_minor}")
    if amount_minor > AMOUNT_MAX_MINOR:
        raise InvalidRecharge(f"field 'amount' is over the bound {AMOUNT_MAX_MINOR}")

    currency = _required(obj, "currency")
    if not isinstance(currency, str):
        raise InvalidRecharge(f"field 'currency' must be a string, got {type(currency).__name__}")
    if currency != expected_currency:
        raise InvalidRecharge(
            f"field 'currency' is {currency!r}, this node handles {expected_currency!r}"
        )

    balance_after_minor: int | None = None
    raw_balance = obj.get("balance_after")
    if raw_balance is not None:
        # Optional. Negative values are accepted: some INs let a balance go below zero
        # (emergency credit), and the number is informational for recovery.
        balance_after_minor = _integer(raw_balance, "balance_after")
        if abs(balance_after_minor) > AMOUNT_MAX_MINOR:
            raise InvalidRecharge(f"field 'balance_after' is over the bound {AMOUNT_MAX_MINOR}")

    in_node = _string(obj, "in_node", IN_NODE_MAX_CHARS)
    timestamp = _timestamp(obj)
    return RechargeEvent(
        event_id=event_id,
        msisdn=msisdn,
        amount_minor=amount_minor,
        currency=currency,
        balance_after_minor=balance_after_minor,
        in_node=in_node,
        timestamp=timestamp,
    )


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether an MQTT topic filter (`+`, `#` wildcards) matches a topic name. Pure."""
    want, got = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(got) or (level != "+" and level != got[i]):
            return False
    return len(want) == len(got)


def origin_problem(in_node: str, topic: str, topic_filters: tuple[str, ...],
                   known_in_nodes: frozenset[str]) -> str | None:
    """Why a recharge from `in_node`, received on `topic`, must not be believed; None
    when it may. Pure.

    The event's `in_node` becomes the subscriber's learned route, so it must be the
    Origin-Host of a configured IN (anything else would send his next loan to a node
    that does not exist), and where the topic names the IN (the level a filter's final
    `+` matched: `extrabalance/recharge/<in_node>`) the two must agree: an IN may
    speak only for itself.
    """
    if in_node not in known_in_nodes:
        shown = in_node if len(in_node) <= 64 else in_node[:64] + "..."
        return f"field 'in_node' {shown!r} is not a configured IN node"
    levels = topic.split("/")
    for topic_filter in topic_filters:
        if topic_filter.endswith("/+") and topic_matches(topic_filter, topic):
            if levels[-1] != in_node:
                return (f"field 'in_node' {in_node!r} does not match the topic's IN "
                        f"{levels[-1]!r}")
            return None
    return None


def _format_timestamp(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("RechargeEvent.timestamp must be timezone-aware")
    text = value.astimezone(UTC).isoformat()
    return text.removesuffix("+00:00") + "Z"


def to_payload(event: RechargeEvent) -> bytes:
    """Encode an event as the UTF-8 JSON payload of docs/protocols.md.

    ``parse_recharge(to_payload(e), expected_currency=e.currency) == e`` for every
    valid event.
    """
    body: dict[str, Any] = {
        "event_id": event.event_id,
        "msisdn": event.msisdn,
        "amount": event.amount_minor,
        "currency": event.currency,
        "in_node": event.in_node,
        "timestamp": _format_timestamp(event.timestamp),
    }
    if event.balance_after_minor is not None:
        body["balance_after"] = event.balance_after_minor
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
