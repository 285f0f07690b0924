"""Gy helpers: CCR/CCA building and parsing, CC-Money in minor units, Session-Ids."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extrabalance.diameter import codec, gy
from extrabalance.diameter.codec import DiameterError, avp, decode, encode
from extrabalance.diameter.constants import (
    AVP_EXPERIMENTAL_RESULT,
    AVP_EXPERIMENTAL_RESULT_CODE,
    AVP_MULTIPLE_SERVICES_CREDIT_CONTROL,
    AVP_RATING_GROUP,
    AVP_REQUESTED_SERVICE_UNIT,
    AVP_RESULT_CODE,
    AVP_SUBSCRIPTION_ID,
    AVP_VENDOR_ID,
)
from extrabalance.service.outcomes import AdvanceDecision, AdvanceOutcome

from .helpers import sample_ccr, sample_ccr_dataclass


def _with(msg: codec.Message, code: int, new: codec.Avp | None) -> codec.Message:
    avps = [a for a in msg.avps if a.code != code]
    if new is not None:
        avps.append(new)
    return msg._replace(avps=tuple(avps))


def _money(digits: int, exponent: int, currency: int = 818) -> codec.Avp:
    return avp(413, [avp(445, [avp(447, digits), avp(429, exponent)]), avp(425, currency)])


@given(
    amount=st.integers(0, 10**15),
    exponent=st.integers(0, 3),
    mscc=st.booleans(),
    action=st.sampled_from([None, gy.DIRECT_DEBITING, gy.REFUND_ACCOUNT, gy.CHECK_BALANCE]),
    request_type=st.integers(1, 4),
    number=st.integers(0, 2**32 - 1),
)
def test_ccr_build_parse_round_trip(amount: int, exponent: int, mscc: bool, action: int | None,
                                    request_type: int, number: int) -> None:
    ccr = sample_ccr_dataclass(requested_minor=amount, has_mscc=mscc, requested_action=action,
                               request_type=request_type, request_number=number)
    msg = decode(encode(gy.build_ccr(ccr, currency_exponent=exponent)))
    codec.validate(msg)
    assert gy.parse_ccr(msg, currency_exponent=exponent) == ccr


def test_ccr_without_amount_or_destination_host() -> None:
    ccr = sample_ccr_dataclass(requested_minor=None, currency_numeric=None, destination_host=None,
                               requested_action=None, event_timestamp=None)
    assert gy.parse_ccr(decode(encode(gy.build_ccr(ccr)))) == ccr


@pytest.mark.parametrize(("digits", "exponent", "minor"), [
    (1000, -2, 1000),  # 10.00 as we send it
    (10, 0, 1000),  # 10 major units
    (1, 1, 1000),  # 1 × 10^1
    (10000, -3, 1000),  # finer exponent, still whole piastres
    (0, -30, 0),
])
def test_cc_money_any_exact_representation(digits: int, exponent: int, minor: int) -> None:
    msg = _with(sample_ccr(), AVP_REQUESTED_SERVICE_UNIT, avp(437, [_money(digits, exponent)]))
    assert gy.parse_ccr(msg, currency_exponent=2).requested_minor == minor


@pytest.mark.parametrize(("digits", "exponent"), [
    (1001, -3),  # 1.001 EGP: a tenth of a piastre
    (5, -30),
    (-100, -2),  # negative
    (1, 40),  # absurdly large
])
def test_cc_money_not_in_minor_units_is_5004(digits: int, exponent: int) -> None:
    msg = _with(sample_ccr(), AVP_REQUESTED_SERVICE_UNIT, avp(437, [_money(digits, exponent)]))
    with pytest.raises(DiameterError) as info:
        gy.parse_ccr(msg, currency_exponent=2)
    assert info.value.result_code == 5004
    assert info.value.failed_avps[0].code == 413


def test_missing_subscription_id_is_5005_with_failed_avp() -> None:
    msg = _with(sample_ccr(), AVP_SUBSCRIPTION_ID, None)
    with pytest.raises(DiameterError) as info:
        gy.parse_ccr(msg)
    assert info.value.result_code == 5005
    assert info.value.failed_avps[0].code == AVP_SUBSCRIPTION_ID
    answer = codec.error_answer(info.value, "node", "realm")
    assert answer.path(279, AVP_SUBSCRIPTION_ID) is not None


@pytest.mark.parametrize("sub", [
    avp(443, [avp(450, 1), avp(444, "602021234567890")]),  # IMSI only
    avp(443, [avp(450, 0), avp(444, "+20100")]),  # not digits
    avp(443, [avp(450, 0), avp(444, "2" * 16)]),  # longer than E.164
])
def test_bad_subscription_id_is_5004(sub: codec.Avp) -> None:
    with pytest.raises(DiameterError) as info:
        gy.parse_ccr(_with(sample_ccr(), AVP_SUBSCRIPTION_ID, sub))
    assert info.value.result_code == 5004


def test_unsupported_requested_action_and_type_are_5004() -> None:
    with pytest.raises(DiameterError) as info:
        gy.parse_ccr(_with(sample_ccr(), 436, avp(436, 3)))
    assert info.value.result_code == 5004
    with pytest.raises(DiameterError) as info:
        gy.parse_ccr(_with(sample_ccr(), 416, avp(416, 9)))
    assert info.value.result_code == 5004


def test_cca_success_with_grant_round_trip() -> None:
    req = sample_ccr()
    cca = gy.build_cca(req, "in-a.operator.example", "operator.example", 2001,
                       granted_minor=2500, currency_numeric=818, currency_exponent=2,
                       event_timestamp=3_973_000_123)
    back = decode(encode(cca))
    codec.validate(back)
    assert not back.is_request and not back.is_error and back.is_proxiable
    assert (back.hop_by_hop_id, back.end_to_end_id) == (req.hop_by_hop_id, req.end_to_end_id)
    assert back.get(55) == 3_973_000_123
    assert gy.parse_cca(back, 2) == gy.CreditControlAnswer(
        session_id=req.session_id or "", result_code=2001, request_number=0, granted_minor=2500,
        check_balance_result=None, origin_host="in-a.operator.example", request_type=4,
        currency_numeric=818)


@pytest.mark.parametrize(("code", "e_bit"), [(2001, False), (3002, True), (3004, True),
                                              (4010, False), (4012, False), (5030, False),
                                              (5031, False)])
def test_cca_e_bit_exactly_for_3xxx(code: int, e_bit: bool) -> None:
    cca = gy.build_cca(sample_ccr(), "in", "realm", code, currency_numeric=818,
                       currency_exponent=2, error_message="x" if code >= 3000 else None)
    assert cca.is_error is e_bit
    parsed = gy.parse_cca(decode(encode(cca)))
    assert parsed.result_code == code and parsed.is_error is e_bit


def test_cca_check_balance_result() -> None:
    req = sample_ccr(requested_action=gy.CHECK_BALANCE)
    cca = gy.build_cca(req, "in", "realm", 2001, check_balance_result=gy.NO_CREDIT,
                       currency_numeric=818, currency_exponent=2)
    assert gy.parse_cca(cca).check_balance_result == gy.NO_CREDIT


def test_mscc_in_request_gives_mscc_in_answer() -> None:
    req = sample_ccr(has_mscc=True)
    req = req._replace(avps=tuple(
        avp(456, (*a.value, avp(AVP_RATING_GROUP, 7))) if a.code == 456 else a for a in req.avps))
    cca = gy.build_cca(req, "node", "realm", 2001, granted_minor=500, currency_numeric=818,
                       currency_exponent=2)
    mscc = cca.first(AVP_MULTIPLE_SERVICES_CREDIT_CONTROL)
    assert mscc is not None and cca.first(431) is None
    assert mscc.get(AVP_RATING_GROUP) == 7 and mscc.get(AVP_RESULT_CODE) == 2001
    assert gy.parse_cca(cca).granted_minor == 500
    # and from the dataclass form
    cca2 = gy.build_cca(gy.parse_ccr(req), "node", "realm", 2001, granted_minor=500,
                        currency_numeric=818, currency_exponent=2)
    assert cca2.first(AVP_MULTIPLE_SERVICES_CREDIT_CONTROL) is not None


def test_experimental_result_is_read() -> None:
    cca = gy.build_cca(sample_ccr(), "in", "realm", 2001, currency_numeric=818,
                       currency_exponent=2)
    cca = _with(cca, AVP_RESULT_CODE, avp(AVP_EXPERIMENTAL_RESULT, [
        avp(AVP_VENDOR_ID, 10415), avp(AVP_EXPERIMENTAL_RESULT_CODE, 4241)]))
    parsed = gy.parse_cca(cca)
    assert parsed.result_code == 4241 and parsed.experimental
    with pytest.raises(DiameterError) as info:
        gy.parse_cca(_with(cca, AVP_EXPERIMENTAL_RESULT, None))
    assert info.value.result_code == 5005


def test_session_ids_follow_rfc_6733_and_are_unique() -> None:
    gen = gy.SessionIdGenerator("eb.node.example", start_s=1_700_000_000)
    ids = [gen.next() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert re.fullmatch(r"eb\.node\.example;1700000000;0;\d+", ids[0])
    other_start = gy.SessionIdGenerator("eb.node.example", start_s=1_700_000_001, optional="")
    assert other_start.next() == "eb.node.example;1700000001;0"
    # low word wraps into the high word
    gen._counter = iter([2**32 + 5])  # type: ignore[assignment]
    assert gen.next().startswith("eb.node.example;1700000001;5")


def _plain_encoding(msg: codec.Message) -> bytes:
    """The AVP-by-AVP encoding, without the builder's pre-encoded body."""
    return b"".join(codec.encode_avp(a) for a in msg.avps)


