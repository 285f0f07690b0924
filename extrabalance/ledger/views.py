"""Read models for the admin command: one subscriber's whole story as plain dicts."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from extrabalance.ledger import store

JOURNAL_LINES_MAX = 500  # most recent journal lines shown for one subscriber
AUDIT_LINES_MAX = 200


def _rows(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def subscriber_view(conn: sqlite3.Connection, msisdn: str) -> dict[str, Any]:
    """State, loans, recoveries, journal lines, learned route and audit of one MSISDN."""
    subs = _rows(conn.execute("SELECT * FROM subscribers WHERE msisdn = ?", (msisdn,)))
    sub = subs[0] if subs else None
    if sub and sub.get("attributes"):
        sub["attributes"] = json.loads(sub["attributes"])
    loans = _rows(
        conn.execute("SELECT * FROM loans WHERE msisdn = ? ORDER BY created_at", (msisdn,))
    )
    recoveries = _rows(
        conn.execute("SELECT * FROM recoveries WHERE msisdn = ? ORDER BY created_at", (msisdn,))
    )
    journal = _rows(
        conn.execute(
            "SELECT tx_id, line_no, account, amount_minor, loan_id, recovery_id, memo, created_at"
            " FROM journal WHERE msisdn = ? ORDER BY created_at DESC, tx_id, line_no LIMIT ?",
            (msisdn, JOURNAL_LINES_MAX),
        )
    )
    audit = _rows(
        conn.execute(
            "SELECT action, who, why, detail, created_at FROM audit WHERE msisdn = ?"
            " ORDER BY created_at DESC LIMIT ?",
            (msisdn, AUDIT_LINES_MAX),
        )
    )
    debt = store.debt_from_journal(conn, msisdn)
    return {
        "msisdn": msisdn,
        "known": sub is not None,
        "subscriber": sub,
        "debt_minor": debt,
        "operation_pending": store.has_unsettled(conn, msisdn),
        "route": {"learned_in_node": sub["learned_in_node"] if sub else None},
        "loans": loans,
        "recoveries": recoveries,
        "journal": journal,
        "audit": audit,
    }
