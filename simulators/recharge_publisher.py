"""The prepaid IN's side of recharge notifications: an at-least-once MQTT publisher.

What this file owns: publishing recharge events the way a careful IN does, QoS 1 on
``<topic_prefix>/<in_node>``, and not considering an event sent until the broker has
answered PUBACK. On a lost connection, a refused publish or a PUBACK that does not come
within ``ack_timeout_s`` it reconnects (jittered backoff) and sends the event again, so
the broker may receive an event twice; the node absorbs that by ``event_id``. Every
wait is bounded: ``publish()`` gives up with :class:`PublishDeadlineExceeded` once
``publish_deadline_s`` has passed.

Pipelined: any number of ``publish()`` calls may run at once; up to ``window_max`` of
them have their PUBLISH on the wire awaiting its PUBACK, the others wait for a slot in
arrival order. This file is the asyncio adapter of the sans-IO session in
``simulators/mqtt_publish_session.py``: one connection at a time, the PUBLISHes written
in one loop turn sent with one ``write()``, and one watchdog timer per connection
(not one per publish) that drops a connection whose oldest PUBACK is overdue or whose
broker stopped answering PINGREQ. Dropping a connection fails every attempt waiting on
it, and each retries on the next connection.

A simulator: it shares the payload format (``extrabalance.recharge.events``) with the
node and nothing else.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable
from functools import partial
from types import TracebackType
from typing import Self, cast

from extrabalance.recharge.events import RechargeEvent, to_payload
from extrabalance.window import FifoWindow
from simulators.mqtt_publish_session import (
    Acked,
    Connected,
    ProtocolViolation,
    PublisherSession,
    State,
    encode_string,
)

__all__ = ["PublishDeadlineExceeded", "RechargePublisher"]

WATCHDOG_PERIOD_MAX_S = 0.25  # how often a connection checks its oldest PUBACK at most


class PublishDeadlineExceeded(TimeoutError):
    """The broker did not acknowledge an event within ``publish_deadline_s``."""


class RechargePublisher:
    """Publishes recharge events with QoS 1 until the broker acknowledges each one.

    Use as ``async with RechargePublisher(...) as publisher:`` or call :meth:`close`.
    Connecting is lazy: the first publish connects.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        topic_prefix: str = "extrabalance/recharge",
        *,
        ack_timeout_s: float = 3.0,
        publish_deadline_s: float = 30.0,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
        window_max: int = 100,
        keepalive_s: int = 30,
    ) -> None:
        if window_max < 1:
            raise ValueError("window_max must be >= 1")
        if ack_timeout_s <= 0 or publish_deadline_s <= 0:
            raise ValueError("ack_timeout_s and publish_deadline_s must be > 0")
        self.host = host
        self.port = port
        self.client_id = client_id
        self.topic_prefix = topic_prefix.rstrip("/")
        self.ack_timeout_s = ack_timeout_s
        self.publish_deadline_s = publish_deadline_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.window_max = window_max  # PUBLISHes awaiting their PUBACK at once
        self.keepalive_s = keepalive_s
        self._window = FifoWindow(window_max)
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._topics: dict[str, bytes] = {}  # in_node -> encoded topic name
        self.counts = {"published": 0, "retries": 0, "connects": 0}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """DISCONNECT; publishes still waiting for a PUBACK fail over to a new connection."""
        connecting = self._connecting
        if connecting is not None:  # bounded by ack_timeout_s; then close what it opened
            await asyncio.gather(asyncio.shield(connecting), return_exceptions=True)
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    def topic_for(self, in_node: str) -> str:
        return f"{self.topic_prefix}/{in_node}"

    async def publish(self, event: RechargeEvent) -> None:
        """Send one event and return once the broker has acknowledged it (PUBACK).

        Raises :class:`PublishDeadlineExceeded` after ``publish_deadline_s``.
        """
        await self.publish_payload(event.in_node, to_payload(event))

    async def publish_payload(self, in_node: str, payload: bytes) -> None:
        """Like :meth:`publish` for raw bytes (tests send malformed payloads with it)."""
        topic = self._topics.get(in_node)
        if topic is None:
            topic = self._topics[in_node] = encode_string(self.topic_for(in_node))
        deadline = time.monotonic() + self.publish_deadline_s
        attempt = 0
        last_error: BaseException | None = None
        while True:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise PublishDeadlineExceeded(
                    f"no PUBACK for {self.topic_for(in_node)} within publish_deadline_s="
                    f"{self.publish_deadline_s} after {attempt} attempts"
                    f" (last error: {last_error!r})"
                )
            connection: _Connection | None = None
            try:
                await self._window.acquire()
                try:
                    connection = await self._connected(remaining_s)
                    acked = connection.publish(topic, payload)
                    if remaining_s < self.ack_timeout_s:
                        # Rare: the deadline comes before the connection's watchdog would.
                        await asyncio.wait_for(asyncio.shield(acked), remaining_s)
                    else:
                        await acked
                finally:
                    self._window.release()
                self.counts["published"] += 1
                return
            except OSError as exc:  # connection lost, refused, timed out, violated
                last_error = exc
            attempt += 1
            self.counts["retries"] += 1
            if connection is not None:
                self._drop(connection, last_error)
            cap_s = min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(attempt, 20))
            delay_s = cap_s / 2 + random.uniform(0, cap_s / 2)
            await asyncio.sleep(max(0.0, min(delay_s, deadline - time.monotonic())))

    async def publish_many(
        self, events: Iterable[RechargeEvent], *, window_max: int | None = None
    ) -> int:
        """Publish every event, at most ``window_max`` (default: the publisher's window)
        of them awaiting PUBACK at once.

        Returns the number published. The first event that misses its deadline stops
        the batch and its :class:`PublishDeadlineExceeded` is raised.
        """
        workers = min(window_max or self.window_max, self.window_max)
        iterator = iter(events)
        published = 0

        async def worker() -> None:
            nonlocal published
            for event in iterator:  # one shared iterator: each event is taken once
                await self.publish(event)
                published += 1

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(workers):
                    group.create_task(worker())
        except BaseExceptionGroup as failures:
            raise failures.exceptions[0] from None
        return published

    async def _connected(self, remaining_s: float) -> _Connection:
        connection = self._connection
        if connection is not None and connection.session.state is State.CONNECTED:
            return connection  # the common case
        if connection is not None:
            self._drop(connection, ConnectionError("connection closed"))
        if self._connecting is None:
            # One connect for every publish that finds no connection; they all await it.
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connect_done)
        return await asyncio.wait_for(asyncio.shield(self._connecting), remaining_s)

    def _connect_done(self, attempt: asyncio.Future[_Connection]) -> None:
        if self._connecting is attempt:
            self._connecting = None
        if not attempt.cancelled() and attempt.exception() is None:
            self._connection = attempt.result()
            self.counts["connects"] += 1

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        session = PublisherSession(
            self.client_id, keepalive_s=self.keepalive_s, window_max=self.window_max
        )
        async with asyncio.timeout(self.ack_timeout_s):
            _, connection = await loop.create_connection(
                lambda: _Connection(session, self.ack_timeout_s), self.host, self.port
            )
            try:
                await connection.connected
            except BaseException:
                connection.abort(ConnectionError("no CONNACK"))
                raise
        connection.start_watchdog()
        return connection

    def _drop(self, connection: _Connection, reason: BaseException) -> None:
        if self._connection is connection:
            self._connection = None
        connection.abort(reason)


