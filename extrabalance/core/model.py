"""Plain data the domain rules read: a subscriber's profile, his open loans and the
state the ledger derives for him. No IO; the ledger builds these, `core` reads them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

AttributeValue = str | int


@dataclass(frozen=True, slots=True)
class SubscriberProfile:
    """What the operator's daily CSV says about a subscriber."""

    msisdn: str
    tenure_days: int
    arpu_minor: int
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OpenLoan:
    """A loan that still owes something (ACTIVE or PARTIALLY_REPAID)."""

    loan_id: str
    tier_id: int
    principal_minor: int
    fee_minor: int
    principal_repaid_minor: int
    fee_repaid_minor: int
    created_at: datetime

    @property
    def principal_owed_minor(self) -> int:
        return self.principal_minor - self.principal_repaid_minor

    @property
    def fee_owed_minor(self) -> int:
        return self.fee_minor - self.fee_repaid_minor

    @property
    def owed_minor(self) -> int:
        return self.principal_owed_minor + self.fee_owed_minor


@dataclass(frozen=True, slots=True)
class SubscriberState:
    """Everything `decide` needs about one subscriber at one moment."""

    msisdn: str
    profile: SubscriberProfile | None
    open_loans: tuple[OpenLoan, ...] = ()
    loans_since_full_payback: int = 0
    barred_manual: bool = False
    barred_reason: str | None = None
    operation_pending: bool = False
    auto_advance_opt_in: bool = False
    ads_opt_out: bool = False
    language: str = "en"
    balance_minor: int | None = None  # main balance when known (e.g. from the IN)
    # His limit from behaviour (core/limits.py) when that policy is on; the decision
    # lends up to min(segment ceiling, limit_minor).
    limit_minor: int | None = None
    # Times of his loans (not failed) within the protection rules' look-back, when a
    # cap or a cooling-off pause is configured (core/protection.py); else empty.
    loan_times: tuple[datetime, ...] = ()

    @property
    def debt_minor(self) -> int:
        return sum(loan.owed_minor for loan in self.open_loans)
