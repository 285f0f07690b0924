"""The journal scheme: which accounts each money event moves, and by how much.

Debits positive, credits negative; every entry sums to zero (docs/ledger.md "Journal
scheme"). Every ledger adapter posts these lines as they are, so the scheme is written
once. Pure data: no IO.
"""

from __future__ import annotations

from typing import Final

ACCOUNTS: Final = (
    "principal_receivable",
    "fee_receivable",
    "disbursed_float",
    "fee_income",
    "recovered_cash",
    "written_off",
)
DEBT_ACCOUNTS: Final = ("principal_receivable", "fee_receivable")  # a subscriber's debt

Lines = list[tuple[str, int]]


def disbursement(principal_minor: int, fee_minor: int) -> Lines:
    """A loan credited (or an advance booked): the subscriber owes principal and fee."""
    return [
        ("principal_receivable", principal_minor),
        ("disbursed_float", -principal_minor),
        ("fee_receivable", fee_minor),
        ("fee_income", -fee_minor),
    ]


def reversal(principal_minor: int, fee_minor: int) -> Lines:
    """An advance the IN refused at confirmation: its disbursement taken back."""
    return [(account, -amount) for account, amount in disbursement(principal_minor, fee_minor)]


def recovery(fee_minor: int, principal_minor: int) -> Lines:
    """What a recharge paid back on one loan."""
    return [
        ("recovered_cash", fee_minor + principal_minor),
        ("fee_receivable", -fee_minor),
        ("principal_receivable", -principal_minor),
    ]


def write_off(fee_minor: int, principal_minor: int) -> Lines:
    """What was left of an aged loan, written off."""
    return [
        ("written_off", fee_minor + principal_minor),
        ("fee_receivable", -fee_minor),
        ("principal_receivable", -principal_minor),
    ]
