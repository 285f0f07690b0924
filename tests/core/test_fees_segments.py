from hypothesis import given
from hypothesis import strategies as st

from extrabalance.core.fees import fee_for
from extrabalance.core.policy import Condition, FeePlan, RuleOp, Segment, Tier
from extrabalance.core.segments import condition_holds, match_segment
from tests.core.sample import GOLD, NEWCOMER, STANDARD, profile


def test_flat_fee():
    assert fee_for(Tier(2, 200), FeePlan("f", flat_minor=50)) == 50


def test_per_tier_table_wins_over_flat():
    assert fee_for(Tier(1, 100), FeePlan("f", flat_minor=50, by_tier_minor={1: 20})) == 20


def test_percent_rounds_half_up():
    plan = FeePlan("p", percent_bp=250)  # 2.5 %
    assert fee_for(Tier(1, 100), plan) == 3  # 2.5 -> 3
    assert fee_for(Tier(1, 140), plan) == 4  # 3.5 -> 4
    assert fee_for(Tier(1, 139), plan) == 3  # 3.475 -> 3


def test_clamps():
    plan = FeePlan("p", percent_bp=1000, min_fee_minor=30, max_fee_minor=300)
    assert fee_for(Tier(1, 100), plan) == 30
    assert fee_for(Tier(1, 10000), plan) == 300
    assert fee_for(Tier(1, 1000), plan) == 100


@given(
    amount=st.integers(0, 10**9),
    flat=st.integers(0, 10**6),
    bp=st.integers(0, 10_000),
    lo=st.integers(0, 10**6),
    hi=st.none() | st.integers(0, 10**7),
)
def test_fee_is_exact_and_bounded(amount, flat, bp, lo, hi):
    plan = FeePlan("p", flat_minor=flat, percent_bp=bp, min_fee_minor=lo, max_fee_minor=hi)
    fee = fee_for(Tier(1, amount), plan)
    assert isinstance(fee, int) and fee >= 0
    exact2 = 2 * (flat * 10_000 + amount * bp)  # twice the fee, in 1/10_000 units
    unclamped = fee_for(Tier(1, amount), FeePlan("u", flat_minor=flat, percent_bp=bp))
    # half up: |unclamped - exact| <= 1/2, and ties go up
    assert abs(unclamped * 20_000 - exact2) <= 10_000
    if hi is None or hi >= lo:
        assert fee >= lo and (hi is None or fee <= hi)


def test_first_match_wins_and_missing_profile():
    segs = (GOLD, STANDARD, NEWCOMER)
    assert match_segment(profile(tenure=400, arpu=6000), segs) is GOLD
    assert match_segment(profile(tenure=400, arpu=10), segs) is STANDARD
    assert match_segment(profile(tenure=5, arpu=10, region="giza"), segs) is NEWCOMER
    assert match_segment(profile(tenure=5, arpu=10, region="aswan"), segs) is None
    assert match_segment(None, segs) is None
    everyone = Segment("all", (), 100, (1,), "f", 1)
    assert match_segment(None, (everyone,)) is everyone


def test_conditions():
    p = profile(tenure=10, arpu=20, region="cairo", level=3)
    assert condition_holds(p, Condition("level", RuleOp.GT, 2))
    assert not condition_holds(p, Condition("level", RuleOp.LT, 3))
    assert condition_holds(p, Condition("level", RuleOp.LE, 3))
    assert condition_holds(p, Condition("region", RuleOp.EQ, "cairo"))
    assert condition_holds(p, Condition("region", RuleOp.NE, "giza"))
    assert not condition_holds(p, Condition("missing", RuleOp.NE, "x"))
    # comparing a string with a number is false rather than an error
    assert not condition_holds(p, Condition("region", RuleOp.GE, 3))
    assert condition_holds(None, Condition("tenure_days", RuleOp.EQ, 0))


@given(tenure=st.integers(0, 5000), arpu=st.integers(0, 10**6))
def test_matched_segment_really_matches(tenure, arpu):
    p = profile(tenure=tenure, arpu=arpu)
    segs = (GOLD, STANDARD, NEWCOMER)
    seg = match_segment(p, segs)
    if seg is None:
        assert not any(all(condition_holds(p, c) for c in s.conditions) for s in segs)
    else:
        earlier = segs[: segs.index(seg)]
        assert all(condition_holds(p, c) for c in seg.conditions)
        assert not any(all(condition_holds(p, c) for c in s.conditions) for s in earlier)
