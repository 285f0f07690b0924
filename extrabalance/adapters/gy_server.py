"""IN → node: the out-of-balance credit-control request (the node is the Gy server).

Translates a CCR into `LendingService.out_of_balance` and its outcome into a CCA,
as docs/protocols.md says: 2001 + Granted-Service-Unit for an automatic advance, 4012 no
advance, 4010 barred, 5030 unknown subscriber, 5031 unknown Service-Context-Id;
TERMINATION closes a session with 2001; an UPDATE or TERMINATION of a session the node
never saw (no INITIAL) is 5002 DIAMETER_UNKNOWN_SESSION_ID. A request for another
Destination-Realm is 3003, for another Destination-Host 3002 (both with the E bit); a
Requested-Service-Unit in anything but CC-Money is 5031 (nothing granted). The grant
in the CCA is the credit (docs/diameter.md). Malformed requests get the RFC's error
answer from the codec's validation; the lending service is never called for them.

Overload, three rules, each answered with 3004 DIAMETER_TOO_BUSY and the E bit (RFC
6733: the request was not executed, the IN re-sends it later without the T flag):

* at most `inflight_max` requests are inside the lending service at once (each waits
  for its subscriber's lock and a ledger commit); the next one is answered at once
  and the ledger is not touched;
* at most `per_subscriber_max` of them are for one MSISDN: they are serialised on
  that subscriber's lock anyway, so more would only queue (a flood for a handful of
  numbers used to fill the whole in-flight bound and starve every other ledger user);
* every admitted request is answered within `deadline_ms` of its arrival. An IN
  gives up after its Tx timer (RFC 4006 §13), so an answer after that is useless and
  the IN re-sends anyway. The decision is not cancelled at the deadline (a commit is
  never interrupted, and its events and SMS still happen); it runs on, counted in
  the bounds, and its outcome is what a re-send of the same Session-Id and
  CC-Request-Number gets. An advance cannot be booked after `answer_deadline_ms`
  (the lending service checks inside the transaction), and `deadline_ms` is later
  than that by at least the commit time allowed; an advance that was booked all the
  same is logged as an error (`late_advance_booked`) and counted.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from typing import Any, Protocol

import structlog

from extrabalance.diameter import gy
from extrabalance.diameter.codec import FLAG_RETRANSMIT, DiameterError, Message, error_answer
from extrabalance.diameter.constants import (
    APP_DIAMETER_CREDIT_CONTROL,
    AVP_GRANTED_SERVICE_UNIT,
    AVP_ORIGIN_HOST,
    AVP_RESULT_CODE,
    CMD_CREDIT_CONTROL,
    DIAMETER_APPLICATION_UNSUPPORTED,
    DIAMETER_COMMAND_UNSUPPORTED,
    DIAMETER_CREDIT_LIMIT_REACHED,
    DIAMETER_END_USER_SERVICE_DENIED,
    DIAMETER_RATING_FAILED,
    DIAMETER_REALM_NOT_SERVED,
    DIAMETER_SUCCESS,
    DIAMETER_TOO_BUSY,
    DIAMETER_UNABLE_TO_COMPLY,
    DIAMETER_UNABLE_TO_DELIVER,
    DIAMETER_UNKNOWN_SESSION_ID,
    DIAMETER_USER_UNKNOWN,
)
from extrabalance.service.outcomes import AdvanceDecision, AdvanceOutcome

log = structlog.get_logger(__name__)

# The lending service's decision about an out-of-balance CCR, as the CCA says it
# (RFC 4006 §9: 4010 and 4012 are its answers for a barred user and no credit; 5030
# RFC 4006 §9.1; 5002 and 3004 RFC 6733 §7.1).
RESULT_CODES: dict[AdvanceDecision, int] = {
    AdvanceDecision.ADVANCED: DIAMETER_SUCCESS,
    AdvanceDecision.ACKNOWLEDGED: DIAMETER_SUCCESS,
    AdvanceDecision.NO_ADVANCE: DIAMETER_CREDIT_LIMIT_REACHED,
    AdvanceDecision.DENIED: DIAMETER_END_USER_SERVICE_DENIED,
    AdvanceDecision.UNKNOWN_SUBSCRIBER: DIAMETER_USER_UNKNOWN,
    AdvanceDecision.UNKNOWN_SESSION: DIAMETER_UNKNOWN_SESSION_ID,
    AdvanceDecision.TOO_LATE: DIAMETER_TOO_BUSY,
}


def result_code(outcome: AdvanceOutcome) -> int:
    """The Result-Code of the CCA that answers `outcome`."""
    return RESULT_CODES[outcome.decision]
# Out-of-balance CCRs inside the lending service at once; beyond: 3004 at once.
OUT_OF_BALANCE_INFLIGHT_MAX = 512
# Of those, for one MSISDN: one request and a re-send of it. Beyond: 3004 at once.
OUT_OF_BALANCE_PER_SUBSCRIBER_MAX = 2
# Every admitted request is answered within this many advance budgets
# (`answer_deadline_ms`, 1000 ms by default → 3000 ms): 3004 if no decision yet.
DEADLINE_PER_ADVANCE_BUDGET = 3


class OutOfBalanceApi(Protocol):
    async def out_of_balance(self, session_id: str, request_number: int, request_type: int,
                             msisdn: str, requested_minor: int | None,
                             origin_host: str, *,
                             deadline_monotonic: float | None = None,
                             used_minor: int | None = None) -> AdvanceOutcome: ...


class AnswerDeliveryApi(Protocol):
    async def answer_handed(self, session_id: str, request_number: int, msisdn: str,
                            delivered: bool) -> None: ...


# Replayed grants waiting for the transport to say whether they left (each is
# reported within a loop turn or two; the bound only guards a node never wired).
REPLAYED_GRANTS_MAX = 4096


class GyServer:
    """The request handler the node's Diameter stack calls for application requests."""

    def __init__(
        self,
        lending: OutOfBalanceApi,
        *,
        origin_host: str,
        origin_realm: str,
        service_context_id: str,
        currency_numeric: int,
        currency_exponent: int,
        answer_deadline_ms: int = 1000,
        inflight_max: int = OUT_OF_BALANCE_INFLIGHT_MAX,
        per_subscriber_max: int = OUT_OF_BALANCE_PER_SUBSCRIBER_MAX,
        deadline_ms: int | None = None,
        deliveries: AnswerDeliveryApi | None = None,
    ) -> None:
        if inflight_max < 1:
            raise ValueError("inflight_max must be at least 1")
        if per_subscriber_max < 1:
            raise ValueError("per_subscriber_max must be at least 1")
        if deadline_ms is None:
            deadline_ms = answer_deadline_ms * DEADLINE_PER_ADVANCE_BUDGET
        if deadline_ms < answer_deadline_ms:
            raise ValueError("deadline_ms must not be shorter than answer_deadline_ms: an "
                             "advance booked before its deadline must still be answered")
        self._lending = lending
        # An advance must reach the IN before its Tx timer fires, or the IN never
        # credits it: past this budget nothing is booked and 3004 is answered.
        self._deadline_s = answer_deadline_ms / 1000
        # Any answer: past this, 3004 while the decision runs on (see the docstring).
        self._answer_by_s = deadline_ms / 1000
        self.inflight_max = inflight_max
        self.per_subscriber_max = per_subscriber_max
        self._inflight = 0
        self._by_msisdn: Counter[str] = Counter()  # entries only while > 0: ≤ inflight_max
        self._host = origin_host
        self._realm = origin_realm
        self._context = service_context_id
        self._currency_numeric = currency_numeric
        self._exponent = currency_exponent
        # Told whether each answer granting an advance reached a live connection
        # (`answer_handed`, the Diameter node's observer): service/undelivered.py.
        self._deliveries = deliveries
        self._replayed: set[tuple[str, int]] = set()  # (Origin-Host, End-to-End id)
        self._notes: set[asyncio.Task[None]] = set()
        self.stats = {"ccr": 0, "granted": 0, "refused": 0, "errors": 0, "too_busy": 0,
                      "too_busy_subscriber": 0, "too_late": 0, "past_deadline": 0,
                      "late_advance_booked": 0}

    @property
    def inflight(self) -> int:
        """Requests inside the lending service right now."""
        return self._inflight

    def _error(self, msg: Message, code: int, text: str) -> Message:
        self.stats["errors"] += 1
        return error_answer(DiameterError(code, text), self._host, self._realm, msg)

    async def __call__(self, msg: Message, peer_origin_host: str) -> Message:
        received = time.monotonic()
        if msg.command_code != CMD_CREDIT_CONTROL:
            return self._error(msg, DIAMETER_COMMAND_UNSUPPORTED, "only CCR is served")
        if msg.application_id != APP_DIAMETER_CREDIT_CONTROL:
            return self._error(msg, DIAMETER_APPLICATION_UNSUPPORTED, "only application 4")
        self.stats["ccr"] += 1
        try:
            ccr = gy.parse_ccr(msg, self._exponent)
        except DiameterError as exc:
            self.stats["errors"] += 1
            return error_answer(exc, self._host, self._realm, msg)
        # RFC 6733 §6.1: a request for another realm or host is not ours to execute;
        # we relay nothing, so it is answered as undeliverable (E bit, 3xxx).
        if ccr.destination_realm.lower() != self._realm.lower():
            return self._error(msg, DIAMETER_REALM_NOT_SERVED,
                               f"Destination-Realm {ccr.destination_realm!r} not served here")
        if ccr.destination_host is not None and ccr.destination_host.lower() != self._host.lower():
            return self._error(msg, DIAMETER_UNABLE_TO_DELIVER,
                               f"Destination-Host {ccr.destination_host!r} is not this node")
        if ccr.service_context_id != self._context:
            return self._cca(msg, DIAMETER_RATING_FAILED,
                             error_message=f"Service-Context-Id {ccr.service_context_id!r} not served")
        if (ccr.currency_numeric is not None and ccr.requested_minor is not None
                and ccr.currency_numeric != self._currency_numeric):
            return self._cca(msg, DIAMETER_RATING_FAILED, error_message="currency not served")
        if gy.units_requested_without_money(msg):
            # RFC 4006 §9 (5031): the node lends money only and cannot rate a request
            # for time, volume or service units; it never grants a unit not asked for.
            return self._cca(msg, DIAMETER_RATING_FAILED,
                             error_message="only CC-Money is granted here")
        if self._inflight >= self.inflight_max:
            self.stats["too_busy"] += 1
            return error_answer(DiameterError(DIAMETER_TOO_BUSY, "too many requests in progress"),
                                self._host, self._realm, msg)
        if self._by_msisdn[ccr.msisdn] >= self.per_subscriber_max:
            self.stats["too_busy_subscriber"] += 1
            return error_answer(DiameterError(DIAMETER_TOO_BUSY,
                                              "requests for this subscriber in progress"),
                                self._host, self._realm, msg)
        # A task of its own, so that answering at the deadline never cancels a commit.
        # Counted now, not when the task first runs: requests arriving together must
        # see each other. Released by the task's own end, whenever that is.
        self._inflight += 1
        self._by_msisdn[ccr.msisdn] += 1
        decision = asyncio.ensure_future(self._decide(ccr, received))
        decision.add_done_callback(functools.partial(self._release, ccr.msisdn))
        done, _ = await asyncio.wait({decision}, timeout=max(
            0.0, received + self._answer_by_s - time.monotonic()))
        if not done:
            self.stats["past_deadline"] += 1
            decision.add_done_callback(functools.partial(self._after_deadline, ccr.session_id))
            return error_answer(DiameterError(DIAMETER_TOO_BUSY,
                                              "no decision within the answer deadline"),
                                self._host, self._realm, msg)
        outcome = decision.result()
        if outcome is None:
            # The ledger failed us: a credit decision we cannot record is not given.
            return self._cca(msg, DIAMETER_UNABLE_TO_COMPLY, error_message="internal error")
        if outcome.decision is AdvanceDecision.TOO_LATE:
            self.stats["too_late"] += 1
            return self._error(msg, DIAMETER_TOO_BUSY, "answer deadline passed; nothing granted")
        granted = outcome.granted_minor if outcome.decision is AdvanceDecision.ADVANCED else None
        self.stats["granted" if granted else "refused"] += 1
        if granted and outcome.replayed and self._deliveries is not None:
            if len(self._replayed) >= REPLAYED_GRANTS_MAX:
                self._replayed.clear()
            self._replayed.add((msg.get(AVP_ORIGIN_HOST, ""), msg.end_to_end_id))
        return self._cca(msg, result_code(outcome), granted_minor=granted)

    async def _decide(self, ccr: gy.CreditControlRequest, received: float
                      ) -> AdvanceOutcome | None:
        """The lending decision (None: it failed, logged here). It holds its places in
        the bounds until it ends, whether or not the IN is still waiting for it."""
        try:
            return await self._lending.out_of_balance(
                ccr.session_id, ccr.request_number, ccr.request_type, ccr.msisdn,
                ccr.requested_minor, ccr.origin_host,
                deadline_monotonic=received + self._deadline_s,
                used_minor=ccr.used_minor,
            )
        except Exception:
            log.exception("out_of_balance_failed", session_id=ccr.session_id)
            return None

    def answer_handed(self, msg: Message, answer: Message, delivered: bool) -> None:
        """The Diameter node's answer observer. An answer granting an advance that was
        not handed to a live connection marks the advance; one that was, for a re-send
        (T flag, or replayed from the ledger), clears the mark. Other answers cost a
        lookup or two."""
        if self._deliveries is None or msg.command_code != CMD_CREDIT_CONTROL:
            return
        replayed = False
        if self._replayed:
            key = (msg.get(AVP_ORIGIN_HOST, ""), msg.end_to_end_id)
            replayed = key in self._replayed
            self._replayed.discard(key)
        if delivered and not replayed and not msg.flags & FLAG_RETRANSMIT:
            return  # a first answer that left: nothing to mark or clear
        if (answer.get(AVP_RESULT_CODE) != DIAMETER_SUCCESS
                or answer.get(AVP_GRANTED_SERVICE_UNIT) is None):
            return
        try:
            ccr = gy.parse_ccr(msg, self._exponent)
        except DiameterError:
            return
        note = asyncio.ensure_future(self._deliveries.answer_handed(
            ccr.session_id, ccr.request_number, ccr.msisdn, delivered))
        self._notes.add(note)
        note.add_done_callback(self._noted)

    def _noted(self, task: asyncio.Task[None]) -> None:
        self._notes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("advance_answer_note_failed", exc_info=task.exception())

    async def drain_notes(self) -> None:
        """Wait for the delivery notes being written (tests, shutdown)."""
        while self._notes:
            await asyncio.gather(*list(self._notes), return_exceptions=True)

    def _release(self, msisdn: str, _task: asyncio.Future[Any]) -> None:
        self._inflight -= 1
        self._by_msisdn[msisdn] -= 1
        if self._by_msisdn[msisdn] <= 0:
            del self._by_msisdn[msisdn]

    def _after_deadline(self, session_id: str, task: asyncio.Future[Any]) -> None:
        """A decision that ended after the IN was told 3004."""
        if task.cancelled():
            return
        outcome = task.result()
        if (outcome is not None and outcome.decision is AdvanceDecision.ADVANCED
                and outcome.granted_minor):
            # Booked although the IN heard 3004: its re-send of this Session-Id and
            # CC-Request-Number replays the grant. Should not happen (see docstring).
            self.stats["late_advance_booked"] += 1
            log.error("late_advance_booked", session_id=session_id,
                      granted_minor=outcome.granted_minor)

    def _cca(self, msg: Message, result_code: int, *, granted_minor: int | None = None,
             error_message: str | None = None) -> Message:
        return gy.build_cca(
            msg, self._host, self._realm, result_code,
            granted_minor=granted_minor,
            currency_numeric=self._currency_numeric,
            currency_exponent=self._exponent,
            error_message=error_message,
        )
