"""The one writer: batched write transactions (group commit) run on the event-loop
thread, with only the COMMIT handed to a thread of its own.

Why group commit: with `synchronous=FULL` every COMMIT waits for an fsync, which
costs about as much as a thousand inserts. Batching the operations that arrive while
the previous fsync runs turns one fsync per loan into one fsync per batch.

Why on the event-loop thread: a ledger operation is a few indexed statements and some
Python (tens to a few hundred microseconds). Run on a writer thread, every one of them
needs the GIL back from the busy event loop (which hands it over only every switch
interval, 5 ms) and every result needs a wake-up of the loop; the writer thread was
measured starved (busy 73 % of the time, holding the GIL 8 %). On the loop thread an
operation is a plain call and its caller's future is set directly. The COMMIT is the
only long wait, and SQLite releases the GIL while it writes and fsyncs the WAL, so it
goes to the commit thread; the loop serves the network meanwhile.

Rules that keep it exactly-once:
* one write connection, one transaction at a time: the next batch starts only after
  the previous COMMIT returned (the loop never touches the connection while the
  commit thread has it);
* each operation but a batch's first runs inside its own SAVEPOINT: an operation that
  raises is rolled back alone and its caller gets the exception; the others in the
  batch commit. The first needs none: when it raises, the transaction holds nothing
  else and is rolled back whole (two SQL statements fewer per batch; a batch of one,
  the usual case below saturation, runs its operation and nothing more);
* a caller's future is resolved only after the COMMIT returned, so "awaited" means
  "durable". A failed COMMIT rolls the whole batch back and every caller gets the
  error.

The loop is never held for long: a batch runs at most `LOOP_SLICE_OPS` operations
before it yields to the loop (the transaction stays open; operations that arrive
meanwhile join it) and at most `batch_ops_max` operations per transaction. Waiting for
SQLite's write lock (another process, e.g. a profile import, holds it) happens on the
commit thread, never on the loop.

WAL checkpoints (copying committed pages from the WAL into the database file, with
their own fsyncs) run on a checkpointer thread and connection, so a commit waits for
its own fsync only. Checkpointing never affects what is durable: a transaction is
durable once its WAL frames are synced.

The WAL file's size is what wakes the checkpointer, so it has to measure what was
written since the WAL last started over. SQLite does not shrink the file by itself:
once every frame has been checkpointed, the next transaction writes over the file
from its start, and a file that once reached the threshold (a profile import, an hour
of traffic) would keep that size and wake the checkpointer after every commit for
good, two more fsyncs per commit beside the commit's own. The writer therefore sets
`journal_size_limit`: at the first commit after the WAL starts over, SQLite cuts the
file back to half the threshold (below that it writes over the file rather than
growing it, which spares an fsync of the file's length). Checkpoints then run only
while the WAL holds more than the threshold; each commit in that state asks for
another, so one soon ends between two commits and lets the WAL start over (a lone
checkpoint racing a steady stream of commits never catches up).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from extrabalance.ledger.db import BUSY_TIMEOUT_MS, connect, migrate

T = TypeVar("T")

BATCH_OPS_MAX = 512  # operations per transaction
BATCH_WINDOW_MS = 2.0  # how long a batch stays open for more operations after its first
LOOP_SLICE_OPS = 32  # operations run on the loop before it is given back for one turn
# (a few milliseconds at most: the network is never stalled by a long batch)
WRITE_QUEUE_MAX = 10_000  # operations submitted and not yet committed (backpressure)
WRITER_CACHE_KIB = 131_072  # the writer's page cache: a batch's dirty pages and the
# upper levels of every index stay in memory between batches
CHECKPOINT_WAL_BYTES = 64 << 20  # WAL size that wakes the checkpointer
WAL_BYTES_MAX = 1 << 30  # past this the commit thread checkpoints itself after a commit
# (the checkpointer fell behind, or readers kept it from finishing): bounds the WAL
LATER_FLUSH_S = 0.25  # a deferred operation (`submit_later`) waits at most this long for
# a batch to ride in before it starts one of its own


class LedgerClosed(RuntimeError):
    pass


@dataclass(slots=True)
class _Op:
    fn: Callable[[Any], Any]
    future: asyncio.Future[Any]  # resolved once the batch is durable
    ran: asyncio.Future[Any] | None = None  # staged writes: resolved once `fn` has run


class GroupCommitWriter:
    """Runs `fn(conn)` callables in batched transactions on the caller's event loop;
    the COMMIT (fsync) runs on a private thread."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        batch_ops_max: int = BATCH_OPS_MAX,
        batch_window_ms: float = BATCH_WINDOW_MS,
        write_queue_max: int = WRITE_QUEUE_MAX,
        loop_slice_ops: int = LOOP_SLICE_OPS,
        checkpoint_wal_bytes: int = CHECKPOINT_WAL_BYTES,
        later_flush_s: float = LATER_FLUSH_S,
    ) -> None:
        self.path = str(path)
        self.batch_ops_max = batch_ops_max
        self.batch_window_ms = batch_window_ms
        self.write_queue_max = write_queue_max
        self.loop_slice_ops = max(1, loop_slice_ops)
        self._synchronous = synchronous
        self.checkpoint_wal_bytes = checkpoint_wal_bytes
        conn = connect(self.path, synchronous=synchronous, cache_kib=WRITER_CACHE_KIB)
        try:
            migrate(conn)
            # Checkpoints are the checkpointer thread's job (see the module docstring).
            conn.execute("PRAGMA wal_autocheckpoint=0")
            # ... and the WAL file's size says how much awaits one (module docstring).
            conn.execute(f"PRAGMA journal_size_limit={checkpoint_wal_bytes // 2}")
            # Each operation's SAVEPOINT keeps the pages it changes in a statement
            # journal, which SQLite spills to a temporary file past 64 KiB: a batch
            # then opened and deleted a file and paid a pwrite() for every page every
            # operation touched (about 20 system calls per USSD loan, on the loop
            # thread). In memory it is a copy; it lives as long as one batch.
            conn.execute("PRAGMA temp_store=MEMORY")
            # The loop never waits for the write lock: BEGIN fails at once when another
            # connection holds it, and the commit thread does the waiting.
            conn.execute("PRAGMA busy_timeout=0")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._pending: collections.deque[_Op] = collections.deque()
        # Deferred operations (`submit_later`): they join the next batch, in one savepoint
        # together, or start one after `later_flush_s`.
        self._later: list[_Op] = []
        self._later_timer: asyncio.TimerHandle | None = None
        self.later_flush_s = later_flush_s
        self._slots = asyncio.Semaphore(write_queue_max)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._more: asyncio.Future[None] | None = None  # set when an op arrives
        self._closed = False
        self._conn_closed = False
        self.batches_committed = 0
        self.ops_committed = 0
        self.checkpoints = 0
        self.commit_seconds = 0.0  # time in COMMIT (WAL write + fsync), for benchmarks
        self._wal_path = f"{self.path}-wal"
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-commit")
        self._checkpoint_wanted = threading.Event()
        self._checkpoint_stop = False
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="ledger-checkpoint", daemon=True
        )
        self._checkpointer.start()

    async def submit(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(conn)` in the next batch; returns its result once committed."""
        async with self._slots:  # bounds work in flight: callers wait, nothing is dropped
            future: asyncio.Future[T] = self._enqueue(fn, staged=False)[0]
            return await future

    async def submit_staged(self, fn: Callable[[Any], T]) -> tuple[T, asyncio.Future[T]]:
        """Run `fn(conn)` in the next batch and return its result as soon as it has run,
        before the batch is durable, with a future that resolves once it is (or raises
        if the batch is rolled back).

        For a caller that may act on the result before the fsync because losing the
        write is recoverable: a later operation on this writer already sees it (same
        connection, same or later batch), and if the batch never commits (crash,
        failed COMMIT), it is as if `fn` never ran.
        """
        await self._slots.acquire()  # released when the write is durable (or lost)
        try:
            durable, ran = self._enqueue(fn, staged=True)
        except BaseException:
            self._slots.release()
            raise
        durable.add_done_callback(self._staged_done)
        assert ran is not None
        return await asyncio.shield(ran), durable

    def submit_later(self, fn: Callable[[Any], T]) -> asyncio.Future[T]:
        """Run `fn(conn)` in the next batch that runs for another reason, or in one of
        its own after `later_flush_s`; the future resolves once that batch is durable.

        For writes of one statement that nobody waits on and nothing else is ordered
        against (marking an SMS sent): they cost no batch, COMMIT or fsync of their own
        while other work flows, and no savepoint (see `_run_later`). A deferred
        operation may run after operations submitted after it."""
        loop = self._open_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._later.append(_Op(fn, future))
        if len(self._later) >= self.loop_slice_ops:
            self._flush_later()
        elif self._drain_task is None and self._later_timer is None:
            self._later_timer = loop.call_later(self.later_flush_s, self._flush_later)
        return future

    def _flush_later(self) -> None:
        """The deferred operations become ordinary ones (a batch starts if none runs)."""
        if self._later_timer is not None:
            self._later_timer.cancel()
            self._later_timer = None
        if not self._later or self._loop is None or self._loop.is_closed():
            return
        self._pending.extend(self._later)
        self._later.clear()
        self._start_or_wake(self._loop)

    def _open_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, which the writer serves from now on; refused once closed."""
        if self._closed:
            raise LedgerClosed("ledger is closed")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        return loop

    def _start_or_wake(self, loop: asyncio.AbstractEventLoop) -> None:
        """Operations are pending: start the batch loop, or wake the open batch."""
        if self._drain_task is None:
            self._drain_task = loop.create_task(self._drain(loop), name="ledger-writer")
        elif self._more is not None and not self._more.done():
            self._more.set_result(None)

    def _run_later(self, conn: sqlite3.Connection, batch: list[tuple[_Op, bool, Any]]) -> None:
        """The deferred operations, after the batch's own, without a savepoint: each
        writes with one statement (`submit_later`), and a statement that fails is undone
        by SQLite itself, so the operation fails alone. One that wrote before it raised
        cannot be undone alone: the whole batch is then rolled back."""
        ops, self._later = self._later, []
        if self._later_timer is not None:
            self._later_timer.cancel()
            self._later_timer = None
        for i, op in enumerate(ops):
            changes = conn.total_changes
            try:
                value = op.fn(conn)
            except Exception as exc:
                if conn.total_changes != changes or not conn.in_transaction:
                    # Half written, or SQLite ended the transaction: the batch fails
                    # (its callers hear it); the deferred ones not run wait for the next.
                    batch.append((op, False, exc))
                    self._later[:0] = ops[i + 1:]
                    raise
                batch.append((op, False, exc))
                continue
            batch.append((op, True, value))

    def _enqueue(
        self, fn: Callable[[Any], T], *, staged: bool
    ) -> tuple[asyncio.Future[T], asyncio.Future[T] | None]:
        loop = self._open_loop()
        future: asyncio.Future[T] = loop.create_future()
        ran: asyncio.Future[T] | None = loop.create_future() if staged else None
        self._pending.append(_Op(fn, future, ran))
        self._start_or_wake(loop)
        return future, ran

    def _staged_done(self, durable: asyncio.Future[Any]) -> None:
        self._slots.release()
        if not durable.cancelled():
            durable.exception()  # the caller may not await it: never "never retrieved"

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The writer serves one event loop at a time (tests and CLI commands open a
        new loop per run); it moves to a new loop only when idle or its loop is gone."""
        old = self._loop
        if self._drain_task is not None and old is not None and not old.is_closed():
            raise RuntimeError("the ledger writer is busy on another event loop")
        self._drain_task = None
        self._more = None
        self._pending.clear()  # futures of a closed loop: nobody can await them
        self._later.clear()
        self._later_timer = None
        self._loop = loop

    async def aclose(self) -> None:
        """Commit what is queued, then stop the commit and checkpoint threads."""
        if self._closed:
            return
        self._closed = True
        if asyncio.get_running_loop() is self._loop:
            self._flush_later()  # deferred operations are committed like the rest
        task = self._drain_task
        if task is not None and asyncio.get_running_loop() is self._loop:
            await asyncio.shield(task)
        await asyncio.to_thread(self._shutdown)

    def close(self) -> None:
        """Blocking close, for callers outside the writer's event loop."""
        if self._closed:
            return
        loop = self._loop
        busy = self._drain_task is not None and loop is not None and not loop.is_closed()
        if busy:
            assert loop is not None
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                raise RuntimeError("use `await aclose()` on the writer's event loop")
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(self.aclose(), loop).result()
                return
        self._closed = True
        self._shutdown()

    def _shutdown(self) -> None:
        self._committer.shutdown(wait=True)
        self._checkpoint_stop = True
        self._checkpoint_wanted.set()
        self._checkpointer.join()
        if not self._conn_closed:
            self._conn_closed = True
            self._conn.close()

    # -- the batch loop (event-loop thread) -----------------------------------------

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Runs while operations are pending: one transaction after another."""
        try:
            while self._pending:
                await self._one_batch(loop)
        finally:
            self._drain_task = None
            self._more = None
            if self._later and self._later_timer is None and not loop.is_closed():
                # Deferred while the last COMMIT ran: they wait for the next batch.
                self._later_timer = loop.call_later(self.later_flush_s, self._flush_later)

    async def _one_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        conn = self._conn
        pending = self._pending
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            # Another connection holds the write lock: wait for it off the loop.
            try:
                await loop.run_in_executor(self._committer, _begin_waiting, conn)
            except Exception as exc:  # noqa: BLE001 - still locked: these callers fail
                for _ in range(min(self.batch_ops_max, len(pending))):
                    op = pending.popleft()
                    if op.ran is not None and not op.ran.done():
                        op.ran.set_exception(exc)
                    if not op.future.done():
                        op.future.set_exception(exc)
                return
        batch: list[tuple[_Op, bool, Any]] = []
        committing = False
        try:
            deadline = loop.time() + self.batch_window_ms / 1000
            while True:
                room = self.batch_ops_max - len(batch)
                for _ in range(min(room, self.loop_slice_ops, len(pending))):
                    op = pending.popleft()
                    if not batch:
                        # The first operation needs no SAVEPOINT: the transaction holds
                        # nothing else, so rolling it back is rolling back the operation.
                        try:
                            value = op.fn(conn)
                        except BaseException as exc:  # noqa: BLE001 - handed to the caller
                            self._rollback()
                            if op.ran is not None and not op.ran.done():
                                op.ran.set_exception(exc)
                            if not op.future.done():
                                op.future.set_exception(exc)
                            return  # nothing to commit; _drain begins the next batch
                        batch.append((op, True, value))
                        if op.ran is not None and not op.ran.done():
                            op.ran.set_result(value)
                        continue
                    batch.append(_in_savepoint(conn, op))
                if self._later and batch:
                    self._run_later(conn, batch)
                if len(batch) >= self.batch_ops_max:
                    break
                if pending:
                    await asyncio.sleep(0)  # one loop turn for the network, then go on
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0 or self._closed:
                    break
                # Stay open for more operations until the window closes.
                more = self._more = loop.create_future()
                timer = loop.call_later(remaining, _wake, more)
                try:
                    await more
                finally:
                    timer.cancel()
                    self._more = None
            committing = True
            await loop.run_in_executor(self._committer, self._commit_and_check, conn)
        except asyncio.CancelledError:
            # The loop is shutting down. A COMMIT already on the commit thread finishes
            # there (whether it did is for the resolver to find out); otherwise nothing
            # of this batch is written.
            if not committing:
                self._rollback()
                for op, _, _ in batch:
                    if not op.future.done():
                        op.future.set_exception(LedgerClosed("ledger writer stopped"))
            raise
        except Exception as exc:  # noqa: BLE001 - the whole batch failed
            self._rollback()
            for op, _, _ in batch:
                if not op.future.done():
                    op.future.set_exception(exc)
            return
        self.batches_committed += 1
        self.ops_committed += len(batch)
        for op, ok, value in batch:
            if op.future.done():  # the caller was cancelled; the work is committed anyway
                continue
            if ok:
                op.future.set_result(value)
            else:
                op.future.set_exception(value)

    def _rollback(self) -> None:
        conn = self._conn
        if not self._conn_closed and conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    # -- commit thread ---------------------------------------------------------------

    def _commit_and_check(self, conn: sqlite3.Connection) -> None:
        started = time.perf_counter()
        conn.execute("COMMIT")  # SQLite releases the GIL while it writes and fsyncs
        self.commit_seconds += time.perf_counter() - started
        try:
            wal_bytes = os.stat(self._wal_path).st_size
        except OSError:
            return
        if wal_bytes >= self.checkpoint_wal_bytes:
            self._checkpoint_wanted.set()
        if wal_bytes >= WAL_BYTES_MAX:
            # Blocking checkpoint, then restart the WAL from its start; waits for
            # readers of old snapshots (the loop goes on serving the network).
            _set_busy_timeout(conn, BUSY_TIMEOUT_MS)
            try:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(RESTART)")
                    self.checkpoints += 1
            finally:
                _set_busy_timeout(conn, 0)

    # -- checkpointer thread -------------------------------------------------------

    def _checkpoint_loop(self) -> None:
        """PASSIVE checkpoints on a connection of their own: they copy what the WAL
        holds into the database file while the writer goes on appending."""
        try:
            conn = connect(self.path, synchronous=self._synchronous, cache_kib=1_024)
        except sqlite3.Error:
            return  # the writer's own bound (WAL_BYTES_MAX) still holds
        try:
            while True:
                self._checkpoint_wanted.wait()
                self._checkpoint_wanted.clear()
                if self._checkpoint_stop:
                    return
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    self.checkpoints += 1
        finally:
            conn.close()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _set_busy_timeout(conn: sqlite3.Connection, timeout_ms: int) -> None:
    conn.execute(f"PRAGMA busy_timeout={int(timeout_ms)}")


def _begin_waiting(conn: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE, waiting up to the busy timeout for the write lock (commit
    thread: the loop goes on meanwhile)."""
    _set_busy_timeout(conn, BUSY_TIMEOUT_MS)
    try:
        conn.execute("BEGIN IMMEDIATE")
    finally:
        _set_busy_timeout(conn, 0)


def _in_savepoint(conn: sqlite3.Connection, op: _Op) -> tuple[_Op, bool, Any]:
    """Run a batch's second or later operation inside its own SAVEPOINT: when it
    raises, only its own writes are undone and the batch goes on."""
    conn.execute("SAVEPOINT op")
    try:
        value = op.fn(conn)
    except BaseException as exc:  # noqa: BLE001 - handed to the caller
        conn.execute("ROLLBACK TO SAVEPOINT op")
        conn.execute("RELEASE SAVEPOINT op")
        if op.ran is not None and not op.ran.done():
            op.ran.set_exception(exc)
        return op, False, exc
    conn.execute("RELEASE SAVEPOINT op")
    if op.ran is not None and not op.ran.done():
        op.ran.set_result(value)
    return op, True, value
