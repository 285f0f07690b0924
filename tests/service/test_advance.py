from extrabalance.core.reasons import Reason
from extrabalance.service.ports import InAction, RechargeEvent
from tests.service.fakes import NOT_EXECUTED, REFUSE, TIMEOUT

M = "201001234567"
IN_A = "in-a.operator.example"


async def ccr(h, session="s1", number=0, rtype=1, msisdn=M, requested=None, host=IN_A,
              *, delivered=True, confirm=True):
    """One out-of-balance CCR. `delivered`: the CCA reached the IN in time, which
    applied the grant; `confirm`: let the background confirmation finish (it takes
    one IN round trip, done before the IN's next request for this subscriber)."""
    out = await h.lending.out_of_balance(session, number, rtype, msisdn, requested, host)
    if delivered and out.result_code == 2001 and out.granted_minor and not out.replayed:
        h.fake_in.apply_grant(session, number, msisdn, out.granted_minor)
    if confirm:
        await h.lending.drain_confirmations()
    return out


async def loan_states(h):
    return await h.ledger.read(
        lambda c: c.execute("SELECT state FROM loans ORDER BY created_at").fetchall())


async def test_opted_in_gets_advance_recorded_active_without_refund(h):
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)
    out = await ccr(h)
    assert out.result_code == 2001 and out.granted_minor == 500  # auto tier 3
    # The IN applies Granted-Service-Unit itself; the node only confirms it under the
    # advance's own key, which the IN answers as a duplicate: no second credit.
    assert [(c.action, c.session_id, c.request_number, c.amount_minor)
            for c in h.fake_in.calls] == [(InAction.REFUND_ACCOUNT, "s1", 0, 500)]
    assert h.fake_in.credits == {"s1": 500} and h.fake_in.balances == {M: 500}
    inv = await h.check_invariants()
    assert inv["debts"] == {M: 550}
    assert h.notifier.sent[-1].template == "advance_granted"
    assert "advance" in h.events.kinds()


async def test_retransmission_grants_nothing_new(h):
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)
    first = await ccr(h)
    again = await ccr(h)
    assert again.replayed and again.granted_minor == first.granted_minor
    assert (await h.check_invariants())["debts"] == {M: 550}
    assert len(h.notifier.sent) == 1
    other = await ccr(h, number=1, rtype=2)
    assert other.result_code == 2001 and not other.replayed
    assert (await h.check_invariants())["debts"] == {M: 1100}


async def test_not_opted_in_gets_4012_and_no_ad_without_an_advertiser(h):
    """Advertisements are the Advertiser's alone (tests/ads): a lending service built
    without one refuses with 4012 and sends nothing."""
    await h.add_profile(M)
    out = await ccr(h)
    assert out.result_code == 4012 and out.reason is Reason.NOT_OPTED_IN
    assert h.notifier.sent == []
    assert h.events.kinds() == ["refusal"]


async def test_barred_gets_4010_no_ad(h):
    await h.add_profile(M)
    await h.accounts.bar(M, "fraud", "ops", notify=False)
    await h.lending.set_preferences(M, auto_advance=True)
    out = await ccr(h)
    assert out.result_code == 4010 and out.reason is Reason.BARRED_MANUAL
    assert h.notifier.sent == []


async def test_unknown_msisdn_5030(h):
    out = await ccr(h, msisdn="999123")
    assert out.result_code == 5030
    assert (await h.ledger.learned_route("999123")) is None


async def test_unrouted_but_profiled_subscriber_learns_route(h):
    await h.add_profile("999123")
    out = await ccr(h, msisdn="999123", host="in-c.operator.example")
    assert out.result_code == 4012
    assert (await h.ledger.learned_route("999123")) == "in-c.operator.example"
    assert h.router.route("999123") == "in-c.operator.example"


async def test_termination_grants_nothing(h):
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)
    out = await ccr(h, number=1, rtype=3)
    assert out.result_code == 2001 and out.granted_minor is None
    assert (await h.check_invariants())["debts"] == {}


async def test_ceiling_reached_4012(h):
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)
    await h.lending.borrow(M, 12, "ussd", "k")  # 11000 of 12000
    assert (await ccr(h, session="s1")).result_code == 2001  # +550 = 11550
    out = await ccr(h, session="s2")  # +550 would pass 12000
    assert out.result_code == 4012 and out.reason is Reason.CEILING_REACHED


async def test_advance_too_late_for_the_in_books_nothing(h):
    """An advance whose commit would land after the answer deadline is not booked:
    3004 is answered and the IN's retransmission is decided afresh."""
    import time

    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)
    late = await h.lending.out_of_balance("s9", 0, 4, M, None, IN_A,
                                          deadline_monotonic=time.monotonic() - 0.001)
    assert late.result_code == 3004 and late.granted_minor is None
    assert (await h.check_invariants())["debts"].get(M, 0) == 0
    assert "advance" not in h.events.kinds()
    again = await h.lending.out_of_balance("s9", 0, 4, M, None, IN_A,
                                           deadline_monotonic=time.monotonic() + 5)
    assert again.result_code == 2001 and not again.replayed
    assert (await h.check_invariants())["debts"] == {M: 550}


# -- advance confirmation (docs/diameter.md "Advance confirmation") -----------------


async def opted_in(h):
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)


async def test_answer_lost_confirmation_applies_the_credit_once(h):
    await opted_in(h)
    out = await ccr(h, session="s1", number=2, delivered=False)
    assert out.result_code == 2001 and out.granted_minor == 500
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
    assert second.result_code == 4012 and second.reason is Reason.OPERATION_PENDING
    await h.resolver.run_once()
    assert await loan_states(h) == [("ACTIVE",)] and h.fake_in.credits == {"s1": 500}


async def test_crash_between_commit_and_send_resolver_confirms_at_start_up(h):
    await opted_in(h)
    out = await ccr(h, delivered=False, confirm=False)
    assert out.result_code == 2001
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
    assert out.result_code == 2001
    assert await loan_states(h) == [("FAILED",)]
    inv = await h.check_invariants()
    assert inv["debts"].get(M, 0) == 0 and h.fake_in.credits == {}
    totals = inv["totals"]
    assert totals["disbursed_float"] == 0 and totals["fee_income"] == 0
    assert "advance_reversed" in h.events.kinds()
    sub = await h.ledger.read(lambda c: c.execute(
        "SELECT loans_since_full_payback FROM subscribers WHERE msisdn = ?", (M,)).fetchone())
    assert sub == (0,)
    # A late retransmission of the CCR is refused, not granted again.
    again = await h.lending.out_of_balance("s1", 0, 1, M, None, IN_A)
    assert again.replayed and again.result_code == 4012 and again.granted_minor is None
    # The subscriber may borrow again at once: nothing is pending.
    assert (await ccr(h, session="s2")).result_code == 2001
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
    flagged = await h.ledger.read(lambda c: c.execute(
        "SELECT state, needs_review FROM loans").fetchall())
    assert flagged == [("CONFIRMING", 1)]
    assert (await h.resolver.run_once()).loans_settled == 0  # left to the operator
    assert (await h.check_invariants())["debts"] == {M: 550}
    assert (await h.lending.status(M)).operation_pending
