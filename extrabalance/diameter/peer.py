"""The Diameter peer state machine (RFC 6733 §5.6, watchdog per RFC 3539), sans-IO.

Two rules, as in h11's state module:

1. Everything that affects the life of one transport connection to one peer lives
   here: capabilities exchange, watchdog, disconnect, the table of requests sent on
   this connection and not yet answered, and the checks that make us answer a
   malformed message ourselves. Routing, retries and failover across connections
   belong to the adapter (``node.py``), which owns several of these objects.
2. This file does no IO and reads no clock. Bytes come in through
   ``data_received``, time through ``now`` arguments and ``handle_timer``; bytes
   go out through ``data_to_send`` and everything else through ``events()``.

Theory of operation. One ``PeerConnection`` per transport connection. The
initiator (we dialled) starts in WAIT_CONN_ACK and sends CER when the transport is
up; the responder (we accepted) starts in WAIT_CER. The table below is the whole
lifecycle: an incoming message or a timer is first *classified* into one of the
``Ev`` events (e.g. a CER from an unknown Origin-Host is ``RCV_CER_UNKNOWN_PEER``),
then ``TRANSITIONS[(state, event)]`` gives the next state and the actions to run,
in order. A (state, event) pair missing from the table is a protocol violation
and closes the connection.

RFC 6733's election (both peers dialling each other) is not implemented: the node
dials the IN and the IN dials the node on separate connections, each of which
stands alone. The watchdog follows RFC 3539: any message received proves the peer
alive; at Tw expiry with no DWR outstanding we send one; at Tw expiry with a DWR
unanswered the peer is SUSPECT and its pending requests are handed back for
failover; one more Tw without a word and the connection is closed (DOWN).
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
import random
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from . import codec
from .codec import Avp, DiameterError, FrameError, Framer, Message, avp
from .constants import (
    AVP_ACCT_APPLICATION_ID,
    AVP_AUTH_APPLICATION_ID,
    AVP_DISCONNECT_CAUSE,
    AVP_ERROR_MESSAGE,
    AVP_FIRMWARE_REVISION,
    AVP_HOST_IP_ADDRESS,
    AVP_ORIGIN_HOST,
    AVP_ORIGIN_REALM,
    AVP_ORIGIN_STATE_ID,
    AVP_PRODUCT_NAME,
    AVP_RESULT_CODE,
    AVP_SUPPORTED_VENDOR_ID,
    AVP_VENDOR_ID,
    AVP_VENDOR_SPECIFIC_APPLICATION_ID,
    CMD_CAPABILITIES_EXCHANGE,
    CMD_DEVICE_WATCHDOG,
    CMD_DISCONNECT_PEER,
    DIAMETER_NO_COMMON_APPLICATION,
    DIAMETER_SUCCESS,
    DIAMETER_UNABLE_TO_COMPLY,
    DIAMETER_UNKNOWN_PEER,
    DISCONNECT_CAUSE_REBOOTING,
    VENDOR_3GPP,
)

# RFC 3539 §3.4.1: Tw defaults to 30 s and is jittered by up to ±2 s so that
# watchdogs of many peers do not line up. Short test values keep a proportional
# jitter (a quarter of Tw at most).
WATCHDOG_DEFAULT_S: Final = 30.0
WATCHDOG_JITTER_MAX_S: Final = 2.0
# How long the initiator waits for CEA, the responder for CER, and a DPR sender
# for DPA (or a DPR receiver for the transport to close) before giving up.
CAPABILITIES_TIMEOUT_S: Final = 10.0
DISCONNECT_TIMEOUT_S: Final = 2.0
# Requests in flight on one connection. Above this the caller must pick another
# peer or wait; a bound protects the IN and our memory alike.
PENDING_MAX_DEFAULT: Final = 4096
APPLICATION_RELAY: Final = 0xFFFFFFFF


class Role(enum.Enum):
    INITIATOR = "initiator"  # we opened the transport
    RESPONDER = "responder"  # the peer did


class PeerState(enum.Enum):
    CLOSED = "Closed"
    WAIT_CONN_ACK = "Wait-Conn-Ack"
    WAIT_CER = "Wait-CER"  # responder side of RFC 6733's R-Open path
    WAIT_I_CEA = "Wait-I-CEA"
    OPEN = "Open"  # RFC 6733 I-Open / R-Open; RFC 3539 OKAY
    SUSPECT = "Suspect"  # RFC 3539 SUSPECT: a DWR went unanswered for Tw
    CLOSING = "Closing"


class Ev(enum.Enum):
    """Inputs, after classification."""

    START = enum.auto()  # initiator asked to connect
    CONN_ACK = enum.auto()  # transport up (initiator)
    CONN_NACK = enum.auto()  # transport failed
    RCV_CER_OK = enum.auto()
    RCV_CER_UNKNOWN_PEER = enum.auto()
    RCV_CER_NO_COMMON_APP = enum.auto()
    RCV_CER_INVALID = enum.auto()  # a CER that fails validation
    RCV_CEA_OK = enum.auto()
    RCV_CEA_FAIL = enum.auto()
    RCV_DWR = enum.auto()
    RCV_DWA = enum.auto()
    RCV_DPR = enum.auto()
    RCV_DPA = enum.auto()
    RCV_APP_REQUEST = enum.auto()
    RCV_APP_ANSWER = enum.auto()
    RCV_INVALID_REQUEST = enum.auto()  # validation failed: we answer with its result code
    TW_EXPIRED = enum.auto()  # watchdog timer, no DWR outstanding
    TW_EXPIRED_UNANSWERED = enum.auto()  # watchdog timer, DWR outstanding
    TIMEOUT = enum.auto()  # CER/CEA/DPA wait exceeded
    STOP = enum.auto()  # we want to leave (shutdown)
    PEER_DISCONNECTED = enum.auto()  # transport closed or broken under us


class Act(enum.Enum):
    CONNECT = enum.auto()
    SEND_CER = enum.auto()
    SEND_CEA = enum.auto()
    SEND_CEA_UNKNOWN_PEER = enum.auto()  # 3010, E bit
    SEND_CEA_NO_COMMON_APP = enum.auto()  # 5010
    SEND_ERROR_ANSWER = enum.auto()  # the validation failure's own result code
    SEND_DWR = enum.auto()
    SEND_DWA = enum.auto()
    SEND_DPR = enum.auto()
    SEND_DPA = enum.auto()
    OPENED = enum.auto()  # report PeerOpened
    DELIVER_REQUEST = enum.auto()
    DELIVER_ANSWER = enum.auto()
    RESET_WATCHDOG = enum.auto()  # proof of life: restart Tw
    WATCHDOG_DWA = enum.auto()  # DWA: clear the outstanding DWR, restart Tw
    FAILOVER_PENDING = enum.auto()  # hand pending requests back (SUSPECT or DOWN)
    RECOVERED = enum.auto()  # report PeerRecovered (SUSPECT -> OPEN)
    START_TIMEOUT = enum.auto()
    DISCONNECT = enum.auto()  # ask the adapter to close the transport after flushing


_S, _E, _A = PeerState, Ev, Act
# (state, event) -> (next state, actions). Read it like RFC 6733 §5.6's table.
TRANSITIONS: Final[dict[tuple[PeerState, Ev], tuple[PeerState, tuple[Act, ...]]]] = {
    # --- initiator: connect, CER/CEA ---------------------------------------------
    (_S.CLOSED, _E.START): (_S.WAIT_CONN_ACK, (_A.CONNECT, _A.START_TIMEOUT)),
    (_S.WAIT_CONN_ACK, _E.CONN_ACK): (_S.WAIT_I_CEA, (_A.SEND_CER, _A.START_TIMEOUT)),
    (_S.WAIT_CONN_ACK, _E.CONN_NACK): (_S.CLOSED, ()),
    (_S.WAIT_CONN_ACK, _E.TIMEOUT): (_S.CLOSED, (_A.DISCONNECT,)),
    (_S.WAIT_I_CEA, _E.RCV_CEA_OK): (_S.OPEN, (_A.OPENED, _A.RESET_WATCHDOG)),
    (_S.WAIT_I_CEA, _E.RCV_CEA_FAIL): (_S.CLOSED, (_A.DISCONNECT,)),
    (_S.WAIT_I_CEA, _E.TIMEOUT): (_S.CLOSED, (_A.DISCONNECT,)),
    # --- responder: CER/CEA ----------------------------------------------------------
    (_S.WAIT_CER, _E.RCV_CER_OK): (_S.OPEN, (_A.SEND_CEA, _A.OPENED, _A.RESET_WATCHDOG)),
    (_S.WAIT_CER, _E.RCV_CER_UNKNOWN_PEER): (_S.CLOSED, (_A.SEND_CEA_UNKNOWN_PEER, _A.DISCONNECT)),
    (_S.WAIT_CER, _E.RCV_CER_NO_COMMON_APP): (_S.CLOSED, (_A.SEND_CEA_NO_COMMON_APP,
                                                          _A.DISCONNECT)),
    (_S.WAIT_CER, _E.RCV_CER_INVALID): (_S.CLOSED, (_A.SEND_ERROR_ANSWER, _A.DISCONNECT)),
    (_S.WAIT_CER, _E.TIMEOUT): (_S.CLOSED, (_A.DISCONNECT,)),
    # --- open: traffic and watchdog (RFC 3539 OKAY) --------------------------------
    (_S.OPEN, _E.RCV_APP_REQUEST): (_S.OPEN, (_A.RESET_WATCHDOG, _A.DELIVER_REQUEST)),
    (_S.OPEN, _E.RCV_APP_ANSWER): (_S.OPEN, (_A.RESET_WATCHDOG, _A.DELIVER_ANSWER)),
    (_S.OPEN, _E.RCV_INVALID_REQUEST): (_S.OPEN, (_A.RESET_WATCHDOG, _A.SEND_ERROR_ANSWER)),
    (_S.OPEN, _E.RCV_DWR): (_S.OPEN, (_A.RESET_WATCHDOG, _A.SEND_DWA)),
    (_S.OPEN, _E.RCV_DWA): (_S.OPEN, (_A.WATCHDOG_DWA,)),
    (_S.OPEN, _E.TW_EXPIRED): (_S.OPEN, (_A.SEND_DWR,)),
    (_S.OPEN, _E.TW_EXPIRED_UNANSWERED): (_S.SUSPECT, (_A.FAILOVER_PENDING,)),
    (_S.OPEN, _E.RCV_DPR): (_S.CLOSING, (_A.SEND_DPA, _A.FAILOVER_PENDING, _A.START_TIMEOUT)),
    (_S.OPEN, _E.STOP): (_S.CLOSING, (_A.SEND_DPR, _A.START_TIMEOUT)),
    (_S.OPEN, _E.RCV_CER_OK): (_S.OPEN, (_A.SEND_ERROR_ANSWER,)),  # CER twice: 5012
    # A malformed CER on an open connection gets its error answer like any request.
    (_S.OPEN, _E.RCV_CER_INVALID): (_S.OPEN, (_A.RESET_WATCHDOG, _A.SEND_ERROR_ANSWER)),
    # --- suspect (RFC 3539 SUSPECT): any word from the peer brings it back ------------
    (_S.SUSPECT, _E.RCV_APP_REQUEST): (_S.OPEN, (_A.RESET_WATCHDOG, _A.RECOVERED,
                                                 _A.DELIVER_REQUEST)),
    (_S.SUSPECT, _E.RCV_APP_ANSWER): (_S.OPEN, (_A.RESET_WATCHDOG, _A.RECOVERED,
                                                _A.DELIVER_ANSWER)),
    (_S.SUSPECT, _E.RCV_INVALID_REQUEST): (_S.OPEN, (_A.RESET_WATCHDOG, _A.RECOVERED,
                                                     _A.SEND_ERROR_ANSWER)),
    (_S.SUSPECT, _E.RCV_DWR): (_S.OPEN, (_A.RESET_WATCHDOG, _A.RECOVERED, _A.SEND_DWA)),
    (_S.SUSPECT, _E.RCV_DWA): (_S.OPEN, (_A.WATCHDOG_DWA, _A.RECOVERED)),
    (_S.SUSPECT, _E.RCV_CER_OK): (_S.OPEN, (_A.RESET_WATCHDOG, _A.RECOVERED,
                                            _A.SEND_ERROR_ANSWER)),
    (_S.SUSPECT, _E.RCV_CER_INVALID): (_S.OPEN, (_A.RESET_WATCHDOG, _A.RECOVERED,
                                                 _A.SEND_ERROR_ANSWER)),
    (_S.SUSPECT, _E.TW_EXPIRED_UNANSWERED): (_S.CLOSED, (_A.DISCONNECT,)),  # DOWN
    (_S.SUSPECT, _E.RCV_DPR): (_S.CLOSING, (_A.SEND_DPA, _A.START_TIMEOUT)),
    (_S.SUSPECT, _E.STOP): (_S.CLOSING, (_A.SEND_DPR, _A.START_TIMEOUT)),
    # --- closing: DPR sent (wait DPA) or DPA sent (wait for the transport to close) ---
    (_S.CLOSING, _E.RCV_DPA): (_S.CLOSED, (_A.DISCONNECT,)),
    (_S.CLOSING, _E.RCV_APP_ANSWER): (_S.CLOSING, (_A.DELIVER_ANSWER,)),
    (_S.CLOSING, _E.RCV_DWR): (_S.CLOSING, (_A.SEND_DWA,)),
    (_S.CLOSING, _E.RCV_DWA): (_S.CLOSING, ()),
    (_S.CLOSING, _E.RCV_DPR): (_S.CLOSING, (_A.SEND_DPA,)),
    (_S.CLOSING, _E.TIMEOUT): (_S.CLOSED, (_A.DISCONNECT,)),
    (_S.CLOSING, _E.STOP): (_S.CLOSING, ()),
    (_S.CLOSING, _E.TW_EXPIRED): (_S.CLOSING, ()),
    (_S.CLOSING, _E.TW_EXPIRED_UNANSWERED): (_S.CLOSING, ()),
}
# Losing the transport, or being stopped before anything is open, ends every state.
for _state in PeerState:
    TRANSITIONS.setdefault((_state, _E.PEER_DISCONNECTED), (_S.CLOSED, (_A.FAILOVER_PENDING,)))
    if _state in (_S.WAIT_CONN_ACK, _S.WAIT_CER, _S.WAIT_I_CEA):
        TRANSITIONS.setdefault((_state, _E.STOP), (_S.CLOSED, (_A.DISCONNECT,)))
del _state


# --- identity ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalIdentity:
    """Who we are in CER/CEA and in every Origin-Host/Origin-Realm we send."""

    origin_host: str
    origin_realm: str
    host_ip: str = "127.0.0.1"
    vendor_id: int = 0
    product_name: str = "ExtraBalance"
    origin_state_id: int = 0
    auth_application_ids: tuple[int, ...] = (4,)
    firmware_revision: int | None = None


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerOpened:
    origin_host: str
    origin_realm: str
    applications: frozenset[int]
    product_name: str | None = None


@dataclass(frozen=True, slots=True)
class PeerRecovered:
    """SUSPECT -> OPEN: the peer answered again (failback may start)."""


@dataclass(frozen=True, slots=True)
class PeerSuspect:
    """A DWR went unanswered for Tw: stop sending here."""


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The connection is over; the adapter closes the transport after flushing."""

    reason: str


