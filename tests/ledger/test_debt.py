"""A subscriber's debt read from his open loans (`debt_owed`, the hot path) agrees with
the journal (`debt_from_journal`, the book of record) whatever his history."""

from __future__ import annotations

from extrabalance.ledger import store
from extrabalance.ledger.db import connect, migrate
from tests.core.sample import NOW

M = "201001234567"


def loan(conn, key, state=store.ACTIVE, principal=100, fee=10):
    return store.insert_loan(conn, msisdn=M, tier_id=1, principal_minor=principal,
                             fee_minor=fee, state=state, channel="ussd", idempotency_key=key,
                             in_node="in-a", session_id=f"s-{key}", now=NOW)


def repay(conn, loan_id, fee, principal, state):
    store.post(conn, [("recovered_cash", fee + principal), ("fee_receivable", -fee),
                      ("principal_receivable", -principal)],
               msisdn=M, memo="recover", now=NOW, loan_id=loan_id)
    conn.execute("UPDATE loans SET fee_repaid_minor = fee_repaid_minor + ?,"
                 " principal_repaid_minor = principal_repaid_minor + ?, state = ?"
                 " WHERE loan_id = ?", (fee, principal, state, loan_id))


def test_open_loans_and_the_journal_agree_across_a_long_history(tmp_path):
    conn = connect(tmp_path / "l.db")
    migrate(conn)
    conn.execute("BEGIN")
    for i in range(50):  # repaid in full: in the journal, not in the debt
        repay(conn, loan(conn, f"old{i}"), 10, 100, store.REPAID)
    assert store.write_off(conn, loan(conn, "aged"), "ageing", NOW) == 110  # to written_off
    partly = loan(conn, "partly", principal=500, fee=50)
    repay(conn, partly, 50, 120, store.PARTIALLY_REPAID)
    loan(conn, "advance", state=store.CONFIRMING, principal=300, fee=30)  # booked, unconfirmed
    loan(conn, "in-flight", state=store.CREDITING)  # not journalled: owes nothing yet
    conn.execute("COMMIT")
    assert store.debt_from_journal(conn, M) == 380 + 330
    assert store.debt_owed(conn, M) == store.debt_from_journal(conn, M)
    assert store.debt_owed(conn, "201009999999") == 0
    conn.close()
