"""Read models for the operator's reports: the ledger's rows the daily report and the
backtest need, as plain values, with no write and no migration.

What this file owns: the SQL those tools read (a loan cohort, the open loans' ages,
what adjustments waived, the imported profiles) and `open_read_only`, a connection to
an embedded ledger file that can neither write nor create one. The functions take any
connection that runs the store's SQL (a SQLite connection, or a `PostgresLedgerTx`:
the statements are the portable subset, `tests/ledger/test_portable_sql.py`).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from extrabalance.core import sagas
from extrabalance.core.model import SubscriberProfile

# Loans whose money went out (credited at the IN), whatever happened since.
_CREDITED_STATES = (sagas.ACTIVE, sagas.PARTIALLY_REPAID, sagas.REPAID, sagas.WRITTEN_OFF)


def open_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to the ledger file at `path` (raises when it is missing:
    a report never creates a ledger)."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


@dataclass(frozen=True, slots=True)
class CohortLoan:
    """A credited loan of a cohort, as the report reads it."""

    loan_id: str
    principal_minor: int
    fee_minor: int
    principal_repaid_minor: int
    fee_repaid_minor: int
    state: str
    created_at: str
    updated_at: str


def cohort_loans(conn: sqlite3.Connection, start: datetime, end: datetime) -> list[CohortLoan]:
    """The credited loans created in [start, end)."""
    marks = ", ".join("?" * len(_CREDITED_STATES))
    rows = conn.execute(
        "SELECT loan_id, principal_minor, fee_minor, principal_repaid_minor,"
        " fee_repaid_minor, state, created_at, updated_at FROM loans"
        f" WHERE created_at >= ? AND created_at < ? AND state IN ({marks})",
        (start.isoformat(), end.isoformat(), *_CREDITED_STATES),
    ).fetchall()
    return [CohortLoan(*row) for row in rows]


def open_loan_ages(conn: sqlite3.Connection) -> list[tuple[str, int]]:
    """(created_at, owed_minor) of every open loan."""
    marks = ", ".join("?" * len(sagas.LOAN_OPEN_STATES))
    rows = conn.execute(
        "SELECT created_at, principal_minor - principal_repaid_minor + fee_minor"
        f" - fee_repaid_minor FROM loans WHERE state IN ({marks})",
        sagas.LOAN_OPEN_STATES,
    ).fetchall()
    return [(created, int(owed)) for created, owed in rows]


def waived_minor(conn: sqlite3.Connection, loan_ids: set[str]) -> int:
    """What adjustments (`waive`, `waive_fee`) took off these loans (their audit lines
    name each loan and its part)."""
    waived = 0
    for (detail,) in conn.execute("SELECT detail FROM audit WHERE action = 'adjust'"):
        for loan in json.loads(detail or "{}").get("loans", []):
            if loan.get("loan_id") in loan_ids:
                waived += int(loan.get("fee_minor", 0)) + int(loan.get("principal_minor", 0))
    return waived


def profiles(conn: sqlite3.Connection) -> dict[str, SubscriberProfile]:
    """Every imported profile (a scan: for the backtest)."""
    return {
        msisdn: _profile(msisdn, tenure, arpu, attributes)
        for msisdn, tenure, arpu, attributes in conn.execute(
            "SELECT msisdn, tenure_days, arpu_minor, attributes FROM subscribers"
            " WHERE tenure_days IS NOT NULL")
    }


def profiles_of(conn: sqlite3.Connection, msisdns: set[str]) -> dict[str, SubscriberProfile]:
    """The imported profiles of `msisdns` (one indexed read each); those without one
    are left out."""
    out: dict[str, SubscriberProfile] = {}
    for msisdn in msisdns:
        row = conn.execute("SELECT tenure_days, arpu_minor, attributes FROM subscribers"
                           " WHERE msisdn = ?", (msisdn,)).fetchone()
        if row is not None and row[0] is not None:
            out[msisdn] = _profile(msisdn, *row)
    return out


def _profile(msisdn: str, tenure: int, arpu: int | None, attributes: str | None
             ) -> SubscriberProfile:
    return SubscriberProfile(msisdn, tenure, arpu or 0, json.loads(attributes) if attributes else {})
