"""The node's SMPP client (ESME role): several bind_transceiver binds, asyncio.

What this file owns: connecting and re-connecting each configured bind with bounded,
jittered backoff; spreading submits over the bound binds; the per-bind submit rate
cap; resending on ESME_RTHROTTLED / ESME_RMSGQFUL (never dropping silently); calling
the application for every deliver_sm. The protocol itself lives in session.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from extrabalance.smpp.aio.connection import RequestFailedError, SmppConnection
from extrabalance.smpp.pdu import (
    DataSm,
    DeliverSm,
    GenericNack,
    Pdu,
    Status,
    SubmitSm,
    Tag,
    build_sm,
    make_response,
    status_name,
    tlv_u16,
)
from extrabalance.smpp.session import Role, Session, State
from extrabalance.smpp.text import split_text

__all__ = [
    "RETRYABLE_STATUSES",
    "SUBMIT_ATTEMPTS_MAX",
    "BindConfig",
    "Esme",
    "NotBoundError",
    "SubmitError",
    "SubmitResult",
]

log = logging.getLogger(__name__)

SUBMIT_ATTEMPTS_MAX = 6  # first try + 5 resends, then SubmitError
# Of those resends, how many may follow a response timeout: the SMSC may have taken
# the first copy (it answered late or its answer was lost), so each is a possible
# duplicate on the handset, counted in `Esme.stats["timeout_resends"]`.
TIMEOUT_RESENDS_MAX = 0
RETRY_BACKOFF_BASE_S = 0.05
RETRY_BACKOFF_MAX_S = 5.0
RECONNECT_BACKOFF_BASE_S = 0.2
SUBMIT_WAIT_BOUND_S = 30.0  # how long a submit waits for any bind to come up
UNBIND_TIMEOUT_S = 2.0
_TAG_MESSAGE_PAYLOAD = int(Tag.MESSAGE_PAYLOAD)  # a plain int: the PDU's fast check
# Statuses that mean "not now, try again": the message was not accepted.
RETRYABLE_STATUSES = frozenset((Status.ESME_RTHROTTLED, Status.ESME_RMSGQFUL))

# Returns the deliver_sm_resp status, directly (answered in the same turn, no task)
# or as an awaitable.
OnDeliver = Callable[[DeliverSm, str], int | Awaitable[int]]


async def _deliver_resp_later(pdu: Pdu, status: Awaitable[int]) -> Pdu:
    return make_response(pdu, int(await status))


@dataclass(frozen=True)
class BindConfig:
    host: str
    port: int
    system_id: str
    password: str
    system_type: str = ""
    window_max: int = 10
    submit_rate_max_per_s: float = 1000
    enquire_link_s: float = 30.0
    response_timeout_s: float = 5.0
    reconnect_backoff_max_s: float = 30.0
    # "idle": enquire_link after enquire_link_s without traffic (SMPP 3.4 §4.11);
    # "periodic": every enquire_link_s whatever the traffic, for gateways that expect it.
    enquire_link_mode: str = "idle"
    # its_session_info sequence in our USSD answers: "increment" (the received one + 1)
    # or "echo" (the received one), as the gateway expects.
    its_sequence: str = "increment"
    # Where the password came from, named when the SMSC refuses it (never the value).
    password_source: str = ""

    @property
    def name(self) -> str:
        return f"{self.system_id}@{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """Outcome of one submit_sm: status 0 and the SMSC's message_id, or a permanent
    error status (anything but throttling) with message_id ""."""

    message_id: str
    status: int
    attempts: int = 1
    bind: str = ""

    @property
    def ok(self) -> bool:
        return self.status == Status.ESME_ROK


class SubmitError(Exception):
    """A submit given up after SUBMIT_ATTEMPTS_MAX tries (throttled, timed out,
    or no bind up). `status` is the last SMPP status seen, None if none."""

    def __init__(self, message: str, status: int | None, attempts: int) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


class NotBoundError(SubmitError):
    pass


class _TokenBucket:
    """Submit rate cap: `rate_per_s` sustained, bursts of a tenth of a second.

    A caller that finds the bucket empty reserves the next token anyway (the level
    goes below zero) and sleeps once, until exactly that token is due. Waiting
    callers therefore cost one timer each instead of waking up together and polling
    (which burnt CPU precisely when the cap was reached). The debt is at most the
    number of callers waiting, which the application bounds; a caller cancelled
    while it sleeps leaves its token unused (the rate errs on the low side).
    """

    def __init__(self, rate_per_s: float, clock: Callable[[], float]) -> None:
        self.rate_per_s = rate_per_s
        self.capacity = max(1.0, rate_per_s / 10)
        self._tokens = self.capacity
        self._clock = clock
        self._last_s = clock()

    def reserve_s(self) -> float:
        """Take the next token; returns how long to wait before using it (0: now)."""
        now = self._clock()
        level = min(self.capacity, self._tokens + (now - self._last_s) * self.rate_per_s) - 1
        self._tokens = level
        self._last_s = now
        return 0.0 if level >= 0 else -level / self.rate_per_s

    async def take(self) -> None:
        delay_s = self.reserve_s()
        if delay_s > 0:
            await asyncio.sleep(delay_s)


class _BindWorker:
    def __init__(self, esme: Esme, cfg: BindConfig, index: int) -> None:
        self.esme = esme
        self.cfg = cfg
        # Two binds may share one config (more throughput on one SMSC); the index
        # keeps their names apart in logs, metrics and bind_states().
        self.name = f"{cfg.name}#{index}"
        self.conn: SmppConnection | None = None
        self.bucket = _TokenBucket(cfg.submit_rate_max_per_s, esme._clock)
        self.task: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        self.last_bind_status: int | None = None
        self.connects = 0
        self.failures_in_row = 0
        self.bound_since_s: float | None = None
        # submit_sm timed out / answered after their timeout, over every connection
        self.counters = {"timeouts": 0, "late_responses": 0, "connect_failures": 0,
                         "connections_lost": 0, "binds": 0}

    @property
    def bound(self) -> bool:
        return self.conn is not None and self.conn.session.bound

    async def run(self) -> None:
        # A bind must never die silently: anything unexpected (a config value the
        # codec refuses, a bug) is recorded as the bind's last error and retried
        # after the usual backoff, so `bind_states()` and /readyz say what is wrong.
        while not self.esme._closing:
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - see above
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("smpp %s: %s", self.cfg.name, self.last_error)
                if self.conn is not None:
                    self.conn.close()
                    self.conn = None
                    self.esme._bound_changed()
                await self._backoff()

    async def _run_once(self) -> None:
        cfg = self.cfg
        while not self.esme._closing:
            self.connects += 1
            session = Session(
                Role.ESME, window_max=cfg.window_max, response_timeout_s=cfg.response_timeout_s,
                enquire_link_s=cfg.enquire_link_s,
                enquire_link_periodic=cfg.enquire_link_mode == "periodic",
            )
            conn = SmppConnection(session, self._on_request, name=self.name,
                                  clock=self.esme._clock, stats=self.counters)
            try:
                await asyncio.wait_for(
                    asyncio.get_running_loop().create_connection(
                        lambda: conn, cfg.host, cfg.port),  # noqa: B023 - awaited here
                    cfg.response_timeout_s,
                )
            except (TimeoutError, OSError) as exc:
                self.last_error = f"connect failed: {exc or type(exc).__name__}"
                self.counters["connect_failures"] += 1
                self._log_failure(self.last_error)
                await self._backoff()
                continue
            try:
                session.bind("trx", cfg.system_id, cfg.password, cfg.system_type,
                             now_s=self.esme._clock())
                conn.flush()
                await conn.bind_done.wait()
                if conn.bound.is_set():
                    self.conn = conn
                    rebind = self.counters["binds"] > 0
                    self.counters["binds"] += 1
                    self.failures_in_row = 0
                    self.last_error = None
                    self.bound_since_s = self.esme._clock()
                    self.esme._bound_changed()
                    log.info("smpp %s: %s", self.name, "bound again" if rebind else "bound")
                else:
                    self.last_bind_status = conn.bind_refused_status
                    if conn.bind_refused_status is not None:
                        self.last_error = f"bind refused: {status_name(conn.bind_refused_status)}"
                        if (conn.bind_refused_status == Status.ESME_RINVPASWD
                                and cfg.password_source):
                            self.last_error += f" (password from {cfg.password_source})"
                    else:
                        self.last_error = f"closed before bind: {conn.close_reason}"
                    self._log_failure(self.last_error)
                    conn.close()
                await conn.closed.wait()
            except asyncio.CancelledError:
                conn.close()  # the bind is stopped (close()): its connection goes with it
                raise
            if self.conn is conn:
                self.last_error = f"connection lost: {conn.close_reason}"
                self.counters["connections_lost"] += 1
                log.warning("smpp %s: %s", self.name, self.last_error)
                self.conn = None
                self.bound_since_s = None
                self.esme._bound_changed()
            if not self.esme._closing:
                await self._backoff()

    def _log_failure(self, error: str) -> None:
        # Rate-limited: the first failure in a row, then the 2nd, 4th, 8th... (one
        # line per backoff doubling) and every 64th once the backoff is at its cap.
        n = self.failures_in_row + 1
        if n & (n - 1) == 0 or n % 64 == 0:
            log.warning("smpp %s: %s (%d in a row)", self.name, error, n)

    async def _backoff(self) -> None:
        # Exponential, capped, with jitter so that several nodes do not reconnect
        # in lock-step after an SMSC restart.
        self.failures_in_row += 1
        ceiling = min(self.cfg.reconnect_backoff_max_s,
                      RECONNECT_BACKOFF_BASE_S * 2 ** min(self.failures_in_row, 20))
        await self.esme._sleep(ceiling * random.uniform(0.5, 1.0))

    def _on_request(self, pdu: Pdu) -> Pdu | Awaitable[Pdu]:
        if isinstance(pdu, (DeliverSm, DataSm)):
            status = self.esme._on_deliver(pdu, self.name)  # type: ignore[arg-type]
            if isinstance(status, int):
                return make_response(pdu, int(status))
            return _deliver_resp_later(pdu, status)
        # alert_notification has no response; anything else the ESME does not serve.
        return make_response(pdu, Status.ESME_RINVCMDID)

    def state(self) -> dict[str, object]:
        s = self.conn.session if self.conn is not None else None
        return {
            "name": self.name,
            "host": self.cfg.host,
            "port": self.cfg.port,
            "system_id": self.cfg.system_id,
            "state": s.state.value if s is not None else State.CLOSED.value,
            "bound": self.bound,
            "window_used": s.window_used if s is not None else 0,
            "window_max": self.cfg.window_max,
            "connects": self.connects,
            "last_error": self.last_error,
            "last_bind_status": self.last_bind_status,
            **self.counters,
        }


class Esme:
    """Node side of SMPP: keeps every configured bind_transceiver up and submits.

    `on_deliver(pdu, bind_name)` is called for every deliver_sm (USSD, SMS and
    delivery receipts; data_sm too) and returns the deliver_sm_resp status (0 = OK),
    directly or as an awaitable.
    If it raises, the SMSC gets ESME_RX_T_APPN (it will redeliver) and the bind stays.
    """

    def __init__(
        self,
        binds: list[BindConfig],
        on_deliver: OnDeliver,
        *,
        submit_attempts_max: int = SUBMIT_ATTEMPTS_MAX,
        timeout_resends_max: int = TIMEOUT_RESENDS_MAX,
        retry_backoff_base_s: float = RETRY_BACKOFF_BASE_S,
        retry_backoff_max_s: float = RETRY_BACKOFF_MAX_S,
        submit_wait_bound_s: float = SUBMIT_WAIT_BOUND_S,
        use_message_payload: bool = False,
        source_addr_ton: int = 0,
        source_addr_npi: int = 0,
        dest_addr_ton: int = 1,
        dest_addr_npi: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not binds:
            raise ValueError("at least one bind")
        self._on_deliver = on_deliver
        self._clock = clock
        self.submit_attempts_max = submit_attempts_max
        self.timeout_resends_max = timeout_resends_max
        # timeout_resends: submits sent again after a response timeout (duplicate
        # risk); timeout_given_up: submits not sent again (bound reached, or the
        # caller no longer wanted it: a later screen of the same dialog went out).
        self.stats = {"timeout_resends": 0, "timeout_given_up": 0}
        self.retry_backoff_base_s = retry_backoff_base_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.submit_wait_bound_s = submit_wait_bound_s
        self.use_message_payload = use_message_payload
        self._addr = (source_addr_ton, source_addr_npi, dest_addr_ton, dest_addr_npi)
        self._workers = [_BindWorker(self, cfg, i) for i, cfg in enumerate(binds)]
        self._closing = False
        self._bound_cond: asyncio.Condition | None = None
        self._rr = itertools.count()
        self._sms_ref = random.randrange(256)
        self._notify_tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._bound_cond = asyncio.Condition()
        self._closing = False
        for w in self._workers:
            w.task = asyncio.create_task(w.run(), name=f"smpp-bind-{w.name}")

    async def wait_bound(self, timeout_s: float) -> None:
        """Wait until at least one bind is up. Raises NotBoundError after timeout_s,
        naming the last refusal (e.g. ESME_RINVPASWD) when there was one."""
        assert self._bound_cond is not None, "start() first"
        try:
            async with asyncio.timeout(timeout_s):
                async with self._bound_cond:
                    await self._bound_cond.wait_for(lambda: any(w.bound for w in self._workers))
        except TimeoutError:
            statuses = [w.last_bind_status for w in self._workers if w.last_bind_status]
            errors = "; ".join(f"{w.name}: {w.last_error}" for w in self._workers)
            raise NotBoundError(f"no bind up after {timeout_s}s ({errors})",
                                statuses[0] if statuses else None, 0) from None

    async def close(self) -> None:
        """Unbind every bind (bounded wait for unbind_resp) and stop reconnecting."""
        self._closing = True
        conns = [w.conn for w in self._workers if w.conn is not None]
        await asyncio.gather(*(c.unbind(UNBIND_TIMEOUT_S) for c in conns),
                             return_exceptions=True)
        for w in self._workers:
            if w.task is not None:
                w.task.cancel()
        for w in self._workers:
            if w.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await w.task
            if w.conn is not None:
                w.conn.close()

    def bind_config(self, name: str) -> BindConfig | None:
        """The configuration of the bind named `name` (as given to on_deliver)."""
        return next((w.cfg for w in self._workers if w.name == name), None)

    def bind_states(self) -> list[dict[str, object]]:
        return [w.state() for w in self._workers]

    # -- submitting ------------------------------------------------------------------

    async def submit(self, pdu: SubmitSm, *,
                     resend_if: Callable[[], bool] | None = None) -> SubmitResult:
        """Submit on the least loaded bound bind. Throttling answers
        (ESME_RTHROTTLED, ESME_RMSGQFUL) and lost connections are retried with
        bounded, jittered backoff, up to submit_attempts_max tries; then SubmitError.
        A response timeout is retried at most timeout_resends_max times (the SMSC may
        have the first copy), and never when `resend_if()` says the message is no
        longer wanted. Other error statuses are returned, not retried."""
        last_status: int | None = None
        last_reason = ""
        timeout_resends = 0
        for attempt in range(1, self.submit_attempts_max + 1):
            if attempt > 1 and resend_if is not None and not resend_if():
                if last_reason == "timeout":
                    self.stats["timeout_given_up"] += 1
                raise SubmitError(f"submit_sm not sent again ({last_reason}): superseded",
                                  last_status, attempt - 1)
            if last_reason == "timeout":
                if timeout_resends >= self.timeout_resends_max:
                    self.stats["timeout_given_up"] += 1
                    raise SubmitError(
                        f"submit_sm unanswered after {timeout_resends + 1} attempts "
                        f"(timeout resends bounded at {self.timeout_resends_max})",
                        last_status, attempt - 1)
                timeout_resends += 1
                self.stats["timeout_resends"] += 1
            worker = self._least_loaded()  # no coroutine when a bind is up
            if worker is None:
                try:
                    worker = await self._pick()
                except NotBoundError as exc:
                    raise NotBoundError(str(exc), last_status, attempt - 1) from None
            delay_s = worker.bucket.reserve_s()
            if delay_s > 0:  # over the bind's rate cap: wait for this submit's token
                await asyncio.sleep(delay_s)
            conn = worker.conn
            if conn is None:  # went down while we waited for a token
                last_reason = "bind lost"
                continue
            try:
                resp = await conn.request(pdu)
            except RequestFailedError as exc:
                last_reason, last_status = exc.reason, exc.status
            else:
                status = resp.command_status
                if status == Status.ESME_ROK and not isinstance(resp, GenericNack):
                    return SubmitResult(getattr(resp, "message_id", ""), 0, attempt,
                                        worker.name)
                if status not in RETRYABLE_STATUSES:
                    return SubmitResult("", status or Status.ESME_RUNKNOWNERR, attempt,
                                        worker.name)
                last_status, last_reason = status, status_name(status)
            if attempt < self.submit_attempts_max and last_reason != "timeout":
                ceiling = min(self.retry_backoff_max_s,
                              self.retry_backoff_base_s * 2 ** (attempt - 1))
                await self._sleep(ceiling * random.uniform(0.5, 1.0))
        raise SubmitError(
            f"submit_sm given up after {self.submit_attempts_max} attempts: {last_reason}",
            last_status, self.submit_attempts_max,
        )

    async def send_sms(
        self, source_addr: str, dest_addr: str, text: str, *,
        registered_delivery: bool = True, use_message_payload: bool | None = None,
        user_message_reference: int | None = None,
    ) -> list[SubmitResult]:
        """Submit `text` as one SMS or as UDH-concatenated parts (GSM 7-bit or UCS2
        chosen per text); with use_message_payload, one submit_sm with message_payload.
        `user_message_reference` (0..65535) goes on every part as that TLV."""
        self._sms_ref = (self._sms_ref + 1) & 0xFF
        payload_mode = self.use_message_payload if use_message_payload is None else use_message_payload
        segments = split_text(text, self._sms_ref, use_message_payload=payload_mode)
        s_ton, s_npi, d_ton, d_npi = self._addr
        if not source_addr.isdigit():
            s_ton, s_npi = 5, 0  # alphanumeric sender
        reference: tuple[tuple[int, bytes], ...] = (
            (tlv_u16(Tag.USER_MESSAGE_REFERENCE, user_message_reference),)
            if user_message_reference is not None else ())
        results = []
        for seg in segments:
            pdu = build_sm(
                SubmitSm, source_addr_ton=s_ton, source_addr_npi=s_npi, source_addr=source_addr,
                dest_addr_ton=d_ton, dest_addr_npi=d_npi, destination_addr=dest_addr,
                esm_class=seg.esm_class, data_coding=seg.data_coding,
                registered_delivery=1 if registered_delivery else 0,
                short_message=seg.short_message,
                tlvs=(((_TAG_MESSAGE_PAYLOAD, seg.message_payload),)
                      if seg.message_payload is not None else ()) + reference,
            )
            results.append(await self.submit(pdu))
        return results

    # -- internals ---------------------------------------------------------------------

    async def _pick(self) -> _BindWorker:
        worker = self._least_loaded()
        if worker is None:
            await self.wait_bound(self.submit_wait_bound_s)
            worker = self._least_loaded()
            if worker is None:
                raise NotBoundError("no bind up", None, 0)
        return worker

    def _least_loaded(self) -> _BindWorker | None:
        # The bound bind with the most free window slots; the scan starts one further
        # each call, so equals take turns (round-robin spreads the traffic).
        workers = self._workers
        count = len(workers)
        start = next(self._rr) % count
        best: _BindWorker | None = None
        best_free = -1
        for i in range(count):
            w = workers[(start + i) % count]
            conn = w.conn
            if conn is not None and conn.session.bound:
                free = conn.window_free
                if free > best_free:
                    best, best_free = w, free
        return best

    def _bound_changed(self) -> None:
        cond = self._bound_cond
        if cond is None:
            return

        async def notify() -> None:
            async with cond:
                cond.notify_all()

        task = asyncio.get_running_loop().create_task(notify())
        self._notify_tasks.add(task)
        task.add_done_callback(self._notify_tasks.discard)

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
