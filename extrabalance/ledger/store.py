"""The ledger's business SQL: synchronous functions over one open connection.

They are the SQLite side of the services' unit-of-work port: each is also a method of
the ledger's connection class (`sqlite_uow.SqliteLedgerTx`), so a service calls
`tx.settle_loan(...)` inside `Ledger.write(fn)` (one savepoint, committed with its
batch) or `Ledger.read(fn)`. Nothing here commits, talks to the network or decides
anything: the rules (which loan a payback goes to, which state may follow which) live
in `extrabalance.core`.

Journal scheme (debits positive, credits negative; every transaction sums to zero):

| event                | lines                                                        |
|----------------------|--------------------------------------------------------------|
| loan disbursed       | principal_receivable +P, disbursed_float -P,                  |
|                      | fee_receivable +F, fee_income -F                             |
| recovery (f fee, p)  | recovered_cash +(f+p), fee_receivable -f, principal_receivable -p |
| write-off (f, p left)| written_off +(f+p), fee_receivable -f, principal_receivable -p |

A subscriber's debt is the sum of his principal_receivable and fee_receivable lines;
the loans' repaid columns are a cache of the same figure, checked against it in tests.

SQL stays portable to PostgreSQL: `?` placeholders (translated by a PG adapter),
`ON CONFLICT ... DO UPDATE`, no SQLite-only functions in the business statements.
`tests/ledger/test_portable_sql.py` prepares every statement on PostgreSQL and replays
a whole scenario there (docs/ledger.md "PostgreSQL").
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from extrabalance.core import journal, sagas
from extrabalance.core.limits import LimitState
from extrabalance.core.model import OpenLoan, SubscriberProfile, SubscriberState
from extrabalance.core.payback import Recovery
from extrabalance.core.policy import Bundle
from extrabalance.core.sagas import (
    ACTIVE,
    CONFIRMING,
    CREDITING,
    DONE,
    FAILED,
    LOAN_JOURNALLED_STATES,
    LOAN_OPEN_STATES,
    LOAN_UNSETTLED_STATES,
    PARTIALLY_REPAID,
    RECOVERING,
    RECOVERY_UNSETTLED_STATES,
    REPAID,
    REQUESTED,
    UNKNOWN,
    WRITTEN_OFF,
    IllegalTransition,
    LedgerInvariantError,
)

# Loan and recovery states and their transitions: one table in core (docs/ledger.md);
# the saga words are re-exported here for the callers that read them from the store.
__all__ = [
    "ACTIVE",
    "CONFIRMING",
    "CREDITING",
    "DONE",
    "FAILED",
    "LOAN_JOURNALLED_STATES",
    "LOAN_OPEN_STATES",
    "LOAN_UNSETTLED_STATES",
    "PARTIALLY_REPAID",
    "RECOVERING",
    "RECOVERY_UNSETTLED_STATES",
    "REPAID",
    "REQUESTED",
    "UNKNOWN",
    "WRITTEN_OFF",
    "IllegalTransition",
    "LedgerInvariantError",
]
_LOAN_LIVE_STATES = LOAN_OPEN_STATES + LOAN_UNSETTLED_STATES


def _marks(values: tuple[str, ...]) -> str:
    """`?, ?, ...` for an IN list of fixed states (never built from input)."""
    return ", ".join("?" * len(values))


ACCOUNTS = journal.ACCOUNTS  # the journal's accounts (core/journal.py)


_last_ts: tuple[datetime, str] | None = None


def ts(moment: datetime) -> str:
    # One operation stamps several rows with the same `now`; remember the last text.
    # (A tuple is replaced in one step, so threads never see a half-written pair.)
    global _last_ts
    last = _last_ts
    if last is not None and last[0] is moment:
        return last[1]
    text = moment.isoformat(timespec="microseconds")
    _last_ts = (moment, text)
    return text


def ping(conn: sqlite3.Connection) -> None:
    """One round trip to the database (readiness: the ledger answers)."""
    conn.execute("SELECT 1").fetchone()


def new_id() -> str:
    """32 hex digits: microseconds since the epoch (14), then 72 random bits (18).

    Time first, so the ids of new loans, journal transactions and recoveries land at
    the right-hand end of their primary-key indexes: a batch of inserts dirties a few
    shared pages instead of one random page each (random uuid4 keys cost a page read
    and a page written to the WAL per insert once the index outgrows the cache). The
    random part keeps ids unique across nodes and within one microsecond.
    """
    return f"{time.time_ns() // 1000:014x}{os.urandom(9).hex()}"


# -- subscribers -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadedSubscriber:
    state: SubscriberState
    known: bool  # a subscribers row exists (profile imported or seen in traffic)
    learned_in_node: str | None
    # A new recovery must wait: a recovery is RECOVERING/UNKNOWN, or an advance is
    # CONFIRMING (its debt is journalled, but not recoverable until the IN confirmed
    # the credit: a refused confirmation reverses it).
    recovery_pending: bool = False


def ensure_subscriber(conn: sqlite3.Connection, msisdn: str, now: datetime) -> None:
    conn.execute(
        "INSERT INTO subscribers (msisdn, updated_at) VALUES (?, ?) "
        "ON CONFLICT (msisdn) DO NOTHING",
        (msisdn, ts(now)),
    )


def open_loans(conn: sqlite3.Connection, msisdn: str) -> tuple[OpenLoan, ...]:
    rows = conn.execute(
        "SELECT loan_id, tier_id, principal_minor, fee_minor, principal_repaid_minor,"
        " fee_repaid_minor, created_at FROM loans"
        " WHERE msisdn = ? AND state IN (?, ?) ORDER BY created_at, loan_id",
        (msisdn, *LOAN_OPEN_STATES),
    ).fetchall()
    return tuple(
        OpenLoan(r[0], r[1], r[2], r[3], r[4], r[5], datetime.fromisoformat(r[6])) for r in rows
    )


def has_unsettled(conn: sqlite3.Connection, msisdn: str) -> bool:
    loan = conn.execute(
        f"SELECT 1 FROM loans WHERE msisdn = ? AND state IN ({_marks(LOAN_UNSETTLED_STATES)})"
        " LIMIT 1",
        (msisdn, *LOAN_UNSETTLED_STATES),
    ).fetchone()
    if loan:
        return True
    rec = conn.execute(
        "SELECT 1 FROM recoveries WHERE msisdn = ? AND state IN (?, ?) LIMIT 1",
        (msisdn, *RECOVERY_UNSETTLED_STATES),
    ).fetchone()
    return rec is not None


# One statement, one read transaction: the profile row (kind 0), the loans not yet
# closed (kind 1, by the (msisdn, state) index) and whether a recovery is unsettled
# (kind 2). As three statements each began its own read transaction, and on a
# connection that sees the writer commit between loans each one re-read its pages.
# Columns line up by type (INTEGER, BIGINT, TEXT ...) so PostgreSQL takes the UNION too.
_LOAD_SUBSCRIBER_SQL = (
    "SELECT 0, tenure_days, arpu_minor, attributes, language, auto_advance_opt_in,"
    " ads_opt_out, barred_manual, barred_reason, loans_since_full_payback, learned_in_node"
    " FROM subscribers WHERE msisdn = ?"
    " UNION ALL SELECT 1, tier_id, principal_minor, loan_id, created_at, fee_minor,"
    " principal_repaid_minor, fee_repaid_minor, state, NULL, NULL FROM loans"
    f" WHERE msisdn = ? AND state IN ({_marks(_LOAN_LIVE_STATES)})"
    " UNION ALL SELECT 2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL"
    " WHERE EXISTS (SELECT 1 FROM recoveries WHERE msisdn = ?"
    f" AND state IN ({_marks(RECOVERY_UNSETTLED_STATES)}))"
)


def load_subscriber(
    conn: sqlite3.Connection,
    msisdn: str,
    *,
    balance_minor: int | None = None,
    default_language: str = "en",
) -> LoadedSubscriber:
    """Everything `decide` needs in one statement (the profile row, the loans not yet
    closed, whether a recovery is unsettled); this runs once per loan and payback."""
    row = None
    open_rows = []
    loan_pending = advance_confirming = recovery_unsettled = False
    for r in conn.execute(
        _LOAD_SUBSCRIBER_SQL,
        (msisdn, msisdn, *_LOAN_LIVE_STATES, msisdn, *RECOVERY_UNSETTLED_STATES),
    ):
        kind = r[0]
        if kind == 1:
            # (tier_id, principal, loan_id, created_at, fee, principal_repaid,
            #  fee_repaid, state)
            if r[8] in LOAN_OPEN_STATES:
                open_rows.append(r)
            else:
                loan_pending = True
                advance_confirming = advance_confirming or r[8] == CONFIRMING
        elif kind == 0:
            row = r
        else:
            recovery_unsettled = True
    if len(open_rows) > 1:
        open_rows.sort(key=lambda r: (r[4], r[3]))  # oldest first, as open_loans orders them
    loans = tuple(
        OpenLoan(r[3], r[1], r[2], r[5], r[6], r[7], datetime.fromisoformat(r[4]))
        for r in open_rows
    )
    recovery_pending = advance_confirming or recovery_unsettled
    pending = loan_pending or recovery_pending
    if row is None:
        state = SubscriberState(
            msisdn,
            None,
            loans,
            operation_pending=pending,
            language=default_language,
            balance_minor=balance_minor,
        )
        return LoadedSubscriber(state, False, None, recovery_pending)
    profile = None
    if row[1] is not None:
        attrs: Mapping[str, str | int] = json.loads(row[3]) if row[3] else {}
        profile = SubscriberProfile(msisdn, row[1], row[2] or 0, attrs)
    state = SubscriberState(
        msisdn=msisdn,
        profile=profile,
        open_loans=loans,
        loans_since_full_payback=row[9],
        barred_manual=bool(row[7]),
        barred_reason=row[8],
        operation_pending=pending,
        auto_advance_opt_in=bool(row[5]),
        ads_opt_out=bool(row[6]),
        language=row[4] or default_language,
        balance_minor=balance_minor,
    )
    return LoadedSubscriber(state, True, row[10], recovery_pending)


def learn_route(conn: sqlite3.Connection, msisdn: str, in_node: str, now: datetime) -> None:
    conn.execute(
        "INSERT INTO subscribers (msisdn, learned_in_node, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT (msisdn) DO UPDATE SET learned_in_node = excluded.learned_in_node,"
        " updated_at = excluded.updated_at",
        (msisdn, in_node, ts(now)),
    )


def learned_route(conn: sqlite3.Connection, msisdn: str) -> str | None:
    row = conn.execute(
        "SELECT learned_in_node FROM subscribers WHERE msisdn = ?", (msisdn,)
    ).fetchone()
    return row[0] if row else None


def limit_state(conn: sqlite3.Connection, msisdn: str) -> LimitState:
    """What his limit from behaviour is computed from (empty for a new subscriber)."""
    row = conn.execute(
        "SELECT recharge_days, adjust_bp, on_time_paybacks, late_paybacks, partial_paybacks"
        " FROM subscriber_limits WHERE msisdn = ?",
        (msisdn,),
    ).fetchone()
    if row is None:
        return LimitState()
    days = tuple((int(d), int(a)) for d, a in json.loads(row[0]))
    return LimitState(days, row[1], row[2], row[3], row[4])


def put_limit_state(
    conn: sqlite3.Connection, msisdn: str, state: LimitState, now: datetime
) -> None:
    """Store his limit state (after a recharge or a payback, in the same unit)."""
    conn.execute(
        "INSERT INTO subscriber_limits (msisdn, recharge_days, adjust_bp, on_time_paybacks,"
        " late_paybacks, partial_paybacks, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (msisdn) DO UPDATE SET recharge_days = excluded.recharge_days,"
        " adjust_bp = excluded.adjust_bp, on_time_paybacks = excluded.on_time_paybacks,"
        " late_paybacks = excluded.late_paybacks, partial_paybacks = excluded.partial_paybacks,"
        " updated_at = excluded.updated_at",
        (
            msisdn,
            json.dumps([list(p) for p in state.recharge_days], separators=(",", ":")),
            state.adjust_bp,
            state.on_time_paybacks,
            state.late_paybacks,
            state.partial_paybacks,
            ts(now),
        ),
    )


def set_preferences(
    conn: sqlite3.Connection,
    msisdn: str,
    now: datetime,
    *,
    auto_advance: bool | None = None,
    ads_opt_out: bool | None = None,
    language: str | None = None,
) -> None:
    ensure_subscriber(conn, msisdn, now)
    # Column names come from this fixed table, never from input.
    changes = {
        "auto_advance_opt_in": auto_advance,
        "ads_opt_out": ads_opt_out,
        "language": language,
    }
    for column, value in changes.items():
        if value is None:
            continue
        stored = int(value) if isinstance(value, bool) else value
        conn.execute(
            f"UPDATE subscribers SET {column} = ?, updated_at = ? WHERE msisdn = ?",
            (stored, ts(now), msisdn),
        )


def audit(
    conn: sqlite3.Connection,
    msisdn: str,
    action: str,
    who: str,
    why: str,
    now: datetime,
    detail: Mapping[str, Any] | None = None,
) -> None:
    conn.execute(
        "INSERT INTO audit (audit_id, msisdn, action, who, why, detail, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (new_id(), msisdn, action, who, why, json.dumps(detail or {}), ts(now)),
    )


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One line of a subscriber's audit trail (oldest first when listed)."""

    audit_id: str
    action: str
    who: str
    why: str
    detail: dict[str, Any]
    created_at: datetime


