"""asyncio adapter: Diameter peers over TCP (or TLS), as server and as client.

This file owns sockets, the clock, tasks and routing across connections; the
protocol itself is ``peer.PeerConnection`` (one per transport connection) and
``codec``. Both the node and the bundled IN simulator run a ``DiameterNode``.

Client side: ``add_peer_group`` names a set of peers that serve one IN node (one
realm). Each peer gets a link task that dials, exchanges CER/CEA, and redials with
jittered exponential backoff when the connection ends. ``request`` sends on an
OPEN peer of the group. Retry rules (RFC 6733 §5.5.4, docs/protocols.md):

* the End-to-End id is assigned once and kept for every re-send; each send gets a
  fresh Hop-by-Hop id from the connection;
* no answer in time, or the connection lost (or suspect) with the request pending:
  the outcome is unknown; re-send with the T flag on another OPEN peer of the
  same group not tried yet, at most ``failover_max`` times, then raise
  ``RequestTimeout`` (outcome still unknown: the caller's resolver finishes it);
* no OPEN peer at all before the first send: ``NoPeerAvailable`` (nothing was
  sent, safe to retry later);
* a request is never sent to another group.

With ``election=True`` a peer given with its Origin-Host is one RFC 6733 peer
(``peer.PeerLink``): the connection it dials to us serves its group just as the
one we dial, only one of the two is kept, and when both sides dial at once the
§5.6.4 election decides which. A link whose peer is served by the peer's own
connection does not dial until that connection ends.

Server side: CER/DWR/DPR are answered by the peer state machine; malformed
requests are answered with the RFC's result code without calling the handler;
application requests run the handler concurrently (bounded per connection), and
answers are written as they complete, coalesced into one write per loop turn. A
T-flagged request whose (Origin-Host, End-to-End id) was answered recently gets
the cached answer; one still being processed gets the same answer when ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from extrabalance.clock import SYSTEM_CLOCK
from extrabalance.diameter import codec
from extrabalance.diameter.codec import DiameterError, Message
from extrabalance.diameter.constants import (
    AVP_ORIGIN_HOST,
    AVP_RESULT_CODE,
    DIAMETER_TOO_BUSY,
    DIAMETER_UNABLE_TO_COMPLY,
)
from extrabalance.diameter.peer import (
    APPLICATION_RELAY,
    CAPABILITIES_TIMEOUT_S,
    CEA_UNKNOWN_PEER,
    CER_UNKNOWN_PEER,
    PENDING_MAX_DEFAULT,
    UNEXPECTED_ORIGIN_HOST,
    AcceptResponder,
    AnswerReceived,
    CapabilitiesReceived,
    DropConnection,
    DuplicateCache,
    EndToEndIds,
    LateAnswer,
    LinkState,
    LocalIdentity,
    MessageRejected,
    NotOpen,
    PeerClosed,
    PeerConnection,
    PeerLink,
    PeerOpened,
    PeerRecovered,
    PeerState,
    PeerSuspect,
    PendingTableFull,
    RejectResponder,
    RequestReceived,
    RequestsFailedOver,
    RequestTimedOut,
    Role,
)

__all__ = [
    "DiameterNode",
    "LocalIdentity",
    "NoPeerAvailable",
    "PeerAddress",
    "RequestHandler",
    "RequestTimeout",
]

log = logging.getLogger(__name__)

# Re-sends of one request after its first send (each on a peer not tried yet).
FAILOVER_MAX: Final = 2
# Application requests one inbound connection may have in the handler at once;
# beyond it we answer 3004 DIAMETER_TOO_BUSY (the client re-sends later).
INBOUND_CONCURRENT_MAX: Final = 2048
# Redial backoff: from RECONNECT_MIN_S doubling to RECONNECT_MAX_S, jittered ±25 %.
RECONNECT_MIN_S: Final = 1.0
RECONNECT_MAX_S: Final = 30.0
CONNECT_TIMEOUT_S: Final = 5.0
# How long close() waits for DPA before closing the transports anyway.
CLOSE_TIMEOUT_S: Final = 2.0
# Connections peers dialled to us, at once: in all and from one address. An IN has a
# handful of peers; a client over either bound is closed at once (before its CER).
INBOUND_CONNECTIONS_MAX: Final = 256
INBOUND_PER_CLIENT_MAX: Final = 16

# Returns the answer at once, or an awaitable of it (run in a task of its own).
RequestHandler = Callable[[Message, str], Message | Awaitable[Message]]
_new_message = tuple.__new__  # cheaper than Message._replace on the per-request path


@dataclass(frozen=True, slots=True)
class PeerAddress:
    host: str
    port: int
    origin_host: str | None = None  # expected Origin-Host in its CEA; None accepts any allowed


LATE_ANSWER: Final = "late_answer"
# What an operator should check, by kind of peer warning.
WARNING_HINTS: Final[dict[str, str]] = {
    CEA_UNKNOWN_PEER: "the peer does not know this node: check that it has our Origin-Host"
                      " and Origin-Realm (and the address we dial from) configured as a peer",
    UNEXPECTED_ORIGIN_HOST: "the peer at this address is not the one configured: check the"
                            " configured address and Origin-Host of the peer, and the peer's"
                            " own Origin-Host setting",
    CER_UNKNOWN_PEER: "a peer that is not configured dialled us: add its Origin-Host to the"
                      " configured peers if it should be one, or find who runs it",
    LATE_ANSWER: "the peer answered after the request had timed out (its outcome was left to"
                 " the re-send or the resolver): check the peer's load and the network, or"
                 " raise the request timeout (diameter.request_timeout_ms)",
}


class PeerWarnings:
    """Identity problems and late answers of a peer, logged at warning once per streak.

    A streak of one kind for one peer ends when that peer does right again: it opens
    (identity problems), or it answers ``STREAK_END_ANSWERS`` requests in a row in time
    and from the expected Origin-Host (so a peer that is late every other answer is
    one streak, not a line per answer). The next problem after that is logged again.
    Every occurrence is counted (``counts``, exported as a metric)."""

    STREAK_END_ANSWERS: Final = 100
    # (peer, kind) pairs counted apart; an unknown peer names itself in its CER, so
    # beyond this its warnings are counted (and logged) under OTHER_PEERS.
    KEYS_MAX: Final = 256
    OTHER_PEERS: Final = "(other peers)"

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self._streaks: dict[tuple[str, str], list[int]] = {}  # [occurrences, good since]

    @property
    def active(self) -> bool:
        return bool(self._streaks)

    def warn(self, peer: str, kind: str, detail: str) -> None:
        key = (peer, kind)
        if key not in self.counts and len(self.counts) >= self.KEYS_MAX:
            key = (self.OTHER_PEERS, kind)
        self.counts[key] = self.counts.get(key, 0) + 1
        streak = self._streaks.get(key)
        if streak is not None:
            streak[0] += 1
            streak[1] = 0
            return
        self._streaks[key] = [1, 0]
        log.warning("diameter peer %s: %s: %s; %s", peer, kind, detail, WARNING_HINTS[kind],
                    extra={"peer": key[0], "kind": kind})

    def good(self, peer: str, *kinds: str, at_once: bool = False) -> None:
        """The peer did right for these kinds: a step towards the end of their streaks."""
        for kind in kinds:
            streak = self._streaks.get((peer, kind))
            if streak is None:
                continue
            streak[1] += 1
            if at_once or streak[1] >= self.STREAK_END_ANSWERS:
                del self._streaks[(peer, kind)]
                log.info("diameter peer %s: %s over after %d occurrences", peer, kind,
                         streak[0], extra={"peer": peer, "kind": kind})


class NoPeerAvailable(Exception):
    """No OPEN peer in the group: the request was not sent."""


class RequestTimeout(Exception):
    """Sent, but no answer after every permitted re-send: the outcome is unknown."""


class _AttemptFailed(Exception):
    """One send ended without an answer (timeout, connection lost, peer suspect)."""


@dataclass(eq=False)
class _Link:
    """A configured peer: its address, group, and the connection that serves it.

    With an expected Origin-Host the link runs RFC 6733's per-peer machine
    (``machine``): its connection is the one we dialled or the one the peer
    dialled, whichever the election kept. Without one (accept any allowed peer)
    the link only knows the connection it dialled (``dialled``).
    """

    group: str
    address: PeerAddress
    machine: PeerLink | None = None
    dialled: _Connection | None = None
    task: asyncio.Task[None] | None = None
    last_error: str | None = None
    opened_at: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def conn(self) -> _Connection | None:
        """The connection serving this peer (open or on its way), if any."""
        machine = self.machine
        if machine is None:
            return self.dialled
        conn: _Connection | None = machine.conn or machine.initiator or machine.responder
        return conn


@dataclass(eq=False)
class _Group:
    name: str
    realm: str
    links: list[_Link] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    next_index: int = 0


def certificate_hosts(cert: dict[str, Any]) -> frozenset[str]:
    """The DNS names a verified peer certificate (`SSLObject.getpeercert()`) carries:
    its subjectAltName DNS entries, or its subject CN when it has none. Lower case."""
    names = [str(v) for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
    if not names:
        names = [str(v) for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    return frozenset(n.lower() for n in names)


def _is_closed(machine: PeerLink) -> bool:
    # A function, not an inline test: the state changes while we await.
    return machine.state is LinkState.CLOSED


def _link_for_responder(links: list[_Link]) -> _Link:
    """Which of the links to one Origin-Host a connection the peer dialled is for:
    one that is dialling (an election), else one that is served (the newcomer is
    refused, or replaces a dead connection), else an idle one (accepted)."""
    for states in ((LinkState.WAIT_CONN_ACK, LinkState.WAIT_I_CEA),
                   (LinkState.I_OPEN, LinkState.R_OPEN, LinkState.WAIT_RETURNS,
                    LinkState.WAIT_CONN_ACK_ELECT),
                   (LinkState.CLOSED,)):
        for link in links:
            if link.machine is not None and link.machine.state in states:
                return link
    return links[0]


class _Connection(asyncio.Protocol):
    """One transport connection driving one PeerConnection."""

    def __init__(self, node: DiameterNode, role: Role, link: _Link | None) -> None:
        self.node = node
        self.link = link
        self.loop = node._loop
        self.peer = PeerConnection(
            node.identity, role,
            allowed_peers=node.allowed_peers,
            expected_origin_host=link.address.origin_host if link else None,
            watchdog_s=node.watchdog_s,
            capabilities_timeout_s=node.capabilities_timeout_s,
            pending_max=node.pending_max,
            rng=node._rng,
            # Whether a CER is answered depends on the other connections to the same
            # peer (RFC 6733 §5.6.4): the node decides, see _responder_cer.
            hold_cer=role is Role.RESPONDER and node.election,
        )
        self.transport: asyncio.Transport | None = None
        self.closed = self.loop.create_future()
        self.opened = self.loop.create_future()
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._inbound = 0
        self.remote: str = "?"
        self.client: str | None = None  # the address counted against the inbound bounds

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they quack like one.
        self.transport = transport  # type: ignore[assignment]
        peername = transport.get_extra_info("peername")
        self.remote = f"{peername[0]}:{peername[1]}" if peername else "?"
        if self.peer.role is Role.RESPONDER and not self.node._admit(self, peername):
            transport.close()
            return
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.context.verify_mode != ssl.CERT_NONE:
            # A verified certificate: the peer's Origin-Host must be one of its names.
            self.peer.certificate_hosts = certificate_hosts(ssl_object.getpeercert() or {})
        self.node._connections.add(self)
        link = self.link
        if link is not None:
            if link.machine is None:
                link.dialled = self
            else:
                link.machine.initiator_connected(self)
                self.node._run_link_commands(link)
        if self.peer.role is Role.INITIATOR:
            self.peer.start(self.loop.time())
        self.peer.connection_made(self.loop.time())
        self._after_input()

    def data_received(self, data: bytes) -> None:
        self.peer.data_received(data, self.loop.time())
        self._after_input()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer.role is Role.RESPONDER:
            if self.client is None:  # refused by _admit: never started
                return
            self.node._release(self)
        log.info("diameter connection %s ended: %s", self.remote,
                 self.peer.close_reason or exc or "closed by peer")
        if self.peer.identity_problem is not None:
            kind, detail = self.peer.identity_problem
            self.node.warnings.warn(self.peer_name, kind, f"{detail} ({self.remote})")
        self.peer.connection_lost(self.loop.time())
        self._process_events()
        if self._timer is not None:
            self._timer.cancel()
        self.node._connections.discard(self)
        self.node._connection_ended(self)
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(self.peer.close_reason or "closed"))
            self.opened.exception()  # mark retrieved: the link logs it
        if not self.closed.done():
            self.closed.set_result(None)

    @property
    def peer_name(self) -> str:
        """The peer as the operator configured it (its Origin-Host, else its address),
        or as it named itself when it dialled us unconfigured."""
        link = self.link
        if link is not None:
            return link.address.origin_host or f"{link.address.host}:{link.address.port}"
        return self.peer.peer_origin_host or self.remote

    def _answer_origin(self, message: Message) -> None:
        """An answer from another Origin-Host than the peer's is worth a warning unless
        the peer is a relay (answers then come from the servers behind it)."""
        origin = message.get(AVP_ORIGIN_HOST)
        expected = self.peer.peer_origin_host
        warnings = self.node.warnings
        if origin == expected or expected is None \
                or APPLICATION_RELAY in self.peer.peer_applications:
            if warnings.active:
                warnings.good(self.peer_name, LATE_ANSWER, UNEXPECTED_ORIGIN_HOST)
            return
        warnings.warn(self.peer_name, UNEXPECTED_ORIGIN_HOST,
                      f"answer from {origin!r} on the connection to {expected!r} "
                      f"({self.remote})")

    # --- plumbing -----------------------------------------------------------------------

    def _after_input(self) -> None:
        self._process_events()
        peer = self.peer
        if peer.has_data_to_send or peer.state is PeerState.CLOSED:
            self._schedule_flush()
        self._reschedule_timer()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self.peer.data_to_send()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if data:
            transport.write(data)
        if self.peer.state is PeerState.CLOSED:
            transport.close()

    def _reschedule_timer(self) -> None:
        at = self.peer.next_timer()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = None if at is None else self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self.peer.handle_timer(self.loop.time())
        self._after_input()

    def _process_events(self) -> None:
        for ev in self.peer.events():
            kind = type(ev)
            if kind is AnswerReceived:
                fut = ev.token  # type: ignore[union-attr]
                if not fut.done():
                    fut.set_result(ev.message)  # type: ignore[union-attr]
                self._answer_origin(ev.message)  # type: ignore[union-attr]
            elif kind is LateAnswer:
                msg = ev.message  # type: ignore[union-attr]
                self.node.warnings.warn(
                    self.peer_name, LATE_ANSWER,
                    f"answer (End-to-End id {msg.end_to_end_id:#010x}, result "
                    f"{msg.get(AVP_RESULT_CODE)}) matches no pending request ({self.remote})")
            elif kind is RequestReceived:
                self._request_received(ev.message)  # type: ignore[union-attr]
            elif kind is RequestTimedOut:
                self._fail(ev.token, "no answer in time")  # type: ignore[union-attr]
            elif kind is RequestsFailedOver:
                for token, _msg in ev.requests:  # type: ignore[union-attr]
                    self._fail(token, ev.reason)  # type: ignore[union-attr]
            elif kind is PeerOpened:
                log.info("diameter peer open", extra={"peer": ev.origin_host,  # type: ignore[union-attr]
                                                      "remote": self.remote})
                if not self.opened.done():
                    self.opened.set_result(None)
                if self.node.warnings.active:
                    self.node.warnings.good(self.peer_name, CEA_UNKNOWN_PEER,
                                            UNEXPECTED_ORIGIN_HOST, at_once=True)
                link = self.link
                if link is not None and link.machine is not None \
                        and self.peer.role is Role.INITIATOR:
                    link.machine.initiator_opened(self, self.peer.peer_origin_state_id)
                    self.node._run_link_commands(link)
                self.node._peer_changed(self)
            elif kind is CapabilitiesReceived:
                self.node._responder_cer(self, ev)  # type: ignore[arg-type]
            elif kind is PeerSuspect or kind is PeerRecovered:
                log.warning("diameter peer %s: %s", self.peer.peer_origin_host, kind.__name__)
                self.node._peer_changed(self)
            elif kind is PeerClosed:
                log.info("diameter peer closed: %s", ev.reason)  # type: ignore[union-attr]
                self._schedule_flush()  # flush what is queued, then close the transport
                self.node._peer_changed(self)
            elif kind is MessageRejected:
                log.warning("diameter message rejected from %s: %s %s", self.remote,
                            ev.result_code, ev.text)  # type: ignore[union-attr]

    @staticmethod
    def _fail(token: Any, reason: str) -> None:
        if not token.done():
            token.set_exception(_AttemptFailed(reason))

    # --- server side ------------------------------------------------------------------

    def _request_received(self, msg: Message) -> None:
        node = self.node
        origin = msg.get(AVP_ORIGIN_HOST, "")
        key_e2e = msg.end_to_end_id
        now = self.loop.time()
        if msg.flags & codec.FLAG_RETRANSMIT:
            cached = node._answers.get(origin, key_e2e, now)
            # A first copy whose handler ended without an answer is no answer to wait for.
            if cached is not None and not (isinstance(cached, asyncio.Future)
                                           and cached.cancelled()):
                self._answer_duplicate(msg, cached)
                return
        if self._inbound >= INBOUND_CONCURRENT_MAX:
            self.peer.send_answer(codec.error_answer(
                DiameterError(DIAMETER_TOO_BUSY, "too many requests in progress", partial=msg),
                node.identity.origin_host, node.identity.origin_realm))
            return
        self._inbound += 1
        # A handler that can answer at once returns the answer itself: it is sent in
        # this turn and costs no task and no future. One that has to wait returns an
        # awaitable (a coroutine), which gets a task of its own.
        try:
            answer: Any = node.request_handler(msg, self.peer.peer_origin_host or origin)
        except Exception as exc:  # noqa: BLE001 - turned into the RFC's error answer
            answer = self._handler_failed(msg, exc)
        if hasattr(answer, "__await__"):
            fut: asyncio.Future[Message] = self.loop.create_future()
            node._answers.put(origin, key_e2e, fut, now)
            task = self.loop.create_task(self._run_handler(msg, origin, fut, answer))
            node._tasks.add(task)
            task.add_done_callback(node._tasks.discard)
            return
        self._inbound -= 1
        self._send_handler_answer(msg, origin, answer)

    async def _run_handler(self, msg: Message, origin: str, fut: asyncio.Future[Message],
                           pending: Awaitable[Message]) -> None:
        try:
            answer: Any = await pending
        except asyncio.CancelledError:
            fut.cancel()  # no answer: a re-send of this request is handled afresh
            raise
        except Exception as exc:  # noqa: BLE001 - turned into the RFC's error answer
            answer = self._handler_failed(msg, exc)
        finally:
            self._inbound -= 1
        fut.set_result(self._send_handler_answer(msg, origin, answer))

    def _handler_failed(self, msg: Message, exc: Exception) -> Message:
        identity = self.node.identity
        if isinstance(exc, DiameterError):
            return codec.error_answer(exc, identity.origin_host, identity.origin_realm, msg)
        # the handler's bug must not take the connection down
        log.error("diameter request handler failed", exc_info=exc)
        return codec.error_answer(
            DiameterError(DIAMETER_UNABLE_TO_COMPLY, type(exc).__name__, partial=msg),
            identity.origin_host, identity.origin_realm, msg)

    def _send_handler_answer(self, msg: Message, origin: str, handed: Any) -> Message:
        """Send the handler's answer on the request's ids and keep it for a T-flagged
        copy of the request; returns what was sent."""
        node = self.node
        answer: Message = handed
        if not isinstance(handed, Message):
            log.error("diameter request handler returned %r, not a Message", type(handed))
            answer = codec.error_answer(
                DiameterError(DIAMETER_UNABLE_TO_COMPLY, "no answer", partial=msg),
                node.identity.origin_host, node.identity.origin_realm, msg)
        # The answer travels back on the ids of the request, whatever the handler set.
        if answer.hop_by_hop_id != msg.hop_by_hop_id or answer.end_to_end_id != msg.end_to_end_id:
            answer = answer._replace(hop_by_hop_id=msg.hop_by_hop_id,
                                     end_to_end_id=msg.end_to_end_id)
        node._answers.put(origin, msg.end_to_end_id, answer, self.loop.time())
        self.peer.send_answer(answer)
        self._schedule_flush()
        return answer

    def _answer_duplicate(self, msg: Message, cached: Any) -> None:
        def send(answer: Message) -> None:
            self.peer.send_answer(answer._replace(hop_by_hop_id=msg.hop_by_hop_id))
            self._schedule_flush()

        if isinstance(cached, Message):
            send(cached)
        else:  # the first copy is still in the handler
            cached.add_done_callback(lambda f: send(f.result()) if not f.cancelled() else None)


class DiameterNode:
    """A Diameter node: listens for peers, dials peer groups, routes requests."""

    def __init__(
        self,
        identity: LocalIdentity,
        *,
        allowed_peers: set[str] | frozenset[str] | None,
        request_handler: RequestHandler,
        ssl_context: ssl.SSLContext | None = None,
        client_ssl_context: ssl.SSLContext | None = None,
        watchdog_s: float = 30.0,
        request_timeout_ms: int = 2000,
        pending_max: int = PENDING_MAX_DEFAULT,
        failover_max: int = FAILOVER_MAX,
        reconnect_min_s: float = RECONNECT_MIN_S,
        reconnect_max_s: float = RECONNECT_MAX_S,
        duplicate_cache: DuplicateCache | None = None,
        election: bool = False,
        rng: random.Random | None = None,
        capabilities_timeout_s: float = CAPABILITIES_TIMEOUT_S,
        inbound_connections_max: int = INBOUND_CONNECTIONS_MAX,
        inbound_per_client_max: int = INBOUND_PER_CLIENT_MAX,
    ) -> None:
        self.identity = identity
        # One timer for a connection that has not said who it is, plain or TLS: the
        # TLS handshake and then the CER must each come within it (RFC 6733 §5.6: CER
        # is the first message; the bound keeps a silent socket from holding a slot).
        self.capabilities_timeout_s = capabilities_timeout_s
        self.inbound_connections_max = inbound_connections_max
        self.inbound_per_client_max = inbound_per_client_max
        self._inbound_by_client: dict[str, int] = {}
        self._inbound_total = 0
        self.allowed_peers = None if allowed_peers is None else frozenset(allowed_peers)
        self.request_handler = request_handler
        self.ssl_context = ssl_context  # for the listener (server side)
        # For the connections we dial; a server-side context cannot dial, so the caller
        # gives a client context (the same one only if it was made for both).
        self.client_ssl_context = client_ssl_context if client_ssl_context else ssl_context
        self.watchdog_s = watchdog_s
        self.request_timeout_ms = request_timeout_ms
        self.pending_max = pending_max
        self.failover_max = failover_max
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self._rng = rng or random.Random()
        self._loop = asyncio.get_running_loop()
        self._servers: list[asyncio.base_events.Server] = []
        self._groups: dict[str, _Group] = {}
        # Origin-Host (lower case) -> the links that expect it, for the election.
        self._links_by_host: dict[str, list[_Link]] = {}
        self._connections: set[_Connection] = set()
        self.warnings = PeerWarnings()
        self._tasks: set[asyncio.Task[Any]] = set()
        # `is None`, not `or`: an empty cache is falsy, and a caller's own (such as a
        # cache that remembers nothing) must be kept.
        self._answers = duplicate_cache if duplicate_cache is not None else DuplicateCache()
        # RFC 6733 §5.6: one connection per configured peer (given with its
        # Origin-Host), whichever side dialled it, and the §5.6.4 election when both
        # dial at once. Off: every connection stands alone, as the node and the IN
        # simulator used them before (each dials the other, one connection each way).
        self.election = election
        self._e2e = EndToEndIds(SYSTEM_CLOCK.time(), self._rng)
        self._closing = False

    # --- server -----------------------------------------------------------------------

    async def listen(self, host: str, port: int) -> int:
        """Accept peers on host:port (0 picks a free port); returns the bound port."""
        server = await self._loop.create_server(
            lambda: _Connection(self, Role.RESPONDER, None), host, port, ssl=self.ssl_context,
            ssl_handshake_timeout=self.capabilities_timeout_s if self.ssl_context else None)
        self._servers.append(server)
        bound: int = server.sockets[0].getsockname()[1]
        return bound

    def _admit(self, conn: _Connection, peername: Any) -> bool:
        """Count a connection a peer dialled against the inbound bounds; False: refuse."""
        client = str(peername[0]) if isinstance(peername, tuple) else str(peername)
        count = self._inbound_by_client.get(client, 0)
        if count >= self.inbound_per_client_max or (
                self._inbound_total >= self.inbound_connections_max):
            log.warning("diameter connection from %s refused: %d from it, %d in all "
                        "(bounds %d, %d)", client, count, self._inbound_total,
                        self.inbound_per_client_max, self.inbound_connections_max)
            return False
        conn.client = client
        self._inbound_by_client[client] = count + 1
        self._inbound_total += 1
        return True

    def _release(self, conn: _Connection) -> None:
        client = conn.client
        assert client is not None
        left = self._inbound_by_client[client] - 1
        if left:
            self._inbound_by_client[client] = left
        else:
            del self._inbound_by_client[client]
        self._inbound_total -= 1

    # --- client -----------------------------------------------------------------------

    def add_peer_group(self, name: str, realm: str, peers: list[PeerAddress]) -> None:
        """Dial every peer of the group and keep them connected (CER, DWR, redial).

        A peer given with its Origin-Host may also reach us by dialling: that
        connection serves the group as well, and when both sides dial at once
        the RFC 6733 election keeps one of the two (see peer.PeerLink).
        """
        if name in self._groups:
            raise ValueError(f"peer group {name!r} exists")
        group = _Group(name, realm)
        self._groups[name] = group
        for address in peers:
            link = _Link(name, address)
            if address.origin_host and self.election:
                link.machine = PeerLink(self.identity.origin_host, address.origin_host)
                self._links_by_host.setdefault(address.origin_host.lower(), []).append(link)
            group.links.append(link)
            link.task = self._loop.create_task(self._keep_linked(link))

    async def _keep_linked(self, link: _Link) -> None:
        backoff_s = self.reconnect_min_s
        machine = link.machine
        while not self._closing:
            if machine is not None and machine.state is not LinkState.CLOSED:
                # The peer's own connection serves it (or an election is under way):
                # dial again only once that is over, after the usual short pause.
                link.changed.clear()
                await link.changed.wait()
                if _is_closed(machine) and not self._closing:
                    await asyncio.sleep(self.reconnect_min_s * self._rng.uniform(0.75, 1.25))
                continue
            if machine is not None:
                machine.start()
            conn: _Connection | None = None
            try:
                _, opened = await asyncio.wait_for(self._loop.create_connection(
                    lambda: _Connection(self, Role.INITIATOR, link),
                    link.address.host, link.address.port, ssl=self.client_ssl_context,
                    server_hostname=(link.address.origin_host or link.address.host)
                    if self.client_ssl_context else None), CONNECT_TIMEOUT_S)
                conn = opened
                await conn.opened
                link.opened_at = SYSTEM_CLOCK.time()
                link.last_error = None
                backoff_s = self.reconnect_min_s
                await conn.closed
                link.last_error = conn.peer.close_reason
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - refused, TLS, CEA refused: redial later
                link.last_error = f"{type(exc).__name__}: {exc}"
                if conn is None and machine is not None:
                    machine.initiator_failed()
                    self._run_link_commands(link)
                if conn is not None and conn.transport is not None:
                    conn.transport.close()
            if self._closing:
                return
            if machine is None:
                if link.dialled is conn:
                    link.dialled = None
            elif machine.state is not LinkState.CLOSED:
                # The connection the peer dialled took over (election, or ours
                # failed meanwhile): nothing failed that calls for a backoff.
                link.last_error = None
                backoff_s = self.reconnect_min_s
                self._peer_changed(None)
                continue
            self._peer_changed(None)
            delay = backoff_s * self._rng.uniform(0.75, 1.25)
            backoff_s = min(backoff_s * 2, self.reconnect_max_s)
            await asyncio.sleep(delay)

    # --- the per-peer machines (RFC 6733 §5.6) ---------------------------------------

    def _responder_cer(self, conn: _Connection, ev: CapabilitiesReceived) -> None:
        """A peer dialled us and sent a valid CER: accept it, or let its link decide."""
        links = self._links_by_host.get(ev.origin_host.lower())
        if not links:
            # A peer we do not dial (the IN's clients, tests): nothing to elect.
            conn.peer.accept(self._loop.time())
            conn._after_input()
            return
        link = _link_for_responder(links)
        assert link.machine is not None
        conn.link = link
        link.machine.responder_cer(conn, ev.origin_host, ev.origin_state_id)
        self._run_link_commands(link)

    def _connection_ended(self, conn: _Connection) -> None:
        link = conn.link
        if link is None or link.machine is None:
            return
        if conn.peer.role is Role.INITIATOR:
            link.machine.initiator_closed(conn)
        else:
            link.machine.responder_closed(conn)
        self._run_link_commands(link)

    def _run_link_commands(self, link: _Link) -> None:
        assert link.machine is not None
        now = self._loop.time()
        for command in link.machine.commands():
            conn: _Connection = command.conn
            if isinstance(command, AcceptResponder):
                conn.link = link
                conn.peer.accept(now)
                log.info("diameter peer %s: using the connection it dialled (%s)",
                         link.address.origin_host, link.machine.state.value)
            elif isinstance(command, RejectResponder) or conn.peer.state is PeerState.WAIT_ACCEPT:
                assert isinstance(command, (RejectResponder, DropConnection))
                log.info("diameter peer %s: refusing its connection: %s %s",
                         link.address.origin_host, command.result_code, command.text)
                conn.peer.reject(now, command.result_code, command.text)
            else:
                # Ours, dropped after the election (or a dead one the peer replaced):
                # closing the transport fails its pending requests over.
                log.info("diameter peer %s: closing %s connection: %s",
                         link.address.origin_host, conn.peer.role.value, command.text)
                conn.peer.close_reason = command.text
                if conn.transport is not None and not conn.transport.is_closing():
                    conn.transport.close()
            conn._after_input()
        link.changed.set()
        self._peer_changed(None)

    def _peer_changed(self, conn: _Connection | None) -> None:
        for group in self._groups.values():
            if any(link.conn is not None and link.conn.peer.is_open for link in group.links):
                group.ready.set()
            else:
                group.ready.clear()

    async def wait_ready(self, group: str, timeout_s: float) -> None:
        """Until at least one peer of ``group`` is OPEN (TimeoutError otherwise)."""
        await asyncio.wait_for(self._groups[group].ready.wait(), timeout_s)

    def _pick(self, group: _Group, exclude: set[int]) -> _Connection | None:
        links = group.links
        n = len(links)
        best: _Connection | None = None
        for i in range(n):
            link = links[(group.next_index + i) % n]
            conn = link.conn
            if conn is None or id(link) in exclude or not conn.peer.is_open:
                continue
            if conn.peer.pending_count >= conn.peer.pending_max:
                continue
            best = conn
            group.next_index = (group.next_index + i + 1) % n
            break
        return best

    def new_end_to_end_id(self) -> int:
        """An End-to-End id for a request the caller will re-send (RFC 6733 §3: the
        same id on every re-send): store it with the operation and set it on the message."""
        return self._e2e.next()

    async def request(self, group: str, msg: Message, *, timeout_ms: int | None = None) -> Message:
        """Send an application request to a peer of ``group`` and return its answer.

        See the module docstring for the retry rules. Raises NoPeerAvailable
        (nothing sent) or RequestTimeout (outcome unknown).
        """
        grp = self._groups.get(group)
        if grp is None:
            raise KeyError(f"no peer group {group!r}")
        timeout_s = (self.request_timeout_ms if timeout_ms is None else timeout_ms) / 1000.0
        # One copy with the End-to-End id (kept for every re-send) and the R bit.
        msg = _new_message(Message, (msg[0], msg[1] | codec.FLAG_REQUEST, msg[2], msg[3],
                                     msg[4] or self._e2e.next(), msg[5], msg[6]))
        tried: set[int] = set()
        last_reason = "no answer"
        sends = 0
        while sends <= self.failover_max:
            conn = self._pick(grp, tried)
            if conn is None:
                if sends == 0:
                    raise NoPeerAvailable(f"no open peer in group {group!r}")
                raise RequestTimeout(f"{last_reason}; no alternate open peer in {group!r}")
            assert conn.link is not None
            tried.add(id(conn.link))
            # Only a request that may have reached a peer is a potential duplicate.
            outgoing = msg.with_flags(codec.FLAG_RETRANSMIT) if sends else msg
            fut: asyncio.Future[Message] = self._loop.create_future()
            try:
                conn.peer.send_request(outgoing, fut, self._loop.time(), timeout_s)
            except (PendingTableFull, NotOpen):
                continue  # not sent: try the next peer, no T flag owed
            sends += 1
            conn._schedule_flush()
            conn._reschedule_timer()
            try:
                return await fut
            except _AttemptFailed as exc:
                last_reason = str(exc)
            except asyncio.CancelledError:
                # The caller gave up: forget it so a late answer is discarded.
                for hbh, pending in list(conn.peer._pending.items()):
                    if pending.token is fut:
                        conn.peer.cancel_request(hbh)
                raise
        raise RequestTimeout(f"{last_reason} after {sends} sends")

    # --- admin ------------------------------------------------------------------------

    def peer_warnings(self) -> dict[tuple[str, str], int]:
        """(peer, kind) -> occurrences since start: CEA 3010, unexpected Origin-Host,
        CER from an unknown peer, late answers (exported as eb_diameter_peer_warnings)."""
        return dict(self.warnings.counts)

    def peer_states(self) -> list[dict[str, Any]]:
        """One row per known peer connection or configured peer, for the admin page."""
        rows: list[dict[str, Any]] = []
        for group in self._groups.values():
            for link in group.links:
                peer = link.conn.peer if link.conn else None
                rows.append({
                    "group": group.name,
                    "realm": group.realm,
                    # Which side dialled the connection that serves this peer.
                    "direction": "in" if link.conn is not None
                    and link.conn.peer.role is Role.RESPONDER else "out",
                    "address": f"{link.address.host}:{link.address.port}",
                    "origin_host": (peer.peer_origin_host if peer else None)
                    or link.address.origin_host,
                    "state": peer.state.value if peer else PeerState.CLOSED.value,
                    "pending": peer.pending_count if peer else 0,
                    "last_error": link.last_error,
                })
        for conn in self._connections:
            if conn.link is None:
                rows.append({
                    "group": None,
                    "realm": conn.peer.peer_origin_realm,
                    "direction": "in",
                    "address": conn.remote,
                    "origin_host": conn.peer.peer_origin_host,
                    "state": conn.peer.state.value,
                    "pending": conn._inbound,
                    "last_error": None,
                })
        return rows

    # --- shutdown ---------------------------------------------------------------------

    async def close(self) -> None:
        """DPR to every open peer, wait (bounded) for DPA, then close everything."""
        self._closing = True
        for server in self._servers:
            server.close()
        conns = list(self._connections)
        now = self._loop.time()
        for conn in conns:
            conn.peer.close(now)
            conn._after_input()
        if conns:
            await asyncio.wait([c.closed for c in conns], timeout=CLOSE_TIMEOUT_S)
        for conn in conns:
            if conn.transport is not None and not conn.transport.is_closing():
                conn.transport.close()
        for group in self._groups.values():
            for link in group.links:
                if link.task is not None:
                    link.task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await link.task
        for task in list(self._tasks):
            task.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), CLOSE_TIMEOUT_S)
