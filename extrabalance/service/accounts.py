"""Operator actions on accounts: manual bar/unbar (audited), opting in to automatic
advances, goodwill write-downs and debt ageing (overdue count, write-off with journal
entries). Each runs under the subscriber's lock, is audited in its unit of work and
emits its EDR event; the admin API and the operator commands both call these."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING

from extrabalance.core.policy import Policy
from extrabalance.service.lending import Clock, safe_notify
from extrabalance.service.locks import SubscriberLocks
from extrabalance.service.ports import EventSink, Notice, Notifier
from extrabalance.service.unit_of_work import LedgerTx, UnitOfWork

if TYPE_CHECKING:
    from extrabalance.core.adjustments import AdjustmentResult

WRITE_OFF_BATCH_MAX = 10_000  # loans written off per age_debts run


@dataclass(frozen=True, slots=True)
class AgeingReport:
    overdue_loans: int
    written_off_loans: int
    written_off_minor: int


class OptInRefused(Exception):
    """An operator's opt-in that the consumer-protection policy does not allow."""


class AccountService:
    def __init__(
        self,
        ledger: UnitOfWork,
        notifier: Notifier,
        events: EventSink,
        policy: Policy,
        clock: Clock,
        *,
        locks: SubscriberLocks,  # shared with every service of the node (one per subscriber)
    ) -> None:
        self.ledger = ledger
        self.notifier = notifier
        self.events = events
        self.policy = policy
        self.clock = clock
        self.locks = locks

    async def bar(self, msisdn: str, reason: str, who: str, *, notify: bool = True) -> None:
        async with self.locks.hold(msisdn):
            now = self.clock()
            await self.ledger.write(lambda tx: tx.set_bar(msisdn, True, reason, who, now))
        self.events.emit("bar", msisdn=msisdn, reason=reason, who=who)
        if notify:
            language = await self.ledger.read(lambda tx: tx.load_subscriber(msisdn).state.language)
            await safe_notify(self.notifier, Notice(msisdn, "barred", {}, "sms", language))

    async def unbar(self, msisdn: str, who: str, why: str = "") -> None:
        async with self.locks.hold(msisdn):
            now = self.clock()
            await self.ledger.write(lambda tx: tx.set_bar(msisdn, False, why, who, now))
        self.events.emit("unbar", msisdn=msisdn, who=who, reason=why)

    async def set_auto_advance(self, msisdn: str, on: bool, who: str, why: str) -> bool:
        """Opt `msisdn` in to automatic advances (or out), audited; False if it was
        already so (nothing written). Raises `OptInRefused` for an opt-in when the
        consumer-protection preset allows it only by the subscriber's own reply."""
        if on and not self.policy.protection.bulk_opt_in:
            raise OptInRefused(
                f"the protection preset {self.policy.protection.preset!r} allows the opt-in "
                "to automatic advances only by the subscriber's reply YES (double opt-in)")
        async with self.locks.hold(msisdn):
            now = self.clock()

            def change(tx: LedgerTx) -> bool:
                if tx.load_subscriber(msisdn).state.auto_advance_opt_in == on:
                    return False
                tx.set_preferences(msisdn, now, auto_advance=on)
                tx.audit(msisdn, "auto_advance_on" if on else "auto_advance_off", who, why, now)
                return True

            return bool(await self.ledger.write(change))

    async def write_down(
        self,
        msisdn: str,
        *,
        kind: str,
        amount_minor: int,
        who: str,
        reason: str,
        loan_id: str | None = None,
        request_id: str | None = None,
    ) -> AdjustmentResult:
        """Goodwill write-down of his debt (`core.adjustments`): one balanced journal
        entry and an audit line in one unit of work, under his lock, then the
        `adjustment` EDR (not for a replayed `request_id`). Raises `AdjustmentError`
        when refused (unsettled operation, amount too large): nothing changed."""
        async with self.locks.hold(msisdn):
            now = self.clock()
            result = await self.ledger.write(lambda tx: tx.write_down(
                msisdn, kind=kind, amount_minor=amount_minor, who=who, reason=reason,
                now=now, loan_id=loan_id, request_id=request_id))
        if not result.replayed:
            self.events.emit("adjustment", msisdn=msisdn, amount_minor=result.amount_minor,
                             debt_after_minor=result.debt_after_minor,
                             loan_id=(result.loans[0]["loan_id"] if len(result.loans) == 1
                                      else ""),
                             reason=kind, detail=f"who={who}; {reason}")
        return result

    async def age_debts(self, now: datetime | None = None, *, who: str = "ageing") -> AgeingReport:
        """Write off loans older than `write_off_days`; count those past `overdue_days`."""
        now = now or self.clock()
        recovery = self.policy.recovery
        write_off_before = now - timedelta(days=recovery.write_off_days)
        overdue_before = now - timedelta(days=recovery.overdue_days)
        candidates = await self.ledger.read(
            lambda tx: tx.write_off_candidates(write_off_before, WRITE_OFF_BATCH_MAX)
        )
        written = amount = 0
        for msisdn, loan_id in candidates:
            async with self.locks.hold(msisdn):
                minor = await self.ledger.write(
                    partial(_write_off, loan_id=loan_id, who=who, now=now)
                )
            if minor:
                written += 1
                amount += minor
                self.events.emit("write_off", msisdn=msisdn, loan_id=loan_id, amount_minor=minor)
        overdue = await self.ledger.read(
            lambda tx: tx.count_overdue(overdue_before, write_off_before)
        )
        return AgeingReport(int(overdue), written, amount)


def _write_off(tx: LedgerTx, *, loan_id: str, who: str, now: datetime) -> int:
    return tx.write_off(loan_id, who, now)
