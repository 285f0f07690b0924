"""The low-balance payload: valid events parse, anything else is a reason, never a crash."""

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extrabalance.recharge.lowbalance import (
    InvalidLowBalance,
    LowBalanceEvent,
    low_balance_payload,
    parse_low_balance,
)

GOOD = (b'{"event_id":"IN-A-LB-1","msisdn":"201001234567","balance_minor":35,'
        b'"in_node":"in-a.operator.example","timestamp":"2026-11-25T10:15:00Z"}')


def test_parses_and_round_trips():
    event = parse_low_balance(GOOD)
    assert event == LowBalanceEvent("IN-A-LB-1", "201001234567", 35, "in-a.operator.example",
                                    datetime(2026, 11, 25, 10, 15, tzinfo=UTC))
    assert parse_low_balance(low_balance_payload(event)) == event


@pytest.mark.parametrize("payload, words", [
    (b"not json", "not JSON"),
    (b"[]", "JSON object"),
    (GOOD.replace(b'"balance_minor":35', b'"balance_minor":3.5'), "integer"),
    (GOOD.replace(b'"msisdn":"201001234567"', b'"msisdn":"+2010"'), "digits"),
    (GOOD.replace(b',"in_node":"in-a.operator.example"', b""), "missing field 'in_node'"),
    (GOOD.replace(b"Z", b""), "UTC offset"),
    (b"\xff", "UTF-8"),
])
def test_bad_payload_has_a_reason(payload, words):
    with pytest.raises(InvalidLowBalance, match=words):
        parse_low_balance(payload)


@given(st.binary(max_size=300))
def test_random_bytes_never_crash(payload):
    try:
        parse_low_balance(payload)
    except InvalidLowBalance:
        pass
