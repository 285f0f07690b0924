import asyncio

import pytest

from extrabalance.core.reasons import Reason
from extrabalance.service.outcomes import BorrowStatus
from tests.service.fakes import CRASH_AFTER, LOST_ANSWER, NOT_EXECUTED, REFUSE, TIMEOUT

M = "201001234567"  # routed statically to in-a


async def test_grant_credits_in_and_journal(h):
    await h.add_profile(M)
    out = await h.lending.borrow(M, 4, "ussd", "ussd:s1:1")
    assert out.status is BorrowStatus.GRANTED and not out.replayed
    assert (out.amount_minor, out.fee_minor, out.debt_minor) == (1000, 100, 1100)
    assert h.fake_in.balances[M] == 1000
    op = h.fake_in.calls[0]
    assert op.action.name == "REFUND_ACCOUNT" and op.in_node == "in-a.operator.example"
    assert not op.retransmission
    inv = await h.check_invariants()
    assert inv["debts"] == {M: 1100}
    assert inv["totals"]["disbursed_float"] == -1000 and inv["totals"]["fee_income"] == -100
    assert h.notifier.sent[-1].template == "loan_granted"
    assert h.notifier.sent[-1].params == {"amount": 1000, "fee": 100, "debt": 1100}
    assert h.events.kinds() == ["loan"]


async def test_replay_returns_first_outcome_and_credits_once(h):
    await h.add_profile(M)
    first = await h.lending.borrow(M, 2, "sms", "sms:msg-9")
    again = await h.lending.borrow(M, 2, "sms", "sms:msg-9")
    assert again.replayed and again.status is BorrowStatus.GRANTED
    assert again.loan_id == first.loan_id and again.debt_minor == first.debt_minor
    assert len(h.fake_in.calls) == 1 and len(h.fake_in.credits) == 1
    assert h.notifier.templates() == ["loan_granted"]


async def test_refusal_is_idempotent_and_notified(h):
    await h.add_profile(M, tenure_days=100, arpu_minor=0)  # standard segment
    out = await h.lending.borrow(M, 9, "ussd", "k1")
    assert out.status is BorrowStatus.REFUSED and out.reason is Reason.TIER_NOT_ALLOWED
    again = await h.lending.borrow(M, 9, "ussd", "k1")
    assert again.replayed and again.reason is Reason.TIER_NOT_ALLOWED
    assert h.fake_in.calls == []
    assert h.notifier.templates() == ["loan_refused"]
    assert h.notifier.sent[0].params == {"reason": "TIER_NOT_ALLOWED"}


async def test_unknown_subscriber_refused(h):
    out = await h.lending.borrow("999000", 1, "ussd", "k")
    assert out.reason is Reason.UNKNOWN_SUBSCRIBER


async def test_no_profile_means_no_segment(h):
    out = await h.lending.borrow(M, 1, "ussd", "k")
    assert out.reason is Reason.NO_SEGMENT


async def test_in_refusal_fails_loan_nothing_owed(h):
    await h.add_profile(M)
    h.fake_in.fail_next(REFUSE)
    out = await h.lending.borrow(M, 3, "ussd", "k")
    assert out.status is BorrowStatus.REFUSED and out.reason is Reason.IN_REFUSED
    inv = await h.check_invariants()
    assert inv["debts"] == {} and inv["granted_sessions"] == {}
    view = await h.view(M)
    assert view["loans"][0]["state"] == "FAILED"
    assert (await h.lending.borrow(M, 3, "ussd", "k")).reason is Reason.IN_REFUSED


async def test_not_executed_is_resent_same_session(h):
    await h.add_profile(M)
    h.fake_in.fail_next(NOT_EXECUTED)
    out = await h.lending.borrow(M, 3, "ussd", "k")
    assert out.status is BorrowStatus.GRANTED
    assert len(h.fake_in.calls) == 2
    assert h.fake_in.calls[0].session_id == h.fake_in.calls[1].session_id
    assert not h.fake_in.calls[1].retransmission


async def test_not_executed_every_time_fails_cleanly(h):
    await h.add_profile(M)
    h.fake_in.fail_next(NOT_EXECUTED, NOT_EXECUTED, NOT_EXECUTED)
    out = await h.lending.borrow(M, 3, "ussd", "k")
    assert out.status is BorrowStatus.REFUSED
    assert h.fake_in.credits == {}


