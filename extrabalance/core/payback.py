"""Payback allocation and debt ageing.

`allocate_payback` splits what may be taken from a recharge across the open loans:
oldest loan first, and inside a loan fee then principal (or the reverse, per policy).
It never takes more than is owed, more than `share_bp` of what is available, or so much
that the subscriber is left below `min_balance_left_minor`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from extrabalance.core.model import OpenLoan
from extrabalance.core.policy import PaybackOrder, RecoveryPolicy

BP_PER_UNIT = 10_000


@dataclass(frozen=True, slots=True)
class RecoveryPart:
    loan_id: str
    fee_minor: int
    principal_minor: int

    @property
    def total_minor(self) -> int:
        return self.fee_minor + self.principal_minor


@dataclass(frozen=True, slots=True)
class Recovery:
    total_minor: int
    parts: tuple[RecoveryPart, ...]
    clears_all: bool  # after this recovery nothing is owed


@dataclass(frozen=True, slots=True)
class Ageing:
    overdue: frozenset[str]  # loan ids past overdue_days, not yet to write off
    to_write_off: frozenset[str]  # loan ids past write_off_days


def oldest_first(open_loans: Sequence[OpenLoan]) -> list[OpenLoan]:
    return sorted(open_loans, key=lambda loan: (loan.created_at, loan.loan_id))


def recoverable_minor(
    open_loans: Sequence[OpenLoan], available_minor: int, policy: RecoveryPolicy
) -> int:
    """How much of `available_minor` may go to debt under the policy."""
    if available_minor <= 0:
        return 0
    by_share = available_minor * policy.share_bp // BP_PER_UNIT
    by_floor = available_minor - policy.min_balance_left_minor
    owed = sum(loan.owed_minor for loan in open_loans)
    return max(0, min(by_share, by_floor, owed))


def allocate_payback(
    open_loans: Sequence[OpenLoan], available_minor: int, policy: RecoveryPolicy
) -> Recovery:
    """Split the recoverable amount across loans, oldest first."""
    owed_total = sum(loan.owed_minor for loan in open_loans)
    budget = recoverable_minor(open_loans, available_minor, policy)
    return split(open_loans, budget, policy, owed_total)


def split(
    open_loans: Sequence[OpenLoan],
    budget_minor: int,
    policy: RecoveryPolicy,
    owed_total_minor: int | None = None,
) -> Recovery:
    """Allocate exactly `min(budget, owed)` across loans, oldest first."""
    if owed_total_minor is None:
        owed_total_minor = sum(loan.owed_minor for loan in open_loans)
    left = max(0, min(budget_minor, owed_total_minor))
    total = left
    parts: list[RecoveryPart] = []
    for loan in oldest_first(open_loans):
        if left == 0:
            break
        if policy.order is PaybackOrder.FEE_FIRST:
            fee = min(left, loan.fee_owed_minor)
            principal = min(left - fee, loan.principal_owed_minor)
        else:
            principal = min(left, loan.principal_owed_minor)
            fee = min(left - principal, loan.fee_owed_minor)
        if fee or principal:
            parts.append(RecoveryPart(loan.loan_id, fee, principal))
            left -= fee + principal
    assert left == 0, "budget was clamped to what is owed"
    return Recovery(total, tuple(parts), clears_all=(total == owed_total_minor))


def ageing(open_loans: Sequence[OpenLoan], now: datetime, policy: RecoveryPolicy) -> Ageing:
    """Which open loans are overdue and which are old enough to write off."""
    overdue: set[str] = set()
    write_off: set[str] = set()
    for loan in open_loans:
        if loan.owed_minor <= 0:
            continue
        age = now - loan.created_at
        if age >= timedelta(days=policy.write_off_days):
            write_off.add(loan.loan_id)
        elif age >= timedelta(days=policy.overdue_days):
            overdue.add(loan.loan_id)
    return Ageing(frozenset(overdue), frozenset(write_off))
