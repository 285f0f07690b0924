"""Bundle tiers in the decision: picked by kind, priced in money."""

from __future__ import annotations

from dataclasses import replace

from extrabalance.core.lending import BorrowRequest, Granted, Refused, decide, offer
from extrabalance.core.reasons import Reason
from tests.core.sample import NOW, POLICY, state


def test_a_bundle_tier_is_picked_only_when_its_kind_is_asked_for():
    """Plain LOAN (and the IN's CCR) never picks a bundle; DATA picks the largest data
    bundle that fits; a bundle named by its tier id is lent like any tier, in money."""
    from extrabalance.core.policy import Bundle, Tier

    data = Tier(13, 1000, Bundle("data", 500 * 2**20, rating_group=10))
    tiers = {**POLICY.tiers, 13: data}
    gold = replace(POLICY.segments[0], tier_ids=(*POLICY.segments[0].tier_ids, 13))
    policy = replace(POLICY, tiers=tiers, segments=(gold, *POLICY.segments[1:]))
    s = state(auto_advance_opt_in=True)
    plain = decide(BorrowRequest(s.msisdn, None, "sms"), s, policy, NOW)
    assert isinstance(plain, Granted) and plain.tier.bundle is None
    auto = decide(BorrowRequest(s.msisdn, None, "auto"), s, policy, NOW)
    assert isinstance(auto, Granted) and auto.tier.bundle is None
    asked = decide(BorrowRequest(s.msisdn, None, "sms", "data"), s, policy, NOW)
    assert isinstance(asked, Granted) and asked.tier == data
    assert (asked.amount_minor, asked.fee_minor) == (1000, 100)  # 10 % of the price
    named = decide(BorrowRequest(s.msisdn, 13, "ussd"), s, policy, NOW)
    assert isinstance(named, Granted) and named.tier == data
    menu = offer(s, policy, NOW)
    assert [t.bundle for t in menu.tiers if t.tier_id == 13] == [data.bundle]
    none = decide(BorrowRequest(s.msisdn, None, "sms", "voice"), s, policy, NOW)
    assert isinstance(none, Refused) and none.reason is Reason.CEILING_REACHED