class _Connection(asyncio.Protocol):
    """One broker connection: the session, the writes of this loop turn, the PUBLISHes
    awaiting PUBACK (oldest first) and the watchdog."""

    def __init__(self, session: PublisherSession, ack_timeout_s: float) -> None:
        self.session = session
        self.ack_timeout_s = ack_timeout_s
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.connected: asyncio.Future[None] = loop.create_future()
        # packet id -> (its publish's future, when it was sent); insertion order is
        # send order, so the first entry is the oldest.
        self._waiting: dict[int, tuple[asyncio.Future[None], float]] = {}
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._last_sent = loop.time()
        self._ping_sent_at: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._error: BaseException | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not subclass asyncio's.
        self._transport = cast(asyncio.Transport, transport)
        self._send(self.session.connect())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.session.receive(data)
        except ProtocolViolation as exc:
            self.abort(exc)
            return
        waiting = self._waiting
        for event in events:
            if type(event) is Acked:
                entry = waiting.pop(event.packet_id, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result(None)
            elif type(event) is Connected:
                if not self.connected.done():
                    self.connected.set_result(None)
            else:  # Pong
                self._ping_sent_at = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("connection closed by the broker"))

    # -- used by RechargePublisher -----------------------------------------------------

    def publish(self, topic: bytes, payload: bytes) -> asyncio.Future[None]:
        """Send a PUBLISH; the future resolves on its PUBACK or fails with the connection."""
        if self._error is not None:
            raise ConnectionError(f"connection lost: {self._error!r}")
        packet_id, data = self.session.publish(topic, payload)
        future: asyncio.Future[None] = self._loop.create_future()
        future.add_done_callback(partial(self._forget, packet_id))
        self._waiting[packet_id] = (future, self._loop.time())
        self._send(data)
        return future

    def start_watchdog(self) -> None:
        period_s = min(self.ack_timeout_s / 4, WATCHDOG_PERIOD_MAX_S)
        self._watchdog = self._loop.call_later(period_s, self._watch, period_s)

    def abort(self, reason: BaseException) -> None:
        self._fail(reason)
        if self._transport is not None:
            self._transport.abort()

    async def close(self) -> None:
        """DISCONNECT politely, then close; anything unacknowledged fails (and retries)."""
        if self._transport is not None and not self._transport.is_closing():
            self._send(self.session.disconnect())
            self._flush()
            self._transport.close()
        self._fail(ConnectionError("publisher closed"))

    # -- internals ---------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        # PUBLISHes of one loop turn leave with one write (one send() system call).
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(data)
        self._last_sent = self._loop.time()

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(out))

    def _forget(self, packet_id: int, future: asyncio.Future[None]) -> None:
        if future.cancelled() or future.exception() is not None:
            entry = self._waiting.get(packet_id)
            if entry is not None and entry[0] is future:
                del self._waiting[packet_id]
                self.session.forget(packet_id)

    def _watch(self, period_s: float) -> None:
        now = self._loop.time()
        if self._waiting:
            _, sent_at = next(iter(self._waiting.values()))
            if now - sent_at > self.ack_timeout_s:
                self.abort(TimeoutError(f"no PUBACK within ack_timeout_s={self.ack_timeout_s}"))
                return
        if self._ping_sent_at is not None and now - self._ping_sent_at > self.ack_timeout_s:
            self.abort(TimeoutError("no PINGRESP"))
            return
        if self._ping_sent_at is None and now - self._last_sent >= self.session.keepalive_s / 2:
            self._ping_sent_at = now
            self._send(self.session.ping())
        self._watchdog = self._loop.call_later(period_s, self._watch, period_s)

    def _fail(self, reason: BaseException) -> None:
        if self._error is not None:
            return
        self._error = reason
        self.session.state = State.CLOSED
        if self._watchdog is not None:
            self._watchdog.cancel()
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(f"no CONNACK: {reason!r}"))
            self.connected.exception()  # retrieved: the connect attempt reports it
        waiting, self._waiting = self._waiting, {}
        for future, _ in waiting.values():
            if not future.done():
                future.set_exception(ConnectionError(f"connection lost: {reason!r}"))
