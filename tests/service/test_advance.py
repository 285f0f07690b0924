from extrabalance.adapters.gy_server import result_code
from extrabalance.core.reasons import Reason

M = "201001234567"
IN_A = "in-a.operator.example"


async def ccr(h, session="s1", number=0, rtype=1, msisdn=M, requested=None, host=IN_A,
              *, delivered=True, confirm=True):
    """One out-of-balance CCR. `delivered`: the CCA reached the IN in time, which
    applied the grant; `confirm`: let the background confirmation finish (it takes
    one IN round trip, done before the IN's next request for this subscriber)."""
    out = await h.lending.out_of_balance(session, number, rtype, msisdn, requested, host)
    if delivered and result_code(out) == 2001 and out.granted_minor and not out.replayed:
        h.fake_in.apply_grant(session, number, msisdn, out.granted_minor)
    if confirm:
        await h.lending.drain_confirmations()
    return out


async def loan_states(h):
    return [(loan.state,) for loan in await h.loans()]


async def test_opted_in_gets_advance_recorded_active_without_refund(h):
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)
    out = await ccr(h)
    assert result_code(out) == 2001 and out.granted_minor == 500  # auto tier 3
    # The IN applies Granted-Service-Unit itself (RFC 4006): that is the credit, and
    # the node sends the IN nothing else for it.
    assert h.fake_in.calls == []
    assert h.fake_in.credits == {"s1": 500} and h.fake_in.balances == {M: 500}
    assert await loan_states(h) == [("ACTIVE",)]
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
    assert result_code(other) == 2001 and not other.replayed
    assert (await h.check_invariants())["debts"] == {M: 1100}


async def test_not_opted_in_gets_4012_and_no_ad_without_an_advertiser(h):
    """Advertisements are the Advertiser's alone (tests/ads): a lending service built
    without one refuses with 4012 and sends nothing."""
    await h.add_profile(M)
    out = await ccr(h)
    assert result_code(out) == 4012 and out.reason is Reason.NOT_OPTED_IN
    assert h.notifier.sent == []
    assert h.events.kinds() == ["refusal"]


async def test_barred_gets_4010_no_ad(h):
    await h.add_profile(M)
    await h.accounts.bar(M, "fraud", "ops", notify=False)
    await h.lending.set_preferences(M, auto_advance=True)
    out = await ccr(h)
    assert result_code(out) == 4010 and out.reason is Reason.BARRED_MANUAL
    assert h.notifier.sent == []


async def test_unknown_msisdn_5030(h):
    out = await ccr(h, msisdn="999123")
    assert result_code(out) == 5030
    assert (await h.learned_route("999123")) is None


async def test_unrouted_but_profiled_subscriber_learns_route(h):
    await h.add_profile("999123")
    out = await ccr(h, msisdn="999123", host="in-c.operator.example")
    assert result_code(out) == 4012
    assert (await h.learned_route("999123")) == "in-c.operator.example"
    assert h.router.route("999123") == "in-c.operator.example"


async def test_termination_grants_nothing(h):
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)
    await h.add_profile("201001234568")
    assert result_code(await ccr(h, number=0, rtype=1, msisdn="201001234568")) == 4012
    out = await ccr(h, number=1, rtype=3, msisdn="201001234568")
    assert result_code(out) == 2001 and out.granted_minor is None
    assert (await h.check_invariants())["debts"] == {}


async def test_update_or_termination_of_an_unknown_session_is_5002(h):
    """RFC 4006 §5.1 / RFC 6733 §7.1.5: UPDATE and TERMINATION continue a session an
    INITIAL opened; for a Session-Id the node never saw, 5002 and nothing granted."""
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)
    update = await ccr(h, session="never-opened", number=1, rtype=2)
    assert result_code(update) == 5002 and update.granted_minor is None
    term = await ccr(h, session="never-opened-2", number=1, rtype=3)
    assert result_code(term) == 5002
    assert (await h.check_invariants())["debts"] == {}
    # Once the session is opened, its UPDATE is served.
    assert result_code(await ccr(h, session="s5", number=0, rtype=1)) == 2001
    assert result_code(await ccr(h, session="s5", number=1, rtype=2)) == 2001
    assert result_code(await ccr(h, session="s5", number=2, rtype=3)) == 2001


async def test_ceiling_reached_4012(h):
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)
    await h.lending.borrow(M, 12, "ussd", "k")  # 11000 of 12000
    assert result_code(await ccr(h, session="s1")) == 2001  # +550 = 11550
    out = await ccr(h, session="s2")  # +550 would pass 12000
    assert result_code(out) == 4012 and out.reason is Reason.CEILING_REACHED


async def test_advance_too_late_for_the_in_books_nothing(h):
    """An advance whose commit would land after the answer deadline is not booked:
    3004 is answered and the IN's retransmission is decided afresh."""
    import time

    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)
    late = await h.lending.out_of_balance("s9", 0, 4, M, None, IN_A,
                                          deadline_monotonic=time.monotonic() - 0.001)
    assert result_code(late) == 3004 and late.granted_minor is None
    assert (await h.check_invariants())["debts"].get(M, 0) == 0
    assert "advance" not in h.events.kinds()
    again = await h.lending.out_of_balance("s9", 0, 4, M, None, IN_A,
                                           deadline_monotonic=time.monotonic() + 5)
    assert result_code(again) == 2001 and not again.replayed
    assert (await h.check_invariants())["debts"] == {M: 550}


async def test_an_rfc_only_in_credits_each_advance_exactly_once(h):
    """Issue 16: an IN built to RFC 4006 alone applies the CCA's grant, and treats a
    REFUND_ACCOUNT as a credit of its own. Advances, retransmissions, a resolver run
    and a restart: one credit per advance."""
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)
    assert not h.fake_in.confirmation_extension
    for number in range(3):
        out = await ccr(h, session="s1", number=number, rtype=1 if number == 0 else 2)
        assert result_code(out) == 2001 and out.granted_minor == 500
        again = await ccr(h, session="s1", number=number, rtype=1 if number == 0 else 2)
        assert again.replayed
    await h.resolver.run_once()
    await h.restart()
    await h.resolver.run_once()
    assert h.fake_in.credits_applied == 3
    assert h.fake_in.balances == {M: 1500}
    assert [c.action for c in h.fake_in.calls] == []
    assert await loan_states(h) == [("ACTIVE",)] * 3
    assert (await h.check_invariants())["debts"] == {M: 1650}


async def test_advance_left_confirming_for_an_in_without_the_extension_settles_silently(h):
    """A CONFIRMING advance (booked while the IN had the extension, now turned off)
    is settled ACTIVE by the resolver without a REFUND_ACCOUNT (a second credit there)."""
    from extrabalance.core import sagas

    await h.add_profile(M)
    now = h.clock()
    await h.ledger.write(lambda tx: tx.insert_loan(
        msisdn=M, tier_id=3, principal_minor=500, fee_minor=50, state=sagas.CONFIRMING,
        channel="auto", idempotency_key="ccr:s7:0", in_node=IN_A, session_id="s7", now=now))
    report = await h.resolver.run_once()
    assert report.loans_settled == 1 and h.fake_in.calls == []
    assert await loan_states(h) == [("ACTIVE",)]
    assert (await h.check_invariants())["debts"] == {M: 550}
