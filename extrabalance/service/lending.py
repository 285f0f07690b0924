"""Borrowing and out-of-balance advances: the lending use cases as sagas.

borrow: idempotency check → decide → record the intent (loan CREDITING with its own
Session-Id) in one commit → IN REFUND_ACCOUNT → settle ACTIVE / FAILED / UNKNOWN in
one commit → tell the subscriber. Decision and intent are written in the same
transaction, so the ceiling holds even if two nodes shared the ledger; inside one
node requests for one subscriber are also serialised by `SubscriberLocks`.

out_of_balance: answered from the ledger alone, idempotent by Session-Id +
CC-Request-Number. A granted advance is answered 2001 + Granted-Service-Unit, and
that grant IS the credit (RFC 4006 §5.1, §8.17): a standard IN applies it, so the
node books the advance ACTIVE and sends nothing else for it. The IN's retransmission
of the same request (same Session-Id and CC-Request-Number, T flag) is answered
with the same grant and books nothing new.

Opt-in extension, per IN node (`advance_confirmation_nodes`, off by default): for an
IN that implements docs/diameter.md "Advance confirmation extension", the advance is
booked CONFIRMING and confirmed with a REFUND_ACCOUNT under the IN's own Session-Id
and CC-Request-Number (`confirm_advance`); that IN keys the CCA's grant and the
confirmation as one operation, so it credits once whichever arrives. Sent to any
other IN, such a confirmation is a second credit: never by default.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any

import structlog

from extrabalance.core import sagas
from extrabalance.core.fees import fee_for
from extrabalance.core.lending import (
    BorrowRequest,
    Channel,
    Granted,
    Offer,
    OfferTier,
    decide,
    offer,
)
from extrabalance.core.limits import Limit
from extrabalance.core.model import SubscriberState
from extrabalance.core.policy import MONEY, Bundle, Policy
from extrabalance.core.reasons import Reason
from extrabalance.core.segments import match_segment
from extrabalance.service.ads import AdTrigger, Advertiser
from extrabalance.service.limits import current_limit, limit_edr, with_limit
from extrabalance.service.locks import SubscriberLocks
from extrabalance.service.outcomes import (
    AdvanceDecision,
    AdvanceOutcome,
    BorrowOutcome,
    BorrowStatus,
    SubscriberStatus,
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
    Notifier,
)
from extrabalance.service.protection import (
    ADS_OPT_IN,
    ADS_OPT_OUT,
    AUTO_ADVANCE_OFF,
    AUTO_ADVANCE_ON,
    AUTO_ADVANCE_REQUESTED,
    LOAN_CONFIRM_REQUESTED,
    LOAN_CONSENT,
    LOAN_REFUSED,
    WHO_NODE,
    WHO_SUBSCRIBER,
    audit_consent,
    figures,
    pending_request,
    with_loan_times,
)
from extrabalance.service.routing import RouteProber, Router
from extrabalance.service.unit_of_work import LedgerTx, UnitOfWork

if TYPE_CHECKING:  # the row type the port's loan operations return
    from extrabalance.ledger.store import LoadedSubscriber, LoanRow

log = structlog.get_logger(__name__)

# A menu asked for while an operation of the same subscriber is finishing (a loan
# answered on USSD whose settlement is being made durable, a payback) waits this long
# for it, so the screen shows the result rather than "a request is in progress".
SETTLED_READ_WAIT_S = 0.5

NOT_EXECUTED_RESENDS_MAX = 2  # immediate re-sends of a 3002/3004 before giving up
# Background confirmation of an advance: sends before the resolver takes over, and the
# pauses between them (the first send goes right after the CCA; later ones carry the T
# flag). At most CONFIRMATIONS_INFLIGHT_MAX run at once; beyond that the advance waits
# CONFIRMING for the resolver (it is durable, nothing is lost).
CONFIRM_RETRY_DELAYS_S = (0.5, 2.0)
CONFIRMATIONS_INFLIGHT_MAX = 1_000
CC_REQUEST_TYPE_UPDATE = 2
CC_REQUEST_TYPE_TERMINATION = 3
BARRED_REASONS = (Reason.BARRED_BAD_DEBT, Reason.BARRED_MANUAL)

Clock = Callable[[], datetime]


async def call_in(in_port: InPort, op: InOperation) -> InResult:
    """Execute on the IN; an adapter that raises is treated as a lost answer, so the
    resolver (not a guess) settles the operation."""
    try:
        return await in_port.execute(op)
    except Exception:
        log.exception("in_port_failed", session_id=op.session_id)
        return InResult(InOutcome.UNKNOWN)


async def call_in_with_resends(in_port: InPort, op: InOperation) -> InResult:
    """Send, re-sending a 3002/3004 (not executed) a bounded number of times."""
    result = await call_in(in_port, op)
    for _ in range(NOT_EXECUTED_RESENDS_MAX):
        if result.outcome is not InOutcome.NOT_EXECUTED:
            break
        result = await call_in(in_port, op)
    return result


async def safe_notify(notifier: Notifier, notice: Notice) -> None:
    try:
        await notifier.notify(notice)
    except Exception:
        log.exception("notify_failed", template=notice.template)


def borrow_key(idempotency_key: str) -> str:
    return f"borrow:{idempotency_key}"


def outcome_of_loan(loan: LoanRow, debt_minor: int) -> BorrowOutcome:
    """The borrow answer a loan row stands for (used for replays and the resolver)."""
    if loan.state in sagas.LOAN_UNSETTLED_STATES:
        status, reason = BorrowStatus.PENDING, Reason.IN_UNAVAILABLE
    elif loan.state == sagas.FAILED:
        status, reason = BorrowStatus.REFUSED, Reason.IN_REFUSED
    else:
        status, reason = BorrowStatus.GRANTED, None
    return BorrowOutcome(
        status, reason, loan.loan_id, loan.tier_id, loan.principal_minor, loan.fee_minor, debt_minor
    )


def refused_advance(loan_id: str, *, replayed: bool = False) -> AdvanceOutcome:
    """The answer to an advance the IN refused when it was confirmed: 4012, nothing granted."""
    return AdvanceOutcome(
        AdvanceDecision.NO_ADVANCE, None, Reason.IN_REFUSED, loan_id, replayed=replayed
    )


def reverse_never_credited(tx: LedgerTx, loan_id: str, now: datetime, *, who: str,
                           why: str) -> LoanRow:
    """Reverse an automatic advance the IN never applied (its answer never reached it,
    or its records lack it), in the caller's unit of work: the loan FAILED with its
    reversing journal entry, its request answered 4012 from now on (a late re-send must
    not grant it again), an undelivered answer's mark closed, an audit line."""
    settled = tx.settle_advance(loan_id, False, now, never_credited=True)
    if settled.idempotency_key:
        tx.idempotent_replace(settled.idempotency_key, refused_advance(loan_id).to_json(), now)
    tx.close_answer_mark(loan_id, now)
    tx.audit(settled.msisdn, "advance_reversed", who, why, now)
    return settled


