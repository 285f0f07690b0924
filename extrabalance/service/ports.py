"""The ports the application layer talks through. Adapters (Diameter, SMPP, MQTT)
implement them; tests implement them with in-memory fakes.

Every IN operation carries its own Diameter Session-Id, created by the port and stored
by the ledger *before* the operation is sent, so a retry is the same operation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from extrabalance.core.policy import Bundle
    from extrabalance.service.unit_of_work import LedgerTx


class InAction(IntEnum):
    """Diameter Requested-Action (AVP 436) values."""

    DIRECT_DEBITING = 0
    REFUND_ACCOUNT = 1
    CHECK_BALANCE = 2


class InOutcome(Enum):
    DONE = "DONE"  # 2001: applied
    REFUSED = "REFUSED"  # a final refusal (4012, 4010, 5030...): nothing applied
    # 3002/3004: not executed; safe to re-send later (same Session-Id, no T flag)
    NOT_EXECUTED = "NOT_EXECUTED"
    # timeout / connection lost: may or may not be applied; the resolver re-sends the
    # same Session-Id and CC-Request-Number with the T flag
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True, slots=True)
class InOperation:
    action: InAction
    msisdn: str
    in_node: str  # Origin-Host of the subscriber's IN; never delivered to another node
    amount_minor: int
    session_id: str
    request_number: int = 0
    retransmission: bool = False  # set the T flag
    # A bundle tier's loan: REFUND_ACCOUNT credits these units (Multiple-Services-
    # Credit-Control) instead of money; amount_minor is then the bundle's price.
    bundle: Bundle | None = None


@dataclass(frozen=True, slots=True)
class InResult:
    outcome: InOutcome
    result_code: int | None = None
    amount_minor: int | None = None  # debited (DIRECT_DEBITING) or granted
    enough_credit: bool | None = None  # CHECK_BALANCE answer
    # REFUSED because the account lacks the credit (a DIRECT_DEBITING larger than the
    # balance: 4012 CREDIT_LIMIT_REACHED); a smaller amount may pass.
    short_of_credit: bool = False


class InPort(Protocol):
    async def execute(self, op: InOperation) -> InResult: ...

    def new_session_id(self) -> str: ...


# Resolver.follow_up(kind, record id, msisdn): re-send a pending IN operation ("loan"
# or "recovery") unchanged after the Tx-timer delays, in the background.
FollowUp = Callable[[str, str, str], None]

NoticeKind = Literal["sms", "ad"]


@dataclass(frozen=True, slots=True)
class Notice:
    """A message to a subscriber. Templates: loan_granted {amount, fee, debt},
    loan_refused {reason}, loan_pending {amount}, advance_granted {amount, fee, debt},
    payback_partial {recovered, debt}, payback_full {recovered}, barred {},
    ad_out_of_balance {}. Money params are minor-unit ints; the renderer formats them."""

    msisdn: str
    template: str
    params: Mapping[str, str | int]
    kind: NoticeKind = "sms"
    language: str = "en"  # the subscriber's language preference
    # Set when the notice comes from the outbox: the same id on every attempt, so the
    # SMSC (user_message_reference) and the EDR can recognise a message sent twice.
    outbox_id: str | None = None


class Notifier(Protocol):
    async def notify(self, notice: Notice) -> None:
        """Render and submit. Raises when the SMSC did not take the message (the
        outbox sender retries it); callers outside the outbox log and go on."""
        ...


class NoticeOutbox(Protocol):
    """Where a use case leaves the messages that report money: `put` inside the unit
    of work that moves the money (the message exists if and only if the money was
    committed), `wake` once that unit is committed. Sending happens later, in the
    background (`service/outbox.py`); nothing that answers the network waits for it."""

    def put(self, tx: LedgerTx, notice: Notice, now: datetime) -> str: ...
    def wake(self) -> None: ...


class EventSink(Protocol):
    """EDR + metrics. Kinds: loan, refusal, payback, ad_sent, ad_suppressed, bar, unbar,
    write_off, advance (plus pending, review from the resolver)."""

    def emit(self, kind: str, **fields: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class RechargeEvent:
    """A recharge as published by the IN on MQTT (amounts in minor units)."""

    event_id: str
    msisdn: str
    amount_minor: int
    in_node: str
    balance_after_minor: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
