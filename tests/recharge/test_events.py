"""The recharge payload: every way a payload can be wrong gets a clear reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extrabalance.recharge.events import (
    AMOUNT_MAX_MINOR,
    PAYLOAD_MAX_BYTES,
    InvalidRecharge,
    RechargeEvent,
    origin_problem,
    parse_recharge,
    to_payload,
)

GOOD = {
    "event_id": "IN-A-000000123",
    "msisdn": "201001234567",
    "amount": 2500,
    "currency": "EGP",
    "balance_after": 2500,
    "in_node": "in-a.operator.example",
    "timestamp": "2026-11-25T10:15:00Z",
}


def payload(**changes: object) -> bytes:
    body = {**GOOD, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not _DROP}).encode()


_DROP = object()


def reason_of(raw: bytes) -> str:
    with pytest.raises(InvalidRecharge) as caught:
        parse_recharge(raw, expected_currency="EGP")
    assert caught.value.reason == str(caught.value)
    return caught.value.reason


def test_the_protocol_example_parses() -> None:
    event = parse_recharge(payload(), expected_currency="EGP")
    assert event == RechargeEvent(
        event_id="IN-A-000000123",
        msisdn="201001234567",
        amount_minor=2500,
        currency="EGP",
        balance_after_minor=2500,
        in_node="in-a.operator.example",
        timestamp=datetime(2026, 11, 25, 10, 15, tzinfo=UTC),
    )


def test_balance_after_is_optional_and_unknown_keys_are_ignored() -> None:
    event = parse_recharge(payload(balance_after=_DROP, channel="voucher"), expected_currency="EGP")
    assert event.balance_after_minor is None
    assert (
        parse_recharge(payload(balance_after=None), expected_currency="EGP").balance_after_minor
        is None
    )


def test_timestamp_with_offset_is_normalised_to_utc() -> None:
    event = parse_recharge(payload(timestamp="2026-11-25T12:15:00+02:00"), expected_currency="EGP")
    assert event.timestamp == datetime(2026, 11, 25, 10, 15, tzinfo=UTC)
    assert event.timestamp.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{not json", "not JSON"),
        (b"", "not JSON"),
        (b'{"amount": NaN}', "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"a string"', "JSON object"),
        (b"null", "JSON object"),
        (b'{"event_id": "a", "event_id": "b"}', "duplicate key 'event_id'"),
        (b" " * (PAYLOAD_MAX_BYTES + 1), "over 4096"),
    ],
)
def test_undecodable_payloads(raw: bytes, expected: str) -> None:
    assert expected in reason_of(raw)


@pytest.mark.parametrize(
    "field", ["event_id", "msisdn", "amount", "currency", "in_node", "timestamp"]
)
def test_each_missing_field_is_named(field: str) -> None:
    assert reason_of(payload(**{field: _DROP})) == f"missing field {field!r}"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"event_id": 123}, "'event_id' must be a string"),
        ({"event_id": ""}, "'event_id' must be non-empty"),
        ({"event_id": " IN-A-1"}, "surrounding spaces"),
        ({"event_id": "x" * 129}, "longer than 128"),
        ({"event_id": "IN\n1"}, "control characters"),
        ({"in_node": None}, "'in_node' must be a string"),
        ({"msisdn": 201001234567}, "'msisdn' must be a string"),
        ({"msisdn": "+201001234567"}, "ASCII digits only"),
        ({"msisdn": "2010 0123 4567"}, "ASCII digits only"),
        ({"msisdn": "٢٠١٠٠١٢٣٤٥٦٧"}, "ASCII digits only"),
        ({"msisdn": "1234567"}, "8 to 15 digits, got 7"),
        ({"msisdn": "1234567890123456"}, "8 to 15 digits, got 16"),
        ({"amount": -1}, "'amount' must be positive"),
        ({"amount": 0}, "'amount' must be positive"),
        ({"amount": 25.5}, "'amount' must be an integer"),
        ({"amount": 2500.0}, "'amount' must be an integer"),
        ({"amount": "2500"}, "'amount' must be an integer"),
        ({"amount": True}, "'amount' must be an integer"),
        ({"amount": AMOUNT_MAX_MINOR + 1}, "over the bound"),
        ({"balance_after": 1.5}, "'balance_after' must be an integer"),
        ({"balance_after": "10"}, "'balance_after' must be an integer"),
        ({"currency": "USD"}, "'currency' is 'USD', this node handles 'EGP'"),
        ({"currency": 818}, "'currency' must be a string"),
        ({"timestamp": "yesterday"}, "not an ISO 8601 date-time"),
        ({"timestamp": "2026-11-25T10:15:00"}, "no UTC offset"),
        ({"timestamp": 1790000000}, "'timestamp' must be a string"),
    ],
)
def test_bad_fields_get_a_reason_naming_them(changes: dict[str, object], expected: str) -> None:
    assert expected in reason_of(payload(**changes))


def test_negative_balance_after_is_accepted() -> None:
    # Some INs allow emergency credit below zero; the figure is informational.
    assert (
        parse_recharge(payload(balance_after=-300), expected_currency="EGP").balance_after_minor
        == -300
    )


def test_to_payload_refuses_a_naive_timestamp() -> None:
    event = parse_recharge(payload(), expected_currency="EGP")
    naive = RechargeEvent(**{**_fields(event), "timestamp": datetime(2026, 1, 1)})
    with pytest.raises(ValueError, match="timezone-aware"):
        to_payload(naive)


def _fields(event: RechargeEvent) -> dict[str, object]:
    return {name: getattr(event, name) for name in RechargeEvent.__slots__}


events = st.builds(
    RechargeEvent,
    event_id=st.text(
        alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp", "Cf")),
        min_size=1,
        max_size=128,
    ).filter(lambda s: s == s.strip() and s.isprintable()),
    msisdn=st.text(alphabet="0123456789", min_size=8, max_size=15),
    amount_minor=st.integers(1, AMOUNT_MAX_MINOR),
    currency=st.just("EGP"),
    balance_after_minor=st.none() | st.integers(-AMOUNT_MAX_MINOR, AMOUNT_MAX_MINOR),
    in_node=st.from_regex(r"[a-z0-9.-]{1,40}", fullmatch=True),
    timestamp=st.datetimes(
        min_value=datetime(2000, 1, 1),
        max_value=datetime(2100, 1, 1),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5))]
        ),
    ),
)


@given(events)
def test_round_trip(event: RechargeEvent) -> None:
    assert parse_recharge(to_payload(event), expected_currency="EGP") == event


@given(st.binary(max_size=600))
def test_random_bytes_never_raise_anything_but_invalid_recharge(raw: bytes) -> None:
    try:
        parse_recharge(raw, expected_currency="EGP")
    except InvalidRecharge as exc:
        assert exc.reason


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=12), children, max_size=8)
        ),
        max_leaves=30,
    )
)
def test_random_json_never_raises_anything_but_invalid_recharge(value: object) -> None:
    try:
        parse_recharge(json.dumps(value).encode(), expected_currency="EGP")
    except InvalidRecharge as exc:
        assert exc.reason


FILTERS = ("extrabalance/recharge/+",)
KNOWN = frozenset({"in-a.operator.example", "in-b.operator.example"})


@pytest.mark.parametrize("in_node, topic, problem", [
    ("in-a.operator.example", "extrabalance/recharge/in-a.operator.example", None),
    ("=HYPERLINK(\"x\")", "extrabalance/recharge/=HYPERLINK(\"x\")", "not a configured IN"),
    ("in-b.operator.example", "extrabalance/recharge/in-a.operator.example",
     "does not match the topic"),
    ("in-b.operator.example", "operator/recharges", None),  # a topic that names no IN
])
def test_origin_problem(in_node, topic, problem) -> None:
    found = origin_problem(in_node, topic, (*FILTERS, "operator/recharges"), KNOWN)
    assert (found is None) if problem is None else (problem in found)


async def test_the_node_checks_recharges_against_its_configured_ins(tmp_path) -> None:
    """The node hands its INs' Origin-Hosts to the listener (issue 22, finding 2)."""
    from extrabalance.config import load_settings
    from extrabalance.node import Node
    from tests.ops.support import write_config

    node = Node(load_settings(write_config(tmp_path)), edr_dir=tmp_path / "edr")
    try:
        assert node.recharges.in_nodes == frozenset(
            {"in-a.operator.example", "in-b.operator.example"})
    finally:
        await node.ledger.close()
