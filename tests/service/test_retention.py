"""Idempotency retention: the purge deletes only expired keys, in batches, and a
request replayed after its key was purged still moves no money twice where the
ledger's own UNIQUE keys protect it (docs/ledger.md "Idempotency retention")."""

from __future__ import annotations

from datetime import timedelta

import pytest

from extrabalance.adapters.gy_server import result_code
from extrabalance.ledger import store
from extrabalance.ledger.adjustments import apply_write_down
from extrabalance.service.outcomes import BorrowStatus, PaybackStatus
from extrabalance.service.ports import InAction, RechargeEvent
from extrabalance.service.retention import IdempotencyRetention
from tests.service.fakes import Harness


@pytest.fixture
def h(h_sqlite):
    """SQLite only: these cases write and count the SQLite idempotency table itself (retention runs on every ledger in test_services_on_both_ledgers.py)."""
    return h_sqlite

M = "201001234567"
IN_A = "in-a.operator.example"
RETENTION = timedelta(days=10)


def retention_of(h, **kwargs):
    return IdempotencyRetention(h.ledger, RETENTION, h.clock, **kwargs)


async def keys(h):
    rows = await h.ledger.read(lambda c: c.execute("SELECT key FROM idempotency").fetchall())
    return {r[0] for r in rows}


async def purge_all(h):
    """Let the retention pass, then purge every key recorded so far."""
    h.clock.advance(days=RETENTION.days, seconds=1)
    return await retention_of(h).purge()


async def test_purge_deletes_expired_keys_in_batches_and_keeps_recent_ones(h):
    def put(conn, n, prefix):
        for i in range(n):
            store.idempotent_put(conn, f"{prefix}:{i}", {"n": i}, h.clock())

    await h.ledger.write(lambda c: put(c, 7, "old"))
    h.clock.advance(days=3)
    await h.ledger.write(lambda c: put(c, 2, "new"))
    purged_counts = []
    retention = IdempotencyRetention(h.ledger, timedelta(days=2), h.clock, batch_rows=3,
                                     on_purged=purged_counts.append)
    report = await retention.purge()
    assert (report.rows_purged, report.batches) == (7, 3)  # 3 + 3 + 1
    assert purged_counts == [3, 3, 1]
    assert await keys(h) == {"new:0", "new:1"}
    again = await retention.purge()
    assert (again.rows_purged, again.batches) == (0, 1)


async def test_recharge_replayed_after_purge_is_not_recovered_twice(h):
    await h.add_profile(M)
    assert (await h.lending.borrow(M, 4, "ussd", "k1")).status is BorrowStatus.GRANTED
    h.fake_in.balances[M] = 5000
    event = RechargeEvent("e1", M, 5000, IN_A, 5000)
    first = await h.payback.handle_recharge(event)
    assert first.status is PaybackStatus.RECOVERED and first.recovered_minor == 1100
    assert "recharge:e1" in await keys(h)
    # A second loan, so a replay that were decided again would find debt to take.
    assert (await h.lending.borrow(M, 4, "ussd", "k2")).status is BorrowStatus.GRANTED
    report = await purge_all(h)
    assert report.rows_purged == 3 and await keys(h) == set()
    calls = len(h.fake_in.calls)
    again = await h.payback.handle_recharge(event)
    # recoveries.event_id is UNIQUE: the recovery row answers, nothing is debited.
    assert again.replayed and again.status is PaybackStatus.RECOVERED
    assert (again.recovered_minor, again.recovery_id) == (1100, first.recovery_id)
    assert len(h.fake_in.calls) == calls
    inv = await h.check_invariants()
    assert inv["recovered"] == 1100 and inv["debts"][M] == 1100


async def test_recharge_that_started_no_recovery_is_decided_again_after_purge(h):
    """Not protected once purged: why the retention outlasts every replay window."""
    event = RechargeEvent("e1", M, 5000, IN_A, 5000)
    assert (await h.payback.handle_recharge(event)).status is PaybackStatus.NOTHING_OWED
    await h.add_profile(M)
    await h.lending.borrow(M, 4, "ussd", "k1")
    h.fake_in.balances[M] = 5000
    await purge_all(h)
    again = await h.payback.handle_recharge(event)
    assert not again.replayed and again.status is PaybackStatus.RECOVERED


async def test_borrow_replayed_after_purge_gets_its_loan_not_a_second_one(h):
    await h.add_profile(M)
    first = await h.lending.borrow(M, 4, "ussd", "k1")
    assert first.status is BorrowStatus.GRANTED
    await purge_all(h)
    again = await h.lending.borrow(M, 4, "ussd", "k1")
    assert again.replayed and again.status is BorrowStatus.GRANTED
    assert again.loan_id == first.loan_id
    credits = [c for c in h.fake_in.calls if c.action is InAction.REFUND_ACCOUNT]
    assert len(credits) == 1


async def test_advance_ccr_replayed_after_purge_gets_the_same_grant(h):
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)
    first = await h.lending.out_of_balance("s1", 0, 1, M, None, IN_A)
    assert result_code(first) == 2001 and first.granted_minor
    h.fake_in.apply_grant("s1", 0, M, first.granted_minor)
    await h.lending.drain_confirmations()
    await purge_all(h)
    again = await h.lending.out_of_balance("s1", 0, 1, M, None, IN_A)
    # loans.idempotency_key is UNIQUE: the advance answers, no second grant.
    assert again.replayed and (result_code(again), again.granted_minor, again.loan_id) == (
        2001, first.granted_minor, first.loan_id)
    loans = await h.ledger.read(lambda c: c.execute("SELECT COUNT(*) FROM loans").fetchone())
    assert loans == (1,)


async def test_refused_confirmation_replayed_after_purge_still_refuses(tmp_path):
    h = Harness(tmp_path / "ledger.db", advance_confirmation=True)  # the extension's refusal
    try:
        await _refused_confirmation_replayed_after_purge_still_refuses(h)
    finally:
        await h.close()


async def _refused_confirmation_replayed_after_purge_still_refuses(h):
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)
    first = await h.lending.out_of_balance("s1", 0, 1, M, None, IN_A)
    h.fake_in.fail_next("refuse")  # the CCA never reached the IN; the IN refuses it
    await h.lending.drain_confirmations()
    await purge_all(h)
    again = await h.lending.out_of_balance("s1", 0, 1, M, None, IN_A)
    assert again.replayed and (result_code(again), again.loan_id) == (4012, first.loan_id)
    assert again.granted_minor is None


async def test_adjustment_request_ids_are_never_purged(h):
    await h.add_profile(M)
    await h.lending.borrow(M, 4, "ussd", "k1")

    def waive(conn):
        return apply_write_down(conn, M, kind="waive_fee", amount_minor=50, who="ops",
                                reason="goodwill", now=h.clock(), request_id="T-1")

    assert not (await h.ledger.write(waive)).replayed
    await purge_all(h)
    assert await keys(h) == {"admin-adjust:T-1"}
    again = await h.ledger.write(waive)
    assert again.replayed
    inv = await h.check_invariants()
    assert inv["totals"]["written_off"] == 50


def test_retention_must_be_positive(h):
    with pytest.raises(ValueError, match="positive"):
        IdempotencyRetention(h.ledger, timedelta(0), h.clock)
