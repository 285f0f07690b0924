"""Limits from behaviour (core/limits.py): the rule, its incremental state, and the
two properties the issue asks for (never above the segment ceiling; a full on-time
payback never lowers the limit)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from extrabalance.core.lending import BorrowRequest, Granted, Refused, decide, offer
from extrabalance.core.limits import (
    LimitPolicy,
    LimitReason,
    LimitState,
    day_number,
    limit_for,
    on_payback,
    on_recharge,
    payback_on_time,
)
from extrabalance.core.reasons import Reason
from tests.core.sample import NOW, POLICY, loan, state

RULE = LimitPolicy()  # 50 % of 30 days' recharges, +10 % per on-time payback


def test_half_of_the_window_recharges_then_the_window_slides():
    s = on_recharge(LimitState(), 4000, NOW, RULE)
    s = on_recharge(s, 2000, NOW + timedelta(hours=2), RULE)  # same day: one bucket
    s = on_recharge(s, 1000, NOW + timedelta(days=10), RULE)
    assert len(s.recharge_days) == 2
    limit = limit_for(s, 12000, 0, NOW + timedelta(days=10), RULE)
    assert (limit.limit_minor, limit.reason, limit.recharged_minor) == (
        3500, LimitReason.RECHARGES, 7000)
    # 30 days after the first recharge it has left the window.
    later = limit_for(s, 12000, 0, NOW + timedelta(days=30), RULE)
    assert (later.limit_minor, later.recharged_minor) == (500, 1000)
    # The next recharge drops the expired day from the state: it stays bounded.
    s = on_recharge(s, 100, NOW + timedelta(days=30), RULE)
    assert [d for d, _ in s.recharge_days] == [day_number(NOW) + 10, day_number(NOW) + 30]


def test_paybacks_move_the_adjustment_within_its_bounds():
    s = LimitState()
    s = on_payback(s, full=True, on_time=True, policy=RULE)
    assert (s.adjust_bp, s.on_time_paybacks) == (1000, 1)
    s = on_payback(s, full=True, on_time=False, policy=RULE)
    assert (s.adjust_bp, s.late_paybacks) == (-1000, 1)
    s = on_payback(s, full=False, on_time=True, policy=RULE)
    assert (s.adjust_bp, s.partial_paybacks) == (-1500, 1)
    for _ in range(20):
        s = on_payback(s, full=True, on_time=False, policy=RULE)
    assert s.adjust_bp == RULE.adjust_min_bp
    for _ in range(30):
        s = on_payback(s, full=True, on_time=True, policy=RULE)
    assert s.adjust_bp == RULE.adjust_max_bp


def test_arpu_and_floor_terms_and_the_ceiling_reason():
    rule = replace(RULE, arpu_share_bp=2000, floor_minor=300)
    assert limit_for(LimitState(), 12000, 0, NOW, rule).reason is LimitReason.FLOOR
    by_arpu = limit_for(LimitState(), 12000, 6000, NOW, rule)
    assert (by_arpu.limit_minor, by_arpu.reason) == (1200, LimitReason.ARPU)
    rich = on_recharge(LimitState(), 100_000, NOW, rule)
    capped = limit_for(rich, 12000, 6000, NOW, rule)
    assert (capped.limit_minor, capped.reason) == (12000, LimitReason.CEILING)


def test_on_time_is_measured_from_the_oldest_loan():
    assert payback_on_time(NOW - timedelta(days=14), NOW, RULE)
    assert not payback_on_time(NOW - timedelta(days=14, seconds=1), NOW, RULE)


def test_the_decision_lends_up_to_the_lower_of_ceiling_and_limit():
    limited = replace(state(), limit_minor=1200)  # gold: ceiling 120.00, fee 10 %
    granted = decide(BorrowRequest(limited.msisdn, None, "ussd"), limited, POLICY, NOW)
    assert isinstance(granted, Granted) and granted.amount_minor == 1000  # 10.00 + 1.00 fee
    refused = decide(BorrowRequest(limited.msisdn, 5, "ussd"), limited, POLICY, NOW)
    assert isinstance(refused, Refused) and refused.reason is Reason.CEILING_REACHED
    menu = offer(limited, POLICY, NOW)
    assert menu.headroom_minor == 1200
    assert [t.tier_id for t in menu.tiers if t.fits] == [1, 2, 3, 4]
    # A limit above the ceiling changes nothing: the ceiling still applies.
    high = replace(state(loans=(loan("L1", 10000, 1000),)), limit_minor=50_000)
    assert isinstance(decide(BorrowRequest(high.msisdn, 4, "ussd"), high, POLICY, NOW), Refused)


amounts = st.integers(min_value=0, max_value=10**9)
rules = st.builds(
    LimitPolicy,
    window_days=st.integers(1, 366),
    recharge_share_bp=st.integers(0, 100_000),
    arpu_share_bp=st.integers(0, 100_000),
    floor_minor=amounts,
    on_time_days=st.integers(1, 90),
    on_time_raise_bp=st.integers(0, 100_000),
    late_lower_bp=st.integers(0, 10_000),
    partial_lower_bp=st.integers(0, 10_000),
    adjust_min_bp=st.integers(-10_000, 0),
    adjust_max_bp=st.integers(0, 100_000),
)
events = st.lists(
    st.one_of(
        st.tuples(st.just("recharge"), st.integers(-100, 10**7), st.integers(0, 400)),
        st.tuples(st.just("payback"), st.booleans(), st.booleans()),
    ),
    max_size=40,
)


def _replay(rule: LimitPolicy, history: list[tuple[object, ...]]) -> tuple[LimitState, int]:
    s, hours = LimitState(), 0
    for event in history:
        if event[0] == "recharge":
            _, amount, gap_hours = event
            hours += int(gap_hours)  # type: ignore[call-overload]
            s = on_recharge(s, int(amount), NOW + timedelta(hours=hours), rule)  # type: ignore[call-overload]
        else:
            s = on_payback(s, full=bool(event[1]), on_time=bool(event[2]), policy=rule)
    return s, hours


@given(rules, events, amounts, amounts)
def test_a_limit_is_never_above_the_segment_ceiling(rule, history, ceiling, arpu):
    s, hours = _replay(rule, history)
    limit = limit_for(s, ceiling, arpu, NOW + timedelta(hours=hours), rule)
    assert 0 <= limit.limit_minor <= ceiling
    assert len(s.recharge_days) <= rule.window_days


@given(rules, events, amounts, amounts)
def test_a_full_on_time_payback_never_lowers_the_limit(rule, history, ceiling, arpu):
    s, hours = _replay(rule, history)
    at = NOW + timedelta(hours=hours)
    before = limit_for(s, ceiling, arpu, at, rule).limit_minor
    after_state = on_payback(s, full=True, on_time=True, policy=rule)
    assert limit_for(after_state, ceiling, arpu, at, rule).limit_minor >= before
    # ... even when the operator lowered the adjustment's bound since.
    tighter = replace(rule, adjust_max_bp=0)
    before = limit_for(s, ceiling, arpu, at, tighter).limit_minor
    after_state = on_payback(s, full=True, on_time=True, policy=tighter)
    assert limit_for(after_state, ceiling, arpu, at, tighter).limit_minor >= before
