"""Consumer protection in the use cases: the loan times the cap and the cooling-off
read, the consent audit trail, and the requests that wait for the subscriber's YES
(an SMS loan's confirmation, the double opt-in to automatic advances).

Every hook runs inside the caller's unit of work. With the default policy (no
`[protection]` preset) none of them reads or writes anything: the node lends as
before. The rules themselves are `core.protection`.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from extrabalance.core.model import SubscriberState
from extrabalance.core.policy import Policy
from extrabalance.core.protection import fee_percent
from extrabalance.service.unit_of_work import LedgerTx

WHO_SUBSCRIBER = "subscriber"
WHO_NODE = "node"

# Audit actions of the consent trail (`extrabalance consent export`). The first group
# waits for the subscriber's YES; the rest are what he agreed to, declined, or what
# the node refused him.
LOAN_CONFIRM_REQUESTED = "loan_confirm_requested"
AUTO_ADVANCE_REQUESTED = "auto_advance_requested"
REQUEST_ACTIONS = (LOAN_CONFIRM_REQUESTED, AUTO_ADVANCE_REQUESTED)
LOAN_CONSENT = "loan_consent"  # he confirmed the figures shown; the loan was asked for
LOAN_DECLINED = "loan_declined"  # he cancelled on the confirm screen
LOAN_REFUSED = "loan_refused"  # the node refused his request (reason)
AUTO_ADVANCE_ON = "auto_advance_on"
AUTO_ADVANCE_OFF = "auto_advance_off"
ADS_OPT_OUT = "ads_opt_out"
ADS_OPT_IN = "ads_opt_in"
CONFIRM_UNMATCHED = "confirm_unmatched"  # a YES with nothing waiting for it
CONSENT_ACTIONS = (*REQUEST_ACTIONS, LOAN_CONSENT, LOAN_DECLINED, LOAN_REFUSED, AUTO_ADVANCE_ON,
                   AUTO_ADVANCE_OFF, ADS_OPT_OUT, ADS_OPT_IN, CONFIRM_UNMATCHED)



def with_loan_times(
    tx: LedgerTx, state: SubscriberState, policy: Policy, now: datetime
) -> SubscriberState:
    """The state the decision reads: his recent loan times when a cap or a
    cooling-off is configured (one indexed read), else unchanged."""
    protection = policy.protection
    if not protection.counts_loans:
        return state
    return replace(state, loan_times=tx.loan_times(state.msisdn, now - protection.lookback))


def audit_consent(
    tx: LedgerTx, policy: Policy, msisdn: str, action: str, channel: str, now: datetime,
    detail: dict[str, Any] | None = None, *, who: str = WHO_SUBSCRIBER, why: str = "",
) -> None:
    """One line of the consent trail (only when the policy keeps one)."""
    if not policy.protection.keeps_trail:
        return
    tx.audit(msisdn, action, who, why or channel, now, {"channel": channel, **(detail or {})})


def figures(amount_minor: int, fee_minor: int) -> dict[str, Any]:
    """The figures a confirmation shows, as recorded with the consent."""
    return {"amount_minor": amount_minor, "fee_minor": fee_minor,
            "fee_percent": fee_percent(fee_minor, amount_minor),
            "total_minor": amount_minor + fee_minor}


def pending_request(tx: LedgerTx, msisdn: str, policy: Policy, now: datetime) -> Any:
    """The request his YES answers: the newest line of his consent trail, when it is
    a request younger than `confirm_ttl_s`; else None."""
    trail = tx.audit_trail(msisdn, CONSENT_ACTIONS, 1)
    if not trail:
        return None
    newest = trail[-1]
    if newest.action not in REQUEST_ACTIONS:
        return None
    if now - newest.created_at > timedelta(seconds=policy.protection.confirm_ttl_s):
        return None
    return newest


def consent_rows(tx: LedgerTx, msisdn: str) -> list[dict[str, Any]]:
    """His consent trail for an export, oldest first."""
    return [
        {"at": row.created_at.isoformat(), "msisdn": msisdn, "action": row.action,
         "channel": row.detail.get("channel", ""), "who": row.who, "why": row.why,
         "detail": row.detail}
        for row in tx.audit_trail(msisdn, CONSENT_ACTIONS)
    ]