@pytest.mark.parametrize("fault", [TIMEOUT, LOST_ANSWER])
async def test_unknown_goes_pending_then_resolver_settles(h, fault):
    await h.add_profile(M)
    h.fake_in.fail_next(fault)
    out = await h.lending.borrow(M, 3, "ussd", "k")
    assert out.status is BorrowStatus.PENDING
    assert h.notifier.templates() == ["loan_pending"]
    # new traffic for this subscriber waits for the resolver
    blocked = await h.lending.borrow(M, 1, "ussd", "k2")
    assert blocked.reason is Reason.OPERATION_PENDING
    replay = await h.lending.borrow(M, 3, "ussd", "k")
    assert replay.replayed and replay.status is BorrowStatus.PENDING
    report = await h.resolver.run_once()
    assert report.loans_settled == 1
    resent = h.fake_in.calls[-1]
    assert resent.retransmission and resent.session_id == h.fake_in.calls[0].session_id
    assert len(h.fake_in.credits) == 1  # applied once whichever way the fault went
    final = await h.lending.borrow(M, 3, "ussd", "k")
    assert final.replayed and final.status is BorrowStatus.GRANTED
    assert h.notifier.templates()[-1] == "loan_granted"
    inv = await h.check_invariants()
    assert set(inv["granted_sessions"]) == set(h.fake_in.credits)
    assert (await h.lending.borrow(M, 1, "ussd", "k3")).status is BorrowStatus.GRANTED


async def test_resolver_leaves_unknown_and_flags_for_review(h):
    await h.add_profile(M)
    h.fake_in.fail_next(TIMEOUT)
    await h.lending.borrow(M, 3, "ussd", "k")
    for _ in range(5):
        h.fake_in.fail_next(TIMEOUT)
        report = await h.resolver.run_once()
    assert report.flagged_for_review == 1
    assert (await h.resolver.run_once()).still_unknown == 0  # no longer retried
    assert "review" in h.events.kinds()
    view = await h.view(M)
    assert view["loans"][0]["needs_review"] == 1 and view["operation_pending"]
    assert any(a["action"] == "review" for a in view["audit"])


async def test_crash_after_in_applied_resolves_to_active(h):
    from tests.service.fakes import SimulatedCrash

    await h.add_profile(M)
    h.fake_in.fail_next(CRASH_AFTER)
    with pytest.raises(SimulatedCrash):
        await h.lending.borrow(M, 5, "ussd", "k")
    await h.restart()
    view = await h.view(M)
    assert view["loans"][0]["state"] == "CREDITING"
    await h.resolver.run_once()
    inv = await h.check_invariants()
    assert inv["debts"] == {M: 1650}
    assert list(h.fake_in.credits.values()) == [1500]


async def test_ceiling_holds_under_200_concurrent_borrows(h):
    await h.add_profile(M)
    outs = await asyncio.gather(*(h.lending.borrow(M, 2, "ussd", f"k{i}") for i in range(200)))
    granted = [o for o in outs if o.status is BorrowStatus.GRANTED]
    # gold: ceiling 12000, tier 2 costs 200 + 20 fee -> 54 loans fit... until the bad-debt bar
    inv = await h.check_invariants()
    assert inv["debts"][M] <= 12000
    assert len(granted) == len(h.fake_in.credits)
    reasons = {o.reason for o in outs if o.status is BorrowStatus.REFUSED}
    assert reasons <= {Reason.CEILING_REACHED, Reason.BARRED_BAD_DEBT}
    assert len(h.locks) == 0


async def test_many_subscribers_concurrently(h):
    ms = [f"2010000{i:05d}" for i in range(50)]
    for m in ms:
        await h.add_profile(m)
    outs = await asyncio.gather(*(h.lending.borrow(m, 12, "ussd", m) for m in ms))
    assert all(o.status is BorrowStatus.GRANTED for o in outs)
    inv = await h.check_invariants()
    assert sum(inv["debts"].values()) == 50 * 11000


async def test_bad_debt_bar_and_lift_on_full_payback(h):
    from extrabalance.service.ports import RechargeEvent

    await h.add_profile(M)
    for i in range(3):  # every loan counts until a full payback (limit 3)
        out = await h.lending.borrow(M, 1, "ussd", f"k{i}")
        assert out.status is BorrowStatus.GRANTED
    out = await h.lending.borrow(M, 1, "ussd", "k4")
    assert out.reason is Reason.BARRED_BAD_DEBT
    h.fake_in.balances[M] = 10_000
    pay = await h.payback.handle_recharge(RechargeEvent("e1", M, 5000, "in-a.operator.example"))
    assert pay.debt_minor == 0
    assert (await h.lending.borrow(M, 1, "ussd", "k5")).status is BorrowStatus.GRANTED


async def test_manual_bar_unbar_audited(h):
    await h.add_profile(M)
    await h.accounts.bar(M, "fraud suspicion", "ops:alice")
    assert (await h.lending.borrow(M, 1, "ussd", "k")).reason is Reason.BARRED_MANUAL
    status = await h.lending.status(M)
    assert status.barred and status.barred_reason is Reason.BARRED_MANUAL
    h.clock.advance(minutes=1)
    await h.accounts.unbar(M, "ops:bob", "cleared")
    assert (await h.lending.borrow(M, 1, "ussd", "k2")).status is BorrowStatus.GRANTED
    view = await h.view(M)
    assert [(a["action"], a["who"]) for a in reversed(view["audit"])] == [
        ("bar", "ops:alice"),
        ("unbar", "ops:bob"),
    ]
    assert h.events.kinds()[:2] == ["bar", "refusal"]


