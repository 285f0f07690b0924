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

Two tables. ``TRANSITIONS`` is the life of one transport connection.
``LINK_TRANSITIONS`` is RFC 6733 §5.6's per-peer machine (``PeerLink``): one
configured peer, reachable through the connection we dial (I-) or the one it
dials (R-), of which at most one may be used. When both sides dial at once, a
responder connection's CER is held (``hold_cer``: state WAIT_ACCEPT) while the
election of §5.6.4 compares Origin-Hosts; the winner closes the connection it
dialled and answers the CER, the loser drops the held one with CEA 4003
DIAMETER_ELECTION_LOST once its own CEA arrives. The watchdog follows RFC 3539: any message received proves the peer
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
    DIAMETER_ELECTION_LOST,
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
# Frames a peer may send after its CER while we decide on it (a peer should send
# nothing before CEA; the bound keeps a flood from being buffered).
HELD_FRAMES_MAX: Final = 64
APPLICATION_RELAY: Final = 0xFFFFFFFF
_new_message = tuple.__new__  # Message._replace is a Python-level copy; this is one call


class Role(enum.Enum):
    INITIATOR = "initiator"  # we opened the transport
    RESPONDER = "responder"  # the peer did


class PeerState(enum.Enum):
    CLOSED = "Closed"
    WAIT_CONN_ACK = "Wait-Conn-Ack"
    WAIT_CER = "Wait-CER"  # responder side of RFC 6733's R-Open path
    WAIT_I_CEA = "Wait-I-CEA"
    # Responder with a valid CER that the per-peer machine has yet to accept or
    # reject (only with ``hold_cer``: the election of RFC 6733 §5.6.4).
    WAIT_ACCEPT = "Wait-Accept"
    OPEN = "Open"  # RFC 6733 I-Open / R-Open; RFC 3539 OKAY
    SUSPECT = "Suspect"  # RFC 3539 SUSPECT: a DWR went unanswered for Tw
    CLOSING = "Closing"

    # Members are singletons compared by identity: hash them so too. Enum's own
    # __hash__ is a Python function, and the table lookup hashes two per message.
    __hash__ = object.__hash__


class Ev(enum.Enum):
    """Inputs, after classification."""

    __hash__ = object.__hash__

    START = enum.auto()  # initiator asked to connect
    CONN_ACK = enum.auto()  # transport up (initiator)
    CONN_NACK = enum.auto()  # transport failed
    RCV_CER_OK = enum.auto()
    RCV_CER_UNKNOWN_PEER = enum.auto()
    RCV_CER_NO_COMMON_APP = enum.auto()
    RCV_CER_INVALID = enum.auto()  # a CER that fails validation
    RCV_CER_HOLD = enum.auto()  # a valid CER, held for the per-peer decision (hold_cer)
    ACCEPT = enum.auto()  # the per-peer machine accepts the held CER
    REJECT = enum.auto()  # ... or refuses it (election lost, already connected)
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
    REPORT_CER = enum.auto()  # report CapabilitiesReceived; the CER waits for a decision
    SEND_CEA_REJECT = enum.auto()  # the refusal's result code (4003, 5012)
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
    (_S.WAIT_CER, _E.RCV_CER_HOLD): (_S.WAIT_ACCEPT, (_A.REPORT_CER,)),
    (_S.WAIT_ACCEPT, _E.ACCEPT): (_S.OPEN, (_A.SEND_CEA, _A.OPENED, _A.RESET_WATCHDOG)),
    (_S.WAIT_ACCEPT, _E.REJECT): (_S.CLOSED, (_A.SEND_CEA_REJECT, _A.DISCONNECT)),
    (_S.WAIT_ACCEPT, _E.TIMEOUT): (_S.CLOSED, (_A.DISCONNECT,)),
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
    if _state in (_S.WAIT_CONN_ACK, _S.WAIT_CER, _S.WAIT_I_CEA, _S.WAIT_ACCEPT):
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
class CapabilitiesReceived:
    """A valid CER on a ``hold_cer`` responder: call ``accept`` or ``reject``."""

    origin_host: str
    origin_realm: str
    origin_state_id: int | None


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


@dataclass(frozen=True, slots=True)
class LateAnswer:
    """An answer that matches no pending request: it came after its request timed out
    or failed over (or twice); discarded (RFC 6733 §6.2)."""

    message: Message


