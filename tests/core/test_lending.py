from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extrabalance.core.lending import BorrowRequest, Granted, Refused, decide, offer
from extrabalance.core.reasons import Reason
from tests.core.sample import NOW, POLICY, loan, make_policy, profile, state

M = "201001234567"


def ask(tier_id, channel="ussd"):
    return BorrowRequest(M, tier_id, channel)


def test_grant_gold_tier_with_percent_fee():
    d = decide(ask(4), state(), POLICY, NOW)
    assert isinstance(d, Granted)
    assert (d.segment.name, d.amount_minor, d.fee_minor) == ("gold", 1000, 100)


def test_min_fee_clamp_applies():
    d = decide(ask(1), state(), POLICY, NOW)
    assert isinstance(d, Granted) and d.fee_minor == 10


@pytest.mark.parametrize(
    ("st_kwargs", "tier", "reason"),
    [
        ({"barred_manual": True, "barred_reason": "fraud"}, 1, Reason.BARRED_MANUAL),
        ({"loans_since_full_payback": 3}, 1, Reason.BARRED_BAD_DEBT),
        ({"operation_pending": True}, 1, Reason.OPERATION_PENDING),
        ({"prof": profile(tenure=20, arpu=0)}, 1, Reason.NO_SEGMENT),
        ({"prof": profile(tenure=10, arpu=0, region="cairo")}, 1, Reason.TENURE_TOO_SHORT),
        ({"balance_minor": 501}, 1, Reason.BALANCE_TOO_HIGH),
        ({}, 99, Reason.UNKNOWN_TIER),
        ({"prof": profile(tenure=100, arpu=0)}, 9, Reason.TIER_NOT_ALLOWED),
        ({"loans": (loan("a", 11000, 1000),)}, 2, Reason.CEILING_REACHED),
    ],
)
def test_each_refusal(st_kwargs, tier, reason):
    d = decide(ask(tier), state(**st_kwargs), POLICY, NOW)
    assert isinstance(d, Refused) and d.reason is reason, d


def test_check_order_manual_bar_beats_everything():
    s = state(
        barred_manual=True,
        loans_since_full_payback=9,
        operation_pending=True,
        prof=profile(tenure=0, arpu=0),
    )
    assert decide(ask(99), s, POLICY, NOW).reason is Reason.BARRED_MANUAL


def test_check_order_bad_debt_before_pending():
    s = state(loans_since_full_payback=3, operation_pending=True)
    assert decide(ask(1), s, POLICY, NOW).reason is Reason.BARRED_BAD_DEBT


def test_balance_unknown_is_not_too_high():
    assert isinstance(decide(ask(1), state(balance_minor=None), POLICY, NOW), Granted)
    assert isinstance(decide(ask(1), state(balance_minor=500), POLICY, NOW), Granted)


def test_ceiling_is_inclusive():
    # gold ceiling 12000: debt 10900 + tier 4 (1000 + 100 fee) == 12000 fits
    s = state(loans=(loan("a", 10000, 900),))
    assert isinstance(decide(ask(4), s, POLICY, NOW), Granted)
    s = state(loans=(loan("a", 10000, 901),))
    assert decide(ask(4), s, POLICY, NOW).reason is Reason.CEILING_REACHED


def test_no_tier_means_largest_that_fits():
    d = decide(ask(None), state(), POLICY, NOW)
    assert isinstance(d, Granted) and d.tier.tier_id == 12  # 10000 + 1000 fee = ceiling
    d = decide(ask(None), state(loans=(loan("a", 5000, 500),)), POLICY, NOW)
    # debt 5500: tier 10 (5000 + 500) brings it to 11000; tier 11 (7500 + 750) would not fit
    assert isinstance(d, Granted) and d.tier.tier_id == 10