AUDIT_TRAIL_MAX = 10_000  # lines of one subscriber's trail read at once at most


def audit_trail(
    conn: sqlite3.Connection, msisdn: str, actions: tuple[str, ...] = (), limit: int = AUDIT_TRAIL_MAX
) -> list[AuditRow]:
    """His audit lines (only `actions` when given), oldest first, the newest `limit`."""
    where = f" AND action IN ({_marks(actions)})" if actions else ""
    rows = conn.execute(
        "SELECT audit_id, action, who, why, detail, created_at FROM audit"
        f" WHERE msisdn = ?{where} ORDER BY created_at DESC, audit_id DESC LIMIT ?",
        (msisdn, *actions, max(0, min(limit, AUDIT_TRAIL_MAX))),
    ).fetchall()
    return [
        AuditRow(r[0], r[1], r[2], r[3], json.loads(r[4] or "{}"), datetime.fromisoformat(r[5]))
        for r in reversed(rows)
    ]


def loan_times(conn: sqlite3.Connection, msisdn: str, since: datetime) -> tuple[datetime, ...]:
    """When his loans and advances that did not fail were taken, since `since`
    (the consumer-protection cap and cooling-off count them)."""
    rows = conn.execute(
        "SELECT created_at FROM loans WHERE msisdn = ? AND created_at >= ? AND state != ?"
        " ORDER BY created_at",
        (msisdn, ts(since), FAILED),
    ).fetchall()
    return tuple(datetime.fromisoformat(r[0]) for r in rows)