Event = (PeerOpened | CapabilitiesReceived | PeerRecovered | PeerSuspect | PeerClosed | RequestReceived
         | AnswerReceived | RequestTimedOut | RequestsFailedOver | MessageRejected | LateAnswer)

# Kinds of PeerConnection.identity_problem: why capabilities exchange failed on who is who.
CEA_UNKNOWN_PEER: Final = "cea_unknown_peer"  # the peer answered our CER with 3010
UNEXPECTED_ORIGIN_HOST: Final = "unexpected_origin_host"  # CEA (or answer) from another host
CER_UNKNOWN_PEER: Final = "cer_unknown_peer"  # a peer we do not know dialled us: 3010


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
        hold_cer: bool = False,
    ) -> None:
        self.local = local
        # Responder: report a valid CER (CapabilitiesReceived) and wait for accept()
        # or reject() instead of answering it at once; the adapter's per-peer
        # machine (PeerLink) decides, electing when both sides dialled.
        self.hold_cer = hold_cer
        self.role = role
        self.allowed_peers = None if allowed_peers is None else frozenset(allowed_peers)
        self.expected_origin_host = expected_origin_host
        # Over TLS with a verified peer certificate: the DNS names it carries (SAN, or
        # the CN when it has none), lower case. The Origin-Host of the peer's CER/CEA
        # must be one of them (RFC 6733 §13); None: no certificate to hold it to.
        self.certificate_hosts: frozenset[str] | None = None
        self._certificate_refused = False
        self.watchdog_s = watchdog_s
        self.pending_max = pending_max
        self.capabilities_timeout_s = capabilities_timeout_s
        self.disconnect_timeout_s = disconnect_timeout_s
        self._rng = rng or random.Random()
        self.state = PeerState.CLOSED if role is Role.INITIATOR else PeerState.WAIT_CER
        self.peer_origin_host: str | None = None
        self.peer_origin_realm: str | None = None
        self.peer_applications: frozenset[int] = frozenset()
        self.peer_origin_state_id: int | None = None
        self.close_reason: str | None = None
        # (kind, detail) when the exchange failed on who is who; for the adapter's warning.
        self.identity_problem: tuple[str, str] | None = None
        self._reject: tuple[int, str] = (DIAMETER_UNABLE_TO_COMPLY, "")
        self._framer = Framer()
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._pending: dict[int, _Pending] = {}
        self._timers = _Timers()
        self._next_hbh = self._rng.getrandbits(32)
        self._current: Message | None = None  # message being processed
        self._held_cer: Message | None = None  # CER awaiting accept()/reject()
        self._held_frames: list[bytes] = []  # what arrived after it, meanwhile
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

    def accept(self, now: float) -> None:
        """Answer the held CER with success: the connection opens (WAIT_ACCEPT only)."""
        if self.state is PeerState.WAIT_ACCEPT:
            self._current = self._held_cer
            self._fire(Ev.ACCEPT, now)
            self._replay_held(now)

    def reject(self, now: float, result_code: int, text: str) -> None:
        """Answer the held CER with ``result_code`` and close (WAIT_ACCEPT only)."""
        if self.state is PeerState.WAIT_ACCEPT:
            self._reject = (result_code, text)
            self._current = self._held_cer
            self._fire(Ev.REJECT, now)
            self._held_frames.clear()

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
            frames = []
            if self.state is not PeerState.WAIT_ACCEPT:
                self._frame_error(exc, now)
                return
        self._process_frames(frames, now)

    def _process_frames(self, frames: list[bytes], now: float) -> None:
        for i, frame in enumerate(frames):
            if self.state is PeerState.WAIT_ACCEPT:
                # Whatever follows a held CER waits for the decision on it, so that
                # the CER is answered first (RFC order), as without the hold.
                self._held_frames += frames[i:]
                if len(self._held_frames) > HELD_FRAMES_MAX:
                    self._held_frames.clear()
                    self._fire(Ev.PEER_DISCONNECTED, now)
                    self._disconnect("too many messages before CEA")
                return
            self._frame_received(frame, now)
            if self.is_closed:
                return
        if self._framer.error is not None and self.state is not PeerState.WAIT_ACCEPT:
            self._frame_error(self._framer.error, now)

    def _replay_held(self, now: float) -> None:
        frames, self._held_frames = self._held_frames, []
        if not self.is_closed:
            self._process_frames(frames, now)

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
        """The earliest of the watchdog, the state timeout and the first request
        deadline (None: no timer). Read after every input: no list, no min()."""
        t = self._timers
        at = t.watchdog_at
        timeout_at = t.timeout_at
        if timeout_at is not None and (at is None or timeout_at < at):
            at = timeout_at
        if t.deadlines:
            deadline = t.deadlines[0][0]
            if at is None or deadline < at:
                at = deadline
        return at

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
        sent = _new_message(Message, (msg[0], msg[1], msg[2], hbh, msg[4], msg[5], msg[6]))
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

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out)

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
            self.identity_problem = (
                CER_UNKNOWN_PEER, f"CER from {host!r}, not a configured peer; answered 3010")
            return Ev.RCV_CER_UNKNOWN_PEER
        if not self._certificate_names(host):
            # 3010 and disconnect, as for a peer we do not know: this one is not who
            # it says it is (RFC 6733 §13).
            self.close_reason = (f"CER Origin-Host {host!r} is not named by the peer's "
                                 f"TLS certificate")
            self._certificate_refused = True
            return Ev.RCV_CER_UNKNOWN_PEER
        if not self._common_applications(self.peer_applications):
            return Ev.RCV_CER_NO_COMMON_APP
        state_id = msg.get(AVP_ORIGIN_STATE_ID)
        self.peer_origin_state_id = state_id if isinstance(state_id, int) else None
        return Ev.RCV_CER_HOLD if self.hold_cer else Ev.RCV_CER_OK

    def _classify_cea(self, msg: Message) -> Ev:
        result = msg.get(AVP_RESULT_CODE)
        host = msg.get(AVP_ORIGIN_HOST)
        self.peer_origin_host = host if isinstance(host, str) else None
        realm = msg.get(AVP_ORIGIN_REALM)
        self.peer_origin_realm = realm if isinstance(realm, str) else None
        self.peer_applications = _applications_of(msg)
        state_id = msg.get(AVP_ORIGIN_STATE_ID)
        self.peer_origin_state_id = state_id if isinstance(state_id, int) else None
        if result != DIAMETER_SUCCESS:
            self.close_reason = f"CEA result {result}"
            if result == DIAMETER_UNKNOWN_PEER:
                self.identity_problem = (
                    CEA_UNKNOWN_PEER, f"CEA from {host!r}: 3010 DIAMETER_UNKNOWN_PEER (it does not know us)")
            return Ev.RCV_CEA_FAIL
        if self.expected_origin_host is not None and host != self.expected_origin_host:
            self.close_reason = f"CEA from {host!r}, expected {self.expected_origin_host!r}"
            self.identity_problem = (UNEXPECTED_ORIGIN_HOST, self.close_reason)
            return Ev.RCV_CEA_FAIL
        if self.allowed_peers is not None and host not in self.allowed_peers:
            self.close_reason = f"CEA from unknown peer {host!r}"
            self.identity_problem = (UNEXPECTED_ORIGIN_HOST, self.close_reason)
            return Ev.RCV_CEA_FAIL
        if not self._certificate_names(host):
            self.close_reason = (f"CEA Origin-Host {host!r} is not named by the peer's "
                                 f"TLS certificate")
            return Ev.RCV_CEA_FAIL
        if not self._common_applications(self.peer_applications):
            self.close_reason = "no common application in CEA"
            return Ev.RCV_CEA_FAIL
        return Ev.RCV_CEA_OK

    def _certificate_names(self, host: object) -> bool:
        names = self.certificate_hosts
        return names is None or (isinstance(host, str) and host.lower() in names)

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
        if self._certificate_refused:
            self._cea(DIAMETER_UNKNOWN_PEER, "Origin-Host not named by the TLS certificate")
            return
        self._cea(DIAMETER_UNKNOWN_PEER, "Origin-Host not configured")
        self.close_reason = f"unknown peer {self.peer_origin_host!r}"

    def _act_send_cea_no_common_app(self, now: float) -> None:
        self._cea(DIAMETER_NO_COMMON_APPLICATION, "no common application")
        self.close_reason = f"no common application with {self.peer_origin_host!r}"

    def _act_report_cer(self, now: float) -> None:
        self._held_cer = self._current  # answered later, by accept() or reject()
        self._events.append(CapabilitiesReceived(self.peer_origin_host or "",
                                                 self.peer_origin_realm or "",
                                                 self.peer_origin_state_id))

    def _act_send_cea_reject(self, now: float) -> None:
        result_code, text = self._reject
        self._cea(result_code, text)
        self.close_reason = f"CER from {self.peer_origin_host!r} refused: {result_code} {text}"

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
            self._events.append(LateAnswer(msg))
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
        Act.REPORT_CER: _act_report_cer,
        Act.SEND_CEA_REJECT: _act_send_cea_reject,
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


