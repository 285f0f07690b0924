"""Eligibility and the loan decision: `decide` says yes (with the tier, amount and fee)
or no (with a `Reason`), and `offer` lays out the menu a subscriber may choose from.

Pure functions over `SubscriberState` and `Policy`; the service layer loads the state
from the ledger, calls these, and carries out the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from extrabalance.core.fees import fee_for
from extrabalance.core.model import SubscriberState
from extrabalance.core.policy import MONEY, Bundle, Policy, Segment, Tier
from extrabalance.core.protection import frequency_refusal
from extrabalance.core.reasons import Reason
from extrabalance.core.segments import match_segment

Channel = Literal["ussd", "sms", "auto"]


@dataclass(frozen=True, slots=True)
class BorrowRequest:
    msisdn: str
    tier_id: int | None  # None: the largest allowed tier that fits under the ceiling
    channel: Channel
    # With tier_id None: the kind of tier to pick from ("money", or a bundle kind such
    # as "data" for the SMS keyword DATA). A bundle is never picked for plain LOAN.
    kind: str = MONEY


@dataclass(frozen=True, slots=True)
class Granted:
    segment: Segment
    tier: Tier
    amount_minor: int
    fee_minor: int


@dataclass(frozen=True, slots=True)
class Refused:
    reason: Reason
    detail: str


Decision = Granted | Refused


@dataclass(frozen=True, slots=True)
class OfferTier:
    tier_id: int
    amount_minor: int
    fee_minor: int
    total_minor: int
    fits: bool  # debt + total stays within the ceiling
    bundle: Bundle | None = None  # a bundle tier: what it credits (amount is its price)


@dataclass(frozen=True, slots=True)
class Offer:
    eligible: bool
    reason: Reason | None
    segment_name: str | None
    tiers: tuple[OfferTier, ...]
    debt_minor: int
    headroom_minor: int  # ceiling - debt, never negative


def _fee(tier: Tier, segment: Segment, policy: Policy) -> int:
    return fee_for(tier, policy.fee_plans[segment.fee_plan])


def ceiling_of(segment: Segment, state: SubscriberState) -> int:
    """The most he may owe: the segment ceiling, or his limit from behaviour if lower."""
    if state.limit_minor is None:
        return segment.ceiling_minor
    return min(segment.ceiling_minor, state.limit_minor)


def _allowed_tiers(segment: Segment, policy: Policy, kind: str | None = None) -> list[Tier]:
    """The segment's tiers that exist in the policy (of `kind` when given), smallest
    amount first."""
    tiers = [policy.tiers[t] for t in segment.tier_ids
             if t in policy.tiers and (kind is None or policy.tiers[t].kind == kind)]
    return sorted(tiers, key=lambda t: (t.amount_minor, t.tier_id))


def _gate(
    state: SubscriberState, policy: Policy, channel: Channel, now: datetime
) -> tuple[Segment | None, Refused | None]:
    """The checks that do not depend on the tier, in the documented order."""
    segment = match_segment(state.profile, policy.segments)
    if state.barred_manual:
        return segment, Refused(Reason.BARRED_MANUAL, state.barred_reason or "barred by operator")
    if segment is not None and state.loans_since_full_payback >= segment.bad_debt_limit:
        return segment, Refused(
            Reason.BARRED_BAD_DEBT,
            f"{state.loans_since_full_payback} loans without a full payback "
            f"(limit {segment.bad_debt_limit})",
        )
    if state.operation_pending:
        return segment, Refused(Reason.OPERATION_PENDING, "an earlier operation is settling")
    if channel == "auto" and not state.auto_advance_opt_in:
        return segment, Refused(Reason.NOT_OPTED_IN, "auto-advance needs opt-in")
    if segment is None:
        return None, Refused(Reason.NO_SEGMENT, "no segment matches the profile")
    tenure_days = state.profile.tenure_days if state.profile else 0
    if tenure_days < policy.eligibility.min_tenure_days:
        return segment, Refused(
            Reason.TENURE_TOO_SHORT,
            f"tenure {tenure_days} d < {policy.eligibility.min_tenure_days} d",
        )
    if policy.protection.counts_loans:
        frequent = frequency_refusal(state.loan_times, now, policy.protection)
        if frequent is not None:
            return segment, Refused(
                frequent.reason, f"{frequent.detail}; again from {frequent.until.isoformat()}")
    limit = policy.eligibility.max_balance_to_borrow_minor
    if limit is not None and state.balance_minor is not None and state.balance_minor > limit:
        return segment, Refused(Reason.BALANCE_TOO_HIGH, f"balance {state.balance_minor} > {limit}")
    return segment, None


def decide(
    request: BorrowRequest, state: SubscriberState, policy: Policy, now: datetime
) -> Decision:
    """Grant or refuse one loan. Never grants past the segment ceiling. `now` is read
    by the consumer-protection rules (the cap per rolling window, the cooling-off)."""
    segment, refused = _gate(state, policy, request.channel, now)
    if refused is not None:
        return refused
    assert segment is not None
    debt_minor = state.debt_minor
    ceiling_minor = ceiling_of(segment, state)
    tier_id = request.tier_id
    if tier_id is None and request.channel == "auto":
        tier_id = policy.auto_advance_tier_id
    if tier_id is None:
        # The largest allowed tier whose amount + fee still fits under the ceiling.
        kind = MONEY if request.channel == "auto" else request.kind
        for tier in reversed(_allowed_tiers(segment, policy, kind)):
            fee_minor = _fee(tier, segment, policy)
            if debt_minor + tier.amount_minor + fee_minor <= ceiling_minor:
                return Granted(segment, tier, tier.amount_minor, fee_minor)
        return Refused(
            Reason.CEILING_REACHED,
            f"no tier fits: debt {debt_minor}, ceiling {ceiling_minor}",
        )
    tier_or_none = policy.tiers.get(tier_id)
    if tier_or_none is None:
        return Refused(Reason.UNKNOWN_TIER, f"tier {tier_id} does not exist")
    tier = tier_or_none
    if tier_id not in segment.tier_ids:
        return Refused(Reason.TIER_NOT_ALLOWED, f"tier {tier_id} not offered to {segment.name}")
    fee_minor = _fee(tier, segment, policy)
    if debt_minor + tier.amount_minor + fee_minor > ceiling_minor:
        return Refused(
            Reason.CEILING_REACHED,
            f"debt {debt_minor} + {tier.amount_minor} + fee {fee_minor} "
            f"> ceiling {ceiling_minor}",
        )
    return Granted(segment, tier, tier.amount_minor, fee_minor)


def offer(state: SubscriberState, policy: Policy, now: datetime) -> Offer:
    """The menu: every tier of the subscriber's segment, marked whether it fits."""
    debt_minor = state.debt_minor
    segment, refused = _gate(state, policy, "ussd", now)
    if segment is None:
        return Offer(
            False, refused.reason if refused else Reason.NO_SEGMENT, None, (), debt_minor, 0
        )
    headroom_minor = max(ceiling_of(segment, state) - debt_minor, 0)
    tiers = []
    for tier in _allowed_tiers(segment, policy):
        fee_minor = _fee(tier, segment, policy)
        total_minor = tier.amount_minor + fee_minor
        tiers.append(
            OfferTier(
                tier.tier_id,
                tier.amount_minor,
                fee_minor,
                total_minor,
                total_minor <= headroom_minor,
                tier.bundle,
            )
        )
    reason: Reason | None = refused.reason if refused else None
    if reason is None and not any(t.fits for t in tiers):
        reason = Reason.CEILING_REACHED
    return Offer(reason is None, reason, segment.name, tuple(tiers), debt_minor, headroom_minor)