async def test_quote_status_preferences(h):
    await h.add_profile(M)
    await h.lending.borrow(M, 8, "ussd", "k")  # 3000 + 300
    q = await h.lending.quote(M)
    assert q.eligible and q.debt_minor == 3300 and q.headroom_minor == 8700
    assert [t.tier_id for t in q.tiers if t.fits] == list(range(1, 12))  # 7500 + 750 fits
    await h.lending.set_preferences(M, auto_advance=True, language="ar")
    s = await h.lending.status(M)
    assert s.auto_advance_opt_in and s.language == "ar" and s.debt_minor == 3300
    assert s.in_node == "in-a.operator.example" and not s.barred
    await h.lending.borrow(M, 1, "ussd", "k2")
    assert h.notifier.sent[-1].language == "ar"


async def test_broken_notifier_does_not_undo_loan(h):
    await h.add_profile(M)
    h.notifier.broken = True
    out = await h.lending.borrow(M, 1, "ussd", "k")
    assert out.status is BorrowStatus.GRANTED
    assert (await h.check_invariants())["debts"] == {M: 110}


async def test_in_port_raising_is_treated_as_unknown(h):
    await h.add_profile(M)

    async def boom(op):
        raise RuntimeError("adapter bug")

    real = h.fake_in.execute
    h.fake_in.execute = boom
    out = await h.lending.borrow(M, 1, "ussd", "k")
    assert out.status is BorrowStatus.PENDING
    h.fake_in.execute = real
    await h.resolver.run_once()
    assert (await h.lending.borrow(M, 1, "ussd", "k")).status is BorrowStatus.GRANTED


@pytest.mark.parametrize("tier", list(range(1, 13)))
@pytest.mark.parametrize(
    ("tenure", "arpu", "allowed"),
    [
        (400, 6000, set(range(1, 13))),  # gold
        (100, 0, set(range(1, 9))),  # standard
    ],
)
async def test_tier_matrix(h, tier, tenure, arpu, allowed):
    await h.add_profile(M, tenure_days=tenure, arpu_minor=arpu)
    out = await h.lending.borrow(M, tier, "ussd", "k")
    if tier in allowed:
        # standard ceiling is 3300; tier 8 (3000 + 50 flat) fits, all do
        assert out.status is BorrowStatus.GRANTED, out
        assert out.amount_minor == h.policy.tiers[tier].amount_minor
    else:
        assert out.reason is Reason.TIER_NOT_ALLOWED


async def test_cancelled_caller_does_not_strand_the_loan(h):
    await h.add_profile(M)
    gate = asyncio.Event()
    real = h.fake_in.execute

    async def slow(op):
        await gate.wait()
        return await real(op)

    h.fake_in.execute = slow
    task = asyncio.create_task(h.lending.borrow(M, 3, "ussd", "k"))
    while not h.fake_in.calls and not gate.is_set():
        await asyncio.sleep(0.001)
        if (await h.view(M))["loans"]:
            break
    task.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):
        view = await h.view(M)
        if view["loans"][0]["state"] == "ACTIVE":
            break
        await asyncio.sleep(0.005)
    assert view["loans"][0]["state"] == "ACTIVE"
    # The settlement is visible before the saga, resumed after its commit, sends the SMS.
    await h.lending.drain_sagas()
    assert h.notifier.templates() == ["loan_granted"]


async def test_balance_above_the_limit_is_refused_after_asking_the_in(tmp_path):
    """[eligibility].max_balance_to_borrow_minor is applied with a CHECK_BALANCE for
    the limit + 1 (RFC 4006 §5.2.3): ENOUGH_CREDIT means more than the limit left."""
    import dataclasses

    from tests.service.fakes import POLICY, Harness

    policy = dataclasses.replace(POLICY, eligibility=dataclasses.replace(
        POLICY.eligibility, check_balance_at_in=True))
    limit = policy.eligibility.max_balance_to_borrow_minor
    h = Harness(tmp_path / "ledger.db", policy)
    try:
        await h.add_profile(M)
        h.fake_in.balances[M] = limit + 50
        out = await h.lending.borrow(M, 2, "sms", "sms:rich")
        assert out.status is BorrowStatus.REFUSED and out.reason is Reason.BALANCE_TOO_HIGH
        check = h.fake_in.calls[0]
        assert check.action.name == "CHECK_BALANCE" and check.amount_minor == limit + 1
        assert len(h.fake_in.calls) == 1 and h.fake_in.credits == {}
        assert h.events.kinds() == ["refusal"]
        assert h.notifier.sent[-1].params == {"reason": "BALANCE_TOO_HIGH"}
        assert h.lending.balance_checks == {"asked": 1, "above_limit": 1, "unanswered": 0}
        h.fake_in.balances[M] = limit  # exactly the limit: may borrow
        out = await h.lending.borrow(M, 2, "sms", "sms:poor")
        assert out.status is BorrowStatus.GRANTED
    finally:
        await h.close()