@dataclass(frozen=True, slots=True)
class RequestReceived:
    message: Message


@dataclass(frozen=True, slots=True)
class AnswerReceived:
    token: Any
    message: Message


@dataclass(frozen=True, slots=True)
class RequestTimedOut:
    """No answer by the deadline: the outcome is unknown."""

    token: Any
    message: Message


@dataclass(frozen=True, slots=True)
class RequestsFailedOver:
    """Requests pending on a connection that went SUSPECT or DOWN: outcome unknown.

    (token, message) pairs, in the order they were sent.
    """

    requests: tuple[tuple[Any, Message], ...]
    reason: str


@dataclass(frozen=True, slots=True)
class MessageRejected:
    """We answered (or dropped) a malformed message ourselves; for logs and metrics."""

    result_code: int
    text: str
    answered: bool


Event = (PeerOpened | PeerRecovered | PeerSuspect | PeerClosed | RequestReceived
         | AnswerReceived | RequestTimedOut | RequestsFailedOver | MessageRejected)


class PendingTableFull(Exception):
    """``pending_max`` requests already wait for answers on this connection."""


class NotOpen(Exception):
    """The connection is not open for application requests."""


@dataclass(slots=True)
class _Pending:
    token: Any
    message: Message
    deadline: float


@dataclass(slots=True)
class _Timers:
    watchdog_at: float | None = None
    watchdog_armed_at: float = 0.0  # the instant Tw was counted from
    activity_at: float = 0.0  # last message received
    dwr_outstanding: bool = False
    timeout_at: float | None = None
    deadlines: list[tuple[float, int]] = field(default_factory=list)  # heap (deadline, hbh)


