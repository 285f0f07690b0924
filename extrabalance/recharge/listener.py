"""The node's MQTT subscriber for recharge events: at-least-once, ack after commit.

What this file owns: one persistent MQTT session per node (fixed client id, clean
session off, QoS 1), the rule that a message is acknowledged only after the node has
durably recorded it, dead-lettering of payloads that are not recharge events, and
reconnection. It does not decide anything about money: ``handle(event)`` (the service
layer) does, and it must be idempotent by ``event_id``.

Theory of operation
-------------------
* **Ack after commit.** aiomqtt (like paho by default) sends PUBACK as soon as a
  PUBLISH arrives, so a crash between receipt and commit loses the message: the broker
  has already forgotten it. We switch the underlying paho client to manual
  acknowledgement and send PUBACK ourselves once ``handle(event)`` has returned, which
  by contract is after the ledger commit. A crash before that point leaves the message
  unacknowledged in the broker's persistent session, and the broker re-sends it when
  the node reconnects with the same client id.
* **Why we reach into aiomqtt.** aiomqtt 2.x builds its paho client internally and has
  no option for manual acks (its constructor does not pass ``manual_ack`` on); paho
  2.x has ``Client.manual_ack_set(True)`` and ``Client.ack(mid, qos)``. aiomqtt keeps
  the paho client in ``Client._client`` and runs all of paho's socket I/O on the
  asyncio loop, so calling paho's public methods on it from the loop is safe. We also
  set paho's ``on_message`` to our own inbox: it keeps the DUP flag (aiomqtt drops it)
  and skips aiomqtt's per-message task, which halved our throughput. aiomqtt still
  owns the connection, and its message iterator (which then never yields) is our
  disconnect signal. The one private attribute access is isolated in
  :func:`_paho_of`; the tests exercise it against a real broker, so an aiomqtt
  upgrade that moves it fails loudly instead of silently auto-acking.
* **Acks in order of receipt.** MQTT 3.1.1 §4.6 [MQTT-4.6.0-2] requires a client to
  send PUBACKs in the order the PUBLISH packets were received. Handlers run
  concurrently (at most ``inflight_max``), but the acker walks the messages in receipt
  order and acks each one only when its own handler and every earlier one have finished.
* **A handler that raises (or exceeds ``handle_timeout_s``).** Its message is not
  acknowledged, and neither is anything received after it (in-order rule). We stop
  taking messages, let the running handlers finish, disconnect, and reconnect after a
  jittered backoff; the broker then re-sends everything unacknowledged, the failed
  message first. We chose reconnecting over keeping the message pending in memory
  because (a) with in-order acks a pending message blocks every later ack anyway and
  the broker's in-flight window fills up behind it, (b) a failing handler almost always
  means the ledger is unavailable, where backing off is the right reaction, and
  (c) redelivery then follows exactly the path a crash follows, so that path is
  exercised all the time instead of only in disasters. Handlers that already
  committed later messages will see them again: that is the at-least-once contract.
* **Duplicates are normal.** Every redelivery (after a crash, a handler failure, a
  lost connection, a broker restart) can repeat events the ledger has already
  committed. ``handle`` must treat a known ``event_id`` as done and return normally.
* **Bounded inbox, by flow control.** Mosquitto 2.0 was measured pushing a whole QoS 1
  backlog (tens of thousands of messages) to the node regardless of its
  ``max_inflight_messages`` and of an MQTT 5 Receive Maximum; held in memory that cost
  about 2.5 KiB a message (paho's message object and its lock). At ``inbox_max``
  messages read and not yet handled the listener stops reading the socket, and
  resumes at half: TCP pushes back and the backlog stays on the broker.
* **Dead letters on their own connection.** A paused subscriber socket would also hold
  up the PUBACKs of our dead-letter publishes, and a handler waiting for one would
  never free the inbox: a deadlock. So dead letters go out on a second connection
  (client id + ``-deadletter``, clean session) that is never paused.
* **TCP_NODELAY** on both sockets: paho leaves Nagle's algorithm on, which held each
  small PUBACK behind the broker's delayed ACK and capped the listener near 250
  messages a second on loopback (about 1,400 without it, measured).
* **Invalid payloads** are logged with the reason, counted, published to the
  dead-letter topic (QoS 1, waiting for the broker's PUBACK) as JSON
  ``{"reason", "topic", "payload_b64"}``, and only then acknowledged. Messages on the
  dead-letter topic itself are acknowledged and skipped: the default subscription
  ``extrabalance/recharge/+`` matches it, and re-dead-lettering our own output would
  loop forever.
* **The session must exist before publishers start.** With clean session off the
  broker queues QoS 1 messages for this client id while it is offline, but only once
  the subscription exists: a node connects once before the IN's first recharge is
  expected. The broker must not drop queued messages either (``max_queued_messages 0``
  in Mosquitto; its default of 1000 drops messages to a slow or absent node).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from extrabalance.recharge.events import (
    PAYLOAD_MAX_BYTES,
    InvalidRecharge,
    RechargeEvent,
    origin_problem,
    parse_recharge,
)

__all__ = ["MqttSettings", "RechargeListener"]

log = structlog.get_logger(__name__)

MQTT_V311 = 4
MQTT_V5 = 5
# How long a (re)connection may take to get its SUBACK while the backlog queued before
# it is drained; past it the session is restarted, keeping what was acknowledged.
SUBACK_WAIT_S = 600.0
# A dead letter carries at most this much of the original payload (base64) and says
# how big the original was: a 1 MB payload must not become a 1.4 MB dead letter.
DEAD_LETTER_PAYLOAD_MAX_BYTES = PAYLOAD_MAX_BYTES
_SHARE_NAME = re.compile(r"[^/+#\s]+")  # a shared subscription's group name (MQTT 5 §4.8.2)
# The dead-letter publisher's client id: the subscriber's, plus this.
DEAD_LETTER_CLIENT_SUFFIX = "-deadletter"


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """How the node reaches its broker. Defaults match docs/protocols.md."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "extrabalance-node-1"  # fixed per node: it names the persistent session
    topics: tuple[str, ...] = ("extrabalance/recharge/+",)
    dead_letter_topic: str = "extrabalance/recharge/dead"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None  # None with tls=True: the system's trust store
    keepalive_s: int = 30
    reconnect_backoff_initial_s: float = 0.5
    reconnect_backoff_max_s: float = 30.0
    # Messages handed to handlers and not yet acknowledged (handled concurrently; acks
    # in receipt order, so a slow one holds the acks of those behind it). On MQTT 5 it
    # is also sent to the broker as Receive Maximum, which Mosquitto 2.0 was measured
    # not to honour for a backlog: `inbox_max` is what bounds memory.
    inflight_max: int = 100  # as the [mqtt] section's default
    # Messages read from the socket and not yet handed to a handler. Mosquitto 2.0 was
    # measured sending a QoS 1 backlog far past its max_inflight_messages (and past an
    # MQTT 5 Receive Maximum), so the node bounds what it holds itself: at this many it
    # stops reading the socket (TCP pushes back on the broker) until half have gone.
    inbox_max: int = 1000
    protocol_version: int = MQTT_V311  # 4 = MQTT 3.1.1, 5 = MQTT 5
    # MQTT 5 only: how long the broker keeps the session (and queued messages) while
    # the node is away. 3.1.1 sessions with clean session off never expire.
    session_expiry_s: int = 7 * 24 * 3600
    # Several nodes on one ledger: subscribe `$share/<group>/<filter>` (MQTT 5 §4.8.2
    # shared subscriptions; Mosquitto 2.0 serves them on 3.1.1 and 5 alike), so the broker gives
    # each recharge to one node of the group instead of to all. None: every node that
    # subscribes gets every recharge (one node, or a test).
    shared_group: str | None = None
    handle_timeout_s: float = 60.0  # a handler (or a dead-letter PUBACK) slower: failed
    connect_timeout_s: float = 10.0  # CONNACK and SUBACK waits
    drain_timeout_s: float = 30.0  # on stop or disconnect: wait for running handlers

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ValueError("MqttSettings.client_id must be set: it names the session")
        if not self.topics:
            raise ValueError("MqttSettings.topics must name at least one topic filter")
        if any(ch in self.dead_letter_topic for ch in "+#") or not self.dead_letter_topic:
            raise ValueError("MqttSettings.dead_letter_topic must be a topic name, not a filter")
        if self.shared_group is not None and not _SHARE_NAME.fullmatch(self.shared_group):
            raise ValueError("MqttSettings.shared_group must be a non-empty name without "
                             "'/', '+' or '#'")
        if self.protocol_version not in (MQTT_V311, MQTT_V5):
            raise ValueError("MqttSettings.protocol_version must be 4 (3.1.1) or 5")
        if not 1 <= self.inflight_max <= 65535:
            raise ValueError("MqttSettings.inflight_max must be in 1..65535")
        if self.inbox_max < 2:
            raise ValueError("MqttSettings.inbox_max must be at least 2")
        if self.session_expiry_s <= 0:
            raise ValueError("MqttSettings.session_expiry_s must be > 0 (persistent session)")
        if not 0 < self.reconnect_backoff_initial_s <= self.reconnect_backoff_max_s:
            raise ValueError("reconnect backoff must satisfy 0 < initial <= max")

    def subscription_filters(self) -> tuple[str, ...]:
        """What the node subscribes: `topics`, each as `$share/<group>/<filter>` when
        the node is one of a shared group. Messages still arrive on their own topics."""
        if self.shared_group is None:
            return self.topics
        return tuple(f"$share/{self.shared_group}/{topic}" for topic in self.topics)


