"""The resolver: finishes every IN operation whose outcome is not known.

A loan left CREDITING/UNKNOWN or a recovery left RECOVERING/UNKNOWN (timeout, lost
connection, crash between intent and settlement) is re-sent with its stored
Session-Id and CC-Request-Number and the T flag. The IN applies one Session-Id at
most once and answers a duplicate with its first answer, so the re-send tells us
what happened without risking a second credit. Still unknown: left for the next run;
after `review_after_attempts` runs it is flagged for manual review (and keeps
blocking new traffic for that subscriber, which is refused OPERATION_PENDING).

An automatic advance left CONFIRMING (only for an IN with the opt-in confirmation
extension: node died between the commit and the CCA or its confirmation; the IN
unreachable) is confirmed the same way: REFUND_ACCOUNT with the advance's own
Session-Id and CC-Request-Number and the T flag; see `lending.confirm_advance`. One
whose IN no longer has the extension (the setting was turned off) is settled ACTIVE
without sending anything: to that IN the CCA's grant is the credit.

Runs at start-up in the background (a subscriber with a pending operation is refused
OPERATION_PENDING until it settles; the listeners do not wait), then every
`interval_s`, up to `concurrent_max` operations at once. An operation left pending by
a service is also followed up on its own (`follow_up`): re-sent after the Tx-timer
delays `follow_up_delays_s` (2 s, 8 s), so a slow IN's answer settles it within
seconds rather than at the next periodic run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import structlog

from extrabalance.core import sagas
from extrabalance.core.policy import Policy
from extrabalance.service.lending import (
    Clock,
    ConfirmStatus,
    bundle_edr,
    call_in,
    confirm_advance,
    loan_notice,
    settle_borrow,
)
from extrabalance.service.locks import SubscriberLocks
from extrabalance.service.outcomes import BorrowOutcome, BorrowStatus, PaybackOutcome
from extrabalance.service.ports import (
    EventSink,
    InAction,
    InOperation,
    InOutcome,
    InPort,
    InResult,
    NoticeOutbox,
)
from extrabalance.service.recovery import (
    payback_notice,
    settle_recovery_done,
    settle_recovery_failed,
)
from extrabalance.service.undelivered import UndeliveredAdvances
from extrabalance.service.unit_of_work import LedgerTx, UnitOfWork

if TYPE_CHECKING:  # the row types the port's operations return
    from extrabalance.ledger.store import LoanRow, RecoveryRow

log = structlog.get_logger(__name__)

RESOLVE_BATCH_MAX = 1_000  # operations looked at per run
REVIEW_AFTER_ATTEMPTS = 20  # runs before an unresolved operation goes to manual review
RESOLVE_INTERVAL_S = 30.0


def resolve_interval_s(lease_s: float) -> float:
    """How often the resolver runs (and so renews its leases): every 30 s, or every
    quarter of a shorter lease, so that a live node renews well before it runs out."""
    return min(RESOLVE_INTERVAL_S, lease_s / 4)
# Follow-ups of one pending operation (a loan left UNKNOWN, a recovery not answered in
# time or answered 3002/3004): re-sent unchanged this long after it was left pending,
# then after the next delay, before the periodic run takes it over. Spaced like the
# Tx timer (RFC 4006 §13) of a slow IN. At most FOLLOW_UPS_MAX run at once.
FOLLOW_UP_DELAYS_S = (2.0, 8.0)
RESOLVE_CONCURRENT_MAX = 32  # operations re-sent at once by one run
FOLLOW_UPS_MAX = 1_000


@dataclass(frozen=True, slots=True)
class ResolveReport:
    loans_settled: int = 0
    recoveries_settled: int = 0
    still_unknown: int = 0
    flagged_for_review: int = 0
    # Advances whose granting answer never reached the IN, reversed after the hold.
    advances_reversed: int = 0


class Resolver:
    def __init__(
        self,
        ledger: UnitOfWork,
        in_port: InPort,
        notifier: NoticeOutbox,
        events: EventSink,
        policy: Policy,
        clock: Clock,
        *,
        locks: SubscriberLocks,  # shared with every service of the node (one per subscriber)
        batch_max: int = RESOLVE_BATCH_MAX,
        review_after_attempts: int = REVIEW_AFTER_ATTEMPTS,
        default_language: str = "en",
        advance_confirmation_nodes: frozenset[str] = frozenset(),
        follow_up_delays_s: tuple[float, ...] = FOLLOW_UP_DELAYS_S,
        follow_ups_max: int = FOLLOW_UPS_MAX,
        concurrent_max: int = RESOLVE_CONCURRENT_MAX,
        node_name: str = "",
        lease_s: float = sagas.SAGA_LEASE_S,
        undelivered: UndeliveredAdvances | None = None,
    ) -> None:
        self.ledger = ledger
        self.undelivered = undelivered
        # Several nodes on one ledger: this node claims the operations it settles
        # (its own, renewed; those of no node; those of a node whose lease ran out).
        self.node_name = node_name
        self.lease = timedelta(seconds=lease_s)
        self.concurrent_max = concurrent_max
        self.follow_up_delays_s = follow_up_delays_s
        self.follow_ups_max = follow_ups_max
        self._follow_ups: set[asyncio.Task[None]] = set()
        self.advance_confirmation_nodes = advance_confirmation_nodes
        self.in_port = in_port
        self.notifier = notifier
        self.events = events
        self.policy = policy
        self.clock = clock
        self.locks = locks
        self.batch_max = batch_max
        self.review_after_attempts = review_after_attempts
        self.default_language = default_language

    async def run_once(self) -> ResolveReport:
        """One pass over the pending operations this node claims (see `node_name`), up
        to `concurrent_max` at once (one subscriber's are serialised by his lock), each
        re-sent unchanged."""
        loans, recs = await self._claim()
        slots = asyncio.Semaphore(self.concurrent_max)

        async def loan_result(loan: LoanRow) -> str:
            async with slots:
                if loan.state != sagas.CONFIRMING:
                    return await self._resolve_loan(loan.loan_id, loan.msisdn)
                if loan.in_node in self.advance_confirmation_nodes:
                    return await self._resolve_advance(loan.loan_id, loan.msisdn)
                return await self._settle_unconfirmed_advance(loan.loan_id, loan.msisdn)

        async def recovery_result(rec: RecoveryRow) -> str:
            async with slots:
                return await self._resolve_recovery(rec.recovery_id, rec.msisdn)

        # A run longer than a quarter of the lease renews it meanwhile, so another
        # node never takes over a row this run has not reached yet.
        renewing = asyncio.create_task(self._renew_while_running())
        try:
            loan_results = await asyncio.gather(*(loan_result(loan) for loan in loans))
            rec_results = await asyncio.gather(*(recovery_result(rec) for rec in recs))
        finally:
            renewing.cancel()
        results = [*loan_results, *rec_results]
        reversed_ = 0
        if self.undelivered is not None:
            try:
                reversed_ = await self.undelivered.reverse_due()
            except Exception:  # the next run looks again
                log.exception("undelivered_advances_failed")
        return ResolveReport(
            advances_reversed=reversed_,
            loans_settled=loan_results.count("settled"),
            recoveries_settled=rec_results.count("settled"),
            still_unknown=results.count("unknown") + results.count("flagged"),
            flagged_for_review=results.count("flagged"),
        )

    async def _claim(self) -> tuple[list[LoanRow], list[RecoveryRow]]:
        """Claim (or renew) this node's share of the unsettled operations."""
        now = self.clock()
        until, me, most = now + self.lease, self.node_name, self.batch_max
        loans = await self.ledger.write(
            lambda tx: tx.claim_unsettled_loans(me, now, until, most))
        recs = await self.ledger.write(
            lambda tx: tx.claim_unsettled_recoveries(me, now, until, most))
        return loans, recs

    async def _renew_while_running(self) -> None:
        """Every quarter of the lease, claim again: the rows still unsettled are this
        node's and their lease is renewed (rows newly claimed wait for the next run)."""
        while True:
            await asyncio.sleep(self.lease.total_seconds() / 4)
            try:
                await self._claim()
            except Exception:  # the run goes on; the next renewal tries again
                log.exception("resolver_lease_renewal_failed")

    def follow_up(self, kind: str, record_id: str, msisdn: str) -> None:
        """Re-send one pending operation ("loan" or "recovery") unchanged, in the
        background, after each of `follow_up_delays_s` until it settles; beyond
        `follow_ups_max` at once it is left to the periodic run (nothing is lost)."""
        if len(self._follow_ups) >= self.follow_ups_max:
            log.warning("follow_up_deferred", kind=kind, record_id=record_id)
            return
        task = asyncio.create_task(self._follow(kind, record_id, msisdn))
        self._follow_ups.add(task)
        task.add_done_callback(self._follow_ups.discard)

    async def _follow(self, kind: str, record_id: str, msisdn: str) -> None:
        resolve = self._resolve_loan if kind == "loan" else self._resolve_recovery
        for delay_s in self.follow_up_delays_s:
            await asyncio.sleep(delay_s)
            try:
                result = await resolve(record_id, msisdn)
            except Exception:
                log.exception("follow_up_failed", kind=kind, record_id=record_id)
                return
            if result in ("settled", "gone", "flagged"):
                return

    async def drain_follow_ups(self) -> None:
        """Wait for the follow-ups running now (tests, shutdown)."""
        while self._follow_ups:
            await asyncio.gather(*list(self._follow_ups), return_exceptions=True)

    def abandon_follow_ups(self) -> None:
        """Cancel the follow-ups (their operations stay pending for the periodic run)."""
        for task in list(self._follow_ups):
            task.cancel()

    async def run_forever(self, interval_s: float = RESOLVE_INTERVAL_S) -> None:
        """Run every `interval_s` (shorter than the lease, which each run renews)."""
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("resolver_run_failed")
            await asyncio.sleep(interval_s)

    def _language_in(self, tx: LedgerTx, msisdn: str) -> str:
        return tx.load_subscriber(msisdn, default_language=self.default_language).state.language

    async def _unresolved(self, table: str, key: str, msisdn: str) -> str:
        flagged = await self.ledger.write(
            lambda tx: tx.note_resolve_attempt(
                table, key, self.review_after_attempts, self.clock()
            )
        )
        if flagged:
            # The EDR names the record in its own column (loan_id or recovery_id).
            column = "loan_id" if table == "loans" else "recovery_id"
            self.events.emit("review", msisdn=msisdn, **{column: key})
            return "flagged"
        return "unknown"

    async def _resolve_advance(self, loan_id: str, msisdn: str) -> str:
        status = await confirm_advance(
            self.ledger, self.in_port, self.events, self.locks, self.clock,
            loan_id, msisdn, retransmission=True,
        )
        if status is ConfirmStatus.GONE:
            return "gone"
        if status is ConfirmStatus.UNKNOWN:
            return await self._unresolved("loans", loan_id, msisdn)
        return "settled"

    async def _settle_unconfirmed_advance(self, loan_id: str, msisdn: str) -> str:
        """A CONFIRMING advance of an IN without the confirmation extension: the CCA's
        grant is the credit there, and a REFUND_ACCOUNT would be a second one."""
        now = self.clock()

        def settle(tx: LedgerTx) -> bool:
            loan = tx.get_loan(loan_id)
            if loan is None or loan.state != sagas.CONFIRMING:
                return False
            tx.settle_advance(loan_id, True, now)
            return True

        async with self.locks.hold(msisdn):
            if not await self.ledger.write(settle):
                return "gone"
        log.info("advance_settled_without_confirmation", loan_id=loan_id)
        return "settled"

    async def _resolve_loan(self, loan_id: str, msisdn: str) -> str:
        # Under the subscriber's lock, so a saga still in flight is never raced.
        async with self.locks.hold(msisdn):
            loan = await self.ledger.read(lambda tx: tx.get_loan(loan_id))
            if loan is None or loan.state not in sagas.LOAN_UNSETTLED_STATES:
                return "gone"
            if loan.state == sagas.CONFIRMING:  # an advance: never credited a second way
                return "gone"
            if loan.diameter_session_id is None or loan.in_node is None:
                # Recorded but never sent: nothing can have been credited.
                await self.ledger.write(
                    lambda tx: settle_borrow(tx, loan_id, InResult(InOutcome.REFUSED), self.clock())
                )
                return "settled"
            op = InOperation(
                InAction.REFUND_ACCOUNT,
                msisdn,
                loan.in_node,
                loan.principal_minor,
                loan.diameter_session_id,
                loan.request_number,
                retransmission=True,
                # The units booked with the loan, never the tier as configured now:
                # one Session-Id always asks for the same thing.
                bundle=loan.bundle,
            )
            result = await call_in(self.in_port, op)
            if result.outcome not in (InOutcome.DONE, InOutcome.REFUSED):
                # NOT_EXECUTED on a re-send says nothing about the first send.
                if loan.state != sagas.UNKNOWN:
                    await self.ledger.write(
                        lambda tx: tx.settle_loan(loan_id, sagas.UNKNOWN, self.clock())
                    )
                return await self._unresolved("loans", loan_id, msisdn)
            now = self.clock()

            def settle(tx: LedgerTx) -> BorrowOutcome:
                settled = settle_borrow(tx, loan_id, result, now)
                if loan.channel != "auto":  # the message that reports it, same commit
                    language = self._language_in(tx, msisdn)
                    self.notifier.put(tx, loan_notice(settled, msisdn, language, loan.bundle),
                                      now)
                return settled

            outcome = await self.ledger.write(settle)
            if outcome.status is BorrowStatus.GRANTED:
                self.events.emit(
                    "loan",
                    msisdn=msisdn,
                    loan_id=loan_id,
                    tier_id=loan.tier_id,
                    amount_minor=loan.principal_minor,
                    fee_minor=loan.fee_minor,
                    debt_after_minor=outcome.debt_minor,
                    channel=loan.channel,
                    resolved=True,
                    **bundle_edr(loan.bundle),
                )
            else:
                self.events.emit(
                    "refusal",
                    msisdn=msisdn,
                    reason="IN_REFUSED",
                    channel=loan.channel,
                    loan_id=loan_id,
                    resolved=True,
                    **bundle_edr(loan.bundle),
                )
            if loan.channel != "auto":
                self.notifier.wake()  # the loan_notice, written with the settlement
            return "settled"

    async def _resolve_recovery(self, recovery_id: str, msisdn: str) -> str:
        async with self.locks.hold(msisdn):
            rec = await self.ledger.read(lambda tx: tx.get_recovery(recovery_id))
            if rec is None or rec.state not in sagas.RECOVERY_UNSETTLED_STATES:
                return "gone"
            assert rec.diameter_session_id is not None and rec.in_node is not None
            op = InOperation(
                InAction.DIRECT_DEBITING,
                msisdn,
                rec.in_node,
                rec.requested_minor,
                rec.diameter_session_id,
                rec.request_number,
                retransmission=True,
            )
            result = await call_in(self.in_port, op)
            if result.outcome is InOutcome.DONE:
                now = self.clock()

                def settle_recovery(tx: LedgerTx) -> PaybackOutcome:
                    settled = settle_recovery_done(tx, recovery_id, result, self.policy, now)
                    if self.policy.protection.recovery_sms:
                        language = self._language_in(tx, msisdn)
                        self.notifier.put(tx, payback_notice(msisdn, settled, language), now)
                    return settled

                outcome = await self.ledger.write(settle_recovery)
                self.events.emit(
                    "payback",
                    msisdn=msisdn,
                    recovery_id=recovery_id,
                    recovered_minor=outcome.recovered_minor,
                    debt_after_minor=outcome.debt_minor,
                    full=outcome.debt_minor == 0,
                    resolved=True,
                    event_id=rec.event_id,
                    in_node=rec.in_node,
                )
                self.notifier.wake()  # the payback_notice, written with the settlement
                return "settled"
            if result.outcome is InOutcome.REFUSED:
                await self.ledger.write(
                    lambda tx: settle_recovery_failed(tx, recovery_id, result, self.clock())
                )
                return "settled"
            if rec.state != sagas.UNKNOWN:
                await self.ledger.write(
                    lambda tx: tx.set_recovery_state(recovery_id, sagas.UNKNOWN, self.clock())
                )
            return await self._unresolved("recoveries", recovery_id, msisdn)

