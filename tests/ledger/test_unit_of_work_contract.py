"""One contract, three adapters: every `LedgerTx` operation and the ledger's invariants,
run against the SQLite ledger, the in-memory one and the PostgreSQL one (each test on
a schema of its own) with the same assertions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from extrabalance.core import sagas
from extrabalance.core.limits import LimitState
from extrabalance.core.model import SubscriberProfile
from extrabalance.core.payback import Recovery, RecoveryPart, split
from extrabalance.core.policy import Bundle, PaybackOrder, RecoveryPolicy
from extrabalance.ledger import Ledger, ads_store
from extrabalance.ledger.memory import MemoryUnitOfWork, ReadOnly
from extrabalance.service.unit_of_work import LedgerTx, UnitOfWork
from tests.pg import pg_ledger

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
M1, M2 = "201001234567", "201001234568"
POLICY = RecoveryPolicy(order=PaybackOrder.FEE_FIRST)


@pytest.fixture(params=["sqlite", "memory", "postgresql"])
async def uow(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[UnitOfWork]:
    if request.param == "memory":
        yield MemoryUnitOfWork()
        return
    if request.param == "postgresql":
        async with pg_ledger() as pg:
            yield pg
        return
    ledger = Ledger(tmp_path / "ledger.db", batch_window_ms=0.5)
    try:
        yield ledger
    finally:
        await ledger.close()


def _loan(
    tx: LedgerTx,
    msisdn: str = M1,
    *,
    state: str = sagas.ACTIVE,
    key: str | None = None,
    principal: int = 1000,
    fee: int = 100,
    now: datetime = NOW,
) -> str:
    return tx.insert_loan(
        msisdn=msisdn,
        tier_id=2,
        principal_minor=principal,
        fee_minor=fee,
        state=state,
        channel="ussd",
        idempotency_key=key,
        in_node="in-a",
        session_id="s",
        now=now,
    )


def _balanced(tx: LedgerTx, msisdn: str) -> None:
    by_tx: dict[str, int] = {}
    for tx_id, _, amount in tx.journal_entries(msisdn):
        by_tx[tx_id] = by_tx.get(tx_id, 0) + amount
    assert all(v == 0 for v in by_tx.values()), by_tx
    assert tx.debt_from_journal(msisdn) == tx.debt_owed(msisdn)


async def test_subscriber_profile_preferences_route_and_bar(uow: UnitOfWork) -> None:
    def write(tx: LedgerTx) -> None:
        assert tx.load_subscriber(M1).known is False
        tx.put_profile(SubscriberProfile(M1, 400, 6000, {"plan": "gold"}), NOW)
        tx.set_preferences(M1, NOW, auto_advance=True, ads_opt_out=True, language="ar")
        tx.learn_route(M1, "in-b", NOW)
        tx.set_bar(M1, True, "fraud", "ops", NOW)
        tx.audit(M1, "note", "ops", "checked", NOW, {"ticket": 7})

    await uow.write(write)
    loaded = await uow.read_point(lambda tx: tx.load_subscriber(M1, balance_minor=5))
    assert loaded.known and loaded.learned_in_node == "in-b"
    state = loaded.state
    assert state.profile == SubscriberProfile(M1, 400, 6000, {"plan": "gold"})
    assert (state.auto_advance_opt_in, state.ads_opt_out, state.language) == (True, True, "ar")
    assert (state.barred_manual, state.barred_reason, state.balance_minor) == (True, "fraud", 5)
    assert await uow.read(lambda tx: tx.learned_route(M1)) == "in-b"
    ad = await uow.read(lambda tx: tx.load_ad_subscriber(M1))
    assert ad is not None and ad.ads_opt_out and ad.barred_manual and ad.language == "ar"
    await uow.write(lambda tx: tx.set_bar(M1, False, "cleared", "ops", NOW))
    assert not (await uow.read(lambda tx: tx.load_subscriber(M1))).state.barred_manual
    assert await uow.read(lambda tx: tx.load_ad_subscriber(M2)) is None


async def test_limit_state_kept_replaced_and_rolled_back(uow: UnitOfWork) -> None:
    assert await uow.read(lambda tx: tx.limit_state(M1)) == LimitState()
    kept = LimitState(((20513, 5000), (20514, 250)), 1000, 2, 1, 3)
    await uow.write(lambda tx: tx.put_limit_state(M1, kept, NOW))
    assert await uow.read_point(lambda tx: tx.limit_state(M1)) == kept
    assert await uow.read(lambda tx: tx.limit_state(M2)) == LimitState()
    newer = LimitState(((20514, 900),), -500, 2, 1, 4)
    await uow.write(lambda tx: tx.put_limit_state(M1, newer, NOW))
    assert await uow.read(lambda tx: tx.limit_state(M1)) == newer

    def fails(tx: LedgerTx) -> None:
        tx.put_limit_state(M1, LimitState(), NOW)
        raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        await uow.write(fails)
    assert await uow.read(lambda tx: tx.limit_state(M1)) == newer


async def test_do_not_disturb_list_add_remove_page(uow: UnitOfWork) -> None:
    assert not await uow.read_point(lambda tx: tx.dnd_listed(M1))
    assert await uow.write(lambda tx: tx.dnd_add([M2, M1, M1], "file", "ops", NOW)) == 2
    assert await uow.write(lambda tx: tx.dnd_add([M1], "admin", "ops", NOW)) == 0
    assert await uow.read_point(lambda tx: tx.dnd_listed(M1))
    page = await uow.read(lambda tx: tx.dnd_page("", 10))
    assert [row[:3] for row in page] == [(M1, "file", "ops"), (M2, "file", "ops")]
    assert await uow.read(lambda tx: tx.dnd_page(M1, 10)) == page[1:]
    assert await uow.read(lambda tx: tx.dnd_page("", 1)) == page[:1]
    assert await uow.write(lambda tx: tx.dnd_remove(M1)) is True
    assert await uow.write(lambda tx: tx.dnd_remove(M1)) is False
    assert not await uow.read(lambda tx: tx.dnd_listed(M1))


async def test_idempotency_first_outcome_wins_replace_and_purge(uow: UnitOfWork) -> None:
    def write(tx: LedgerTx) -> None:
        tx.idempotent_put("k", {"a": 1}, NOW)
        tx.idempotent_put("k", {"a": 2}, NOW)  # the first stays
        tx.idempotent_put("admin-adjust:T-1", {"kept": True}, NOW)
        tx.idempotent_put("new", {"b": [1]}, NOW + timedelta(days=5))

    await uow.write(write)
    assert await uow.read(lambda tx: tx.idempotent_get("k")) == {"a": 1}
    await uow.write(lambda tx: tx.idempotent_replace("k", {"a": 3}, NOW))
    assert await uow.read(lambda tx: tx.idempotent_get("k")) == {"a": 3}
    assert await uow.write(lambda tx: tx.purge_idempotency(NOW + timedelta(days=1), 10)) == 1
    assert await uow.read(lambda tx: tx.idempotent_get("k")) is None
    assert await uow.read(lambda tx: tx.idempotent_get("admin-adjust:T-1")) == {"kept": True}
    assert await uow.read(lambda tx: tx.idempotent_get("new")) == {"b": [1]}


async def test_a_borrow_saga_journals_only_when_credited(uow: UnitOfWork) -> None:
    loan_id = await uow.write(lambda tx: _loan(tx, state=sagas.CREDITING, key="ussd:1"))
    loan = await uow.read(lambda tx: tx.loan_by_idempotency_key("ussd:1"))
    assert loan is not None and loan.loan_id == loan_id and loan.state == sagas.CREDITING
    assert await uow.read(lambda tx: tx.debt_owed(M1)) == 0
    assert [r.loan_id for r in await uow.read(lambda tx: tx.unsettled_loans(10))] == [loan_id]
    pending = await uow.read(lambda tx: tx.load_subscriber(M1))
    assert pending.state.operation_pending
    await uow.write(lambda tx: tx.settle_loan(loan_id, sagas.UNKNOWN, NOW))
    settled = await uow.write(
        lambda tx: tx.settle_loan(loan_id, sagas.ACTIVE, NOW, result_code=2001)
    )
    assert settled.state == sagas.ACTIVE
    again = await uow.write(lambda tx: tx.settle_loan(loan_id, sagas.ACTIVE, NOW))  # a replay
    assert again.state == sagas.ACTIVE
    assert await uow.read(lambda tx: tx.debt_owed(M1)) == 1100
    loaded = await uow.read(lambda tx: tx.load_subscriber(M1))
    assert loaded.state.loans_since_full_payback == 1 and not loaded.state.operation_pending
    assert [x.loan_id for x in await uow.read(lambda tx: tx.open_loans(M1))] == [loan_id]
    totals = await uow.read(lambda tx: tx.account_totals())
    assert totals["principal_receivable"] == 1000 and totals["disbursed_float"] == -1000
    assert sum(totals.values()) == 0
    await uow.read(lambda tx: _balanced(tx, M1))


async def test_a_bundle_loan_keeps_its_units_money_loans_none(uow: UnitOfWork) -> None:
    """The units a bundle loan asked the IN for are booked with it (migration 0012) and
    read back by every loan read: the resolver rebuilds the request from them."""
    data = Bundle("data", 500 * 2**20, service_identifier=1, rating_group=4_000_000_000)
    sms = Bundle("sms", 100, rating_group=30)  # no Service-Identifier

    def book(tx: LedgerTx) -> tuple[str, str, str]:
        ids = []
        for key, bundle in (("data:1", data), ("sms:1", sms), ("money:1", None)):
            ids.append(tx.insert_loan(
                msisdn=M1, tier_id=13, principal_minor=1000, fee_minor=100,
                state=sagas.CREDITING, channel="sms", idempotency_key=key, in_node="in-a",
                session_id=f"s;{key}", now=NOW, bundle=bundle))
        return ids[0], ids[1], ids[2]

    with_data, with_sms, money = await uow.write(book)
    got = await uow.read(lambda tx: tx.get_loan(with_data))
    assert got is not None and got.bundle == data
    by_key = await uow.read(lambda tx: tx.loan_by_idempotency_key("sms:1"))
    assert by_key is not None and by_key.bundle == sms
    assert (await uow.read(lambda tx: tx.get_loan(money))).bundle is None  # type: ignore[union-attr]
    unsettled = await uow.read(lambda tx: tx.unsettled_loans(10))
    assert {r.loan_id: r.bundle for r in unsettled} == {
        with_data: data, with_sms: sms, money: None}
    claimed = await uow.write(
        lambda tx: tx.claim_unsettled_loans("node-a", NOW, NOW + timedelta(minutes=2), 10))
    assert {r.loan_id: r.bundle for r in claimed} == {with_data: data, with_sms: sms, money: None}
    settled = await uow.write(lambda tx: tx.settle_loan(with_data, sagas.ACTIVE, NOW))
    assert settled.bundle == data and settled.principal_minor == 1000  # owed in money


async def test_illegal_transitions_raise_and_change_nothing(uow: UnitOfWork) -> None:
    loan_id = await uow.write(lambda tx: _loan(tx, state=sagas.CREDITING))
    await uow.write(lambda tx: tx.settle_loan(loan_id, sagas.FAILED, NOW))
    with pytest.raises(sagas.IllegalTransition):
        await uow.write(lambda tx: tx.settle_loan(loan_id, sagas.ACTIVE, NOW))
    with pytest.raises(sagas.IllegalTransition):
        await uow.write(lambda tx: _loan(tx, state=sagas.REPAID))
    # REPAID follows ACTIVE in the table, but only through a recovery, never a settlement
    active = await uow.write(lambda tx: _loan(tx))
    with pytest.raises(sagas.IllegalTransition):
        await uow.write(lambda tx: tx.settle_loan(active, sagas.REPAID, NOW))
    with pytest.raises(sagas.IllegalTransition):
        await uow.write(lambda tx: tx.settle_loan(active, sagas.WRITTEN_OFF, NOW))
    with pytest.raises(sagas.LedgerInvariantError):
        await uow.write(lambda tx: tx.settle_advance(loan_id, True, NOW))
    assert (await uow.read(lambda tx: tx.get_loan(loan_id))).state == sagas.FAILED  # type: ignore[union-attr]
    assert await uow.read(lambda tx: tx.debt_owed(M1)) == 1100  # the ACTIVE one, untouched
    rec_id = await uow.write(
        lambda tx: tx.insert_recovery(
            event_id="e1",
            msisdn=M1,
            recharge_minor=500,
            balance_after_minor=500,
            in_node="in-a",
            now=NOW,
            session_id="d1",
            requested_minor=100,
        )
    )
    await uow.write(lambda tx: tx.set_recovery_state(rec_id, sagas.FAILED, NOW))
    with pytest.raises(sagas.IllegalTransition):
        await uow.write(lambda tx: tx.set_recovery_state(rec_id, sagas.UNKNOWN, NOW))
    with pytest.raises(sagas.IllegalTransition):
        await uow.write(lambda tx: tx.start_recovery_attempt(rec_id, "d2", 50, NOW))
    rec = await uow.read(lambda tx: tx.get_recovery(rec_id))
    assert rec is not None and rec.state == sagas.FAILED and rec.attempts == 1


async def test_a_unit_that_raises_leaves_nothing_behind(uow: UnitOfWork) -> None:
    def half_done(tx: LedgerTx) -> None:
        tx.idempotent_put("k", {"x": 1}, NOW)
        _loan(tx, key="dup")
        _loan(tx, key="dup")  # a second loan for one request key

    with pytest.raises(Exception):  # noqa: B017 - the database's own error type
        await uow.write(half_done)
    assert await uow.read(lambda tx: tx.idempotent_get("k")) is None
    assert await uow.read(lambda tx: tx.loan_by_idempotency_key("dup")) is None
    assert await uow.read(lambda tx: tx.account_totals()) == dict.fromkeys(
        (await uow.read(lambda tx: tx.account_totals())), 0
    )

    # one recovery per recharge event
    def twice(tx: LedgerTx) -> None:
        for _ in range(2):
            tx.insert_recovery(
                event_id="e",
                msisdn=M1,
                recharge_minor=1,
                balance_after_minor=None,
                in_node=None,
                now=NOW,
            )

    with pytest.raises(Exception):  # noqa: B017
        await uow.write(twice)
    assert await uow.read(lambda tx: tx.recovery_by_event("e")) is None


async def test_the_ledger_answers_a_ping(uow: UnitOfWork) -> None:
    assert await uow.read(lambda tx: tx.ping()) is None
    assert await uow.read_point(lambda tx: tx.ping()) is None


async def test_reads_cannot_write_and_see_committed_work(uow: UnitOfWork) -> None:
    await uow.write(lambda tx: tx.idempotent_put("k", {"x": 1}, NOW))
    staged, durable = await uow.write_staged(lambda tx: tx.idempotent_get("k"))
    assert staged == {"x": 1} and await durable == {"x": 1}
    if isinstance(uow, MemoryUnitOfWork):
        with pytest.raises(ReadOnly):
            await uow.read(lambda tx: tx.idempotent_put("j", {}, NOW))
    elif not isinstance(uow, Ledger):  # PostgreSQL: reads run in READ ONLY transactions
        import psycopg

        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await uow.read(lambda tx: tx.idempotent_put("j", {}, NOW))
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await uow.read_point(lambda tx: tx.idempotent_put("j", {}, NOW))


async def test_an_advance_confirmed_or_reversed(uow: UnitOfWork) -> None:
    first = await uow.write(lambda tx: _loan(tx, state=sagas.CONFIRMING, key="ccr:1"))
    assert await uow.read(lambda tx: tx.debt_owed(M1)) == 1100  # journalled when booked
    loaded = await uow.read(lambda tx: tx.load_subscriber(M1))
    assert loaded.recovery_pending and loaded.state.operation_pending
    assert loaded.state.open_loans == ()
    with pytest.raises(sagas.LedgerInvariantError):
        await uow.write(lambda tx: tx.settle_loan(first, sagas.ACTIVE, NOW))
    refused = await uow.write(lambda tx: tx.settle_advance(first, False, NOW, result_code=5030))
    assert refused.state == sagas.FAILED
    assert await uow.read(lambda tx: tx.debt_owed(M1)) == 0
    assert await uow.read(lambda tx: tx.debt_from_journal(M1)) == 0
    assert (await uow.read(lambda tx: tx.load_subscriber(M1))).state.loans_since_full_payback == 0
    second = await uow.write(lambda tx: _loan(tx, state=sagas.CONFIRMING, key="ccr:2"))
    ok = await uow.write(lambda tx: tx.settle_advance(second, True, NOW))
    assert ok.state == sagas.ACTIVE and await uow.read(lambda tx: tx.debt_owed(M1)) == 1100
    await uow.read(lambda tx: _balanced(tx, M1))


def _advance(tx: LedgerTx, key: str, in_node: str, now: datetime, msisdn: str = M1) -> str:
    return tx.insert_loan(
        msisdn=msisdn,
        tier_id=1,
        principal_minor=500,
        fee_minor=50,
        state=sagas.ACTIVE,
        channel="auto",
        idempotency_key=f"ccr:{key}:0",
        in_node=in_node,
        session_id=key,
        now=now,
    )


async def test_advances_of_an_in_node_and_one_it_never_credited(uow: UnitOfWork) -> None:
    early = await uow.write(lambda tx: _advance(tx, "a", "in-a", NOW))
    later = await uow.write(lambda tx: _advance(tx, "b", "in-a", NOW + timedelta(hours=1)))
    await uow.write(lambda tx: _advance(tx, "c", "in-b", NOW))
    borrow = await uow.write(lambda tx: _loan(tx))  # a borrow to in-a: not an advance
    found = await uow.read(lambda tx: tx.advances_of_in_node("in-a", NOW + timedelta(hours=2)))
    assert [loan.loan_id for loan in found] == [early, later]
    cut = await uow.read(lambda tx: tx.advances_of_in_node("in-a", NOW))
    assert [loan.loan_id for loan in cut] == [early]
    assert await uow.read(lambda tx: tx.advances_of_in_node("in-z", NOW)) == []
    # An ACTIVE advance is not refused by a plain settlement, only reversed when the
    # IN's records show it never credited it.
    with pytest.raises(sagas.LedgerInvariantError):
        await uow.write(lambda tx: tx.settle_advance(early, False, NOW))
    debt = await uow.read(lambda tx: tx.debt_owed(M1))
    reversed_ = await uow.write(
        lambda tx: tx.settle_advance(early, False, NOW, never_credited=True))
    assert reversed_.state == sagas.FAILED
    assert await uow.read(lambda tx: tx.debt_owed(M1)) == debt - 550
    again = await uow.write(lambda tx: tx.settle_advance(early, False, NOW, never_credited=True))
    assert again.state == sagas.FAILED
    assert await uow.read(lambda tx: tx.debt_owed(M1)) == debt - 550
    # A borrow (not an advance) is never reversed so.
    with pytest.raises(sagas.LedgerInvariantError):
        await uow.write(lambda tx: tx.settle_advance(borrow, False, NOW, never_credited=True))
    await uow.read(lambda tx: _balanced(tx, M1))


async def test_a_write_down_spreads_books_audits_and_replays(uow: UnitOfWork) -> None:
    from extrabalance.core.adjustments import AdjustmentError

    first = await uow.write(lambda tx: _loan(tx, principal=500, fee=50))
    second = await uow.write(lambda tx: _loan(tx, principal=300, fee=35,
                                              now=NOW + timedelta(minutes=1)))
    later = NOW + timedelta(days=1)

    def waive(amount: int, kind: str = "waive", msisdn: str = M1, **kw: Any) -> Any:
        return uow.write(lambda tx: tx.write_down(
            msisdn, kind=kind, amount_minor=amount, who="ops", reason="goodwill", now=later,
            **kw))

    result = await waive(600, request_id="t-1")
    assert [(x["loan_id"], x["fee_minor"], x["principal_minor"], x["state"])
            for x in result.loans] == [(first, 50, 500, sagas.WRITTEN_OFF),
                                       (second, 35, 15, sagas.PARTIALLY_REPAID)]
    assert (result.debt_before_minor, result.debt_after_minor) == (885, 285)
    assert await uow.read(lambda tx: tx.debt_owed(M1)) == 285
    assert (await uow.read(lambda tx: tx.account_totals()))["written_off"] == 600
    again = await waive(600, request_id="t-1")
    assert again.replayed and again.tx_id == result.tx_id
    assert await uow.read(lambda tx: tx.debt_owed(M1)) == 285
    for amount, kind, why in ((1, "waive_fee", "exceeds"), (286, "waive", "exceeds"),
                              (0, "waive", "positive"),
                              (5, "grow", "kind")):
        with pytest.raises(AdjustmentError, match=why):
            await waive(amount, kind)
    with pytest.raises(AdjustmentError, match="another subscriber"):
        await waive(1, msisdn=M2, request_id="t-1")
    await uow.write(lambda tx: _loan(tx, state=sagas.CREDITING, key="k"))
    with pytest.raises(AdjustmentError, match="unsettled"):
        await waive(10)
    assert await uow.read(lambda tx: tx.debt_owed(M1)) == 285
    await uow.read(lambda tx: _balanced(tx, M1))


async def test_session_evidence_recorded_once_on_the_advance(uow: UnitOfWork) -> None:
    loan_id = await uow.write(lambda tx: _loan(tx, key="ccr:s:0"))
    assert await uow.read(lambda tx: tx.session_evidence(loan_id)) is None
    assert await uow.write(lambda tx: tx.record_session_evidence(loan_id, "s", 3, 1, 420, NOW))
    # The first request that continued the session is kept.
    assert not await uow.write(lambda tx: tx.record_session_evidence(loan_id, "s", 3, 2, 9, NOW))
    assert await uow.read(lambda tx: tx.session_evidence(loan_id)) == (3, 1, 420)
    other = await uow.write(lambda tx: _loan(tx, key="ccr:t:0"))
    assert await uow.write(lambda tx: tx.record_session_evidence(other, "t", 2, 1, None, NOW))
    assert await uow.read(lambda tx: tx.session_evidence(other)) == (2, 1, None)

    def then_fail(tx: LedgerTx) -> None:
        third = _loan(tx, key="ccr:u:0")
        tx.record_session_evidence(third, "u", 3, 1, 5, NOW)
        raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        await uow.write(then_fail)
    assert await uow.read(lambda tx: tx.loan_by_idempotency_key("ccr:u:0")) is None


async def test_recovery_attempts_split_and_settle(uow: UnitOfWork) -> None:
    def setup(tx: LedgerTx) -> str:
        _loan(tx, principal=1000, fee=100, now=NOW)
        _loan(tx, principal=500, fee=50, now=NOW + timedelta(seconds=1))
        return tx.insert_recovery(
            event_id="e1",
            msisdn=M1,
            recharge_minor=2000,
            balance_after_minor=2000,
            in_node="in-a",
            now=NOW,
            session_id="d1",
            requested_minor=1600,
        )

    rec_id = await uow.write(setup)
    assert (await uow.read(lambda tx: tx.recovery_by_event("e1"))).recovery_id == rec_id  # type: ignore[union-attr]
    assert [r.recovery_id for r in await uow.read(lambda tx: tx.unsettled_recoveries(5))] == [
        rec_id
    ]
    await uow.write(lambda tx: tx.note_recovery_attempt(rec_id, "refused", 4012))
    assert await uow.write(lambda tx: tx.start_recovery_attempt(rec_id, "d2", 800, NOW)) == 2
    await uow.write(lambda tx: tx.set_recovery_state(rec_id, sagas.UNKNOWN, NOW))
    await uow.write(lambda tx: tx.set_recovery_state(rec_id, sagas.UNKNOWN, NOW))  # a replay

    def settle(tx: LedgerTx) -> None:
        rec = tx.get_recovery(rec_id)
        assert rec is not None and rec.attempts == 2 and rec.requested_minor == 800
        tx.note_recovery_attempt(rec_id, "done", 2001, rec.attempts)
        loans = tx.open_loans(M1)
        tx.apply_recovery(rec, split(loans, 1200, POLICY), NOW)

    await uow.write(settle)
    rec = await uow.read(lambda tx: tx.get_recovery(rec_id))
    assert rec is not None and rec.state == sagas.DONE and rec.recovered_minor == 1200
    loans = await uow.read(lambda tx: tx.open_loans(M1))
    assert [(x.fee_repaid_minor, x.principal_repaid_minor) for x in loans] == [(50, 50)]
    assert await uow.read(lambda tx: tx.debt_owed(M1)) == 450
    await uow.read(lambda tx: _balanced(tx, M1))
    with pytest.raises(sagas.IllegalTransition):  # DONE is final
        await uow.write(lambda tx: tx.apply_recovery(rec, Recovery(0, (), False), NOW))
    # the rest, which clears the debt and the bad-debt count
    rest = await uow.write(
        lambda tx: tx.insert_recovery(
            event_id="e2",
            msisdn=M1,
            recharge_minor=450,
            balance_after_minor=450,
            in_node="in-a",
            now=NOW,
            session_id="d3",
            requested_minor=450,
        )
    )

    def clear(tx: LedgerTx) -> None:
        r = tx.get_recovery(rest)
        assert r is not None
        tx.apply_recovery(r, split(tx.open_loans(M1), 450, POLICY), NOW)

    await uow.write(clear)
    assert await uow.read(lambda tx: tx.open_loans(M1)) == ()
    assert (await uow.read(lambda tx: tx.load_subscriber(M1))).state.loans_since_full_payback == 0
    await uow.read(lambda tx: _balanced(tx, M1))


async def test_a_split_that_does_not_fit_the_loans_is_refused(uow: UnitOfWork) -> None:
    def setup(tx: LedgerTx) -> tuple[str, str]:
        loan_id = _loan(tx, principal=100, fee=10)
        return loan_id, tx.insert_recovery(
            event_id="e",
            msisdn=M1,
            recharge_minor=500,
            balance_after_minor=500,
            in_node=None,
            now=NOW,
            session_id="d",
            requested_minor=200,
        )

    loan_id, rec_id = await uow.write(setup)
    too_much = Recovery(200, (RecoveryPart(loan_id, 10, 190),), True)
    with pytest.raises(sagas.LedgerInvariantError):
        await uow.write(lambda tx: tx.apply_recovery(tx.get_recovery(rec_id), too_much, NOW))  # type: ignore[arg-type]
    not_adding_up = Recovery(5, (RecoveryPart(loan_id, 1, 1),), False)
    with pytest.raises(sagas.LedgerInvariantError):
        await uow.write(lambda tx: tx.apply_recovery(tx.get_recovery(rec_id), not_adding_up, NOW))  # type: ignore[arg-type]
    assert await uow.read(lambda tx: tx.debt_owed(M1)) == 110


async def test_ageing_write_off_and_resolver_review(uow: UnitOfWork) -> None:
    old = await uow.write(lambda tx: _loan(tx, now=NOW - timedelta(days=200)))
    await uow.write(lambda tx: _loan(tx, M2, now=NOW - timedelta(days=100)))
    assert (
        await uow.read(
            lambda tx: tx.count_overdue(NOW - timedelta(days=90), NOW - timedelta(days=180))
        )
        == 1
    )
    candidates = await uow.read(lambda tx: tx.write_off_candidates(NOW - timedelta(days=150), 10))
    assert candidates == [(M1, old)]
    assert await uow.write(lambda tx: tx.write_off(old, "ageing", NOW)) == 1100
    assert await uow.write(lambda tx: tx.write_off(old, "ageing", NOW)) == 0  # written off once
    assert (await uow.read(lambda tx: tx.account_totals()))["written_off"] == 1100
    await uow.read(lambda tx: _balanced(tx, M1))
    stuck = await uow.write(lambda tx: _loan(tx, M2, state=sagas.CREDITING))
    assert await uow.write(lambda tx: tx.note_resolve_attempt("loans", stuck, 2, NOW)) is False
    assert await uow.write(lambda tx: tx.note_resolve_attempt("loans", stuck, 2, NOW)) is True
    assert await uow.read(lambda tx: tx.unsettled_loans(10)) == []  # flagged for review
    # a subscriber with a settlement in flight is not written off
    (m2_loan,) = await uow.read(lambda tx: tx.open_loans(M2))
    assert await uow.read(lambda tx: tx.write_off_candidates(NOW, 10)) == [(M2, m2_loan.loan_id)]
    assert await uow.write(lambda tx: tx.write_off(m2_loan.loan_id, "ageing", NOW)) == 0


async def test_saga_leases_claimed_renewed_and_taken_over(uow: UnitOfWork) -> None:
    """Several nodes on one ledger: a node's sagas are its own while its lease runs; its
    resolver's claim renews them; another node takes them over only once the lease
    ran out; a row without an owner is anyone's; a settled row is nobody's."""
    from extrabalance.ledger.store import ts

    a, b, lease, s = "node-a", "node-b", timedelta(seconds=120), timedelta(seconds=1)

    def book(tx: LedgerTx) -> tuple[str, str, str]:
        mine = tx.insert_loan(
            msisdn=M1, tier_id=2, principal_minor=1000, fee_minor=100, state=sagas.CREDITING,
            channel="ussd", idempotency_key="k-a", in_node="in-a", session_id="s;1", now=NOW,
            owner_node=a, lease_until=NOW + lease)
        free = _loan(tx, M2, state=sagas.CREDITING, now=NOW + s)  # booked with no owner
        rec = tx.insert_recovery(
            event_id="ev-1", msisdn=M1, recharge_minor=500, balance_after_minor=None,
            in_node="in-a", now=NOW, session_id="d;1", requested_minor=500,
            owner_node=a, lease_until=NOW + lease)
        return mine, free, rec

    mine, free, rec = await uow.write(book)
    assert await uow.read(lambda tx: tx.saga_lease("loans", mine)) == (a, ts(NOW + lease))
    assert await uow.read(lambda tx: tx.saga_lease("loans", free)) == (None, None)

    def claim(node: str, at: datetime, limit: int = 10) -> Any:
        def unit(tx: LedgerTx) -> tuple[list[str], list[str]]:
            loans = tx.claim_unsettled_loans(node, at, at + lease, limit)
            recs = tx.claim_unsettled_recoveries(node, at, at + lease, limit)
            return [x.loan_id for x in loans], [x.recovery_id for x in recs]

        return uow.write(unit)

    # B while A lives: only the row nobody owned, now B's
    assert await claim(b, NOW + 10 * s) == ([free], [])
    assert await uow.read(lambda tx: tx.saga_lease("loans", free)) == (b, ts(NOW + 10 * s + lease))
    # A renews its own, and does not take B's
    assert await claim(a, NOW + 60 * s) == ([mine], [rec])
    assert await uow.read(lambda tx: tx.saga_lease("recoveries", rec)) == (
        a, ts(NOW + 60 * s + lease))
    assert await claim(b, NOW + 60 * s + lease - s) == ([free], [])  # A's lease still runs
    # A died: once its lease ran out, B takes over, oldest first, at most `limit`
    after = NOW + 60 * s + lease + s
    assert await claim(b, after, limit=1) == ([mine], [rec])
    assert await claim(b, after) == ([mine, free], [rec])
    assert await uow.read(lambda tx: tx.saga_lease("loans", mine)) == (b, ts(after + lease))
    assert await claim(a, after) == ([], [])  # A, back, finds them taken
    # settled: nobody's to claim
    await uow.write(lambda tx: tx.settle_loan(mine, sagas.ACTIVE, after))
    await uow.write(lambda tx: tx.set_recovery_state(rec, sagas.FAILED, after))
    assert await claim(b, after) == ([free], [])


async def test_ads_and_campaigns(uow: UnitOfWork) -> None:
    def setup(tx: LedgerTx) -> str:
        for m in (M1, M2, "201001234569"):
            tx.put_profile(SubscriberProfile(m, 400, 6000), NOW)
        _loan(tx, M2)  # borrowed: not in the audience
        tx.record_ad(M1, "out_of_balance", "ad_oob", NOW - timedelta(hours=30))
        tx.record_ad(M1, "low_balance", "ad_low", NOW - timedelta(hours=1))
        return tx.create_campaign("ad_campaign", None, "ops", NOW)

    campaign = await uow.write(setup)
    recent = await uow.read(lambda tx: tx.recent_ads(M1, NOW - timedelta(hours=24)))
    assert [t for _, t in recent] == ["low_balance"]
    assert await uow.write(lambda tx: tx.prune_ads(NOW - timedelta(hours=25), 10)) == 1
    audience = await uow.read(lambda tx: tx.audience_chunk("", 10))
    assert [r.msisdn for r in audience] == [M1, "201001234569"]
    assert [r.msisdn for r in await uow.read(lambda tx: tx.audience_chunk(M1, 10))] == [
        "201001234569"
    ]
    assert (
        await uow.write(lambda tx: tx.add_recipients(campaign, [M1, "201001234569", M1], NOW)) == 2
    )
    await uow.write(lambda tx: tx.set_campaign_state(campaign, ads_store.QUEUED, NOW))
    assert [c.campaign_id for c in await uow.read(lambda tx: tx.active_campaigns())] == [campaign]
    assert await uow.read(lambda tx: tx.pending_recipients(campaign, 1)) == [M1]
    assert await uow.write(lambda tx: tx.settle_recipient(campaign, M1, ads_store.SENT, None, NOW))
    assert not await uow.write(
        lambda tx: tx.settle_recipient(campaign, M1, ads_store.SENT, None, NOW)
    )
    await uow.write(
        lambda tx: tx.settle_recipient(
            campaign, "201001234569", ads_store.SUPPRESSED, "cap_day", NOW
        )
    )
    row = await uow.read(lambda tx: tx.get_campaign(campaign))
    assert row is not None and (row.recipients, row.sent, row.suppressed, row.pending) == (
        2,
        1,
        1,
        0,
    )
    assert [c.campaign_id for c in await uow.read(lambda tx: tx.list_campaigns())] == [campaign]


def test_every_port_operation_is_exercised_here() -> None:
    """A new `LedgerTx` operation needs a case in this module (run on both adapters)."""
    from pathlib import Path

    source = Path(__file__).read_text(encoding="utf-8")
    operations = [name for name in vars(LedgerTx) if not name.startswith("_")]
    assert len(operations) > 40
    assert [name for name in operations if f"tx.{name}(" not in source] == []


async def test_outbox_rows_commit_with_their_unit_and_are_sent_once(uow: UnitOfWork) -> None:
    def loan_and_message(tx: LedgerTx) -> str:
        _loan(tx)
        return tx.outbox_put(msisdn=M1, template="loan_granted",
                             params={"amount": 1000, "fee": 100}, kind="sms",
                             language="ar", now=NOW)

    first = await uow.write(loan_and_message)

    def rolled_back(tx: LedgerTx) -> None:
        tx.outbox_put(msisdn=M2, template="loan_granted", params={}, kind="sms",
                      language="en", now=NOW)
        raise RuntimeError("the money was not committed")

    with pytest.raises(RuntimeError):
        await uow.write(rolled_back)
    due = await uow.read(lambda tx: tx.outbox_due(NOW, 10))
    assert [(r.outbox_id, r.msisdn, r.template, dict(r.params), r.language, r.attempts)
            for r in due] == [(first, M1, "loan_granted", {"amount": 1000, "fee": 100}, "ar", 0)]
    assert due[0].created_at == NOW

    later = NOW + timedelta(seconds=30)
    await uow.write(lambda tx: tx.outbox_retry_later(first, later))
    assert await uow.read(lambda tx: tx.outbox_due(NOW, 10)) == []
    (again,) = await uow.read(lambda tx: tx.outbox_due(later, 10))
    assert again.attempts == 1
    assert await uow.write(lambda tx: tx.outbox_mark_sent(first, later)) is True
    assert await uow.write(lambda tx: tx.outbox_mark_sent(first, later)) is False
    assert await uow.read(lambda tx: tx.outbox_due(later + timedelta(days=1), 10)) == []
    assert await uow.write(lambda tx: tx.outbox_prune(later, 10)) == 0
    assert await uow.write(lambda tx: tx.outbox_prune(later + timedelta(seconds=1), 10)) == 1


async def test_outbox_rows_taken_by_one_sender_at_a_time(uow: UnitOfWork) -> None:
    """Several nodes' senders on one outbox: a row taken is not due again until the
    claim runs out (the taker died), and then it is due once more."""
    def put(tx: LedgerTx, msisdn: str, at: datetime) -> str:
        return tx.outbox_put(msisdn=msisdn, template="loan_granted", params={}, kind="sms",
                             language="en", now=at)

    first = await uow.write(lambda tx: put(tx, M1, NOW))
    second = await uow.write(lambda tx: put(tx, M2, NOW + timedelta(seconds=1)))
    until = NOW + timedelta(minutes=1)
    later = NOW + timedelta(seconds=5)
    taken = await uow.write(lambda tx: tx.outbox_claim_due(later, until, 1))
    assert [r.outbox_id for r in taken] == [first]  # oldest first, at most `limit`
    taken = await uow.write(lambda tx: tx.outbox_claim_due(later, until, 10))
    assert [r.outbox_id for r in taken] == [second]  # the other sender: only the rest
    assert await uow.write(lambda tx: tx.outbox_claim_due(later, until, 10)) == []
    assert await uow.write(lambda tx: tx.outbox_mark_sent(second, later)) is True
    # the first taker died without sending: due again once its claim ran out
    after = until + timedelta(seconds=1)
    again = await uow.write(lambda tx: tx.outbox_claim_due(after, after + timedelta(minutes=1), 10))
    assert [(r.outbox_id, r.msisdn) for r in again] == [(first, M1)]


async def test_campaign_recipients_claimed_by_one_drainer_at_a_time(uow: UnitOfWork) -> None:
    """Several nodes' drainers on one campaign: a recipient claimed is not claimable
    again until the claim runs out (the claimer died), settled ones never again."""
    others = ["201001234570", "201001234571"]

    def setup(tx: LedgerTx) -> str:
        campaign = tx.create_campaign("ad_campaign", None, "ops", NOW)
        tx.add_recipients(campaign, [M1, *others], NOW)
        return campaign

    campaign = await uow.write(setup)
    until = NOW + timedelta(minutes=2)
    assert await uow.write(lambda tx: tx.claim_recipients(campaign, NOW, until, 2)) == [
        M1, others[0]]  # MSISDN order, at most `limit`
    assert await uow.write(lambda tx: tx.claim_recipients(campaign, NOW, until, 10)) == [
        others[1]]  # the other drainer: only the rest
    assert await uow.write(lambda tx: tx.claim_recipients(campaign, NOW, until, 10)) == []
    await uow.write(lambda tx: tx.settle_recipient(campaign, M1, ads_store.SENT, None, NOW))
    # the claims ran out: what is still PENDING is claimable once more, the sent one not
    after = until + timedelta(seconds=1)
    assert await uow.write(lambda tx: tx.claim_recipients(
        campaign, after, after + timedelta(minutes=2), 10)) == others
    assert await uow.write(lambda tx: tx.claim_recipients(campaign, after, after, 0)) == []


async def test_consent_trail_and_loan_times(uow: UnitOfWork) -> None:
    """The consumer-protection reads: his audit lines (filtered, oldest first, the
    newest `limit`) and the times of his loans that did not fail."""
    later = NOW + timedelta(hours=1)

    def write(tx: LedgerTx) -> None:
        tx.audit(M1, "loan_confirm_requested", "subscriber", "sms", NOW, {"tier_id": 3})
        tx.audit(M1, "bar", "ops", "fraud", NOW)
        tx.audit(M1, "loan_consent", "subscriber", "sms", later, {"loan_id": "x"})
        tx.audit(M2, "loan_consent", "subscriber", "ussd", later)
        _loan(tx, key="k1", now=NOW)
        _loan(tx, key="k2", state=sagas.CREDITING, now=later)
        failed = _loan(tx, key="k3", state=sagas.CREDITING, now=later)
        tx.settle_loan(failed, sagas.FAILED, later)
        _loan(tx, M2, key="k4", now=later)

    await uow.write(write)
    actions = ("loan_confirm_requested", "loan_consent")
    rows = await uow.read(lambda tx: tx.audit_trail(M1, actions))
    assert [(r.action, r.detail, r.created_at) for r in rows] == [
        ("loan_confirm_requested", {"tier_id": 3}, NOW), ("loan_consent", {"loan_id": "x"}, later)]
    assert [r.action for r in await uow.read(lambda tx: tx.audit_trail(M1, actions, 1))] == [
        "loan_consent"]
    assert len(await uow.read(lambda tx: tx.audit_trail(M1))) == 3
    assert await uow.read(lambda tx: tx.loan_times(M1, NOW)) == (NOW, later)
    assert await uow.read(lambda tx: tx.loan_times(M1, NOW + timedelta(minutes=1))) == (later,)
