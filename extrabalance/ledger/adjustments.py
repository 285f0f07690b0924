"""Manual adjustments by an operator: goodwill write-downs of a subscriber's debt.

Only debt *reductions* exist here. Raising a subscriber's debt by hand would be money
the IN never credited; a wrong loan is fixed by the resolver or by a write-down, never
by inventing a receivable.

A write-down is one balanced journal transaction, in the same accounts as an aged
write-off (see `store`):

    written_off +(f + p), fee_receivable -f, principal_receivable -p

and the loans' cached repaid columns move by the same `f` and `p`, so the loan cache
and the journal keep agreeing (the invariant the service tests check). A loan whose
whole remainder is waived becomes WRITTEN_OFF. The bad-debt count is left alone: a
waiver is not a payback, and lifting a bar stays an explicit `unbar`.

Every adjustment writes an `adjust` audit row (who, why, what) and may carry an
operator's request id: the same request id applied twice changes nothing the second
time and returns the first result.

How much comes off which loan is `core.adjustments.spread_write_down`, shared with the
in-memory ledger. `apply_write_down` is the port's `write_down` operation on SQLite and
PostgreSQL (`LedgerTx.write_down`): it commits nothing itself, the unit of work does.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime
from typing import Any

from extrabalance.core import sagas
from extrabalance.core.adjustments import (
    ADJUSTMENT_KINDS,
    AdjustmentError,
    AdjustmentKind,
    AdjustmentResult,
    check_request,
    spread_write_down,
)
from extrabalance.ledger import store

__all__ = ["ADJUSTMENT_KINDS", "AdjustmentError", "AdjustmentKind", "AdjustmentResult",
           "apply_write_down"]
IDEMPOTENCY_PREFIX = store.IDEMPOTENCY_KEPT_PREFIX  # never purged (see store)


def apply_write_down(
    conn: sqlite3.Connection,
    msisdn: str,
    *,
    kind: AdjustmentKind | str,
    amount_minor: int,
    who: str,
    reason: str,
    now: datetime,
    loan_id: str | None = None,
    request_id: str | None = None,
) -> AdjustmentResult:
    """Write `amount_minor` of a subscriber's debt down, oldest loan first, fee first.

    `waive_fee` touches fees only. With `loan_id` only that loan is touched. Raises
    `AdjustmentError` (and so changes nothing) when the amount is not positive, more
    than what can be waived, or a recovery or loan for this subscriber is unsettled.
    """
    if request_id:
        first = store.idempotent_get(conn, IDEMPOTENCY_PREFIX + request_id)
        if first is not None:
            return AdjustmentResult.replay(first, msisdn)
    check_request(kind, amount_minor, who, reason)
    if store.has_unsettled(conn, msisdn):
        # A recovery or credit in flight may still move this debt: waiving now could
        # leave the loan cache and the IN disagreeing. Try again once it settled.
        raise AdjustmentError("an operation for this subscriber is still unsettled; retry later")
    parts = spread_write_down(store.open_loans(conn, msisdn), kind, amount_minor, loan_id)
    debt_before = store.debt_from_journal(conn, msisdn)
    lines: list[tuple[str, int]] = []
    touched: list[dict[str, Any]] = []
    for part in parts:
        state = store.WRITTEN_OFF if part.cleared else store.PARTIALLY_REPAID
        lines += [("fee_receivable", -part.fee_minor),
                  ("principal_receivable", -part.principal_minor)]
        event = sagas.WRITE_OFF if part.cleared else sagas.WAIVE_PART
        allowed = sagas.sources(event, sagas.LOAN_TRANSITIONS)  # the saga table's moves
        cur = conn.execute(
            "UPDATE loans SET fee_repaid_minor = fee_repaid_minor + ?,"
            " principal_repaid_minor = principal_repaid_minor + ?, state = ?, updated_at = ?"
            f" WHERE loan_id = ? AND state IN ({', '.join('?' * len(allowed))})",
            (part.fee_minor, part.principal_minor, state, store.ts(now), part.loan_id,
             *allowed),
        )
        if cur.rowcount != 1:
            raise sagas.IllegalTransition(f"loan {part.loan_id} cannot become {state}")
        touched.append({"loan_id": part.loan_id, "fee_minor": part.fee_minor,
                        "principal_minor": part.principal_minor, "state": state})
    tx_id = store.post(
        conn,
        [("written_off", amount_minor), *lines],
        msisdn=msisdn,
        memo=f"adjust_{kind}",
        now=now,
        loan_id=touched[0]["loan_id"] if len(touched) == 1 else None,
    )
    debt_after = store.debt_from_journal(conn, msisdn)
    if debt_after != debt_before - amount_minor or debt_after < 0:
        raise store.LedgerInvariantError(
            f"adjustment for {msisdn}: debt {debt_before} - {amount_minor} != {debt_after}")
    result = AdjustmentResult(tx_id, msisdn, kind, amount_minor, debt_before, debt_after,
                              tuple(touched))
    store.audit(conn, msisdn, "adjust", who, reason, now,
                {"kind": kind, "amount_minor": amount_minor, "tx_id": tx_id,
                 "loans": touched, "request_id": request_id})
    if request_id:
        store.idempotent_put(conn, IDEMPOTENCY_PREFIX + request_id, result.as_dict(), now)
    return result
