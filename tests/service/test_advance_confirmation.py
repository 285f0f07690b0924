"""The opt-in advance confirmation extension (docs/diameter.md "Advance confirmation
extension"): only for an IN node configured with it, whose IN keys the CCA's grant
and the confirmation as one operation."""

import pytest

from extrabalance.adapters.gy_server import result_code
from extrabalance.core.reasons import Reason
from extrabalance.service.ports import RechargeEvent
from tests.service.fakes import BACKENDS, NOT_EXECUTED, REFUSE, TIMEOUT, Harness
from tests.service.test_advance import IN_A, M, ccr, loan_states


@pytest.fixture(params=BACKENDS)
async def h(request, tmp_path):
    harness = Harness(tmp_path / "ledger.db", advance_confirmation=True, backend=request.param)
    yield harness
    await harness.close()



async def opted_in(h):
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)


async def test_answer_lost_confirmation_applies_the_credit_once(h):
    await opted_in(h)
    out = await ccr(h, session="s1", number=2, delivered=False)
    assert result_code(out) == 2001 and out.granted_minor == 500
    # The CCA never reached the IN; the confirmation, under the advance's own key,
    # credited it.
    assert h.fake_in.credits == {"s1#2": 500} and h.fake_in.balances == {M: 500}
    assert [(c.session_id, c.request_number, c.retransmission) for c in h.fake_in.calls] == [
        ("s1", 2, False)]
    assert await loan_states(h) == [("ACTIVE",)]
    inv = await h.check_invariants()
    assert inv["debts"] == {M: 550} and inv["granted_sessions"] == h.fake_in.credits
    assert "advance_confirmed" in h.events.kinds()
    # The CCA turning up late changes nothing (the key is taken).
    assert not h.fake_in.apply_grant("s1", 2, M, 500)
    assert h.fake_in.balances == {M: 500}


async def test_answer_delivered_confirmation_is_a_duplicate(h):
    await opted_in(h)
    await ccr(h, delivered=True)
    assert h.fake_in.credits == {"s1": 500} and h.fake_in.balances == {M: 500}
    assert len(h.fake_in.calls) == 1  # the confirmation, answered from the first answer
    assert await loan_states(h) == [("ACTIVE",)]
    # A retransmitted CCR is replayed and grants nothing new on either side.
    again = await ccr(h, delivered=True)
    assert again.replayed and again.granted_minor == 500
    assert h.fake_in.balances == {M: 500} and len(h.fake_in.calls) == 1
    assert (await h.check_invariants())["debts"] == {M: 550}


async def test_confirming_advance_counts_as_debt_and_blocks_the_next_one(h):
    await opted_in(h)
    h.fake_in.fail_next(TIMEOUT, TIMEOUT, TIMEOUT)  # the IN does not answer for now
    await ccr(h, session="s1")
    assert await loan_states(h) == [("CONFIRMING",)]
    assert (await h.check_invariants())["debts"] == {M: 550}  # journalled when booked
    status = await h.lending.status(M)
    assert status.operation_pending
    second = await h.lending.out_of_balance("s2", 0, 1, M, None, IN_A)
    assert result_code(second) == 4012 and second.reason is Reason.OPERATION_PENDING
    await h.resolver.run_once()
    assert await loan_states(h) == [("ACTIVE",)] and h.fake_in.credits == {"s1": 500}


async def test_crash_between_commit_and_send_resolver_confirms_at_start_up(h):
    await opted_in(h)
    out = await ccr(h, delivered=False, confirm=False)
    assert result_code(out) == 2001
    await h.restart()  # the node dies before the CCA and the confirmation leave
    assert h.fake_in.calls == [] and await loan_states(h) == [("CONFIRMING",)]
    report = await h.resolver.run_once()
    assert report.loans_settled == 1
    assert [(c.session_id, c.retransmission) for c in h.fake_in.calls] == [("s1", True)]
    assert h.fake_in.credits == {"s1": 500} and h.fake_in.balances == {M: 500}
    assert await loan_states(h) == [("ACTIVE",)]
    assert (await h.check_invariants())["debts"] == {M: 550}


