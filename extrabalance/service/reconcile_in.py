"""Reconcile automatic advances with the IN's own records (`extrabalance reconcile-in`).

The grant in a CCA is the credit (RFC 4006 §8.17): the node books an advance when it
answers, and an IN applies it when the answer reaches it before its Tx timer, or when
its re-send with the T flag is answered. What no standard message can tell the node
is the rare advance whose every answer came too late for the IN (or died with a
killed node before it was written): booked, owed, never credited. The IN's own
records can: this module takes the IN's extract of the out-of-balance grants it
applied and compares it with the ledger's advances to that IN up to the extract's
cut-off.

| the advance in the ledger | in the IN's extract | outcome |
|---|---|---|
| booked | applied, same MSISDN and amount | confirmed |
| booked, nothing recovered, no payback running | absent | `--apply`: reversed (FAILED, reversing journal entry, nothing owed; a late re-send of the IN's request is answered NO_ADVANCE, 4012) |
| booked, partly or wholly recovered, adjusted, or a payback running | absent | listed for review, not touched |
| booked | applied with another MSISDN or amount | listed as a mismatch |
| booked by an INITIAL whose session the IN continued (UPDATE/TERMINATION) | absent | confirmed by the IN's session, missing from the extract: listed, never reversed |
| none | applied | listed: the IN credited a grant the node did not book |

Extract format, CSV with a header line (one row per grant the IN applied):
`session_id,request_number,msisdn,amount_minor`. Without `apply` nothing is written.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from extrabalance.core import sagas
from extrabalance.service.lending import reverse_never_credited
from extrabalance.service.unit_of_work import LedgerTx

EXTRACT_COLUMNS = ("session_id", "request_number", "msisdn", "amount_minor")
EXTRACT_ROWS_MAX = 10_000_000  # one extract; a bigger one is cut by the IN per day


@dataclass(frozen=True, slots=True)
class InGrant:
    """One out-of-balance grant the IN applied, from its own records."""

    session_id: str
    request_number: int
    msisdn: str
    amount_minor: int


class ExtractError(ValueError):
    """The IN's extract cannot be read: the line and what is wrong."""


def read_extract(path: str | Path) -> list[InGrant]:
    grants: list[InGrant] = []
    with Path(path).open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in EXTRACT_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ExtractError(f"{path}: header lacks {', '.join(missing)}")
        for line, row in enumerate(reader, start=2):
            if len(grants) >= EXTRACT_ROWS_MAX:
                raise ExtractError(f"{path}: more than {EXTRACT_ROWS_MAX} rows")
            try:
                grant = InGrant(row["session_id"].strip(), int(row["request_number"]),
                                row["msisdn"].strip(), int(row["amount_minor"]))
            except (TypeError, ValueError, AttributeError):
                raise ExtractError(f"{path}:{line}: not session_id,request_number,msisdn,"
                                   f"amount_minor: {row}") from None
            if not grant.session_id or not grant.msisdn.isdigit() or grant.amount_minor <= 0:
                raise ExtractError(f"{path}:{line}: empty Session-Id, bad MSISDN or amount")
            grants.append(grant)
    return grants


@dataclass
class ReconcileInReport:
    in_node: str
    until: str
    applied: bool
    advances_checked: int = 0
    confirmed: int = 0
    reversed: list[dict[str, Any]] = field(default_factory=list)
    not_credited: list[dict[str, Any]] = field(default_factory=list)  # reversible, dry run
    needs_review: list[dict[str, Any]] = field(default_factory=list)
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    grants_without_advance: list[dict[str, Any]] = field(default_factory=list)
    # Applied by the IN's own session (RFC 4006 §5.2), yet absent from its extract.
    session_confirmed_missing: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "in_node": self.in_node, "until": self.until, "applied": self.applied,
            "advances_checked": self.advances_checked, "confirmed": self.confirmed,
            "reversed": self.reversed, "not_credited": self.not_credited,
            "needs_review": self.needs_review, "mismatches": self.mismatches,
            "grants_without_advance": self.grants_without_advance,
            "session_confirmed_missing": self.session_confirmed_missing,
        }

    @property
    def clean(self) -> bool:
        return not (self.not_credited or self.needs_review or self.mismatches
                    or self.grants_without_advance)


def reconcile_in(tx: LedgerTx, grants: list[InGrant], *, in_node: str,
                 until: datetime, apply: bool, now: datetime) -> ReconcileInReport:
    """Compare the ledger's advances to `in_node` up to `until` with the IN's `grants`;
    with `apply`, reverse those the IN never credited (in the caller's unit of work).
    Moves money only by reversing a booking the IN shows it never applied."""
    report = ReconcileInReport(in_node, until.isoformat(timespec="microseconds"), apply)
    by_key = {(g.session_id, g.request_number): g for g in grants}
    seen: set[tuple[str, int]] = set()
    for loan in tx.advances_of_in_node(in_node, until):
        if loan.state in (sagas.FAILED, sagas.REQUESTED):
            continue  # nothing was granted (a refused confirmation, or never answered)
        report.advances_checked += 1
        key = (loan.diameter_session_id or "", loan.request_number)
        row = {"loan_id": loan.loan_id, "msisdn": loan.msisdn, "session_id": key[0],
               "request_number": key[1], "amount_minor": loan.principal_minor,
               "state": loan.state}
        grant = by_key.get(key)
        if grant is not None:
            seen.add(key)
            if (grant.msisdn, grant.amount_minor) == (loan.msisdn, loan.principal_minor):
                report.confirmed += 1
            else:
                report.mismatches.append({**row, "in_msisdn": grant.msisdn,
                                          "in_amount_minor": grant.amount_minor})
            continue
        evidence = tx.session_evidence(loan.loan_id)
        if evidence is not None:
            # The IN continued the INITIAL's session: it received the CCA and applied
            # the grant. Never reversed; its extract lacks a row it should have.
            report.session_confirmed_missing.append({
                **row, "why": "confirmed by the IN's session, missing from the extract",
                "evidence_request_number": evidence[1], "used_minor": evidence[2]})
            continue
        loaded = tx.load_subscriber(loan.msisdn)
        reversible = (loan.state == sagas.ACTIVE and loan.principal_repaid_minor == 0
                      and loan.fee_repaid_minor == 0 and not loaded.recovery_pending)
        if not reversible:
            report.needs_review.append(row)
            continue
        if not apply:
            report.not_credited.append(row)
            continue
        reverse_never_credited(
            tx, loan.loan_id, now, who="reconcile-in",
            why=f"advance {loan.loan_id} not in {in_node}'s records up to {report.until}")
        # What the EDR line of the reversal carries (`advance_reversed`, as when the IN
        # refuses an opt-in advance confirmation): the fee undone and the debt left.
        report.reversed.append({**row, "fee_minor": loan.fee_minor,
                                "debt_after_minor": tx.debt_owed(loan.msisdn)})
    for key, grant in by_key.items():
        if key not in seen:
            report.grants_without_advance.append({
                "session_id": grant.session_id, "request_number": grant.request_number,
                "msisdn": grant.msisdn, "amount_minor": grant.amount_minor})
    return report
