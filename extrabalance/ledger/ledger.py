"""`Ledger`: the async face of the SQLite ledger.

Writes go through the group-commit writer (`write(fn)`: `fn(conn)` runs in a savepoint
of the next batch, on the event-loop thread, and its result is returned once the
batch's COMMIT, on the commit thread, is durable; `write_staged(fn)` returns the result
as soon as `fn` has run, with a future for the durability, for callers whose write can
be redone if it is lost).

Two ways to read, both seeing everything committed (WAL lets them run while the writer
writes):
* `read_point(fn)`: on the event-loop thread, on a connection of its own. For indexed
  point reads (a subscriber's state, one loan): tens of microseconds, less than the
  thread round trip `read` costs.
* `read(fn)`: on a small pool of reader threads. For everything that may scan
  (admin views, totals, paging through subscribers): it never holds the loop.

`Ledger` is the SQLite adapter of the services' unit-of-work port
(`extrabalance.service.unit_of_work.UnitOfWork`): the connection each function is
handed is a `SqliteLedgerTx` (`ledger/sqlite_uow.py`), whose methods are the port's
operations, so a service's `ledger.write(lambda tx: tx.settle_loan(...))` and the older
`ledger.write(lambda conn: store.settle_loan(conn, ...))` run the same way, in the
same batches.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

from extrabalance.ledger import store
from extrabalance.ledger.db import connect
from extrabalance.ledger.views import subscriber_view
from extrabalance.ledger.writer import (
    BATCH_OPS_MAX,
    BATCH_WINDOW_MS,
    WRITE_QUEUE_MAX,
    GroupCommitWriter,
)

if TYPE_CHECKING:
    from extrabalance.ledger.sqlite_uow import SqliteLedgerTx

T = TypeVar("T")

READERS_MAX = 4  # reader connections (threads) per ledger


class Ledger:
    """Open with `Ledger(path)`; close with `await ledger.close()` (or `close_sync`)."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        batch_ops_max: int = BATCH_OPS_MAX,
        batch_window_ms: float = BATCH_WINDOW_MS,
        write_queue_max: int = WRITE_QUEUE_MAX,
        readers_max: int = READERS_MAX,
    ) -> None:
        self.path = str(path)
        self._synchronous = synchronous
        # The writer applies migrations before it accepts work.
        self.writer = GroupCommitWriter(
            path,
            synchronous=synchronous,
            batch_ops_max=batch_ops_max,
            batch_window_ms=batch_window_ms,
            write_queue_max=write_queue_max,
        )
        self._readers = ThreadPoolExecutor(
            max_workers=readers_max, thread_name_prefix="ledger-reader"
        )
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._point_conn: SqliteLedgerTx | None = None

    async def write(self, fn: Callable[[SqliteLedgerTx], T]) -> T:
        """Run `fn(conn)` atomically in the next group commit; return once durable."""
        return await self.writer.submit(fn)

    async def write_staged(
        self, fn: Callable[[SqliteLedgerTx], T]
    ) -> tuple[T, asyncio.Future[T]]:
        """Run `fn(conn)` in the next group commit; return its result once it has run,
        with a future that resolves when it is durable (see `submit_staged`)."""
        return await self.writer.submit_staged(fn)

    def write_later(self, fn: Callable[[SqliteLedgerTx], T]) -> asyncio.Future[T]:
        """Run `fn(conn)` in the next group commit that runs anyway (at most a quarter
        of a second later); the future resolves once durable (see `submit_later`)."""
        return self.writer.submit_later(fn)

    async def read_point(self, fn: Callable[[SqliteLedgerTx], T]) -> T:
        """Run `fn(conn)` at once on the event-loop thread (sees everything committed).

        Only for reads bounded by an index lookup: the loop waits for it.
        """
        conn = self._point_conn
        if conn is None:
            conn = self._point_conn = _connect_tx(self.path, self._synchronous)
        return fn(conn)

    async def read(self, fn: Callable[[SqliteLedgerTx], T]) -> T:
        """Run `fn(conn)` on a reader connection (sees everything committed)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._read, fn)

    def _read(self, fn: Callable[[SqliteLedgerTx], T]) -> T:
        conn: SqliteLedgerTx | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect_tx(self.path, self._synchronous)
            self._local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        return fn(conn)

    def read_sync(self, fn: Callable[[SqliteLedgerTx], T]) -> T:
        """Blocking read, for callers outside the event loop (admin commands)."""
        return self._readers.submit(self._read, fn).result()

    # -- reads the admin command and the router use --------------------------------

    async def subscriber_view(self, msisdn: str) -> dict[str, Any]:
        return await self.read(lambda conn: subscriber_view(conn, msisdn))

    async def learned_route(self, msisdn: str) -> str | None:
        return await self.read_point(lambda conn: store.learned_route(conn, msisdn))

    async def account_totals(self) -> dict[str, int]:
        return await self.read(store.account_totals)

    # -- shutdown --------------------------------------------------------------------

    def close_sync(self) -> None:
        """Blocking close, for callers outside the ledger's event loop."""
        self.writer.close()
        self._close_readers()

    def _close_readers(self) -> None:
        self._readers.shutdown(wait=True)
        with self._lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
            if self._point_conn is not None:
                self._point_conn.close()
                self._point_conn = None

    async def close(self) -> None:
        """Commit what is queued, then close every connection."""
        await self.writer.aclose()
        await asyncio.to_thread(self._close_readers)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _connect_tx(path: str, synchronous: str) -> SqliteLedgerTx:
    # db.connect's default connection class is SqliteLedgerTx (the port's operations).
    return cast("SqliteLedgerTx", connect(path, synchronous=synchronous))
