"""Consumer protection: the rules a jurisdiction's preset turns on (docs/lending.md
"Consumer protection").

Pure data and pure checks: the fee as a share of the amount (shown beside the fee
before every confirmation), the cap on loans per rolling window and the cooling-off
pause after repeated borrowing. The service layer reads the subscriber's recent loan
times from the ledger and calls `frequency_refusal`; the channels render
`fee_percent`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from typing import Any

from extrabalance.core.reasons import Reason

BP_PER_UNIT = 10_000


@dataclass(frozen=True, slots=True)
class ProtectionPolicy:
    """What `[protection]` resolves to (the preset's values, overridden key by key).

    The default is the node's behaviour without the section: nothing asked twice, no
    cap, no pause, the payback SMS on, nothing extra written."""

    preset: str = "none"
    # Every confirmation (USSD confirm screen, SMS confirm prompt) must show the fee
    # as an amount and as a percentage of the amount: the config is refused when a
    # `confirm` or `loan_confirm_sms` template of a language lacks {fee} or {fee_percent}.
    fee_percent_required: bool = False
    # An SMS `LOAN` is answered with the figures and lends only on the reply `YES`.
    sms_confirm: bool = False
    confirm_ttl_s: int = 600  # a confirmation or opt-in request waits this long for YES
    recovery_sms: bool = True  # an SMS at each recovery naming what was deducted
    loans_per_window_max: int = 0  # loans in `window_hours` at most (0: no cap)
    window_hours: int = 720
    cooling_off_after: int = 0  # this many loans within cooling_off_window_hours ... (0: off)
    cooling_off_window_hours: int = 24
    cooling_off_hours: int = 24  # ... pause borrowing this long after the last of them
    double_opt_in: bool = False  # auto-advance turned on only by the subscriber's YES reply
    bulk_opt_in: bool = True  # opt-in by the profiles CSV or the admin API allowed
    consent_audit: bool = False  # every consent and refusal written to the audit trail

    @property
    def lookback(self) -> timedelta:
        """How far back the frequency rules look at his loans."""
        hours = 0
        if self.loans_per_window_max:
            hours = self.window_hours
        if self.cooling_off_after:
            hours = max(hours, self.cooling_off_window_hours + self.cooling_off_hours)
        return timedelta(hours=hours)

    @property
    def keeps_trail(self) -> bool:
        """Consent lines are written: asked for, or needed to match a YES to its request."""
        return self.consent_audit or self.sms_confirm or self.double_opt_in

    @property
    def counts_loans(self) -> bool:
        return bool(self.loans_per_window_max or self.cooling_off_after)


# Jurisdiction presets. The rules each one turns on follow the public texts cited in
# docs/lending.md; the numbers (caps, pauses, the confirmation window) are this
# project's conservative choices, not figures from those texts, and an operator sets
# the ones his regulator or his own policy asks for.
PRESETS: Mapping[str, Mapping[str, Any]] = {
    "none": {},
    "eg-ntra": {
        "fee_percent_required": True,
        "sms_confirm": True,
        "recovery_sms": True,
        "loans_per_window_max": 10,
        "window_hours": 720,
        "cooling_off_after": 3,
        "cooling_off_window_hours": 24,
        "cooling_off_hours": 24,
        "double_opt_in": True,
        "bulk_opt_in": False,
        "consent_audit": True,
    },
    "ng-fccpc": {
        "fee_percent_required": True,
        "sms_confirm": True,
        "recovery_sms": True,
        "loans_per_window_max": 8,
        "window_hours": 720,
        "cooling_off_after": 3,
        "cooling_off_window_hours": 24,
        "cooling_off_hours": 48,
        "double_opt_in": True,
        "bulk_opt_in": False,
        "consent_audit": True,
    },
}


def resolve(preset: str, overrides: Mapping[str, Any]) -> ProtectionPolicy:
    """The preset's values with `overrides` (keys of `ProtectionPolicy`) on top."""
    if preset not in PRESETS:
        raise ValueError(f"protection.preset: unknown preset {preset!r} "
                         f"(one of {', '.join(sorted(PRESETS))})")
    known = {f.name for f in fields(ProtectionPolicy)} - {"preset"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"protection: unknown keys {unknown}")
    return replace(ProtectionPolicy(preset=preset), **{**PRESETS[preset], **overrides})


def fee_percent(fee_minor: int, amount_minor: int) -> str:
    """The fee as a share of the amount, for the screen: `10%`, `12.5%`, `6.67%`
    (rounded half up to at most two decimals, trailing zeros dropped)."""
    if amount_minor <= 0:
        return "0%"
    # hundredths of a percent = basis points, rounded half up in integers
    bp = (2 * fee_minor * BP_PER_UNIT + amount_minor) // (2 * amount_minor)
    whole, frac = divmod(bp, 100)
    text = f"{whole}.{frac:02d}".rstrip("0").rstrip(".")
    return f"{text}%"


@dataclass(frozen=True, slots=True)
class FrequencyRefusal:
    reason: Reason
    detail: str
    until: datetime  # when he may borrow again (as far as this rule goes)


def frequency_refusal(
    loan_times: Sequence[datetime], now: datetime, policy: ProtectionPolicy
) -> FrequencyRefusal | None:
    """The cap per rolling window, then the cooling-off pause, over the times of his
    loans (every loan not failed, all channels). None: neither rule stops him."""
    times = sorted(loan_times)
    cap = policy.loans_per_window_max
    if cap:
        since = now - timedelta(hours=policy.window_hours)
        inside = [t for t in times if t > since]
        if len(inside) >= cap:
            # The oldest loan that must leave the window for one more to fit.
            until = inside[len(inside) - cap] + timedelta(hours=policy.window_hours)
            return FrequencyRefusal(
                Reason.LOAN_CAP_REACHED,
                f"{len(inside)} loans in {policy.window_hours} h (cap {cap})", until)
    after = policy.cooling_off_after
    if after:
        pause = timedelta(hours=policy.cooling_off_hours)
        window = timedelta(hours=policy.cooling_off_window_hours)
        until_max: datetime | None = None
        for j in range(after - 1, len(times)):
            last = times[j]
            if last + pause > now and last - times[j - after + 1] <= window:
                until_max = last + pause if until_max is None else max(until_max, last + pause)
        if until_max is not None:
            return FrequencyRefusal(
                Reason.COOLING_OFF,
                f"{after} loans within {policy.cooling_off_window_hours} h: paused "
                f"{policy.cooling_off_hours} h", until_max)
    return None
