"""Table-driven business cases: the service's answer agrees with the pure core for every
segment x tier x starting debt, and the ledger books exactly what was granted; payback
amounts across recharge sizes."""

import pytest

from extrabalance.core.lending import BorrowRequest, Granted, decide
from extrabalance.core.model import OpenLoan, SubscriberProfile, SubscriberState
from extrabalance.service.outcomes import BorrowStatus
from extrabalance.service.ports import RechargeEvent
from tests.core.sample import NOW, POLICY

M = "201001234567"
PROFILES = {
    "gold": (400, 6000, {}),
    "standard": (100, 0, {}),
    "newcomer": (40, 0, {"region": "cairo"}),
}


@pytest.mark.parametrize("segment", sorted(PROFILES))
@pytest.mark.parametrize("tier", [None, *range(1, 13)])
@pytest.mark.parametrize("first_tier", [None, 3])
async def test_service_agrees_with_core(h, segment, tier, first_tier):
    tenure, arpu, attrs = PROFILES[segment]
    await h.add_profile(M, tenure, arpu, **attrs)
    loans = ()
    if first_tier is not None:
        first = await h.lending.borrow(M, first_tier, "ussd", "first")
        if first.status is BorrowStatus.GRANTED:
            loans = (
                OpenLoan(first.loan_id, first_tier, first.amount_minor, first.fee_minor, 0, 0, NOW),
            )
    # Every loan counts toward the bad-debt bar until a full payback.
    state = SubscriberState(M, SubscriberProfile(M, tenure, arpu, attrs), loans,
                            loans_since_full_payback=len(loans))
    expected = decide(BorrowRequest(M, tier, "ussd"), state, POLICY, NOW)
    out = await h.lending.borrow(M, tier, "sms", "second")
    if isinstance(expected, Granted):
        assert out.status is BorrowStatus.GRANTED
        assert (out.tier_id, out.amount_minor, out.fee_minor) == (
            expected.tier.tier_id,
            expected.amount_minor,
            expected.fee_minor,
        )
        assert out.debt_minor == state.debt_minor + expected.amount_minor + expected.fee_minor
    else:
        assert out.status is BorrowStatus.REFUSED and out.reason is expected.reason
    inv = await h.check_invariants()
    assert inv["debts"].get(M, 0) == out.debt_minor
    assert sum(h.fake_in.credits.values()) == sum(ln.principal_minor for ln in loans) + (
        out.amount_minor if out.status is BorrowStatus.GRANTED else 0
    )


@pytest.mark.parametrize("balance", [0, 1, 50, 100, 109, 110, 111, 500, 1099, 1100, 5000])
@pytest.mark.parametrize("use_balance_after", [False, True])
async def test_payback_amounts(h, balance, use_balance_after):
    await h.add_profile(M)
    await h.lending.borrow(M, 4, "ussd", "k")  # 1000 + 100
    h.fake_in.balances[M] = balance
    event = RechargeEvent(
        "e", M, balance, "in-a.operator.example", balance if use_balance_after else None
    )
    out = await h.payback.handle_recharge(event)
    expected = min(balance, 1100)
    assert out.recovered_minor == expected and out.debt_minor == 1100 - expected
    assert h.fake_in.balances[M] == balance - expected
    inv = await h.check_invariants()
    assert inv["recovered"] == expected and inv["debts"][M] == 1100 - expected