def advance_outcome_of_loan(loan: LoanRow) -> AdvanceOutcome:
    """The CCA a granted advance stands for, for a retransmitted CCR: the grant again,
    or 4012 once its confirmation was refused (as `confirm_advance` records it)."""
    if loan.state == sagas.FAILED:
        return refused_advance(loan.loan_id, replayed=True)
    return AdvanceOutcome(AdvanceDecision.ADVANCED, loan.principal_minor, None, loan.loan_id,
                          replayed=True)


def settle_borrow(
    tx: LedgerTx, loan_id: str, result: InResult, now: datetime
) -> BorrowOutcome:
    """Settle a CREDITING/UNKNOWN loan from the IN's answer (saga step 3 / resolver)."""
    if result.outcome is InOutcome.DONE:
        new_state = sagas.ACTIVE
    elif result.outcome is InOutcome.REFUSED:
        new_state = sagas.FAILED
    else:
        new_state = sagas.UNKNOWN
    loan = tx.settle_loan(loan_id, new_state, now, result_code=result.result_code)
    outcome = outcome_of_loan(loan, tx.debt_owed(loan.msisdn))
    if new_state != sagas.UNKNOWN and loan.idempotency_key:
        tx.idempotent_replace(loan.idempotency_key, outcome.to_json(), now)
    return outcome


def loan_notice(outcome: BorrowOutcome, msisdn: str, language: str,
                bundle: Bundle | None = None) -> Notice:
    if outcome.status is BorrowStatus.GRANTED and bundle is not None:
        return Notice(
            msisdn,
            "loan_granted_bundle",
            {"amount": outcome.amount_minor, "fee": outcome.fee_minor, "debt": outcome.debt_minor,
             "bundle": bundle.as_param()},
            "sms",
            language,
        )
    if outcome.status is BorrowStatus.GRANTED:
        return Notice(
            msisdn,
            "loan_granted",
            {"amount": outcome.amount_minor, "fee": outcome.fee_minor, "debt": outcome.debt_minor},
            "sms",
            language,
        )
    if outcome.status is BorrowStatus.PENDING:
        return Notice(msisdn, "loan_pending", {"amount": outcome.amount_minor}, "sms", language)
    reason = outcome.reason.value if outcome.reason else ""
    return Notice(msisdn, "loan_refused", {"reason": reason}, "sms", language)


class ConfirmStatus(Enum):
    CONFIRMED = "CONFIRMED"  # the IN has the credit (applied now or from the CCA): ACTIVE
    REFUSED = "REFUSED"  # the IN refused it, so never credited it: FAILED, reversed
    UNKNOWN = "UNKNOWN"  # no final answer (timeout, 3002/3004, no peer): still CONFIRMING
    GONE = "GONE"  # not CONFIRMING any more (settled by someone else)


async def confirm_advance(
    ledger: UnitOfWork,
    in_port: InPort,
    events: EventSink,
    locks: SubscriberLocks,
    clock: Clock,
    loan_id: str,
    msisdn: str,
    *,
    retransmission: bool,
) -> ConfirmStatus:
    """Confirm one CONFIRMING advance with its IN and settle it.

    Sends REFUND_ACCOUNT for the advance's principal with the Session-Id and
    CC-Request-Number of the IN's out-of-balance CCR (stored with the loan). The IN
    keys operations by that pair, so this credits the subscriber only if the CCA's
    grant was never applied. `retransmission` sets the T flag (a re-send, or a send
    after a crash that may have happened after an earlier send).
    """
    async with locks.hold(msisdn):
        loan = await ledger.read(lambda tx: tx.get_loan(loan_id))
        if loan is None or loan.state != sagas.CONFIRMING:
            return ConfirmStatus.GONE
        if loan.diameter_session_id is None or loan.in_node is None:
            log.error("advance_without_key", loan_id=loan_id)  # never written so
            return ConfirmStatus.UNKNOWN
        op = InOperation(
            InAction.REFUND_ACCOUNT,
            msisdn,
            loan.in_node,
            loan.principal_minor,
            loan.diameter_session_id,
            loan.request_number,
            retransmission=retransmission,
        )
        result = await call_in_with_resends(in_port, op)
        if result.outcome not in (InOutcome.DONE, InOutcome.REFUSED):
            # Unknown, or 3002/3004 on every send: the CCA's grant may have been
            # applied, so this is never a refusal; the advance stays CONFIRMING.
            return ConfirmStatus.UNKNOWN
        confirmed = result.outcome is InOutcome.DONE
        now = clock()

        def settle(tx: LedgerTx) -> int:
            row = tx.settle_advance(loan_id, confirmed, now, result_code=result.result_code)
            if not confirmed and row.idempotency_key:
                # A late retransmission of the IN's CCR must not grant it again.
                refused = refused_advance(loan_id)
                tx.idempotent_replace(row.idempotency_key, refused.to_json(), now)
            return tx.debt_owed(msisdn)

        debt_minor = await ledger.write(settle)
        events.emit(
            "advance_confirmed" if confirmed else "advance_reversed",
            msisdn=msisdn,
            loan_id=loan_id,
            amount_minor=loan.principal_minor,
            fee_minor=loan.fee_minor,
            debt_after_minor=debt_minor,
            result_code=result.result_code,
        )
        return ConfirmStatus.CONFIRMED if confirmed else ConfirmStatus.REFUSED


