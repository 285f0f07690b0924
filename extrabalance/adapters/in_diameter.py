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

A bundle advance (a tier with a bundle, `InOperation.bundle`) is the same REFUND_ACCOUNT
EVENT with Multiple-Services-Indicator 1 and one Multiple-Services-Credit-Control
carrying Service-Identifier / Rating-Group and a Requested-Service-Unit in the bundle's
unit (CC-Total-Octets, CC-Time or CC-Service-Specific-Units; RFC 4006 §8.16-8.26)
instead of CC-Money; the IN answers with the Granted-Service-Unit in that unit. Every
other operation goes out byte for byte as before.

Re-sends (RFC 6733 §3, §5.5.4): every request of one operation carries the same
End-to-End id, across restarts too. The id is allocated with the operation's
Session-Id and written into that Session-Id's implementation-specific part (RFC 6733
§8.8: `<origin-host>;<high>;<low>;<pid>-<end-to-end id, 8 hex digits>`), so it is
stored in the ledger with the operation in the same commit as its intent and read
back from it on every re-send, by this process or the next. The T flag is set only on
a re-send of a request that may have reached the IN: never on an operation's first
transmission, also when earlier attempts found no open peer and sent nothing.

(Opt-in extension) The confirmation of an automatic advance is one of these
operations too: a REFUND_ACCOUNT whose Session-Id and CC-Request-Number are those of
the IN's own out-of-balance CCR (stored with the advance), sent to the IN that sent
that CCR. That Session-Id is not ours, so its End-to-End id is kept in memory
(`E2E_REMEMBERED_MAX` operations): the same on every re-send by this process.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import structlog

from extrabalance.clock import SYSTEM_CLOCK, Clock
from extrabalance.diameter import gy
from extrabalance.diameter.codec import DiameterError, Message
from extrabalance.diameter.constants import (
    CHECK_BALANCE_RESULT_ENOUGH_CREDIT,
    DIAMETER_CREDIT_LIMIT_REACHED,
    DIAMETER_SUCCESS,
    DIAMETER_TOO_BUSY,
    DIAMETER_UNABLE_TO_DELIVER,
)
from extrabalance.diameter.peer import EndToEndIds
from extrabalance.service.ports import InAction, InOperation, InOutcome, InResult

log = structlog.get_logger(__name__)

