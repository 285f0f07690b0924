"""What the use cases answer. Adapters turn these into USSD screens, SMS and CCAs."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from extrabalance.core.limits import Limit
from extrabalance.core.model import OpenLoan
from extrabalance.core.reasons import Reason


class BorrowStatus(str, Enum):
    GRANTED = "GRANTED"
    REFUSED = "REFUSED"
    PENDING = "PENDING"  # the IN's answer was lost; the resolver settles it


@dataclass(frozen=True, slots=True)
class BorrowOutcome:
    status: BorrowStatus
    reason: Reason | None = None
    loan_id: str | None = None
    tier_id: int | None = None
    amount_minor: int = 0
    fee_minor: int = 0
    debt_minor: int = 0  # after this loan
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        # Spelled out rather than dataclasses.asdict: this runs for every loan.
        return {
            "status": self.status.value,
            "reason": self.reason.value if self.reason else None,
            "loan_id": self.loan_id,
            "tier_id": self.tier_id,
            "amount_minor": self.amount_minor,
            "fee_minor": self.fee_minor,
            "debt_minor": self.debt_minor,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, replayed: bool) -> BorrowOutcome:
        return cls(
            status=BorrowStatus(data["status"]),
            reason=Reason(data["reason"]) if data.get("reason") else None,
            loan_id=data.get("loan_id"),
            tier_id=data.get("tier_id"),
            amount_minor=data.get("amount_minor", 0),
            fee_minor=data.get("fee_minor", 0),
            debt_minor=data.get("debt_minor", 0),
            replayed=replayed,
        )


# Diameter Result-Codes the out-of-balance answer may carry.
DIAMETER_SUCCESS = 2001
# Not an answer the IN gets from the business rules: the node was too late to answer
# an advance within the IN's patience, so it books nothing and says so (RFC 6733 3004).
DIAMETER_TOO_BUSY = 3004
DIAMETER_END_USER_SERVICE_DENIED = 4010
DIAMETER_CREDIT_LIMIT_REACHED = 4012
DIAMETER_USER_UNKNOWN = 5030
DIAMETER_UNKNOWN_SESSION_ID = 5002  # RFC 6733 §7.1.5: UPDATE/TERMINATION of no session of ours


@dataclass(frozen=True, slots=True)
class AdvanceOutcome:
    result_code: int  # 2001 | 4010 | 4012 | 5030
    granted_minor: int | None = None  # Granted-Service-Unit when 2001 with an advance
    reason: Reason | None = None
    loan_id: str | None = None
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "result_code": self.result_code,
            "granted_minor": self.granted_minor,
            "reason": self.reason.value if self.reason else None,
            "loan_id": self.loan_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, replayed: bool) -> AdvanceOutcome:
        return cls(
            data["result_code"],
            data.get("granted_minor"),
            Reason(data["reason"]) if data.get("reason") else None,
            data.get("loan_id"),
            replayed,
        )


class PaybackStatus(str, Enum):
    NOTHING_OWED = "NOTHING_OWED"
    NOTHING_RECOVERABLE = "NOTHING_RECOVERABLE"  # policy leaves nothing to take
    RECOVERED = "RECOVERED"  # full or partial, see debt_minor
    NOT_RECOVERED = "NOT_RECOVERED"  # the IN refused every attempt; next recharge
    DEFERRED = "DEFERRED"  # an earlier recovery is still settling; next recharge
    PENDING = "PENDING"  # the IN's answer was lost; the resolver settles it


@dataclass(frozen=True, slots=True)
class PaybackOutcome:
    status: PaybackStatus
    recovered_minor: int = 0
    debt_minor: int = 0  # left after this recovery
    recovery_id: str | None = None
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "recovered_minor": self.recovered_minor,
            "debt_minor": self.debt_minor,
            "recovery_id": self.recovery_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, replayed: bool) -> PaybackOutcome:
        return cls(
            PaybackStatus(data["status"]),
            data["recovered_minor"],
            data["debt_minor"],
            data.get("recovery_id"),
            replayed,
        )


@dataclass(frozen=True, slots=True)
class SubscriberStatus:
    msisdn: str
    known: bool
    debt_minor: int
    open_loans: tuple[OpenLoan, ...]
    operation_pending: bool
    barred: bool
    barred_reason: Reason | None
    auto_advance_opt_in: bool
    ads_opt_out: bool
    language: str
    in_node: str | None
    limit: Limit | None = None  # his limit from behaviour, when that policy is on
