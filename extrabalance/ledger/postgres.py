"""The PostgreSQL adapter of the unit-of-work port (`extrabalance.service.unit_of_work`).

What this file owns: `PostgresLedger` (the `UnitOfWork`: `pool_max` worker threads,
each on a connection of a bounded psycopg 3 pool, each unit of work in a transaction of
its own), `PostgresLedgerTx` (the `LedgerTx`: the business SQL of `store.py` and
`ads_store.py` queued and sent in libpq's pipeline mode, placeholders numbered), the
subscriber lock that serialises one subscriber's units of work across every node
sharing the database, and the migration runner for PostgreSQL.

Why psycopg 3 and threads: the port's units are plain synchronous functions, so they
run unchanged on a worker thread over a synchronous connection; measured against
asyncpg on the same loan-intent transaction psycopg was the faster (docs/ledger.md
"PostgreSQL", `bench/pg_driver.py`).

Round trips. A statement is queued when the unit executes it and goes out when the
unit first reads a result (rows, a row count), together with everything queued before
it; the rest goes out with the COMMIT. So a write unit's BEGIN travels with its first
read, its inserts and updates with the next read or the COMMIT, and a unit costs one
round trip per read it waits for, plus one. The statements go through psycopg's `pq`
layer (`_Wire`): prepared once per connection, parameters in text format, rows loaded
by psycopg's loaders; psycopg's own execute path (a cursor, a query object and
generator rounds per statement) cost the node more CPU than the statement.

Serialisation. Inside one node `SubscriberLocks` orders one subscriber's work; across
nodes the database must. In a write unit, the first operation that names a subscriber
(directly, or through a loan, recovery or request key of his) takes
`SELECT 1 FROM subscribers WHERE msisdn = ? FOR UPDATE`, queued ahead of the
operation's own first statement (same round trip: the server runs them in order, and
at READ COMMITTED a statement that follows a lock wait sees the latest committed
state). A subscriber without a row yet has nothing to lock, so then a
transaction-scoped advisory lock on his MSISDN's hash is taken and the row lock tried
again (an operation that only reads is then run again under it): a unit that creates
the row holds the advisory lock until it commits, and every later unit finds the row.

Retries. A unit that deadlocks (two subscribers locked in opposite orders) or hits a
serialization failure is rolled back and run again from the start, up to
`RETRIES_MAX` times, whether the error came back with a read or with the COMMIT:
`fn` must have no effect outside its `LedgerTx` (true of every service's unit). A unit
whose connection breaks while its COMMIT is on the way is not retried: the COMMIT may
or may not have happened, and the caller's saga (the resolver) settles it like any
unknown. One whose connection breaks before the COMMIT was sent cannot have committed
(the server rolls back a transaction whose client is gone): it runs again on another
connection — a connection left idle across a server restart fails so on its first
statement.

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
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Self, TypeVar

import psycopg
import psycopg.errors
from psycopg import pq
from psycopg.adapt import Transformer
from psycopg.generators import fetch_many
from psycopg.generators import send as send_gen
from psycopg.waiting import wait
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
_LOCK_ROW = "SELECT 1 FROM subscribers WHERE msisdn = ? FOR UPDATE"
_LOCK_NEW = "SELECT pg_advisory_xact_lock(hashtextextended(?, 0))"
# The owner of a loan / recovery and his row lock in one round trip (a subscriber who
# has a loan or a recovery has a row: both inserts ensure it).
_OWNER_SQL = {
    kind: (f"SELECT s.msisdn FROM {table} x JOIN subscribers s ON s.msisdn = x.msisdn"
           f" WHERE x.{column} = ? FOR UPDATE OF s")
    for kind, table, column in (
        ("loan", "loans", "loan_id"),
        ("loan_key", "loans", "idempotency_key"),
        ("recovery", "recoveries", "recovery_id"),
        ("event", "recoveries", "event_id"),
    )
}

# A loan read with its owner's row lock in one round trip (the settlement's first
# read; the replay check by request key). The loan row is locked too (FOR NO KEY
# UPDATE, as the UPDATE that follows takes): a statement that waited for a lock sees
# the latest version of the rows it locked only, so without it the loan could be read
# as it was before the wait.
_LOAN_SELECT = ("SELECT " + ", ".join(f"x.{c.strip()}" for c in store.LOAN_COLUMNS.split(","))
                + " FROM loans x JOIN subscribers s ON s.msisdn = x.msisdn")
_LOCK_LOAN_AND_OWNER = " FOR UPDATE OF s FOR NO KEY UPDATE OF x"
_LOAN_LOCKED = _LOAN_SELECT + " WHERE x.loan_id = ?" + _LOCK_LOAN_AND_OWNER
_LOAN_BY_KEY_LOCKED = _LOAN_SELECT + " WHERE x.idempotency_key = ?" + _LOCK_LOAN_AND_OWNER
# The replay check's second half, read with its first (see `idempotent_get`).
_LOAN_BY_KEY = f"SELECT {store.LOAN_COLUMNS} FROM loans WHERE idempotency_key = ?"

# -- placeholders --------------------------------------------------------------------

_QUOTED_OR_QMARK = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?")
_numbered: dict[str, bytes] = {}


def to_numbered(sql: str) -> bytes:
    """The store's `?` placeholders as the protocol's `$1, $2, ...` (quoted text left
    alone), encoded: what a prepared statement is made of. Cached per SQL text."""
    out = _numbered.get(sql)
    if out is None:
        marks = iter(range(1, sql.count("?") + 1))

        def swap(m: re.Match[str]) -> str:
            return f"${next(marks)}" if m.group(0) == "?" else m.group(0)

        out = _numbered[sql] = _QUOTED_OR_QMARK.sub(swap, sql).encode()
    return out


# A small batch of rows for one INSERT ... VALUES (?, ...) goes as one statement of
# that many row groups rather than a statement per row (fewer statements for the
# server to parse, bind and execute).
MULTI_ROW_MAX = 16
_INSERT_VALUES = re.compile(r"(INSERT\s.*?\sVALUES\s*)(\((?:\s*\?\s*,)*\s*\?\s*\))(.*)",
                            re.DOTALL | re.IGNORECASE)
_multi_row: dict[tuple[str, int], str | None] = {}


def multi_row_insert(sql: str, rows: int) -> str | None:
    """`sql` (one `INSERT ... VALUES (?, ...)` [tail]) with `rows` row groups; None
    for any other statement, and for a tail with a placeholder of its own (it would
    take a row's value). Cached per (text, rows)."""
    key = (sql, rows)
    if key not in _multi_row:
        m = _INSERT_VALUES.fullmatch(sql.strip())
        _multi_row[key] = None if m is None or "?" in m.group(3) else (
            m.group(1) + ", ".join([m.group(2)] * rows) + m.group(3))
    return _multi_row[key]


# -- the wire: statements in pipeline mode ---------------------------------------------

# How long one wait for the socket blocks before it looks again (psycopg's own
# figure). Without it psycopg's wait function does not block at all: it polls the
# socket in a loop, which burns a core for every connection waiting on the server.
_WAIT_S = 0.1
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_FATAL_ERROR = pq.ExecStatus.FATAL_ERROR
_ABORTED = pq.ExecStatus.PIPELINE_ABORTED
_IN_TRANSACTION = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)