def _relay(saga: asyncio.Task[BorrowOutcome], answer: asyncio.Future[BorrowOutcome]) -> None:
    """A saga that ends before it answered early (a refusal, a replay, an error)
    answers with how it ended."""
    if answer.done():
        if not saga.cancelled():
            saga.exception()  # seen (and logged by the saga) once answered
        return
    if saga.cancelled():
        answer.cancel()
    elif (exc := saga.exception()) is not None:
        answer.set_exception(exc)
    else:
        answer.set_result(saga.result())


@dataclass(frozen=True, slots=True)
class _Intent:
    loan_id: str
    in_node: str
    amount_minor: int
    language: str
    limit: Limit | None = None  # his limit from behaviour, for the EDR
    bundle: Bundle | None = None  # a bundle tier: credited in its units at the IN


class LendingService:
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
        default_language: str = "en",
        ads: Advertiser | None = None,  # without one, no advertisement is sent
        prober: RouteProber | None = None,  # without one, no dynamic routing
        follow_up: FollowUp | None = None,
        confirm_retry_delays_s: tuple[float, ...] = CONFIRM_RETRY_DELAYS_S,
        confirmations_max: int = CONFIRMATIONS_INFLIGHT_MAX,
        advance_confirmation_nodes: frozenset[str] = frozenset(),
    ) -> None:
        self.ledger = ledger
        self.in_port = in_port
        self.notifier = notifier
        self.events = events
        self.policy = policy
        self.router = router
        self.clock = clock
        self.locks = locks
        self.prober = prober  # dynamic routing for unknown subscribers
        # CHECK_BALANCE asked before a loan ([eligibility].max_balance_to_borrow_minor)
        self.balance_checks = {"asked": 0, "above_limit": 0, "unanswered": 0}
        self.default_language = default_language
        self.ads = ads
        self.confirm_retry_delays_s = confirm_retry_delays_s
        self.confirmations_max = confirmations_max
        # Origin-Hosts of the IN nodes that implement the confirmation extension
        # (config `in_nodes[].advance_confirmation`); every other IN gets none.
        self.advance_confirmation_nodes = advance_confirmation_nodes
        self._confirmations: set[asyncio.Task[None]] = set()
        # Resolver.follow_up (the bootstrap passes it): a loan left UNKNOWN (no answer
        # within the request timeout) is re-sent after the Tx-timer delays, not 30 s later.
        self.follow_up = follow_up
        self._sagas: set[asyncio.Task[BorrowOutcome]] = set()

    # -- borrow ------------------------------------------------------------------

    async def borrow(
        self,
        msisdn: str,
        tier_id: int | None,
        channel: Channel,
        idempotency_key: str,
        *,
        answer_early: bool = False,
        kind: str = MONEY,
    ) -> BorrowOutcome:
        """Lend `tier_id` (None: the largest of `kind` that fits) and credit it on the IN.

        Exactly once per `idempotency_key`: a replay returns the first outcome (or the
        loan's current settlement) with `replayed=True` and moves no money.

        `answer_early` (the USSD final screen): return once the IN's answer is settled
        in the ledger's open transaction, without waiting for that transaction's
        fsync; the saga then finishes on its own (durability, EDR, SMS). Safe because
        the intent was durable before the IN was asked: a settlement lost with its
        batch (crash, failed COMMIT) leaves the loan CREDITING, and the resolver
        settles it from the IN, which answers the same Session-Id with its first
        answer. A replay meanwhile is answered from the writer's connection, which
        already sees the settlement.
        """
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[BorrowOutcome] | None = (
            loop.create_future() if answer_early else None
        )
        # Once started, the saga runs to its settlement even if the caller gives up
        # (USSD dialog timeout, connection closed): a task of its own, shielded.
        saga = loop.create_task(
            self._borrow(msisdn, tier_id, channel, idempotency_key, answer, kind))
        self._sagas.add(saga)
        saga.add_done_callback(self._sagas.discard)
        if answer is None:
            return await asyncio.shield(saga)
        saga.add_done_callback(lambda task: _relay(task, answer))
        return await asyncio.shield(answer)

    async def drain_sagas(self) -> None:
        """Wait for the loans still running (graceful stop, tests): a loan answered
        early finishes its durability, EDR and SMS here."""
        while self._sagas:
            await asyncio.gather(*list(self._sagas), return_exceptions=True)

    async def _borrow(
        self,
        msisdn: str,
        tier_id: int | None,
        channel: Channel,
        idempotency_key: str,
        answer: asyncio.Future[BorrowOutcome] | None = None,
        kind: str = MONEY,
    ) -> BorrowOutcome:
        key = borrow_key(idempotency_key)
        async with self.locks.hold(msisdn):
            now = self.clock()
            session_id = self.in_port.new_session_id()
            static_node = self.router.route(msisdn)
            if static_node is None and self.prober is not None:
                static_node = await self._probe_route(msisdn, now)
            above = await self._balance_above_limit(msisdn, static_node, channel)
            limits: list[Limit] = []  # his limit from behaviour, when that policy is on

            def record_intent(tx: LedgerTx) -> BorrowOutcome | _Intent:
                # His state first: on PostgreSQL this takes his row lock, so the replay
                # checks below see a request another node booked a moment ago.
                loaded = tx.load_subscriber(msisdn, default_language=self.default_language)
                prior = tx.idempotent_get(key)
                if prior is not None:
                    return BorrowOutcome.from_json(prior, replayed=True)
                loan = tx.loan_by_idempotency_key(key)
                if loan is not None:  # intent not settled yet, or its outcome purged
                    return replace(
                        outcome_of_loan(loan, tx.debt_owed(msisdn)), replayed=True
                    )
                in_node = loaded.learned_in_node or static_node
                if in_node is None:
                    refused = BorrowOutcome(
                        BorrowStatus.REFUSED,
                        Reason.UNKNOWN_SUBSCRIBER,
                        debt_minor=loaded.state.debt_minor,
                    )
                    tx.idempotent_put(key, refused.to_json(), now)
                    if channel != "auto":
                        self.notifier.put(tx, loan_notice(refused, msisdn, loaded.state.language), now)
                    return refused
                state = loaded.state
                if above is not None:  # the IN says: more than the limit left
                    state = replace(state, balance_minor=above)
                state, limit = with_limit(tx, state, self.policy, now)
                limits.extend([limit] if limit else [])
                state = with_loan_times(tx, state, self.policy, now)
                decision = decide(BorrowRequest(msisdn, tier_id, channel, kind), state,
                                  self.policy, now)
                if not isinstance(decision, Granted):
                    if channel != "auto":
                        audit_consent(tx, self.policy, msisdn, LOAN_REFUSED, channel, now,
                                      {"reason": decision.reason.value, "tier_id": tier_id},
                                      who="node", why=decision.detail)
                    refused = BorrowOutcome(
                        BorrowStatus.REFUSED,
                        decision.reason,
                        tier_id=tier_id,
                        debt_minor=loaded.state.debt_minor,
                    )
                    tx.idempotent_put(key, refused.to_json(), now)
                    if channel != "auto":
                        self.notifier.put(tx, loan_notice(refused, msisdn, loaded.state.language), now)
                    return refused
                bundle = decision.tier.bundle
                # A bundle's units are booked with the loan: every send of its credit
                # (re-sends, the resolver's) asks for these, whatever the tier says later.
                loan_id = tx.insert_loan(
                    msisdn=msisdn,
                    tier_id=decision.tier.tier_id,
                    principal_minor=decision.amount_minor,
                    fee_minor=decision.fee_minor,
                    state=sagas.CREDITING,
                    channel=channel,
                    idempotency_key=key,
                    in_node=in_node,
                    session_id=session_id,
                    now=now,
                    subscriber_known=loaded.known,
                    bundle=bundle,
                )
                if channel != "auto":  # what he agreed to, with the loan it asked for
                    audit_consent(tx, self.policy, msisdn, LOAN_CONSENT, channel, now, {
                        "tier_id": decision.tier.tier_id, "loan_id": loan_id,
                        **figures(decision.amount_minor, decision.fee_minor),
                        **({"bundle": bundle.as_param()} if bundle else {})})
                return _Intent(loan_id, in_node, decision.amount_minor, loaded.state.language,
                               limits[0] if limits else None, bundle)

            step = await self.ledger.write(record_intent)
            if isinstance(step, BorrowOutcome):
                if not step.replayed and step.status is BorrowStatus.REFUSED:
                    self.events.emit(
                        "refusal",
                        msisdn=msisdn,
                        reason=_v(step.reason),
                        channel=channel,
                        tier_id=tier_id,
                        **limit_edr(limits[0] if limits else None),
                    )
                    if channel != "auto":
                        self.notifier.wake()
                return step

            return await self._credit(msisdn, channel, step, session_id, answer)

    async def _credit(
        self,
        msisdn: str,
        channel: str,
        step: _Intent,
        session_id: str,
        answer: asyncio.Future[BorrowOutcome] | None = None,
    ) -> BorrowOutcome:
        op = InOperation(
            InAction.REFUND_ACCOUNT, msisdn, step.in_node, step.amount_minor, session_id,
            bundle=step.bundle,
        )
        result = await call_in_with_resends(self.in_port, op)
        if result.outcome is InOutcome.NOT_EXECUTED:
            # Every send was refused before execution: nothing credited, nothing owed.
            result = InResult(InOutcome.REFUSED, result.result_code)
        now = self.clock()

        def settle(tx: LedgerTx) -> BorrowOutcome:
            settled = settle_borrow(tx, step.loan_id, result, now)
            # The message that reports it, in the same commit (sent after, never awaited).
            self.notifier.put(tx, loan_notice(settled, msisdn, step.language, step.bundle), now)
            return settled

        if answer is None:
            outcome = await self.ledger.write(settle)
        else:
            outcome, durable = await self.ledger.write_staged(settle)
            if not answer.done():
                answer.set_result(outcome)
            try:
                await durable
            except Exception as exc:
                log.error("loan_settlement_lost", loan_id=step.loan_id, error=repr(exc))
                raise
        self._emit_loan(msisdn, outcome, channel, result, step.limit, step.bundle)
        if outcome.status is BorrowStatus.PENDING and self.follow_up is not None:
            self.follow_up("loan", step.loan_id, msisdn)
        self.notifier.wake()
        if self.ads is not None and outcome.status is BorrowStatus.GRANTED:  # issue 7
            total_minor = (outcome.amount_minor or 0) + (outcome.fee_minor or 0)
            self.ads.fire_after_loan(msisdn, outcome.debt_minor - total_minor, outcome.debt_minor)
        return outcome

    def _emit_loan(
        self,
        msisdn: str,
        outcome: BorrowOutcome,
        channel: str,
        result: InResult,
        limit: Limit | None = None,
        bundle: Bundle | None = None,
    ) -> None:
        units = bundle_edr(bundle)
        if outcome.status is BorrowStatus.GRANTED:
            self.events.emit(
                "loan",
                msisdn=msisdn,
                loan_id=outcome.loan_id,
                tier_id=outcome.tier_id,
                amount_minor=outcome.amount_minor,
                fee_minor=outcome.fee_minor,
                debt_after_minor=outcome.debt_minor,
                channel=channel,
                **limit_edr(limit),
                **units,
            )
        elif outcome.status is BorrowStatus.REFUSED:
            self.events.emit(
                "refusal",
                msisdn=msisdn,
                reason=_v(outcome.reason),
                channel=channel,
                result_code=result.result_code,
                loan_id=outcome.loan_id,
                **units,
            )
        else:
            self.events.emit("loan_pending", msisdn=msisdn, loan_id=outcome.loan_id,
                             channel=channel, **units)

    async def _language(self, msisdn: str) -> str:
        loaded = await self.ledger.read_point(
            lambda tx: tx.load_subscriber(msisdn, default_language=self.default_language)
        )
        return loaded.state.language

    # -- reads and preferences -----------------------------------------------------

    def record_refusal(self, msisdn: str, reason: str, channel: str) -> None:
        """A refusal a channel decided from the offer before any borrow (the USSD menu
        of a subscriber who may not borrow): the same EDR and counter as a borrow's."""
        self.events.emit("refusal", msisdn=msisdn, reason=reason, channel=channel)

    async def quote(self, msisdn: str) -> Offer:
        """The menu of tiers for this subscriber now (USSD *123#)."""
        return (await self.overview(msisdn))[1]

    async def status(self, msisdn: str) -> SubscriberStatus:
        return (await self.overview(msisdn))[0]

    async def overview(self, msisdn: str) -> tuple[SubscriberStatus, Offer]:
        """The subscriber's status and his menu of tiers, from one read (a USSD dialog
        opens with both)."""
        await self.locks.settled(msisdn, SETTLED_READ_WAIT_S)
        now = self.clock()

        def read(tx: LedgerTx) -> tuple[LoadedSubscriber, Limit | None]:
            loaded = tx.load_subscriber(msisdn, default_language=self.default_language)
            if self.policy.protection.counts_loans:  # the menu shows a cap or a pause
                loaded = replace(loaded, state=with_loan_times(tx, loaded.state, self.policy, now))
            return loaded, current_limit(tx, loaded.state, self.policy, now)

        loaded, limit = await self.ledger.read_point(read)
        s = loaded.state
        if limit is not None:
            s = replace(s, limit_minor=limit.limit_minor)
        quote = offer(s, self.policy, now)
        barred_reason = quote.reason if quote.reason in BARRED_REASONS else None
        return SubscriberStatus(
            msisdn=msisdn,
            known=loaded.known,
            debt_minor=s.debt_minor,
            open_loans=s.open_loans,
            operation_pending=s.operation_pending,
            barred=barred_reason is not None,
            barred_reason=barred_reason,
            auto_advance_opt_in=s.auto_advance_opt_in,
            ads_opt_out=s.ads_opt_out,
            language=s.language,
            in_node=loaded.learned_in_node or self.router.static_route(msisdn),
            limit=limit,
        ), quote

    async def set_preferences(
        self,
        msisdn: str,
        *,
        auto_advance: bool | None = None,
        ads_opt_out: bool | None = None,
        language: str | None = None,
        channel: str = "ussd",
    ) -> str | None:
        """Change his preferences, each change on his consent trail when the policy keeps
        one. Turning automatic advances on under a double opt-in changes nothing yet:
        an SMS asks him to reply YES (`confirm_by_reply`), and "confirm_by_sms" is
        returned so the screen can say so."""
        now = self.clock()
        protection = self.policy.protection

        def change(tx: LedgerTx) -> str | None:
            auto = auto_advance
            waits: str | None = None
            if auto and protection.double_opt_in:
                loaded = tx.load_subscriber(msisdn, default_language=self.default_language)
                if not loaded.state.auto_advance_opt_in:
                    self._ask_auto_advance(tx, loaded.state, channel, now)
                    auto, waits = None, "confirm_by_sms"
            tx.set_preferences(msisdn, now, auto_advance=auto, ads_opt_out=ads_opt_out,
                               language=language)
            if auto is not None:
                audit_consent(tx, self.policy, msisdn,
                              AUTO_ADVANCE_ON if auto else AUTO_ADVANCE_OFF, channel, now)
            if ads_opt_out is not None:
                audit_consent(tx, self.policy, msisdn,
                              ADS_OPT_OUT if ads_opt_out else ADS_OPT_IN, channel, now)
            return waits

        waits = await self.ledger.write(change)
        if waits is not None:
            self.notifier.wake()
        return waits

    def _ask_auto_advance(
        self, tx: LedgerTx, state: SubscriberState, channel: str, now: datetime
    ) -> None:
        """The double opt-in's first step: the request on his trail, and the SMS that
        names the advance and its fee and asks for YES (in the same commit)."""
        amount_minor = fee_minor = 0
        segment = match_segment(state.profile, self.policy.segments)
        tier = self.policy.tiers.get(self.policy.auto_advance_tier_id or 0)
        if segment is not None and tier is not None:
            amount_minor = tier.amount_minor
            fee_minor = fee_for(tier, self.policy.fee_plans[segment.fee_plan])
        shown = figures(amount_minor, fee_minor)
        tx.audit(state.msisdn, AUTO_ADVANCE_REQUESTED, WHO_SUBSCRIBER, channel, now,
                 {"channel": channel, **shown})
        self.notifier.put(tx, Notice(state.msisdn, "opt_in_confirm_sms", {
            "amount": amount_minor, "fee": fee_minor, "fee_percent": shown["fee_percent"],
            "minutes": self.policy.protection.confirm_ttl_s // 60}, "sms", state.language), now)

    async def record_consent(
        self, msisdn: str, action: str, channel: str, detail: dict[str, Any] | None = None
    ) -> None:
        """A consent line a channel decided: he cancelled on the confirm screen, or the
        menu refused him before any borrow (written as the node's)."""
        if not self.policy.protection.keeps_trail:
            return
        now = self.clock()
        who = WHO_NODE if action == LOAN_REFUSED else WHO_SUBSCRIBER
        await self.ledger.write(
            lambda tx: audit_consent(tx, self.policy, msisdn, action, channel, now, detail,
                                     who=who))

    async def sms_loan(
        self, msisdn: str, tier_id: int | None, idempotency_key: str, *, kind: str = MONEY
    ) -> BorrowOutcome | None:
        """An SMS `LOAN [n]`: lent at once, or, with `[protection] sms_confirm`, answered
        by an SMS with the amount, the fee and its percentage, and lent only on his
        reply YES (`confirm_by_reply`). None: the confirmation was asked for. A request
        the node would refuse is refused at once (its SMS, EDR and trail line)."""
        protection = self.policy.protection
        if not protection.sms_confirm:
            return await self.borrow(msisdn, tier_id, "sms", idempotency_key, kind=kind)
        status, quote = await self.overview(msisdn)
        tier = _offered(quote, tier_id, kind)
        if tier is None:
            return await self.borrow(msisdn, tier_id, "sms", idempotency_key, kind=kind)
        async with self.locks.hold(msisdn):
            now = self.clock()
            ask_key = f"smsask:{idempotency_key}"

            def ask(tx: LedgerTx) -> None:
                if tx.idempotent_get(ask_key) is not None:
                    return  # the SMSC's re-send of the same LOAN: asked already
                tx.idempotent_put(ask_key, {"asked": True}, now)
                shown = figures(tier.amount_minor, tier.fee_minor)
                bundle = {"bundle": tier.bundle.as_param()} if tier.bundle else {}
                tx.audit(msisdn, LOAN_CONFIRM_REQUESTED, WHO_SUBSCRIBER, "sms", now,
                         {"channel": "sms", "tier_id": tier.tier_id, **shown, **bundle})
                self.notifier.put(tx, Notice(
                    msisdn, "loan_confirm_sms_bundle" if bundle else "loan_confirm_sms", {
                        "amount": tier.amount_minor, "fee": tier.fee_minor,
                        "fee_percent": shown["fee_percent"], "total": tier.total_minor,
                        "minutes": protection.confirm_ttl_s // 60, **bundle},
                    "sms", status.language), now)

            await self.ledger.write(ask)
        self.notifier.wake()
        return None

    async def confirm_by_reply(self, msisdn: str) -> str | None:
        """His SMS `YES`: completes the request waiting on his trail (an SMS loan, or
        the double opt-in to automatic advances). Returns the template to answer with
        when nothing was waiting ("nothing_to_confirm"); else None (the outcome goes by
        SMS). A loan is asked for with a key made of the request's audit id: a second
        YES to the same request lends nothing more."""
        now = self.clock()
        request = await self.ledger.read_point(
            lambda tx: pending_request(tx, msisdn, self.policy, now))
        if request is None:
            return "nothing_to_confirm"
        if request.action == LOAN_CONFIRM_REQUESTED:
            tier_id = int(request.detail["tier_id"])
            _status, quote = await self.overview(msisdn)
            tier = _offered(quote, tier_id)
            if tier is not None and (tier.amount_minor, tier.fee_minor) != (
                    request.detail.get("amount_minor"), request.detail.get("fee_minor")):
                # The tariff changed since he was asked: he is asked again with the new
                # figures, never charged a fee he was not shown.
                await self.sms_loan(msisdn, tier_id, f"reask:{request.audit_id}")
                return None
            await self.borrow(msisdn, tier_id, "sms", f"smsyes:{request.audit_id}")
            return None
        async with self.locks.hold(msisdn):
            now = self.clock()

            def turn_on(tx: LedgerTx) -> None:
                loaded = tx.load_subscriber(msisdn, default_language=self.default_language)
                tx.set_preferences(msisdn, now, auto_advance=True)
                tx.audit(msisdn, AUTO_ADVANCE_ON, WHO_SUBSCRIBER, "sms reply", now,
                         {"channel": "sms", "request": request.audit_id})
                self.notifier.put(tx, Notice(msisdn, "auto_advance_on_sms", {}, "sms",
                                             loaded.state.language), now)

            await self.ledger.write(turn_on)
        self.notifier.wake()
        return None

    async def _balance_above_limit(
        self, msisdn: str, in_node: str | None, channel: str
    ) -> int | None:
        """[eligibility].max_balance_to_borrow_minor, asked of the subscriber's IN: a
        CHECK_BALANCE (RFC 4006 §5.2.3, Requested-Action 2, moves no money) for the
        limit + 1. ENOUGH_CREDIT means the balance is above the limit: returns
        limit + 1 (the least the balance is), else None. An IN that does not answer
        leaves the rule unapplied (the loan itself then goes to that IN anyway).
        Automatic advances are asked for by the IN when the balance is out: not asked."""
        eligibility = self.policy.eligibility
        limit = eligibility.max_balance_to_borrow_minor
        if (limit is None or not eligibility.check_balance_at_in or in_node is None
                or channel == "auto"):
            return None
        op = InOperation(InAction.CHECK_BALANCE, msisdn, in_node, limit + 1,
                         self.in_port.new_session_id())
        self.balance_checks["asked"] += 1
        try:
            result = await self.in_port.execute(op)
        except Exception as exc:  # noqa: BLE001 - the rule is skipped, the loan goes on
            result = InResult(InOutcome.UNKNOWN)
            log.warning("balance_check_failed", msisdn=msisdn, error=str(exc))
        if result.outcome is not InOutcome.DONE or result.enough_credit is None:
            self.balance_checks["unanswered"] += 1
            return None
        if result.enough_credit:
            self.balance_checks["above_limit"] += 1
            return limit + 1
        return None

    async def _probe_route(self, msisdn: str, now: datetime) -> str | None:
        """No static or cached route: a learned one from the ledger, else ask the IN
        nodes (CHECK_BALANCE, moves no money) and remember the one that knows him."""
        learned = await self.ledger.read_point(lambda tx: tx.learned_route(msisdn))
        if learned is not None:
            return learned
        assert self.prober is not None
        found = await self.prober.probe(msisdn)
        if found is not None:
            await self.ledger.write(lambda tx: tx.learn_route(msisdn, found, now))
            self.router.learn(msisdn, found)
        return found

    # -- out of balance ----------------------------------------------------------

    async def out_of_balance(
        self,
        session_id: str,
        request_number: int,
        request_type: int,
        msisdn: str,
        requested_minor: int | None,
        origin_host: str,
        *,
        deadline_monotonic: float | None = None,
        used_minor: int | None = None,
    ) -> AdvanceOutcome:
        """Decide the IN's out-of-balance CCR: ADVANCED (an auto-advance), NO_ADVANCE
        (+ maybe an ad), DENIED (barred), UNKNOWN_SUBSCRIBER; the Gy adapter answers
        them 2001 + amount, 4012, 4010, 5030. A retransmission (same Session-Id
        and CC-Request-Number) gets the first answer and grants nothing new.

        A granted advance is booked ACTIVE: the grant in the CCA is the credit. Only
        for an IN in `advance_confirmation_nodes` is it booked CONFIRMING and, once
        this returns, confirmed with that IN in the background (`confirm_advance`).

        The IN applies the grant from the CCA only when the answer reaches it before
        its own timer. An advance is booked only if the commit happens before
        `deadline_monotonic` (checked in the transaction, just before the commit): past
        it, nothing is booked and TOO_LATE is answered (3004 TOO_BUSY on the wire); the IN may send the
        request again and it is then decided afresh. The deadline makes late answers
        rare; the IN's retransmission of the request (answered with the same grant)
        or, for an IN with the extension, the confirmation covers the rest."""
        key = f"ccr:{session_id}:{request_number}"
        async with self.locks.hold(msisdn):
            now = self.clock()
            static_node = self.router.static_route(msisdn)
            confirms = origin_host in self.advance_confirmation_nodes
            granted: list[LoanRow] = []  # the advance as written (spares a read after)
            evidenced: list[LoanRow] = []  # an advance the IN's session confirmed

            def answer(tx: LedgerTx) -> tuple[AdvanceOutcome, SubscriberState | None]:
                prior = tx.idempotent_get(key)
                if prior is not None:
                    replay = AdvanceOutcome.from_json(prior, replayed=True)
                    if replay.decision is AdvanceDecision.ADVANCED and replay.loan_id:
                        # Its answer may have been undelivered: the hold starts again
                        # while this one travels (service/undelivered.py).
                        tx.restart_answer_hold(replay.loan_id, now)
                    return replay, None
                advance = tx.loan_by_idempotency_key(key)
                if advance is not None:  # granted; its outcome row was purged
                    return advance_outcome_of_loan(advance), None

                def done(
                    outcome: AdvanceOutcome, state: SubscriberState | None
                ) -> tuple[AdvanceOutcome, SubscriberState | None]:
                    tx.idempotent_put(key, outcome.to_json(), now)
                    return outcome, state

                if (request_type in (CC_REQUEST_TYPE_UPDATE, CC_REQUEST_TYPE_TERMINATION)
                        and not _session_known(tx, session_id)):
                    # RFC 4006 §5.1: UPDATE and TERMINATION continue a session opened
                    # by an INITIAL (CC-Request-Number 0); none was seen.
                    return done(AdvanceOutcome(AdvanceDecision.UNKNOWN_SESSION), None)
                if request_type in (CC_REQUEST_TYPE_UPDATE, CC_REQUEST_TYPE_TERMINATION):
                    evidenced.extend(_session_evidence(
                        tx, session_id, request_type, request_number, used_minor, now))
                if request_type == CC_REQUEST_TYPE_TERMINATION:
                    return done(AdvanceOutcome(AdvanceDecision.ACKNOWLEDGED), None)
                loaded = tx.load_subscriber(msisdn, default_language=self.default_language)
                has_profile = loaded.state.profile is not None
                if static_node is None and loaded.learned_in_node is None and not has_profile:
                    unknown = AdvanceOutcome(AdvanceDecision.UNKNOWN_SUBSCRIBER, None,
                                             Reason.UNKNOWN_SUBSCRIBER)
                    return done(unknown, None)
                if loaded.learned_in_node != origin_host:
                    tx.learn_route(msisdn, origin_host, now)
                state, _limit = with_limit(tx, loaded.state, self.policy, now)
                state = with_loan_times(tx, state, self.policy, now)
                decision = decide(BorrowRequest(msisdn, None, "auto"), state, self.policy, now)
                if isinstance(decision, Granted):
                    if deadline_monotonic is not None and time.monotonic() > deadline_monotonic:
                        late = AdvanceOutcome(AdvanceDecision.TOO_LATE, None,
                                              Reason.IN_UNAVAILABLE)
                        return late, None
                    loan_id = tx.insert_loan(
                        msisdn=msisdn,
                        tier_id=decision.tier.tier_id,
                        principal_minor=decision.amount_minor,
                        fee_minor=decision.fee_minor,
                        state=sagas.CONFIRMING if confirms else sagas.ACTIVE,
                        channel="auto",
                        idempotency_key=key,
                        in_node=origin_host,
                        session_id=session_id,
                        now=now,
                        request_number=request_number,
                        subscriber_known=True,  # load_subscriber or learn_route wrote it
                    )
                    loan = tx.get_loan(loan_id)
                    if loan is not None:
                        granted.append(loan)
                    debt_minor = loaded.state.debt_minor + decision.amount_minor + decision.fee_minor
                    self.notifier.put(tx, Notice(
                        msisdn,
                        "advance_granted",
                        {"amount": decision.amount_minor, "fee": decision.fee_minor,
                         "debt": debt_minor},
                        "sms",
                        loaded.state.language,
                    ), now)
                    return done(
                        AdvanceOutcome(AdvanceDecision.ADVANCED, decision.amount_minor, None, loan_id),
                        loaded.state,
                    )
                if decision.reason in BARRED_REASONS:
                    return done(
                        AdvanceOutcome(AdvanceDecision.DENIED, None, decision.reason),
                        loaded.state,
                    )
                return done(
                    AdvanceOutcome(AdvanceDecision.NO_ADVANCE, None, decision.reason),
                    loaded.state,
                )

            outcome, state = await self.ledger.write(answer)
            for loan in evidenced:
                self.events.emit("advance_session_evidence", msisdn=loan.msisdn,
                                 loan_id=loan.loan_id, in_node=origin_host, channel="auto",
                                 detail=f"{session_id};{request_type};{request_number};"
                                        f"{'' if used_minor is None else used_minor}")
            if outcome.replayed or outcome.decision is AdvanceDecision.TOO_LATE:
                return outcome
            if outcome.decision not in (AdvanceDecision.UNKNOWN_SUBSCRIBER,
                                        AdvanceDecision.UNKNOWN_SESSION):
                self.router.learn(msisdn, origin_host)
            if state is not None:
                await self._after_advance(
                    msisdn, outcome, state, requested_minor, now, granted[0] if granted else None
                )
        if granted and confirms:
            # After the lock is released: the confirmation takes it again and reads
            # the ledger first, so the CCA normally leaves before it; if the
            # confirmation overtakes the CCA, the IN applies the grant only once anyway.
            self._confirm_in_background(msisdn, granted[0].loan_id)
        return outcome

    # -- advance confirmation ----------------------------------------------------

    def _confirm_in_background(self, msisdn: str, loan_id: str) -> None:
        if len(self._confirmations) >= self.confirmations_max:
            log.warning("advance_confirmation_deferred", loan_id=loan_id)
            return  # stays CONFIRMING; the resolver confirms it
        task = asyncio.create_task(self._confirm_with_retries(msisdn, loan_id))
        self._confirmations.add(task)
        task.add_done_callback(self._confirmations.discard)

    async def _confirm_with_retries(self, msisdn: str, loan_id: str) -> None:
        for attempt in range(len(self.confirm_retry_delays_s) + 1):
            if attempt:
                await asyncio.sleep(self.confirm_retry_delays_s[attempt - 1])
            try:
                status = await confirm_advance(
                    self.ledger, self.in_port, self.events, self.locks, self.clock,
                    loan_id, msisdn, retransmission=attempt > 0,
                )
            except Exception:
                log.exception("advance_confirmation_failed", loan_id=loan_id)
                status = ConfirmStatus.UNKNOWN
            if status is not ConfirmStatus.UNKNOWN:
                return
        log.warning("advance_confirmation_left_to_resolver", loan_id=loan_id)

    @property
    def confirmations_in_flight(self) -> int:
        return len(self._confirmations)

    async def drain_confirmations(self) -> None:
        """Wait for the background confirmations running now (shutdown, tests)."""
        while self._confirmations:
            await asyncio.gather(*list(self._confirmations), return_exceptions=True)

    def abandon_confirmations(self) -> None:
        """Cancel the background confirmations (the advances stay CONFIRMING for the
        resolver of this or the next run: nothing is lost)."""
        for task in list(self._confirmations):
            task.cancel()

    async def _after_advance(
        self,
        msisdn: str,
        outcome: AdvanceOutcome,
        state: SubscriberState,
        requested_minor: int | None,
        now: datetime,
        granted: LoanRow | None = None,
    ) -> None:
        if outcome.decision is AdvanceDecision.ADVANCED and outcome.granted_minor is not None:
            loan = granted or await self.ledger.read_point(
                lambda tx: tx.get_loan(outcome.loan_id or "")
            )
            assert loan is not None
            debt_minor = state.debt_minor + loan.principal_minor + loan.fee_minor
            self.events.emit(
                "advance",
                msisdn=msisdn,
                loan_id=loan.loan_id,
                tier_id=loan.tier_id,
                amount_minor=loan.principal_minor,
                fee_minor=loan.fee_minor,
                debt_after_minor=debt_minor,
                requested_minor=requested_minor,
                channel="auto",
            )
            self.notifier.wake()  # the advance_granted SMS, written with the advance
            if self.ads is not None:  # issue 7: debt-limit ad
                self.ads.fire_after_loan(msisdn, state.debt_minor, debt_minor)
            return
        self.events.emit(
            "refusal",
            msisdn=msisdn,
            reason=_v(outcome.reason),
            channel="auto",
            decision=outcome.decision.value,
        )
        if outcome.decision is AdvanceDecision.DENIED:
            return
        if self.ads is not None:  # caps, quiet hours, rate; the CCA does not wait
            self.ads.fire_offer(msisdn, AdTrigger.OUT_OF_BALANCE)


def _session_known(tx: LedgerTx, session_id: str) -> bool:
    """Whether the IN opened this credit-control session with an INITIAL_REQUEST
    (CC-Request-Number 0, RFC 4006 §8.2): its answer is still kept, or it granted
    an advance (kept with the loan after the answer was purged)."""
    key = f"ccr:{session_id}:0"
    return (tx.idempotent_get(key) is not None
            or tx.loan_by_idempotency_key(key) is not None)


def _session_evidence(tx: LedgerTx, session_id: str, request_type: int,
                      request_number: int, used_minor: int | None,
                      now: datetime) -> list[LoanRow]:
    """An UPDATE or TERMINATION continuing a session whose INITIAL granted an advance
    shows the IN received that CCA and applied the grant (RFC 4006 §5.2; its
    Used-Service-Unit, §8.19, reports what it consumed): recorded once on the advance,
    with an audit line. The advance if this request recorded it."""
    loan = tx.loan_by_idempotency_key(f"ccr:{session_id}:0")
    if loan is None or loan.state in (sagas.FAILED, sagas.REQUESTED):
        return []
    if not tx.record_session_evidence(loan.loan_id, session_id, request_type,
                                      request_number, used_minor, now):
        return []
    tx.audit(loan.msisdn, "advance_session_evidence", loan.in_node or "in",
             f"advance {loan.loan_id} confirmed by CC-Request-Number {request_number}"
             f" of its session", now,
             {"session_id": session_id, "request_type": request_type,
              "used_minor": used_minor})
    return [loan]


def bundle_edr(bundle: Bundle | None) -> dict[str, object]:
    """A bundle loan's units in its EDR lines (`bundle_kind`, `bundle_quantity`: the
    units booked with the loan); none for a money loan."""
    if bundle is None:
        return {}
    return {"bundle_kind": bundle.kind, "bundle_quantity": bundle.quantity}


def _offered(quote: Offer, tier_id: int | None, kind: str = MONEY) -> OfferTier | None:
    """The tier of his menu a request names (None: the largest of `kind` that fits, as
    `decide` picks it), when he may take it now; else None."""
    if not quote.eligible:
        return None
    fitting = [t for t in quote.tiers if t.fits]
    if tier_id is None:
        fitting = [t for t in fitting if (t.bundle.kind if t.bundle else MONEY) == kind]
    if tier_id is None:
        return max(fitting, key=lambda t: (t.amount_minor, t.tier_id), default=None)
    return next((t for t in fitting if t.tier_id == tier_id), None)


def _v(reason: Reason | None) -> str | None:
    return reason.value if reason else None
