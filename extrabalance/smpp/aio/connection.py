"""asyncio glue around one `Session`: moves bytes, fires ticks, maps events to futures.

Shared by the ESME client (client.py) and the SMSC server (server.py). It owns no
protocol rule: everything SMPP lives in session.py; this file only decides when to
read, when to write and how a response wakes up the coroutine that sent the request.

Per-PDU cost is what limits an SMPP link in Python, so the hot path is kept lean:
* the connection is the transport's protocol: each chunk read is fed to the session
  from `data_received` (no reader task, no future per read);
* writes are coalesced: whatever the session has to send is handed to the transport
  once per event-loop turn (one send() for every submit, response and resp produced
  in that turn), not once per PDU;
* the window is a counter plus a FIFO of futures that only exists while callers
  actually wait (no lock, no Condition);
* an inbound request's handler may answer at once (return the response PDU), and
  then costs no task; only a handler that has to wait (returns an awaitable) gets
  a task of its own;
* one timer per connection drives every timeout (the session keeps deadlines; there
  is no timer per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from extrabalance.smpp.pdu import RESPONSE_CLASS, Pdu, Status, make_response, status_name
from extrabalance.smpp.session import (
    BindRefused,
    Bound,
    LateResponse,
    LinkDead,
    ProtocolViolation,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
    Session,
    SessionError,
    SessionEvent,
    State,
    Unbound,
)
from extrabalance.window import FifoWindow

__all__ = ["TICK_INTERVAL_S", "RequestFailedError", "SmppConnection"]

log = logging.getLogger(__name__)

TICK_INTERVAL_S = 0.25
# Above this many octets waiting in the transport, request() waits for it to drain.
WRITE_BUFFER_HIGH_OCTETS = 1 << 20

# Returns the response at once, or an awaitable of it (run in a task of its own).
RequestHandler = Callable[[Pdu], Pdu | Awaitable[Pdu]]


class RequestFailedError(Exception):
    """A request got no usable response: timeout, connection closed, undecodable."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason if status is None else f"{reason} ({status_name(status)})")
        self.reason = reason
        self.status = status


