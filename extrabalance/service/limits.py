"""Limits from behaviour in the use cases: the hooks the borrow, recharge and payback
units of work call, each inside the caller's unit (so the limit state moves in the
same commit as the money it follows). The rule itself is `core.limits`; with
`policy.limits` unset (the default) every hook does nothing and reads nothing.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from extrabalance.core import limits as core_limits
from extrabalance.core.limits import Limit
from extrabalance.core.model import OpenLoan, SubscriberState
from extrabalance.core.policy import Policy
from extrabalance.core.segments import match_segment
from extrabalance.service.unit_of_work import LedgerTx


def current_limit(tx: LedgerTx, state: SubscriberState, policy: Policy, now: datetime
                  ) -> Limit | None:
    """His limit now, or None when the policy is off or no segment takes him."""
    if policy.limits is None:
        return None
    segment = match_segment(state.profile, policy.segments)
    if segment is None:
        return None
    arpu_minor = state.profile.arpu_minor if state.profile else 0
    return core_limits.limit_for(
        tx.limit_state(state.msisdn), segment.ceiling_minor, arpu_minor, now, policy.limits
    )


def with_limit(
    tx: LedgerTx, state: SubscriberState, policy: Policy, now: datetime
) -> tuple[SubscriberState, Limit | None]:
    """The state the decision reads: `limit_minor` set when the policy is on."""
    limit = current_limit(tx, state, policy, now)
    if limit is None:
        return state, None
    return replace(state, limit_minor=limit.limit_minor), limit


def note_recharge(
    tx: LedgerTx, msisdn: str, amount_minor: int, policy: Policy, now: datetime
) -> None:
    """Add a recharge to his history (once per recharge event: the caller's unit is
    idempotent by the event id)."""
    if policy.limits is None or amount_minor <= 0:
        return
    state = tx.limit_state(msisdn)
    tx.put_limit_state(
        msisdn, core_limits.on_recharge(state, amount_minor, now, policy.limits), now
    )


def note_payback(
    tx: LedgerTx,
    msisdn: str,
    loans_before: tuple[OpenLoan, ...],
    debt_left_minor: int,
    policy: Policy,
    now: datetime,
) -> None:
    """Move his payback record: full or partial, on time or late (by the oldest loan
    the payback went to: recoveries repay the oldest loan first)."""
    if policy.limits is None or not loans_before:
        return
    oldest_at = min(loan.created_at for loan in loans_before)
    state = core_limits.on_payback(
        tx.limit_state(msisdn),
        full=debt_left_minor == 0,
        on_time=core_limits.payback_on_time(oldest_at, now, policy.limits),
        policy=policy.limits,
    )
    tx.put_limit_state(msisdn, state, now)


def limit_edr(limit: Limit | None) -> dict[str, object]:
    """The limit's fields in a loan or refusal EDR (none when the policy is off)."""
    if limit is None:
        return {}
    return {"limit_minor": limit.limit_minor, "limit_reason": limit.reason.value}


def limit_view(tx: LedgerTx, msisdn: str, policy: Policy, now: datetime) -> dict[str, object] | None:
    """His limit, its reason and its inputs for the admin view (None when off)."""
    if policy.limits is None:
        return None
    loaded = tx.load_subscriber(msisdn)
    limit = current_limit(tx, loaded.state, policy, now)
    if limit is None:
        return None
    kept = tx.limit_state(msisdn)
    return {
        "limit_minor": limit.limit_minor,
        "reason": limit.reason.value,
        "why": core_limits.describe(limit),
        "recharged_minor": limit.recharged_minor,
        "window_days": policy.limits.window_days,
        "base_minor": limit.base_minor,
        "adjust_bp": limit.adjust_bp,
        "on_time_paybacks": kept.on_time_paybacks,
        "late_paybacks": kept.late_paybacks,
        "partial_paybacks": kept.partial_paybacks,
    }
