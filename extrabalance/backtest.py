"""`extrabalance policy backtest --edrs DIR --config NEW.toml`: replay past EDRs under a
lending policy and set lent, fees, recovery and bad debt beside what was recorded.

What this file owns: the replay. The EDR files (`edr-*.csv`, schema
`observability.EDR_FIELDS`) are read in time order; each subscriber's open loans,
bad-debt count and limit state (core/limits.py) are rebuilt from them, and every
borrow request is decided again by `core.lending.decide` under the policy given:

* a `loan` or `advance` line is a request for its tier on its channel (an automatic
  advance asks for the policy's auto-advance tier); a `refusal` line is a request too,
  decided again when its reason is one the policy decides (segment, tenure, ceiling,
  bad debt, tier), kept as a refusal otherwise (the IN said no, an operation was
  pending, a manual bar: facts the EDR records, not policy);
* a `payback` or `recharge` line is a recharge: its `amount_minor` feeds the limit's
  recharge history, and it recovers from the replayed debt what it could then: exactly
  what a partial payback took (that was all there was), and for a full payback or a
  recharge when nothing was owed, the larger of what was taken and the recovery share
  of the recharge (the balance before it is not recorded, so no more is assumed);
* a `write_off` line writes off what the replayed loan of that `loan_id` still owes;
  an `advance_reversed` line undoes its advance.

Bad debt is what was written off plus what is still owed at the end of the files.
Profiles (tenure, ARPU, attributes) come from the ledger file when one is given
(`--ledger`, opened read-only); without it every subscriber is matched as unknown.

Replaying the policy that ran gives back the recorded totals exactly (tested): the
decisions, allocations and write-offs are the same functions over the same state.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

from extrabalance.core import limits as core_limits
from extrabalance.core.lending import BorrowRequest, Channel, Granted, decide
from extrabalance.core.limits import LimitState
from extrabalance.core.model import OpenLoan, SubscriberProfile, SubscriberState
from extrabalance.core.payback import split
from extrabalance.core.policy import Policy
from extrabalance.core.reasons import Reason
from extrabalance.core.segments import match_segment

EDR_ROWS_MAX = 200_000_000  # a replay beyond this is not a backtest, it is a migration
# Refusals the policy decides: replayed. Any other refusal is kept as it was.
POLICY_REASONS = frozenset({
    Reason.NO_SEGMENT.value, Reason.TENURE_TOO_SHORT.value, Reason.CEILING_REACHED.value,
    Reason.BARRED_BAD_DEBT.value, Reason.TIER_NOT_ALLOWED.value, Reason.UNKNOWN_TIER.value,
    Reason.LOAN_CAP_REACHED.value, Reason.COOLING_OFF.value,
})
CHANNELS: frozenset[str] = frozenset({"ussd", "sms", "auto"})
_REPLAYED = frozenset({"loan", "advance", "refusal", "payback", "recharge", "write_off",
                       "advance_reversed"})


class BacktestError(Exception):
    """The replay cannot run (no EDR file, an unreadable line)."""


@dataclass
class Totals:
    loans: int = 0
    refusals: int = 0
    lent_minor: int = 0
    fees_minor: int = 0
    recovered_minor: int = 0
    written_off_minor: int = 0
    outstanding_minor: int = 0

    @property
    def bad_debt_minor(self) -> int:
        return self.written_off_minor + self.outstanding_minor

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "bad_debt_minor": self.bad_debt_minor}


@dataclass
class _Sub:
    loans: list[OpenLoan] = field(default_factory=list)
    loans_since_full_payback: int = 0
    limit: LimitState = field(default_factory=LimitState)
    loan_times: dict[str, datetime] = field(default_factory=dict)  # replayed loans, by id


def edr_rows(directory: Path) -> Iterator[dict[str, str]]:
    """Every EDR line of `directory`, file by file in name (date) order."""
    files = sorted(directory.glob("edr-*.csv"))
    if not files:
        raise BacktestError(f"no edr-*.csv file in {directory}")
    count = 0
    for path in files:
        with path.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                count += 1
                if count > EDR_ROWS_MAX:
                    raise BacktestError(f"more than {EDR_ROWS_MAX} EDR lines")
                yield row


def recorded_totals(rows: Iterable[dict[str, str]]) -> Totals:
    """What the EDRs say happened."""
    t = Totals()
    for row in rows:
        kind = row["kind"]
        if kind in ("loan", "advance"):
            t.loans += 1
            t.lent_minor += _int(row, "amount_minor")
            t.fees_minor += _int(row, "fee_minor")
        elif kind == "advance_reversed":
            t.loans -= 1
            t.lent_minor -= _int(row, "amount_minor")
            t.fees_minor -= _int(row, "fee_minor")
        elif kind == "refusal":
            t.refusals += 1
        elif kind == "payback":
            t.recovered_minor += _int(row, "recovered_minor")
        elif kind == "write_off":
            t.written_off_minor += _int(row, "amount_minor")
    t.outstanding_minor = t.lent_minor + t.fees_minor - t.recovered_minor - t.written_off_minor
    return t


def replay(
    rows: Iterable[dict[str, str]],
    policy: Policy,
    profiles: dict[str, SubscriberProfile] | None = None,
) -> Totals:
    """The totals had `policy` decided every request of `rows` (module docstring)."""
    profiles = profiles or {}
    subs: dict[str, _Sub] = {}
    t = Totals()
    for row in rows:
        kind, msisdn = row["kind"], row["msisdn"]
        if kind not in _REPLAYED:
            continue
        now = datetime.fromisoformat(row["time"])
        sub = subs.setdefault(msisdn, _Sub())
        if kind in ("payback", "recharge"):
            recharge = _int(row, "amount_minor")
            if policy.limits is not None:
                sub.limit = core_limits.on_recharge(sub.limit, recharge, now, policy.limits)
            _recover(sub, _budget(row, recharge, policy), policy, now, t)
        elif kind == "write_off":
            _write_off(sub, row["loan_id"], t)
        elif kind == "advance_reversed":
            _reverse(sub, row["loan_id"], t)
        elif kind == "refusal" and row["reason"] not in POLICY_REASONS:
            t.refusals += 1
        else:
            _request(sub, row, msisdn, profiles.get(msisdn), policy, now, t)
    t.outstanding_minor = sum(loan.owed_minor for s in subs.values() for loan in s.loans)
    return t


def _budget(row: dict[str, str], recharge_minor: int, policy: Policy) -> int:
    """The most this recharge may give back in the replay. A partial payback took all
    there was; a full one, or a recharge when nothing was owed, had at least the
    recovery share of the recharge to give (the balance before it is not recorded)."""
    recovered = _int(row, "recovered_minor")
    if row["kind"] == "payback" and _int(row, "debt_after_minor") > 0:
        return recovered
    if row["kind"] == "recharge" and row.get("reason") != "NOTHING_OWED":
        return 0  # deferred or nothing recoverable then: nothing now either
    return max(recovered, recharge_minor * policy.recovery.share_bp // 10_000)


def _int(row: dict[str, str], name: str) -> int:
    text = row.get(name) or ""
    return int(text) if text else 0


def _request(sub: _Sub, row: dict[str, str], msisdn: str, profile: SubscriberProfile | None,
             policy: Policy, now: datetime, t: Totals) -> None:
    channel_text = row.get("channel") or "ussd"
    channel: Channel = channel_text if channel_text in CHANNELS else "ussd"  # type: ignore[assignment]
    tier_text = row.get("tier_id") or ""
    tier_id = int(tier_text) if tier_text else None
    state = SubscriberState(
        msisdn, profile, tuple(sub.loans), sub.loans_since_full_payback,
        auto_advance_opt_in=True,  # an advance line means he had opted in
    )
    if policy.limits is not None:
        segment = match_segment(profile, policy.segments)
        if segment is not None:
            arpu = profile.arpu_minor if profile else 0
            limit = core_limits.limit_for(sub.limit, segment.ceiling_minor, arpu, now,
                                          policy.limits)
            state = replace(state, limit_minor=limit.limit_minor)
    if policy.protection.counts_loans:  # the cap and the cooling-off count his loans
        since = now - policy.protection.lookback
        state = replace(state, loan_times=tuple(
            at for at in sub.loan_times.values() if at >= since))
    decision = decide(BorrowRequest(msisdn, tier_id, channel), state, policy, now)
    if not isinstance(decision, Granted):
        t.refusals += 1
        return
    loan_id = row.get("loan_id") or f"replay-{t.loans}"
    sub.loans.append(OpenLoan(loan_id, decision.tier.tier_id, decision.amount_minor,
                              decision.fee_minor, 0, 0, now))
    sub.loans_since_full_payback += 1
    sub.loan_times[loan_id] = now
    t.loans += 1
    t.lent_minor += decision.amount_minor
    t.fees_minor += decision.fee_minor


def _recover(sub: _Sub, budget_minor: int, policy: Policy, now: datetime, t: Totals) -> None:
    owed = sum(loan.owed_minor for loan in sub.loans)
    if owed == 0 or budget_minor <= 0:
        return
    recovery = split(sub.loans, budget_minor, policy.recovery, owed)
    paid = {part.loan_id: part for part in recovery.parts}
    oldest_at = min(loan.created_at for loan in sub.loans)
    sub.loans = [
        replace(loan, fee_repaid_minor=loan.fee_repaid_minor + paid[loan.loan_id].fee_minor,
                principal_repaid_minor=loan.principal_repaid_minor
                + paid[loan.loan_id].principal_minor)
        if loan.loan_id in paid else loan
        for loan in sub.loans
    ]
    sub.loans = [loan for loan in sub.loans if loan.owed_minor > 0]
    taken = recovery.total_minor
    t.recovered_minor += taken
    if not sub.loans:
        sub.loans_since_full_payback = 0
    if policy.limits is not None and taken > 0:
        sub.limit = core_limits.on_payback(
            sub.limit, full=not sub.loans,
            on_time=core_limits.payback_on_time(oldest_at, now, policy.limits),
            policy=policy.limits)


def _write_off(sub: _Sub, loan_id: str, t: Totals) -> None:
    for loan in sub.loans:
        if loan.loan_id == loan_id:
            t.written_off_minor += loan.owed_minor
            sub.loans.remove(loan)
            return


def _reverse(sub: _Sub, loan_id: str, t: Totals) -> None:
    for loan in sub.loans:
        if loan.loan_id == loan_id:
            sub.loans.remove(loan)
            sub.loan_times.pop(loan_id, None)  # a failed loan counts for no rule
            sub.loans_since_full_payback = max(sub.loans_since_full_payback - 1, 0)
            t.loans -= 1
            t.lent_minor -= loan.principal_minor
            t.fees_minor -= loan.fee_minor
            return


def ledger_profiles(path: Path) -> dict[str, SubscriberProfile]:
    """Every profile of an embedded ledger file, opened read-only."""
    from extrabalance.ledger import read_models

    conn = read_models.open_read_only(path)
    try:
        return read_models.profiles(conn)
    finally:
        conn.close()


def backtest(edr_dir: Path, current: Policy, new: Policy,
             profiles: dict[str, SubscriberProfile] | None = None) -> dict[str, dict[str, int]]:
    """Recorded, current policy replayed, and the new policy replayed, side by side."""
    return {
        "recorded": recorded_totals(edr_rows(edr_dir)).as_dict(),
        "current": replay(edr_rows(edr_dir), current, profiles).as_dict(),
        "new": replay(edr_rows(edr_dir), new, profiles).as_dict(),
    }


def render(result: dict[str, dict[str, int]]) -> str:
    """The side-by-side table (minor units)."""
    names = list(result["recorded"])
    lines = [f"{'':20} {'recorded':>14} {'current':>14} {'new':>14}"]
    for name in names:
        lines.append(f"{name:20} " + " ".join(f"{result[c][name]:>14}" for c in result))
    return "\n".join(lines)
