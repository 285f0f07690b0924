"""Payback on recharge: recover fee and principal from the new balance, exactly once
per recharge `event_id`.

handle_recharge: idempotency check → learn the route → allocate (core) → record the
RECOVERING intent with a fresh Session-Id → IN DIRECT_DEBITING → settle in one commit
(journal, loans, bad-debt reset) → SMS. A 4012 (balance moved meanwhile) retries with
half the amount, each attempt its own recorded Session-Id, at most
`RECOVERY_ATTEMPTS_MAX` times. Returns only after the final commit, so the MQTT
listener may acknowledge the message when this returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING

from extrabalance.core import sagas
from extrabalance.core.payback import allocate_payback, split
from extrabalance.core.policy import Policy
from extrabalance.service.lending import Clock, call_in_with_resends
from extrabalance.service.limits import note_payback, note_recharge
from extrabalance.service.locks import SubscriberLocks
from extrabalance.service.outcomes import (
    PaybackOutcome,
    PaybackStatus,
)
from extrabalance.service.ports import (
    EventSink,
    FollowUp,
    InAction,
    InOperation,
    InOutcome,
    InPort,
    InResult,
    Notice,
    NoticeOutbox,
    RechargeEvent,
)
from extrabalance.service.routing import Router
from extrabalance.service.unit_of_work import LedgerTx, UnitOfWork

if TYPE_CHECKING:
    from extrabalance.core.model import OpenLoan
    from extrabalance.ledger.store import RecoveryRow

_NO_DEBIT = frozenset({PaybackStatus.NOTHING_OWED, PaybackStatus.DEFERRED,
                       PaybackStatus.NOTHING_RECOVERABLE})
RECOVERY_ATTEMPTS_MAX = 3  # DIRECT_DEBITING attempts per recharge (amount halves each time)


def recharge_key(event_id: str) -> str:
    return f"recharge:{event_id}"


@dataclass(frozen=True, slots=True)
class _Intent:
    recovery_id: str
    requested_minor: int
    in_node: str
    language: str
    event_id: str = ""  # the recharge's, for the EDR
    recharge_minor: int = 0  # the recharge's amount, for the EDR (the backtest replays it)


def settle_recovery_done(
    tx: LedgerTx, recovery_id: str, result: InResult, policy: Policy, now: datetime
) -> PaybackOutcome:
    """Apply a DONE debit: journal + loans + idempotent outcome."""
    rec = tx.get_recovery(recovery_id)
    assert rec is not None
    debited = result.amount_minor if result.amount_minor is not None else rec.requested_minor
    # The IN never takes more than asked; if it claims so, book what was asked and
    # leave an audit line for the operator rather than invent debt.
    if debited > rec.requested_minor or debited < 0:
        tx.audit(
            rec.msisdn,
            "review",
            "payback",
            f"IN reported {debited} debited for {rec.requested_minor} asked",
            now,
        )
        debited = rec.requested_minor
    tx.note_recovery_attempt(recovery_id, InOutcome.DONE.value, result.result_code, rec.attempts)
    debt_left = settle_debit(tx, rec, debited, policy, now)
    outcome = PaybackOutcome(PaybackStatus.RECOVERED, debited, debt_left, recovery_id)
    tx.idempotent_replace(recharge_key(rec.event_id), outcome.to_json(), now)
    return outcome


def settle_debit(
    tx: LedgerTx,
    rec: RecoveryRow,
    debited_minor: int,
    policy: Policy,
    now: datetime,
) -> int:
    """Split what the IN debited over the open loans (core) and book it; returns the
    debt left. A recovery already DONE books nothing again."""
    loans = tx.open_loans(rec.msisdn)
    owed = sum(loan.owed_minor for loan in loans)
    if rec.state == sagas.DONE:
        return owed
    if debited_minor > owed or debited_minor < 0:
        raise sagas.LedgerInvariantError(
            f"recovery {rec.recovery_id}: IN debited {debited_minor}, owed {owed}"
        )
    # The debit was planned without the advances whose answer never reached the IN:
    # it goes to the others (it fits, unless a mark opened after the plan).
    recoverable = recoverable_loans(tx, rec.msisdn, loans)
    if debited_minor <= sum(loan.owed_minor for loan in recoverable):
        tx.apply_recovery(rec, split(recoverable, debited_minor, policy.recovery), now)
    else:
        tx.apply_recovery(rec, split(loans, debited_minor, policy.recovery, owed), now)
    if debited_minor > 0:
        note_payback(tx, rec.msisdn, loans, owed - debited_minor, policy, now)
    return owed - debited_minor


def recoverable_loans(tx: LedgerTx, msisdn: str, loans: Sequence[OpenLoan]) -> list[OpenLoan]:
    """His open loans a recharge may take money for: not an advance whose granting
    answer could not be handed to the IN (`service/undelivered.py`), which the IN may
    never have credited. Those still count as debt (the ceiling, the limit)."""
    held = tx.undelivered_loan_ids(msisdn)
    return [loan for loan in loans if loan.loan_id not in held] if held else list(loans)


def settle_recovery_failed(
    tx: LedgerTx, recovery_id: str, result: InResult, now: datetime
) -> PaybackOutcome:
    rec = tx.get_recovery(recovery_id)
    assert rec is not None
    tx.note_recovery_attempt(recovery_id, result.outcome.value, result.result_code, rec.attempts)
    tx.set_recovery_state(recovery_id, sagas.FAILED, now)
    outcome = PaybackOutcome(PaybackStatus.NOT_RECOVERED, 0, tx.debt_owed(rec.msisdn), recovery_id)
    tx.idempotent_replace(recharge_key(rec.event_id), outcome.to_json(), now)
    return outcome


def outcome_of_recovery(rec: RecoveryRow, debt_minor: int) -> PaybackOutcome:
    """The answer to a recharge replayed after its recovery started (`recoveries.event_id`
    is UNIQUE, so this row outlives the idempotency key): nothing is debited again."""
    if rec.state == sagas.DONE:
        status = PaybackStatus.RECOVERED
    elif rec.state == sagas.FAILED:
        status = PaybackStatus.NOT_RECOVERED
    else:
        status = PaybackStatus.PENDING
    return PaybackOutcome(status, rec.recovered_minor, debt_minor, rec.recovery_id, replayed=True)


def payback_notice(msisdn: str, outcome: PaybackOutcome, language: str) -> Notice:
    if outcome.debt_minor == 0:
        return Notice(
            msisdn, "payback_full", {"recovered": outcome.recovered_minor}, "sms", language
        )
    return Notice(
        msisdn,
        "payback_partial",
        {"recovered": outcome.recovered_minor, "debt": outcome.debt_minor},
        "sms",
        language,
    )


class PaybackService:
    def __init__(
        self,
        ledger: UnitOfWork,
        in_port: InPort,
        notifier: NoticeOutbox,
        events: EventSink,
        policy: Policy,
        router: Router,
        clock: Clock,
        *,
        locks: SubscriberLocks,  # shared with every service of the node (one per subscriber)
        attempts_max: int = RECOVERY_ATTEMPTS_MAX,
        default_language: str = "en",
        follow_up: FollowUp | None = None,
    ) -> None:
        self.ledger = ledger
        self.in_port = in_port
        self.notifier = notifier
        self.events = events
        self.policy = policy
        self.router = router
        self.clock = clock
        self.locks = locks
        self.attempts_max = attempts_max
        self.default_language = default_language
        # Resolver.follow_up (the bootstrap passes it): a recovery left pending (no
        # answer in time, or not executed) is re-sent after the Tx-timer delays, not 30 s later.
        self.follow_up = follow_up

    async def handle_recharge(self, event: RechargeEvent) -> PaybackOutcome:
        """Recover what is owed from this recharge. Idempotent by `event.event_id`."""
        # Runs to its settlement even if the caller is cancelled (MQTT reconnect).
        return await asyncio.shield(self._handle_recharge(event))

    async def _handle_recharge(self, event: RechargeEvent) -> PaybackOutcome:
        key = recharge_key(event.event_id)
        msisdn = event.msisdn
        async with self.locks.hold(msisdn):
            now = self.clock()
            session_id = self.in_port.new_session_id()

            def record_intent(tx: LedgerTx) -> PaybackOutcome | _Intent:
                prior = tx.idempotent_get(key)
                if prior is not None:
                    return PaybackOutcome.from_json(prior, replayed=True)
                started = tx.recovery_by_event(event.event_id)
                if started is not None:  # not settled yet, or its outcome purged
                    return outcome_of_recovery(started, tx.debt_owed(msisdn))

                def done(outcome: PaybackOutcome) -> PaybackOutcome:
                    tx.idempotent_put(key, outcome.to_json(), now)
                    return outcome

                loaded = tx.load_subscriber(msisdn, default_language=self.default_language)
                if loaded.learned_in_node != event.in_node:  # write the row only on a change
                    tx.learn_route(msisdn, event.in_node, now)
                note_recharge(tx, msisdn, event.amount_minor, self.policy, now)
                debt = loaded.state.debt_minor
                if debt == 0:
                    return done(PaybackOutcome(PaybackStatus.NOTHING_OWED))
                if loaded.recovery_pending:
                    # Two recoveries against the same loans could take more than is owed.
                    return done(PaybackOutcome(PaybackStatus.DEFERRED, 0, debt))
                available = (
                    event.balance_after_minor
                    if event.balance_after_minor is not None
                    else event.amount_minor
                )
                plan = allocate_payback(recoverable_loans(tx, msisdn, loaded.state.open_loans),
                                        available, self.policy.recovery)
                if plan.total_minor == 0:
                    return done(PaybackOutcome(PaybackStatus.NOTHING_RECOVERABLE, 0, debt))
                recovery_id = tx.insert_recovery(
                    event_id=event.event_id,
                    msisdn=msisdn,
                    recharge_minor=event.amount_minor,
                    balance_after_minor=event.balance_after_minor,
                    in_node=event.in_node,
                    now=now,
                    session_id=session_id,
                    requested_minor=plan.total_minor,
                )
                return _Intent(recovery_id, plan.total_minor, event.in_node,
                               loaded.state.language, event.event_id, event.amount_minor)

            step = await self.ledger.write(record_intent)
            self.router.learn(msisdn, event.in_node)
            if isinstance(step, PaybackOutcome):
                if not step.replayed and step.status in _NO_DEBIT:
                    # A recharge with no payback line: recorded all the same, so the
                    # policy backtest knows every recharge (limits from behaviour).
                    self.events.emit("recharge", msisdn=msisdn, amount_minor=event.amount_minor,
                                     reason=step.status.value, event_id=event.event_id,
                                     in_node=event.in_node)
                return step
            return await self._debit(msisdn, step, session_id)

    async def _debit(self, msisdn: str, step: _Intent, session_id: str) -> PaybackOutcome:
        requested = step.requested_minor
        attempt = 1
        while True:
            op = InOperation(InAction.DIRECT_DEBITING, msisdn, step.in_node, requested, session_id)
            result = await call_in_with_resends(self.in_port, op)
            if result.outcome is InOutcome.DONE:
                now = self.clock()

                def settle(
                    tx: LedgerTx, result: InResult = result, now: datetime = now
                ) -> PaybackOutcome:
                    settled = settle_recovery_done(tx, step.recovery_id, result, self.policy, now)
                    # The message that names the deduction, in the same commit (sent
                    # after); on unless [protection] recovery_sms = false.
                    if self.policy.protection.recovery_sms:
                        self.notifier.put(tx, payback_notice(msisdn, settled, step.language), now)
                    return settled

                outcome = await self.ledger.write(settle)
                self.events.emit(
                    "payback",
                    msisdn=msisdn,
                    recovery_id=step.recovery_id,
                    recovered_minor=outcome.recovered_minor,
                    debt_after_minor=outcome.debt_minor,
                    full=outcome.debt_minor == 0,
                    event_id=step.event_id,
                    in_node=step.in_node,
                    amount_minor=step.recharge_minor,
                )
                self.notifier.wake()
                return outcome
            if result.outcome is InOutcome.UNKNOWN:
                await self.ledger.write(
                    lambda tx: tx.set_recovery_state(step.recovery_id, sagas.UNKNOWN, self.clock())
                )
                self.events.emit("payback_pending", msisdn=msisdn, recovery_id=step.recovery_id)
                if self.follow_up is not None:
                    self.follow_up("recovery", step.recovery_id, msisdn)
                return PaybackOutcome(PaybackStatus.PENDING, 0, 0, step.recovery_id)
            if result.outcome is InOutcome.NOT_EXECUTED:
                # 3002/3004 on every immediate send: not executed, nothing taken. The
                # same operation (Session-Id, amount) is re-sent later, never a smaller
                # one (RFC 6733 §7.1.3): it stays RECOVERING for the follow-up and the
                # resolver, which re-send it unchanged.
                def not_executed(tx: LedgerTx, result: InResult = result) -> None:
                    tx.note_recovery_attempt(
                        step.recovery_id, result.outcome.value, result.result_code
                    )

                await self.ledger.write(not_executed)
                self.events.emit("payback_pending", msisdn=msisdn, recovery_id=step.recovery_id)
                if self.follow_up is not None:
                    self.follow_up("recovery", step.recovery_id, msisdn)
                return PaybackOutcome(PaybackStatus.PENDING, 0, 0, step.recovery_id)
            # REFUSED for want of credit (4012: the balance moved since the recharge)
            # is retried with a smaller amount under a new Session-Id; any other
            # refusal ends it.
            smaller = requested // 2 if result.short_of_credit else 0
            if attempt >= self.attempts_max or smaller <= 0:
                outcome = await self.ledger.write(
                    partial(
                        settle_recovery_failed,
                        recovery_id=step.recovery_id,
                        result=result,
                        now=self.clock(),
                    )
                )
                self.events.emit(
                    "payback",
                    msisdn=msisdn,
                    recovery_id=step.recovery_id,
                    recovered_minor=0,
                    debt_after_minor=outcome.debt_minor,
                    full=False,
                    result_code=result.result_code,
                    event_id=step.event_id,
                    in_node=step.in_node,
                    amount_minor=step.recharge_minor,
                )
                return outcome
            attempt += 1
            requested = smaller
            session_id = self.in_port.new_session_id()
            now = self.clock()

            def next_attempt(
                tx: LedgerTx,
                session_id: str = session_id,
                requested: int = requested,
                result: InResult = result,
                now: datetime = now,
            ) -> None:
                tx.note_recovery_attempt(step.recovery_id, result.outcome.value, result.result_code)
                tx.start_recovery_attempt(step.recovery_id, session_id, requested, now)

            await self.ledger.write(next_attempt)