# --- the per-peer machine: one connection per peer, and the election -------------------
#
# RFC 6733 §5.6 keeps one state machine per peer over up to two transport
# connections: the one we dial (initiator, I-) and the one the peer dials
# (responder, R-). Only one may carry traffic (I-Open or R-Open). When both exist
# at once the election (§5.6.4) keeps the responder connection of the side whose
# Origin-Host is higher, i.e. the connection the lower side dialled; both sides
# reach the same verdict. PeerLink is that machine, sans-IO: the adapter reports
# what happens to the connections (opaque tokens), and drains ``commands()``.


class LinkState(enum.Enum):
    CLOSED = "Closed"
    WAIT_CONN_ACK = "Wait-Conn-Ack"
    WAIT_I_CEA = "Wait-I-CEA"
    WAIT_CONN_ACK_ELECT = "Wait-Conn-Ack/Elect"
    WAIT_RETURNS = "Wait-Returns"
    I_OPEN = "I-Open"
    R_OPEN = "R-Open"


class LinkEv(enum.Enum):
    START = enum.auto()  # we dial
    I_RCV_CONN_ACK = enum.auto()  # our transport is up (the connection sends CER)
    I_RCV_CONN_NACK = enum.auto()  # our transport could not be opened
    I_RCV_CEA = enum.auto()  # our connection opened (successful CEA)
    I_PEER_DISC = enum.auto()  # our connection ended (CEA refused, timeout, closed)
    R_CONN_CER = enum.auto()  # the peer dialled us; its valid CER is held
    R_CONN_CER_RESTARTED = enum.auto()  # ... with a new Origin-State-Id: it restarted
    R_PEER_DISC = enum.auto()  # the peer's connection ended
    WIN_ELECTION = enum.auto()  # our Origin-Host is the higher one


