"""Ledger benchmark: loans per second through the group-commit writer with
synchronous=FULL, against a naive one-commit-per-operation writer in the same run;
profile import rate; database size per million subscribers. Prints JSON.

    python -m bench.ledger --subscribers 1000000 [--loans 20000] [--concurrency 256]
    python -m bench.ledger --subscribers 30000000 --dir DIR   # operator scale (~3 GB)
    python -m bench.ledger --subscribers 1000000 --history 50  # borrowers with a past

Each loan is the saga's two ledger writes: the intent (load the subscriber, decide,
insert CREDITING) and the settlement (ACTIVE + four journal lines), exactly the
functions the service runs. The service pass adds the lending saga around them with
an IN that answers at once, then the payback saga (a recharge for each of those
subscribers: intent, DIRECT_DEBITING, settlement). Every pass reports wall-clock
rate and the process CPU time per operation (all threads): on a shared machine the
CPU figure is the steadier one, and it is what the node spends per loan.

With `--dir`, the generated CSV is kept and reused by the next run of the same size.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from extrabalance.argparsing import Parser
from extrabalance.core.lending import BorrowRequest, Granted, decide
from extrabalance.core.policy import (
    Condition,
    Currency,
    EligibilityPolicy,
    FeePlan,
    Policy,
    RecoveryPolicy,
    RuleOp,
    Segment,
    Tier,
)
from extrabalance.ledger import Ledger, store
from extrabalance.ledger.db import connect, migrate
from extrabalance.ledger.profiles import import_profiles
from extrabalance.service.lending import LendingService
from extrabalance.service.locks import SubscriberLocks
from extrabalance.service.ports import InOperation, InOutcome, InResult, Notice, RechargeEvent
from extrabalance.service.recovery import PaybackService
from extrabalance.service.routing import Router, RouteRule
from extrabalance.service.unit_of_work import LedgerTx, UnitOfWork

POLICY = Policy(
    currency=Currency("EGP", 818, 2),
    tiers={
        i: Tier(i, a)
        for i, a in enumerate(
            (100, 200, 500, 1000, 1500, 2000, 2500, 3000, 4000, 5000, 7500, 10000), start=1
        )
    },
    fee_plans={"pct": FeePlan("pct", percent_bp=1000, min_fee_minor=10)},
    segments=(
        Segment(
            "all",
            (Condition("tenure_days", RuleOp.GE, 0),),
            1_000_000,
            tuple(range(1, 13)),
            "pct",
            1_000_000,
        ),
    ),
    eligibility=EligibilityPolicy(),
    recovery=RecoveryPolicy(),
)
NOW = datetime(2026, 11, 25, tzinfo=UTC)


def msisdn(i: int) -> str:
    return f"20{i:010d}"


def generate_csv(path: Path, subscribers: int) -> float:
    marker = path.with_suffix(".rows")
    if path.exists() and marker.exists() and marker.read_text() == str(subscribers):
        return 0.0  # kept from an earlier run of the same size (--dir)
    started = time.perf_counter()
    rnd = random.Random(7)
    regions = ("cairo", "giza", "alex", "aswan")
    with path.open("w", buffering=1 << 20) as f:
        f.write("msisdn,tenure_days,arpu_minor,language,region\n")
        for i in range(subscribers):
            f.write(
                f"{msisdn(i)},{rnd.randrange(3000)},{rnd.randrange(20000)},"
                f"{'ar' if i % 3 else 'en'},{regions[i % 4]}\n"
            )
    marker.write_text(str(subscribers))
    return time.perf_counter() - started


def intent_op(m: str, tier_id: int, key: str, session: str):
    """The intent through the port's operations (the same store functions on SQLite;
    on PostgreSQL with the subscriber's lock)."""

    def fn(tx: LedgerTx) -> str | None:
        if tx.idempotent_get(key) is not None:
            return None
        loaded = tx.load_subscriber(m)
        decision = decide(BorrowRequest(m, tier_id, "ussd"), loaded.state, POLICY, NOW)
        if not isinstance(decision, Granted):
            return None
        return tx.insert_loan(
            msisdn=m,
            tier_id=tier_id,
            principal_minor=decision.amount_minor,
            fee_minor=decision.fee_minor,
            state=store.CREDITING,
            channel="ussd",
            idempotency_key=key,
            in_node="in-a",
            session_id=session,
            now=NOW,
            subscriber_known=loaded.known,  # as the service does: the row was just read
        )

    return fn


def settle_op(loan_id: str):
    def fn(tx: LedgerTx) -> None:
        tx.settle_loan(loan_id, store.ACTIVE, NOW, result_code=2001)

    return fn