class _HandlerFailed(Exception):
    """The handler of the oldest unacknowledged message raised; reconnect to redeliver."""


@dataclass(slots=True)
class _Delivery:
    message: paho.MQTTMessage
    task: asyncio.Task[None]
    received_monotonic: float


def _paho_of(client: aiomqtt.Client) -> paho.Client:
    # The one place we touch aiomqtt's internals; see "Why we reach into aiomqtt".
    inner = getattr(client, "_client", None)
    if not isinstance(inner, paho.Client):
        raise TypeError("aiomqtt no longer exposes its paho client; manual acks impossible")
    return inner


def _no_delay(client: aiomqtt.Client) -> None:
    """TCP_NODELAY on the session's socket. paho leaves Nagle's algorithm on, so each
    small PUBACK or dead-letter PUBLISH written while an earlier one is unacknowledged
    waits for the broker's delayed ACK (about 40 ms on Linux): with the broker's 20
    messages in flight that capped the listener near 250 messages/s on loopback."""
    sock = _paho_of(client).socket()
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
    except (OSError, AttributeError) as exc:  # not TCP (a test double): keep going
        log.info("recharge.nodelay_not_set", error=str(exc))


async def _until_disconnected(client: aiomqtt.Client) -> None:
    # We took over on_message, so aiomqtt's iterator never yields; it raises MqttError
    # when the connection drops, which is aiomqtt's public disconnect signal.
    async for _ in client.messages:
        pass


