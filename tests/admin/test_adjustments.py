"""Goodwill write-downs at the ledger level: balanced, cache and journal agree, debt
never negative, refusals change nothing (a hypothesis property over random books)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extrabalance.ledger import store
from extrabalance.ledger.adjustments import AdjustmentError, apply_write_down
from extrabalance.ledger.db import connect, migrate

M = "201001234567"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def conn(tmp_path):
    c = connect(tmp_path / "l.db")
    migrate(c)
    yield c
    c.close()


def add_loan(conn, principal, fee, minutes=0, state=store.ACTIVE):
    return store.insert_loan(conn, msisdn=M, tier_id=1, principal_minor=principal,
                             fee_minor=fee, state=state, channel="ussd",
                             idempotency_key=None, in_node="in-a", session_id=None,
                             now=T0 + timedelta(minutes=minutes))


def check_books(conn):
    assert conn.execute("SELECT tx_id FROM journal GROUP BY tx_id"
                        " HAVING SUM(amount_minor) <> 0").fetchall() == []
    debt = store.debt_from_journal(conn, M)
    cache = conn.execute(
        "SELECT COALESCE(SUM(principal_minor - principal_repaid_minor + fee_minor"
        " - fee_repaid_minor), 0) FROM loans WHERE msisdn = ? AND state IN (?, ?)",
        (M, *store.LOAN_OPEN_STATES)).fetchone()[0]
    assert debt >= 0 and cache == debt
    return debt


def waive(conn, amount, kind="waive", **kw):
    return apply_write_down(conn, M, kind=kind, amount_minor=amount, who="ops",
                            reason="goodwill", now=T0 + timedelta(days=1), **kw)


def test_waive_fee_first_oldest_first_and_clears_loans(conn):
    first, second = add_loan(conn, 500, 50), add_loan(conn, 300, 35, minutes=1)
    r = waive(conn, 600)
    assert [(x["loan_id"], x["fee_minor"], x["principal_minor"], x["state"]) for x in r.loans] == [
        (first, 50, 500, store.WRITTEN_OFF), (second, 35, 15, store.PARTIALLY_REPAID)]
    assert (r.debt_before_minor, r.debt_after_minor) == (885, 285)
    assert check_books(conn) == 285
    assert store.account_totals(conn)["written_off"] == 600
    assert conn.execute("SELECT action, who FROM audit").fetchall() == [("adjust", "ops")]


def test_waive_fee_touches_fees_only(conn):
    add_loan(conn, 500, 50)
    with pytest.raises(AdjustmentError, match="exceeds"):
        waive(conn, 51, kind="waive_fee")
    r = waive(conn, 50, kind="waive_fee")
    assert r.loans[0]["principal_minor"] == 0 and check_books(conn) == 500


def test_refused_while_an_operation_is_unsettled(conn):
    add_loan(conn, 500, 50)
    add_loan(conn, 100, 10, minutes=1, state=store.CREDITING)
    with pytest.raises(AdjustmentError, match="unsettled"):
        waive(conn, 10)


def test_request_id_replays_and_is_bound_to_the_subscriber(conn):
    add_loan(conn, 500, 50)
    r1 = waive(conn, 100, request_id="t-1")
    r2 = waive(conn, 100, request_id="t-1")
    assert r2.replayed and r2.tx_id == r1.tx_id and check_books(conn) == 450
    with pytest.raises(AdjustmentError, match="another subscriber"):
        apply_write_down(conn, "201009999999", kind="waive", amount_minor=1, who="x",
                         reason="y", now=T0, request_id="t-1")


@settings(max_examples=60, deadline=None)
@given(loans=st.lists(st.tuples(st.integers(1, 5000), st.integers(0, 500)), min_size=1, max_size=5),
       waivers=st.lists(st.tuples(st.sampled_from(["waive", "waive_fee"]), st.integers(-5, 6000)),
                        max_size=6))
def test_random_books_stay_balanced(loans, waivers):
    conn = connect(":memory:", synchronous="OFF")  # durability is not what is tested here
    migrate(conn)
    try:
        for i, (p, f) in enumerate(loans):
            add_loan(conn, p, f, minutes=i)
        debt = check_books(conn)
        for kind, amount in waivers:
            totals = store.account_totals(conn)
            conn.execute("SAVEPOINT w")
            try:
                r = waive(conn, amount, kind=kind)
            except AdjustmentError:
                conn.execute("ROLLBACK TO SAVEPOINT w")
                conn.execute("RELEASE SAVEPOINT w")
                assert store.account_totals(conn) == totals
                continue
            conn.execute("RELEASE SAVEPOINT w")
            assert r.debt_after_minor == debt - amount
            debt = check_books(conn)
            assert debt == r.debt_after_minor
    finally:
        conn.close()


def test_apply_needs_who_and_reason(conn):
    add_loan(conn, 500, 50)
    with pytest.raises(AdjustmentError, match="who and reason"):
        apply_write_down(conn, M, kind="waive", amount_minor=1, who=" ", reason="r", now=T0)
