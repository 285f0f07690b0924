from datetime import timedelta

import pytest

from extrabalance.core.policy import RecoveryPolicy
from extrabalance.service.outcomes import PaybackStatus
from extrabalance.service.ports import InAction, RechargeEvent
from tests.core.sample import make_policy
from tests.service.fakes import LOST_ANSWER, NOT_EXECUTED, REFUSE, TIMEOUT, Harness

M = "201001234567"
IN_A = "in-a.operator.example"


def recharge(event_id, amount, balance_after=None, msisdn=M, node=IN_A):
    return RechargeEvent(event_id, msisdn, amount, node, balance_after)


async def borrow(h, tier=4, key="k"):
    await h.add_profile(M)
    out = await h.lending.borrow(M, tier, "ussd", key)
    assert out.status.value == "GRANTED"
    return out


async def test_nothing_owed_recorded_and_replayed(h):
    out = await h.payback.handle_recharge(recharge("e1", 1000))
    assert out.status is PaybackStatus.NOTHING_OWED and not out.replayed
    again = await h.payback.handle_recharge(recharge("e1", 1000))
    assert again.replayed and again.status is PaybackStatus.NOTHING_OWED
    assert h.fake_in.calls == []
    assert (await h.learned_route(M)) == IN_A


async def test_full_payback(h):
    await borrow(h)  # 1000 + 100
    h.fake_in.balances[M] = 2000
    out = await h.payback.handle_recharge(recharge("e1", 2000))
    assert out.status is PaybackStatus.RECOVERED
    assert (out.recovered_minor, out.debt_minor) == (1100, 0)
    assert h.fake_in.balances[M] == 900
    debit = h.fake_in.calls[-1]
    assert debit.action.name == "DIRECT_DEBITING" and debit.amount_minor == 1100
    inv = await h.check_invariants()
    assert inv["debts"][M] == 0 and inv["totals"]["recovered_cash"] == 1100
    assert h.notifier.sent[-1].template == "payback_full"
    assert h.notifier.sent[-1].params == {"recovered": 1100}
    view = await h.view(M)
    assert view["loans"][0]["state"] == "REPAID"


async def test_partial_payback_fee_first(h):
    await borrow(h)
    h.fake_in.balances[M] = 300
    out = await h.payback.handle_recharge(recharge("e1", 300, balance_after=300))
    assert (out.recovered_minor, out.debt_minor) == (300, 800)
    view = await h.view(M)
    loan = view["loans"][0]
    assert loan["state"] == "PARTIALLY_REPAID"
    assert (loan["fee_repaid_minor"], loan["principal_repaid_minor"]) == (100, 200)
    assert h.notifier.sent[-1].template == "payback_partial"
    assert h.notifier.sent[-1].params == {"recovered": 300, "debt": 800}


async def test_replay_changes_nothing(h):
    await borrow(h)
    h.fake_in.balances[M] = 5000
    first = await h.payback.handle_recharge(recharge("e1", 5000))
    again = await h.payback.handle_recharge(recharge("e1", 5000))
    assert again.replayed and again.recovered_minor == first.recovered_minor
    assert len(h.fake_in.debits) == 1 and h.fake_in.balances[M] == 3900


async def test_refused_retries_with_half_each_with_own_session(h):
    await borrow(h)
    h.fake_in.balances[M] = 500  # the recharge says 5000 but the balance moved
    out = await h.payback.handle_recharge(recharge("e1", 5000))
    # asks 1100 (refused), 550 (refused), 275 (ok)
    asks = [c.amount_minor for c in h.fake_in.calls if c.action.name == "DIRECT_DEBITING"]
    assert asks == [1100, 550, 275]
    sessions = {c.session_id for c in h.fake_in.calls if c.action.name == "DIRECT_DEBITING"}
    assert len(sessions) == 3
    assert out.recovered_minor == 275 and out.debt_minor == 825
    attempts = await h.recovery_attempts()
    assert attempts == [(1, 1100, "REFUSED"), (2, 550, "REFUSED"), (3, 275, "DONE")]


async def test_all_attempts_refused_leaves_debt_for_next_recharge(h):
    await borrow(h)
    h.fake_in.fail_next(REFUSE, REFUSE, REFUSE)
    out = await h.payback.handle_recharge(recharge("e1", 5000))
    assert out.status is PaybackStatus.NOT_RECOVERED and out.debt_minor == 1100
    h.fake_in.balances[M] = 5000
    out = await h.payback.handle_recharge(recharge("e2", 5000))
    assert out.recovered_minor == 1100


@pytest.mark.parametrize("fault", [TIMEOUT, LOST_ANSWER])
async def test_unknown_left_for_resolver(h, fault):
    await borrow(h)
    h.fake_in.balances[M] = 5000
    h.fake_in.fail_next(fault)
    out = await h.payback.handle_recharge(recharge("e1", 5000))
    assert out.status is PaybackStatus.PENDING
    again = await h.payback.handle_recharge(recharge("e1", 5000))
    assert again.replayed and again.status is PaybackStatus.PENDING
    # another recharge meanwhile must not recover the same debt twice
    deferred = await h.payback.handle_recharge(recharge("e2", 5000))
    assert deferred.status is PaybackStatus.DEFERRED
    await h.resolver.run_once()
    assert len(h.fake_in.debits) == 1 and h.fake_in.balances[M] == 3900
    final = await h.payback.handle_recharge(recharge("e1", 5000))
    assert final.replayed and final.recovered_minor == 1100 and final.debt_minor == 0
    inv = await h.check_invariants()
    assert inv["debts"][M] == 0