NOT_EXECUTED_CODES = frozenset({DIAMETER_UNABLE_TO_DELIVER, DIAMETER_TOO_BUSY})
# Operations whose End-to-End id is kept in memory (Session-Ids not ours) and whose
# sends all found no open peer (first transmission still owed); the oldest go first.
E2E_REMEMBERED_MAX = 65_536
E2E_HEX_DIGITS = 8

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
        never_sent_errors: tuple[type[BaseException], ...] = (),
        observe: Callable[[str, float], None] | None = None,
        end_to_end_ids: Callable[[], int] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._send = send
        self._clock = clock  # the node's one clock: Event-Timestamp
        self._in_nodes = in_nodes
        self._host = origin_host
        self._realm = origin_realm
        self._context = service_context_id
        self._currency_numeric = currency_numeric
        self._exponent = currency_exponent
        self._transient = transient_errors
        self._observe = observe
        # Raised when the request was not sent at all (no open peer): its first
        # transmission is still owed, so it must not carry the T flag.
        self._never_sent = never_sent_errors
        self._session_ids = gy.SessionIdGenerator(origin_host)
        # The node passes its DiameterNode's generator (ids unique among all its
        # requests); alone, a random start of our own.
        self._e2e = end_to_end_ids or EndToEndIds(random.getrandbits(12), random.Random()).next
        self._e2e_by_key: OrderedDict[tuple[str, int], int] = OrderedDict()
        # Operations none of whose requests may have been received by the IN so far:
        # never sent, or answered 3002/3004 only. Their next send carries no T flag.
        self._not_received: OrderedDict[tuple[str, int], None] = OrderedDict()

    def new_session_id(self) -> str:
        """A Session-Id for a new operation, carrying the End-to-End id all of its
        requests will use (see the module docstring)."""
        return f"{self._session_ids.next()}-{self._e2e():0{E2E_HEX_DIGITS}x}"

    def end_to_end_id(self, session_id: str, request_number: int) -> int:
        """The End-to-End id of the operation (Session-Id, CC-Request-Number)."""
        if request_number == 0 and session_id.startswith(self._host + ";"):
            _, _, last = session_id.rpartition(";")
            _, dash, digits = last.rpartition("-")
            if dash and len(digits) == E2E_HEX_DIGITS:
                try:
                    return int(digits, 16)
                except ValueError:
                    pass
        key = (session_id, request_number)
        e2e = self._e2e_by_key.get(key)
        if e2e is None:
            e2e = self._e2e_by_key[key] = self._e2e()
            if len(self._e2e_by_key) > E2E_REMEMBERED_MAX:
                self._e2e_by_key.popitem(last=False)
        return e2e

    def _remember_not_received(self, key: tuple[str, int]) -> None:
        self._not_received[key] = None
        if len(self._not_received) > E2E_REMEMBERED_MAX:
            self._not_received.popitem(last=False)  # forgotten: its re-send gets T

    async def execute(self, op: InOperation) -> InResult:
        target = self._in_nodes.get(op.in_node)
        if target is None:
            # A route to an IN we have no peers for: the request cannot be delivered
            # and was never sent.
            log.warning("no_such_in_node", in_node=op.in_node)
            return InResult(InOutcome.NOT_EXECUTED, DIAMETER_UNABLE_TO_DELIVER)
        bundle = None
        if op.bundle is not None:
            bundle = gy.BundleUnits(op.bundle.kind, op.bundle.quantity,
                                    op.bundle.service_identifier, op.bundle.rating_group)
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
            # A bundle advance asks for its units in an MSCC, no money (docs/lending.md
            # "Bundle advances"); every other operation, exactly as before.
            requested_minor=op.amount_minor if bundle is None else None,
            currency_numeric=self._currency_numeric if bundle is None else None,
            event_timestamp=gy.ntp_now(self._clock),
            has_mscc=bundle is not None,
            bundle=bundle,
        )
        key = (op.session_id, op.request_number)
        # T only if an earlier request of this operation may have reached the IN.
        retransmit = op.retransmission and key not in self._not_received
        msg = gy.build_ccr(ccr, currency_exponent=self._exponent, retransmit=retransmit,
                           end_to_end_id=self.end_to_end_id(op.session_id, op.request_number))
        started = time.perf_counter()
        try:
            answer = await self._send(target.group, msg)
        except self._never_sent as exc:
            if not retransmit:  # nothing of this operation may have reached the IN yet
                self._remember_not_received(key)
            log.warning("in_request_not_sent", session_id=op.session_id,
                        in_node=op.in_node, error=str(exc),
                        hint="no open Diameter connection to this IN node: check its peers")
            return InResult(InOutcome.UNKNOWN)
        except self._transient as exc:
            self._not_received.pop(key, None)
            log.warning("in_request_unknown", session_id=op.session_id, error=type(exc).__name__)
            return InResult(InOutcome.UNKNOWN)
        finally:
            if self._observe is not None:
                self._observe(op.action.name, time.perf_counter() - started)
        self._not_received.pop(key, None)  # it was received
        try:
            cca = gy.parse_cca(answer, self._exponent)
        except DiameterError as exc:
            # An answer we cannot read: whether the IN applied it is unknown.
            log.warning("in_answer_unreadable", session_id=op.session_id, error=str(exc))
            return InResult(InOutcome.UNKNOWN)
        code = cca.result_code
        if code in NOT_EXECUTED_CODES and not retransmit:
            self._remember_not_received(key)  # not executed: its re-send is no duplicate
        if code == DIAMETER_SUCCESS:
            enough = None
            if op.action is InAction.CHECK_BALANCE:
                enough = cca.check_balance_result == CHECK_BALANCE_RESULT_ENOUGH_CREDIT
            amount = cca.granted_minor
            if op.action is InAction.REFUND_ACCOUNT and amount is None:
                amount = op.amount_minor
            if bundle is not None and cca.granted_units not in (None, bundle):
                # 2001 is the IN's word that it applied the request; a grant that
                # differs from what was asked is logged for the operator, not undone.
                log.warning("bundle_grant_differs", session_id=op.session_id,
                            asked=bundle.quantity, granted=cca.granted_units.quantity)
            return InResult(InOutcome.DONE, code, amount, enough)
        if code in NOT_EXECUTED_CODES:
            return InResult(InOutcome.NOT_EXECUTED, code)
        if 3000 <= code < 4000:
            # Another protocol error (3xxx): the request was not processed.
            return InResult(InOutcome.NOT_EXECUTED, code)
        return InResult(InOutcome.REFUSED, code,
                        short_of_credit=code == DIAMETER_CREDIT_LIMIT_REACHED)