def test_no_tier_picks_largest_fitting_by_rule():
    for debt in range(0, 12001, 250):
        s = state(loans=(loan("a", debt, 0),)) if debt else state()
        d = decide(ask(None), s, POLICY, NOW)
        fitting = [
            t
            for t in POLICY.tiers.values()
            if debt + t.amount_minor + max(10, t.amount_minor // 10) <= 12000
        ]
        if fitting:
            assert isinstance(d, Granted)
            assert d.tier.amount_minor == max(t.amount_minor for t in fitting)
        else:
            assert d.reason is Reason.CEILING_REACHED


def test_auto_channel_needs_opt_in_and_uses_auto_tier():
    assert decide(ask(None, "auto"), state(), POLICY, NOW).reason is Reason.NOT_OPTED_IN
    d = decide(ask(None, "auto"), state(auto_advance_opt_in=True), POLICY, NOW)
    assert isinstance(d, Granted) and d.tier.tier_id == 3
    p = make_policy(auto_advance_tier_id=None)
    d = decide(ask(None, "auto"), state(auto_advance_opt_in=True), p, NOW)
    assert isinstance(d, Granted) and d.tier.tier_id == 12


def test_offer_menu():
    o = offer(state(loans=(loan("a", 8000, 800),)), POLICY, NOW)
    assert o.eligible and o.reason is None and o.segment_name == "gold"
    assert o.debt_minor == 8800 and o.headroom_minor == 3200
    fits = {t.tier_id: t.fits for t in o.tiers}
    assert fits[7] and not fits[8]  # 2500 + 250 fits in 3200; 3000 + 300 does not
    for t in o.tiers:
        assert t.total_minor == t.amount_minor + t.fee_minor
        assert t.fits == (t.total_minor <= 3200)


def test_offer_refusals():
    o = offer(state(barred_manual=True), POLICY, NOW)
    assert not o.eligible and o.reason is Reason.BARRED_MANUAL and o.tiers
    o = offer(state(prof=profile(tenure=1, arpu=0)), POLICY, NOW)
    assert not o.eligible and o.reason is Reason.NO_SEGMENT and o.tiers == ()
    o = offer(state(loans=(loan("a", 12000, 0),)), POLICY, NOW)
    assert not o.eligible and o.reason is Reason.CEILING_REACHED and o.headroom_minor == 0


loans_st = st.lists(st.tuples(st.integers(0, 6000), st.integers(0, 600)), max_size=4).map(
    lambda xs: tuple(loan(f"l{i}", p, f) for i, (p, f) in enumerate(xs))
)


@given(
    loans=loans_st,
    tier=st.none() | st.integers(0, 14),
    tenure=st.integers(0, 1000),
    arpu=st.integers(0, 10000),
    count=st.integers(0, 4),
    balance=st.none() | st.integers(0, 1000),
    pending=st.booleans(),
    channel=st.sampled_from(["ussd", "sms", "auto"]),
    opt_in=st.booleans(),
)
def test_grant_never_passes_ceiling(
    loans, tier, tenure, arpu, count, balance, pending, channel, opt_in
):
    s = state(
        prof=profile(tenure=tenure, arpu=arpu),
        loans=loans,
        loans_since_full_payback=count,
        balance_minor=balance,
        operation_pending=pending,
        auto_advance_opt_in=opt_in,
    )
    d = decide(BorrowRequest(M, tier, channel), s, POLICY, NOW)
    if isinstance(d, Granted):
        assert s.debt_minor + d.amount_minor + d.fee_minor <= d.segment.ceiling_minor
        assert d.tier.tier_id in d.segment.tier_ids
        assert not pending and count < d.segment.bad_debt_limit
        assert d.amount_minor == d.tier.amount_minor > 0
        # the offer agrees with the decision for an explicit tier
        if tier is not None and channel != "auto":
            o = offer(s, POLICY, NOW)
            assert o.eligible
            assert any(t.tier_id == tier and t.fits for t in o.tiers)
    else:
        assert isinstance(d.reason, Reason) and d.detail


def test_state_debt():
    s = state(loans=(loan("a", 1000, 100, p_paid=300, f_paid=100), loan("b", 50, 5)))
    assert s.debt_minor == 700 + 55
    assert replace(s, open_loans=()).debt_minor == 0
