"""The node's object graph from `bootstrap`, over fakes: the in-memory ledger, the fake
IN, a notifier that records what the outbox sends. A borrow and the payback of a
recharge run through the returned services, and the wiring the node relies on (one
lock table, the resolver's follow-ups, the route prober, the advertiser) is there
from construction."""

from __future__ import annotations

from datetime import UTC, datetime

from extrabalance.bootstrap import bootstrap
from extrabalance.clock import FixedClock
from extrabalance.config import load_settings
from extrabalance.core.model import SubscriberProfile
from extrabalance.ledger.memory import MemoryUnitOfWork
from extrabalance.service.lending import BorrowStatus
from extrabalance.service.outcomes import PaybackStatus
from extrabalance.service.ports import InAction, RechargeEvent
from extrabalance.service.templates import Templates
from tests.service.fakes import FakeIn, FakeNotifier, ListEvents

M = "201001234567"  # in-a's range in the default config
IN_A = "in-a.operator.example"


async def test_bootstrapped_services_lend_and_recover_through_one_wiring() -> None:
    settings = load_settings()
    clock = FixedClock(datetime(2026, 3, 2, 10, 0, tzinfo=UTC))
    ledger, fake_in, sms, events = MemoryUnitOfWork(), FakeIn(), FakeNotifier(), ListEvents()
    services = bootstrap(
        settings, ledger=ledger, in_port=fake_in, notifier=sms, events=events, clock=clock,
        templates=Templates(settings.templates, settings.node.default_language,
                            settings.node.currency_exponent))
    locks = services.locks
    assert (services.lending.locks is locks and services.payback.locks is locks
            and services.resolver.locks is locks and services.accounts.locks is locks)
    assert services.lending.follow_up == services.resolver.follow_up
    assert services.payback.follow_up == services.resolver.follow_up
    assert services.lending.ads is services.ads and services.lending.prober is not None
    assert services.lending.notifier is services.outbox

    now = clock.now()
    await ledger.write(lambda tx: tx.put_profile(SubscriberProfile(M, 400, 6000), now))
    loan = await services.lending.borrow(M, None, "sms", "sms:bind-1:seq1")
    assert loan.status is BorrowStatus.GRANTED and loan.debt_minor > 0
    credit = fake_in.calls[-1]  # after the balance check of [eligibility]
    assert credit.action is InAction.REFUND_ACCOUNT and credit.amount_minor == loan.amount_minor
    assert credit.in_node == IN_A  # routed by the config's ranges

    fake_in.balances[M] = 10 * loan.debt_minor  # his balance after a large recharge
    paid = await services.payback.handle_recharge(
        RechargeEvent("ev-1", M, 10 * loan.debt_minor, IN_A, 10 * loan.debt_minor))
    assert paid.status is PaybackStatus.RECOVERED
    assert (paid.recovered_minor, paid.debt_minor) == (loan.debt_minor, 0)
    assert fake_in.calls[-1].action is InAction.DIRECT_DEBITING

    # The messages were written with the money; the outbox sends them to the notifier.
    services.outbox.start()
    try:
        await services.outbox.drain()
    finally:
        await services.outbox.stop()
    # The advertiser lending was built with sent its ad directly (the loan reached the
    # debt limit); the two messages that report money left through the outbox.
    assert [(n.msisdn, n.template, n.outbox_id is not None) for n in sms.delivered] == [
        (M, "ad_debt_limit", False), (M, "loan_granted", True), (M, "payback_full", True)]