def set_bar(
    conn: sqlite3.Connection, msisdn: str, barred: bool, reason: str | None, who: str, now: datetime
) -> None:
    ensure_subscriber(conn, msisdn, now)
    conn.execute(
        "UPDATE subscribers SET barred_manual = ?, barred_reason = ?, updated_at = ?"
        " WHERE msisdn = ?",
        (int(barred), reason if barred else None, ts(now), msisdn),
    )
    audit(conn, msisdn, "bar" if barred else "unbar", who, reason or "", now)


# -- idempotency -------------------------------------------------------------------


def idempotent_get(conn: sqlite3.Connection, key: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT outcome FROM idempotency WHERE key = ?", (key,)).fetchone()
    return json.loads(row[0]) if row else None


def idempotent_put(
    conn: sqlite3.Connection, key: str, outcome: Mapping[str, Any], now: datetime
) -> None:
    """Record the first outcome; a later write for the same key keeps the first."""
    conn.execute(
        "INSERT INTO idempotency (key, outcome, created_at) VALUES (?, ?, ?)"
        " ON CONFLICT (key) DO NOTHING",
        (key, json.dumps(dict(outcome), sort_keys=True), ts(now)),
    )


def idempotent_replace(
    conn: sqlite3.Connection, key: str, outcome: Mapping[str, Any], now: datetime
) -> None:
    """Overwrite a provisional outcome (PENDING) once the operation settled."""
    conn.execute(
        "INSERT INTO idempotency (key, outcome, created_at) VALUES (?, ?, ?)"
        " ON CONFLICT (key) DO UPDATE SET outcome = excluded.outcome",
        (key, json.dumps(dict(outcome), sort_keys=True), ts(now)),
    )


# Keys the retention purge never deletes. An operator may retry an adjustment with
# the same request id at any time (a ticket re-run weeks later), and only this row
# remembers that it was applied; adjustments are few, so keeping them costs nothing.
IDEMPOTENCY_KEPT_PREFIX = "admin-adjust:"


def purge_idempotency(conn: sqlite3.Connection, before: datetime, limit: int) -> int:
    """Delete up to `limit` idempotency keys first recorded before `before`, oldest
    first; returns how many. One small batch per call, so a purge never holds the
    writer for long (see docs/ledger.md "Idempotency retention" for what still
    protects a key after its row is gone)."""
    cur = conn.execute(
        "DELETE FROM idempotency WHERE key IN (SELECT key FROM idempotency"
        " WHERE created_at < ? AND key NOT LIKE ? ORDER BY created_at LIMIT ?)",
        (ts(before), IDEMPOTENCY_KEPT_PREFIX + "%", limit),
    )
    return int(cur.rowcount)


# -- journal -----------------------------------------------------------------------


def post(
    conn: sqlite3.Connection,
    lines: Iterable[tuple[str, int]],
    *,
    msisdn: str,
    memo: str,
    now: datetime,
    loan_id: str | None = None,
    recovery_id: str | None = None,
) -> str:
    """Post one balanced transaction; raises (and so rolls back) if it does not balance."""
    entries = [(account, amount) for account, amount in lines if amount != 0]
    if sum(amount for _, amount in entries) != 0:
        raise LedgerInvariantError(f"unbalanced journal entry {memo}: {entries}")
    tx_id = new_id()
    conn.executemany(
        "INSERT INTO journal (tx_id, line_no, account, msisdn, amount_minor, loan_id,"
        " recovery_id, memo, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (tx_id, n, account, msisdn, amount, loan_id, recovery_id, memo, ts(now))
            for n, (account, amount) in enumerate(entries)
        ],
    )
    return tx_id


def debt_from_journal(conn: sqlite3.Connection, msisdn: str) -> int:
    row = conn.execute(
        "SELECT COALESCE(SUM(amount_minor), 0) FROM journal"
        " WHERE msisdn = ? AND account IN ('principal_receivable', 'fee_receivable')",
        (msisdn,),
    ).fetchone()
    return int(row[0])


def debt_owed(conn: sqlite3.Connection, msisdn: str) -> int:
    """The subscriber's debt from his loans still owing (the repaid columns cache the
    journal; the invariant tests check that the two agree). Unlike the journal's sum,
    its cost does not grow with the subscriber's history: the (msisdn, state) index
    finds only the loans not yet repaid or written off."""
    row = conn.execute(
        "SELECT COALESCE(SUM(principal_minor - principal_repaid_minor + fee_minor"
        f" - fee_repaid_minor), 0) FROM loans WHERE msisdn = ?"
        f" AND state IN ({_marks(LOAN_JOURNALLED_STATES)})",
        (msisdn, *LOAN_JOURNALLED_STATES),
    ).fetchone()
    return int(row[0])


def account_totals(conn: sqlite3.Connection) -> dict[str, int]:
    totals = dict.fromkeys(ACCOUNTS, 0)
    for account, amount in conn.execute(
        "SELECT account, SUM(amount_minor) FROM journal GROUP BY account"
    ):
        totals[account] = int(amount)
    return totals


