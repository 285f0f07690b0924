"""The one writer: a dedicated thread that owns the write connection and commits
many operations per transaction (group commit).

Why: with `synchronous=FULL` every COMMIT waits for an fsync, which costs about as
much as a thousand inserts. Batching the operations that arrive while the previous
fsync runs turns one fsync per loan into one fsync per batch, with no added latency
under light load (a lone operation is committed at once).

Each operation runs inside its own SAVEPOINT: an operation that raises is rolled
back alone and its caller gets the exception; the others in the batch commit. A
caller's future is resolved only after the COMMIT returned, so "awaited" means
"durable".

Costs kept off the per-operation path: the callers of one batch are woken with one
call into their event loop (not one each); WAL checkpoints (copying committed pages
from the WAL into the database file, with their own fsyncs) run on a second thread
and connection, so a commit waits for its own fsync only. Checkpointing never
affects what is durable: a transaction is durable once its WAL frames are synced.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from extrabalance.ledger.db import connect, migrate

T = TypeVar("T")

BATCH_OPS_MAX = 512  # operations per transaction
BATCH_WINDOW_MS = 2.0  # how long to wait for more operations once one is queued
WRITE_QUEUE_MAX = 10_000  # operations submitted and not yet committed (backpressure)
WRITER_CACHE_KIB = 131_072  # the writer's page cache: a batch's dirty pages and the
# upper levels of every index stay in memory between batches
CHECKPOINT_WAL_BYTES = 64 << 20  # WAL size that wakes the checkpointer
WAL_BYTES_MAX = 1 << 30  # past this the writer checkpoints itself before the next batch
# (the checkpointer fell behind, or readers kept it from finishing): bounds the WAL


class LedgerClosed(RuntimeError):
    pass


@dataclass(slots=True)
class _Op:
    fn: Callable[[Any], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


_STOP = object()


class GroupCommitWriter:
    """Runs `fn(conn)` callables in batched transactions on a private thread."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        batch_ops_max: int = BATCH_OPS_MAX,
        batch_window_ms: float = BATCH_WINDOW_MS,
        write_queue_max: int = WRITE_QUEUE_MAX,
    ) -> None:
        self.path = str(path)
        self.batch_ops_max = batch_ops_max
        self.batch_window_ms = batch_window_ms
        self.write_queue_max = write_queue_max
        self._queue: queue.Queue[_Op | object] = queue.Queue(maxsize=write_queue_max)
        self._slots = asyncio.Semaphore(write_queue_max)
        self._closed = False
        self._synchronous = synchronous
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self.batches_committed = 0
        self.ops_committed = 0
        self.checkpoints = 0
        self._wal_path = f"{self.path}-wal"
        self._checkpoint_wanted = threading.Event()
        self._checkpoint_stop = False
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="ledger-checkpoint", daemon=True
        )
        self._checkpointer.start()

    async def submit(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(conn)` in the next batch; returns its result once committed."""
        if self._closed:
            raise LedgerClosed("ledger is closed")
        async with self._slots:  # bounds work in flight: callers wait, nothing is dropped
            loop = asyncio.get_running_loop()
            future: asyncio.Future[T] = loop.create_future()
            self._queue.put(_Op(fn, loop, future))
            return await future

    def close(self) -> None:
        """Finish what is queued, commit, and stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        self._checkpoint_stop = True
        self._checkpoint_wanted.set()
        self._checkpointer.join()

    # -- writer thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            conn = connect(self.path, synchronous=self._synchronous, cache_kib=WRITER_CACHE_KIB)
            migrate(conn)
            # Checkpoints are the checkpointer thread's job (see the module docstring).
            conn.execute("PRAGMA wal_autocheckpoint=0")
        except BaseException as exc:  # noqa: BLE001 - surfaced to the constructor
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch: list[_Op] = [first]  # type: ignore[list-item]
                stop = self._fill(batch)
                self._commit(conn, batch)
                if stop:
                    return
                self._after_commit(conn)
        finally:
            conn.close()

    def _wal_bytes(self) -> int:
        try:
            return os.stat(self._wal_path).st_size
        except OSError:
            return 0

    def _after_commit(self, conn: Any) -> None:
        wal_bytes = self._wal_bytes()
        if wal_bytes >= CHECKPOINT_WAL_BYTES:
            self._checkpoint_wanted.set()
        if wal_bytes >= WAL_BYTES_MAX:
            # Blocking checkpoint, then restart the WAL from its start (waits up to the
            # busy timeout for readers of old snapshots to finish).
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(RESTART)")
                self.checkpoints += 1

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

    def _fill(self, batch: list[_Op]) -> bool:
        """Take what is already queued, waiting up to the batch window for more."""
        deadline = time.monotonic() + self.batch_window_ms / 1000
        while len(batch) < self.batch_ops_max:
            try:
                remaining = deadline - time.monotonic()
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            batch.append(item)  # type: ignore[arg-type]
        return False

    def _commit(self, conn: Any, batch: list[_Op]) -> None:
        results: list[tuple[_Op, bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                conn.execute("SAVEPOINT op")
                try:
                    value = op.fn(conn)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    conn.execute("ROLLBACK TO SAVEPOINT op")
                    conn.execute("RELEASE SAVEPOINT op")
                    results.append((op, False, exc))
                else:
                    conn.execute("RELEASE SAVEPOINT op")
                    results.append((op, True, value))
            conn.execute("COMMIT")
        except BaseException as exc:  # noqa: BLE001 - the whole batch failed
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            _resolve_all([(op, False, exc) for op in batch])
            return
        self.batches_committed += 1
        self.ops_committed += len(batch)
        _resolve_all(results)


def _resolve_all(results: list[tuple[_Op, bool, Any]]) -> None:
    """Wake the callers of a batch: one call into each event loop, not one per op
    (each `call_soon_threadsafe` writes to the loop's wake-up pipe)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Op, bool, Any]]] = {}
    for item in results:
        by_loop.setdefault(item[0].loop, []).append(item)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, items)
        except RuntimeError:  # the caller's loop is gone (shutdown); nothing to tell
            pass


def _settle(items: list[tuple[_Op, bool, Any]]) -> None:
    for op, ok, value in items:
        if op.future.done():  # the caller was cancelled; the work is committed anyway
            continue
        if ok:
            op.future.set_result(value)
        else:
            op.future.set_exception(value)
