"""The prepaid IN's side of recharge notifications: an at-least-once MQTT publisher.

What this file owns: publishing recharge events the way a careful IN does, QoS 1 on
``<topic_prefix>/<in_node>``, and not considering an event sent until the broker has
answered PUBACK. On a lost connection, a refused publish or a PUBACK that does not come
within ``ack_timeout_s`` it reconnects (jittered backoff) and sends the event again, so
the broker may receive an event twice; the node absorbs that by ``event_id``. Every
wait is bounded: ``publish()`` gives up with :class:`PublishDeadlineExceeded` once
``publish_deadline_s`` has passed.

A simulator: it shares the payload format (``extrabalance.recharge.events``) with the
node and nothing else.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import aiomqtt

from extrabalance.recharge.events import RechargeEvent, to_payload

__all__ = ["PublishDeadlineExceeded", "RechargePublisher"]


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
        self.host = host
        self.port = port
        self.client_id = client_id
        self.topic_prefix = topic_prefix.rstrip("/")
        self.ack_timeout_s = ack_timeout_s
        self.publish_deadline_s = publish_deadline_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.window_max = window_max  # events awaiting PUBACK at once (publish_many)
        self.keepalive_s = keepalive_s
        self._connection: _Connection | None = None
        self._lock = asyncio.Lock()
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
        if self._connection is not None:
            await self._drop(self._connection)

    def topic_for(self, in_node: str) -> str:
        return f"{self.topic_prefix}/{in_node}"

    async def publish(self, event: RechargeEvent) -> None:
        """Send one event and return once the broker has acknowledged it (PUBACK).

        Raises :class:`PublishDeadlineExceeded` after ``publish_deadline_s``.
        """
        await self.publish_payload(event.in_node, to_payload(event))

    async def publish_payload(self, in_node: str, payload: bytes) -> None:
        """Like :meth:`publish` for raw bytes (tests send malformed payloads with it)."""
        topic = self.topic_for(in_node)
        deadline = time.monotonic() + self.publish_deadline_s
        attempt = 0
        last_error: BaseException | None = None
        while True:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise PublishDeadlineExceeded(
                    f"no PUBACK for {topic} within publish_deadline_s={self.publish_deadline_s}"
                    f" after {attempt} attempts (last error: {last_error!r})"
                )
            connection: _Connection | None = None
            try:
                connection = await self._connected()
                # The ack wait is an asyncio.timeout that the connection's watcher
                # fires early when the connection drops, so a lost connection is noticed
                # at once instead of after ack_timeout_s (and without a task per send).
                async with asyncio.timeout(min(self.ack_timeout_s, remaining_s)) as ack_wait:
                    if connection.watcher is not None and connection.watcher.done():
                        raise aiomqtt.MqttError("connection lost")
                    connection.ack_waits.add(ack_wait)
                    try:
                        await connection.client.publish(topic, payload, qos=1, timeout=math.inf)
                    finally:
                        connection.ack_waits.discard(ack_wait)
                self.counts["published"] += 1
                return
            except (aiomqtt.MqttError, OSError) as exc:  # OSError includes TimeoutError
                last_error = exc
            attempt += 1
            self.counts["retries"] += 1
            if connection is not None:
                await self._drop(connection)
            cap_s = min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(attempt, 20))
            delay_s = cap_s / 2 + random.uniform(0, cap_s / 2)
            await asyncio.sleep(max(0.0, min(delay_s, deadline - time.monotonic())))

    async def publish_many(
        self, events: Iterable[RechargeEvent], *, window_max: int | None = None
    ) -> int:
        """Publish every event, at most ``window_max`` awaiting PUBACK at once.

        Returns the number published. The first event that misses its deadline stops
        the batch and its :class:`PublishDeadlineExceeded` is raised.
        """
        workers = window_max if window_max is not None else self.window_max
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

    async def _connected(self) -> _Connection:
        if self._connection is not None:
            return self._connection  # the common case, without the lock
        async with self._lock:
            if self._connection is None:
                client = aiomqtt.Client(
                    self.host,
                    self.port,
                    identifier=self.client_id,
                    # The publisher keeps no state across connections: it re-sends
                    # whatever was not acknowledged itself.
                    clean_session=True,
                    keepalive=self.keepalive_s,
                    timeout=self.ack_timeout_s,
                    max_inflight_messages=self.window_max,
                )
                # aiomqtt warns above 10 pending calls; a full window is normal here.
                client.pending_calls_threshold = self.window_max + 1
                await client.__aenter__()
                connection = _Connection(client)
                connection.watcher = asyncio.create_task(self._watch(connection))
                self._connection = connection
                self.counts["connects"] += 1
            return self._connection

    @staticmethod
    async def _watch(connection: _Connection) -> None:
        # We subscribe to nothing, so the message iterator yields nothing; it ends with
        # MqttError when the connection drops. That is aiomqtt's public disconnect signal.
        try:
            async for _ in connection.client.messages:
                pass
        except aiomqtt.MqttError:
            pass
        now = asyncio.get_running_loop().time()
        for ack_wait in list(connection.ack_waits):
            ack_wait.reschedule(now)  # every publish waiting on this connection retries

    async def _drop(self, connection: _Connection) -> None:
        async with self._lock:
            if self._connection is not connection:
                return  # another publish already dropped this connection
            self._connection = None
            try:
                await connection.client.__aexit__(None, None, None)
            except (aiomqtt.MqttError, OSError):
                pass  # it was broken already; that is why we drop it
            if connection.watcher is not None:
                connection.watcher.cancel()
                await asyncio.gather(connection.watcher, return_exceptions=True)


@dataclass(eq=False, slots=True)
class _Connection:
    """One broker connection and the publishes waiting for its PUBACKs."""

    client: aiomqtt.Client
    ack_waits: set[asyncio.Timeout] = field(default_factory=set)
    watcher: asyncio.Task[None] | None = None
