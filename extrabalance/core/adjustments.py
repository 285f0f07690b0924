"""Operator write-downs of a subscriber's debt: the rules, without the ledger.

What this file owns: the kinds of adjustment, what a request must carry, how an amount
is spread over the open loans (oldest loan first, fee before principal; `waive_fee`
touches fees only; with a `loan_id` only that loan), and the result a write-down
answers. Every ledger adapter books the spread it gets from `spread_write_down` (see
`ledger/adjustments.py` for the journal entry), so they agree to the minor unit.

Only debt *reductions* exist: raising a subscriber's debt by hand would be money the
IN never credited. Pure data and functions: no IO, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from extrabalance.core.model import OpenLoan

AdjustmentKind = Literal["waive", "waive_fee"]
ADJUSTMENT_KINDS: tuple[str, ...] = ("waive", "waive_fee")


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

    @classmethod
    def replay(cls, first: dict[str, Any], msisdn: str) -> AdjustmentResult:
        """The result kept for a request id, answered again."""
        if first.get("msisdn") != msisdn:
            raise AdjustmentError("request_id was already used for another subscriber")
        return cls(**{**first, "loans": tuple(first["loans"]), "replayed": True})


@dataclass(frozen=True, slots=True)
class Waived:
    """What a write-down takes off one loan; `cleared`: nothing is left owed on it."""

    loan_id: str
    fee_minor: int
    principal_minor: int
    cleared: bool


def check_request(kind: str, amount_minor: object, who: str, reason: str) -> None:
    """Raise `AdjustmentError` unless the request is one the ledger may book."""
    if kind not in ADJUSTMENT_KINDS:
        raise AdjustmentError(f"kind must be one of {', '.join(ADJUSTMENT_KINDS)}")
    if not isinstance(amount_minor, int) or isinstance(amount_minor, bool) or amount_minor <= 0:
        raise AdjustmentError("amount_minor must be a positive integer (minor units)")
    if not who.strip() or not reason.strip():
        raise AdjustmentError("who and reason are required for the audit trail")


def spread_write_down(
    loans: Sequence[OpenLoan], kind: str, amount_minor: int, loan_id: str | None = None
) -> tuple[Waived, ...]:
    """Spread `amount_minor` over `loans` (oldest first), fee before principal; raise
    `AdjustmentError` when `loan_id` is not among them or the amount is more than can
    be waived. The parts add up to `amount_minor` exactly."""
    if loan_id is not None:
        loans = [x for x in loans if x.loan_id == loan_id]
        if not loans:
            raise AdjustmentError(f"no open loan {loan_id} for this subscriber")
    waivable = sum(x.fee_owed_minor if kind == "waive_fee" else x.owed_minor for x in loans)
    if amount_minor > waivable:
        raise AdjustmentError(
            f"amount_minor {amount_minor} exceeds what can be waived ({waivable})")
    parts: list[Waived] = []
    left = amount_minor
    for loan in loans:
        if left == 0:
            break
        fee = min(left, loan.fee_owed_minor)
        left -= fee
        principal = 0 if kind == "waive_fee" else min(left, loan.principal_owed_minor)
        left -= principal
        if fee or principal:
            parts.append(Waived(loan.loan_id, fee, principal, fee + principal == loan.owed_minor))
    assert left == 0, "the spread must use the whole amount"
    return tuple(parts)