class PeerConnection:
    """One transport connection to one Diameter peer. See the module docstring."""

    def __init__(
        self,
        local: LocalIdentity,
        role: Role,
        *,
        allowed_peers: Iterable[str] | None = None,
        expected_origin_host: str | None = None,
        watchdog_s: float = WATCHDOG_DEFAULT_S,
        pending_max: int = PENDING_MAX_DEFAULT,
        capabilities_timeout_s: float = CAPABILITIES_TIMEOUT_S,
        disconnect_timeout_s: float = DISCONNECT_TIMEOUT_S,
        rng: random.Random | None = None,
    ) -> None:
        self.local = local
        self.role = role
        self.allowed_peers = None if allowed_peers is None else frozenset(allowed_peers)
        self.expected_origin_host = expected_origin_host
        self.watchdog_s = watchdog_s
        self.pending_max = pending_max
        self.capabilities_timeout_s = capabilities_timeout_s
        self.disconnect_timeout_s = disconnect_timeout_s
        self._rng = rng or random.Random()
        self.state = PeerState.CLOSED if role is Role.INITIATOR else PeerState.WAIT_CER
        self.peer_origin_host: str | None = None
        self.peer_origin_realm: str | None = None
        self.peer_applications: frozenset[int] = frozenset()
        self.close_reason: str | None = None
        self._framer = Framer()
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._pending: dict[int, _Pending] = {}
        self._timers = _Timers()
        self._next_hbh = self._rng.getrandbits(32)
        self._current: Message | None = None  # message being processed
        self._current_error: DiameterError | None = None
        self._applications = frozenset(local.auth_application_ids)

    # --- inputs ---------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Initiator: we are about to dial (the adapter connects)."""
        self._fire(Ev.START, now)

    def connection_made(self, now: float) -> None:
        if self.role is Role.INITIATOR:
            self._fire(Ev.CONN_ACK, now)
        else:
            self._start_timeout(now, self.capabilities_timeout_s)

    def connection_failed(self, now: float) -> None:
        self._fire(Ev.CONN_NACK, now)

    def connection_lost(self, now: float) -> None:
        if self.state is not PeerState.CLOSED:
            self._fire(Ev.PEER_DISCONNECTED, now)
        self._fail_pending("connection lost")

    def close(self, now: float) -> None:
        """Leave politely: DPR when open, else just disconnect."""
        if self.state is not PeerState.CLOSED:
            self._fire(Ev.STOP, now)

    def data_received(self, data: bytes, now: float) -> None:
        if self.state is PeerState.CLOSED:
            return
        try:
            frames = self._framer.feed(data)
        except FrameError as exc:
            self._frame_error(exc, now)
            return
        for frame in frames:
            self._frame_received(frame, now)
            if self.is_closed:
                return
        if self._framer.error is not None:
            self._frame_error(self._framer.error, now)

    def _frame_error(self, exc: FrameError, now: float) -> None:
        # Undecodable stream: this connection only is lost (RFC 6733 §3).
        self._events.append(MessageRejected(0, str(exc), answered=False))
        self._fire(Ev.PEER_DISCONNECTED, now)
        self._disconnect(f"undecodable frame: {exc}")

    def handle_timer(self, now: float) -> None:
        t = self._timers
        if t.timeout_at is not None and now >= t.timeout_at:
            t.timeout_at = None
            self._fire(Ev.TIMEOUT, now)
        if t.watchdog_at is not None and now >= t.watchdog_at \
                and t.activity_at > t.watchdog_armed_at:
            # Messages arrived since Tw was set: count it from the last one (RFC 3539
            # restarts Tw on every message; we do it lazily, here, not per message).
            self._arm_watchdog(t.activity_at)
        if t.watchdog_at is not None and now >= t.watchdog_at:
            t.watchdog_at = None
            self._fire(Ev.TW_EXPIRED_UNANSWERED if t.dwr_outstanding else Ev.TW_EXPIRED, now)
            if self.state in (PeerState.OPEN, PeerState.SUSPECT):
                self._arm_watchdog(now)
        heap = t.deadlines
        while heap and heap[0][0] <= now:
            _, hbh = heapq.heappop(heap)
            entry = self._pending.get(hbh)
            if entry is not None and entry.deadline <= now:
                del self._pending[hbh]
                self._events.append(RequestTimedOut(entry.token, entry.message))

    def next_timer(self) -> float | None:
        t = self._timers
        candidates = [x for x in (t.watchdog_at, t.timeout_at) if x is not None]
        if t.deadlines:
            candidates.append(t.deadlines[0][0])
        return min(candidates) if candidates else None

    # --- application traffic ----------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.state is PeerState.OPEN

    @property
    def is_closed(self) -> bool:
        return self.state is PeerState.CLOSED

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def send_request(self, msg: Message, token: Any, now: float, timeout_s: float) -> Message:
        """Queue ``msg`` with a fresh hop-by-hop id; returns the message as sent.

        The answer comes back as ``AnswerReceived(token, ...)``; no answer by
        ``now + timeout_s`` gives ``RequestTimedOut``.
        """
        if self.state is not PeerState.OPEN:
            raise NotOpen(self.state.value)
        if len(self._pending) >= self.pending_max:
            raise PendingTableFull(f"{self.pending_max} requests pending")
        hbh = self._hop_by_hop()
        while hbh in self._pending:  # after 2^32 requests with one still pending
            hbh = self._hop_by_hop()
        sent = msg._replace(hop_by_hop_id=hbh)
        deadline = now + timeout_s
        self._pending[hbh] = _Pending(token, sent, deadline)
        heapq.heappush(self._timers.deadlines, (deadline, hbh))
        self._out.append(codec.encode(sent))
        return sent

    def cancel_request(self, hop_by_hop_id: int) -> None:
        """Forget a pending request (its answer, if any, will be discarded)."""
        self._pending.pop(hop_by_hop_id, None)

    def send_answer(self, answer: Message) -> None:
        if self.state in (PeerState.OPEN, PeerState.SUSPECT, PeerState.CLOSING):
            self._out.append(codec.encode(answer))

    def send_answer_bytes(self, data: bytes) -> None:
        if self.state in (PeerState.OPEN, PeerState.SUSPECT, PeerState.CLOSING):
            self._out.append(data)

    # --- outputs ----------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    @property
    def wants_disconnect(self) -> bool:
        return self.state is PeerState.CLOSED and self.close_reason is not None

    # --- classification ---------------------------------------------------------------

    def _frame_received(self, frame: bytes, now: float) -> None:
        try:
            msg = codec.decode(frame)
        except DiameterError as err:
            partial = err.partial
            if partial is not None and partial.is_request:
                self._current = partial
                self._current_error = err
                ev = (Ev.RCV_CER_INVALID if partial.command_code == CMD_CAPABILITIES_EXCHANGE
                      else Ev.RCV_INVALID_REQUEST)
                self._fire(ev, now)
            else:
                # A broken answer cannot be matched safely: drop it; its request
                # will time out and be retried (outcome unknown).
                self._events.append(MessageRejected(err.result_code, err.text, answered=False))
            return
        self._current = msg
        self._current_error = None
        self._fire(self._classify(msg), now)

    def _classify(self, msg: Message) -> Ev:
        command = msg.command_code
        if msg.flags & codec.FLAG_REQUEST:
            if command == CMD_CAPABILITIES_EXCHANGE:
                if self.state is PeerState.WAIT_CER:
                    return self._classify_cer(msg)
                # Capabilities were exchanged: a second CER is answered (5012 or its
                # validation error) and never changes who the peer is.
                try:
                    codec.validate(msg, self._applications)
                except DiameterError as err:
                    self._current_error = err
                    return Ev.RCV_CER_INVALID
                return Ev.RCV_CER_OK
            try:
                codec.validate(msg, self._applications)
            except DiameterError as err:
                self._current_error = err
                return Ev.RCV_INVALID_REQUEST
            if command == CMD_DEVICE_WATCHDOG:
                return Ev.RCV_DWR
            if command == CMD_DISCONNECT_PEER:
                return Ev.RCV_DPR
            return Ev.RCV_APP_REQUEST
        # A CEA or DPA we did not ask for is a stray answer: discarded like any
        # answer that matches no pending request, and it changes nothing.
        if command == CMD_CAPABILITIES_EXCHANGE and self.state is PeerState.WAIT_I_CEA:
            return self._classify_cea(msg)
        if command == CMD_DEVICE_WATCHDOG:
            return Ev.RCV_DWA
        if command == CMD_DISCONNECT_PEER and self.state is PeerState.CLOSING:
            return Ev.RCV_DPA
        return Ev.RCV_APP_ANSWER

    def _classify_cer(self, msg: Message) -> Ev:
        try:
            codec.validate(msg, self._applications)
        except DiameterError as err:
            self._current_error = err
            return Ev.RCV_CER_INVALID
        host = msg.get(AVP_ORIGIN_HOST)
        self.peer_origin_host = host
        self.peer_origin_realm = msg.get(AVP_ORIGIN_REALM)
        self.peer_applications = _applications_of(msg)
        if self.allowed_peers is not None and host not in self.allowed_peers:
            return Ev.RCV_CER_UNKNOWN_PEER
        if not self._common_applications(self.peer_applications):
            return Ev.RCV_CER_NO_COMMON_APP
        return Ev.RCV_CER_OK

    def _classify_cea(self, msg: Message) -> Ev:
        result = msg.get(AVP_RESULT_CODE)
        host = msg.get(AVP_ORIGIN_HOST)
        self.peer_origin_host = host if isinstance(host, str) else None
        realm = msg.get(AVP_ORIGIN_REALM)
        self.peer_origin_realm = realm if isinstance(realm, str) else None
        self.peer_applications = _applications_of(msg)
        if result != DIAMETER_SUCCESS:
            self.close_reason = f"CEA result {result}"
            return Ev.RCV_CEA_FAIL
        if self.expected_origin_host is not None and host != self.expected_origin_host:
            self.close_reason = f"CEA from {host!r}, expected {self.expected_origin_host!r}"
            return Ev.RCV_CEA_FAIL
        if self.allowed_peers is not None and host not in self.allowed_peers:
            self.close_reason = f"CEA from unknown peer {host!r}"
            return Ev.RCV_CEA_FAIL
        if not self._common_applications(self.peer_applications):
            self.close_reason = "no common application in CEA"
            return Ev.RCV_CEA_FAIL
        return Ev.RCV_CEA_OK

    def _common_applications(self, theirs: frozenset[int]) -> bool:
        return bool(theirs & self._applications) or APPLICATION_RELAY in theirs

    # --- the engine -------------------------------------------------------------------

    def _fire(self, ev: Ev, now: float) -> None:
        transition = TRANSITIONS.get((self.state, ev))
        if transition is None:
            # Not in the table: a protocol violation by the peer (e.g. traffic
            # before CER). Close this connection; nothing else is affected.
            self._events.append(MessageRejected(0, f"{ev.name} in {self.state.value}",
                                                answered=False))
            self.state = PeerState.CLOSED
            self._fail_pending(f"{ev.name} in {self.state.value}")
            self._disconnect(f"unexpected {ev.name}")
            return
        self.state, actions = transition
        for action in actions:
            self._ACTIONS[action](self, now)

    # --- actions ----------------------------------------------------------------------

    def _act_connect(self, now: float) -> None:
        pass  # the adapter dials; nothing to queue

    def _act_send_cer(self, now: float) -> None:
        self._out.append(codec.encode(codec.request(
            CMD_CAPABILITIES_EXCHANGE, 0, self._capabilities_avps(), proxiable=False,
            hop_by_hop_id=self._hop_by_hop(), end_to_end_id=self._rng.getrandbits(32))))

    def _cea(self, result_code: int, error_message: str | None = None) -> None:
        assert self._current is not None
        avps = [avp(AVP_RESULT_CODE, result_code), *self._capabilities_avps()]
        if error_message:
            avps.append(avp(AVP_ERROR_MESSAGE, error_message))
        self._out.append(codec.encode(codec.answer(self._current, avps,
                                                   error=3000 <= result_code < 4000)))

    def _act_send_cea(self, now: float) -> None:
        self._cea(DIAMETER_SUCCESS)

    def _act_send_cea_unknown_peer(self, now: float) -> None:
        self._cea(DIAMETER_UNKNOWN_PEER, "Origin-Host not configured")
        self.close_reason = f"unknown peer {self.peer_origin_host!r}"

    def _act_send_cea_no_common_app(self, now: float) -> None:
        self._cea(DIAMETER_NO_COMMON_APPLICATION, "no common application")
        self.close_reason = f"no common application with {self.peer_origin_host!r}"

    def _act_send_error_answer(self, now: float) -> None:
        err = self._current_error
        if err is None:  # CER on an open connection
            err = DiameterError(DIAMETER_UNABLE_TO_COMPLY, "capabilities already exchanged",
                                partial=self._current)
        answer = codec.error_answer(err, self.local.origin_host, self.local.origin_realm,
                                    self._current)
        if self._current is not None and self._current.command_code == CMD_CAPABILITIES_EXCHANGE:
            answer = answer._replace(avps=answer.avps + tuple(
                a for a in self._capabilities_avps()
                if a.code not in (AVP_ORIGIN_HOST, AVP_ORIGIN_REALM)))
            if self.state is PeerState.CLOSED:
                self.close_reason = f"invalid CER: {err.text}"
        self._out.append(codec.encode(answer))
        self._events.append(MessageRejected(err.result_code, err.text, answered=True))

    def _act_send_dwr(self, now: float) -> None:
        self._timers.dwr_outstanding = True
        self._out.append(codec.encode(codec.request(
            CMD_DEVICE_WATCHDOG, 0, self._origin_avps(), proxiable=False,
            hop_by_hop_id=self._hop_by_hop(), end_to_end_id=self._rng.getrandbits(32))))

    def _act_send_dwa(self, now: float) -> None:
        assert self._current is not None
        self._out.append(codec.encode(codec.answer(
            self._current, [avp(AVP_RESULT_CODE, DIAMETER_SUCCESS), *self._origin_avps()])))

    def _act_send_dpr(self, now: float) -> None:
        self.close_reason = "we disconnected (DPR)"
        self._out.append(codec.encode(codec.request(
            CMD_DISCONNECT_PEER, 0,
            [*self._origin_avps(), avp(AVP_DISCONNECT_CAUSE, DISCONNECT_CAUSE_REBOOTING)],
            proxiable=False, hop_by_hop_id=self._hop_by_hop(),
            end_to_end_id=self._rng.getrandbits(32))))

    def _act_send_dpa(self, now: float) -> None:
        assert self._current is not None
        self.close_reason = "peer disconnected (DPR)"
        self._out.append(codec.encode(codec.answer(
            self._current, [avp(AVP_RESULT_CODE, DIAMETER_SUCCESS), *self._origin_avps()])))

    def _act_opened(self, now: float) -> None:
        self._timers.timeout_at = None
        self.close_reason = None
        self._events.append(PeerOpened(self.peer_origin_host or "", self.peer_origin_realm or "",
                                       self.peer_applications,
                                       self._current.get(AVP_PRODUCT_NAME) if self._current
                                       else None))

    def _act_deliver_request(self, now: float) -> None:
        assert self._current is not None
        self._events.append(RequestReceived(self._current))

    def _act_deliver_answer(self, now: float) -> None:
        msg = self._current
        assert msg is not None
        entry = self._pending.get(msg.hop_by_hop_id)
        if entry is None or entry.message.end_to_end_id != msg.end_to_end_id \
                or entry.message.command_code != msg.command_code:
            # Late (after a timeout or failover) or duplicate: discard (RFC 6733 §6.2).
            self._events.append(MessageRejected(0, "answer matches no pending request",
                                                answered=False))
            return
        del self._pending[msg.hop_by_hop_id]
        self._events.append(AnswerReceived(entry.token, msg))

    def _act_reset_watchdog(self, now: float) -> None:
        t = self._timers
        t.activity_at = now
        if t.watchdog_at is None:
            self._arm_watchdog(now)

    def _act_watchdog_dwa(self, now: float) -> None:
        t = self._timers
        t.dwr_outstanding = False
        t.activity_at = now
        self._arm_watchdog(now)

    def _act_failover_pending(self, now: float) -> None:
        if self.state is PeerState.SUSPECT:
            self._events.append(PeerSuspect())
            self._fail_pending("peer suspect (watchdog)")
        else:
            self._fail_pending("connection closing")

    def _act_recovered(self, now: float) -> None:
        self._events.append(PeerRecovered())

    def _act_start_timeout(self, now: float) -> None:
        wait = (self.disconnect_timeout_s if self.state is PeerState.CLOSING
                else self.capabilities_timeout_s)
        self._start_timeout(now, wait)

    def _act_disconnect(self, now: float) -> None:
        self._fail_pending("disconnected")
        self._disconnect(self.close_reason or "closed")

    _ACTIONS: Final = {
        Act.CONNECT: _act_connect,
        Act.SEND_CER: _act_send_cer,
        Act.SEND_CEA: _act_send_cea,
        Act.SEND_CEA_UNKNOWN_PEER: _act_send_cea_unknown_peer,
        Act.SEND_CEA_NO_COMMON_APP: _act_send_cea_no_common_app,
        Act.SEND_ERROR_ANSWER: _act_send_error_answer,
        Act.SEND_DWR: _act_send_dwr,
        Act.SEND_DWA: _act_send_dwa,
        Act.SEND_DPR: _act_send_dpr,
        Act.SEND_DPA: _act_send_dpa,
        Act.OPENED: _act_opened,
        Act.DELIVER_REQUEST: _act_deliver_request,
        Act.DELIVER_ANSWER: _act_deliver_answer,
        Act.RESET_WATCHDOG: _act_reset_watchdog,
        Act.WATCHDOG_DWA: _act_watchdog_dwa,
        Act.FAILOVER_PENDING: _act_failover_pending,
        Act.RECOVERED: _act_recovered,
        Act.START_TIMEOUT: _act_start_timeout,
        Act.DISCONNECT: _act_disconnect,
    }

    # --- helpers ----------------------------------------------------------------------

    def _hop_by_hop(self) -> int:
        self._next_hbh = (self._next_hbh + 1) & 0xFFFFFFFF
        return self._next_hbh

    def _arm_watchdog(self, now: float) -> None:
        jitter = min(WATCHDOG_JITTER_MAX_S, self.watchdog_s / 4)
        t = self._timers
        t.watchdog_armed_at = now
        t.watchdog_at = now + self.watchdog_s + self._rng.uniform(-jitter, jitter)

    def _start_timeout(self, now: float, wait_s: float) -> None:
        self._timers.timeout_at = now + wait_s

    def _fail_pending(self, reason: str) -> None:
        if self._pending:
            requests = tuple((p.token, p.message) for p in self._pending.values())
            self._pending.clear()
            self._timers.deadlines.clear()
            self._events.append(RequestsFailedOver(requests, reason))

    def _disconnect(self, reason: str) -> None:
        self.state = PeerState.CLOSED
        self.close_reason = reason
        t = self._timers
        t.watchdog_at = t.timeout_at = None
        self._events.append(PeerClosed(reason))

    def _origin_avps(self) -> list[Avp]:
        return [avp(AVP_ORIGIN_HOST, self.local.origin_host),
                avp(AVP_ORIGIN_REALM, self.local.origin_realm)]

    def _capabilities_avps(self) -> list[Avp]:
        local = self.local
        avps = [
            *self._origin_avps(),
            avp(AVP_HOST_IP_ADDRESS, ipaddress.ip_address(local.host_ip)),
            avp(AVP_VENDOR_ID, local.vendor_id),
            avp(AVP_PRODUCT_NAME, local.product_name),
            avp(AVP_ORIGIN_STATE_ID, local.origin_state_id),
            avp(AVP_SUPPORTED_VENDOR_ID, VENDOR_3GPP),
        ]
        avps += [avp(AVP_AUTH_APPLICATION_ID, app) for app in local.auth_application_ids]
        if local.firmware_revision is not None:
            avps.append(avp(AVP_FIRMWARE_REVISION, local.firmware_revision))
        return avps


