"""Limits from behaviour: a per-subscriber limit that follows his recharges and his
paybacks, never above his segment's ceiling (an opt-in extension, off by default).

What this file owns: the per-subscriber state the limit needs (`LimitState`), the two
incremental updates (`on_recharge`, `on_payback`) the services apply inside the same
unit of work as the recharge or the payback, and `limit_for`, which turns the state into
a limit and its reason. Pure functions over plain data: no IO, no clock (`now` is an
argument), so the backtest replays them exactly as the node ran them.

The rule (docs/lending.md "Limits from behaviour"):

    base     = max(recharge_share_bp of the recharges of the last `window_days` days,
                   arpu_share_bp of the imported ARPU, floor_minor)
    adjusted = base * (10 000 + adjust_bp) / 10 000        (rounded down)
    limit    = min(segment ceiling, adjusted)

`adjust_bp` starts at 0 and moves with each payback: + `on_time_raise_bp` for a full
payback of loans all taken within `on_time_days`, - `late_lower_bp` for a full payback
of an older loan, - `partial_lower_bp` for a partial one; it stays within
[`adjust_min_bp`, `adjust_max_bp`], and a full on-time payback never moves it down (even
when the operator lowered `adjust_max_bp` since).

The recharge history is kept as one total per day (days since 1970-01-01 UTC), at most
`window_days` of them: a recharge adds to today's total and drops the days that left
the window, so the state stays bounded whatever the traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import Enum

BP = 10_000  # basis points in 100 %
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """Every input and rule of the limit, from config `[limits]`."""

    window_days: int = 30
    recharge_share_bp: int = 5_000
    arpu_share_bp: int = 0
    floor_minor: int = 0
    on_time_days: int = 14
    on_time_raise_bp: int = 1_000
    late_lower_bp: int = 2_000
    partial_lower_bp: int = 500
    adjust_min_bp: int = -5_000
    adjust_max_bp: int = 10_000


@dataclass(frozen=True, slots=True)
class LimitState:
    """What the ledger keeps per subscriber for his limit."""

    recharge_days: tuple[tuple[int, int], ...] = ()  # (day number, recharged minor), oldest first
    adjust_bp: int = 0
    on_time_paybacks: int = 0
    late_paybacks: int = 0
    partial_paybacks: int = 0


class LimitReason(str, Enum):
    """Which term set the limit (the USSD, admin view and EDR show it)."""

    RECHARGES = "recharges"  # the share of recent recharges
    ARPU = "arpu"  # the share of the imported ARPU
    FLOOR = "floor"  # the configured floor
    CEILING = "ceiling"  # the segment ceiling is the lower


@dataclass(frozen=True, slots=True)
class Limit:
    limit_minor: int
    reason: LimitReason
    recharged_minor: int  # recharges inside the window
    base_minor: int
    adjust_bp: int


def day_number(now: datetime) -> int:
    """Whole days since 1970-01-01 UTC."""
    return (now - _EPOCH) // timedelta(days=1)


def _window(days: Sequence[tuple[int, int]], today: int, window_days: int) -> tuple[
    tuple[int, int], ...
]:
    first = today - window_days + 1
    return tuple((d, a) for d, a in days if d >= first)


def on_recharge(
    state: LimitState, amount_minor: int, now: datetime, policy: LimitPolicy
) -> LimitState:
    """The state after a recharge of `amount_minor` at `now`."""
    if amount_minor <= 0:
        return state
    today = day_number(now)
    days = list(_window(state.recharge_days, today, policy.window_days))
    if days and days[-1][0] == today:
        days[-1] = (today, days[-1][1] + amount_minor)
    elif days and days[-1][0] > today:  # a late event for an earlier day: keep the order
        by_day = dict(days)
        by_day[today] = by_day.get(today, 0) + amount_minor
        days = sorted(by_day.items())
    else:
        days.append((today, amount_minor))
    return replace(state, recharge_days=tuple(days))


def on_payback(
    state: LimitState, *, full: bool, on_time: bool, policy: LimitPolicy
) -> LimitState:
    """The state after a payback: `full` when no debt is left, `on_time` when every
    loan it repaid was taken within `policy.on_time_days`."""
    lo, hi = policy.adjust_min_bp, policy.adjust_max_bp
    if full and on_time:
        raised = min(state.adjust_bp + policy.on_time_raise_bp, hi)
        return replace(
            state,
            adjust_bp=max(state.adjust_bp, raised),
            on_time_paybacks=state.on_time_paybacks + 1,
        )
    if full:
        return replace(
            state,
            adjust_bp=min(state.adjust_bp, max(state.adjust_bp - policy.late_lower_bp, lo)),
            late_paybacks=state.late_paybacks + 1,
        )
    return replace(
        state,
        adjust_bp=min(state.adjust_bp, max(state.adjust_bp - policy.partial_lower_bp, lo)),
        partial_paybacks=state.partial_paybacks + 1,
    )


def payback_on_time(
    oldest_loan_at: datetime | None, now: datetime, policy: LimitPolicy
) -> bool:
    """True when the oldest loan a payback went to was taken within `on_time_days`."""
    return oldest_loan_at is None or now - oldest_loan_at <= timedelta(days=policy.on_time_days)


def limit_for(
    state: LimitState,
    ceiling_minor: int,
    arpu_minor: int,
    now: datetime,
    policy: LimitPolicy,
) -> Limit:
    """The subscriber's limit now: never above `ceiling_minor`, never negative."""
    recharged = sum(a for _, a in _window(state.recharge_days, day_number(now), policy.window_days))
    terms = (
        (recharged * policy.recharge_share_bp // BP, LimitReason.RECHARGES),
        (max(arpu_minor, 0) * policy.arpu_share_bp // BP, LimitReason.ARPU),
        (policy.floor_minor, LimitReason.FLOOR),
    )
    base, reason = max(terms, key=lambda t: t[0])  # first term wins a tie
    adjusted = max(base * (BP + state.adjust_bp) // BP, 0)
    if adjusted >= ceiling_minor:
        return Limit(max(ceiling_minor, 0), LimitReason.CEILING, recharged, base, state.adjust_bp)
    return Limit(adjusted, reason, recharged, base, state.adjust_bp)


def describe(limit: Limit) -> str:
    """A short reason in words for the admin view and logs (templates word the USSD)."""
    sign = "+" if limit.adjust_bp >= 0 else "-"
    return (
        f"{limit.reason.value}: base {limit.base_minor} "
        f"(recharged {limit.recharged_minor}), paybacks {sign}{abs(limit.adjust_bp) / 100:g}%"
    )