async def test_crash_after_the_cca_left_resolver_confirmation_is_a_duplicate(h):
    await opted_in(h)
    await ccr(h, delivered=True, confirm=False)
    await h.restart()
    await h.resolver.run_once()
    assert h.fake_in.credits == {"s1": 500} and h.fake_in.balances == {M: 500}
    assert await loan_states(h) == [("ACTIVE",)]


async def test_in_refuses_the_confirmation_advance_failed_and_reversed(h):
    await opted_in(h)
    h.fake_in.fail_next(REFUSE)  # 4010 to the confirmation
    out = await ccr(h, delivered=False)
    assert result_code(out) == 2001
    assert await loan_states(h) == [("FAILED",)]
    inv = await h.check_invariants()
    assert inv["debts"].get(M, 0) == 0 and h.fake_in.credits == {}
    totals = inv["totals"]
    assert totals["disbursed_float"] == 0 and totals["fee_income"] == 0
    assert "advance_reversed" in h.events.kinds()
    loaded = await h.ledger.read(lambda tx: tx.load_subscriber(M))
    assert loaded.state.loans_since_full_payback == 0
    # A late retransmission of the CCR is refused, not granted again.
    again = await h.lending.out_of_balance("s1", 0, 1, M, None, IN_A)
    assert again.replayed and result_code(again) == 4012 and again.granted_minor is None
    # The subscriber may borrow again at once: nothing is pending.
    assert result_code(await ccr(h, session="s2")) == 2001
    assert (await h.check_invariants())["debts"] == {M: 550}


async def test_confirmation_unknown_stays_confirming_until_the_resolver(h):
    await opted_in(h)
    # Every background send: no answer, then 3004 three times (never a refusal).
    h.fake_in.fail_next(TIMEOUT, NOT_EXECUTED, NOT_EXECUTED, NOT_EXECUTED, TIMEOUT)
    await ccr(h, delivered=False)
    assert await loan_states(h) == [("CONFIRMING",)]
    assert [c.retransmission for c in h.fake_in.calls] == [False, True, True, True, True]
    assert h.fake_in.credits == {}
    assert (await h.check_invariants())["debts"] == {M: 550}
    await h.resolver.run_once()
    assert await loan_states(h) == [("ACTIVE",)] and h.fake_in.credits == {"s1": 500}


async def test_recharge_while_confirming_waits(h):

    await opted_in(h)
    h.fake_in.fail_next(TIMEOUT, TIMEOUT, TIMEOUT)
    await ccr(h)
    assert await loan_states(h) == [("CONFIRMING",)]
    h.fake_in.balances[M] = 5000
    early = await h.payback.handle_recharge(RechargeEvent("e1", M, 5000, IN_A, 5000))
    # Not recoverable before the IN confirmed it (a refusal would reverse it).
    assert early.recovered_minor == 0 and h.fake_in.debits == {}
    await h.resolver.run_once()
    assert await loan_states(h) == [("ACTIVE",)]
    later = await h.payback.handle_recharge(RechargeEvent("e2", M, 0, IN_A, 5000))
    assert later.recovered_minor == 550 and later.debt_minor == 0
    assert (await h.check_invariants())["debts"] == {M: 0}


async def test_beyond_the_inflight_bound_the_resolver_confirms(h):
    await opted_in(h)
    h.lending.confirmations_max = 0  # every background slot taken
    await ccr(h, delivered=False)
    assert h.fake_in.calls == [] and await loan_states(h) == [("CONFIRMING",)]
    await h.resolver.run_once()
    assert await loan_states(h) == [("ACTIVE",)] and h.fake_in.credits == {"s1": 500}


async def test_never_answered_confirmation_goes_to_review_and_stays_owed(h):
    await opted_in(h)
    h.lending.confirmations_max = 0
    await ccr(h, delivered=True)  # the IN has the credit; the node cannot learn it
    for _ in range(h.review_after_attempts):
        h.fake_in.fail_next(TIMEOUT)
        await h.resolver.run_once()
    flagged = [(loan.state, loan.needs_review) for loan in await h.loans()]
    assert flagged == [("CONFIRMING", True)]
    assert (await h.resolver.run_once()).loans_settled == 0  # left to the operator
    assert (await h.check_invariants())["debts"] == {M: 550}
    assert (await h.lending.status(M)).operation_pending
