"""Bundle advances through the services over a real ledger: the IN is asked for the
bundle's units (and only for a bundle tier), the SMS names the bundle, the resolver's
re-send of an unanswered bundle credit carries the same units, and an SMS DATA under
a consumer-protection preset asks for YES with the bundle and its price."""

from __future__ import annotations

from dataclasses import replace

import pytest

from extrabalance.adapters.in_diameter import DiameterInPort, InNodeAddress
from extrabalance.clock import FixedClock
from extrabalance.core.policy import Bundle, Tier
from extrabalance.core.protection import resolve
from extrabalance.diameter import gy
from extrabalance.diameter.aio.node import RequestTimeout
from extrabalance.diameter.codec import FLAG_RETRANSMIT, Message, encode
from extrabalance.diameter.constants import DIAMETER_SUCCESS
from extrabalance.service.outcomes import BorrowStatus
from tests.core.sample import POLICY
from tests.service.fakes import LOST_ANSWER, NOW, Harness

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
        assert "bundle_kind" not in h.events.events[-1][1]  # a money loan's EDR: no units
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
        kind, edr = h.events.events[-1]
        assert (kind, edr["bundle_kind"], edr["bundle_quantity"]) == ("loan", "data", DATA.quantity)
        (loan,) = await h.loans(M)
        assert loan.bundle == DATA
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


IN_A = "in-a.operator.example"  # M's IN (tests/service/fakes.py ROUTES)
GIGA = Bundle("data", 2**30, service_identifier=2, rating_group=20)
CHANGED = replace(WITH_DATA, tiers={**WITH_DATA.tiers, 13: Tier(13, 1500, GIGA)})
REMOVED = replace(POLICY, tiers={t: v for t, v in WITH_DATA.tiers.items() if t != 13})


class Wire:
    """Stands in for the Diameter node's `request`: records every CCR the node sends;
    the first one's answer is lost (the IN applied it), later ones are answered 2001."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    async def __call__(self, group: str, msg: Message) -> Message:
        self.sent.append(msg)
        if len(self.sent) == 1:
            raise RequestTimeout("answer lost")
        return gy.build_cca(msg, IN_A, "operator.example", DIAMETER_SUCCESS,
                            currency_numeric=818, currency_exponent=2)


def diameter_in(wire: Wire) -> DiameterInPort:
    """The node's real IN adapter over `wire`, on a clock that stands still, so two
    sends of one request differ only where the protocol says they may."""
    return DiameterInPort(
        wire, {IN_A: InNodeAddress(IN_A, "operator.example", IN_A)},
        origin_host="eb.operator.example", origin_realm="operator.example",
        service_context_id="extrabalance@3gpp.org", currency_numeric=818, currency_exponent=2,
        transient_errors=(RequestTimeout,), clock=FixedClock(NOW))


@pytest.mark.parametrize("operator_change", [CHANGED, REMOVED], ids=["tier_changed", "tier_removed"])
async def test_a_resend_asks_for_the_booked_units_whatever_the_tier_says_now(
        tmp_path, operator_change):
    """A bundle loan whose answer was lost; the operator then changes the tier's bundle
    (or removes the tier) and the node restarts: the resolver's re-send is the first
    CCR byte for byte but for the T flag, and the loan is reported with its own units."""
    wire = Wire()
    h = Harness(tmp_path / "l.db", WITH_DATA, fake_in=diameter_in(wire))  # type: ignore[arg-type]
    try:
        await h.add_profile(M)
        out = await h.lending.borrow(M, 13, "ussd", "k")
        assert out.status is BorrowStatus.PENDING and len(wire.sent) == 1
        h.policy, h.fake_in = operator_change, diameter_in(wire)  # type: ignore[assignment]
        await h.restart()
        assert (await h.resolver.run_once()).loans_settled == 1
        first, resent = wire.sent
        assert not first.is_retransmit and resent.is_retransmit
        assert encode(resent._replace(flags=resent.flags & ~FLAG_RETRANSMIT)) == encode(first)
        asked = gy.parse_ccr(resent).bundle
        assert asked == gy.BundleUnits("data", DATA.quantity, 1, 10)
        (loan,) = await h.loans(M)
        assert (loan.state, loan.bundle, loan.principal_minor) == ("ACTIVE", DATA, 1000)
        sms = h.notifier.sent[-1]
        assert (sms.template, sms.params["bundle"]) == ("loan_granted_bundle", "data:524288000")
        kind, edr = h.events.events[-1]
        assert (kind, edr["bundle_kind"], edr["bundle_quantity"]) == ("loan", "data", DATA.quantity)
    finally:
        await h.close()