# -- loans -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoanRow:
    loan_id: str
    msisdn: str
    tier_id: int
    principal_minor: int
    fee_minor: int
    principal_repaid_minor: int
    fee_repaid_minor: int
    state: str
    channel: str
    idempotency_key: str | None
    in_node: str | None
    diameter_session_id: str | None
    request_number: int
    resolve_attempts: int
    needs_review: bool
    created_at: str
    # A bundle loan: the units it asked the IN to credit, as booked (migration 0012);
    # every send of its REFUND_ACCOUNT is built from them. None: a money loan.
    bundle: Bundle | None = None


LOAN_COLUMNS = (
    "loan_id, msisdn, tier_id, principal_minor, fee_minor, principal_repaid_minor,"
    " fee_repaid_minor, state, channel, idempotency_key, in_node, diameter_session_id,"
    " request_number, resolve_attempts, needs_review, created_at,"
    " bundle_kind, bundle_quantity, bundle_service_identifier, bundle_rating_group"
)


def loan_row(row: tuple[Any, ...]) -> LoanRow:
    """A `LoanRow` from a row of `LOAN_COLUMNS`."""
    (loan_id, msisdn, tier_id, principal_minor, fee_minor, principal_repaid_minor,
     fee_repaid_minor, state, channel, idempotency_key, in_node, session_id, request_number,
     resolve_attempts, needs_review, created_at,
     kind, quantity, service_identifier, rating_group) = row
    bundle = None
    if kind is not None:
        bundle = Bundle(kind, int(quantity), _int_or_none(service_identifier),
                        _int_or_none(rating_group))
    return LoanRow(loan_id, msisdn, tier_id, principal_minor, fee_minor, principal_repaid_minor,
                   fee_repaid_minor, state, channel, idempotency_key, in_node, session_id,
                   request_number, resolve_attempts, bool(needs_review), created_at, bundle)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def get_loan(conn: sqlite3.Connection, loan_id: str) -> LoanRow | None:
    row = conn.execute(
        f"SELECT {LOAN_COLUMNS} FROM loans WHERE loan_id = ?", (loan_id,)
    ).fetchone()
    return loan_row(row) if row else None


def loan_by_idempotency_key(conn: sqlite3.Connection, key: str) -> LoanRow | None:
    """The loan a request recorded (`loans.idempotency_key` is UNIQUE): it answers a
    replay once the request's idempotency row is gone, or before it settled."""
    row = conn.execute(
        f"SELECT {LOAN_COLUMNS} FROM loans WHERE idempotency_key = ?", (key,)
    ).fetchone()
    return loan_row(row) if row else None


def insert_loan(
    conn: sqlite3.Connection,
    *,
    msisdn: str,
    tier_id: int,
    principal_minor: int,
    fee_minor: int,
    state: str,
    channel: str,
    idempotency_key: str | None,
    in_node: str | None,
    session_id: str | None,
    now: datetime,
    request_number: int = 0,
    loan_id: str | None = None,
    subscriber_known: bool = False,
    owner_node: str | None = None,
    lease_until: datetime | None = None,
    bundle: Bundle | None = None,
) -> str:
    """Insert a loan; an ACTIVE or CONFIRMING one is journalled at once.
    `subscriber_known`: the caller has just read the subscribers row, so it need not
    be ensured again. `owner_node` / `lease_until`: the node whose saga it is, until
    when (see `claim_unsettled_loans`). `bundle`: a bundle loan's units, stored with
    it so that every send of its credit asks for the same units."""
    sagas.check_loan_move(None, state, loan_id or "")
    loan_id = loan_id or new_id()
    if not subscriber_known:
        ensure_subscriber(conn, msisdn, now)
    conn.execute(
        "INSERT INTO loans (loan_id, msisdn, tier_id, principal_minor, fee_minor, state,"
        " channel, idempotency_key, in_node, diameter_session_id, request_number,"
        " created_at, updated_at, owner_node, lease_until, bundle_kind, bundle_quantity,"
        " bundle_service_identifier, bundle_rating_group)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            loan_id,
            msisdn,
            tier_id,
            principal_minor,
            fee_minor,
            state,
            channel,
            idempotency_key,
            in_node,
            session_id,
            request_number,
            ts(now),
            ts(now),
            owner_node,
            ts(lease_until) if lease_until is not None else None,
            *_bundle_columns(bundle),
        ),
    )
    if state in (ACTIVE, CONFIRMING):
        _disburse(conn, loan_id, msisdn, principal_minor, fee_minor, now)
    return loan_id


def _bundle_columns(bundle: Bundle | None) -> tuple[Any, Any, Any, Any]:
    """The four bundle columns of a loan row (all NULL for a money loan)."""
    if bundle is None:
        return (None, None, None, None)
    return (bundle.kind, bundle.quantity, bundle.service_identifier, bundle.rating_group)


def _disburse(
    conn: sqlite3.Connection,
    loan_id: str,
    msisdn: str,
    principal_minor: int,
    fee_minor: int,
    now: datetime,
) -> None:
    """Journal the credit and count the loan toward the bad-debt bar."""
    post(
        conn,
        journal.disbursement(principal_minor, fee_minor),
        msisdn=msisdn,
        memo="disburse",
        now=now,
        loan_id=loan_id,
    )
    # Every loan counts toward the bad-debt bar until a full payback resets the count:
    # the segment's bad_debt_limit is the number of loans a subscriber may take
    # without once paying back in full.
    conn.execute(
        "UPDATE subscribers SET loans_since_full_payback = loans_since_full_payback + 1,"
        " updated_at = ? WHERE msisdn = ?",
        (ts(now), msisdn),
    )


def settle_loan(
    conn: sqlite3.Connection,
    loan_id: str,
    new_state: str,
    now: datetime,
    *,
    result_code: int | None = None,
    loan: LoanRow | None = None,
) -> LoanRow:
    """Move an unsettled loan to ACTIVE, FAILED or UNKNOWN. Idempotent for the same state.
    A CONFIRMING advance is settled by `settle_advance` only (it is journalled already).
    `loan`: the row as this transaction just read it (under its lock), not read again."""
    if loan is None or loan.loan_id != loan_id:
        loan = get_loan(conn, loan_id)
    if loan is None:
        raise KeyError(loan_id)
    if loan.state == new_state:
        return loan
    if loan.state == CONFIRMING or new_state == CONFIRMING:
        raise LedgerInvariantError(f"loan {loan_id}: advances settle through settle_advance")
    sagas.loan_step(
        loan.state, sagas.settlement_event(new_state, sagas.LOAN_SETTLEMENTS, loan_id), loan_id
    )
    conn.execute(
        "UPDATE loans SET state = ?, result_code = COALESCE(?, result_code), updated_at = ?"
        " WHERE loan_id = ?",
        (new_state, result_code, ts(now), loan_id),
    )
    if new_state == ACTIVE:
        _disburse(conn, loan_id, loan.msisdn, loan.principal_minor, loan.fee_minor, now)
    # The row as just written (state is the only LoanRow column the update changed).
    return replace(loan, state=new_state)


