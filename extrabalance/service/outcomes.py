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


class AdvanceDecision(str, Enum):
    """What the lending service decided about an out-of-balance request. Neutral: the
    Gy adapter (`adapters/gy_server.py`) says it in Result-Codes, from
    `diameter/constants.py`."""

    ADVANCED = "ADVANCED"  # an advance granted: the answer carries it (2001 + GSU)
    ACKNOWLEDGED = "ACKNOWLEDGED"  # a session's end taken note of, nothing granted (2001)
    NO_ADVANCE = "NO_ADVANCE"  # the rules (or the IN's confirmation) refuse one (4012)
    DENIED = "DENIED"  # the subscriber is barred (4010)
    UNKNOWN_SUBSCRIBER = "UNKNOWN_SUBSCRIBER"  # not ours to lend to (5030)
    UNKNOWN_SESSION = "UNKNOWN_SESSION"  # an UPDATE/TERMINATION of no session of ours (5002)
    # Not an answer the IN gets from the business rules: the node was too late to
    # answer within the IN's patience, so it booked nothing (3004 TOO_BUSY).
    TOO_LATE = "TOO_LATE"


@dataclass(frozen=True, slots=True)
class AdvanceOutcome:
    decision: AdvanceDecision
    granted_minor: int | None = None  # the advance when ADVANCED
    reason: Reason | None = None
    loan_id: str | None = None
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": self.decision.value,
            "granted_minor": self.granted_minor,
            "reason": self.reason.value if self.reason else None,
            "loan_id": self.loan_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, replayed: bool) -> AdvanceOutcome:
        """An outcome as kept for a request key; rows written before decisions were
        kept hold the Result-Code that was answered instead."""
        if "decision" in data:
            decision = AdvanceDecision(data["decision"])
        else:
            decision = _decision_of_stored_code(int(data["result_code"]), data.get("granted_minor"))
        return cls(
            decision,
            data.get("granted_minor"),
            Reason(data["reason"]) if data.get("reason") else None,
            data.get("loan_id"),
            replayed,
        )


def _decision_of_stored_code(result_code: int, granted_minor: int | None) -> AdvanceDecision:
    """The decision an older idempotency row's Result-Code stood for."""
    from extrabalance.diameter import constants as rc

    if result_code == rc.DIAMETER_SUCCESS:
        return AdvanceDecision.ADVANCED if granted_minor else AdvanceDecision.ACKNOWLEDGED
    stored = {
        rc.DIAMETER_CREDIT_LIMIT_REACHED: AdvanceDecision.NO_ADVANCE,
        rc.DIAMETER_END_USER_SERVICE_DENIED: AdvanceDecision.DENIED,
        rc.DIAMETER_USER_UNKNOWN: AdvanceDecision.UNKNOWN_SUBSCRIBER,
        rc.DIAMETER_UNKNOWN_SESSION_ID: AdvanceDecision.UNKNOWN_SESSION,
        rc.DIAMETER_TOO_BUSY: AdvanceDecision.TOO_LATE,
    }
    decision = stored.get(result_code)
    if decision is None:
        raise ValueError(f"a kept out-of-balance answer with Result-Code {result_code}")
    return decision


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