@given(
    session_id=st.text(max_size=40),
    msisdn=st.text(alphabet="0123456789", max_size=15),
    amount=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    stamp=st.one_of(st.none(), st.integers(2**31, 2**31 + 2**32 - 1)),  # the folded window
    mscc=st.booleans(),
    action=st.sampled_from([None, gy.DIRECT_DEBITING, gy.REFUND_ACCOUNT, gy.CHECK_BALANCE]),
    destination_host=st.one_of(st.none(), st.text(max_size=20)),
)
def test_ccr_template_bytes_equal_the_plain_encoding(
        session_id: str, msisdn: str, amount: int | None, stamp: int | None, mscc: bool,
        action: int | None, destination_host: str | None) -> None:
    ccr = sample_ccr_dataclass(session_id=session_id, msisdn=msisdn, requested_minor=amount,
                               event_timestamp=stamp, has_mscc=mscc, requested_action=action,
                               destination_host=destination_host)
    msg = gy.build_ccr(ccr, hop_by_hop_id=7, end_to_end_id=9)
    data = encode(msg)
    assert data[20:] == _plain_encoding(msg)
    assert decode(data) == msg
    # A re-send with other ids and the T flag keeps the body and changes the header.
    again = encode(msg._replace(hop_by_hop_id=8, flags=msg.flags | codec.FLAG_RETRANSMIT))
    assert again[20:] == data[20:] and again[:20] != data[:20]