async def run_concurrently(
    items: list[tuple[int, int]], concurrency: int, one: Callable[[int, int], Awaitable[None]]
) -> tuple[float, float]:
    """`concurrency` workers take the items in turn; returns (wall s, CPU s).

    Workers rather than one task per item behind a semaphore: thousands of tasks
    parked on one semaphore cost the event loop more than the ledger work measured.
    """
    queue = iter(items)

    async def worker() -> None:
        for n, i in queue:
            await one(n, i)

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, time.process_time() - cpu


def rates(count: int, wall_s: float, cpu_s: float, unit: str) -> dict:
    return {
        unit: count,
        "seconds": round(wall_s, 3),
        f"{unit}_per_s": round(count / wall_s, 1),
        f"cpu_us_per_{unit.rstrip('s')}": round(cpu_s / count * 1e6, 1),
    }


def lend_through(ledger: UnitOfWork, tag: str) -> Callable[[int, int], Awaitable[None]]:
    """One loan (intent, then settlement) per item, each write a unit of work."""

    async def one(n: int, i: int) -> None:
        m = msisdn(i)
        loan_id = await ledger.write(intent_op(m, 1 + n % 12, f"{tag}:{n}", f"s;{tag};{n}"))
        if loan_id:
            await ledger.write(settle_op(loan_id))

    return one


async def bench_group_commit(db: Path, picks: list[int], concurrency: int, tag: str) -> dict:
    ledger = Ledger(db)
    wall_s, cpu_s = await run_concurrently(list(enumerate(picks)), concurrency,
                                           lend_through(ledger, tag))
    batches, ops = ledger.writer.batches_committed, ledger.writer.ops_committed
    commit_s = getattr(ledger.writer, "commit_seconds", None)
    await ledger.close()
    result = {
        **rates(len(picks), wall_s, cpu_s, "loans"),
        "commits": batches,
        "ops_per_commit": round(ops / max(batches, 1), 1),
    }
    if commit_s is not None:  # time the ledger waited for COMMIT (WAL write + fsync)
        result["commit_ms_mean"] = round(commit_s / max(batches, 1) * 1000, 2)
        result["commit_share_of_wall"] = round(commit_s / wall_s, 2)
    return result


PG_APPLICATION = "eb-bench-ledger"  # names this run's connections in pg_stat_activity
# Server processes whose work a ledger load causes besides its own backends (other
# clients of the same server add to them too: run on a quiet server).
PG_SHARED_PROCESSES = ("walwriter", "checkpointer", "background writer")


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a process on this machine (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_pids(conninfo: str) -> dict[str, list[int]]:
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, backend_type, application_name FROM pg_stat_activity").fetchall()
    return {
        "backends": [p for p, _, app in rows if app == PG_APPLICATION],
        "shared": [p for p, kind, _ in rows if kind in PG_SHARED_PROCESSES],
    }


def pg_bench_schema(dsn: str) -> tuple[str, str]:
    """A new schema for this run: (schema, conninfo whose connections use it)."""
    import secrets

    import psycopg
    from psycopg.conninfo import make_conninfo

    schema = f"eb_bench_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return schema, make_conninfo(dsn, options=f"-c search_path={schema}",
                                 application_name=PG_APPLICATION)


