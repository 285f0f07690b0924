"""The reconciliation finds each kind of lost or doubled money (it can fail)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from bench.reconcile import reconcile
from extrabalance.ledger.db import connect, migrate

NOW = "2026-01-01T00:00:00+00:00"
A = "201000000001"


def ledger(tmp_path: Path) -> tuple[Path, sqlite3.Connection]:
    path = tmp_path / "ledger.db"
    conn = connect(path)
    migrate(conn)
    return path, conn


def add_loan(conn: sqlite3.Connection, loan_id: str, sid: str, state: str = "ACTIVE",
             principal: int = 500, fee: int = 50, repaid: tuple[int, int] = (0, 0),
             channel: str = "ussd", key: str | None = None) -> None:
    conn.execute(
        "INSERT INTO loans (loan_id, msisdn, tier_id, principal_minor, fee_minor,"
        " principal_repaid_minor, fee_repaid_minor, state, channel, idempotency_key,"
        " diameter_session_id, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (loan_id, A, 4, principal, fee, repaid[0], repaid[1], state, channel,
         key or f"borrow:{loan_id}", sid, NOW, NOW))
    if state in ("ACTIVE", "PARTIALLY_REPAID", "REPAID"):
        journal(conn, f"d-{loan_id}", [("principal_receivable", principal),
                                       ("disbursed_float", -principal),
                                       ("fee_receivable", fee), ("fee_income", -fee)])


def journal(conn: sqlite3.Connection, tx: str, lines: list[tuple[str, int]]) -> None:
    for n, (account, amount) in enumerate(lines):
        conn.execute("INSERT INTO journal (tx_id, line_no, account, msisdn, amount_minor, memo,"
                     " created_at) VALUES (?,?,?,?,?,?,?)", (tx, n, account, A, amount, "t", NOW))


def add_recovery(conn: sqlite3.Connection, rid: str, event_id: str, sid: str,
                 recovered: int, state: str = "DONE") -> None:
    conn.execute(
        "INSERT INTO recoveries (recovery_id, event_id, msisdn, recharge_minor, requested_minor,"
        " recovered_minor, state, diameter_session_id, created_at, updated_at)"
        " VALUES (?,?,?,?,?,?,?,?,?,?)",
        (rid, event_id, A, 1000, recovered, recovered, state, sid, NOW, NOW))
    conn.execute("INSERT INTO recovery_attempts (recovery_id, attempt_no, diameter_session_id,"
                 " requested_minor, outcome, created_at) VALUES (?,?,?,?,?,?)",
                 (rid, 1, sid, recovered, "DONE", NOW))
    if state == "DONE":
        journal(conn, f"r-{rid}", [("recovered_cash", recovered), ("fee_receivable", -50),
                                   ("principal_receivable", -(recovered - 50))])


def op(sid: str, action: str, amount: int, result: int = 2001) -> list[Any]:
    return ["in-a", sid, 0, action, A, amount, result, 0]


def books(tmp_path: Path) -> tuple[Path, sqlite3.Connection, dict[str, Any]]:
    """One loan of 500 + 50 fee, fully recovered from recharge E1; the IN agrees."""
    path, conn = ledger(tmp_path)
    add_loan(conn, "L1", "s1", state="REPAID", repaid=(500, 50))
    add_recovery(conn, "R1", "E1", "d1", 550)
    conn.commit()
    dump = {"applied": [op("s1", "REFUND_ACCOUNT", 500), op("E1", "RECHARGE", 1000),
                        op("d1", "DIRECT_DEBITING", 550)],
            "balances": {A: 950}, "spent_minor": {}, "initial_balance_minor": 0,
            "published_event_ids": ["E1"]}
    return path, conn, dump


def test_agreeing_books_match(tmp_path: Path) -> None:
    path, _conn, dump = books(tmp_path)
    r = reconcile(path, dump, {"dials": {A: 1}, "mo_sms": {}}, check_recharges=True)
    assert r.matches, r.details
    assert (r.loans_granted, r.in_credits, r.recoveries_done, r.in_debits) == (1, 1, 1, 1)


def test_loan_the_in_never_credited(tmp_path: Path) -> None:
    path, conn, dump = books(tmp_path)
    add_loan(conn, "L2", "s2")
    conn.commit()
    r = reconcile(path, dump)
    assert r.counts["loan_without_in_credit"] == 1
    assert r.counts["subscriber_net_differs"] == 1


def test_credit_without_loan_and_credit_on_failed_loan(tmp_path: Path) -> None:
    path, conn, dump = books(tmp_path)
    add_loan(conn, "L3", "s3", state="FAILED")
    conn.commit()
    dump["applied"] += [op("s3", "REFUND_ACCOUNT", 500), op("s9", "OUT_OF_BALANCE_GRANT", 300)]
    dump["balances"][A] += 800
    r = reconcile(path, dump)
    assert r.counts["in_credit_on_failed_loan"] == 1
    assert r.counts["in_credit_without_loan"] == 1
    assert "in_balance_differs" not in r.counts


def test_debit_doubled_or_unrecorded(tmp_path: Path) -> None:
    path, _conn, dump = books(tmp_path)
    dump["applied"] += [op("d1", "DIRECT_DEBITING", 550), op("d7", "DIRECT_DEBITING", 100)]
    dump["balances"][A] -= 650
    r = reconcile(path, dump)
    assert r.counts["in_debit_doubled"] == 1
    assert r.counts["recovery_differs_from_in"] == 1
    assert r.counts["in_debit_without_recovery"] == 1


def test_unsettled_and_unbalanced(tmp_path: Path) -> None:
    path, conn, dump = books(tmp_path)
    add_loan(conn, "L4", "s4", state="UNKNOWN")
    journal(conn, "bad", [("fee_income", -1)])
    conn.commit()
    r = reconcile(path, dump)
    assert r.counts["loan_unsettled"] == 1
    assert r.counts["journal_unbalanced"] == 1 and r.counts["journal_tx_unbalanced"] == 1


def test_recharge_not_accounted_and_dialog_lent_twice(tmp_path: Path) -> None:
    path, conn, dump = books(tmp_path)
    add_loan(conn, "L5", "s5", state="REPAID", repaid=(500, 50))
    add_recovery(conn, "R5", "E5", "d5", 550)
    conn.commit()
    dump["applied"] += [op("s5", "REFUND_ACCOUNT", 500), op("E5", "RECHARGE", 1000),
                        op("d5", "DIRECT_DEBITING", 550)]
    dump["balances"][A] += 950
    dump["published_event_ids"] += ["E2"]  # acknowledged by the broker, never in the ledger
    r = reconcile(path, dump, {"dials": {A: 1}, "mo_sms": {}}, check_recharges=True)
    assert r.counts["recharge_not_accounted"] == 1
    assert r.counts["ussd_loans_exceed_dialogs"] == 1
    # The same loss right after a broker SIGKILL is the broker's, reported as a note.
    dump["published_at_s"] = {"E2": 100.0}
    r = reconcile(path, dump, check_recharges=True, broker_kills_s=(101.0,))
    assert "recharge_not_accounted" not in r.counts