class SmppConnection(asyncio.Protocol):
    """One TCP connection driven by one Session, as the transport's protocol.

    The transport hands every chunk it reads to `data_received`, which feeds the
    session directly: no reader task, no future per read. `request(pdu)` honours the
    window: at most `session.window_max` requests are unanswered, further callers
    wait in FIFO order for a slot, so the session's own queue is never needed.
    Inbound requests go to `on_request` (bounded by the session's
    inbound_pending_max); whatever it raises becomes ESME_RX_T_APPN, the bind stays.
    """

    def __init__(
        self,
        session: Session,
        on_request: RequestHandler,
        *,
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
        tick_interval_s: float = TICK_INTERVAL_S,
        stats: dict[str, int] | None = None,
    ) -> None:
        self.session = session
        self.name = name
        self._transport: asyncio.Transport | None = None
        self._on_request = on_request
        self._clock = clock
        self._tick_interval_s = tick_interval_s
        self._loop = asyncio.get_running_loop()
        self._futures: dict[int, asyncio.Future[Pdu]] = {}
        # Requests whose caller was told "timeout" but which the peer may still answer:
        # each keeps its window slot until its response or the connection's end.
        self._late: set[int] = set()
        self._taken_over: set[int] = set()  # of those, the ones request() must not release
        # counted across connections when the owner passes its own dict
        self.stats = stats if stats is not None else {}
        self.stats.setdefault("timeouts", 0)
        self.stats.setdefault("late_responses", 0)
        # The window of unanswered requests (FIFO: a newcomer cannot overtake a waiter).
        self.slots = FifoWindow(session.window_max)
        self._flush_pending = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        # Callers waiting for the transport's buffer to drain (it asked to pause).
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._finished = False
        self.bound = asyncio.Event()
        self.bind_done = asyncio.Event()  # bound, refused or closed
        self.closed = asyncio.Event()
        self.bound_event: Bound | None = None
        self.bind_refused_status: int | None = None
        self.close_reason = ""

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they quack like one.
        self._transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH_OCTETS)  # type: ignore[attr-defined]
        self._timer = self._loop.call_later(self._tick_interval_s, self._on_tick)
        self.flush()  # whatever the session queued before the connection was up

    def data_received(self, data: bytes) -> None:
        session = self.session
        self._handle(session.receive_data(data, self._clock()))
        if session.state is State.CLOSED:
            self._finish()
        elif session.has_data_to_send:  # a response answered at once, an enquire_link_resp
            self.flush()

    def eof_received(self) -> bool:
        return False  # the peer closed its side: close ours (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self._finished:
            self.close_reason = f"read failed: {exc}"
        self.close_reason = self.close_reason or "peer closed"
        self._finish()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain_waiters()

    def _wake_drain_waiters(self) -> None:
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # -- sending ---------------------------------------------------------------------

    def flush(self) -> None:
        """Send what the session has produced, at the end of this loop turn: every
        PDU written in one turn leaves in one transport write."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_pending = False
        transport = self._transport
        if transport is None:  # not connected yet: connection_made flushes
            return
        data = self.session.data_to_send()
        if data and not transport.is_closing():
            transport.write(data)

    async def request(self, pdu: Pdu) -> Pdu:
        """Send a request and wait for its response (which may carry an error status)."""
        await self.slots.acquire()
        seq: int | None = None
        try:
            if self.closed.is_set():
                raise RequestFailedError("closed")
            try:
                seq = self.session.send_request(pdu, self._clock())
            except SessionError as exc:
                raise RequestFailedError(f"not sendable: {exc}") from exc
            fut: asyncio.Future[Pdu] = self._loop.create_future()
            self._futures[seq] = fut
            self.flush()
            if self._write_paused:  # over WRITE_BUFFER_HIGH_OCTETS waiting to leave
                waiter: asyncio.Future[None] = self._loop.create_future()
                self._drain_waiters.append(waiter)
                await waiter
            return await fut
        finally:
            if seq is not None and seq in self._taken_over:
                # Timed out: the slot goes back with the late response or the close.
                self._taken_over.discard(seq)
            else:
                if seq is not None:  # a caller gone before any answer: no late bookkeeping
                    self._futures.pop(seq, None)
                self.slots.release()

    @property
    def window_free(self) -> int:
        return self.session.window_max - len(self._futures) - len(self._late)

    # -- the connection's life ----------------------------------------------------------

    async def run(self) -> None:
        """Until the session ends or the peer goes away (the transport drives it)."""
        await self.closed.wait()

    def _on_tick(self) -> None:
        # One timer per connection drives every timeout (the session keeps deadlines).
        self._timer = None
        if self._finished:
            return
        self._handle(self.session.tick(self._clock()))
        if self.session.state is State.CLOSED:
            self._finish()
            return
        if self.session.has_data_to_send:
            self.flush()
        self._timer = self._loop.call_later(self._tick_interval_s, self._on_tick)

    def _finish(self) -> None:
        """The session ended or the transport is gone: send what is left, close, fail
        what waits. Runs once."""
        if self._finished:
            return
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush_now()
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.close()
        if self.session.state is not State.CLOSED:
            self._handle(self.session.connection_lost())
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(RequestFailedError("closed"))
        self._futures.clear()
        for _ in range(len(self._late)):
            self.slots.release()  # waiters then find the connection closed
        self._late.clear()
        for task in list(self._tasks):
            task.cancel()
        self._wake_drain_waiters()
        self.closed.set()
        self.bind_done.set()

    def close(self) -> None:
        """Drop the transport now (connection_lost then finishes the connection)."""
        self.close_reason = self.close_reason or "closed locally"
        if self._transport is None:
            self._finish()
            return
        with contextlib.suppress(Exception):
            self._transport.close()

    async def unbind(self, timeout_s: float) -> None:
        """Polite end: unbind, wait for unbind_resp (bounded), then close."""
        if self.session.bound:
            with contextlib.suppress(SessionError):
                self.session.unbind(self._clock())
                self.flush()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.closed.wait(), timeout_s)
        self.close()

    # -- events ----------------------------------------------------------------------

    def _handle(self, events: list[SessionEvent]) -> None:
        for ev in events:
            if isinstance(ev, ResponseReceived):
                fut = self._futures.pop(ev.sequence_number, None)
                if fut is not None and not fut.done():
                    fut.set_result(ev.response)
            elif isinstance(ev, LateResponse):
                self.stats["late_responses"] += 1
                if ev.sequence_number in self._late:
                    self._late.discard(ev.sequence_number)
                    self.slots.release()
            elif isinstance(ev, RequestFailed):
                seq = ev.sequence_number
                fut = self._futures.pop(seq, None)
                if fut is None:
                    continue
                if ev.reason == "timeout":
                    self.stats["timeouts"] += 1
                    self._late.add(seq)
                    self._taken_over.add(seq)
                if not fut.done():
                    fut.set_exception(RequestFailedError(ev.reason, ev.status))
            elif isinstance(ev, RequestReceived):
                if ev.pdu.command_id not in RESPONSE_CLASS:
                    # outbind / alert_notification take no response; nothing to do
                    log.info("smpp %s: %s received", self.name, type(ev.pdu).__name__)
                    continue
                self._start_answer(ev.pdu)
            elif isinstance(ev, Bound):
                self.bound_event = ev
                self.bound.set()
                self.bind_done.set()
            elif isinstance(ev, BindRefused):
                if ev.detail:  # not a refusal: the SMSC's answer was at fault
                    self.close_reason = ev.detail
                else:
                    self.bind_refused_status = ev.status
                self.bind_done.set()
            elif isinstance(ev, Unbound):
                self.close_reason = self.close_reason or (
                    "unbound by peer" if ev.by_peer else "unbound")
            elif isinstance(ev, LinkDead):
                self.close_reason = ev.reason
                log.warning("smpp %s: %s, closing", self.name, ev.reason)
            elif isinstance(ev, ProtocolViolation):
                log.warning("smpp %s: %s", self.name, ev.detail)

    def _start_answer(self, pdu: Pdu) -> None:
        # A handler that can answer at once returns the response itself: it is sent
        # in this turn and costs no task. One that has to wait returns an awaitable,
        # which gets a task of its own (never run by hand outside a task: code such
        # as asyncio.timeout() needs to know which task it runs in).
        try:
            answer = self._on_request(pdu)
        except Exception:  # the application's bug costs one resp, not the bind
            log.exception("smpp %s: handler failed for %s", self.name, type(pdu).__name__)
            answer = make_response(pdu, Status.ESME_RX_T_APPN)
        if not hasattr(answer, "__await__"):
            self._respond(pdu, answer)
            return
        task = self._loop.create_task(self._answer(pdu, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, pdu: Pdu, answer: Awaitable[Pdu]) -> None:
        try:
            resp = await answer
        except asyncio.CancelledError:
            raise
        except Exception:  # the application's bug costs one resp, not the bind
            log.exception("smpp %s: handler failed for %s", self.name, type(pdu).__name__)
            resp = make_response(pdu, Status.ESME_RX_T_APPN)
        self._respond(pdu, resp)

    def _respond(self, pdu: Pdu, resp: Pdu) -> None:
        try:
            self.session.send_response(resp)
        except SessionError as exc:
            log.warning("smpp %s: response not sent: %s", self.name, exc)
            return
        except Exception:  # not a PDU at all (the handler's bug): the request is still
            # pending, so it gets ESME_RX_T_APPN and the connection lives on.
            log.exception("smpp %s: handler answered %s with %r", self.name,
                          type(pdu).__name__, resp)
            try:
                self.session.send_response(make_response(pdu, Status.ESME_RX_T_APPN))
            except SessionError as exc:
                log.warning("smpp %s: response not sent: %s", self.name, exc)
                return
        self.flush()