async def _until_either_disconnects(a: aiomqtt.Client, b: aiomqtt.Client) -> None:
    waiters = [asyncio.ensure_future(_until_disconnected(a)),
               asyncio.ensure_future(_until_disconnected(b))]
    try:
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # raises the MqttError that ended it
    finally:
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


class _ReadFlow:
    """Stops and restarts reading the subscriber's socket (flow control for the inbox).

    aiomqtt reads the socket from an event-loop reader it registers when paho opens
    the socket; pausing removes that reader, resuming asks aiomqtt to register it
    again. Like :func:`_paho_of`, this leans on aiomqtt internals, kept here only.
    While paused, unread data waits in the kernel, TCP closes its window and the
    broker keeps the rest of the backlog. A pause longer than the keepalive ends in
    a keepalive disconnect and a reconnect: nothing is lost (unacknowledged messages
    are redelivered), it is only slower.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self._client = client
        self.paused = False

    def pause(self) -> None:
        sock = _paho_of(self._client).socket()
        if self.paused or sock is None:
            return
        asyncio.get_running_loop().remove_reader(sock.fileno())
        self.paused = True

    def resume(self) -> None:
        if not self.paused:
            return
        self.paused = False
        inner = _paho_of(self._client)
        sock = inner.socket()
        if sock is None:  # closed meanwhile: aiomqtt reports the disconnect
            return
        self._client._on_socket_open(inner, None, sock)  # re-adds aiomqtt's reader
        if hasattr(sock, "pending") and sock.pending() > 0:
            # TLS may already hold decrypted bytes the new reader would not be woken for.
            asyncio.get_running_loop().call_soon(inner.loop_read)


def _subscription_refused(granted: Any) -> bool:
    # MQTT 3.1.1 SUBACK returns granted QoS ints (0x80 = failure); MQTT 5 returns
    # reason codes where >= 0x80 is a failure. Granted QoS 0 would mean no acks at all.
    for code in granted:
        value = code.value if hasattr(code, "value") else int(code)
        if value >= 0x80 or value < 1:
            return True
    return False


class RechargeListener:
    """Subscribes to recharge events and feeds them to ``handle``, acking after it.

    ``handle(event)`` must return only once the event is durably recorded, and must
    treat an ``event_id`` it has already recorded as done (duplicates are expected).
    ``on_invalid(payload, topic, reason)`` is told about every payload that was not a
    recharge event, before it is dead-lettered. With ``in_nodes``, an event whose
    ``in_node`` is not one of them or disagrees with its topic is dead-lettered too
    (``events.origin_problem``).
    """

    def __init__(
        self,
        settings: MqttSettings,
        handle: Callable[[RechargeEvent], Awaitable[None]],
        *,
        expected_currency: str,
        on_invalid: Callable[[bytes, str, str], None] | None = None,
        in_nodes: frozenset[str] | None = None,
    ) -> None:
        self._settings = settings
        # The Origin-Hosts of the configured INs: an event from any other is dead-lettered
        # (None: not checked, for tools that listen without a node's config).
        self.in_nodes = in_nodes
        self._handle = handle
        self._expected_currency = expected_currency
        self._on_invalid = on_invalid
        self._stopping = asyncio.Event()
        self._running = False
        self._connected = False
        self._deliveries: deque[_Delivery] = deque()  # the current session's, for stats()
        self._session_client: aiomqtt.Client | None = None
        self._inbox: asyncio.Queue[paho.MQTTMessage] = asyncio.Queue()
        self._counts = {
            "received": 0,  # deliveries of recharge-topic messages, duplicates included
            "handled": 0,  # handle(event) returned
            "invalid": 0,  # payloads that were not recharge events
            "dead_lettered": 0,  # invalid payloads the broker accepted on the dead topic
            "redelivered": 0,  # deliveries the broker flagged DUP (a re-send)
            "acked": 0,  # PUBACKs sent
            "handler_failures": 0,  # handle raised or timed out (message redelivered)
            "reconnects": 0,
            "inbox_peak": 0,  # most messages held in the inbox at once (bound: inbox_max)
            "read_pauses": 0,  # times the socket read stopped because the inbox was full
        }

    # -- public -------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until :meth:`stop`; reconnect with jittered backoff on any failure.

        A listener runs once: after :meth:`stop` (even one called before ``run``
        started) ``run`` returns at once. Make a new listener to start again.
        """
        if self._running:
            raise RuntimeError("RechargeListener.run() is already running")
        self._running = True
        attempt = 0
        try:
            while not self._stopping.is_set():
                started = time.monotonic()
                acked_before = self._counts["acked"]
                try:
                    await self._session()
                except _HandlerFailed as exc:
                    log.warning("recharge.handler_failed_reconnecting", error=str(exc))
                except (aiomqtt.MqttError, OSError) as exc:
                    log.warning("recharge.mqtt_connection_lost", error=repr(exc))
                finally:
                    self._connected = False
                if self._stopping.is_set():
                    break
                # Reset the backoff only after a session that made progress or lived
                # long, so a handler failing on every redelivery backs off properly.
                progressed = self._counts["acked"] > acked_before
                lived_s = time.monotonic() - started
                if progressed or lived_s >= self._settings.reconnect_backoff_max_s:
                    attempt = 0
                delay_s = self._backoff_s(attempt)
                attempt += 1
                self._counts["reconnects"] += 1
                log.info("recharge.reconnect_scheduled", delay_s=round(delay_s, 3))
                try:
                    await asyncio.wait_for(self._stopping.wait(), timeout=delay_s)
                except TimeoutError:
                    pass
        finally:
            self._running = False
            # One line with every counter: how far the backlog got before the stop.
            log.info("recharge.listener_stopped", client_id=self._settings.client_id,
                     **self._counts)

    async def stop(self) -> None:
        """Ask :meth:`run` to finish: running handlers complete and are acked first."""
        self._stopping.set()

    def stats(self) -> dict[str, int | float | bool]:
        """Counters since construction, plus the session right now: whether it is up,
        messages received and not yet acknowledged, and how long the oldest of them
        (the one every later ack waits for) has been waiting."""
        deliveries = self._deliveries
        head_wait_s = (round(time.monotonic() - deliveries[0].received_monotonic, 3)
                       if deliveries else 0.0)
        return {**self._counts, "connected": self._connected, "unacked": len(deliveries),
                "oldest_unacked_s": head_wait_s, "inbox": self._inbox.qsize()}

    # -- one connection -----------------------------------------------------------

    def _backoff_s(self, attempt: int) -> float:
        cap_s: float = min(
            self._settings.reconnect_backoff_max_s,
            self._settings.reconnect_backoff_initial_s * 2.0 ** min(attempt, 30),
        )
        # "Equal jitter": at least half the cap, so a fleet of nodes restarted together
        # spreads out without any of them hammering the broker at ~0 s.
        return cap_s / 2 + random.uniform(0, cap_s / 2)

    def _client(self, *, dead_letters: bool = False) -> aiomqtt.Client:
        """The subscriber (persistent session, manual acks), or with `dead_letters` the
        publisher of dead letters: its own connection and a clean session, so that its
        PUBACKs keep arriving while the subscriber's socket is paused (see _session)."""
        s = self._settings
        tls_context = ssl.create_default_context(cafile=s.ca_file) if s.tls else None
        kwargs: dict[str, Any] = {}
        if dead_letters and s.protocol_version == MQTT_V5:
            kwargs.update(protocol=aiomqtt.ProtocolVersion.V5)  # clean start: no session
        elif dead_letters:
            kwargs.update(protocol=aiomqtt.ProtocolVersion.V311, clean_session=True)
        elif s.protocol_version == MQTT_V5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = s.session_expiry_s
            properties.ReceiveMaximum = s.inflight_max
            kwargs.update(
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=False,  # resume the session every time, first connect included
                properties=properties,
            )
        else:
            kwargs.update(protocol=aiomqtt.ProtocolVersion.V311, clean_session=False)
        client = aiomqtt.Client(
            s.host,
            s.port,
            identifier=f"{s.client_id}{DEAD_LETTER_CLIENT_SUFFIX}" if dead_letters else s.client_id,
            username=s.username,
            password=s.password,
            keepalive=s.keepalive_s,
            timeout=s.connect_timeout_s,
            tls_context=tls_context,
            **kwargs,
        )
        if not dead_letters:
            _paho_of(client).manual_ack_set(True)
        # Up to inflight_max dead-letter publishes wait for their PUBACK at once, by
        # design: aiomqtt would log a warning for each beyond 10 (thousands a minute
        # during a flood of bad payloads).
        client.pending_calls_threshold = s.inflight_max + 10
        return client

    async def _session(self) -> None:
        s = self._settings
        client = self._client()
        dead_letter_client = self._client(dead_letters=True)
        # paho hands each PUBLISH to on_message on the event loop thread (aiomqtt runs
        # paho's socket I/O there). We take it straight from paho instead of through
        # aiomqtt's message iterator, which costs a task and an asyncio.wait per message
        # (measured: about half our throughput), and which would hide the DUP flag.
        # The inbox is bounded by flow control: at inbox_max we stop reading the socket.
        # Only PUBLISH packets (and PINGRESP) arrive on it: dead letters go out on their
        # own connection, whose PUBACKs a paused read can therefore never hold up.
        inbox: asyncio.Queue[paho.MQTTMessage] = asyncio.Queue()
        self._inbox = inbox
        flow = _ReadFlow(client)

        def on_message(_client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
            inbox.put_nowait(message)
            self._counts["inbox_peak"] = max(self._counts["inbox_peak"], inbox.qsize())
            if inbox.qsize() >= s.inbox_max and not flow.paused:
                flow.pause()
                self._counts["read_pauses"] += 1

        _paho_of(client).on_message = on_message
        self._session_client = client  # for diagnosis tools only
        async with client, dead_letter_client:
            _no_delay(client)
            _no_delay(dead_letter_client)
            # On a persistent session the broker sends the queued backlog BEFORE the
            # SUBACK. The pump must already be draining it (pausing the read at
            # inbox_max) while we wait, or the SUBACK is never read and a node that
            # restarts with a backlog larger than its inbox never reconnects.
            pump = asyncio.ensure_future(self._pump(client, dead_letter_client, inbox, flow))
            subscribing = asyncio.ensure_future(client.subscribe(
                [(topic, 1) for topic in s.subscription_filters()], timeout=SUBACK_WAIT_S))
            try:
                await asyncio.wait({pump, subscribing}, return_when=asyncio.FIRST_COMPLETED)
                if not subscribing.done():
                    pump.result()  # the pump ended first: its error (or stop) wins
                    return
                granted = subscribing.result()
                if _subscription_refused(granted):
                    raise aiomqtt.MqttError(f"broker refused QoS 1 subscription: {granted!r}")
                self._connected = True
                log.info("recharge.subscribed", client_id=s.client_id,
                         topics=list(s.subscription_filters()))
                await pump
            finally:
                for task in (subscribing, pump):
                    if not task.done():
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await task

    async def _pump(self, client: aiomqtt.Client, dead_letter_client: aiomqtt.Client,
                    inbox: asyncio.Queue[paho.MQTTMessage], flow: _ReadFlow) -> None:
        """Run handlers concurrently and ack in receipt order until stop or failure."""
        window = asyncio.Semaphore(self._settings.inflight_max)
        deliveries: deque[_Delivery] = deque()
        self._deliveries = deliveries
        progress = asyncio.Event()  # a handler finished: the head may be ackable now
        all_acked = asyncio.Event()  # set whenever nothing received is left unacked
        all_acked.set()
        paho_client = _paho_of(client)

        def on_done(_: asyncio.Task[None]) -> None:
            progress.set()

        async def read() -> None:
            while True:
                message = await inbox.get()
                if inbox.qsize() <= self._settings.inbox_max // 2:
                    flow.resume()
                await window.acquire()
                task = asyncio.create_task(self._process(dead_letter_client, message))
                task.add_done_callback(on_done)
                deliveries.append(_Delivery(message, task, time.monotonic()))
                all_acked.clear()

        async def ack_in_order() -> None:
            # Never awaits a handler task directly, so cancelling the acker cannot
            # cancel a handler in the middle of its commit.
            while True:
                while deliveries and deliveries[0].task.done():
                    head = deliveries[0]
                    if head.task.cancelled() or head.task.exception() is not None:
                        error = None if head.task.cancelled() else head.task.exception()
                        raise _HandlerFailed(repr(error))
                    if head.message.qos > 0:
                        rc = paho_client.ack(head.message.mid, head.message.qos)
                        if rc != paho.MQTT_ERR_SUCCESS:
                            raise aiomqtt.MqttCodeError(rc, "could not send PUBACK")
                        self._counts["acked"] += 1
                    deliveries.popleft()
                    window.release()
                if not deliveries:
                    all_acked.set()
                progress.clear()
                await progress.wait()

        reader = asyncio.create_task(read())
        acker = asyncio.create_task(ack_in_order())
        stopper = asyncio.create_task(self._stopping.wait())
        lost = asyncio.create_task(_until_either_disconnects(client, dead_letter_client))
        try:
            done, _ = await asyncio.wait(
                {reader, acker, stopper, lost}, return_when=asyncio.FIRST_COMPLETED
            )
            reader.cancel()  # take no new messages, whatever happened
            await asyncio.gather(reader, return_exceptions=True)
            if stopper in done and not acker.done():
                # Graceful stop: let the running handlers finish and ack them.
                drained = asyncio.create_task(all_acked.wait())
                await asyncio.wait(
                    [acker, drained],
                    timeout=self._settings.drain_timeout_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                drained.cancel()
        finally:
            for task in (reader, acker, stopper, lost):
                task.cancel()
            await asyncio.gather(reader, acker, stopper, lost, return_exceptions=True)
            # Whatever is left unacknowledged will be redelivered; wait for its
            # handlers so a redelivery never runs beside the first attempt.
            running = [d.task for d in deliveries if not d.task.done()]
            if running:
                _, late = await asyncio.wait(running, timeout=self._settings.drain_timeout_s)
                for task in late:
                    task.cancel()
                await asyncio.gather(*running, return_exceptions=True)
            for delivery in deliveries:  # mark failures as seen (they were logged)
                if delivery.task.done() and not delivery.task.cancelled():
                    delivery.task.exception()
        for task in (reader, acker, lost):
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error

    async def _process(self, client: aiomqtt.Client, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:  # MQTT requires UTF-8 topic names; a broker bug
            topic = "<topic not UTF-8>"
        if topic == self._settings.dead_letter_topic:
            return  # our own dead letters, matched by the wildcard: ack and skip
        payload = bytes(message.payload)
        self._counts["received"] += 1
        if message.dup:
            self._counts["redelivered"] += 1
        try:
            event = parse_recharge(payload, expected_currency=self._expected_currency)
        except InvalidRecharge as exc:
            await self._dead_letter(client, payload, topic, exc.reason)
            return
        if self.in_nodes is not None:
            problem = origin_problem(event.in_node, topic, self._settings.topics, self.in_nodes)
            if problem is not None:
                await self._dead_letter(client, payload, topic, problem)
                return
        try:
            async with asyncio.timeout(self._settings.handle_timeout_s):
                await self._handle(event)
        except Exception:
            self._counts["handler_failures"] += 1
            log.warning(
                "recharge.handler_raised", event_id=event.event_id, topic=topic, exc_info=True
            )
            raise
        self._counts["handled"] += 1

    async def _dead_letter(
        self, client: aiomqtt.Client, payload: bytes, topic: str, reason: str
    ) -> None:
        self._counts["invalid"] += 1
        # The payload itself may hold an MSISDN: log its size, keep it on the dead topic.
        log.warning("recharge.invalid_payload", reason=reason, topic=topic, size=len(payload))
        if self._on_invalid is not None:
            try:
                self._on_invalid(payload, topic, reason)
            except Exception:
                log.exception("recharge.on_invalid_raised")
        body = json.dumps(
            {
                "reason": reason,
                "topic": topic,
                "payload_b64": base64.b64encode(
                    payload[:DEAD_LETTER_PAYLOAD_MAX_BYTES]).decode("ascii"),
                "payload_size": len(payload),
                "payload_truncated": len(payload) > DEAD_LETTER_PAYLOAD_MAX_BYTES,
            }
        )
        # Waits for the broker's PUBACK: the original is acked only once the copy is safe.
        # A loaded broker can take a while; as long as any handler may (not the short
        # connect timeout, whose expiry turned a slow PUBACK into a reconnect).
        await client.publish(self._settings.dead_letter_topic, body, qos=1,
                             timeout=self._settings.handle_timeout_s)
        self._counts["dead_lettered"] += 1