def settle_advance(
    conn: sqlite3.Connection,
    loan_id: str,
    confirmed: bool,
    now: datetime,
    *,
    result_code: int | None = None,
    never_credited: bool = False,
) -> LoanRow:
    """Settle a CONFIRMING advance from the IN's answer to its confirmation.

    Confirmed: ACTIVE; the journal entry written when it was booked stands. Refused:
    the IN never credited it, so FAILED with a reversing journal entry (nothing owed)
    and the bad-debt count taken back. Idempotent: an advance already in the target
    state is returned unchanged. `never_credited` (reconciliation with the IN's own
    records): an ACTIVE advance with nothing recovered or adjusted yet is reversed the
    same way.
    """
    loan = get_loan(conn, loan_id)
    if loan is None:
        raise KeyError(loan_id)
    new_state = ACTIVE if confirmed else FAILED
    if loan.state == new_state:
        return loan
    event = sagas.advance_settlement_event(
        loan.state, confirmed, never_credited=never_credited, channel=loan.channel,
        repaid_minor=loan.principal_repaid_minor + loan.fee_repaid_minor)
    sagas.loan_step(loan.state, event, loan_id)
    conn.execute(
        "UPDATE loans SET state = ?, result_code = COALESCE(?, result_code), updated_at = ?"
        " WHERE loan_id = ?",
        (new_state, result_code, ts(now), loan_id),
    )
    if not confirmed:
        # While CONFIRMING nothing can have been recovered or written off (recoveries
        # wait, ageing and adjustments skip subscribers with an unsettled loan), so
        # the whole booking is reversed.
        post(
            conn,
            journal.reversal(loan.principal_minor, loan.fee_minor),
            msisdn=loan.msisdn,
            memo="advance_reversed",
            now=now,
            loan_id=loan_id,
        )
        # No full payback can have reset the count meanwhile (recoveries wait).
        conn.execute(
            "UPDATE subscribers SET loans_since_full_payback = CASE"
            " WHEN loans_since_full_payback > 0 THEN loans_since_full_payback - 1 ELSE 0 END,"
            " updated_at = ? WHERE msisdn = ?",
            (ts(now), loan.msisdn),
        )
    return replace(loan, state=new_state)


def note_resolve_attempt(
    conn: sqlite3.Connection, table: str, key: str, review_after: int, now: datetime
) -> bool:
    """Count a resolver attempt; flag for manual review past the bound. True if flagged."""
    id_column = {"loans": "loan_id", "recoveries": "recovery_id"}[table]
    conn.execute(
        f"UPDATE {table} SET resolve_attempts = resolve_attempts + 1, updated_at = ?"
        f" WHERE {id_column} = ?",
        (ts(now), key),
    )
    row = conn.execute(
        f"SELECT resolve_attempts, msisdn FROM {table} WHERE {id_column} = ?", (key,)
    ).fetchone()
    if row[0] >= review_after:
        conn.execute(f"UPDATE {table} SET needs_review = 1 WHERE {id_column} = ?", (key,))
        audit(
            conn,
            row[1],
            "review",
            "resolver",
            f"{table} {key} unresolved after {row[0]} attempts",
            now,
        )
        return True
    return False


def record_session_evidence(
    conn: sqlite3.Connection,
    loan_id: str,
    session_id: str,
    request_type: int,
    request_number: int,
    used_minor: int | None,
    now: datetime,
) -> bool:
    """Record that the IN continued the credit-control session of advance `loan_id`
    (an UPDATE or TERMINATION after the INITIAL that granted it: RFC 4006 §5.2), with
    the Used-Service-Unit money it reported, if any. The first such request is kept;
    True if this call recorded it."""
    cur = conn.execute(
        "INSERT INTO advance_session_evidence (loan_id, session_id, request_type,"
        " request_number, used_minor, created_at) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (loan_id) DO NOTHING",
        (loan_id, session_id, request_type, request_number, used_minor, ts(now)),
    )
    return cur.rowcount == 1


def session_evidence(conn: sqlite3.Connection, loan_id: str) -> tuple[int, int, int | None] | None:
    """(request_type, request_number, used_minor) of the IN's request that confirmed
    advance `loan_id` by continuing its session, or None."""
    row = conn.execute(
        "SELECT request_type, request_number, used_minor FROM advance_session_evidence"
        " WHERE loan_id = ?", (loan_id,),
    ).fetchone()
    return (int(row[0]), int(row[1]), None if row[2] is None else int(row[2])) if row else None


_OPEN_MARK = "undelivered_at IS NOT NULL AND delivered_at IS NULL AND closed_at IS NULL"


def _answer_mark(conn: sqlite3.Connection, loan_id: str) -> tuple[Any, Any, Any] | None:
    row = conn.execute(
        "SELECT undelivered_at, delivered_at, closed_at FROM advance_answer_undelivered"
        " WHERE loan_id = ?", (loan_id,),
    ).fetchone()
    return (row[0], row[1], row[2]) if row else None


def _insert_answer_mark(conn: sqlite3.Connection, loan_id: str, column: str,
                        now: datetime) -> None:
    row = conn.execute("SELECT msisdn FROM loans WHERE loan_id = ?", (loan_id,)).fetchone()
    if row is None:
        raise KeyError(loan_id)
    conn.execute(
        f"INSERT INTO advance_answer_undelivered (loan_id, msisdn, {column}) VALUES (?, ?, ?)",
        (loan_id, row[0], ts(now)),
    )


def mark_answer_undelivered(conn: sqlite3.Connection, loan_id: str, now: datetime) -> bool:
    """A CCA granting advance `loan_id` could not be handed to a live connection: open
    (or restart) its mark, unless an answer was delivered or the mark was settled
    already. True if the mark is open after this call."""
    mark = _answer_mark(conn, loan_id)
    if mark is None:
        _insert_answer_mark(conn, loan_id, "undelivered_at", now)
        return True
    if mark[1] is not None or mark[2] is not None:
        return False
    conn.execute("UPDATE advance_answer_undelivered SET undelivered_at = ? WHERE loan_id = ?",
                 (ts(now), loan_id))
    return True


def mark_answer_delivered(conn: sqlite3.Connection, loan_id: str, now: datetime) -> bool:
    """An answer granting advance `loan_id` was handed to a live connection (the IN's
    re-send was answered): no mark can open for it any more. True if an open mark
    was cleared."""
    mark = _answer_mark(conn, loan_id)
    if mark is None:
        _insert_answer_mark(conn, loan_id, "delivered_at", now)
        return False
    if mark[1] is not None:
        return False
    conn.execute("UPDATE advance_answer_undelivered SET delivered_at = ? WHERE loan_id = ?",
                 (ts(now), loan_id))
    return mark[0] is not None and mark[2] is None


