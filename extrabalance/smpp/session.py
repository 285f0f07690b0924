"""SMPP 3.4 session state machine, sans-IO, for both the ESME and the SMSC role.

Two rules, as in h11:
1. Everything that affects the session state lives in this file: binding,
   unbinding, which PDU is allowed in which state, sequence numbers, the window of
   unanswered requests, response timeouts and enquire_link. The adapters
   (client.py, server.py) only move bytes, call `tick(now_s)` and act on events.
2. The transition TABLE does not know which role we play. The role only decides how
   a received PDU is classified (a bind is a request to the SMSC role, a response
   to the ESME role; data_sm flows towards the SMSC when the SMSC receives it).

Theory of operation
-------------------
Bytes in: `receive_data(data, now_s)` frames and decodes PDUs, classifies each as
an event, looks up `TRANSITIONS[(state, event)] -> (new_state, actions)`, runs the
actions and returns the events the application must see (`Bound`,
`RequestReceived`, `ResponseReceived`, ...). Commands in: `bind`, `send_request`,
`send_response`, `unbind`, `close`. Bytes out: `data_to_send()`. Time in:
`tick(now_s)` fires response timeouts and enquire_link. No clocks, no sockets.

States (SMPP 3.4 §2.2):  OPEN --bind--> BINDING --bind_resp OK--> BOUND_TX/RX/TRX
                         OPEN <--bind refused-- BINDING
                         BOUND_* --unbind--> UNBINDING --unbind_resp--> CLOSED
                         BOUND_* <--unbind from peer-- answered --> CLOSED
Anything --connection lost / fatal framing error--> CLOSED

Bounds: `window_max` unanswered outbound requests (enquire_link and unbind are
outside the window so keep-alive never starves); beyond it requests wait in a FIFO
of `queue_max`, and `send_request` raises `QueueFull` when that is full too;
`inbound_pending_max` unanswered inbound requests, beyond which the session answers
ESME_RTHROTTLED on the application's behalf.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from extrabalance.smpp.pdu import (
    RESPONSE_CLASS,
    SEQUENCE_NUMBER_MAX,
    BindReceiver,
    BindTransceiver,
    BindTransmitter,
    CommandId,
    EnquireLink,
    Framer,
    GenericNack,
    Pdu,
    PduDecodeError,
    Status,
    Unbind,
    decode,
    encode,
    is_response,
    make_response,
    with_sequence_number,
)

__all__ = [
    "BIND_CLASSES",
    "INBOUND_PENDING_MAX_DEFAULT",
    "LATE_RESPONSE_WAIT_FACTOR",
    "QUEUE_MAX_DEFAULT",
    "TRANSITIONS",
    "WINDOW_MAX_DEFAULT",
    "Action",
    "Authenticator",
    "BindRefused",
    "Bound",
    "Event",
    "LateResponse",
    "LinkDead",
    "ProtocolViolation",
    "QueueFull",
    "RequestFailed",
    "RequestReceived",
    "ResponseReceived",
    "Role",
    "Session",
    "SessionError",
    "SessionStateError",
    "State",
    "Unbound",
]

WINDOW_MAX_DEFAULT = 10
QUEUE_MAX_DEFAULT = 1_000
INBOUND_PENDING_MAX_DEFAULT = 100
# A request that timed out keeps its window slot this many response timeouts longer
# for a late answer; then the connection is reset (the peer lost it).
LATE_RESPONSE_WAIT_FACTOR = 6


class _FastEnum(enum.Enum):
    # Members are singletons compared by identity, so they may hash by identity too:
    # Enum's own __hash__ is Python code (hash of the name), and the table lookup
    # hashes a (state, event) pair for every PDU.
    __hash__ = object.__hash__


class Role(enum.Enum):
    ESME = "esme"
    SMSC = "smsc"


class State(_FastEnum):
    OPEN = "OPEN"  # connected, not bound
    BINDING = "BINDING"  # ESME: bind sent, waiting for bind_resp
    BOUND_TX = "BOUND_TX"
    BOUND_RX = "BOUND_RX"
    BOUND_TRX = "BOUND_TRX"
    UNBINDING = "UNBINDING"  # unbind sent, waiting for unbind_resp
    CLOSED = "CLOSED"  # unbound or connection gone: close the transport


# A pseudo target state: "the bound state the bind PDU asked for".
BOUND_AS_BIND = "BOUND_AS_BIND"


class Event(_FastEnum):
    # local commands
    SEND_BIND = "send bind"
    SEND_TO_SMSC = "send submit_sm/data_sm/query_sm... (needs TX or TRX)"
    SEND_TO_ESME = "send deliver_sm/data_sm/alert (needs RX or TRX)"
    SEND_UNBIND = "send unbind"
    CONNECTION_LOST = "connection lost"
    # received
    BIND = "bind received"
    BIND_ACCEPTED = "bind received, credentials good"
    BIND_REJECTED = "bind received, credentials bad"
    BIND_RESP_OK = "bind_resp with ESME_ROK"
    BIND_RESP_ERROR = "bind_resp with an error, or generic_nack to the bind"
    TO_SMSC = "submit_sm/data_sm/query_sm... received (needs TX or TRX)"
    TO_ESME = "deliver_sm/data_sm/alert received (needs RX or TRX)"
    ENQUIRE_LINK = "enquire_link received"
    UNBIND = "unbind received"
    UNBIND_RESP = "unbind_resp received"
    RESPONSE = "other response received"
    OUTBIND = "outbind received"
    WRONG_ROLE = "a request this role never accepts"
    UNDECODABLE = "frame that does not decode"
    BIND_TIMEOUT = "no bind_resp in time"
    BIND_RESP_BAD = "bind_resp that does not decode, or answers another bind or sequence"


class Action(_FastEnum):
    WRITE = "write the local request (window/queue)"
    REFUSE_LOCAL = "raise SessionStateError to the caller"
    AUTHENTICATE = "ask the authenticator, then re-dispatch BIND_ACCEPTED/BIND_REJECTED"
    ANSWER_OK = "answer the request with ESME_ROK"
    ANSWER_REJECTED = "answer the bind with the authenticator's status"
    ANSWER_INVBNDSTS = "answer with ESME_RINVBNDSTS"
    ANSWER_ALYBND = "answer with ESME_RALYBND"
    ANSWER_NACK = "answer an undecodable frame (generic_nack or the command's resp)"
    TO_APP = "hand the request to the application (RequestReceived)"
    MATCH = "match the response to its request (ResponseReceived)"
    NOTIFY_BOUND = "emit Bound"
    NOTIFY_BIND_REFUSED = "emit BindRefused"
    NOTIFY_UNBOUND = "emit Unbound"
    NOTIFY_OUTBIND = "emit RequestReceived(outbind)"
    FAIL_PENDING = "fail every pending and queued request"
    IGNORE = "drop silently"


S, E, A = State, Event, Action
_BOUND = (S.BOUND_TX, S.BOUND_RX, S.BOUND_TRX)
_ANY = tuple(State)

# (state, event) -> (new state or None for "stay", actions). Read row by row like
# SMPP 3.4 §2.3 ("Allowed operations by session state"). Pairs absent from the
# table fall back to _DEFAULTS below.
TRANSITIONS: dict[tuple[State, Event], tuple[State | str | None, tuple[Action, ...]]] = {
    # --- OPEN: only binding and keep-alive --------------------------------------
    (S.OPEN, E.SEND_BIND): (S.BINDING, (A.WRITE,)),
    (S.OPEN, E.BIND): (None, (A.AUTHENTICATE,)),
    (S.OPEN, E.BIND_ACCEPTED): (BOUND_AS_BIND, (A.ANSWER_OK, A.NOTIFY_BOUND)),
    (S.OPEN, E.BIND_REJECTED): (None, (A.ANSWER_REJECTED,)),
    (S.OPEN, E.OUTBIND): (None, (A.NOTIFY_OUTBIND,)),
    # --- BINDING (ESME) -----------------------------------------------------------
    (S.BINDING, E.BIND_RESP_OK): (BOUND_AS_BIND, (A.MATCH, A.NOTIFY_BOUND)),
    (S.BINDING, E.BIND_RESP_ERROR): (S.OPEN, (A.MATCH, A.NOTIFY_BIND_REFUSED)),
    (S.BINDING, E.BIND_TIMEOUT): (S.OPEN, (A.NOTIFY_BIND_REFUSED,)),
    # A bind_resp we cannot trust (malformed, oversized, another sequence number or
    # bind type) leaves no bind to build on: give up this connection, so the adapter
    # reconnects and binds again after its backoff, instead of waiting for nothing.
    (S.BINDING, E.BIND_RESP_BAD): (S.CLOSED, (A.FAIL_PENDING, A.NOTIFY_BIND_REFUSED)),
    # --- BOUND: traffic in the directions the bind allows -----------------------
    (S.BOUND_TX, E.SEND_TO_SMSC): (None, (A.WRITE,)),
    (S.BOUND_TRX, E.SEND_TO_SMSC): (None, (A.WRITE,)),
    (S.BOUND_RX, E.SEND_TO_ESME): (None, (A.WRITE,)),
    (S.BOUND_TRX, E.SEND_TO_ESME): (None, (A.WRITE,)),
    (S.BOUND_TX, E.TO_SMSC): (None, (A.TO_APP,)),
    (S.BOUND_TRX, E.TO_SMSC): (None, (A.TO_APP,)),
    (S.BOUND_RX, E.TO_ESME): (None, (A.TO_APP,)),
    (S.BOUND_TRX, E.TO_ESME): (None, (A.TO_APP,)),
    **{(s, E.BIND): (None, (A.ANSWER_ALYBND,)) for s in _BOUND},
    **{(s, E.SEND_UNBIND): (S.UNBINDING, (A.WRITE,)) for s in _BOUND},
    **{(s, E.UNBIND): (S.CLOSED, (A.ANSWER_OK, A.FAIL_PENDING, A.NOTIFY_UNBOUND))
       for s in _BOUND},
    # --- UNBINDING: late responses still count; the peer's unbind crosses ours --
    (S.UNBINDING, E.UNBIND_RESP): (S.CLOSED, (A.MATCH, A.FAIL_PENDING, A.NOTIFY_UNBOUND)),
    (S.UNBINDING, E.UNBIND): (S.CLOSED, (A.ANSWER_OK, A.FAIL_PENDING, A.NOTIFY_UNBOUND)),
    # --- every state but CLOSED ----------------------------------------------------
    **{(s, E.ENQUIRE_LINK): (None, (A.ANSWER_OK,)) for s in _ANY if s is not S.CLOSED},
    **{(s, E.RESPONSE): (None, (A.MATCH,)) for s in _ANY if s is not S.CLOSED},
    **{(s, E.UNDECODABLE): (None, (A.ANSWER_NACK,)) for s in _ANY if s is not S.CLOSED},
    **{(s, E.CONNECTION_LOST): (S.CLOSED, (A.FAIL_PENDING, A.NOTIFY_UNBOUND))
       for s in _ANY if s is not S.CLOSED},
}

# Fallbacks: a received request not allowed in this state is answered with
# ESME_RINVBNDSTS (the bind stays up); a local command not allowed raises; a stray
# response is dropped; after CLOSED everything is dropped.
_RECEIVED_REQUESTS = (E.BIND, E.TO_SMSC, E.TO_ESME, E.UNBIND, E.OUTBIND, E.WRONG_ROLE)
_LOCAL = (E.SEND_BIND, E.SEND_TO_SMSC, E.SEND_TO_ESME, E.SEND_UNBIND)


def _default(state: State, event: Event) -> tuple[State | str | None, tuple[Action, ...]]:
    if state is S.CLOSED:
        return None, ((A.REFUSE_LOCAL,) if event in _LOCAL else (A.IGNORE,))
    if event in _RECEIVED_REQUESTS:
        return None, (A.ANSWER_INVBNDSTS,)
    if event in _LOCAL:
        return None, (A.REFUSE_LOCAL,)
    return None, (A.IGNORE,)


BIND_CLASSES: dict[str, type] = {"tx": BindTransmitter, "rx": BindReceiver, "trx": BindTransceiver}
_BIND_STATE = {
    CommandId.BIND_TRANSMITTER: S.BOUND_TX,
    CommandId.BIND_RECEIVER: S.BOUND_RX,
    CommandId.BIND_TRANSCEIVER: S.BOUND_TRX,
}
_BIND_KIND = {S.BOUND_TX: "tx", S.BOUND_RX: "rx", S.BOUND_TRX: "trx"}
_BIND_RESP_IDS = frozenset(
    (CommandId.BIND_TRANSMITTER_RESP, CommandId.BIND_RECEIVER_RESP,
     CommandId.BIND_TRANSCEIVER_RESP)
)
# Requests that travel ESME -> SMSC and SMSC -> ESME (data_sm goes both ways).
_ESME_TO_SMSC = frozenset(
    (CommandId.SUBMIT_SM, CommandId.QUERY_SM, CommandId.CANCEL_SM, CommandId.REPLACE_SM)
)
_SMSC_TO_ESME = frozenset((CommandId.DELIVER_SM, CommandId.ALERT_NOTIFICATION))

# The authenticator gets the bind PDU and returns the command_status to answer
# (ESME_ROK, ESME_RINVSYSID, ESME_RINVPASWD, ESME_RBINDFAIL, ...).
Authenticator = Callable[[Pdu], int]


# ---------------------------------------------------------------------------
# errors and events


class SessionError(Exception):
    pass


class SessionStateError(SessionError):
    """A local command not allowed in the current state."""


class QueueFull(SessionError):
    """Window and queue are both full: the caller must slow down."""


@dataclass(frozen=True, slots=True)
class Bound:
    bind_type: str  # "tx" | "rx" | "trx"
    system_id: str  # the ESME's system_id (SMSC role) / the SMSC's (ESME role)


@dataclass(frozen=True, slots=True)
class BindRefused:
    status: int
    detail: str = ""  # why, when the bind_resp itself was at fault


@dataclass(frozen=True, slots=True)
class RequestReceived:
    pdu: Pdu  # answer with session.send_response(make_response(pdu, status, ...))


# The two request outcomes carry the request as the application handed it over
# (`sent`) and the sequence number it travelled under; `request` is the numbered PDU,
# copied only when read. The asyncio adapter needs only the number, and copying
# every submit_sm cost as much as encoding it.


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    sent: Pdu
    sequence_number: int
    response: Pdu  # may be a GenericNack

    @property
    def request(self) -> Pdu:
        """The request with the sequence number it travelled under."""
        return with_sequence_number(self.sent, self.sequence_number)


@dataclass(frozen=True, slots=True)
class RequestFailed:
    sent: Pdu
    sequence_number: int
    reason: str  # "timeout" | "closed" | "undecodable response"
    status: int | None = None

    @property
    def request(self) -> Pdu:
        """The request with the sequence number it travelled under."""
        return with_sequence_number(self.sent, self.sequence_number)


@dataclass(frozen=True, slots=True)
class LateResponse:
    """The answer to a request already reported as RequestFailed("timeout"): its
    window slot is free again. `response` is None when the answer did not decode."""

    sent: Pdu
    sequence_number: int
    response: Pdu | None


@dataclass(frozen=True, slots=True)
class Unbound:
    by_peer: bool


@dataclass(frozen=True, slots=True)
class LinkDead:
    """enquire_link went unanswered, or every window slot is held by a request the
    peer never answered: close the transport and reconnect."""

    reason: str = "enquire_link unanswered"


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    detail: str
    status: int


SessionEvent = (
    Bound | BindRefused | RequestReceived | ResponseReceived | RequestFailed | LateResponse
    | Unbound | LinkDead | ProtocolViolation
)


@dataclass(slots=True)
class _Outstanding:
    sent: Pdu  # as the application handed it over; numbered on the wire only
    sequence_number: int
    deadline_s: float
    in_window: bool
    timed_out: bool = False  # the caller was told; the window slot stays taken


class Session:
    """One SMPP connection. See the module docstring."""

    def __init__(
        self,
        role: Role,
        *,
        system_id: str = "",
        authenticator: Authenticator | None = None,
        window_max: int = WINDOW_MAX_DEFAULT,
        queue_max: int = QUEUE_MAX_DEFAULT,
        inbound_pending_max: int = INBOUND_PENDING_MAX_DEFAULT,
        response_timeout_s: float = 5.0,
        enquire_link_s: float = 30.0,
        enquire_link_periodic: bool = False,
    ) -> None:
        if role is Role.SMSC and authenticator is None:
            raise ValueError("the SMSC role needs an authenticator")
        self.role = role
        self.system_id = system_id  # ours; sent in bind_resp (SMSC role)
        self.peer_system_id = ""
        self.authenticator = authenticator
        self.window_max = window_max
        self.queue_max = queue_max
        self.inbound_pending_max = inbound_pending_max
        self.response_timeout_s = response_timeout_s
        self.enquire_link_s = enquire_link_s
        # False: enquire_link after enquire_link_s of silence (SMPP 3.4 §4.11);
        # True: every enquire_link_s whatever the traffic.
        self.enquire_link_periodic = enquire_link_periodic
        self._last_enquire_s: float | None = None
        self.state = State.OPEN
        self._framer = Framer()
        self._out = bytearray()
        self._next_seq = 1
        self._outstanding: dict[int, _Outstanding] = {}
        self._in_window = 0
        self._queue: deque[tuple[int, Pdu]] = deque()
        self._inbound_pending: set[int] = set()
        self._bind_pdu: Pdu | None = None
        self._last_rx_s: float | None = None
        self._enquire_seq: int | None = None
        self._events: list[SessionEvent] = []
        self._auth_status = 0
        self._error: PduDecodeError | None = None
        self._bad_bind_resp = ""  # what was wrong with the last bind_resp, if anything

    # -- introspection -----------------------------------------------------------

    @property
    def bound(self) -> bool:
        return self.state in _BOUND

    @property
    def window_used(self) -> int:
        return self._in_window

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def can_send_now(self) -> bool:
        """True when a request would go on the wire at once (window not full)."""
        return self._in_window < self.window_max and not self._queue

    # -- commands ------------------------------------------------------------------

    def bind(self, bind_type: str, system_id: str, password: str, system_type: str = "",
             *, now_s: float, addr_ton: int = 0, addr_npi: int = 0,
             address_range: str = "") -> int:
        """ESME role: send bind_transmitter/receiver/transceiver."""
        cls = BIND_CLASSES[bind_type]
        pdu: Pdu = cls(system_id=system_id, password=password, system_type=system_type,
                       addr_ton=addr_ton, addr_npi=addr_npi, address_range=address_range)
        return self._local(Event.SEND_BIND, pdu, now_s)

    def send_request(self, pdu: Pdu, now_s: float) -> int:
        """Queue a request (submit_sm, deliver_sm, data_sm, ...); returns its sequence
        number. Raises SessionStateError when the state forbids it, QueueFull when
        the window and the queue are full."""
        if pdu.command_id == CommandId.DATA_SM:
            event = Event.SEND_TO_SMSC if self.role is Role.ESME else Event.SEND_TO_ESME
        elif pdu.command_id in _ESME_TO_SMSC:
            event = Event.SEND_TO_SMSC
        elif pdu.command_id in _SMSC_TO_ESME:
            event = Event.SEND_TO_ESME
        else:
            raise SessionError(f"use bind()/unbind() for {type(pdu).__name__}")
        return self._local(event, pdu, now_s)

    def unbind(self, now_s: float) -> int:
        return self._local(Event.SEND_UNBIND, Unbind(), now_s)

    def send_response(self, pdu: Pdu) -> None:
        """Answer an inbound request (RequestReceived). Unknown sequence numbers are
        refused: they would confuse the peer's window."""
        if not is_response(pdu.command_id):
            raise SessionError(f"{type(pdu).__name__} is not a response")
        if pdu.sequence_number not in self._inbound_pending:
            raise SessionError(f"no inbound request with sequence {pdu.sequence_number}")
        self._inbound_pending.discard(pdu.sequence_number)
        if self.state is not State.CLOSED:
            self._out += encode(pdu)

    def connection_lost(self) -> list[SessionEvent]:
        self._dispatch(Event.CONNECTION_LOST, None, 0.0)
        return self._take_events()

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out)

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    # -- input ---------------------------------------------------------------------

    def receive_data(self, data: bytes, now_s: float) -> list[SessionEvent]:
        self._last_rx_s = now_s
        for item in self._framer.feed(data):
            if isinstance(item, PduDecodeError):
                if self._is_bind_resp_error(item):
                    self._dispatch(Event.BIND_RESP_BAD, None, now_s)
                    break
                self._error = item
                self._dispatch(Event.UNDECODABLE, None, now_s)
                if item.fatal:
                    self._dispatch(Event.CONNECTION_LOST, None, now_s)
                    break
                continue
            try:
                pdu = decode(item)
            except PduDecodeError as exc:
                if self._is_bind_resp_error(exc):
                    self._dispatch(Event.BIND_RESP_BAD, None, now_s)
                    break
                self._error = exc
                self._dispatch(Event.UNDECODABLE, None, now_s)
                continue
            self._dispatch(self._classify(pdu), pdu, now_s)
        return self._take_events()

    def tick(self, now_s: float) -> list[SessionEvent]:
        """Fire response timeouts and enquire_link. Call at least every second."""
        if self._last_rx_s is None:
            self._last_rx_s = now_s
        expired = [o for o in self._outstanding.values() if o.deadline_s <= now_s]
        for o in expired:
            seq = o.sequence_number
            if seq == self._enquire_seq:
                self._enquire_seq = None
                self._events.append(LinkDead())
                self._dispatch(Event.CONNECTION_LOST, None, now_s)
                return self._take_events()
            if (self.state is State.BINDING and self._bind_pdu is not None
                    and seq == self._bind_pdu.sequence_number):
                del self._outstanding[seq]
                self._dispatch(Event.BIND_TIMEOUT, None, now_s)
                continue
            if o.timed_out:
                # Not answered long after its timeout either: the peer lost it, and
                # only a new connection gives its window slot back.
                self._events.append(LinkDead(
                    f"{type(o.sent).__name__} unanswered for "
                    f"{self.response_timeout_s * (1 + LATE_RESPONSE_WAIT_FACTOR):g} s"))
                self._dispatch(Event.CONNECTION_LOST, None, now_s)
                return self._take_events()
            # The request may still be answered (a slow peer): it keeps its window
            # slot until its response, a generic_nack or the end of the connection,
            # so the peer never sees more than window_max requests unanswered.
            o.timed_out = True
            o.deadline_s = now_s + self.response_timeout_s * LATE_RESPONSE_WAIT_FACTOR
            self._events.append(RequestFailed(o.sent, seq, "timeout"))
        self._pump(now_s)
        if self._last_enquire_s is None:
            self._last_enquire_s = now_s
        since = self._last_enquire_s if self.enquire_link_periodic else self._last_rx_s
        if (
            self.bound and self._enquire_seq is None
            and now_s - since >= self.enquire_link_s
        ):
            self._last_enquire_s = now_s
            seq = self._take_seq()
            self._enquire_seq = seq
            self._outstanding[seq] = _Outstanding(
                _ENQUIRE_LINK, seq, now_s + self.response_timeout_s, False
            )
            self._out += encode(EnquireLink(), seq)
        return self._take_events()

    # -- the engine ------------------------------------------------------------------

    def _is_bind_resp_error(self, exc: PduDecodeError) -> bool:
        """A bind_resp that does not decode, while we wait for one: it is the answer to
        our bind (nothing else is outstanding) and it cannot be read."""
        if self.state is not State.BINDING or exc.command_id not in _BIND_RESP_IDS:
            return False
        self._bad_bind_resp = f"bind_resp does not decode: {exc}"
        return True

    def _classify(self, pdu: Pdu) -> Event:
        cid = pdu.command_id
        if is_response(cid):
            if cid in _BIND_RESP_IDS:
                if self.state is State.BINDING:
                    bind = self._bind_pdu
                    assert bind is not None
                    if (pdu.sequence_number != bind.sequence_number
                            or cid != bind.command_id | 0x80000000):
                        self._bad_bind_resp = (
                            f"{type(pdu).__name__} seq {pdu.sequence_number} does not answer "
                            f"{type(bind).__name__} seq {bind.sequence_number}")
                        return Event.BIND_RESP_BAD
                return Event.BIND_RESP_OK if pdu.command_status == 0 else Event.BIND_RESP_ERROR
            if cid == CommandId.UNBIND_RESP:
                return Event.UNBIND_RESP
            if (
                cid == CommandId.GENERIC_NACK and self._bind_pdu is not None
                and pdu.sequence_number == self._bind_pdu.sequence_number
                and self.state is State.BINDING
            ):
                return Event.BIND_RESP_ERROR
            return Event.RESPONSE
        if cid in _BIND_STATE:
            return Event.BIND if self.role is Role.SMSC else Event.WRONG_ROLE
        if cid == CommandId.ENQUIRE_LINK:
            return Event.ENQUIRE_LINK
        if cid == CommandId.UNBIND:
            return Event.UNBIND
        if cid == CommandId.OUTBIND:
            return Event.OUTBIND if self.role is Role.ESME else Event.WRONG_ROLE
        if cid == CommandId.DATA_SM:
            return Event.TO_SMSC if self.role is Role.SMSC else Event.TO_ESME
        if cid in _ESME_TO_SMSC:
            return Event.TO_SMSC if self.role is Role.SMSC else Event.WRONG_ROLE
        return Event.TO_ESME if self.role is Role.ESME else Event.WRONG_ROLE

    def _local(self, event: Event, pdu: Pdu, now_s: float) -> int:
        new_state, actions = TRANSITIONS.get((self.state, event)) or _default(self.state, event)
        if Action.REFUSE_LOCAL in actions:
            raise SessionStateError(f"{type(pdu).__name__} not allowed in {self.state.value}")
        seq = self._write(pdu, now_s, in_window=event in (Event.SEND_TO_SMSC, Event.SEND_TO_ESME))
        if event is Event.SEND_BIND:
            self._bind_pdu = _with_seq(pdu, seq)
        if new_state is not None:
            self.state = new_state  # type: ignore[assignment]  # never BOUND_AS_BIND here
        return seq

    def _dispatch(self, event: Event, pdu: Pdu | None, now_s: float) -> None:
        new_state, actions = TRANSITIONS.get((self.state, event)) or _default(self.state, event)
        if new_state is BOUND_AS_BIND:
            bind = pdu if event is Event.BIND_ACCEPTED else self._bind_pdu
            assert bind is not None
            new_state = _BIND_STATE[CommandId(bind.command_id)]
        for action in actions:
            self._run(action, event, pdu, now_s)
        if new_state is not None:
            assert isinstance(new_state, State)
            self.state = new_state

    def _run(self, action: Action, event: Event, pdu: Pdu | None, now_s: float) -> None:
        if action is Action.IGNORE:
            return
        # Traffic first (responses, submits, delivers): the rest is rare.
        if action is Action.MATCH:
            assert pdu is not None
            self._match(pdu)
            self._pump(now_s)
        elif action is Action.TO_APP:
            assert pdu is not None
            if pdu.command_id not in RESPONSE_CLASS:  # alert_notification: no answer
                self._events.append(RequestReceived(pdu))
                return
            if len(self._inbound_pending) >= self.inbound_pending_max:
                # The peer ignores our window: push back instead of buffering more.
                self._out += encode(make_response(pdu, Status.ESME_RTHROTTLED))
                return
            self._inbound_pending.add(pdu.sequence_number)
            self._events.append(RequestReceived(pdu))
        elif action is Action.AUTHENTICATE:
            assert pdu is not None and self.authenticator is not None
            try:
                status = self.authenticator(pdu)
            except Exception:  # noqa: BLE001  # a faulty callback refuses the bind only
                status = Status.ESME_RBINDFAIL
            self._auth_status = status
            self._dispatch(
                Event.BIND_ACCEPTED if status == 0 else Event.BIND_REJECTED, pdu, now_s
            )
        elif action is Action.ANSWER_OK:
            assert pdu is not None
            fields: dict[str, object] = {}
            if pdu.command_id in _BIND_STATE:
                fields["system_id"] = self.system_id
                self.peer_system_id = getattr(pdu, "system_id", "")
            self._out += encode(make_response(pdu, 0, **fields))
        elif action is Action.ANSWER_REJECTED:
            assert pdu is not None
            self._out += encode(make_response(pdu, self._auth_status, system_id=self.system_id))
        elif action is Action.ANSWER_INVBNDSTS:
            assert pdu is not None
            self._answer_status(pdu, Status.ESME_RINVBNDSTS)
        elif action is Action.ANSWER_ALYBND:
            assert pdu is not None
            self._answer_status(pdu, Status.ESME_RALYBND)
        elif action is Action.NOTIFY_OUTBIND:
            assert pdu is not None
            self._events.append(RequestReceived(pdu))
        elif action is Action.NOTIFY_BOUND:
            assert pdu is not None
            if event is Event.BIND_RESP_OK:
                self.peer_system_id = getattr(pdu, "system_id", "")
                kind = _BIND_KIND[_BIND_STATE[CommandId(self._bind_pdu.command_id)]]  # type: ignore[union-attr]
            else:
                kind = _BIND_KIND[_BIND_STATE[CommandId(pdu.command_id)]]
            self._events.append(Bound(kind, self.peer_system_id))
        elif action is Action.NOTIFY_BIND_REFUSED:
            if event is Event.BIND_RESP_BAD:
                self._events.append(BindRefused(Status.ESME_RUNKNOWNERR, self._bad_bind_resp))
            elif pdu is None:  # timeout: no answer at all
                self._events.append(BindRefused(Status.ESME_RUNKNOWNERR))
            else:
                self._events.append(BindRefused(pdu.command_status or Status.ESME_RBINDFAIL))
        elif action is Action.NOTIFY_UNBOUND:
            self._events.append(Unbound(by_peer=event is not Event.UNBIND_RESP))
        elif action is Action.FAIL_PENDING:
            reason = "closed"
            for o in self._outstanding.values():
                if o.timed_out:
                    continue  # its caller was told at the timeout
                if o.sent.command_id not in (CommandId.ENQUIRE_LINK, CommandId.UNBIND):
                    self._events.append(RequestFailed(o.sent, o.sequence_number, reason))
            for seq, req in self._queue:
                self._events.append(RequestFailed(req, seq, reason))
            self._outstanding.clear()
            self._queue.clear()
            self._in_window = 0
            self._enquire_seq = None
        elif action is Action.ANSWER_NACK:
            assert self._error is not None
            self._undecodable(self._error, now_s)
            self._error = None

    def _answer_status(self, pdu: Pdu, status: int) -> None:
        if pdu.command_id in RESPONSE_CLASS:
            self._out += encode(make_response(pdu, status))
        elif not is_response(pdu.command_id):
            self._out += encode(GenericNack(command_status=status,
                                            sequence_number=pdu.sequence_number))

    def _undecodable(self, exc: PduDecodeError, now_s: float) -> None:
        self._events.append(ProtocolViolation(str(exc), exc.status))
        seq = exc.sequence_number or 0
        if exc.command_id is not None and is_response(exc.command_id) and not exc.fatal:
            # A response we cannot read: its request failed, nothing to answer.
            o = self._outstanding.pop(seq, None)
            if o is not None:
                if o.in_window:
                    self._in_window -= 1
                self._events.append(
                    LateResponse(o.sent, seq, None) if o.timed_out else
                    RequestFailed(o.sent, seq, "undecodable response", exc.status))
                self._pump(now_s)
            return
        if exc.answer_with_generic_nack:
            self._out += encode(GenericNack(command_status=exc.status, sequence_number=seq))
        else:
            assert exc.command_id is not None
            resp_cls = RESPONSE_CLASS[exc.command_id]
            self._out += encode(resp_cls(command_status=exc.status, sequence_number=seq))

    def _match(self, resp: Pdu) -> None:
        o = self._outstanding.pop(resp.sequence_number, None)
        if o is None:
            self._events.append(ProtocolViolation(
                f"{type(resp).__name__} seq {resp.sequence_number} answers nothing pending",
                Status.ESME_RUNKNOWNERR,
            ))
            return
        if o.in_window:
            self._in_window -= 1
        if resp.sequence_number == self._enquire_seq:
            self._enquire_seq = None
            return
        cid = o.sent.command_id
        if cid in _BIND_STATE or cid == CommandId.UNBIND:
            return  # bind/unbind outcomes are reported by NOTIFY_* actions
        if o.timed_out:
            self._events.append(LateResponse(o.sent, o.sequence_number, resp))
            return
        self._events.append(ResponseReceived(o.sent, o.sequence_number, resp))

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq = 1 if seq >= SEQUENCE_NUMBER_MAX else seq + 1
        return seq

    def _write(self, pdu: Pdu, now_s: float, *, in_window: bool) -> int:
        seq = self._take_seq()
        if in_window and (self._in_window >= self.window_max or self._queue):
            if len(self._queue) >= self.queue_max:
                self._next_seq = seq  # give the number back: nothing was sent
                raise QueueFull(f"window {self.window_max} and queue {self.queue_max} full")
            self._queue.append((seq, pdu))
            return seq
        self._send_now(seq, pdu, now_s, in_window)
        return seq

    def _send_now(self, seq: int, pdu: Pdu, now_s: float, in_window: bool) -> None:
        self._out += encode(pdu, seq)
        self._outstanding[seq] = _Outstanding(pdu, seq, now_s + self.response_timeout_s, in_window)
        if in_window:
            self._in_window += 1

    def _pump(self, now_s: float) -> None:
        while self._queue and self._in_window < self.window_max and self.bound:
            seq, pdu = self._queue.popleft()
            self._send_now(seq, pdu, now_s, True)

    def _take_events(self) -> list[SessionEvent]:
        events, self._events = self._events, []
        return events


_with_seq = with_sequence_number
_ENQUIRE_LINK = EnquireLink()
