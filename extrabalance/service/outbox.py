"""The outbox sender: delivers the messages the use cases wrote to the outbox.

What this file owns: `OutboxSender`, the one background task that takes unsent rows
from the ledger's outbox (written in the same unit of work as the money they report,
see `NoticeOutbox` in `ports.py`), hands each to the `Notifier` (the SMPP channel),
and marks it sent once the SMSC took it.

Rules it keeps:

* Nothing waits for it. A CCA, a USSD screen or a PUBACK leaves once the money is
  committed; the message follows when the SMSC answers. A slow or absent SMSC delays
  messages, never answers.
* Bounded: at most `concurrency_max` submits in flight, at most `rate_per_s` started
  per second, at most `batch_max` rows read per query.
* At least once: a row is marked sent only after the SMSC accepted it; a failure is
  retried after `retry_delays_s` (the last delay repeats) up to `attempts_max`
  attempts; a node that stops between the commit and the send sends the row after
  restart (the row is still unsent). A message can therefore reach the SMSC twice (a
  crash after the submit, before the mark); every attempt carries the row's outbox id
  (`Notice.outbox_id`: in the `sms` EDR line, and as the SMPP user_message_reference
  TLV when the operator enables it) so such a duplicate can be recognised.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING

import structlog

from extrabalance.service.ports import Notice, Notifier

if TYPE_CHECKING:
    from extrabalance.ledger.outbox_store import OutboxRow
    from extrabalance.service.unit_of_work import LedgerTx, UnitOfWork

log = structlog.get_logger(__name__)

OUTBOX_CONCURRENCY_MAX = 16  # submits in flight
OUTBOX_RATE_PER_S = 100.0  # submits started per second
OUTBOX_BATCH_MAX = 200  # rows read per query
OUTBOX_RETRY_DELAYS_S = (2.0, 10.0, 30.0, 120.0, 600.0)  # the last one repeats
OUTBOX_ATTEMPTS_MAX = 60  # about 9 hours of retries, then the row is given up
OUTBOX_IDLE_POLL_S = 5.0  # look for due retries this often when nobody wakes us
OUTBOX_KEPT_S = 86_400.0  # sent rows are pruned after a day
# Several nodes: a message taken by one node's sender is not due again for this long
# (a batch is started within seconds; a node that dies leaves it due after this).
OUTBOX_CLAIM_S = 60.0
MARKS_WAIT_S = 1.0  # how long drain and stop wait for the deferred marks to be durable


class OutboxSender:
    """The `NoticeOutbox` of the node (see the module docstring)."""

    def __init__(
        self,
        ledger: UnitOfWork,
        notifier: Notifier,
        clock: Callable[[], datetime],
        *,
        monotonic: Callable[[], float],
        concurrency_max: int = OUTBOX_CONCURRENCY_MAX,
        rate_per_s: float = OUTBOX_RATE_PER_S,
        batch_max: int = OUTBOX_BATCH_MAX,
        retry_delays_s: tuple[float, ...] = OUTBOX_RETRY_DELAYS_S,
        attempts_max: int = OUTBOX_ATTEMPTS_MAX,
        idle_poll_s: float = OUTBOX_IDLE_POLL_S,
        claim_s: float | None = None,
    ) -> None:
        if concurrency_max < 1 or rate_per_s <= 0 or batch_max < 1 or not retry_delays_s:
            raise ValueError("outbox bounds must be positive")
        self.ledger = ledger
        self.notifier = notifier
        self.clock = clock
        self.monotonic = monotonic
        self.concurrency_max = concurrency_max
        self.rate_per_s = rate_per_s
        self.batch_max = batch_max
        self.retry_delays_s = retry_delays_s
        self.attempts_max = attempts_max
        self.idle_poll_s = idle_poll_s
        # Several nodes on one ledger: rows are taken for sending (`outbox_claim_due`)
        # and not due again for `claim_s`, so two nodes never send one message; None
        # (one node): rows are read, as nothing else sends them.
        self.claim = None if claim_s is None else timedelta(seconds=claim_s)
        self._slots = asyncio.Semaphore(concurrency_max)
        self._wake = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        # Rows finished since the last read began: that read may still list them.
        self._finished: set[str] = set()
        # Rows the SMSC took whose mark is not durable yet (`write_later`: it rides in
        # the ledger's next batch): a read meanwhile still lists them, they are skipped.
        self._marking: dict[str, asyncio.Future[bool]] = {}
        self._reading = asyncio.Lock()  # one pass over the due rows at a time
        self._read_all = True  # the last read returned every row due (fewer than batch_max)
        self._next_start = 0.0
        self._task: asyncio.Task[None] | None = None
        self.stats = {"sent": 0, "failed_attempts": 0, "given_up": 0}

    # -- NoticeOutbox -------------------------------------------------------------------

    def put(self, tx: LedgerTx, notice: Notice, now: datetime) -> str:
        return tx.outbox_put(msisdn=notice.msisdn, template=notice.template,
                             params=notice.params, kind=notice.kind,
                             language=notice.language, now=now)

    def wake(self) -> None:
        self._wake.set()

    # -- the background task ------------------------------------------------------------

    def start(self) -> None:
        """Start sending (the rows left unsent by a previous run go first)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop taking rows and cancel the submits in flight: their rows stay unsent
        and go out after the next start."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sending in list(self._in_flight.values()):
            sending.cancel()
        await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
        await self._marks_durable()  # what the SMSC took is not sent again after restart

    async def _marks_durable(self) -> None:
        """Wait (a second at most) for the marks not durable yet: a write of its own
        starts a batch, and the deferred marks ride in it."""
        if not self._marking:
            return
        with contextlib.suppress(Exception):  # a closed ledger: the rows go out again
            await self.ledger.write(_nothing)
        pending = list(self._marking.values())  # the write may have made them all durable
        if pending:
            await asyncio.wait(pending, timeout=MARKS_WAIT_S)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Cleared before the read, not after: a wake that comes while the read runs
            # (a row committed after the read's snapshot) starts the next read at once.
            self._wake.clear()
            try:
                started = await self.send_due()
            except Exception:
                log.exception("outbox_read_failed")
                started = 0
            if started and not self._read_all:
                continue  # the read stopped at batch_max: more rows are due
            # Every row due at the read's snapshot was started (or is in flight); a row
            # committed since woke us. A timer, not wait_for: no task per wait.
            timer = loop.call_later(self.idle_poll_s, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()

    async def send_due(self) -> int:
        """Start sending the rows due now (within the bounds); the number started."""
        async with self._reading:
            return await self._start_due()

    async def _start_due(self) -> int:
        now = self.clock()
        self._finished.clear()
        # On the loop thread (an index range, at most batch_max rows): a reader thread
        # would cost a thread hop and a GIL hand-off for every SMS a loan sends.
        if self.claim is not None:
            until = now + self.claim
            rows = await self.ledger.write(
                lambda tx: tx.outbox_claim_due(now, until, self.batch_max))
        else:
            rows = await self.ledger.read_point(lambda tx: tx.outbox_due(now, self.batch_max))
        self._read_all = len(rows) < self.batch_max
        started = 0
        for row in rows:
            await self._slots.acquire()
            if (row.outbox_id in self._in_flight or row.outbox_id in self._finished
                    or row.outbox_id in self._marking):
                self._slots.release()
                continue
            delay = self._next_start - self.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self._next_start = max(self._next_start, self.monotonic()) + 1.0 / self.rate_per_s
            task = asyncio.get_running_loop().create_task(self._send(row))
            self._in_flight[row.outbox_id] = task
            task.add_done_callback(partial(self._task_done, row.outbox_id))
            started += 1
        return started

    def _task_done(self, outbox_id: str, _task: asyncio.Task[None]) -> None:
        self._done(outbox_id)

    def _done(self, outbox_id: str) -> None:
        self._in_flight.pop(outbox_id, None)
        self._finished.add(outbox_id)
        self._slots.release()

    async def drain(self) -> None:
        """Send everything due now and wait for it, marks included (tests, shutdown of
        a tool)."""
        while await self.send_due() or self._in_flight or self._marking:
            await asyncio.gather(*list(self._in_flight.values()), return_exceptions=True)
            await self._marks_durable()
            if self._marking and not self._in_flight:
                return  # the ledger takes no more writes: those rows go out again later

    async def _send(self, row: OutboxRow) -> None:
        notice = Notice(row.msisdn, row.template, row.params,
                        "ad" if row.kind == "ad" else "sms", row.language,
                        outbox_id=row.outbox_id)
        try:
            await self.notifier.notify(notice)
        except Exception as exc:  # noqa: BLE001 - retried below
            await self._failed(row, exc)
            return
        self.stats["sent"] += 1
        # Not awaited: the mark rides in the ledger's next batch, so a loan's SMS costs
        # no writer operation, savepoint or commit of its own. Until it is durable the
        # row is skipped by the reads (`_marking`); a crash before then sends it again,
        # as a crash between the submit and the mark always could (at least once).
        outbox_id = row.outbox_id
        now = self.clock()
        try:
            marked = self.ledger.write_later(lambda tx: tx.outbox_mark_sent(outbox_id, now))
        except Exception:
            log.exception("outbox_mark_failed", outbox_id=outbox_id)
            return
        self._marking[outbox_id] = marked
        marked.add_done_callback(partial(self._marked, outbox_id))

    def _marked(self, outbox_id: str, marked: asyncio.Future[bool]) -> None:
        self._marking.pop(outbox_id, None)
        self._finished.add(outbox_id)  # a read begun before the commit may list it
        if not marked.cancelled() and (exc := marked.exception()) is not None:
            log.error("outbox_mark_failed", outbox_id=outbox_id, error=repr(exc))

    async def _failed(self, row: OutboxRow, exc: Exception) -> None:
        attempt = row.attempts + 1
        self.stats["failed_attempts"] += 1
        now = self.clock()
        if attempt >= self.attempts_max:
            self.stats["given_up"] += 1
            log.error("outbox_given_up", outbox_id=row.outbox_id, template=row.template,
                      attempts=attempt, error=repr(exc))
            await self.ledger.write(lambda tx: tx.outbox_mark_sent(row.outbox_id, now))
            return
        delay_s = self.retry_delays_s[min(row.attempts, len(self.retry_delays_s) - 1)]
        log.warning("outbox_send_failed", outbox_id=row.outbox_id, template=row.template,
                    attempt=attempt, retry_in_s=delay_s, error=repr(exc))
        at = now + timedelta(seconds=delay_s)
        await self.ledger.write(lambda tx: tx.outbox_retry_later(row.outbox_id, at))

    async def prune(self, kept_s: float = OUTBOX_KEPT_S, limit: int = 1000) -> int:
        """Forget rows sent more than `kept_s` ago (at most `limit`)."""
        before = self.clock() - timedelta(seconds=kept_s)
        return await self.ledger.write(lambda tx: tx.outbox_prune(before, limit))


def _nothing(_tx: LedgerTx) -> None:
    """A unit of work that writes nothing (starts a batch for the deferred ones)."""