def restart_answer_hold(conn: sqlite3.Connection, loan_id: str, now: datetime) -> bool:
    """A re-send of the IN's request is being answered with advance `loan_id`'s grant:
    an open mark's hold starts again at `now`, so the resolver cannot reverse the
    advance while that answer is on its way. True if a mark was open."""
    cur = conn.execute(
        f"UPDATE advance_answer_undelivered SET undelivered_at = ? WHERE loan_id = ? AND {_OPEN_MARK}",
        (ts(now), loan_id),
    )
    return cur.rowcount == 1


def close_answer_mark(conn: sqlite3.Connection, loan_id: str, now: datetime) -> bool:
    """The resolver settled advance `loan_id`'s open mark. True if it was open."""
    cur = conn.execute(
        f"UPDATE advance_answer_undelivered SET closed_at = ? WHERE loan_id = ? AND {_OPEN_MARK}",
        (ts(now), loan_id),
    )
    return cur.rowcount == 1


def answer_mark_open_since(conn: sqlite3.Connection, loan_id: str) -> datetime | None:
    """When advance `loan_id`'s open mark was last set, or None when none is open."""
    mark = _answer_mark(conn, loan_id)
    if mark is None or mark[0] is None or mark[1] is not None or mark[2] is not None:
        return None
    return datetime.fromisoformat(mark[0])


def undelivered_loan_ids(conn: sqlite3.Connection, msisdn: str) -> frozenset[str]:
    """His advances with an open mark: a recharge takes nothing for them."""
    rows = conn.execute(
        f"SELECT loan_id FROM advance_answer_undelivered WHERE msisdn = ? AND {_OPEN_MARK}",
        (msisdn,),
    ).fetchall()
    return frozenset(r[0] for r in rows)


def undelivered_due(conn: sqlite3.Connection, before: datetime,
                    limit: int) -> list[tuple[str, str]]:
    """(loan_id, msisdn) of the open marks set at or before `before`, oldest first."""
    rows = conn.execute(
        f"SELECT loan_id, msisdn FROM advance_answer_undelivered WHERE {_OPEN_MARK}"
        " AND undelivered_at <= ? ORDER BY undelivered_at, loan_id LIMIT ?",
        (ts(before), limit),
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def advances_of_in_node(conn: sqlite3.Connection, in_node: str, until: datetime
                        ) -> list[LoanRow]:
    """Automatic advances granted to `in_node`'s requests up to `until` (oldest first),
    for reconciliation with that IN's records."""
    rows = conn.execute(
        f"SELECT {LOAN_COLUMNS} FROM loans WHERE channel = 'auto' AND in_node = ?"
        " AND created_at <= ? ORDER BY created_at",
        (in_node, ts(until)),
    ).fetchall()
    return [loan_row(r) for r in rows]


def unsettled_loans(conn: sqlite3.Connection, limit: int) -> list[LoanRow]:
    rows = conn.execute(
        f"SELECT {LOAN_COLUMNS} FROM loans WHERE state IN ({_marks(LOAN_UNSETTLED_STATES)})"
        " AND needs_review = 0 ORDER BY created_at LIMIT ?",
        (*LOAN_UNSETTLED_STATES, limit),
    ).fetchall()
    return [loan_row(r) for r in rows]


def write_off(conn: sqlite3.Connection, loan_id: str, who: str, now: datetime) -> int:
    """Write the rest of an open loan off; returns the amount written off."""
    loan = get_loan(conn, loan_id)
    if loan is None or loan.state not in LOAN_OPEN_STATES:
        return 0
    if has_unsettled(conn, loan.msisdn):
        # A recovery in flight may still take this debt; write off on a later run.
        return 0
    sagas.loan_step(loan.state, sagas.WRITE_OFF, loan_id)
    fee_left = loan.fee_minor - loan.fee_repaid_minor
    principal_left = loan.principal_minor - loan.principal_repaid_minor
    post(
        conn,
        journal.write_off(fee_left, principal_left),
        msisdn=loan.msisdn,
        memo="write_off",
        now=now,
        loan_id=loan_id,
    )
    conn.execute(
        "UPDATE loans SET state = ?, updated_at = ? WHERE loan_id = ?",
        (WRITTEN_OFF, ts(now), loan_id),
    )
    audit(
        conn,
        loan.msisdn,
        "write_off",
        who,
        f"loan {loan_id} aged",
        now,
        {"loan_id": loan_id, "amount_minor": fee_left + principal_left},
    )
    return fee_left + principal_left


# -- recoveries --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecoveryRow:
    recovery_id: str
    event_id: str
    msisdn: str
    recharge_minor: int
    balance_after_minor: int | None
    requested_minor: int
    recovered_minor: int
    state: str
    in_node: str | None
    diameter_session_id: str | None
    request_number: int
    attempts: int
    resolve_attempts: int
    needs_review: bool


_RECOVERY_COLUMNS = (
    "recovery_id, event_id, msisdn, recharge_minor, balance_after_minor, requested_minor,"
    " recovered_minor, state, in_node, diameter_session_id, request_number, attempts,"
    " resolve_attempts, needs_review"
)


def _recovery(row: tuple[Any, ...]) -> RecoveryRow:
    values = list(row)
    values[13] = bool(values[13])
    return RecoveryRow(*values)


def get_recovery(conn: sqlite3.Connection, recovery_id: str) -> RecoveryRow | None:
    row = conn.execute(
        f"SELECT {_RECOVERY_COLUMNS} FROM recoveries WHERE recovery_id = ?", (recovery_id,)
    ).fetchone()
    return _recovery(row) if row else None


def recovery_by_event(conn: sqlite3.Connection, event_id: str) -> RecoveryRow | None:
    row = conn.execute(
        f"SELECT {_RECOVERY_COLUMNS} FROM recoveries WHERE event_id = ?", (event_id,)
    ).fetchone()
    return _recovery(row) if row else None


def insert_recovery(
    conn: sqlite3.Connection,
    *,
    event_id: str,
    msisdn: str,
    recharge_minor: int,
    balance_after_minor: int | None,
    in_node: str | None,
    now: datetime,
    session_id: str | None = None,
    requested_minor: int = 0,
    owner_node: str | None = None,
    lease_until: datetime | None = None,
) -> str:
    """Insert a RECOVERING recovery. With `session_id`, its first DIRECT_DEBITING
    attempt is recorded too (the same rows `start_recovery_attempt` writes, in two
    statements instead of four). `owner_node` / `lease_until`: see
    `claim_unsettled_recoveries`."""
    recovery_id = new_id()
    conn.execute(
        "INSERT INTO recoveries (recovery_id, event_id, msisdn, recharge_minor,"
        " balance_after_minor, requested_minor, state, in_node, diameter_session_id,"
        " attempts, created_at, updated_at, owner_node, lease_until)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            recovery_id,
            event_id,
            msisdn,
            recharge_minor,
            balance_after_minor,
            requested_minor if session_id is not None else 0,
            RECOVERING,
            in_node,
            session_id,
            1 if session_id is not None else 0,
            ts(now),
            ts(now),
            owner_node,
            ts(lease_until) if lease_until is not None else None,
        ),
    )
    if session_id is not None:
        conn.execute(
            "INSERT INTO recovery_attempts (recovery_id, attempt_no, diameter_session_id,"
            " requested_minor, created_at) VALUES (?, 1, ?, ?, ?)",
            (recovery_id, session_id, requested_minor, ts(now)),
        )
    return recovery_id


