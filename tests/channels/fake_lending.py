"""An in-memory lending service with the real decision rules, for channel tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from extrabalance.core.lending import BorrowRequest, Granted, decide, offer
from extrabalance.core.model import OpenLoan, SubscriberProfile, SubscriberState
from extrabalance.core.policy import Policy


@dataclass
class Outcome:
    status: str
    reason: Any
    loan_id: int | None
    tier_id: int | None
    amount_minor: int
    fee_minor: int
    debt_minor: int
    replayed: bool = False


@dataclass
class FakeLending:
    policy: Policy
    states: dict[str, SubscriberState] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    borrow_calls: int = 0
    pending: bool = False  # answer PENDING (the IN timed out)
    reads: int = 0  # quotes and overviews asked for (each is a ledger read in the node)
    refusals: list[tuple[str, str, str]] = field(default_factory=list)  # record_refusal
    consents: list[tuple[str, str, str]] = field(default_factory=list)  # record_consent

    def add(self, msisdn: str, tenure_days: int, arpu_minor: int, **state: Any) -> None:
        self.states[msisdn] = SubscriberState(
            msisdn, SubscriberProfile(msisdn, tenure_days, arpu_minor, {}), **state
        )

    def _state(self, msisdn: str) -> SubscriberState:
        return self.states.setdefault(msisdn, SubscriberState(msisdn, None))

    async def quote(self, msisdn: str) -> Any:
        self.reads += 1
        return offer(self._state(msisdn), self.policy, datetime.now(UTC))

    async def status(self, msisdn: str) -> SubscriberState:
        return self._state(msisdn)

    async def overview(self, msisdn: str) -> tuple[SubscriberState, Any]:
        self.reads += 1
        return self._state(msisdn), offer(self._state(msisdn), self.policy, datetime.now(UTC))

    def record_refusal(self, msisdn: str, reason: str, channel: str) -> None:
        self.refusals.append((msisdn, reason, channel))

    async def record_consent(self, msisdn: str, action: str, channel: str,
                             detail: dict[str, Any] | None = None) -> None:
        self.consents.append((msisdn, action, channel))

    async def sms_loan(self, msisdn: str, tier_id: int | None, key: str, *,
                       kind: str = "money") -> Outcome:
        return await self.borrow(msisdn, tier_id, "sms", key, kind=kind)

    async def confirm_by_reply(self, msisdn: str) -> str | None:
        return "nothing_to_confirm"

    async def set_preferences(self, msisdn: str, **changes: Any) -> None:
        mapping = {"auto_advance": "auto_advance_opt_in", "ads_opt_out": "ads_opt_out",
                   "language": "language"}
        fields = {mapping[k]: v for k, v in changes.items() if v is not None}
        self.states[msisdn] = dataclasses.replace(self._state(msisdn), **fields)

    async def borrow(self, msisdn: str, tier_id: int | None, channel: str, idempotency_key: str,
                     *, answer_early: bool = False, kind: str = "money") -> Outcome:
        if idempotency_key in self.outcomes:
            return dataclasses.replace(self.outcomes[idempotency_key], replayed=True)
        self.borrow_calls += 1
        state = self._state(msisdn)
        decision = decide(BorrowRequest(msisdn, tier_id, channel, kind), state, self.policy,  # type: ignore[arg-type]
                          datetime.now(UTC))
        if not isinstance(decision, Granted):
            result = Outcome("REFUSED", decision.reason, None, tier_id, 0, 0, state.debt_minor)
        elif self.pending:
            result = Outcome("PENDING", None, None, decision.tier.tier_id, decision.amount_minor,
                             decision.fee_minor, state.debt_minor)
        else:
            loan = OpenLoan(str(len(state.open_loans) + 1), decision.tier.tier_id, decision.amount_minor,
                            decision.fee_minor, 0, 0, datetime.now(UTC))
            state = dataclasses.replace(state, open_loans=state.open_loans + (loan,),
                                        loans_since_full_payback=state.loans_since_full_payback + 1)
            self.states[msisdn] = state
            result = Outcome("GRANTED", None, loan.loan_id, decision.tier.tier_id,
                             decision.amount_minor, decision.fee_minor, state.debt_minor)
        self.outcomes[idempotency_key] = result
        return result
