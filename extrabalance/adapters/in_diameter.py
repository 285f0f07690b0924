"""Node → IN: balance operations over Diameter (the node is the Gy client).

Implements the service layer's `InPort`: one CCR EVENT per operation with the
operation's stored Session-Id, sent only to the subscriber's own IN node, and the
answer mapped onto what the saga needs to know:

| answer                                  | outcome        | what the saga does        |
|-----------------------------------------|----------------|---------------------------|
| 2001                                    | DONE           | settle                    |
| 4xxx / 5xxx (4012, 4010, 5030, …)       | REFUSED        | nothing applied           |
| 3002 UNABLE_TO_DELIVER, 3004 TOO_BUSY   | NOT_EXECUTED   | re-send later, no T flag  |
| no answer in time, connection lost      | UNKNOWN        | resolver re-sends with T  |
| no open peer for that IN (never sent)   | UNKNOWN        | resolver finishes it      |

The confirmation of an automatic advance is one of these operations too: a
REFUND_ACCOUNT whose Session-Id and CC-Request-Number are those of the IN's own
out-of-balance CCR (stored with the advance), sent to the IN that sent that CCR.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import structlog

from extrabalance.diameter import gy
from extrabalance.diameter.codec import DiameterError, Message
from extrabalance.service.ports import InAction, InOperation, InOutcome, InResult

log = structlog.get_logger(__name__)

DIAMETER_SUCCESS = 2001
NOT_EXECUTED_CODES = frozenset({3002, 3004})
CHECK_BALANCE_ENOUGH = 0

SendRequest = Callable[[str, Message], Awaitable[Message]]


class InNodeAddress:
    __slots__ = ("group", "origin_host", "realm")

    def __init__(self, origin_host: str, realm: str, group: str) -> None:
        self.origin_host = origin_host
        self.realm = realm
        self.group = group


class DiameterInPort:
    def __init__(
        self,
        send: SendRequest,
        in_nodes: dict[str, InNodeAddress],  # by Origin-Host
        *,
        origin_host: str,
        origin_realm: str,
        service_context_id: str,
        currency_numeric: int,
        currency_exponent: int,
        transient_errors: tuple[type[BaseException], ...] = (),
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self._send = send
        self._in_nodes = in_nodes
        self._host = origin_host
        self._realm = origin_realm
        self._context = service_context_id
        self._currency_numeric = currency_numeric
        self._exponent = currency_exponent
        self._transient = transient_errors
        self._observe = observe
        self._session_ids = gy.SessionIdGenerator(origin_host)

    def new_session_id(self) -> str:
        return self._session_ids.next()

    async def execute(self, op: InOperation) -> InResult:
        target = self._in_nodes.get(op.in_node)
        if target is None:
            # A route to an IN we have no peers for: the request cannot be delivered
            # and was never sent.
            log.warning("no_such_in_node", in_node=op.in_node)
            return InResult(InOutcome.NOT_EXECUTED, 3002)
        ccr = gy.CreditControlRequest(
            session_id=op.session_id,
            origin_host=self._host,
            origin_realm=self._realm,
            destination_realm=target.realm,
            destination_host=target.origin_host,
            request_type=gy.EVENT_REQUEST,
            request_number=op.request_number,
            msisdn=op.msisdn,
            service_context_id=self._context,
            requested_action=int(op.action),
            requested_minor=op.amount_minor,
            currency_numeric=self._currency_numeric,
            event_timestamp=gy.ntp_now(),
        )
        msg = gy.build_ccr(ccr, currency_exponent=self._exponent, retransmit=op.retransmission)
        started = time.perf_counter()
        try:
            answer = await self._send(target.group, msg)
        except self._transient as exc:
            log.warning("in_request_unknown", session_id=op.session_id, error=type(exc).__name__)
            return InResult(InOutcome.UNKNOWN)
        finally:
            if self._observe is not None:
                self._observe(op.action.name, time.perf_counter() - started)
        try:
            cca = gy.parse_cca(answer, self._exponent)
        except DiameterError as exc:
            # An answer we cannot read: whether the IN applied it is unknown.
            log.warning("in_answer_unreadable", session_id=op.session_id, error=str(exc))
            return InResult(InOutcome.UNKNOWN)
        code = cca.result_code
        if code == DIAMETER_SUCCESS:
            enough = None
            if op.action is InAction.CHECK_BALANCE:
                enough = cca.check_balance_result == CHECK_BALANCE_ENOUGH
            amount = cca.granted_minor
            if op.action is InAction.REFUND_ACCOUNT and amount is None:
                amount = op.amount_minor
            return InResult(InOutcome.DONE, code, amount, enough)
        if code in NOT_EXECUTED_CODES:
            return InResult(InOutcome.NOT_EXECUTED, code)
        if 3000 <= code < 4000:
            # Another protocol error (3xxx): the request was not processed.
            return InResult(InOutcome.NOT_EXECUTED, code)
        return InResult(InOutcome.REFUSED, code)