def start_recovery_attempt(
    conn: sqlite3.Connection, recovery_id: str, session_id: str, requested_minor: int, now: datetime
) -> int:
    """Record the next DIRECT_DEBITING before it is sent; returns its attempt number."""
    cur = conn.execute(
        "UPDATE recoveries SET attempts = attempts + 1, diameter_session_id = ?,"
        " requested_minor = ?, request_number = 0, state = ?, updated_at = ?"
        f" WHERE recovery_id = ? AND state IN ({_marks(_NEXT_ATTEMPT_FROM)})",
        (session_id, requested_minor, RECOVERING, ts(now), recovery_id, *_NEXT_ATTEMPT_FROM),
    )
    if cur.rowcount != 1:
        _refuse_recovery_move(conn, recovery_id, sagas.NEXT_ATTEMPT)
    attempt_no = conn.execute(
        "SELECT attempts FROM recoveries WHERE recovery_id = ?", (recovery_id,)
    ).fetchone()[0]
    conn.execute(
        "INSERT INTO recovery_attempts (recovery_id, attempt_no, diameter_session_id,"
        " requested_minor, created_at) VALUES (?, ?, ?, ?, ?)",
        (recovery_id, attempt_no, session_id, requested_minor, ts(now)),
    )
    return int(attempt_no)


# States a new attempt may start from (the saga table's NEXT_ATTEMPT rows).
_NEXT_ATTEMPT_FROM = sagas.sources(sagas.NEXT_ATTEMPT, sagas.RECOVERY_TRANSITIONS)


def _refuse_recovery_move(conn: sqlite3.Connection, recovery_id: str, event: str) -> None:
    """A guarded UPDATE matched no row: say why (unknown id, or a move the saga table
    does not allow from the state the recovery is in)."""
    rec = get_recovery(conn, recovery_id)
    if rec is None:
        raise KeyError(recovery_id)
    sagas.recovery_step(rec.state, event, recovery_id)
    raise AssertionError("unreachable: the guarded update should have matched")


def note_recovery_attempt(
    conn: sqlite3.Connection,
    recovery_id: str,
    outcome: str,
    result_code: int | None,
    attempt_no: int | None = None,
) -> None:
    """Record the outcome of the current attempt (`attempt_no` when the caller has
    the recovery row at hand, else looked up)."""
    if attempt_no is not None:
        conn.execute(
            "UPDATE recovery_attempts SET outcome = ?, result_code = ?"
            " WHERE recovery_id = ? AND attempt_no = ?",
            (outcome, result_code, recovery_id, attempt_no),
        )
        return
    conn.execute(
        "UPDATE recovery_attempts SET outcome = ?, result_code = ? WHERE recovery_id = ?"
        " AND attempt_no = (SELECT attempts FROM recoveries WHERE recovery_id = ?)",
        (outcome, result_code, recovery_id, recovery_id),
    )


def set_recovery_state(
    conn: sqlite3.Connection, recovery_id: str, state: str, now: datetime
) -> None:
    """Move an unsettled recovery to UNKNOWN (answer lost) or FAILED (nothing taken).
    Setting the state it already has changes nothing; a move the saga table does not
    allow raises `IllegalTransition`. DONE is reached through `apply_recovery` only."""
    event = sagas.settlement_event(state, sagas.RECOVERY_SETTLEMENTS, recovery_id)
    allowed = sagas.sources(event, sagas.RECOVERY_TRANSITIONS)
    cur = conn.execute(
        "UPDATE recoveries SET state = ?, updated_at = ? WHERE recovery_id = ?"
        f" AND state IN ({_marks(allowed)})",
        (state, ts(now), recovery_id, *allowed),
    )
    if cur.rowcount == 1:
        return
    rec = get_recovery(conn, recovery_id)
    if rec is None:
        raise KeyError(recovery_id)
    if rec.state != state:
        sagas.recovery_step(rec.state, event, recovery_id)


def apply_recovery(
    conn: sqlite3.Connection,
    rec: RecoveryRow,
    allocation: Recovery,
    now: datetime,
) -> None:
    """Book what the IN debited, split over the loans by the caller (`core.payback.
    split`): one journal entry per loan, the loans' repaid columns and states, the
    recovery DONE, and the bad-debt count reset when nothing is owed any more.

    `rec`: the recovery as read in this same transaction. Each part must name an open
    loan of the subscriber and take at most what it owes (else `LedgerInvariantError`,
    and nothing is written).
    """
    sagas.recovery_step(rec.state, sagas.IN_DEBITED, rec.recovery_id)
    if sum(p.total_minor for p in allocation.parts) != allocation.total_minor:
        raise LedgerInvariantError(f"recovery {rec.recovery_id}: parts do not add up")
    # Guarded on the stored row, not on `rec`: a stale copy of a recovery already
    # booked (DONE, FAILED) or of another subscriber's matches nothing and books nothing.
    cur = conn.execute(
        "UPDATE recoveries SET recovered_minor = ?, state = ?, updated_at = ?"
        " WHERE recovery_id = ? AND msisdn = ? AND state IN (?, ?)",
        (allocation.total_minor, DONE, ts(now), rec.recovery_id, rec.msisdn,
         *RECOVERY_UNSETTLED_STATES),
    )
    if cur.rowcount != 1:
        raise LedgerInvariantError(
            f"recovery {rec.recovery_id}: not an unsettled recovery of {rec.msisdn}"
        )
    for part in allocation.parts:
        if part.fee_minor < 0 or part.principal_minor < 0:
            raise LedgerInvariantError(f"recovery {rec.recovery_id}: negative part {part}")
        post(
            conn,
            journal.recovery(part.fee_minor, part.principal_minor),
            msisdn=rec.msisdn,
            memo="recover",
            now=now,
            loan_id=part.loan_id,
            recovery_id=rec.recovery_id,
        )
        # One statement moves the cache and the state, guarded so that only an open
        # loan of this subscriber with that much owing matches.
        cur = conn.execute(
            "UPDATE loans SET fee_repaid_minor = fee_repaid_minor + ?,"
            " principal_repaid_minor = principal_repaid_minor + ?,"
            " state = CASE WHEN principal_repaid_minor + ? = principal_minor"
            " AND fee_repaid_minor + ? = fee_minor THEN ? ELSE ? END, updated_at = ?"
            " WHERE loan_id = ? AND msisdn = ? AND state IN (?, ?)"
            " AND fee_minor - fee_repaid_minor >= ?"
            " AND principal_minor - principal_repaid_minor >= ?",
            (
                part.fee_minor,
                part.principal_minor,
                part.principal_minor,
                part.fee_minor,
                REPAID,
                PARTIALLY_REPAID,
                ts(now),
                part.loan_id,
                rec.msisdn,
                *LOAN_OPEN_STATES,
                part.fee_minor,
                part.principal_minor,
            ),
        )
        if cur.rowcount != 1:
            raise LedgerInvariantError(
                f"recovery {rec.recovery_id}: {part} is not owed on an open loan"
            )
    if allocation.clears_all:
        # A full payback lifts the bad-debt bar.
        conn.execute(
            "UPDATE subscribers SET loans_since_full_payback = 0, updated_at = ? WHERE msisdn = ?",
            (ts(now), rec.msisdn),
        )


