"""Ledger benchmark: loans per second through the group-commit writer with
synchronous=FULL, against a naive one-commit-per-operation writer in the same run;
profile import rate; database size per million subscribers. Prints JSON.

    python -m bench.ledger --subscribers 1000000 [--loans 20000] [--concurrency 256]
    python -m bench.ledger --subscribers 30000000   # the operator-scale run (slow, ~GBs)

Each loan is the saga's two ledger writes: the intent (load the subscriber, decide,
insert CREDITING) and the settlement (ACTIVE + four journal lines), exactly the
functions the service runs. The service pass adds the lending saga around them with
an IN that answers at once.
"""

from __future__ import annotations

import argparse
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
from datetime import UTC, datetime
from pathlib import Path

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
from extrabalance.service.ports import InOperation, InOutcome, InResult, Notice
from extrabalance.service.routing import Router, RouteRule

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
    return time.perf_counter() - started


def intent_op(m: str, tier_id: int, key: str, session: str):
    def fn(conn: sqlite3.Connection) -> str | None:
        if store.idempotent_get(conn, key) is not None:
            return None
        loaded = store.load_subscriber(conn, m)
        decision = decide(BorrowRequest(m, tier_id, "ussd"), loaded.state, POLICY, NOW)
        if not isinstance(decision, Granted):
            return None
        return store.insert_loan(
            conn,
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
        )

    return fn


def settle_op(loan_id: str):
    def fn(conn: sqlite3.Connection) -> None:
        store.settle_loan(conn, loan_id, store.ACTIVE, NOW, result_code=2001)

    return fn


async def bench_group_commit(db: Path, picks: list[int], concurrency: int, tag: str) -> dict:
    ledger = Ledger(db)
    sem = asyncio.Semaphore(concurrency)

    async def one(n: int, i: int) -> None:
        async with sem:
            m = msisdn(i)
            loan_id = await ledger.write(intent_op(m, 1 + n % 12, f"{tag}:{n}", f"s;{tag};{n}"))
            if loan_id:
                await ledger.write(settle_op(loan_id))

    started = time.perf_counter()
    await asyncio.gather(*(one(n, i) for n, i in enumerate(picks)))
    elapsed = time.perf_counter() - started
    batches, ops = ledger.writer.batches_committed, ledger.writer.ops_committed
    await ledger.close()
    return {
        "loans": len(picks),
        "seconds": round(elapsed, 3),
        "loans_per_s": round(len(picks) / elapsed, 1),
        "commits": batches,
        "ops_per_commit": round(ops / max(batches, 1), 1),
    }


def bench_naive(db: Path, picks: list[int], tag: str) -> dict:
    """The same two writes per loan, each in its own transaction and fsync."""
    conn = connect(db)
    started = time.perf_counter()
    for n, i in enumerate(picks):
        conn.execute("BEGIN IMMEDIATE")
        loan_id = intent_op(msisdn(i), 1 + n % 12, f"{tag}:{n}", f"s;{tag};{n}")(conn)
        conn.execute("COMMIT")
        if loan_id:
            conn.execute("BEGIN IMMEDIATE")
            settle_op(loan_id)(conn)
            conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return {
        "loans": len(picks),
        "seconds": round(elapsed, 3),
        "loans_per_s": round(len(picks) / elapsed, 1),
        "commits": 2 * len(picks),
    }


class InstantIn:
    def __init__(self) -> None:
        self._ids = itertools.count()

    def new_session_id(self) -> str:
        return f"bench;{next(self._ids)}"

    async def execute(self, op: InOperation) -> InResult:
        return InResult(InOutcome.DONE, 2001, op.amount_minor)


class NullNotifier:
    async def notify(self, notice: Notice) -> None:
        return None


class NullEvents:
    def emit(self, kind: str, **fields: object) -> None:
        return None


async def bench_service(db: Path, picks: list[int], concurrency: int) -> dict:
    ledger = Ledger(db)
    service = LendingService(
        ledger,
        InstantIn(),
        NullNotifier(),
        NullEvents(),
        POLICY,
        Router([RouteRule("in-a", prefix="20")]),
        lambda: NOW,
    )
    sem = asyncio.Semaphore(concurrency)

    async def one(n: int, i: int) -> None:
        async with sem:
            await service.borrow(msisdn(i), 1 + n % 12, "ussd", f"svc:{n}")

    started = time.perf_counter()
    await asyncio.gather(*(one(n, i) for n, i in enumerate(picks)))
    elapsed = time.perf_counter() - started
    await ledger.close()
    return {
        "loans": len(picks),
        "seconds": round(elapsed, 3),
        "loans_per_s": round(len(picks) / elapsed, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1_000_000)
    parser.add_argument("--loans", type=int, default=20_000)
    parser.add_argument(
        "--naive-loans",
        type=int,
        default=2_000,
        help="loans through the one-commit-per-write writer (slow)",
    )
    parser.add_argument("--concurrency", type=int, default=256)
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
        started = time.perf_counter()
        report = import_profiles(db, csv_path, progress=sys.stderr.isatty())
        import_s = time.perf_counter() - started
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
            "extrapolated_30m_minutes": round(30_000_000 / rate / 60, 1),
        }
        result["db_bytes_per_million_subscribers"] = round(size / (args.subscribers / 1e6))
        # Re-import: every row is an update (the daily case).
        started = time.perf_counter()
        again = import_profiles(db, csv_path)
        result["reimport"] = {
            "seconds": round(time.perf_counter() - started, 2),
            "rows_updated": again.rows_updated,
            "rows_per_s": round(again.rows_ok / (time.perf_counter() - started)),
        }
        rnd = random.Random(11)
        picks = [rnd.randrange(args.subscribers) for _ in range(args.loans)]
        naive_picks = [rnd.randrange(args.subscribers) for _ in range(args.naive_loans)]
        group = asyncio.run(bench_group_commit(db, picks, args.concurrency, "g"))
        naive = bench_naive(db, naive_picks, "n")
        service = asyncio.run(bench_service(db, picks[: args.loans // 2], args.concurrency))
        result["loans_group_commit"] = group
        result["loans_naive_commit_per_write"] = naive
        result["loans_service_saga"] = service
        result["group_vs_naive_ratio"] = round(group["loans_per_s"] / naive["loans_per_s"], 1)
    finally:
        if args.dir is None:
            for p in work.iterdir():
                p.unlink()
            work.rmdir()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