class LinkAct(enum.Enum):
    R_ACCEPT = enum.auto()  # adopt the new responder connection (its CER still held)
    R_SND_CEA = enum.auto()  # answer the responder's CER with success: it opens
    R_REJECT = enum.auto()  # refuse the new responder connection (5012) and close it
    R_DISC = enum.auto()  # drop our responder connection (a held CER gets 4003)
    I_DISC = enum.auto()  # close the connection we dialled
    ELECT = enum.auto()  # compare Origin-Hosts; WIN_ELECTION if ours is higher


_LS, _LE, _LA = LinkState, LinkEv, LinkAct
# (state, event) -> (next state, actions): RFC 6733 §5.6's table for one peer.
LINK_TRANSITIONS: Final[dict[tuple[LinkState, LinkEv], tuple[LinkState, tuple[LinkAct, ...]]]] = {
    (_LS.CLOSED, _LE.START): (_LS.WAIT_CONN_ACK, ()),
    (_LS.CLOSED, _LE.R_CONN_CER): (_LS.R_OPEN, (_LA.R_ACCEPT, _LA.R_SND_CEA)),
    (_LS.WAIT_CONN_ACK, _LE.I_RCV_CONN_ACK): (_LS.WAIT_I_CEA, ()),
    (_LS.WAIT_CONN_ACK, _LE.I_RCV_CONN_NACK): (_LS.CLOSED, ()),
    (_LS.WAIT_CONN_ACK, _LE.R_CONN_CER): (_LS.WAIT_CONN_ACK_ELECT, (_LA.R_ACCEPT,)),
    (_LS.WAIT_I_CEA, _LE.I_RCV_CEA): (_LS.I_OPEN, ()),
    (_LS.WAIT_I_CEA, _LE.R_CONN_CER): (_LS.WAIT_RETURNS, (_LA.R_ACCEPT, _LA.ELECT)),
    (_LS.WAIT_I_CEA, _LE.I_PEER_DISC): (_LS.CLOSED, ()),
    (_LS.WAIT_CONN_ACK_ELECT, _LE.I_RCV_CONN_ACK): (_LS.WAIT_RETURNS, (_LA.ELECT,)),
    (_LS.WAIT_CONN_ACK_ELECT, _LE.I_RCV_CONN_NACK): (_LS.R_OPEN, (_LA.R_SND_CEA,)),
    (_LS.WAIT_CONN_ACK_ELECT, _LE.R_PEER_DISC): (_LS.WAIT_CONN_ACK, ()),
    (_LS.WAIT_CONN_ACK_ELECT, _LE.R_CONN_CER): (_LS.WAIT_CONN_ACK_ELECT, (_LA.R_REJECT,)),
    (_LS.WAIT_RETURNS, _LE.WIN_ELECTION): (_LS.R_OPEN, (_LA.I_DISC, _LA.R_SND_CEA)),
    (_LS.WAIT_RETURNS, _LE.I_PEER_DISC): (_LS.R_OPEN, (_LA.R_SND_CEA,)),
    (_LS.WAIT_RETURNS, _LE.I_RCV_CEA): (_LS.I_OPEN, (_LA.R_DISC,)),
    (_LS.WAIT_RETURNS, _LE.R_PEER_DISC): (_LS.WAIT_I_CEA, ()),
    (_LS.WAIT_RETURNS, _LE.R_CONN_CER): (_LS.WAIT_RETURNS, (_LA.R_REJECT,)),
    (_LS.I_OPEN, _LE.R_CONN_CER): (_LS.I_OPEN, (_LA.R_REJECT,)),
    (_LS.I_OPEN, _LE.I_PEER_DISC): (_LS.CLOSED, ()),
    (_LS.R_OPEN, _LE.R_CONN_CER): (_LS.R_OPEN, (_LA.R_REJECT,)),
    (_LS.R_OPEN, _LE.R_PEER_DISC): (_LS.CLOSED, ()),
    # Not in the RFC's table: a CER with a new Origin-State-Id (RFC 6733 §8.16) means
    # the peer restarted and our open connection is a dead one we have not noticed
    # yet (the watchdog would take up to 3 Tw). Take the new one rather than refuse
    # the peer until then.
    (_LS.I_OPEN, _LE.R_CONN_CER_RESTARTED): (_LS.R_OPEN, (_LA.I_DISC, _LA.R_ACCEPT,
                                                           _LA.R_SND_CEA)),
    (_LS.R_OPEN, _LE.R_CONN_CER_RESTARTED): (_LS.R_OPEN, (_LA.R_DISC, _LA.R_ACCEPT,
                                                           _LA.R_SND_CEA)),
}