async def test_not_executed_resent(h):
    await borrow(h)
    h.fake_in.balances[M] = 5000
    h.fake_in.fail_next(NOT_EXECUTED)
    out = await h.payback.handle_recharge(recharge("e1", 5000))
    assert out.recovered_minor == 1100


async def test_oldest_loan_first_across_loans(h):
    await borrow(h, tier=4, key="a")  # 1100
    h.clock.advance(hours=1)
    await h.lending.borrow(M, 3, "ussd", "b")  # 500 + 50
    h.fake_in.balances[M] = 1300
    out = await h.payback.handle_recharge(recharge("e1", 1300))
    assert out.recovered_minor == 1300 and out.debt_minor == 350
    view = await h.view(M)
    states = [(ln["tier_id"], ln["state"]) for ln in view["loans"]]
    assert states == [(4, "REPAID"), (3, "PARTIALLY_REPAID")]


async def test_share_and_min_balance_policy(tmp_path):
    policy = make_policy(recovery=RecoveryPolicy(share_bp=5000, min_balance_left_minor=100))
    h = Harness(tmp_path / "l.db", policy)
    try:
        await borrow(h)
        h.fake_in.balances[M] = 1000
        out = await h.payback.handle_recharge(recharge("e1", 1000, balance_after=1000))
        assert out.recovered_minor == 500
        out = await h.payback.handle_recharge(recharge("e2", 150, balance_after=150))
        assert out.recovered_minor == 50
        out = await h.payback.handle_recharge(recharge("e3", 80, balance_after=80))
        assert out.status is PaybackStatus.NOTHING_RECOVERABLE
    finally:
        await h.close()


async def test_write_off_aged_debt(h):
    await borrow(h)
    h.clock.advance(days=40)
    report = await h.accounts.age_debts()
    assert (report.overdue_loans, report.written_off_loans) == (1, 0)
    h.clock.advance(days=150)
    report = await h.accounts.age_debts()
    assert (report.written_off_loans, report.written_off_minor) == (1, 1100)
    inv = await h.check_invariants()
    assert inv["debts"][M] == 0 and inv["totals"]["written_off"] == 1100
    assert "write_off" in h.events.kinds()
    assert (await h.accounts.age_debts()).written_off_loans == 0


async def test_recharge_learns_route_over_static(h):
    await borrow(h)
    await h.payback.handle_recharge(recharge("e1", 0, node="in-b.operator.example"))
    assert h.router.route(M) == "in-b.operator.example"
    h.clock.advance(seconds=1)
    h.fake_in.balances[M] = 0
    await h.lending.borrow(M, 1, "ussd", "k2")
    assert h.fake_in.calls[-1].in_node == "in-b.operator.example"
    assert timedelta(0) is not None


async def test_no_write_off_while_a_recovery_is_unsettled(h):
    # found by the stateful test: ageing wrote off a loan a pending debit then paid
    await borrow(h)
    h.fake_in.balances[M] = 5000
    h.fake_in.fail_next(LOST_ANSWER)
    await h.payback.handle_recharge(recharge("e1", 5000))
    h.clock.advance(days=200)
    assert (await h.accounts.age_debts()).written_off_loans == 0
    await h.resolver.run_once()
    inv = await h.check_invariants()
    assert inv["debts"][M] == 0 and inv["totals"]["written_off"] == 0


async def test_too_busy_every_time_resends_the_same_debit_later_never_a_smaller_one(h):
    """Issue 16: 3004 (and 3002) mean "not executed, the same request later" (RFC 6733
    §7.1.3): the recovery stays pending and the same Session-Id and amount are re-sent;
    halving the amount under a new Session-Id is for 4012 alone."""
    await borrow(h)
    h.fake_in.balances[M] = 5000
    h.fake_in.fail_next(NOT_EXECUTED, NOT_EXECUTED, NOT_EXECUTED)
    out = await h.payback.handle_recharge(recharge("e1", 5000))
    assert out.status is PaybackStatus.PENDING and h.fake_in.debits == {}
    await h.resolver.run_once()
    debits = [(c.session_id, c.amount_minor) for c in h.fake_in.calls
              if c.action is InAction.DIRECT_DEBITING]
    assert len(debits) == 4 and len(set(debits)) == 1 and debits[0][1] == 1100
    final = await h.payback.handle_recharge(recharge("e1", 5000))
    assert final.recovered_minor == 1100 and final.debt_minor == 0
    assert (await h.check_invariants())["debts"][M] == 0


async def test_4012_alone_is_retried_smaller(h):
    await borrow(h)
    h.fake_in.balances[M] = 5000
    h.fake_in.fail_next(REFUSE)  # the fake refuses a debit with 4012: halved
    out = await h.payback.handle_recharge(recharge("e1", 5000))
    assert out.recovered_minor == 550  # 4012 → half under a new Session-Id


async def test_a_pending_debit_is_followed_up_on_the_tx_schedule(h):
    """A slow IN: the debit's answer is lost; the follow-up re-sends it (same
    Session-Id) without waiting for the periodic resolver run."""
    h.payback.follow_up = h.resolver.follow_up
    h.resolver.follow_up_delays_s = (0.0, 0.0)
    await borrow(h)
    h.fake_in.balances[M] = 5000
    h.fake_in.fail_next(TIMEOUT)
    out = await h.payback.handle_recharge(recharge("e1", 5000))
    assert out.status is PaybackStatus.PENDING
    await h.resolver.drain_follow_ups()
    debits = [c for c in h.fake_in.calls if c.action is InAction.DIRECT_DEBITING]
    assert len(debits) == 2 and debits[0].session_id == debits[1].session_id
    assert (await h.check_invariants())["debts"][M] == 0