def pg_drop_schema(dsn: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


async def bench_postgresql(conninfo: str, picks: list[int], concurrency: int, tag: str,
                           pool_max: int) -> dict:
    """The group-commit pass's loans (intent, then settlement) through the PostgreSQL
    adapter: one transaction each, the subscriber locked. CPU counted on both sides:
    this process, and the server processes serving it (its pool's backends, and the
    WAL writer, checkpointer and background writer), read from /proc."""
    from extrabalance.ledger.postgres import PostgresLedger

    ledger = PostgresLedger(conninfo, pool_max=pool_max, pool_min=pool_max)
    try:
        # Every pool connection open before the clock starts, so its backend is counted.
        await asyncio.gather(*(ledger.read(lambda tx: tx.account_totals())
                               for _ in range(pool_max * 2)))
        pids = _server_pids(conninfo)
        before = {p: _proc_cpu_s(p) for group in pids.values() for p in group}
        sent = ledger.wire_counts()
        wall_s, cpu_s = await run_concurrently(list(enumerate(picks)), concurrency,
                                               lend_through(ledger, tag))
        spent = {p: _proc_cpu_s(p) - before[p] for p in before}
        sent = {k: v - sent[k] for k, v in ledger.wire_counts().items()}
        backends_s = sum(spent[p] for p in pids["backends"])
        shared_s = sum(spent[p] for p in pids["shared"])
        retries = ledger.retries
        serial = serial_loans(ledger, picks[:SERIAL_LOANS_MAX], tag + "q")
    finally:
        await ledger.close()
    count = len(picks)
    result = rates(count, wall_s, cpu_s, "loans")
    result["cpu_us_per_loan_client"] = result.pop("cpu_us_per_loan")
    result["cpu_us_per_loan_server"] = round((backends_s + shared_s) / count * 1e6, 1)
    result["cpu_us_per_loan_server_backends"] = round(backends_s / count * 1e6, 1)
    result["cpu_us_per_loan_total"] = round(
        result["cpu_us_per_loan_client"] + result["cpu_us_per_loan_server"], 1)
    result["pool_connections"] = pool_max
    result["server_backends_counted"] = len(pids["backends"])
    result["transactions"] = 2 * count
    result["statements_per_loan"] = round(sent["statements"] / count, 2)
    result["round_trips_per_loan"] = round(sent["round_trips"] / count, 2)
    result["retries"] = retries
    result["one_connection"] = serial
    return result


SERIAL_LOANS_MAX = 2000


def serial_loans(ledger: Any, picks: list[int], tag: str) -> dict[str, Any]:
    """The same loans one after another, one unit in flight (`run_sync`: a worker
    runs it while this thread waits): the adapter's own client CPU per loan, without
    the event loop and other units' turns at the interpreter lock (the A/B figure
    for a change to the adapter's statements)."""
    started, cpu = time.perf_counter(), time.process_time()
    for n, i in enumerate(picks):
        loan_id = ledger.run_sync(intent_op(msisdn(i), 1 + n % 12, f"{tag}:{n}",
                                            f"s;{tag};{n}"), writable=True)
        if loan_id:
            ledger.run_sync(settle_op(loan_id), writable=True)
    return rates(len(picks), time.perf_counter() - started, time.process_time() - cpu,
                 "loans")


def bench_naive(db: Path, picks: list[int], tag: str) -> dict:
    """The same two writes per loan, each in its own transaction and fsync."""
    conn = connect(db)
    started, cpu = time.perf_counter(), time.process_time()
    for n, i in enumerate(picks):
        conn.execute("BEGIN IMMEDIATE")
        loan_id = intent_op(msisdn(i), 1 + n % 12, f"{tag}:{n}", f"s;{tag};{n}")(
            conn)  # type: ignore[arg-type]
        conn.execute("COMMIT")
        if loan_id:
            conn.execute("BEGIN IMMEDIATE")
            settle_op(loan_id)(conn)  # type: ignore[arg-type]
            conn.execute("COMMIT")
    elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    conn.close()
    return {**rates(len(picks), elapsed, cpu_s, "loans"), "commits": 2 * len(picks)}


def add_history(db: Path, subscribers: list[int], loans_per_subscriber: int) -> dict:
    """Give each of `subscribers` a past: `loans_per_subscriber` loans lent and repaid in
    full (journal lines, loan rows, the bad-debt count back at zero), as years of
    borrowing leave behind. Written with the ledger's own functions."""
    conn = connect(db)
    started = time.perf_counter()
    loans = 0
    conn.execute("BEGIN IMMEDIATE")
    for count, i in enumerate(subscribers, 1):
        m = msisdn(i)
        for k in range(loans_per_subscriber):
            amount, fee = 1000, 100
            loan_id = store.insert_loan(
                conn, msisdn=m, tier_id=4, principal_minor=amount, fee_minor=fee,
                state=store.ACTIVE, channel="ussd", idempotency_key=f"history:{m}:{k}",
                in_node="in-a", session_id=f"history;{m};{k}", now=NOW, subscriber_known=True)
            store.post(conn, [("recovered_cash", amount + fee), ("fee_receivable", -fee),
                              ("principal_receivable", -amount)],
                       msisdn=m, memo="recover", now=NOW, loan_id=loan_id)
            conn.execute("UPDATE loans SET principal_repaid_minor = ?, fee_repaid_minor = ?,"
                         " state = ? WHERE loan_id = ?", (amount, fee, store.REPAID, loan_id))
            loans += 1
        conn.execute("UPDATE subscribers SET loans_since_full_payback = 0 WHERE msisdn = ?", (m,))
        if count % 2_000 == 0:
            conn.execute("COMMIT")
            conn.execute("BEGIN IMMEDIATE")
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {"subscribers": len(subscribers), "loans_per_subscriber": loans_per_subscriber,
            "loans": loans, "seconds": round(time.perf_counter() - started, 1)}


class InstantIn:
    def __init__(self) -> None:
        self._ids = itertools.count()

    def new_session_id(self) -> str:
        return f"bench;{next(self._ids)}"

    async def execute(self, op: InOperation) -> InResult:
        return InResult(InOutcome.DONE, 2001, op.amount_minor)


class NullNotifier:
    """The services' outbox as the node has it (the row is written in the money's unit
    of work, as in production), with nothing sending it."""

    async def notify(self, notice: Notice) -> None:
        return None

    def put(self, tx: Any, notice: Notice, now: Any) -> str:
        return str(tx.outbox_put(msisdn=notice.msisdn, template=notice.template,
                                 params=notice.params, kind=notice.kind,
                                 language=notice.language, now=now))

    def wake(self) -> None:
        return None


class NullEvents:
    def emit(self, kind: str, **fields: object) -> None:
        return None


async def bench_reads(db: Path, picks: list[int], concurrency: int) -> dict:
    """The saga's read (a subscriber's state by MSISDN) both ways: on the reader
    threads (`Ledger.read`) and on the event-loop thread (`Ledger.read_point`)."""
    ledger = Ledger(db)
    items = list(enumerate(picks))

    async def pooled(n: int, i: int) -> None:
        m = msisdn(i)
        await ledger.read(lambda conn: store.load_subscriber(conn, m))

    async def on_loop(n: int, i: int) -> None:
        m = msisdn(i)
        await ledger.read_point(lambda conn: store.load_subscriber(conn, m))

    result = {
        "reader_threads": rates(
            len(items), *await run_concurrently(items, concurrency, pooled), "reads"
        ),
        "event_loop": rates(
            len(items), *await run_concurrently(items, concurrency, on_loop), "reads"
        ),
    }
    await ledger.close()
    result["loop_vs_threads_ratio"] = round(
        result["event_loop"]["reads_per_s"] / result["reader_threads"]["reads_per_s"], 1
    )
    return result


async def bench_service(db: Path, picks: list[int], concurrency: int) -> tuple[dict, dict]:
    """Borrow saga for every pick, then a recharge (payback saga) for each."""
    ledger = Ledger(db)
    in_port, locks = InstantIn(), SubscriberLocks()
    router = Router([RouteRule("in-a", prefix="20")])
    ports = (ledger, in_port, NullNotifier(), NullEvents(), POLICY, router, lambda: NOW)
    lending = LendingService(*ports, locks=locks)
    payback = PaybackService(*ports, locks=locks)
    items = list(enumerate(picks))
    outcomes: dict[str, int] = {}

    async def borrow(n: int, i: int) -> None:
        outcome = await lending.borrow(msisdn(i), 1 + n % 12, "ussd", f"svc:{n}")
        outcomes[outcome.status.value] = outcomes.get(outcome.status.value, 0) + 1

    async def recharge(n: int, i: int) -> None:
        event = RechargeEvent(f"svc-r:{n}", msisdn(i), 50_000, "in-a", 50_000)
        outcome = await payback.handle_recharge(event)
        outcomes[outcome.status.value] = outcomes.get(outcome.status.value, 0) + 1

    loans = rates(len(items), *await run_concurrently(items, concurrency, borrow), "loans")
    paybacks = rates(len(items), *await run_concurrently(items, concurrency, recharge), "paybacks")
    await ledger.close()
    loans["outcomes"] = {k: v for k, v in outcomes.items() if k in ("GRANTED", "REFUSED")}
    paybacks["outcomes"] = {k: v for k, v in outcomes.items() if k not in loans["outcomes"]}
    return loans, paybacks


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="extrabalance bench ledger", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1_000_000)
    parser.add_argument("--loans", type=int, default=20_000)
    parser.add_argument(
        "--naive-loans",
        type=int,
        default=2_000,
        help="loans through the one-commit-per-write writer (slow)",
    )
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--no-reimport", action="store_true", help="skip the re-import pass")
    parser.add_argument(
        "--history",
        type=int,
        default=0,
        help="loans already lent and repaid by every subscriber the passes borrow for",
    )
    parser.add_argument(
        "--storage",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="postgresql: the loans pass on SQLite and on PostgreSQL side by side in one "
        "run (the imported subscribers copied with `ledger migrate`'s copy first); the "
        "SQLite-only passes (naive, service sagas, reads) are left out",
    )
    parser.add_argument(
        "--pg-dsn",
        default=os.environ.get("EB_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
        help="PostgreSQL server for --storage postgresql (a schema of its own, dropped after)",
    )
    parser.add_argument("--pg-pool", type=int, default=8, help="PostgreSQL connections")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="work directory (default: a temporary one, removed after)",
    )
    args = parser.parse_args(argv)

    work = args.dir or Path(tempfile.mkdtemp(prefix="eb-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    db, csv_path = work / "ledger.db", work / "profiles.csv"
    for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        p.unlink(missing_ok=True)
    result: dict = {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "subscribers": args.subscribers,
        "synchronous": "FULL",
    }
    try:
        gen_s = generate_csv(csv_path, args.subscribers)
        started, cpu = time.perf_counter(), time.process_time()
        report = import_profiles(db, csv_path, progress=sys.stderr.isatty())
        import_s, import_cpu_s = time.perf_counter() - started, time.process_time() - cpu
        rate = report.rows_ok / import_s
        conn = connect(db)
        migrate(conn)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        size = db.stat().st_size
        result["import"] = {
            "csv_bytes": csv_path.stat().st_size,
            "csv_generate_s": round(gen_s, 2),
            "rows": report.rows_ok,
            "bad_rows": report.bad_rows_total,
            "seconds": round(import_s, 2),
            "rows_per_s": round(rate),
            "cpu_us_per_row": round(import_cpu_s / report.rows_ok * 1e6, 2),
            "minutes_for_30m_at_this_rate": round(30_000_000 / rate / 60, 1),
        }
        result["db_bytes_per_million_subscribers"] = round(size / (args.subscribers / 1e6))
        if not args.no_reimport:
            # Re-import: every row is an update (the daily case).
            started, cpu = time.perf_counter(), time.process_time()
            again = import_profiles(db, csv_path)
            elapsed = time.perf_counter() - started
            result["reimport"] = {
                "seconds": round(elapsed, 2),
                "rows_updated": again.rows_updated,
                "rows_per_s": round(again.rows_ok / elapsed),
                "cpu_us_per_row": round((time.process_time() - cpu) / again.rows_ok * 1e6, 2),
            }
        rnd = random.Random(11)
        picks = [rnd.randrange(args.subscribers) for _ in range(args.loans)]
        naive_picks = [rnd.randrange(args.subscribers) for _ in range(args.naive_loans)]
        if args.history > 0:
            result["history"] = add_history(
                db, sorted(set(picks) | set(naive_picks)), args.history)
        if args.storage == "postgresql":
            from extrabalance.ledger.pg_copy import copy_ledger

            schema, conninfo = pg_bench_schema(args.pg_dsn)
            try:
                started = time.perf_counter()
                copied = copy_ledger(db, conninfo)
                copy_s = time.perf_counter() - started
                result["postgresql_copy"] = {
                    "verified": copied.verified,
                    "rows": sum(t.target_rows for t in copied.tables),
                    "seconds": round(copy_s, 1),
                    "rows_per_s": round(sum(t.target_rows for t in copied.tables) / copy_s),
                }
                pg = asyncio.run(bench_postgresql(conninfo, picks, args.concurrency, "p",
                                                  args.pg_pool))
            finally:
                pg_drop_schema(args.pg_dsn, schema)
            group = asyncio.run(bench_group_commit(db, picks, args.concurrency, "g"))
            result["loans_sqlite_group_commit"] = group
            result["loans_postgresql"] = pg
            result["postgresql_vs_sqlite"] = {
                "loans_per_s_ratio": round(pg["loans_per_s"] / group["loans_per_s"], 2),
                "cpu_per_loan_ratio": round(
                    pg["cpu_us_per_loan_total"] / group["cpu_us_per_loan"], 2),
            }
            print(json.dumps(result, indent=2))
            return 0
        group = asyncio.run(bench_group_commit(db, picks, args.concurrency, "g"))
        naive = bench_naive(db, naive_picks, "n")
        loans, paybacks = asyncio.run(bench_service(db, picks[: args.loans // 2], args.concurrency))
        reads = asyncio.run(bench_reads(db, picks, args.concurrency))
        result["loans_group_commit"] = group
        result["loans_naive_commit_per_write"] = naive
        result["group_vs_naive_ratio"] = round(group["loans_per_s"] / naive["loans_per_s"], 1)
        result["loans_service_saga"] = loans
        result["paybacks_service_saga"] = paybacks
        result["reads_subscriber_state"] = reads
        conn = connect(db)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        result["db_bytes_after"] = db.stat().st_size
    finally:
        if args.dir is None:
            for p in work.iterdir():
                p.unlink()
            work.rmdir()
        else:  # keep the CSV for the next run; the database is rebuilt each time
            for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
                p.unlink(missing_ok=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