@dataclass(frozen=True, slots=True)
class AcceptResponder:
    """Answer this connection's held CER with success (it becomes the peer's)."""

    conn: Any


@dataclass(frozen=True, slots=True)
class RejectResponder:
    """Answer this connection's held CER with ``result_code`` and close it."""

    conn: Any
    result_code: int
    text: str


@dataclass(frozen=True, slots=True)
class DropConnection:
    """Close this connection: a held CER gets ``result_code``; an open one just closes."""

    conn: Any
    result_code: int
    text: str


LinkCommand = AcceptResponder | RejectResponder | DropConnection


def origin_host_wins(local: str, peer: str) -> bool:
    """RFC 6733 §5.6.4: the local Origin-Host wins when it succeeds the peer's,
    compared as octets with ASCII letters folded (DNS is case-insensitive)."""
    return local.lower().encode() > peer.lower().encode()


class PeerLink:
    """RFC 6733 §5.6 for one configured peer (see LINK_TRANSITIONS), sans-IO.

    Inputs are reports about connections, identified by opaque tokens; a report
    about a connection that is not (or no longer) this peer's is ignored. Outputs
    are ``commands()`` for the adapter and ``conn``, the connection carrying
    traffic when open.
    """

    def __init__(self, local_origin_host: str, peer_origin_host: str) -> None:
        self.local_origin_host = local_origin_host
        self.peer_origin_host = peer_origin_host
        self.state = LinkState.CLOSED
        self.initiator: Any = None
        self.responder: Any = None
        self.open_origin_state_id: int | None = None  # of the peer, on the open connection
        self._responder_state_id: int | None = None
        self._responder_host = peer_origin_host
        self._commands: list[LinkCommand] = []
        self._arg: Any = None  # the connection the current event is about
        self._arg_state_id: int | None = None
        self._arg_host = peer_origin_host
        self.unexpected = 0  # (state, event) pairs outside the table, for tests and logs

    @property
    def conn(self) -> Any:
        """The connection carrying traffic: ours when I-Open, the peer's when R-Open."""
        if self.state is LinkState.I_OPEN:
            return self.initiator
        if self.state is LinkState.R_OPEN:
            return self.responder
        return None

    def commands(self) -> list[LinkCommand]:
        commands, self._commands = self._commands, []
        return commands

    # --- inputs ---------------------------------------------------------------------

    def start(self) -> bool:
        """We are about to dial; False (and nothing changes) unless Closed."""
        if self.state is not LinkState.CLOSED:
            return False
        self._fire(LinkEv.START)
        return True

    def initiator_connected(self, conn: Any) -> None:
        if self.initiator is None and self.state in (LinkState.WAIT_CONN_ACK,
                                                     LinkState.WAIT_CONN_ACK_ELECT):
            self.initiator = conn
            self._fire(LinkEv.I_RCV_CONN_ACK)
        else:  # a dial that completed after we stopped waiting for it
            self._commands.append(DropConnection(conn, DIAMETER_UNABLE_TO_COMPLY, "superseded"))

    def initiator_failed(self) -> None:
        if self.initiator is None and self.state in (LinkState.WAIT_CONN_ACK,
                                                     LinkState.WAIT_CONN_ACK_ELECT):
            self._fire(LinkEv.I_RCV_CONN_NACK)

    def initiator_opened(self, conn: Any, origin_state_id: int | None) -> None:
        if conn is self.initiator and conn is not None:
            self._arg_state_id = origin_state_id
            self._fire(LinkEv.I_RCV_CEA)
            if self.state is LinkState.I_OPEN:
                self.open_origin_state_id = origin_state_id

    def initiator_closed(self, conn: Any) -> None:
        if conn is self.initiator and conn is not None:
            self.initiator = None
            self._fire(LinkEv.I_PEER_DISC)

    def responder_cer(self, conn: Any, origin_host: str, origin_state_id: int | None) -> None:
        """A valid CER from this peer arrived on a connection it dialled (held)."""
        ev = LinkEv.R_CONN_CER
        if self.state in (LinkState.I_OPEN, LinkState.R_OPEN) \
                and origin_state_id is not None and self.open_origin_state_id is not None \
                and origin_state_id != self.open_origin_state_id:
            ev = LinkEv.R_CONN_CER_RESTARTED
        self._arg, self._arg_host, self._arg_state_id = conn, origin_host, origin_state_id
        self._fire(ev)

    def responder_closed(self, conn: Any) -> None:
        if conn is self.responder and conn is not None:
            self.responder = None
            self._fire(LinkEv.R_PEER_DISC)

    # --- the engine -------------------------------------------------------------------

    def _fire(self, ev: LinkEv) -> None:
        transition = LINK_TRANSITIONS.get((self.state, ev))
        if transition is None:
            # Only the adapter reports events, so this is a sequence we did not
            # foresee: leave the state alone and drop a connection we were handed.
            self.unexpected += 1
            if ev in (LinkEv.R_CONN_CER, LinkEv.R_CONN_CER_RESTARTED):
                self._commands.append(RejectResponder(self._arg, DIAMETER_UNABLE_TO_COMPLY,
                                                      f"peer link {self.state.value}"))
            return
        self.state, actions = transition
        won = False
        for action in actions:
            if action is LinkAct.R_ACCEPT:
                self.responder = self._arg
                self._responder_state_id = self._arg_state_id
                self._responder_host = self._arg_host
            elif action is LinkAct.R_SND_CEA:
                self.open_origin_state_id = self._responder_state_id
                self._commands.append(AcceptResponder(self.responder))
            elif action is LinkAct.R_REJECT:
                self._commands.append(RejectResponder(
                    self._arg, DIAMETER_UNABLE_TO_COMPLY,
                    "a connection with this peer is already in use"))
            elif action is LinkAct.R_DISC:
                if self.responder is not None:
                    self._commands.append(DropConnection(
                        self.responder, DIAMETER_ELECTION_LOST,
                        "replaced: the peer restarted" if ev is LinkEv.R_CONN_CER_RESTARTED
                        else "election lost"))
                self.responder = None
            elif action is LinkAct.I_DISC:
                if self.initiator is not None:
                    self._commands.append(DropConnection(
                        self.initiator, DIAMETER_ELECTION_LOST,
                        "replaced: the peer restarted" if ev is LinkEv.R_CONN_CER_RESTARTED
                        else "election won: the peer's connection is kept"))
                self.initiator = None
            elif action is LinkAct.ELECT:
                won = origin_host_wins(self.local_origin_host, self._responder_host)
        if won:
            self._fire(LinkEv.WIN_ELECTION)


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
