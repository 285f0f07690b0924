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

Nothing here commits; callers run `apply_write_down` inside `Ledger.write`.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from extrabalance.core import sagas
from extrabalance.ledger import store

AdjustmentKind = Literal["waive", "waive_fee"]
ADJUSTMENT_KINDS: tuple[str, ...] = ("waive", "waive_fee")
IDEMPOTENCY_PREFIX = store.IDEMPOTENCY_KEPT_PREFIX  # never purged (see store)


class AdjustmentError(ValueError):
    """The adjustment cannot be applied as asked; nothing was changed."""


@dataclass(frozen=True, slots=True)
class AdjustmentResult:
    tx_id: str | None
    msisdn: str
    kind: str
    amount_minor: int  # what was actually written down
    debt_before_minor: int
    debt_after_minor: int
    loans: tuple[dict[str, Any], ...]  # per loan: loan_id, fee_minor, principal_minor, state
    replayed: bool = False

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["loans"] = list(self.loans)
        return d


def apply_write_down(
    conn: sqlite3.Connection,
    msisdn: str,
    *,
    kind: AdjustmentKind,
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
            if first.get("msisdn") != msisdn:
                raise AdjustmentError("request_id was already used for another subscriber")
            first["loans"] = tuple(first["loans"])
            first["replayed"] = True
            return AdjustmentResult(**first)
    if kind not in ADJUSTMENT_KINDS:
        raise AdjustmentError(f"kind must be one of {', '.join(ADJUSTMENT_KINDS)}")
    if not isinstance(amount_minor, int) or isinstance(amount_minor, bool) or amount_minor <= 0:
        raise AdjustmentError("amount_minor must be a positive integer (minor units)")
    if not who.strip() or not reason.strip():
        raise AdjustmentError("who and reason are required for the audit trail")
    if store.has_unsettled(conn, msisdn):
        # A recovery or credit in flight may still move this debt: waiving now could
        # leave the loan cache and the IN disagreeing. Try again once it settled.
        raise AdjustmentError("an operation for this subscriber is still unsettled; retry later")
    loans = store.open_loans(conn, msisdn)
    if loan_id is not None:
        loans = tuple(x for x in loans if x.loan_id == loan_id)
        if not loans:
            raise AdjustmentError(f"no open loan {loan_id} for this subscriber")
    waivable = sum(x.fee_owed_minor if kind == "waive_fee" else x.owed_minor for x in loans)
    if amount_minor > waivable:
        raise AdjustmentError(
            f"amount_minor {amount_minor} exceeds what can be waived ({waivable})")
    debt_before = store.debt_from_journal(conn, msisdn)
    lines: list[tuple[str, int]] = []
    touched: list[dict[str, Any]] = []
    left = amount_minor
    for loan in loans:
        if left == 0:
            break
        fee = min(left, loan.fee_owed_minor)
        left -= fee
        principal = 0 if kind == "waive_fee" else min(left, loan.principal_owed_minor)
        left -= principal
        if fee == 0 and principal == 0:
            continue
        cleared = fee + principal == loan.owed_minor
        state = store.WRITTEN_OFF if cleared else store.PARTIALLY_REPAID
        lines += [("fee_receivable", -fee), ("principal_receivable", -principal)]
        event = sagas.WRITE_OFF if cleared else sagas.WAIVE_PART
        allowed = sagas.sources(event, sagas.LOAN_TRANSITIONS)  # the saga table's moves
        cur = conn.execute(
            "UPDATE loans SET fee_repaid_minor = fee_repaid_minor + ?,"
            " principal_repaid_minor = principal_repaid_minor + ?, state = ?, updated_at = ?"
            f" WHERE loan_id = ? AND state IN ({', '.join('?' * len(allowed))})",
            (fee, principal, state, store.ts(now), loan.loan_id, *allowed),
        )
        if cur.rowcount != 1:
            raise sagas.IllegalTransition(f"loan {loan.loan_id} cannot become {state}")
        touched.append({"loan_id": loan.loan_id, "fee_minor": fee,
                        "principal_minor": principal, "state": state})
    assert left == 0, "allocation must use the whole amount"
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
