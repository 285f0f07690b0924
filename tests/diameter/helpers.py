"""Messages shared by the Diameter tests."""

from __future__ import annotations

from extrabalance.diameter import gy
from extrabalance.diameter.codec import Message

MSISDN = "201001234567"


def sample_ccr_dataclass(**changes: object) -> gy.CreditControlRequest:
    fields: dict[str, object] = {
        "session_id": "eb.node.example;1700000000;1",
        "origin_host": "eb.node.example",
        "origin_realm": "node.example",
        "destination_realm": "operator.example",
        "destination_host": "in-a.operator.example",
        "request_type": gy.EVENT_REQUEST,
        "request_number": 0,
        "msisdn": MSISDN,
        "service_context_id": "extrabalance@3gpp.org",
        "requested_action": gy.REFUND_ACCOUNT,
        "requested_minor": 1000,
        "currency_numeric": 818,
        "event_timestamp": 3_973_000_000,
    }
    fields.update(changes)
    return gy.CreditControlRequest(**fields)  # type: ignore[arg-type]


def sample_ccr(**changes: object) -> Message:
    """The node's CCR-Event REFUND_ACCOUNT of docs/protocols.md, 10.00 EGP."""
    return gy.build_ccr(sample_ccr_dataclass(**changes), currency_exponent=2,
                        hop_by_hop_id=0x1111, end_to_end_id=0x2222)