def _applications_of(msg: Message) -> frozenset[int]:
    """Auth/Acct-Application-Ids, top level and inside Vendor-Specific-Application-Id."""
    apps: set[int] = set()
    for a in msg.avps:
        if a.code in (AVP_AUTH_APPLICATION_ID, AVP_ACCT_APPLICATION_ID) and a.vendor_id == 0:
            if isinstance(a.value, int):
                apps.add(a.value)
        elif a.code == AVP_VENDOR_SPECIFIC_APPLICATION_ID and isinstance(a.value, tuple):
            for child in a.value:
                if child.code in (AVP_AUTH_APPLICATION_ID, AVP_ACCT_APPLICATION_ID) \
                        and isinstance(child.value, int):
                    apps.add(child.value)
    return frozenset(apps)


# --- helpers the adapter uses across connections ----------------------------------------

# Answers kept for duplicate detection (RFC 6733 §5.5.4: a T-flagged request whose
# Origin-Host and End-to-End id we answered recently gets the same answer).
DUPLICATE_CACHE_MAX: Final = 65536
DUPLICATE_CACHE_TTL_S: Final = 120.0


class DuplicateCache:
    """Recent answers by (Origin-Host, End-to-End id), bounded in size and age."""

    def __init__(self, max_entries: int = DUPLICATE_CACHE_MAX,
                 ttl_s: float = DUPLICATE_CACHE_TTL_S) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: OrderedDict[tuple[str, int], tuple[float, Any]] = OrderedDict()

    def get(self, origin_host: str, end_to_end_id: int, now: float) -> Any:
        entry = self._entries.get((origin_host, end_to_end_id))
        if entry is None or now - entry[0] > self.ttl_s:
            return None
        return entry[1]

    def put(self, origin_host: str, end_to_end_id: int, value: Any, now: float) -> None:
        key = (origin_host, end_to_end_id)
        entries = self._entries
        if key in entries:
            entries.move_to_end(key)
        entries[key] = (now, value)
        # Oldest first: drop what is too old or beyond the bound.
        while entries:
            first_key, (stamp, _) = next(iter(entries.items()))
            if len(entries) > self.max_entries or now - stamp > self.ttl_s:
                del entries[first_key]
            else:
                break

    def __len__(self) -> int:
        return len(self._entries)


class EndToEndIds:
    """RFC 6733 §3: high 12 bits from the clock at start, low 20 bits counting from a
    random start, so ids stay unique across restarts for a while."""

    def __init__(self, now_unix_s: float, rng: random.Random | None = None) -> None:
        self._high = (int(now_unix_s) & 0xFFF) << 20
        self._low = (rng or random.Random()).getrandbits(20)

    def next(self) -> int:
        self._low = (self._low + 1) & 0xFFFFF
        return self._high | self._low
