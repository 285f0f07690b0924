"""Consumer protection through the services, over a real ledger: the SMS loan that
waits for YES, the cap per rolling window and the cooling-off (refusal, EDR, trail),
the double opt-in to automatic advances, operator opt-ins refused by the preset, the
payback SMS switch, and the consent trail export. Without a preset nothing changes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from extrabalance.core.protection import resolve
from extrabalance.service.accounts import OptInRefused
from extrabalance.service.outcomes import BorrowStatus, PaybackStatus
from extrabalance.service.ports import RechargeEvent
from extrabalance.service.protection import consent_rows
from tests.core.sample import POLICY
from tests.service.fakes import Harness

M = "201001234567"
IN_A = "in-a.operator.example"
EG = replace(POLICY, protection=resolve("eg-ntra", {}))  # 10 loans / 30 d, 3 in 24 h → 24 h


async def repay(h: Harness, event_id: str) -> None:
    """A recharge that pays everything back (the bad-debt bar stays out of the way)."""
    h.fake_in.balances[M] = 10_000
    out = await h.payback.handle_recharge(RechargeEvent(event_id, M, 10_000, IN_A, 10_000))
    assert out.status is PaybackStatus.RECOVERED


async def trail(h: Harness, msisdn: str = M) -> list[str]:
    return [r["action"] for r in await h.ledger.read(lambda tx: consent_rows(tx, msisdn))]


@pytest.fixture
async def eg(tmp_path):
    harness = Harness(tmp_path / "ledger.db", EG)
    await harness.add_profile(M)  # gold: 10 % fee, ceiling 120.00
    yield harness
    await harness.close()


async def test_an_sms_loan_waits_for_yes_and_shows_the_fee_as_amount_and_percent(eg):
    assert await eg.lending.sms_loan(M, 3, "sms:k1") is None  # 5.00 EGP asked, not lent
    assert eg.fake_in.balances.get(M, 0) == 0
    prompt = eg.notifier.sent[-1]
    assert prompt.template == "loan_confirm_sms"
    assert (prompt.params["amount"], prompt.params["fee"], prompt.params["fee_percent"],
            prompt.params["total"], prompt.params["minutes"]) == (500, 50, "10%", 550, 10)
    assert await eg.lending.sms_loan(M, 3, "sms:k1") is None  # the SMSC's re-send
    assert eg.notifier.templates(M).count("loan_confirm_sms") == 1

    assert await eg.lending.confirm_by_reply(M) is None
    assert eg.fake_in.balances[M] == 500
    assert eg.notifier.templates(M)[-1] == "loan_granted"
    # A second YES: nothing waits any more, nothing more is lent.
    assert await eg.lending.confirm_by_reply(M) == "nothing_to_confirm"
    assert eg.fake_in.balances[M] == 500
    assert await trail(eg) == ["loan_confirm_requested", "loan_consent"]
    consent = (await eg.ledger.read(lambda tx: consent_rows(tx, M)))[-1]
    assert consent["detail"]["fee_percent"] == "10%" and consent["channel"] == "sms"
    await eg.check_invariants()


async def test_a_yes_after_the_confirmation_expired_lends_nothing(eg):
    await eg.lending.sms_loan(M, 3, "sms:k1")
    eg.clock.advance(seconds=601)
    assert await eg.lending.confirm_by_reply(M) == "nothing_to_confirm"
    assert eg.fake_in.balances.get(M, 0) == 0


async def test_a_request_the_node_refuses_is_refused_at_once_by_sms(eg):
    out = await eg.lending.sms_loan(M, 99, "sms:k1")  # no such tier
    assert out is not None and out.status is BorrowStatus.REFUSED
    assert eg.notifier.templates(M) == ["loan_refused"]
    assert await trail(eg) == ["loan_refused"]


async def test_the_cooling_off_after_three_loans_in_a_day(eg):
    for i in range(3):
        out = await eg.lending.borrow(M, 1, "ussd", f"k{i}")
        assert out.status is BorrowStatus.GRANTED
        await repay(eg, f"e{i}")
        eg.clock.advance(hours=1)
    refused = await eg.lending.borrow(M, 1, "ussd", "k3")
    assert (refused.status, refused.reason.value) == (BorrowStatus.REFUSED, "COOLING_OFF")
    edr = [f for k, f in eg.events.events if k == "refusal"][-1]
    assert edr["reason"] == "COOLING_OFF"
    quote = await eg.lending.quote(M)  # the menu says so too
    assert not quote.eligible and quote.reason.value == "COOLING_OFF"
    # The pause runs 24 h from the third loan (taken 2 h after the first).
    eg.clock.advance(hours=22)
    assert (await eg.lending.borrow(M, 1, "ussd", "k4")).reason.value == "COOLING_OFF"
    eg.clock.advance(hours=1)
    assert (await eg.lending.borrow(M, 1, "ussd", "k5")).status is BorrowStatus.GRANTED
    assert (await trail(eg)).count("loan_refused") == 2


async def test_the_cap_per_rolling_window_counts_advances_too(eg):
    await eg.lending.set_preferences(M, auto_advance=False)
    # Opted in by his reply (double opt-in), then ten loans two days apart.
    assert await eg.lending.set_preferences(M, auto_advance=True) == "confirm_by_sms"
    assert await eg.lending.confirm_by_reply(M) is None
    for i in range(10):
        if i % 2:
            out = await eg.lending.out_of_balance(f"s{i}", 0, 1, M, None, IN_A)
            assert out.granted_minor == 500, out
        else:
            assert (await eg.lending.borrow(M, 1, "ussd", f"k{i}")).status is BorrowStatus.GRANTED
        await repay(eg, f"e{i}")
        eg.fake_in.balances[M] = 0
        eg.clock.advance(days=2)
    refused = await eg.lending.borrow(M, 1, "ussd", "k10")
    assert refused.reason.value == "LOAN_CAP_REACHED"
    advance = await eg.lending.out_of_balance("s10", 0, 1, M, None, IN_A)
    assert advance.granted_minor is None and advance.reason.value == "LOAN_CAP_REACHED"
    eg.clock.advance(days=10)  # the first loan (20 days ago + 10) leaves the 30 days
    assert (await eg.lending.borrow(M, 1, "ussd", "k11")).status is BorrowStatus.GRANTED
    await eg.check_invariants()


async def test_double_opt_in_turns_auto_advance_on_only_by_the_reply(eg):
    assert await eg.lending.set_preferences(M, auto_advance=True) == "confirm_by_sms"
    assert not (await eg.lending.status(M)).auto_advance_opt_in
    sms = eg.notifier.sent[-1]
    assert sms.template == "opt_in_confirm_sms"
    assert (sms.params["amount"], sms.params["fee"], sms.params["fee_percent"]) == (500, 50, "10%")
    out = await eg.lending.out_of_balance("s1", 0, 1, M, None, IN_A)
    assert out.reason.value == "NOT_OPTED_IN"
    assert await eg.lending.confirm_by_reply(M) is None
    assert (await eg.lending.status(M)).auto_advance_opt_in
    assert eg.notifier.templates(M)[-1] == "auto_advance_on_sms"
    await eg.lending.set_preferences(M, auto_advance=False)  # off at once
    assert await trail(eg) == ["auto_advance_requested", "auto_advance_on", "auto_advance_off"]


async def test_an_operator_opt_in_is_refused_where_the_preset_forbids_it(eg):
    with pytest.raises(OptInRefused, match="double opt-in"):
        await eg.accounts.set_auto_advance(M, True, "ops", "campaign")
    assert await eg.accounts.set_auto_advance(M, False, "ops", "complaint") is False


async def test_payback_sms_names_the_deduction_and_can_be_turned_off(tmp_path):
    for on in (True, False):
        policy = replace(POLICY, protection=resolve("none", {"recovery_sms": on}))
        h = Harness(tmp_path / f"l{on}.db", policy)
        try:
            await h.add_profile(M)
            await h.lending.borrow(M, 3, "ussd", "k1")
            h.fake_in.balances[M] = 1000
            paid = await h.payback.handle_recharge(RechargeEvent("e1", M, 1000, IN_A, 1000))
            assert paid.status is PaybackStatus.RECOVERED
            assert ("payback_full" in h.notifier.templates(M)) is on
        finally:
            await h.close()


async def test_without_a_preset_nothing_is_asked_counted_or_written(h):
    await h.add_profile(M)
    out = await h.lending.sms_loan(M, 3, "sms:k1")
    assert out is not None and out.status is BorrowStatus.GRANTED
    assert await h.lending.set_preferences(M, auto_advance=True) is None
    assert (await h.lending.status(M)).auto_advance_opt_in
    for i in range(4):
        assert (await h.lending.borrow(M, 1, "ussd", f"k{i}")).status is BorrowStatus.GRANTED
        await repay(h, f"e{i}")
    assert await trail(h) == []
