from extrabalance.core.reasons import Reason

M = "201001234567"
IN_A = "in-a.operator.example"


async def ccr(h, session="s1", number=0, rtype=1, msisdn=M, requested=None, host=IN_A):
    return await h.lending.out_of_balance(session, number, rtype, msisdn, requested, host)


async def test_opted_in_gets_advance_recorded_active_without_refund(h):
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)
    out = await ccr(h)
    assert out.result_code == 2001 and out.granted_minor == 500  # auto tier 3
    assert h.fake_in.calls == []  # the IN applies Granted-Service-Unit itself
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


async def test_not_opted_in_gets_4012_and_ad(h):
    await h.add_profile(M)
    out = await ccr(h)
    assert out.result_code == 4012 and out.reason is Reason.NOT_OPTED_IN
    assert h.notifier.sent[-1].template == "ad_out_of_balance"
    assert h.notifier.sent[-1].kind == "ad"
    assert "ad_sent" in h.events.kinds()
    await ccr(h)  # retransmission: no second ad
    assert len(h.notifier.sent) == 1


async def test_ads_opt_out_suppressed(h):
    await h.add_profile(M)
    await h.lending.set_preferences(M, ads_opt_out=True)
    out = await ccr(h)
    assert out.result_code == 4012 and h.notifier.sent == []
    assert ("ad_suppressed", {"msisdn": M, "why": "opted_out"}) in h.events.events


async def test_ad_policy_hook(h):
    from extrabalance.service.lending import AdVerdict

    seen = []

    async def capped(state, now):
        seen.append(state.msisdn)
        return AdVerdict(False, "daily_cap")

    h.lending.ad_policy = capped
    await h.add_profile(M)
    await ccr(h)
    assert seen == [M] and h.notifier.sent == []


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
