"""asyncio adapter: Diameter peers over TCP (or TLS), as server and as client.

This file owns sockets, the clock, tasks and routing across connections; the
protocol itself is ``peer.PeerConnection`` (one per transport connection) and
``codec``. Both the node and the bundled IN simulator run a ``DiameterNode``.

Client side: ``add_peer_group`` names a set of peers that serve one IN node (one
realm). Each peer gets a link task that dials, exchanges CER/CEA, and redials with
jittered exponential backoff when the connection ends. ``request`` sends on an
OPEN peer of the group. Retry rules (RFC 6733 §5.5.4, PROTOCOLS.md):

* the End-to-End id is assigned once and kept for every re-send; each send gets a
  fresh Hop-by-Hop id from the connection;
* no answer in time, or the connection lost (or suspect) with the request pending:
  the outcome is unknown; re-send with the T flag on another OPEN peer of the
  same group not tried yet, at most ``failover_max`` times, then raise
  ``RequestTimeout`` (outcome still unknown: the caller's resolver finishes it);
* no OPEN peer at all before the first send: ``NoPeerAvailable`` (nothing was
  sent, safe to retry later);
* a request is never sent to another group.

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
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from . import codec
from .codec import DiameterError, Message
from .constants import AVP_ORIGIN_HOST, DIAMETER_TOO_BUSY, DIAMETER_UNABLE_TO_COMPLY
from .peer import (
    PENDING_MAX_DEFAULT,
    AnswerReceived,
    DuplicateCache,
    EndToEndIds,
    LocalIdentity,
    MessageRejected,
    NotOpen,
    PeerClosed,
    PeerConnection,
    PeerOpened,
    PeerRecovered,
    PeerState,
    PeerSuspect,
    PendingTableFull,
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

RequestHandler = Callable[[Message, str], Awaitable[Message]]


@dataclass(frozen=True, slots=True)
class PeerAddress:
    host: str
    port: int
    origin_host: str | None = None  # expected Origin-Host in its CEA; None accepts any allowed


class NoPeerAvailable(Exception):
    """No OPEN peer in the group: the request was not sent."""


class RequestTimeout(Exception):
    """Sent, but no answer after every permitted re-send: the outcome is unknown."""


class _AttemptFailed(Exception):
    """One send ended without an answer (timeout, connection lost, peer suspect)."""


@dataclass(eq=False)
class _Link:
    """A client-side peer: its address, group and current connection, if any."""

    group: str
    address: PeerAddress
    conn: _Connection | None = None
    task: asyncio.Task[None] | None = None
    last_error: str | None = None
    opened_at: float | None = None


@dataclass(eq=False)
class _Group:
    name: str
    realm: str
    links: list[_Link] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    next_index: int = 0


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
            pending_max=node.pending_max,
            rng=node._rng,
        )
        self.transport: asyncio.Transport | None = None
        self.closed = self.loop.create_future()
        self.opened = self.loop.create_future()
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._inbound = 0
        self.remote: str = "?"

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they quack like one.
        self.transport = transport  # type: ignore[assignment]
        peername = transport.get_extra_info("peername")
        self.remote = f"{peername[0]}:{peername[1]}" if peername else "?"
        self.node._connections.add(self)
        if self.link is not None:
            self.link.conn = self  # before CEA can arrive, so the group sees it open
        if self.peer.role is Role.INITIATOR:
            self.peer.start(self.loop.time())
        self.peer.connection_made(self.loop.time())
        self._after_input()

    def data_received(self, data: bytes) -> None:
        self.peer.data_received(data, self.loop.time())
        self._after_input()

    def connection_lost(self, exc: Exception | None) -> None:
        log.info("diameter connection %s ended: %s", self.remote,
                 self.peer.close_reason or exc or "closed by peer")
        self.peer.connection_lost(self.loop.time())
        self._process_events()
        if self._timer is not None:
            self._timer.cancel()
        self.node._connections.discard(self)
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(self.peer.close_reason or "closed"))
            self.opened.exception()  # mark retrieved: the link logs it
        if not self.closed.done():
            self.closed.set_result(None)

    # --- plumbing -----------------------------------------------------------------------

    def _after_input(self) -> None:
        self._process_events()
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
                self.node._peer_changed(self)
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
            if cached is not None:
                self._answer_duplicate(msg, cached)
                return
        if self._inbound >= INBOUND_CONCURRENT_MAX:
            self.peer.send_answer(codec.error_answer(
                DiameterError(DIAMETER_TOO_BUSY, "too many requests in progress", partial=msg),
                node.identity.origin_host, node.identity.origin_realm))
            return
        self._inbound += 1
        fut: asyncio.Future[Message] = self.loop.create_future()
        node._answers.put(origin, key_e2e, fut, now)
        task = self.loop.create_task(self._run_handler(msg, origin, fut))
        node._tasks.add(task)
        task.add_done_callback(node._tasks.discard)

    async def _run_handler(self, msg: Message, origin: str, fut: asyncio.Future[Message]) -> None:
        node = self.node
        try:
            answer = await node.request_handler(msg, self.peer.peer_origin_host or origin)
        except DiameterError as err:
            answer = codec.error_answer(err, node.identity.origin_host,
                                        node.identity.origin_realm, msg)
        except Exception as exc:  # the handler's bug must not take the connection down
            log.exception("diameter request handler failed")
            answer = codec.error_answer(
                DiameterError(DIAMETER_UNABLE_TO_COMPLY, type(exc).__name__, partial=msg),
                node.identity.origin_host, node.identity.origin_realm, msg)
        finally:
            self._inbound -= 1
        if not isinstance(answer, Message):
            log.error("diameter request handler returned %r, not a Message", type(answer))
            answer = codec.error_answer(
                DiameterError(DIAMETER_UNABLE_TO_COMPLY, "no answer", partial=msg),
                node.identity.origin_host, node.identity.origin_realm, msg)
        # The answer travels back on the ids of the request, whatever the handler set.
        if answer.hop_by_hop_id != msg.hop_by_hop_id or answer.end_to_end_id != msg.end_to_end_id:
            answer = answer._replace(hop_by_hop_id=msg.hop_by_hop_id,
                                     end_to_end_id=msg.end_to_end_id)
        fut.set_result(answer)
        node._answers.put(origin, msg.end_to_end_id, answer, self.loop.time())
        self.peer.send_answer(answer)
        self._schedule_flush()

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
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
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
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._answers = duplicate_cache or DuplicateCache()
        self._e2e = EndToEndIds(time.time(), self._rng)
        self._closing = False

    # --- server -----------------------------------------------------------------------

    async def listen(self, host: str, port: int) -> int:
        """Accept peers on host:port (0 picks a free port); returns the bound port."""
        server = await self._loop.create_server(
            lambda: _Connection(self, Role.RESPONDER, None), host, port, ssl=self.ssl_context)
        self._servers.append(server)
        bound: int = server.sockets[0].getsockname()[1]
        return bound

    # --- client -----------------------------------------------------------------------

    def add_peer_group(self, name: str, realm: str, peers: list[PeerAddress]) -> None:
        """Dial every peer of the group and keep them connected (CER, DWR, redial)."""
        if name in self._groups:
            raise ValueError(f"peer group {name!r} exists")
        group = _Group(name, realm)
        self._groups[name] = group
        for address in peers:
            link = _Link(name, address)
            group.links.append(link)
            link.task = self._loop.create_task(self._keep_linked(link))

    async def _keep_linked(self, link: _Link) -> None:
        backoff_s = self.reconnect_min_s
        while not self._closing:
            conn: _Connection | None = None
            try:
                _, opened = await asyncio.wait_for(self._loop.create_connection(
                    lambda: _Connection(self, Role.INITIATOR, link),
                    link.address.host, link.address.port, ssl=self.client_ssl_context,
                    server_hostname=(link.address.origin_host or link.address.host)
                    if self.client_ssl_context else None), CONNECT_TIMEOUT_S)
                conn = opened
                await conn.opened
                link.opened_at = time.time()
                link.last_error = None
                backoff_s = self.reconnect_min_s
                await conn.closed
                link.last_error = conn.peer.close_reason
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - refused, TLS, CEA refused: redial later
                link.last_error = f"{type(exc).__name__}: {exc}"
                if conn is not None and conn.transport is not None:
                    conn.transport.close()
            finally:
                if conn is not None and link.conn is conn and conn.closed.done():
                    link.conn = None
            if self._closing:
                return
            link.conn = None
            self._peer_changed(None)
            delay = backoff_s * self._rng.uniform(0.75, 1.25)
            backoff_s = min(backoff_s * 2, self.reconnect_max_s)
            await asyncio.sleep(delay)

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

    async def request(self, group: str, msg: Message, *, timeout_ms: int | None = None) -> Message:
        """Send an application request to a peer of ``group`` and return its answer.

        See the module docstring for the retry rules. Raises NoPeerAvailable
        (nothing sent) or RequestTimeout (outcome unknown).
        """
        grp = self._groups.get(group)
        if grp is None:
            raise KeyError(f"no peer group {group!r}")
        timeout_s = (self.request_timeout_ms if timeout_ms is None else timeout_ms) / 1000.0
        if msg.end_to_end_id == 0:
            msg = msg._replace(end_to_end_id=self._e2e.next())
        msg = msg._replace(flags=msg.flags | codec.FLAG_REQUEST)
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
            outgoing = msg._replace(flags=msg.flags | codec.FLAG_RETRANSMIT) if sends else msg
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

    def peer_states(self) -> list[dict[str, Any]]:
        """One row per known peer connection or configured peer, for the admin page."""
        rows: list[dict[str, Any]] = []
        for group in self._groups.values():
            for link in group.links:
                peer = link.conn.peer if link.conn else None
                rows.append({
                    "group": group.name,
                    "realm": group.realm,
                    "direction": "out",
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