def test_ccr_template_leaves_a_bad_value_to_the_encoder() -> None:
    msg = gy.build_ccr(sample_ccr_dataclass(session_id="\udc80"))  # lone surrogate
    with pytest.raises(ValueError):
        encode(msg)


@given(
    session_id=st.one_of(st.none(), st.text(max_size=40)),
    result_code=st.sampled_from([2001, 3002, 4010, 4012, 5030]),
    granted=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    balance=st.one_of(st.none(), st.sampled_from([gy.ENOUGH_CREDIT, gy.NO_CREDIT])),
    stamp=st.integers(2**31, 2**31 + 2**32 - 1),
    mscc=st.booleans(),
    error_message=st.one_of(st.none(), st.text(max_size=20)),
)
def test_cca_template_bytes_equal_the_plain_encoding(
        session_id: str | None, result_code: int, granted: int | None, balance: int | None,
        stamp: int, mscc: bool, error_message: str | None) -> None:
    request = gy.build_ccr(sample_ccr_dataclass(has_mscc=mscc), hop_by_hop_id=3,
                           end_to_end_id=4)
    if session_id is None:
        request = request._replace(avps=request.avps[1:])
    else:
        request = request._replace(avps=(avp(263, session_id), *request.avps[1:]))
    msg = gy.build_cca(request, "in-a.operator.example", "operator.example", result_code,
                       granted, balance, currency_numeric=818, currency_exponent=2,
                       error_message=error_message, event_timestamp=stamp)
    assert (msg.hop_by_hop_id, msg.end_to_end_id) == (3, 4)
    assert msg.is_error == (3000 <= result_code < 4000)
    data = encode(msg)
    assert data[20:] == _plain_encoding(msg)
    assert decode(data) == msg


