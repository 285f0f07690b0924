"""The services that run on the unit-of-work port (accounts, retention, payback, ads,
campaigns), each case run on the SQLite ledger, the in-memory one and the PostgreSQL
one with the same assertions. Debt is set up through the port (`insert_loan`); the
lending service and the resolver have their own cases on the three ledgers
(`test_lending_on_three_ledgers.py`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from extrabalance.core import sagas
from extrabalance.core.model import SubscriberProfile
from extrabalance.ledger import Ledger
from extrabalance.ledger.memory import MemoryUnitOfWork
from extrabalance.service.accounts import AccountService
from extrabalance.service.ads import AdTrigger, Advertiser
from extrabalance.service.campaign import CampaignService
from extrabalance.service.locks import SubscriberLocks
from extrabalance.service.outcomes import PaybackStatus
from extrabalance.service.ports import RechargeEvent
from extrabalance.service.recovery import PaybackService
from extrabalance.service.retention import IdempotencyRetention
from extrabalance.service.routing import Router
from extrabalance.service.unit_of_work import LedgerTx, UnitOfWork
from tests.ads.conftest import RULES, Ticks
from tests.core.sample import POLICY
from tests.pg import fresh_schema
from tests.service.fakes import LOST_ANSWER, REFUSE, ROUTES, Clock, FakeIn, FakeNotifier, ListEvents

M1, M2, M3 = "201001234567", "201001234568", "201001234569"
IN_A = "in-a.operator.example"


@dataclass
class Services:
    uow: UnitOfWork
    clock: Clock
    fake_in: FakeIn
    notifier: FakeNotifier
    events: ListEvents
    accounts: AccountService
    payback: PaybackService
    ads: Advertiser
    campaigns: CampaignService

    async def lend(self, msisdn: str, principal: int = 1000, fee: int = 100, **kw: Any) -> str:
        now = kw.pop("now", self.clock())

        def book(tx: LedgerTx) -> str:
            tx.put_profile(SubscriberProfile(msisdn, 400, 6000), now)
            return tx.insert_loan(
                msisdn=msisdn,
                tier_id=2,
                principal_minor=principal,
                fee_minor=fee,
                state=sagas.ACTIVE,
                channel="ussd",
                idempotency_key=None,
                in_node=IN_A,
                session_id="s",
                now=now,
            )

        return await self.uow.write(book)

    async def debt(self, msisdn: str) -> int:
        def both(tx: LedgerTx) -> int:
            owed = tx.debt_owed(msisdn)
            assert owed == tx.debt_from_journal(msisdn)
            return owed

        return await self.uow.read(both)


@pytest.fixture(params=["sqlite", "memory", "postgresql"])
async def s(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Services]:
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":  # a schema of its own, dropped after
            from extrabalance.ledger.postgres import PostgresLedger

            uow: Any = PostgresLedger(stack.enter_context(fresh_schema("eb_svc")), pool_max=2)
        else:
            uow = (Ledger(tmp_path / "ledger.db", batch_window_ms=0.5)
                   if request.param == "sqlite" else MemoryUnitOfWork())
        async for services in _services(uow):
            yield services


async def _services(uow: Any) -> AsyncIterator[Services]:
    clock, fake_in, notifier, events = Clock(), FakeIn(), FakeNotifier(), ListEvents()
    locks = SubscriberLocks()
    ads = Advertiser(uow, notifier, events, POLICY, RULES, clock, monotonic=Ticks())
    services = Services(
        uow,
        clock,
        fake_in,
        notifier,
        events,
        AccountService(uow, notifier, events, POLICY, clock, locks=locks),
        PaybackService(uow, fake_in, notifier, events, POLICY, Router(ROUTES), clock, locks=locks),
        ads,
        CampaignService(uow, ads, POLICY, clock, send_rate_max_per_s=1000),
    )
    yield services
    await ads.drain()
    await uow.close()


async def test_bar_unbar_and_the_barred_sms(s: Services) -> None:
    await s.lend(M1)
    await s.accounts.bar(M1, "fraud", "ops")
    loaded = await s.uow.read(lambda tx: tx.load_subscriber(M1))
    assert loaded.state.barred_manual and loaded.state.barred_reason == "fraud"
    assert s.notifier.templates(M1) == ["barred"]
    await s.accounts.unbar(M1, "ops", "cleared")
    assert not (await s.uow.read(lambda tx: tx.load_subscriber(M1))).state.barred_manual
    assert s.events.kinds() == ["bar", "unbar"]


async def test_a_write_down_under_the_lock_with_its_edr_once(s: Services) -> None:
    from extrabalance.core.adjustments import AdjustmentError

    loan_id = await s.lend(M1)
    result = await s.accounts.write_down(M1, kind="waive_fee", amount_minor=100, who="ops",
                                         reason="goodwill", request_id="r-1")
    assert (result.debt_before_minor, result.debt_after_minor) == (1100, 1000)
    again = await s.accounts.write_down(M1, kind="waive_fee", amount_minor=100, who="ops",
                                        reason="goodwill", request_id="r-1")
    assert again.replayed and await s.debt(M1) == 1000
    with pytest.raises(AdjustmentError):
        await s.accounts.write_down(M1, kind="waive", amount_minor=1001, who="ops",
                                    reason="too much")
    assert await s.debt(M1) == 1000
    assert [(k, f["amount_minor"], f["loan_id"], f["reason"]) for k, f in s.events.events] == [
        ("adjustment", 100, loan_id, "waive_fee")]


async def test_ageing_writes_off_old_loans_and_counts_overdue(s: Services) -> None:
    recovery = POLICY.recovery
    now = s.clock()
    await s.lend(M1, now=now - timedelta(days=recovery.write_off_days + 1))
    await s.lend(M2, now=now - timedelta(days=recovery.overdue_days + 1))
    await s.lend(M3)
    report = await s.accounts.age_debts(now)
    assert (report.overdue_loans, report.written_off_loans, report.written_off_minor) == (
        1,
        1,
        1100,
    )
    assert await s.debt(M1) == 0 and await s.debt(M2) == 1100
    assert (await s.uow.read(lambda tx: tx.account_totals()))["written_off"] == 1100
    assert s.events.kinds() == ["write_off"]


async def test_retention_purges_old_keys_in_batches(s: Services) -> None:
    now = s.clock()

    def keys(tx: LedgerTx) -> None:
        for i in range(7):
            tx.idempotent_put(f"old:{i}", {"i": i}, now - timedelta(days=3))
        tx.idempotent_put("fresh", {}, now)
        tx.idempotent_put("admin-adjust:T-1", {}, now - timedelta(days=30))

    await s.uow.write(keys)
    purged: list[int] = []
    report = await IdempotencyRetention(
        s.uow, timedelta(days=2), s.clock, batch_rows=3, on_purged=purged.append
    ).purge()
    assert (report.rows_purged, report.batches, purged) == (7, 3, [3, 3, 1])
    assert await s.uow.read(lambda tx: tx.idempotent_get("fresh")) == {}
    assert await s.uow.read(lambda tx: tx.idempotent_get("admin-adjust:T-1")) == {}


async def test_payback_full_partial_replayed_and_deferred(s: Services) -> None:
    await s.lend(M1, 1000, 100)
    s.fake_in.balances[M1] = 400
    partial = await s.payback.handle_recharge(RechargeEvent("e1", M1, 400, IN_A, 400))
    assert partial.status is PaybackStatus.RECOVERED and partial.debt_minor == await s.debt(M1)
    assert 0 < partial.recovered_minor < 1100
    replay = await s.payback.handle_recharge(RechargeEvent("e1", M1, 400, IN_A, 400))
    assert replay.replayed and replay.recovered_minor == partial.recovered_minor
    s.fake_in.balances[M1] = 50_000
    full = await s.payback.handle_recharge(RechargeEvent("e2", M1, 50_000, IN_A, 50_000))
    assert full.debt_minor == 0 and await s.debt(M1) == 0
    assert s.notifier.templates(M1) == ["payback_partial", "payback_full"]
    loaded = await s.uow.read(lambda tx: tx.load_subscriber(M1))
    assert loaded.state.loans_since_full_payback == 0 and loaded.learned_in_node == IN_A
    nothing = await s.payback.handle_recharge(RechargeEvent("e3", M1, 500, IN_A, 500))
    assert nothing.status is PaybackStatus.NOTHING_OWED
    # an answer lost: the recovery stays unsettled, the next recharge is deferred
    await s.lend(M2)
    s.fake_in.balances[M2] = 5_000
    s.fake_in.fail_next(LOST_ANSWER)
    pending = await s.payback.handle_recharge(RechargeEvent("e4", M2, 5_000, IN_A, 5_000))
    assert pending.status is PaybackStatus.PENDING
    deferred = await s.payback.handle_recharge(RechargeEvent("e5", M2, 5_000, IN_A, 5_000))
    assert deferred.status is PaybackStatus.DEFERRED and await s.debt(M2) == 1100
    totals = await s.uow.read(lambda tx: tx.account_totals())
    assert sum(totals.values()) == 0


async def test_payback_retries_with_half_then_gives_up(s: Services) -> None:
    await s.lend(M1, 1000, 100)
    s.fake_in.balances[M1] = 10_000
    s.fake_in.fail_next(REFUSE)
    halved = await s.payback.handle_recharge(RechargeEvent("e1", M1, 10_000, IN_A, 10_000))
    assert halved.status is PaybackStatus.RECOVERED and halved.recovered_minor == 550
    rec = await s.uow.read(lambda tx: tx.recovery_by_event("e1"))
    assert rec is not None and rec.attempts == 2 and rec.state == sagas.DONE
    await s.lend(M2)
    s.fake_in.balances[M2] = 10_000
    s.fake_in.fail_next(REFUSE, REFUSE, REFUSE)
    failed = await s.payback.handle_recharge(RechargeEvent("e2", M2, 10_000, IN_A, 10_000))
    assert failed.status is PaybackStatus.NOT_RECOVERED and failed.debt_minor == 1100
    rec = await s.uow.read(lambda tx: tx.recovery_by_event("e2"))
    assert rec is not None and rec.state == sagas.FAILED and rec.attempts == 3


async def test_ads_caps_and_replay(s: Services) -> None:
    await s.uow.write(lambda tx: tx.put_profile(SubscriberProfile(M1, 400, 6000), s.clock()))
    first = await s.ads.offer(M1, AdTrigger.OUT_OF_BALANCE)
    assert first.send
    too_soon = await s.ads.offer(M1, AdTrigger.OUT_OF_BALANCE)
    assert not too_soon.send and too_soon.reason == "cap_interval"
    s.clock.advance(hours=2)
    keyed = await s.ads.offer(M1, AdTrigger.LOW_BALANCE, idempotency_key="low:1")
    again = await s.ads.offer(M1, AdTrigger.LOW_BALANCE, idempotency_key="low:1")
    assert keyed.send and again.replayed and again.send
    assert len(s.notifier.templates(M1)) == 2
    s.clock.advance(days=2)
    assert await s.ads.prune() == 2


async def test_a_campaign_is_queued_and_drained(s: Services) -> None:
    now = s.clock()

    def profiles(tx: LedgerTx) -> None:
        for m in (M1, M2, M3):
            tx.put_profile(SubscriberProfile(m, 400, 6000), now)
        tx.set_preferences(M3, now, ads_opt_out=True)

    await s.uow.write(profiles)
    await s.lend(M2)  # borrowed already: not in the audience
    preview = await s.campaigns.preview(None, None)
    assert (preview.count, preview.sample) == (1, (M1,))
    row = await s.campaigns.create("ad_campaign", None, None, "ops")
    assert (row.state, row.recipients) == ("QUEUED", 1)
    assert await s.campaigns.drain_once() == 1
    assert await s.campaigns.drain_once() == 0  # nothing pending: DONE
    (done,) = await s.campaigns.list()
    assert (done.state, done.sent, done.pending) == ("DONE", 1, 0)
    assert s.notifier.templates(M1) == ["ad_campaign"]
    assert not await s.campaigns.cancel(done.campaign_id)
