"""asyncio glue around one `Session`: moves bytes, fires ticks, maps events to futures.

Shared by the ESME client (client.py) and the SMSC server (server.py). It owns no
protocol rule: everything SMPP lives in session.py; this file only decides when to
read, when to write and how a response wakes up the coroutine that sent the request.

Per-PDU cost is what limits an SMPP link in Python, so the hot path is kept lean:
* writes are coalesced: whatever the session has to send is handed to the transport
  once per event-loop turn (one send() for every submit, response and resp produced
  in that turn), not once per PDU;
* the window is a counter plus a FIFO of futures that only exists while callers
  actually wait (no lock, no Condition);
* an inbound request's handler may answer at once (return the response PDU), and
  then costs no task; only a handler that has to wait (returns an awaitable) gets
  a task of its own;
* one ticker per connection drives every timeout (the session keeps deadlines; there
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

__all__ = ["READ_CHUNK_OCTETS", "TICK_INTERVAL_S", "RequestFailedError", "SmppConnection"]

log = logging.getLogger(__name__)

READ_CHUNK_OCTETS = 65_536
TICK_INTERVAL_S = 0.25
# Above this many octets waiting in the transport we await drain() before more.
WRITE_BUFFER_HIGH_OCTETS = 1 << 20

# Returns the response at once, or an awaitable of it (run in a task of its own).
RequestHandler = Callable[[Pdu], Pdu | Awaitable[Pdu]]


class RequestFailedError(Exception):
    """A request got no usable response: timeout, connection closed, undecodable."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason if status is None else f"{reason} ({status_name(status)})")
        self.reason = reason
        self.status = status


class SmppConnection:
    """One TCP connection driven by one Session.

    `request(pdu)` honours the window: at most `session.window_max` requests are
    unanswered, further callers wait in FIFO order for a slot, so the session's own
    queue is never needed. Inbound requests go to `on_request` (bounded by the
    session's inbound_pending_max); whatever it raises becomes ESME_RX_T_APPN, the
    bind stays.
    """

    def __init__(
        self,
        session: Session,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_request: RequestHandler,
        *,
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
        tick_interval_s: float = TICK_INTERVAL_S,
        stats: dict[str, int] | None = None,
    ) -> None:
        self.session = session
        self.name = name
        self._reader = reader
        self._writer = writer
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
        self.bound = asyncio.Event()
        self.bind_done = asyncio.Event()  # bound, refused or closed
        self.closed = asyncio.Event()
        self.bound_event: Bound | None = None
        self.bind_refused_status: int | None = None
        self.close_reason = ""

    # -- sending ---------------------------------------------------------------------

    def flush(self) -> None:
        """Send what the session has produced, at the end of this loop turn: every
        PDU written in one turn leaves in one transport write."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_pending = False
        data = self.session.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)

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
            if self._writer.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH_OCTETS:
                with contextlib.suppress(ConnectionError):
                    await self._writer.drain()
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

    # -- the loops -------------------------------------------------------------------

    async def run(self) -> None:
        """Read until the session ends or the peer goes away."""
        ticker = asyncio.create_task(self._ticker())
        try:
            while self.session.state is not State.CLOSED:
                try:
                    data = await self._reader.read(READ_CHUNK_OCTETS)
                except (ConnectionError, OSError) as exc:
                    self.close_reason = f"read failed: {exc}"
                    data = b""
                if not data:
                    self.close_reason = self.close_reason or "peer closed"
                    self._handle(self.session.connection_lost())
                    break
                self._handle(self.session.receive_data(data, self._clock()))
                self.flush()
        finally:
            ticker.cancel()
            await self._shutdown()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self._tick_interval_s)
            self._handle(self.session.tick(self._clock()))
            if self.session.state is State.CLOSED:
                self.flush_now()
                self._writer.close()
                return
            self.flush()

    async def _shutdown(self) -> None:
        self.flush_now()
        with contextlib.suppress(Exception):
            self._writer.close()
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
        self.closed.set()
        self.bind_done.set()

    def close(self) -> None:
        """Drop the transport now (run() then finishes)."""
        self.close_reason = self.close_reason or "closed locally"
        with contextlib.suppress(Exception):
            self._writer.close()

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