def unsettled_recoveries(conn: sqlite3.Connection, limit: int) -> list[RecoveryRow]:
    rows = conn.execute(
        f"SELECT {_RECOVERY_COLUMNS} FROM recoveries WHERE state IN (?, ?)"
        " AND needs_review = 0 AND diameter_session_id IS NOT NULL"
        " ORDER BY created_at LIMIT ?",
        (*RECOVERY_UNSETTLED_STATES, limit),
    ).fetchall()
    return [_recovery(r) for r in rows]


def write_off_candidates(
    conn: sqlite3.Connection, before: datetime, limit: int
) -> list[tuple[str, str]]:
    """(msisdn, loan_id) of open loans created before `before`, oldest first."""
    rows = conn.execute(
        "SELECT msisdn, loan_id FROM loans WHERE state IN (?, ?) AND created_at < ?"
        " ORDER BY created_at LIMIT ?",
        (*LOAN_OPEN_STATES, ts(before), limit),
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def count_overdue(
    conn: sqlite3.Connection, created_before: datetime, created_since: datetime
) -> int:
    """Open loans created in [created_since, created_before) (debt ageing's report)."""
    row = conn.execute(
        "SELECT COUNT(*) FROM loans WHERE state IN (?, ?) AND created_at < ? AND created_at >= ?",
        (*LOAN_OPEN_STATES, ts(created_before), ts(created_since)),
    ).fetchone()
    return int(row[0])


def journal_entries(conn: sqlite3.Connection, msisdn: str) -> list[tuple[str, str, int]]:
    """(tx_id, account, amount) of the subscriber's journal lines, in the order written."""
    rows = conn.execute(
        "SELECT tx_id, account, amount_minor FROM journal WHERE msisdn = ? ORDER BY tx_id, line_no",
        (msisdn,),
    ).fetchall()
    return [(r[0], r[1], int(r[2])) for r in rows]


def put_profile(conn: sqlite3.Connection, profile: SubscriberProfile, now: datetime) -> None:
    """Create or replace one subscriber's profile (the profile import's row, one at a time)."""
    conn.execute(
        "INSERT INTO subscribers (msisdn, tenure_days, arpu_minor, attributes, updated_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (msisdn) DO UPDATE SET"
        " tenure_days = excluded.tenure_days, arpu_minor = excluded.arpu_minor,"
        " attributes = excluded.attributes, updated_at = excluded.updated_at",
        (
            profile.msisdn,
            profile.tenure_days,
            profile.arpu_minor,
            json.dumps(dict(profile.attributes), sort_keys=True),
            ts(now),
        ),
    )


# -- leases on the sagas (migration 0011) ------------------------------------------------
# An unsettled loan or recovery is claimable by `owner` when it has no owner, is his
# already (his lease is renewed), or its lease ran out (its node died). The claim is
# one UPDATE ... RETURNING: on SQLite the single writer makes it atomic; on PostgreSQL
# the adapter adds FOR UPDATE SKIP LOCKED to the inner SELECT, so two nodes claiming at
# once never both get a row and never wait for each other.

_CLAIMABLE = "(owner_node IS NULL OR owner_node = ? OR lease_until < ?)"


def claim_unsettled_loans(
    conn: sqlite3.Connection, owner: str, now: datetime, lease_until: datetime, limit: int,
    *, lock_rows: str = "",
) -> list[LoanRow]:
    """Unsettled loans (not flagged for review) that `owner` may settle, oldest first,
    at most `limit`, leased to him until `lease_until`."""
    rows = conn.execute(
        f"UPDATE loans SET owner_node = ?, lease_until = ? WHERE loan_id IN ("
        f"SELECT loan_id FROM loans WHERE state IN ({_marks(LOAN_UNSETTLED_STATES)})"
        f" AND needs_review = 0 AND {_CLAIMABLE} ORDER BY created_at LIMIT ?{lock_rows})"
        f" RETURNING {LOAN_COLUMNS}",
        (owner, ts(lease_until), *LOAN_UNSETTLED_STATES, owner, ts(now), limit),
    ).fetchall()
    return sorted((loan_row(r) for r in rows), key=lambda r: (r.created_at, r.loan_id))


def claim_unsettled_recoveries(
    conn: sqlite3.Connection, owner: str, now: datetime, lease_until: datetime, limit: int,
    *, lock_rows: str = "",
) -> list[RecoveryRow]:
    """As `claim_unsettled_loans`, for recoveries with a DIRECT_DEBITING sent."""
    rows = conn.execute(
        f"UPDATE recoveries SET owner_node = ?, lease_until = ? WHERE recovery_id IN ("
        "SELECT recovery_id FROM recoveries WHERE state IN (?, ?) AND needs_review = 0"
        f" AND diameter_session_id IS NOT NULL AND {_CLAIMABLE}"
        f" ORDER BY created_at LIMIT ?{lock_rows})"
        f" RETURNING {_RECOVERY_COLUMNS}, created_at",
        (owner, ts(lease_until), *RECOVERY_UNSETTLED_STATES, owner, ts(now), limit),
    ).fetchall()
    ordered = sorted(rows, key=lambda r: (r[-1], r[0]))
    return [_recovery(r[:-1]) for r in ordered]


def saga_lease(conn: sqlite3.Connection, table: str, key: str) -> tuple[str | None, str | None]:
    """(owner_node, lease_until) of a loan (`table` "loans") or recovery ("recoveries")."""
    column = {"loans": "loan_id", "recoveries": "recovery_id"}[table]
    row = conn.execute(
        f"SELECT owner_node, lease_until FROM {table} WHERE {column} = ?", (key,)
    ).fetchone()
    return (row[0], row[1]) if row else (None, None)
