"""IN → node: the out-of-balance credit-control request (the node is the Gy server).

Translates a CCR into `LendingService.out_of_balance` and its outcome into a CCA,
as PROTOCOLS.md says: 2001 + Granted-Service-Unit for an automatic advance, 4012 no
advance, 4010 barred, 5030 unknown subscriber, 5031 unknown Service-Context-Id;
TERMINATION closes the session with 2001. An advance is booked CONFIRMING; once this
handler has returned its CCA the lending service confirms it with the IN (REFUND_ACCOUNT
under this CCR's Session-Id and CC-Request-Number, docs/diameter.md "Advance
confirmation"), so a CCA that never reaches the IN in time costs nobody anything. Malformed requests get the RFC's error
answer from the codec's validation; the lending service is never called for them.

Overload: at most `inflight_max` requests are inside the lending service at once
(each waits for its subscriber's lock and a ledger commit). Beyond that the IN gets
3004 DIAMETER_TOO_BUSY at once, with the E bit, and the ledger is not touched: RFC
6733 says the request was not executed, so the IN re-sends it later, instead of the
node queueing without bound and answering after the IN has given up.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import structlog

from extrabalance.diameter import gy
from extrabalance.diameter.codec import DiameterError, Message, error_answer
from extrabalance.diameter.constants import (
    APP_DIAMETER_CREDIT_CONTROL,
    CMD_CREDIT_CONTROL,
)

log = structlog.get_logger(__name__)

DIAMETER_RATING_FAILED = 5031
DIAMETER_SUCCESS = 2001
DIAMETER_TOO_BUSY = 3004
DIAMETER_COMMAND_UNSUPPORTED = 3001
DIAMETER_APPLICATION_UNSUPPORTED = 3007
DIAMETER_UNABLE_TO_COMPLY = 5012
# Out-of-balance CCRs inside the lending service at once; beyond: 3004 at once.
OUT_OF_BALANCE_INFLIGHT_MAX = 512
TERMINATION_REQUEST = 3


class OutOfBalanceApi(Protocol):
    async def out_of_balance(self, session_id: str, request_number: int, request_type: int,
                             msisdn: str, requested_minor: int | None,
                             origin_host: str, *,
                             deadline_monotonic: float | None = None) -> Any: ...


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
    ) -> None:
        if inflight_max < 1:
            raise ValueError("inflight_max must be at least 1")
        self._lending = lending
        # An advance must reach the IN before its Tx timer fires, or the IN never
        # credits it: past this budget nothing is booked and 3004 is answered.
        self._deadline_s = answer_deadline_ms / 1000
        self.inflight_max = inflight_max
        self._inflight = 0
        self._host = origin_host
        self._realm = origin_realm
        self._context = service_context_id
        self._currency_numeric = currency_numeric
        self._exponent = currency_exponent
        self.stats = {"ccr": 0, "granted": 0, "refused": 0, "errors": 0, "too_busy": 0}

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
        if ccr.service_context_id != self._context:
            return self._cca(msg, DIAMETER_RATING_FAILED,
                             error_message=f"Service-Context-Id {ccr.service_context_id!r} not served")
        if (ccr.currency_numeric is not None and ccr.requested_minor is not None
                and ccr.currency_numeric != self._currency_numeric):
            return self._cca(msg, DIAMETER_RATING_FAILED, error_message="currency not served")
        if ccr.request_type == TERMINATION_REQUEST:
            return self._cca(msg, DIAMETER_SUCCESS)
        if self._inflight >= self.inflight_max:
            self.stats["too_busy"] += 1
            return error_answer(DiameterError(DIAMETER_TOO_BUSY, "too many requests in progress"),
                                self._host, self._realm, msg)
        self._inflight += 1
        try:
            outcome = await self._lending.out_of_balance(
                ccr.session_id, ccr.request_number, ccr.request_type, ccr.msisdn,
                ccr.requested_minor, ccr.origin_host,
                deadline_monotonic=received + self._deadline_s,
            )
        except Exception:
            # The ledger failed us: a credit decision we cannot record is not given.
            log.exception("out_of_balance_failed", session_id=ccr.session_id)
            return self._cca(msg, DIAMETER_UNABLE_TO_COMPLY, error_message="internal error")
        finally:
            self._inflight -= 1
        if outcome.result_code == DIAMETER_TOO_BUSY:
            self.stats["too_late"] = self.stats.get("too_late", 0) + 1
            return self._error(msg, DIAMETER_TOO_BUSY, "answer deadline passed; nothing granted")
        granted = outcome.granted_minor if outcome.result_code == DIAMETER_SUCCESS else None
        self.stats["granted" if granted else "refused"] += 1
        return self._cca(msg, outcome.result_code, granted_minor=granted)

    def _cca(self, msg: Message, result_code: int, *, granted_minor: int | None = None,
             error_message: str | None = None) -> Message:
        return gy.build_cca(
            msg, self._host, self._realm, result_code,
            granted_minor=granted_minor,
            currency_numeric=self._currency_numeric,
            currency_exponent=self._exponent,
            error_message=error_message,
        )
