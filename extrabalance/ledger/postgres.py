"""The PostgreSQL adapter of the unit-of-work port (`extrabalance.service.unit_of_work`).

What this file owns: `PostgresLedger` (the `UnitOfWork`: a bounded pool of psycopg 3
connections, each unit of work on a pool thread in a transaction of its own),
`PostgresLedgerTx` (the `LedgerTx`: the business SQL of `store.py` and `ads_store.py`
run over a psycopg connection, placeholders translated), the subscriber lock that
serialises one subscriber's units of work across every node sharing the database,
and the migration runner for PostgreSQL.

Why psycopg 3 and threads: the port's units are plain synchronous functions, so they
run unchanged on a pool thread over a synchronous connection; measured against asyncpg
on the same loan-intent transaction psycopg was the faster (docs/ledger.md
"PostgreSQL", `bench/pg_driver.py`).

Serialisation. Inside one node `SubscriberLocks` orders one subscriber's work; across
nodes the database must. In a write unit, the first operation that names a subscriber
(directly, or through a loan, recovery or request key of his) takes
`SELECT 1 FROM subscribers WHERE msisdn = %s FOR UPDATE`. A subscriber without a row
yet has nothing to lock, so then a transaction-scoped advisory lock on his MSISDN's
hash is taken first and the row lock tried again: a unit that creates the row holds the
advisory lock until it commits, and every later unit finds the row. Units read at READ
COMMITTED, so whatever they read after the lock is the latest committed state.

Retries. A unit that deadlocks (two subscribers locked in opposite orders) or hits a
serialization failure is rolled back and run again from the start, up to
`RETRIES_MAX` times: `fn` must have no effect outside its `LedgerTx` (true of every
service's unit). A unit whose connection breaks while its COMMIT is on the way is not
retried: the COMMIT may or may not have happened, and the caller's saga (the resolver)
settles it like any unknown. One whose connection breaks before the COMMIT was sent
cannot have committed (the server rolls back a transaction whose client is gone): it
runs again on another connection — a connection left idle in the pool across a
server restart fails so on its first statement.

The server going away (docs/reliability.md "PostgreSQL restarts"). A broken connection
marks the ledger down: units then wait `DOWN_CHECKOUT_S` at most for a connection and
fail (`PoolTimeout`, a `psycopg.OperationalError`: the protocols' error answer) instead
of queueing for `CONNECT_TIMEOUT_S`, and a probe thread tries the server every
`PROBE_INTERVAL_S`. Its first success replaces the pool with a new one (the old pool's
connections, all dead, are closed as they come back), so the node is back at once
rather than after the pool's own exponential reconnect backoff.

`write_staged` is `write`: the answer waits for the commit (the server's own commit
batches concurrent transactions; no group commit in the node).
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Self, TypeVar

import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from extrabalance.clock import SYSTEM_CLOCK
from extrabalance.core.model import SubscriberProfile
from extrabalance.core.sagas import SAGA_LEASE_S
from extrabalance.ledger import adjustments, ads_store, db, outbox_store, store

if TYPE_CHECKING:
    from extrabalance.service.unit_of_work import LedgerTx

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")

DIALECT = "postgresql"
POOL_MAX = 8  # connections (and threads) per node
POOL_MIN = 1
RETRIES_MAX = 20  # a unit rolled back by a deadlock or serialization failure: runs again
RETRY_PAUSE_MAX_S = 0.02  # random pause before a retry, so two losers do not collide again
CONNECT_TIMEOUT_S = 10.0
DOWN_CHECKOUT_S = 0.5  # while the server is unreachable: a unit waits this long at most
PROBE_INTERVAL_S = 0.25  # while unreachable: how often the probe tries the server
PROBE_CONNECT_TIMEOUT_S = 2  # one probe's connect (whole seconds: libpq's unit)
_RETRYABLE = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)
# Advisory lock keys: a subscriber's is hashtextextended(msisdn, 0); the migration
# runner's is this constant (class 0x4542 'EB', far from any hash by chance alone).
MIGRATION_LOCK_KEY = 0x4542_0000_0000_0001

_SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
_LOCK_ROW = "SELECT 1 FROM subscribers WHERE msisdn = %s FOR UPDATE"
_LOCK_NEW = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
# The owner of a loan / recovery and his row lock in one round trip (a subscriber who
# has a loan or a recovery has a row: both inserts ensure it).
_OWNER_SQL = {
    kind: (f"SELECT s.msisdn FROM {table} x JOIN subscribers s ON s.msisdn = x.msisdn"
           f" WHERE x.{column} = %s FOR UPDATE OF s")
    for kind, table, column in (
        ("loan", "loans", "loan_id"),
        ("loan_key", "loans", "idempotency_key"),
        ("recovery", "recoveries", "recovery_id"),
        ("event", "recoveries", "event_id"),
    )
}

# A loan read with its owner's row lock in one round trip (the settlement's first
# read). The loan row is locked too (FOR NO KEY UPDATE, as the UPDATE that follows
# takes): a statement that waited for a lock sees the latest version of the rows it
# locked only, so without it the loan could be read as it was before the wait.
_LOAN_LOCKED = (
    "SELECT " + ", ".join(f"x.{c.strip()}" for c in store.LOAN_COLUMNS.split(","))
    + " FROM loans x JOIN subscribers s ON s.msisdn = x.msisdn WHERE x.loan_id = %s"
    " FOR UPDATE OF s FOR NO KEY UPDATE OF x"
)

# -- placeholders --------------------------------------------------------------------

_QUOTED_OR_MARK = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?|%")
_translated: dict[str, str] = {}


def to_pyformat(sql: str) -> str:
    """The store's `?` placeholders as psycopg's `%s` (a literal `%` doubled), leaving
    quoted text alone. Cached: the business SQL is a few dozen fixed strings."""
    out = _translated.get(sql)
    if out is None:

        def swap(m: re.Match[str]) -> str:
            token = m.group(0)
            return "%s" if token == "?" else "%%" if token == "%" else token

        out = _translated[sql] = _QUOTED_OR_MARK.sub(swap, sql)
    return out


# A small batch of rows for one INSERT ... VALUES (?, ...) goes as one statement of
# that many row groups: psycopg's executemany would send a statement per row in pipeline
# mode, whose entry, exit and per-row bookkeeping cost the client more than the rows.
MULTI_ROW_MAX = 16
_INSERT_VALUES = re.compile(r"(INSERT\s.*?\sVALUES\s*)(\((?:\s*\?\s*,)*\s*\?\s*\))(.*)",
                            re.DOTALL | re.IGNORECASE)
_multi_row: dict[tuple[str, int], str | None] = {}


def multi_row_insert(sql: str, rows: int) -> str | None:
    """`sql` (one `INSERT ... VALUES (?, ...)` [tail]) with `rows` row groups, as
    psycopg SQL; None for any other statement. Cached per (text, rows)."""
    key = (sql, rows)
    if key not in _multi_row:
        m = _INSERT_VALUES.fullmatch(sql.strip())
        tail = None if m is None else to_pyformat(m.group(3))
        _multi_row[key] = None if m is None or tail is None or "%s" in tail else (
            to_pyformat(m.group(1) + ", ".join([m.group(2)] * rows)) + tail)
    return _multi_row[key]


# -- the transaction object ----------------------------------------------------------


def _op(fn: Callable[Concatenate[Any, P], R]) -> Callable[Concatenate[PostgresLedgerTx, P], R]:
    """A store function as a method: called with the transaction as its connection."""

    def method(self: PostgresLedgerTx, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return fn(self, *args, **kwargs)

    method.__name__ = fn.__name__
    method.__doc__ = fn.__doc__
    return method


def _by_msisdn(
    fn: Callable[Concatenate[Any, str, P], R],
) -> Callable[Concatenate[PostgresLedgerTx, str, P], R]:
    """A store function whose first argument is the subscriber: lock him first."""

    def method(self: PostgresLedgerTx, msisdn: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
        self.lock_subscriber(msisdn)
        return fn(self, msisdn, *args, **kwargs)

    method.__name__ = fn.__name__
    method.__doc__ = fn.__doc__
    return method


def _by_owner(
    kind: str, fn: Callable[Concatenate[Any, str, P], R]
) -> Callable[Concatenate[PostgresLedgerTx, str, P], R]:
    """A store function whose first argument names a loan or recovery (or its request
    key or event): lock the subscriber it belongs to first."""

    def method(self: PostgresLedgerTx, key: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
        self.lock_owner(kind, key)
        return fn(self, key, *args, **kwargs)

    method.__name__ = fn.__name__
    method.__doc__ = fn.__doc__
    return method


class PostgresLedgerTx:
    """One unit of work's transaction (see the module docstring). `execute` and
    `executemany` take the store's SQLite-style SQL, so `store.py` runs unchanged."""

    def __init__(self, conn: psycopg.Connection[Any], *, writable: bool,
                 owner_node: str | None = None,
                 lease: timedelta = timedelta(seconds=SAGA_LEASE_S)) -> None:
        self.conn = conn
        self.writable = writable
        self.owner_node = owner_node  # the node a new saga is leased to (None: nobody)
        self.lease = lease
        self._locked: set[str] = set()
        self._owners: dict[tuple[str, str], str] = {}

    # -- the connection as store.py uses it -----------------------------------------

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        if params:
            return self.conn.execute(to_pyformat(sql), params)
        return self.conn.execute(sql)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> psycopg.Cursor[Any]:
        batch = list(rows)
        if 1 < len(batch) <= MULTI_ROW_MAX:
            many = multi_row_insert(sql, len(batch))
            if many is not None:  # one statement, one round trip (a journal entry's lines)
                return self.conn.execute(many, [v for row in batch for v in row])
        cur = self.conn.cursor()
        cur.executemany(to_pyformat(sql), batch)
        return cur

    # -- the subscriber lock ---------------------------------------------------------

    def lock_subscriber(self, msisdn: str) -> None:
        """Hold `msisdn`'s lock until this transaction ends (write units only)."""
        if not self.writable or msisdn in self._locked:
            return
        if self.conn.execute(_LOCK_ROW, (msisdn,)).fetchone() is None:
            # No row to lock: the advisory lock orders the units that may create it;
            # the row lock is tried again in case one did while this one waited.
            self.conn.execute(_LOCK_NEW, (msisdn,))
            self.conn.execute(_LOCK_ROW, (msisdn,))
        self._locked.add(msisdn)

    def lock_owner(self, kind: str, key: str) -> None:
        """Lock the subscriber a loan / recovery / request key / event belongs to."""
        if not self.writable:
            return
        msisdn = self._owners.get((kind, key))
        if msisdn is not None:
            self.lock_subscriber(msisdn)
            return
        row = self.conn.execute(_OWNER_SQL[kind], (key,)).fetchone()
        if row is None:
            return  # nothing of his yet: the operation finds nothing or creates it
        msisdn = self._owners[(kind, key)] = row[0]
        self._locked.add(msisdn)  # FOR UPDATE OF s: his row is locked already

    def _loan_locked(self, loan_id: str) -> store.LoanRow | None:
        """The loan, its owner locked (write units): one statement when he is not yet."""
        msisdn = self._owners.get(("loan", loan_id))
        if not self.writable or msisdn is not None:
            if msisdn is not None:
                self.lock_subscriber(msisdn)
            return store.get_loan(self, loan_id)  # type: ignore[arg-type]
        row = self.conn.execute(_LOAN_LOCKED, (loan_id,)).fetchone()
        if row is None:
            return None
        loan = store.loan_row(row)
        self._owners[("loan", loan_id)] = loan.msisdn
        self._locked.add(loan.msisdn)
        return loan

    # -- the port's operations -------------------------------------------------------
    ping = _op(store.ping)
    # subscribers
    load_subscriber = _by_msisdn(store.load_subscriber)
    open_loans = _by_msisdn(store.open_loans)
    debt_owed = _by_msisdn(store.debt_owed)
    learn_route = _by_msisdn(store.learn_route)
    learned_route = _by_msisdn(store.learned_route)
    set_preferences = _by_msisdn(store.set_preferences)
    limit_state = _by_msisdn(store.limit_state)
    put_limit_state = _by_msisdn(store.put_limit_state)
    set_bar = _by_msisdn(store.set_bar)
    audit = _by_msisdn(store.audit)
    audit_trail = _op(store.audit_trail)
    loan_times = _op(store.loan_times)

    def put_profile(self, profile: SubscriberProfile, now: Any) -> None:
        self.lock_subscriber(profile.msisdn)
        store.put_profile(self, profile, now)  # type: ignore[arg-type]

    # idempotency (a request key is unique by itself; no subscriber lock needed)
    idempotent_get = _op(store.idempotent_get)
    idempotent_put = _op(store.idempotent_put)
    idempotent_replace = _op(store.idempotent_replace)
    purge_idempotency = _op(store.purge_idempotency)
    # loans and advances
    def get_loan(self, loan_id: str) -> store.LoanRow | None:
        return self._loan_locked(loan_id)

    loan_by_idempotency_key = _by_owner("loan_key", store.loan_by_idempotency_key)

    def insert_loan(self, **kwargs: Any) -> str:
        self.lock_subscriber(kwargs["msisdn"])
        self._leased(kwargs)
        return store.insert_loan(self, **kwargs)  # type: ignore[arg-type]

    def _leased(self, kwargs: dict[str, Any]) -> None:
        """A new saga is this node's until its lease runs out (its resolver renews it)."""
        if kwargs.get("owner_node") is None and self.owner_node is not None:
            kwargs["owner_node"] = self.owner_node
            kwargs["lease_until"] = kwargs["now"] + self.lease

    def settle_loan(self, loan_id: str, new_state: str, now: Any, *,
                    result_code: int | None = None) -> store.LoanRow:
        loan = self._loan_locked(loan_id)
        if loan is None:
            raise KeyError(loan_id)
        return store.settle_loan(self, loan_id, new_state, now,  # type: ignore[arg-type]
                                 result_code=result_code, loan=loan)

    settle_advance = _by_owner("loan", store.settle_advance)
    record_session_evidence = _by_owner("loan", store.record_session_evidence)
    session_evidence = _op(store.session_evidence)
    advances_of_in_node = _op(store.advances_of_in_node)
    unsettled_loans = _op(store.unsettled_loans)

    def note_resolve_attempt(
        self, table: str, key: str, review_after: int, now: Any
    ) -> bool:
        self.lock_owner("loan" if table == "loans" else "recovery", key)
        return store.note_resolve_attempt(self, table, key, review_after, now)  # type: ignore[arg-type]

    write_off_candidates = _op(store.write_off_candidates)
    write_off = _by_owner("loan", store.write_off)
    count_overdue = _op(store.count_overdue)
    write_down = _by_msisdn(adjustments.apply_write_down)
    # recoveries
    get_recovery = _by_owner("recovery", store.get_recovery)
    recovery_by_event = _by_owner("event", store.recovery_by_event)

    def insert_recovery(self, **kwargs: Any) -> str:
        self.lock_subscriber(kwargs["msisdn"])
        self._leased(kwargs)
        return store.insert_recovery(self, **kwargs)  # type: ignore[arg-type]

    start_recovery_attempt = _by_owner("recovery", store.start_recovery_attempt)
    note_recovery_attempt = _by_owner("recovery", store.note_recovery_attempt)
    set_recovery_state = _by_owner("recovery", store.set_recovery_state)

    def apply_recovery(self, rec: store.RecoveryRow, allocation: Any, now: Any) -> None:
        # `rec` was read in this unit; if it was read before the lock, read it again.
        if self.writable and rec.msisdn not in self._locked:
            self.lock_subscriber(rec.msisdn)
            fresh = store.get_recovery(self, rec.recovery_id)  # type: ignore[arg-type]
            rec = fresh if fresh is not None else rec
        store.apply_recovery(self, rec, allocation, now)  # type: ignore[arg-type]

    unsettled_recoveries = _op(store.unsettled_recoveries)
    # leases on the sagas: rows claimed under FOR UPDATE SKIP LOCKED, so two nodes'
    # resolvers never claim one row and never wait on each other (no subscriber lock:
    # the claim settles nothing, the resolver's own units take it)

    def claim_unsettled_loans(
        self, owner: str, now: Any, lease_until: Any, limit: int
    ) -> list[store.LoanRow]:
        return store.claim_unsettled_loans(self, owner, now, lease_until, limit,  # type: ignore[arg-type]
                                           lock_rows=_SKIP_LOCKED)

    def claim_unsettled_recoveries(
        self, owner: str, now: Any, lease_until: Any, limit: int
    ) -> list[store.RecoveryRow]:
        return store.claim_unsettled_recoveries(self, owner, now, lease_until, limit,  # type: ignore[arg-type]
                                                lock_rows=_SKIP_LOCKED)

    saga_lease = _op(store.saga_lease)
    # journal
    debt_from_journal = _by_msisdn(store.debt_from_journal)
    account_totals = _op(store.account_totals)
    journal_entries = _by_msisdn(store.journal_entries)
    # advertisements (the caps' rows are the subscriber's: his lock orders them)
    load_ad_subscriber = _by_msisdn(ads_store.load_ad_subscriber)
    recent_ads = _by_msisdn(ads_store.recent_ads)
    record_ad = _by_msisdn(ads_store.record_ad)
    prune_ads = _op(ads_store.prune_ads)
    # the do-not-disturb list (its own table, keyed by MSISDN: no subscriber lock)
    dnd_listed = _op(ads_store.dnd_listed)
    dnd_add = _op(ads_store.dnd_add)
    dnd_remove = _op(ads_store.dnd_remove)
    dnd_page = _op(ads_store.dnd_page)
    # campaigns
    audience_chunk = _op(ads_store.audience_chunk)
    create_campaign = _op(ads_store.create_campaign)
    add_recipients = _op(ads_store.add_recipients)
    get_campaign = _op(ads_store.get_campaign)
    list_campaigns = _op(ads_store.list_campaigns)
    active_campaigns = _op(ads_store.active_campaigns)
    set_campaign_state = _op(ads_store.set_campaign_state)
    pending_recipients = _op(ads_store.pending_recipients)

    def claim_recipients(self, campaign_id: str, now: Any, until: Any, limit: int) -> list[str]:
        return ads_store.claim_recipients(self, campaign_id, now, until, limit,  # type: ignore[arg-type]
                                          lock_rows=_SKIP_LOCKED)

    settle_recipient = _op(ads_store.settle_recipient)
    # outbox (rows of their own: the money they report took the subscriber's lock)
    outbox_put = _op(outbox_store.outbox_put)
    outbox_due = _op(outbox_store.outbox_due)

    def outbox_claim_due(self, now: Any, until: Any, limit: int) -> list[outbox_store.OutboxRow]:
        return outbox_store.outbox_claim_due(self, now, until, limit,  # type: ignore[arg-type]
                                             lock_rows=_SKIP_LOCKED)

    outbox_retry_later = _op(outbox_store.outbox_retry_later)
    outbox_mark_sent = _op(outbox_store.outbox_mark_sent)
    outbox_prune = _op(outbox_store.outbox_prune)