async def test_used_service_unit_money_reaches_the_lending_service() -> None:
    """RFC 4006 §8.19: the Used-Service-Unit CC-Money of an UPDATE/TERMINATION, top level
    or in an MSCC, is parsed and handed on as `used_minor` (session evidence)."""
    from extrabalance.adapters.gy_server import GyServer

    ccr = sample_ccr_dataclass(request_type=gy.TERMINATION_REQUEST, request_number=1,
                               requested_minor=None, currency_numeric=None)
    usu = avp(446, [_money(420, -2)])
    msg = decode(encode(_with(gy.build_ccr(ccr), 446, usu)))
    assert gy.parse_ccr(msg).used_minor == 420
    mscc = avp(AVP_MULTIPLE_SERVICES_CREDIT_CONTROL, [avp(446, [_money(7, 0)])])
    assert gy.parse_ccr(_with(gy.build_ccr(ccr), 456, mscc)).used_minor == 700
    assert gy.parse_ccr(gy.build_ccr(ccr)).used_minor is None

    seen: dict[str, object] = {}

    class Lending:
        async def out_of_balance(self, *args: object, **kwargs: object) -> AdvanceOutcome:
            seen.update(kwargs)
            return AdvanceOutcome(AdvanceDecision.ACKNOWLEDGED)

    server = GyServer(Lending(), origin_host=ccr.destination_host or "",
                      origin_realm=ccr.destination_realm,
                      service_context_id=ccr.service_context_id, currency_numeric=818,
                      currency_exponent=2)
    answer = await server(msg, ccr.origin_host)
    assert answer.get(268) == 2001 and seen["used_minor"] == 420


def test_a_bundle_ccr_carries_its_units_in_an_mscc_and_no_money():
    """Requested-Action REFUND_ACCOUNT, Multiple-Services-Indicator 1 and one MSCC with
    Requested-Service-Unit{CC-Total-Octets | CC-Time | CC-Service-Specific-Units},
    Service-Identifier, Rating-Group (RFC 4006 §8.16-8.29); it validates and parses
    back, and the CCA's Granted-Service-Unit comes back in the same unit."""
    from extrabalance.diameter.constants import (
        AVP_CC_MONEY,
        AVP_MULTIPLE_SERVICES_CREDIT_CONTROL,
        AVP_MULTIPLE_SERVICES_INDICATOR,
        AVP_REQUESTED_SERVICE_UNIT,
    )

    for kind, unit in gy.BUNDLE_UNIT_AVPS.items():
        bundle = gy.BundleUnits(kind, 3600, service_identifier=7, rating_group=20)
        msg = gy.build_ccr(gy.CreditControlRequest(
            session_id="eb;1;2", origin_host="eb.test", origin_realm="test",
            destination_realm="test", msisdn="201001234567",
            requested_action=gy.REFUND_ACCOUNT, has_mscc=True, bundle=bundle))
        wire = codec.decode(codec.encode(msg))
        codec.validate(wire)
        assert wire.get(AVP_MULTIPLE_SERVICES_INDICATOR) == 1
        assert wire.first(AVP_REQUESTED_SERVICE_UNIT) is None  # nothing at top level
        mscc = wire.first(AVP_MULTIPLE_SERVICES_CREDIT_CONTROL)
        rsu = mscc.first(AVP_REQUESTED_SERVICE_UNIT)
        assert rsu.get(unit) == 3600 and rsu.first(AVP_CC_MONEY) is None
        parsed = gy.parse_ccr(wire)
        assert parsed.bundle == bundle and parsed.requested_minor is None
        cca = gy.build_cca(wire, "in.test", "test", 2001, currency_numeric=818,
                           currency_exponent=2, granted_units=bundle)
        back = gy.parse_cca(codec.decode(codec.encode(cca)))
        assert back.granted_units == bundle and back.granted_minor is None
