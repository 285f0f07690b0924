"""Limits from behaviour through the services: each recharge and payback moves the
subscriber's limit in its own unit of work, the borrow decision lends up to
min(segment ceiling, limit), and the limit with its reason reaches the status (USSD
"My account"), the EDR and the admin view. Off by default: nothing changes then."""

from __future__ import annotations

from dataclasses import replace

from extrabalance.core.limits import LimitPolicy, LimitReason, LimitState
from extrabalance.service.limits import limit_view
from extrabalance.service.outcomes import BorrowStatus, PaybackStatus
from extrabalance.service.ports import RechargeEvent
from tests.core.sample import POLICY
from tests.service.fakes import Harness

M = "201001234567"
IN_A = "in-a.operator.example"
LIMITED = replace(POLICY, limits=LimitPolicy())  # 50 % of 30 days' recharges, +10 %/payback


def recharge(event_id: str, amount: int) -> RechargeEvent:
    return RechargeEvent(event_id, M, amount, IN_A, amount)


async def test_a_limit_that_follows_recharges_and_rises_after_a_payback(tmp_path):
    h = Harness(tmp_path / "ledger.db", LIMITED)
    try:
        await h.add_profile(M)  # gold: ceiling 120.00, fee 10 %
        assert (await h.lending.status(M)).limit.limit_minor == 0  # no recharge yet
        out = await h.payback.handle_recharge(recharge("e1", 4000))
        assert out.status is PaybackStatus.NOTHING_OWED
        again = await h.payback.handle_recharge(recharge("e1", 4000))  # a replay counts once
        assert again.replayed
        status = await h.lending.status(M)
        assert (status.limit.limit_minor, status.limit.reason) == (2000, LimitReason.RECHARGES)

        loan = await h.lending.borrow(M, None, "ussd", "k1")  # the largest that fits 20.00
        assert (loan.status, loan.amount_minor, loan.fee_minor) == (BorrowStatus.GRANTED, 1500, 150)
        edr = [f for k, f in h.events.events if k == "loan"][-1]
        assert (edr["limit_minor"], edr["limit_reason"]) == (2000, "recharges")
        refused = await h.lending.borrow(M, 3, "ussd", "k2")  # 16.50 + 5.50 > 20.00
        assert refused.reason.value == "CEILING_REACHED"
        edr = [f for k, f in h.events.events if k == "refusal"][-1]
        assert edr["limit_minor"] == 2000

        h.fake_in.balances[M] = 2000
        h.clock.advance(days=3)
        paid = await h.payback.handle_recharge(recharge("e2", 2000))
        assert (paid.status, paid.debt_minor) == (PaybackStatus.RECOVERED, 0)
        # 50 % of 60.00 recharged = 30.00, +10 % for the on-time full payback.
        status = await h.lending.status(M)
        assert status.limit.limit_minor == 3300 and status.limit.adjust_bp == 1000
        view = await h.ledger.read_point(lambda tx: limit_view(tx, M, LIMITED, h.clock()))
        assert view is not None
        assert (view["limit_minor"], view["reason"], view["on_time_paybacks"]) == (
            3300, "recharges", 1)
    finally:
        await h.close()


async def test_a_late_payback_lowers_the_limit(tmp_path):
    h = Harness(tmp_path / "ledger.db", LIMITED)
    try:
        await h.add_profile(M)
        await h.payback.handle_recharge(recharge("e1", 10000))
        assert (await h.lending.borrow(M, 4, "ussd", "k1")).status is BorrowStatus.GRANTED
        h.clock.advance(days=15)  # past on_time_days (14)
        h.fake_in.balances[M] = 1100
        paid = await h.payback.handle_recharge(recharge("e2", 1100))
        assert paid.debt_minor == 0
        limit = (await h.lending.status(M)).limit
        # 50 % of 111.00 = 55.50, -20 % for the late payback.
        assert (limit.limit_minor, limit.adjust_bp) == (4440, -2000)
    finally:
        await h.close()


async def test_off_by_default_nothing_is_kept_or_shown(h):
    await h.add_profile(M)
    await h.payback.handle_recharge(recharge("e1", 100))
    status = await h.lending.status(M)
    assert status.limit is None
    loan = await h.lending.borrow(M, None, "ussd", "k1")
    assert loan.amount_minor == 10000  # the segment ceiling alone: 100.00 + 10.00 fee
    assert "limit_minor" not in [f for k, f in h.events.events if k == "loan"][-1]
    assert await h.ledger.read(lambda tx: tx.limit_state(M)) == LimitState()
