"""Exact boundary examples for every threshold the lending rules read, and the core
policy's defaults (a `Policy` built in code behaves as an operator's empty section)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extrabalance import config
from extrabalance.core.fees import fee_for
from extrabalance.core.lending import BorrowRequest, Granted, decide, offer
from extrabalance.core.model import SubscriberState
from extrabalance.core.payback import ageing, allocate_payback, recoverable_minor, split
from extrabalance.core.policy import (
    Condition,
    EligibilityPolicy,
    FeePlan,
    PaybackOrder,
    RecoveryPolicy,
    RuleOp,
    Segment,
    Tier,
)
from extrabalance.core.reasons import Reason
from extrabalance.core.segments import condition_holds, match_segment
from tests.core.sample import GOLD, NEWCOMER, NOW, POLICY, STANDARD, loan, profile, state

M = "201001234567"


def ask(tier: int | None, channel: str = "ussd") -> BorrowRequest:
    return BorrowRequest(M, tier, channel)  # type: ignore[arg-type]


# -- segments: tenure 365 / 90 days, ARPU 5000 -----------------------------------------


@pytest.mark.parametrize(
    ("tenure", "arpu", "segment"),
    [
        (365, 5000, GOLD),  # both thresholds exactly met
        (364, 5000, STANDARD),
        (365, 4999, STANDARD),
        (90, 0, STANDARD),
        (89, 0, None),
    ],
)
def test_segment_thresholds_are_inclusive(tenure, arpu, segment):
    assert match_segment(profile(tenure=tenure, arpu=arpu), POLICY.segments) is segment


@pytest.mark.parametrize(
    ("op", "below", "equal", "above"),
    [
        (RuleOp.GE, False, True, True),
        (RuleOp.GT, False, False, True),
        (RuleOp.LE, True, True, False),
        (RuleOp.LT, True, False, False),
        (RuleOp.EQ, False, True, False),
        (RuleOp.NE, True, False, True),
    ],
)
def test_each_operator_at_its_boundary(op, below, equal, above):
    cond = Condition("tenure_days", op, 100)
    assert [condition_holds(profile(tenure=t), cond) for t in (99, 100, 101)] == [
        below, equal, above]


def test_conditions_on_imported_attributes_and_missing_profiles():
    assert condition_holds(profile(region="cairo"), Condition("region", RuleOp.EQ, "cairo"))
    assert not condition_holds(profile(region="cairo"), Condition("region", RuleOp.NE, "cairo"))
    assert condition_holds(profile(region="cairo"), Condition("region", RuleOp.IN, "cairo"))
    assert not condition_holds(profile(region="luxor"), Condition("region", RuleOp.IN, "cairo"))
    # a tuple only makes sense with IN
    assert not condition_holds(profile(region="cairo"),
                               Condition("region", RuleOp.EQ, ("cairo",)))
    assert not condition_holds(profile(region="cairo"),
                               Condition("region", RuleOp.NE, ("luxor",)))
    # ordering a string against a number is false, whichever side is the string
    assert not condition_holds(profile(level="7"), Condition("level", RuleOp.LT, 9))
    assert not condition_holds(profile(level=7), Condition("level", RuleOp.GE, "1"))
    assert condition_holds(profile(level=7), Condition("level", RuleOp.LT, 9))
    # no profile: tenure and ARPU 0, custom attributes missing
    assert condition_holds(None, Condition("tenure_days", RuleOp.EQ, 0))
    assert condition_holds(None, Condition("arpu_minor", RuleOp.EQ, 0))
    assert not condition_holds(None, Condition("region", RuleOp.NE, "x"))
    assert condition_holds(profile(tenure=3, arpu=4), Condition("arpu_minor", RuleOp.EQ, 4))


# -- eligibility: minimum tenure, balance limit, bad-debt bar ------------------------------


def newcomer(tenure: int, **kw: object) -> SubscriberState:
    return state(prof=profile(tenure=tenure, arpu=0, region="cairo"), **kw)


def test_minimum_tenure_is_inclusive():
    # POLICY: min_tenure_days = 30; newcomers match on region whatever their tenure
    assert isinstance(decide(ask(1), newcomer(30), POLICY, NOW), Granted)
    refused = decide(ask(1), newcomer(29), POLICY, NOW)
    assert refused.reason is Reason.TENURE_TOO_SHORT
    assert offer(newcomer(29), POLICY, NOW).reason is Reason.TENURE_TOO_SHORT
    assert offer(newcomer(30), POLICY, NOW).eligible


def test_balance_limit_is_inclusive():
    # POLICY: max_balance_to_borrow_minor = 500
    assert isinstance(decide(ask(1), state(balance_minor=500), POLICY, NOW), Granted)
    assert decide(ask(1), state(balance_minor=501), POLICY, NOW).reason is (
        Reason.BALANCE_TOO_HIGH)


def test_bad_debt_limit_bars_at_the_limit_not_before():
    # NEWCOMER: bad_debt_limit = 1: one loan without a full payback bars the next
    assert NEWCOMER.bad_debt_limit == 1
    assert isinstance(decide(ask(1), newcomer(40, loans_since_full_payback=0), POLICY, NOW),
                      Granted)
    assert decide(ask(1), newcomer(40, loans_since_full_payback=1), POLICY, NOW).reason is (
        Reason.BARRED_BAD_DEBT)
    # STANDARD: limit 2
    std = profile(tenure=100, arpu=0)
    assert isinstance(decide(ask(1), state(prof=std, loans_since_full_payback=1), POLICY, NOW),
                      Granted)
    assert decide(ask(1), state(prof=std, loans_since_full_payback=2), POLICY, NOW).reason is (
        Reason.BARRED_BAD_DEBT)


# -- the ceiling: debt + amount + fee == ceiling fits, one more does not ------------------


def test_menu_and_decision_agree_at_the_ceiling_exactly():
    # STANDARD: ceiling 3300, flat fee 50; tier 8 = 3000 + 50 = 3050
    std = profile(tenure=100, arpu=0)
    at_ceiling = state(prof=std, loans=(loan("a", 200, 50),))  # debt 250 + 3050 = 3300
    menu = offer(at_ceiling, POLICY, NOW)
    tier8 = next(t for t in menu.tiers if t.tier_id == 8)
    assert (tier8.total_minor, tier8.fits) == (3050, True)
    assert menu.headroom_minor == 3050 and menu.debt_minor == 250
    assert isinstance(decide(ask(8), at_ceiling, POLICY, NOW), Granted)
    largest = decide(ask(None), at_ceiling, POLICY, NOW)
    assert isinstance(largest, Granted) and largest.tier.tier_id == 8

    past = state(prof=std, loans=(loan("a", 201, 50),))  # one minor unit more
    menu = offer(past, POLICY, NOW)
    assert not next(t for t in menu.tiers if t.tier_id == 8).fits
    assert next(t for t in menu.tiers if t.tier_id == 7).fits
    assert decide(ask(8), past, POLICY, NOW).reason is Reason.CEILING_REACHED
    largest = decide(ask(None), past, POLICY, NOW)
    assert isinstance(largest, Granted) and largest.tier.tier_id == 7


def test_menu_with_nothing_that_fits_and_a_debt_past_the_ceiling():
    std = profile(tenure=100, arpu=0)
    # debt 3300 - 69: the smallest tier (100 + fee 20) needs 120 of headroom
    menu = offer(state(prof=std, loans=(loan("a", 3181, 0),)), POLICY, NOW)
    assert menu.headroom_minor == 119
    assert not menu.eligible and menu.reason is Reason.CEILING_REACHED
    assert not any(t.fits for t in menu.tiers)
    menu = offer(state(prof=std, loans=(loan("a", 3180, 0),)), POLICY, NOW)
    assert menu.eligible and menu.reason is None
    assert [t.tier_id for t in menu.tiers if t.fits] == [1]
    # a debt above the ceiling (the ceiling was lowered): headroom 0, never negative
    menu = offer(state(prof=std, loans=(loan("a", 4000, 0),)), POLICY, NOW)
    assert menu.headroom_minor == 0 and menu.debt_minor == 4000


@given(debt=st.integers(0, 13_000), tier_id=st.integers(1, 12))
def test_menu_fits_exactly_when_decide_grants(debt, tier_id):
    s = state(loans=(loan("a", debt, 0),)) if debt else state()
    fits = next(t.fits for t in offer(s, POLICY, NOW).tiers if t.tier_id == tier_id)
    assert fits == isinstance(decide(ask(tier_id), s, POLICY, NOW), Granted)


def test_menu_lists_the_segment_tiers_smallest_first_with_their_fees():
    menu = offer(state(prof=profile(tenure=100, arpu=0)), POLICY, NOW)
    assert menu.segment_name == "standard"
    assert [(t.tier_id, t.amount_minor, t.fee_minor, t.total_minor) for t in menu.tiers][:3] == [
        (1, 100, 20, 120), (2, 200, 50, 250), (3, 500, 50, 550)]
    assert len(menu.tiers) == 8


def test_no_segment_and_barred_menus():
    menu = offer(state(prof=profile(tenure=10, arpu=0)), POLICY, NOW)
    assert (menu.eligible, menu.reason, menu.segment_name, menu.tiers) == (
        False, Reason.NO_SEGMENT, None, ())
    menu = offer(state(barred_manual=True), POLICY, NOW)
    assert (menu.eligible, menu.reason, menu.segment_name) == (
        False, Reason.BARRED_MANUAL, "gold")


def test_unknown_and_not_allowed_tiers():
    assert decide(ask(99), state(), POLICY, NOW).reason is Reason.UNKNOWN_TIER
    std = state(prof=profile(tenure=100, arpu=0))
    assert decide(ask(9), std, POLICY, NOW).reason is Reason.TIER_NOT_ALLOWED
    assert isinstance(decide(ask(8), std, POLICY, NOW), Granted)


# -- fees ----------------------------------------------------------------------------


def test_fee_clamps_at_max_exactly_and_is_never_negative():
    tier = Tier(1, 1000)
    assert fee_for(tier, FeePlan("p", flat_minor=70, max_fee_minor=70)) == 70
    assert fee_for(tier, FeePlan("p", flat_minor=71, max_fee_minor=70)) == 70
    assert fee_for(tier, FeePlan("p", flat_minor=70, max_fee_minor=None)) == 70
    # a negative flat part (not something config accepts) still gives no negative fee
    assert fee_for(tier, FeePlan("p", flat_minor=-100)) == 0
    assert fee_for(tier, FeePlan("p", flat_minor=-100, min_fee_minor=-5)) == 0
    # per-tier table wins, then the clamps apply to it too
    assert fee_for(tier, FeePlan("p", flat_minor=5, by_tier_minor={1: 3}, min_fee_minor=4)) == 4


# -- payback: allocation and ageing --------------------------------------------------


def test_ageing_boundaries_and_a_debt_of_one_minor_unit():
    pol = RecoveryPolicy()  # defaults: overdue at 30 days, written off at 180
    tiny = {"p_paid": 99, "f_paid": 10}  # owes 1 minor unit of principal
    fee_only = {"p_paid": 100, "f_paid": 9}  # owes 1 minor unit of fee
    a = ageing(
        [
            loan("young", 100, 10, at=NOW - timedelta(days=30) + timedelta(microseconds=1)),
            loan("overdue", 100, 10, **tiny, at=NOW - timedelta(days=30)),
            loan("overdue-fee", 100, 10, **fee_only, at=NOW - timedelta(days=179, hours=23)),
            loan("dead", 100, 10, **tiny, at=NOW - timedelta(days=180)),
            loan("paid", 100, 10, p_paid=100, f_paid=10, at=NOW - timedelta(days=400)),
        ],
        NOW,
        pol,
    )
    assert a.overdue == {"overdue", "overdue-fee"}
    assert a.to_write_off == {"dead"}


def test_recovery_policy_defaults_take_the_whole_recharge_fee_first():
    loans = [loan("a", 1000, 100)]
    r = allocate_payback(loans, 350, RecoveryPolicy())
    assert r.total_minor == 350  # 100 % share, nothing kept back
    assert [(p.fee_minor, p.principal_minor) for p in r.parts] == [(100, 250)]
    assert recoverable_minor(loans, 1, RecoveryPolicy()) == 1
    assert recoverable_minor(loans, 0, RecoveryPolicy()) == 0
    assert recoverable_minor(loans, -5, RecoveryPolicy()) == 0


def test_share_and_floor_boundaries():
    loans = [loan("a", 10_000, 0)]
    half = RecoveryPolicy(share_bp=5000)
    assert recoverable_minor(loans, 1001, half) == 500  # rounds down
    assert recoverable_minor(loans, 1000, RecoveryPolicy(min_balance_left_minor=1000)) == 0
    assert recoverable_minor(loans, 1001, RecoveryPolicy(min_balance_left_minor=1000)) == 1
    # below the floor already: nothing, never a negative amount
    assert recoverable_minor(loans, 999, RecoveryPolicy(min_balance_left_minor=1000)) == 0
    assert recoverable_minor([loan("a", 10, 0)], 1000, RecoveryPolicy()) == 10


def test_split_across_loans_both_orders():
    old = loan("old", 100, 10, at=NOW - timedelta(days=2))
    new = loan("new", 100, 10, at=NOW - timedelta(days=1))
    fee_first = split([new, old], 115, RecoveryPolicy())
    assert [(p.loan_id, p.fee_minor, p.principal_minor) for p in fee_first.parts] == [
        ("old", 10, 100), ("new", 5, 0)]
    assert fee_first.total_minor == 115 and not fee_first.clears_all
    pf = split([new, old], 115, RecoveryPolicy(order=PaybackOrder.PRINCIPAL_FIRST))
    assert [(p.loan_id, p.fee_minor, p.principal_minor) for p in pf.parts] == [
        ("old", 10, 100), ("new", 0, 5)]
    everything = split([new, old], 500, RecoveryPolicy())
    assert everything.total_minor == 220 and everything.clears_all
    # same creation time: the loan id decides
    a, b = loan("a", 50, 0), loan("b", 50, 0)
    assert [p.loan_id for p in split([b, a], 60, RecoveryPolicy()).parts] == ["a", "b"]


def test_split_skips_a_loan_with_nothing_owed():
    paid = loan("paid", 100, 10, p_paid=100, f_paid=10, at=NOW - timedelta(days=3))
    owing = loan("owing", 100, 10)
    r = split([paid, owing], 50, RecoveryPolicy())
    assert [(p.loan_id, p.fee_minor, p.principal_minor) for p in r.parts] == [("owing", 10, 40)]


# -- the core policy's defaults are the config's -------------------------------------


def test_core_defaults_are_the_configs_defaults():
    section = config.RecoverySection()
    core = RecoveryPolicy()
    assert core.order.value == section.order
    assert (core.share_bp, core.min_balance_left_minor, core.overdue_days,
            core.write_off_days) == (section.share_bp, section.min_balance_left_minor,
                                     section.overdue_days, section.write_off_days)
    elig = config.EligibilitySection()
    assert (EligibilityPolicy().min_tenure_days,
            EligibilityPolicy().max_balance_to_borrow_minor) == (
        elig.min_tenure_days, elig.max_balance_to_borrow_minor)
    plan = config.FeePlanSection()
    core_plan = FeePlan("p")
    assert (core_plan.flat_minor, core_plan.percent_bp, core_plan.min_fee_minor,
            core_plan.max_fee_minor, dict(core_plan.by_tier_minor)) == (
        plan.flat_minor, plan.percent_bp, plan.min_fee_minor, plan.max_fee_minor,
        plan.by_tier_minor)


def test_a_default_fee_plan_charges_nothing_and_a_default_state_may_borrow():
    assert fee_for(Tier(1, 1000), FeePlan("free")) == 0
    plain = SubscriberState(M, profile(tenure=400, arpu=6000))
    assert plain.debt_minor == 0
    assert isinstance(decide(ask(1), plain, POLICY, NOW), Granted)
    assert decide(ask(1, "auto"), plain, POLICY, NOW).reason is Reason.NOT_OPTED_IN
    assert offer(plain, POLICY, NOW).eligible


def test_eligibility_defaults_let_a_new_rich_subscriber_borrow():
    from tests.core.sample import make_policy

    lenient = make_policy(eligibility=EligibilityPolicy())
    fresh = state(prof=profile(tenure=0, arpu=0, region="giza"), balance_minor=10**9)
    assert isinstance(decide(ask(1), fresh, lenient, NOW), Granted)


# -- smaller rules the mutation run showed unchecked ---------------------------------


def test_a_subscriber_without_a_profile_has_tenure_zero():
    from tests.core.sample import make_policy

    anyone = Segment("anyone", (), 1000, (1,), "flat", 3)
    unknown = SubscriberState(M, None)
    open_door = make_policy(segments=(anyone,), eligibility=EligibilityPolicy())
    assert isinstance(decide(ask(1), unknown, open_door, NOW), Granted)
    one_day = make_policy(segments=(anyone,), eligibility=EligibilityPolicy(min_tenure_days=1))
    refused = decide(ask(1), unknown, one_day, NOW)
    assert refused.reason is Reason.TENURE_TOO_SHORT and refused.detail == "tenure 0 d < 1 d"


def test_no_segment_menu_has_no_headroom():
    menu = offer(state(prof=profile(tenure=10, arpu=0)), POLICY, NOW)
    assert (menu.headroom_minor, menu.debt_minor) == (0, 0)


def test_a_manual_bar_says_why():
    assert decide(ask(1), state(barred_manual=True), POLICY, NOW).detail == "barred by operator"
    barred = state(barred_manual=True, barred_reason="fraud")
    assert decide(ask(1), barred, POLICY, NOW).detail == "fraud"


def test_an_automatic_advance_for_a_named_tier_gets_that_tier():
    opted = state(auto_advance_opt_in=True)
    d = decide(ask(1, "auto"), opted, POLICY, NOW)
    assert isinstance(d, Granted) and d.tier.tier_id == 1


def test_split_of_a_negative_budget_takes_nothing():
    r = split([loan("a", 100, 10)], -5, RecoveryPolicy())
    assert (r.total_minor, r.parts, r.clears_all) == (0, (), False)
    assert split([], 0, RecoveryPolicy()).clears_all