def _dump(value: Any, encoding: str) -> bytes | None:
    """One parameter in the protocol's text format (its type left for the server to
    infer from the statement, as psycopg does for text)."""
    if value is None:
        return None
    kind = type(value)
    if kind is str:
        return value.encode(encoding)  # type: ignore[no-any-return]
    if kind is int:
        return b"%d" % value
    if kind is bool:
        return b"1" if value else b"0"  # reads as an integer or a boolean
    if kind is float:
        return repr(value).encode()
    raise TypeError(f"ledger SQL parameter of type {kind.__name__} is not supported: {value!r}")


class _Wire:
    """One connection's way of sending statements: libpq's pipeline mode through
    psycopg's `pq` layer, each statement prepared once per connection (named
    `eb<N>`), parameters in text format, rows loaded by psycopg's own loaders.

    `send(batch)` is one round trip whatever the batch's size: every statement goes
    out, then one Sync, then every result comes back. This is psycopg's execute
    path without its per-statement cursor, query object and generator rounds, which
    cost more client CPU than the statement itself on a fast local server."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.pg = conn.pgconn
        self.encoding = conn.info.encoding
        self.loaders = Transformer(conn)
        self.names: dict[bytes, bytes] = {}  # SQL -> prepared statement name
        self.broken = False
        self.round_trips = 0  # batches sent (what `PostgresLedger.wire_counts` adds up)
        self.statements = 0  # statements in them, BEGIN and COMMIT included

    def send(self, batch: Sequence[_Result]) -> None:
        """Send `batch` and read every result; the first error raised after all."""
        pg, names = self.pg, self.names
        expect: list[_Result | bytes] = []  # a result to fill, or a statement prepared
        self.round_trips += 1
        self.statements += len(batch)
        try:
            pg.enter_pipeline_mode()
            for st in batch:
                if st.params is None:  # BEGIN, COMMIT, ROLLBACK
                    pg.send_query_params(st.sql, None)
                else:
                    name = names.get(st.sql)
                    if name is None:
                        name = names[st.sql] = b"eb%d" % len(names)
                        pg.send_prepare(name, st.sql)
                        expect.append(st.sql)
                    pg.send_query_prepared(name, st.params)
                expect.append(st)
            pg.pipeline_sync()
            fd = pg.socket
            wait(send_gen(pg), fd, _WAIT_S)
            error: psycopg.Error | None = None
            for item in expect:
                results = wait(fetch_many(pg), fd, _WAIT_S)
                res = results[-1]
                if res.status == _FATAL_ERROR and error is None:  # the batch's first
                    error = psycopg.errors.error_from_result(res, encoding=self.encoding)
                if isinstance(item, bytes):  # a statement prepared
                    if res.status != _COMMAND_OK:
                        names.pop(item, None)  # prepared it was not: again next time
                else:
                    item.res = res
            wait(fetch_many(pg), fd, _WAIT_S)  # the Sync
            pg.exit_pipeline_mode()
        except BaseException:
            self.broken = True  # the connection's state is unknown: it is not reused
            raise
        if error is not None:
            raise error
        if any(st.res is not None and st.res.status == _ABORTED for st in batch):
            raise psycopg.errors.InFailedSqlTransaction(  # an error went unreported
                "statements skipped after an error in the same batch")

    def rollback(self) -> None:
        """End whatever transaction a failed unit left open (nothing to do when its
        statements were never sent)."""
        if not self.broken and self.pg.transaction_status in _IN_TRANSACTION:
            self.send([_Result(None, b"ROLLBACK", None)])


class _Result:
    """One statement of a unit: queued when executed, sent with the next statement
    whose result the unit reads (or with the COMMIT), read like a cursor."""

    __slots__ = ("_pos", "_rows", "params", "res", "sql", "tx")

    def __init__(self, tx: PostgresLedgerTx | None, sql: bytes,
                 params: list[bytes | None] | None) -> None:
        self.tx = tx
        self.sql = sql
        self.params = params
        self.res: pq.abc.PGresult | None = None
        self._rows: list[tuple[Any, ...]] | None = None
        self._pos = 0

    def _result(self) -> pq.abc.PGresult:
        if self.res is None:
            assert self.tx is not None
            self.tx.flush()
        assert self.res is not None
        return self.res

    def _all(self) -> list[tuple[Any, ...]]:
        if self._rows is None:
            res = self._result()
            assert self.tx is not None
            loaders = self.tx.wire.loaders
            loaders.set_pgresult(res)
            self._rows = loaders.load_rows(0, res.ntuples, tuple)
        return self._rows

    def fetchone(self) -> tuple[Any, ...] | None:
        rows = self._all()
        if self._pos < len(rows):
            self._pos += 1
            return rows[self._pos - 1]
        return None

    def fetchall(self) -> list[tuple[Any, ...]]:
        rows = self._all()
        out, self._pos = rows[self._pos:], len(rows)
        return out

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.fetchall())

    @property
    def rowcount(self) -> int:
        count = self._result().command_tuples
        return -1 if count is None else count

    @property
    def description(self) -> list[tuple[str]]:
        res = self._result()
        assert self.tx is not None
        enc = self.tx.wire.encoding
        return [((res.fname(i) or b"").decode(enc),) for i in range(res.nfields)]


class _Many:
    """What `executemany` returns: its statements' row count."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[_Result]) -> None:
        self.parts = parts

    @property
    def rowcount(self) -> int:
        return sum(max(part.rowcount, 0) for part in self.parts)