# -- the unit of work ------------------------------------------------------------------


class PostgresLedger:
    """The port over a PostgreSQL database: `PostgresLedger(conninfo)`, then
    `await ledger.close()`. Migrations are applied when it opens (`migrate=False` to
    skip). Every node sharing the database opens its own."""

    def __init__(
        self,
        conninfo: str,
        *,
        pool_max: int = POOL_MAX,
        pool_min: int = POOL_MIN,
        migrate: bool = True,
        retries_max: int = RETRIES_MAX,
        node_name: str | None = None,
        saga_lease_s: float = SAGA_LEASE_S,
    ) -> None:
        self.node_name = node_name  # new sagas are leased to this node (None: to nobody)
        self.saga_lease = timedelta(seconds=saga_lease_s)
        if migrate:
            with psycopg.connect(conninfo, autocommit=True,
                                 connect_timeout=int(CONNECT_TIMEOUT_S)) as conn:
                migrate_postgres(conn)
        self.retries_max = retries_max
        self.retries = 0  # units run again after a deadlock or serialization failure
        self.reconnects = 0  # pools replaced after the server came back
        self._retries_lock = threading.Lock()
        self._conninfo = conninfo
        self._pool_size = (pool_min, pool_max)
        self._down = threading.Event()  # set from a broken connection until the probe's success
        self._closing = threading.Event()
        self._probe: threading.Thread | None = None
        self.pool = self._new_pool()
        # One thread per connection: a unit holds its connection for its whole run.
        self._threads = ThreadPoolExecutor(max_workers=pool_max, thread_name_prefix="ledger-pg")

    # -- running units ----------------------------------------------------------------

    def _new_pool(self) -> ConnectionPool:
        return ConnectionPool(
            self._conninfo,
            min_size=self._pool_size[0],
            max_size=self._pool_size[1],
            kwargs={"autocommit": True},
            open=True,
            timeout=CONNECT_TIMEOUT_S,
            name="ledger",
        )

    @property
    def reachable(self) -> bool:
        """False from a broken connection until the server answers again."""
        return not self._down.is_set()

    def run_sync(self, fn: Callable[[PostgresLedgerTx], T], *, writable: bool) -> T:
        """Run `fn` in one transaction on a pool connection (blocking); a deadlock or
        serialization failure runs it again from the start, and so does a connection
        that broke before the COMMIT was sent (see the module docstring)."""
        broken = 0
        while True:
            timeout = DOWN_CHECKOUT_S if self._down.is_set() else CONNECT_TIMEOUT_S
            pool = self.pool  # the probe may replace it meanwhile: give back to this one
            try:
                conn = pool.getconn(timeout=timeout)
            except PoolClosed:
                if pool is self.pool:
                    raise  # the ledger is closing
                continue  # the probe replaced it while this unit waited: nothing ran yet
            except PoolTimeout:
                self._server_gone()  # no connection to be had: the server is unreachable
                raise
            sent = [False]  # the COMMIT is on its way: an error now is an unknown outcome
            try:
                return self._run_on(conn, fn, writable, sent)
            except psycopg.OperationalError:
                if not conn.broken:
                    raise  # the server answered with an error: not a lost connection
                self._server_gone()
                broken += 1
                # Each dead connection left in the pool fails at once: try the next.
                if sent[0] or broken > self._pool_size[1]:
                    raise
            finally:
                pool.putconn(conn)  # a broken one is discarded

    def _run_on(self, conn: psycopg.Connection[Any], fn: Callable[[PostgresLedgerTx], T],
                writable: bool, sent: list[bool]) -> T:
        attempt = 0
        conn.read_only = not writable  # sent with the BEGIN: no extra round trip
        while True:
            try:
                with conn.transaction():
                    result = fn(PostgresLedgerTx(conn, writable=writable,
                                                 owner_node=self.node_name,
                                                 lease=self.saga_lease))
                    sent[0] = writable  # leaving the block sends the COMMIT
                return result
            except _RETRYABLE:
                attempt += 1
                if attempt > self.retries_max:
                    raise
                with self._retries_lock:
                    self.retries += 1
                time.sleep(random.uniform(0, RETRY_PAUSE_MAX_S))

    async def _run(self, fn: Callable[[PostgresLedgerTx], T], writable: bool) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._threads, lambda: self.run_sync(fn, writable=writable)
        )

    async def write(self, fn: Callable[[PostgresLedgerTx], T]) -> T:
        """Run `fn(tx)` in its own transaction; return once it is committed."""
        return await self._run(fn, True)

    async def write_staged(
        self, fn: Callable[[PostgresLedgerTx], T]
    ) -> tuple[T, asyncio.Future[T]]:
        """`write`: the result is returned once committed, with a resolved future."""
        value = await self._run(fn, True)
        durable: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        durable.set_result(value)
        return value, durable

    def write_later(self, fn: Callable[[PostgresLedgerTx], T]) -> asyncio.Future[T]:
        """`write`, started now; the server's own commit does the batching."""
        return asyncio.ensure_future(self.write(fn))

    async def read(self, fn: Callable[[PostgresLedgerTx], T]) -> T:
        """Run `fn(tx)` in a READ ONLY transaction (sees everything committed)."""
        return await self._run(fn, False)

    async def read_point(self, fn: Callable[[PostgresLedgerTx], T]) -> T:
        """As `read` (a round trip to the server either way)."""
        return await self._run(fn, False)

    def read_sync(self, fn: Callable[[PostgresLedgerTx], T]) -> T:
        return self.run_sync(fn, writable=False)

    # -- reads the admin command and the router use --------------------------------

    async def subscriber_view(self, msisdn: str) -> dict[str, Any]:
        from extrabalance.ledger.views import subscriber_view

        return await self.read(lambda tx: subscriber_view(tx, msisdn))  # type: ignore[arg-type]

    async def learned_route(self, msisdn: str) -> str | None:
        return await self.read_point(lambda tx: tx.learned_route(msisdn))

    async def account_totals(self) -> dict[str, int]:
        return await self.read(lambda tx: tx.account_totals())

    # -- the server going away and coming back ---------------------------------------

    def _server_gone(self) -> None:
        """A connection failed: mark the ledger down and start the probe (once)."""
        if self._closing.is_set():
            return
        with self._retries_lock:
            self._down.set()
            if self._probe is None or not self._probe.is_alive():
                self._probe = threading.Thread(target=self._probe_until_back,
                                               name="ledger-pg-probe", daemon=True)
                self._probe.start()

    def _probe_until_back(self) -> None:
        while not self._closing.wait(PROBE_INTERVAL_S):
            try:
                with psycopg.connect(self._conninfo, autocommit=True,
                                     connect_timeout=PROBE_CONNECT_TIMEOUT_S) as conn:
                    conn.execute("SELECT 1")
            except psycopg.Error:
                continue
            old, self.pool = self.pool, self._new_pool()
            self.reconnects += 1
            self._down.clear()
            # Its idle connections are dead; those in use close as they come back.
            old.close(timeout=CONNECT_TIMEOUT_S)
            return

    # -- shutdown ----------------------------------------------------------------------

    def close_sync(self) -> None:
        self._closing.set()
        self._threads.shutdown(wait=True)
        if self._probe is not None:
            self._probe.join()
        self.pool.close()

    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# -- migrations ------------------------------------------------------------------------


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The newest migration applied (0: none, or no ledger in this schema)."""
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    got = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    return int(got[0]) if got else 0


def migrate_postgres(conn: psycopg.Connection[Any], *, target: int | None = None) -> int:
    """Apply the bundled migrations not yet applied (up to `target`), each in its own
    transaction with its `schema_version` row; returns the version now in force.

    `conn` must be in autocommit mode. A migration marked `-- dialect: sqlite` (a
    storage layout of SQLite's) is recorded without running; one marked `-- dialect:
    postgresql` runs here only. Nodes starting together take turns (an advisory lock).
    """
    if not conn.autocommit:
        raise ValueError("migrate_postgres needs a connection in autocommit mode")
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
    current = 0
    for version, name, sql in db.migrations(dialect=DIALECT):
        if target is not None and version > target:
            break
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
                current = schema_version(conn)
                if version <= current:
                    continue
                if sql.strip():
                    conn.execute(sql)  # several statements, no parameters: one simple query
                conn.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES (%s, %s, %s)",
                    (version, name, SYSTEM_CLOCK.now().isoformat()),
                )
                current = version
        except psycopg.Error as exc:
            raise RuntimeError(f"migration {version:04d}_{name} failed on PostgreSQL: {exc}") from exc
    return current if target is not None else max(current, schema_version(conn))


if TYPE_CHECKING:  # mypy holds the adapter to the port

    def _conforms(tx: PostgresLedgerTx, uow: PostgresLedger) -> None:
        from extrabalance.service.unit_of_work import UnitOfWork

        _tx: LedgerTx = tx
        _uow: UnitOfWork = uow
