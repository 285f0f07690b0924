"""Bundle advances through the services over a real ledger: the IN is asked for the
bundle's units (and only for a bundle tier), the SMS names the bundle, the resolver's
re-send of an unanswered bundle credit carries the same units, and an SMS DATA under
a consumer-protection preset asks for YES with the bundle and its price."""

from __future__ import annotations

from dataclasses import replace

from extrabalance.core.policy import Bundle, Tier
from extrabalance.core.protection import resolve
from extrabalance.service.outcomes import BorrowStatus
from tests.core.sample import POLICY
from tests.service.fakes import LOST_ANSWER, Harness

M = "201001234567"  # gold: 10 % fee
DATA = Bundle("data", 500 * 2**20, service_identifier=1, rating_group=10)
GOLD = replace(POLICY.segments[0], tier_ids=(*POLICY.segments[0].tier_ids, 13))
WITH_DATA = replace(POLICY, tiers={**POLICY.tiers, 13: Tier(13, 1000, DATA)},
                    segments=(GOLD, *POLICY.segments[1:]))


async def test_a_bundle_is_asked_for_in_units_and_told_by_its_own_sms(tmp_path):
    h = Harness(tmp_path / "l.db", WITH_DATA)
    try:
        await h.add_profile(M)
        money = await h.lending.sms_loan(M, None, "sms:1")  # plain LOAN: money, never the bundle
        assert money is not None and money.tier_id != 13 and h.fake_in.calls[-1].bundle is None
        await h.lending.borrow(M, None, "ussd", "k0")  # largest money tier fitting what is left
        assert h.fake_in.calls[-1].bundle is None
    finally:
        await h.close()
    h = Harness(tmp_path / "l2.db", WITH_DATA)
    try:
        await h.add_profile(M)
        out = await h.lending.sms_loan(M, None, "sms:2", kind="data")
        assert out is not None and (out.status, out.tier_id) == (BorrowStatus.GRANTED, 13)
        assert (out.amount_minor, out.fee_minor) == (1000, 100)
        op = h.fake_in.calls[-1]
        assert (op.bundle, op.amount_minor) == (DATA, 1000)
        sms = h.notifier.sent[-1]
        assert (sms.template, sms.params["bundle"]) == ("loan_granted_bundle", "data:524288000")
        await h.check_invariants()
    finally:
        await h.close()


async def test_the_resolver_resends_a_bundle_credit_with_its_units(tmp_path):
    h = Harness(tmp_path / "l.db", WITH_DATA)
    try:
        await h.add_profile(M)
        h.fake_in.fail_next(LOST_ANSWER)
        out = await h.lending.borrow(M, 13, "ussd", "k")
        assert out.status is BorrowStatus.PENDING
        assert (await h.resolver.run_once()).loans_settled == 1
        first, resent = h.fake_in.calls[0], h.fake_in.calls[-1]
        assert resent.retransmission and resent.session_id == first.session_id
        assert resent.bundle == first.bundle == DATA
        assert h.notifier.templates()[-1] == "loan_granted_bundle"
    finally:
        await h.close()


async def test_data_under_a_preset_asks_for_yes_with_the_bundle_and_its_price(tmp_path):
    h = Harness(tmp_path / "l.db", replace(WITH_DATA, protection=resolve("eg-ntra", {})))
    try:
        await h.add_profile(M)
        assert await h.lending.sms_loan(M, None, "sms:1", kind="data") is None
        prompt = h.notifier.sent[-1]
        assert prompt.template == "loan_confirm_sms_bundle"
        assert (prompt.params["bundle"], prompt.params["amount"], prompt.params["fee_percent"]) == (
            "data:524288000", 1000, "10%")
        assert await h.lending.confirm_by_reply(M) is None
        assert h.fake_in.calls[-1].bundle == DATA
    finally:
        await h.close()