_BEGIN = b"BEGIN"
_BEGIN_READ_ONLY = b"BEGIN READ ONLY"
_COMMIT = b"COMMIT"


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


def _reading_by_msisdn(
    fn: Callable[Concatenate[Any, str, P], R],
) -> Callable[Concatenate[PostgresLedgerTx, str, P], R]:
    """A store function that only reads, whose first argument is the subscriber: his
    lock goes out with its first statement (`PostgresLedgerTx.read_locked`)."""

    def method(self: PostgresLedgerTx, msisdn: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.read_locked(msisdn, lambda: fn(self, msisdn, *args, **kwargs))

    method.__name__ = fn.__name__
    method.__doc__ = fn.__doc__
    return method


def _by_owner(
    kind: str, fn: Callable[Concatenate[Any, str, P], R]
) -> Callable[Concatenate[PostgresLedgerTx, str, P], R]:
    """A store function whose first argument names a loan or recovery (or its request
    key or event): lock the subscriber it belongs to first (the lock statement goes
    out ahead of the function's first, in the same round trip)."""

    def method(self: PostgresLedgerTx, key: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
        self.lock_owner(kind, key)
        out = fn(self, key, *args, **kwargs)
        self._note_owners()
        return out

    method.__name__ = fn.__name__
    method.__doc__ = fn.__doc__
    return method


class PostgresLedgerTx:
    """One unit of work's transaction (see the module docstring). `execute` and
    `executemany` take the store's SQLite-style SQL, so `store.py` runs unchanged.

    Statements are queued and go out together when the unit first reads a result
    (rows, a row count), and at the end with the COMMIT: a write unit's BEGIN travels
    with its first statements, its inserts and updates with the next read or the
    COMMIT. A read unit's statements go out between a BEGIN READ ONLY and a COMMIT
    of their own, in one round trip: at READ COMMITTED each statement reads the latest
    committed state anyway, so splitting a read unit in several transactions changes
    nothing it can see. An error (a broken constraint, a deadlock) is raised when the
    batch holding the statement comes back, at the latest when the unit commits."""

    def __init__(self, wire: _Wire, *, writable: bool,
                 owner_node: str | None = None,
                 lease: timedelta = timedelta(seconds=SAGA_LEASE_S)) -> None:
        self.wire = wire
        self.conn = wire.conn
        self.writable = writable
        self.owner_node = owner_node  # the node a new saga is leased to (None: nobody)
        self.lease = lease
        self._pending: list[_Result] = []
        self._begun = False
        self._sent = 0  # statements executed so far (queued or sent)
        self._locked: set[str] = set()
        self._owners: dict[tuple[str, str], str] = {}
        self._owner_pending: list[tuple[str, str, _Result]] = []
        self._replays: dict[str, tuple[_Result, int]] = {}

    # -- the connection as store.py uses it -----------------------------------------

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Result:
        enc = self.wire.encoding
        st = _Result(self, to_numbered(sql), [
            v.encode(enc) if type(v) is str else _dump(v, enc) for v in params])
        self._pending.append(st)
        self._sent += 1
        return st

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> _Many:
        """Every row queued: `MULTI_ROW_MAX` rows to a statement where the statement
        allows it (a journal entry's lines are one), else a statement per row. Its
        `rowcount` is the statements' sum, as psycopg's `executemany` counts."""
        batch = list(rows)
        out = []
        for start in range(0, len(batch), MULTI_ROW_MAX):
            chunk = batch[start:start + MULTI_ROW_MAX]
            many = multi_row_insert(sql, len(chunk)) if len(chunk) > 1 else None
            if many is not None:
                out.append(self.execute(many, [v for row in chunk for v in row]))
            else:
                out.extend(self.execute(sql, row) for row in chunk)
        return _Many(out)

    def flush(self) -> None:
        """Send what is queued (one round trip)."""
        batch = self._pending
        self._pending = []
        if self.writable:
            if not self._begun:
                batch.insert(0, _Result(None, _BEGIN, None))
                self._begun = True
        else:
            batch.insert(0, _Result(None, _BEGIN_READ_ONLY, None))
            batch.append(_Result(None, _COMMIT, None))
        self.wire.send(batch)

    def commit(self) -> None:
        """The unit's end: what is queued goes out with the COMMIT (a write unit that
        sent nothing and queued nothing has nothing to commit)."""
        if self.writable:
            if self._begun or self._pending:
                commit = _Result(None, _COMMIT, None)
                self._pending.append(commit)
                self.flush()
                # A COMMIT of a transaction an earlier error aborted answers ROLLBACK
                # (a unit that caught that error and went on): it must not pass for one.
                if commit.res is None or commit.res.command_status != b"COMMIT":
                    raise psycopg.errors.InFailedSqlTransaction(
                        "the transaction was rolled back, not committed")
        elif self._pending:
            self.flush()

    # -- the subscriber lock ---------------------------------------------------------

    def lock_subscriber(self, msisdn: str) -> None:
        """Hold `msisdn`'s lock until this transaction ends (write units only)."""
        if not self.writable or msisdn in self._locked:
            return
        if self.execute(_LOCK_ROW, (msisdn,)).fetchone() is None:
            self._lock_new(msisdn)
        self._locked.add(msisdn)

    def _lock_new(self, msisdn: str) -> None:
        """No row to lock: the advisory lock orders the units that may create it;
        the row lock is tried again in case one did while this one waited."""
        self.execute(_LOCK_NEW, (msisdn,))
        self.execute(_LOCK_ROW, (msisdn,)).fetchone()

    def read_locked(self, msisdn: str, read: Callable[[], R]) -> R:
        """`read()` (statements that only read) with `msisdn` locked first; the lock
        goes out with the read's first statement, in the same round trip. If he has
        no row yet, the read runs again under the advisory lock."""
        if not self.writable or msisdn in self._locked:
            return read()
        lock = self.execute(_LOCK_ROW, (msisdn,))
        out = read()
        if lock.fetchone() is None:
            self._lock_new(msisdn)
            out = read()
        self._locked.add(msisdn)
        return out

    def lock_owner(self, kind: str, key: str) -> None:
        """Lock the subscriber a loan / recovery / request key / event belongs to.
        Queued: it goes out with the operation's first statement, ahead of it."""
        if not self.writable:
            return
        msisdn = self._owners.get((kind, key))
        if msisdn is not None:
            self.lock_subscriber(msisdn)
            return
        self._owner_pending.append((kind, key, self.execute(_OWNER_SQL[kind], (key,))))

    def _note_owners(self) -> None:
        """Remember whose rows the owner locks that have come back locked (one not
        back yet stays queued: it goes out ahead of whatever follows)."""
        waiting: list[tuple[str, str, _Result]] = []
        for kind, key, st in self._owner_pending:
            if st.res is None:
                waiting.append((kind, key, st))
                continue
            row = st.fetchone()
            if row is not None:  # None: nothing of his yet, the operation found nothing
                self._owners[(kind, key)] = row[0]
                self._locked.add(row[0])  # FOR UPDATE OF s: his row is locked already
        self._owner_pending = waiting

    def _loan_locked(self, sql: str, key: str) -> store.LoanRow | None:
        """The loan (by id or request key), its owner locked: one statement."""
        row = self.execute(sql, (key,)).fetchone()
        if row is None:
            return None
        loan = store.loan_row(row)
        self._owners[("loan", loan.loan_id)] = loan.msisdn
        self._locked.add(loan.msisdn)
        return loan

    def _loan(self, loan_id: str) -> store.LoanRow | None:
        """The loan; in a write unit with its owner locked (one statement when he is
        not yet)."""
        msisdn = self._owners.get(("loan", loan_id))
        if not self.writable or msisdn is not None:
            if msisdn is not None:
                self.lock_subscriber(msisdn)
            return store.get_loan(self, loan_id)  # type: ignore[arg-type]
        return self._loan_locked(_LOAN_LOCKED, loan_id)

    # -- the port's operations -------------------------------------------------------
    ping = _op(store.ping)
    # subscribers
    load_subscriber = _reading_by_msisdn(store.load_subscriber)
    open_loans = _reading_by_msisdn(store.open_loans)
    debt_owed = _reading_by_msisdn(store.debt_owed)
    learn_route = _by_msisdn(store.learn_route)
    learned_route = _reading_by_msisdn(store.learned_route)
    set_preferences = _by_msisdn(store.set_preferences)
    limit_state = _reading_by_msisdn(store.limit_state)
    put_limit_state = _by_msisdn(store.put_limit_state)
    set_bar = _by_msisdn(store.set_bar)
    audit = _by_msisdn(store.audit)
    audit_trail = _op(store.audit_trail)
    loan_times = _op(store.loan_times)

    def put_profile(self, profile: SubscriberProfile, now: Any) -> None:
        self.lock_subscriber(profile.msisdn)
        store.put_profile(self, profile, now)  # type: ignore[arg-type]

    # idempotency (a request key is unique by itself; no subscriber lock needed)

    def idempotent_get(self, key: str) -> dict[str, Any] | None:
        """In a write unit, the loan booked under the same key is read in the same
        round trip: a replay check asks for both (`loan_by_idempotency_key` takes that
        answer when nothing was executed in between)."""
        if self.writable:
            spec = self.execute(_LOAN_BY_KEY, (key,))
            out = store.idempotent_get(self, key)  # type: ignore[arg-type]
            self._replays[key] = (spec, self._sent)
            return out
        return store.idempotent_get(self, key)  # type: ignore[arg-type]

    idempotent_put = _op(store.idempotent_put)
    idempotent_replace = _op(store.idempotent_replace)
    purge_idempotency = _op(store.purge_idempotency)
    # loans and advances
    def get_loan(self, loan_id: str) -> store.LoanRow | None:
        return self._loan(loan_id)

    def loan_by_idempotency_key(self, key: str) -> store.LoanRow | None:
        if not self.writable:
            return store.loan_by_idempotency_key(self, key)  # type: ignore[arg-type]
        spec, at = self._replays.pop(key, (None, -1))
        if spec is not None and at == self._sent:  # read with the idempotency row
            row = spec.fetchone()
            if row is None:
                return None  # no loan of his under that key (as the locked read finds)
            loan = store.loan_row(row)
            if loan.msisdn in self._locked:  # read after his lock: his latest
                return loan
        return self._loan_locked(_LOAN_BY_KEY_LOCKED, key)

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
        loan = self._loan(loan_id)
        if loan is None:
            raise KeyError(loan_id)
        return store.settle_loan(self, loan_id, new_state, now,  # type: ignore[arg-type]
                                 result_code=result_code, loan=loan)

    settle_advance = _by_owner("loan", store.settle_advance)
    record_session_evidence = _by_owner("loan", store.record_session_evidence)
    session_evidence = _op(store.session_evidence)
    # an answer granting an advance that could not be handed over (migration 0015)
    mark_answer_undelivered = _by_owner("loan", store.mark_answer_undelivered)
    mark_answer_delivered = _by_owner("loan", store.mark_answer_delivered)
    restart_answer_hold = _by_owner("loan", store.restart_answer_hold)
    close_answer_mark = _by_owner("loan", store.close_answer_mark)
    answer_mark_open_since = _by_owner("loan", store.answer_mark_open_since)
    undelivered_loan_ids = _op(store.undelivered_loan_ids)
    undelivered_due = _op(store.undelivered_due)
    advances_of_in_node = _op(store.advances_of_in_node)
    unsettled_loans = _op(store.unsettled_loans)

    def note_resolve_attempt(
        self, table: str, key: str, review_after: int, now: Any
    ) -> bool:
        self.lock_owner("loan" if table == "loans" else "recovery", key)
        out = store.note_resolve_attempt(self, table, key, review_after, now)  # type: ignore[arg-type]
        self._note_owners()
        return out

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
    debt_from_journal = _reading_by_msisdn(store.debt_from_journal)
    account_totals = _op(store.account_totals)
    journal_entries = _reading_by_msisdn(store.journal_entries)
    # advertisements (the caps' rows are the subscriber's: his lock orders them)
    load_ad_subscriber = _reading_by_msisdn(ads_store.load_ad_subscriber)
    recent_ads = _reading_by_msisdn(ads_store.recent_ads)
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


class _LedgerConnection(psycopg.Connection[Any]):
    """A pool connection with its `_Wire` (its prepared statements live as long as it)."""

    wire: _Wire | None = None


_Held = list[tuple[ConnectionPool["_LedgerConnection"], "_LedgerConnection"] | None]


class _LoopDone:
    """Hands finished units back to one event loop: a worker appends, and one
    `call_soon_threadsafe` wakes the loop for however many finished meanwhile."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.done: deque[tuple[asyncio.Future[Any], bool, Any]] = deque()
        self.scheduled = False

    def post(self, fut: Any, ok: bool, value: Any) -> None:  # a worker thread
        self.done.append((fut, ok, value))
        if not self.scheduled:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody waits any more
                self.scheduled = False

    def _drain(self) -> None:  # the loop's thread
        self.scheduled = False
        done = self.done
        while done:
            fut, ok, value = done.popleft()
            if fut.done():
                continue  # cancelled meanwhile
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)


class _ThreadDone:
    """A unit's result for a thread that waits for it (`run_sync`)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = False
        self.value: Any = None

    def post(self, fut: Any, ok: bool, value: Any) -> None:
        self.ok, self.value = ok, value
        self.event.set()

    def result(self) -> Any:
        self.event.wait()
        if not self.ok:
            raise self.value
        return self.value


class PostgresLedger:
    """The port over a PostgreSQL database: `PostgresLedger(conninfo)`, then
    `await ledger.close()`. Migrations are applied when it opens (`migrate=False` to
    skip). Every node sharing the database opens its own.

    `pool_max` worker threads take units from one queue; each holds a connection of
    the bounded pool while it has work (a unit on the pool's connection without a
    checkout per unit), and hands the result back to the caller's event loop."""

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
        self._units: SimpleQueue[tuple[Callable[[PostgresLedgerTx], Any], bool, Any, Any]
                                 | None] = SimpleQueue()
        self._loops: dict[asyncio.AbstractEventLoop, _LoopDone] = {}
        self._wires: list[_Wire] = []
        self._workers = [threading.Thread(target=self._work, name=f"ledger-pg-{n}",
                                          daemon=True) for n in range(pool_max)]
        for worker in self._workers:
            worker.start()

    # -- running units ----------------------------------------------------------------

    def _new_pool(self) -> ConnectionPool[_LedgerConnection]:
        return ConnectionPool(
            self._conninfo,
            connection_class=_LedgerConnection,
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

    def _work(self) -> None:
        """A worker: units off the queue, one at a time, on a connection it takes from
        the pool at its first unit and keeps (the pool holds one per worker; a checkout
        and return per unit cost the node more than the unit's statements). A broken
        connection goes back to its pool, which discards it."""
        held: _Held = [None]  # (its pool, the connection) while it has one
        units = self._units
        while True:
            item = units.get()
            if item is None:
                break
            fn, writable, done, fut = item
            try:
                value = self._run_held(held, fn, writable)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.post(fut, False, exc)
            else:
                done.post(fut, True, value)
        if held[0] is not None:
            held[0][0].putconn(held[0][1])

    def _run_held(self, held: _Held, fn: Callable[[PostgresLedgerTx], T], writable: bool) -> T:
        """Run `fn` on the worker's connection (taken from the pool when it has none,
        or none that works); a connection that broke before the COMMIT was sent runs
        the unit again on another (see the module docstring)."""
        broken = 0
        while True:
            if held[0] is not None and held[0][0] is not self.pool:  # the pool replaced
                held[0][0].putconn(held[0][1])
                held[0] = None
            current = held[0]
            if current is None:
                timeout = DOWN_CHECKOUT_S if self._down.is_set() else CONNECT_TIMEOUT_S
                pool = self.pool  # the probe may replace it meanwhile: give back to this one
                try:
                    current = held[0] = (pool, pool.getconn(timeout=timeout))
                except PoolClosed:
                    if pool is self.pool:
                        raise  # the ledger is closing
                    continue  # the probe replaced it while this unit waited: nothing ran yet
                except PoolTimeout:
                    self._server_gone()  # no connection to be had: the server is unreachable
                    raise
            pool, conn = current
            sent = [False]  # the COMMIT is on its way: an error now is an unknown outcome
            try:
                return self._run_on(conn, fn, writable, sent)
            except psycopg.OperationalError:
                if not (conn.broken or conn.closed or (conn.wire and conn.wire.broken)):
                    raise  # the server answered with an error: not a lost connection
                pool.putconn(conn)  # a broken one is discarded
                held[0] = None
                self._server_gone()
                broken += 1
                # Each dead connection left in the pool fails at once: try the next.
                if sent[0] or broken > self._pool_size[1]:
                    raise

    def _run_on(self, conn: _LedgerConnection, fn: Callable[[PostgresLedgerTx], T],
                writable: bool, sent: list[bool]) -> T:
        """Run `fn` in one transaction on `conn`; a deadlock or serialization failure
        runs it again from the start."""
        wire = conn.wire
        if wire is None or wire.broken:
            wire = conn.wire = _Wire(conn)
            self._wires.append(wire)
        attempt = 0
        while True:
            tx = PostgresLedgerTx(wire, writable=writable, owner_node=self.node_name,
                                  lease=self.saga_lease)
            try:
                value = fn(tx)
                sent[0] = writable  # the COMMIT goes out with what is queued
                tx.commit()
                return value
            except _RETRYABLE:
                wire.rollback()
                attempt += 1
                if attempt > self.retries_max:
                    raise
                with self._retries_lock:
                    self.retries += 1
                time.sleep(random.uniform(0, RETRY_PAUSE_MAX_S))
            except BaseException:
                if wire.broken:
                    conn.close()  # its state is unknown: the pool discards it
                else:
                    wire.rollback()
                raise

    def wire_counts(self) -> dict[str, int]:
        """Round trips and statements sent so far, over every connection (benchmarks)."""
        wires = list(self._wires)
        return {"round_trips": sum(w.round_trips for w in wires),
                "statements": sum(w.statements for w in wires)}

    def run_sync(self, fn: Callable[[PostgresLedgerTx], T], *, writable: bool) -> T:
        """Run `fn` on a worker in one transaction and wait for it (blocking; never
        from the event loop's thread)."""
        done = _ThreadDone()
        self._units.put((fn, writable, done, None))
        return done.result()  # type: ignore[no-any-return]

    async def _run(self, fn: Callable[[PostgresLedgerTx], T], writable: bool) -> T:
        loop = asyncio.get_running_loop()
        done = self._loops.get(loop)
        if done is None:
            done = self._loops[loop] = _LoopDone(loop)
        fut: asyncio.Future[T] = loop.create_future()
        self._units.put((fn, writable, done, fut))
        return await fut

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
        for _ in self._workers:  # after the units already queued
            self._units.put(None)
        for worker in self._workers:
            worker.join()
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
