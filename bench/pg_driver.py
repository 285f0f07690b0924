"""Which PostgreSQL driver for the ledger: psycopg 3 (synchronous) or asyncpg, measured.

One loan intent is the transaction the lending service runs before it asks the IN
for credit: BEGIN; lock the subscriber (`SELECT ... FOR UPDATE`); read his loans not
yet closed; insert the CREDITING loan; record the request's idempotency row; COMMIT.
Each driver runs the same statements one after the other on one connection (a
sequential round-trip figure: what one pool connection can do), and the run reports
per driver: loan intents per second and the CPU per intent of this process (the
client) and of the server backend serving the connection (read from /proc, the
server being on this machine).

    python -m bench.pg_driver [--dsn postgresql://postgres@127.0.0.1:5432/test] [--ops 3000]

Each run creates a schema of its own with the ledger's migrations and drops it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from extrabalance.argparsing import Parser
from extrabalance.ledger import db

NOW = datetime(2026, 11, 25, tzinfo=UTC).isoformat(timespec="microseconds")
SUBSCRIBERS = 1000
CLK_TCK = os.sysconf("SC_CLK_TCK")

LOCK = "SELECT tenure_days, loans_since_full_payback FROM subscribers WHERE msisdn = {0} FOR UPDATE"
LOANS = ("SELECT loan_id, principal_minor, state FROM loans WHERE msisdn = {0}"
         " AND state IN ('ACTIVE', 'PARTIALLY_REPAID', 'REQUESTED', 'CREDITING', 'UNKNOWN')")
INSERT_LOAN = (
    "INSERT INTO loans (loan_id, msisdn, tier_id, principal_minor, fee_minor, state, channel,"
    " idempotency_key, in_node, diameter_session_id, created_at, updated_at)"
    " VALUES ({0}, {1}, 1, 1000, 100, 'CREDITING', 'ussd', {2}, 'in-a', {3}, {4}, {4})"
)
INSERT_KEY = "INSERT INTO idempotency (key, outcome, created_at) VALUES ({0}, {1}, {2})"


def _sql(template: str, style: str) -> str:
    marks = [f"${i}" for i in range(1, 6)] if style == "numbered" else ["%s"] * 5
    if style == "numbered":
        return template.format(*marks)
    # psycopg: positional %s in order; INSERT_LOAN repeats its fifth value
    return template.replace("{4}, {4}", "{4}, {5}").format(*(["%s"] * 6))


def _backend_cpu_s(pid: int) -> float:
    """utime + stime of one server process (a backend serves one connection)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _params(n: int) -> tuple[str, str, str, str, str]:
    m = f"2010{n % SUBSCRIBERS:07d}"
    return m, f"{n:032x}", f"bench:{n}", f"s;{n}", NOW


def _figures(ops: int, wall: float, cpu_s: float, server_s: float) -> dict[str, float]:
    return {
        "intents": ops,
        "intents_per_s": round(ops / wall),
        "client_cpu_us_per_intent": round(cpu_s / ops * 1e6, 1),
        "server_cpu_us_per_intent": round(server_s / ops * 1e6, 1),
    }


def _measure(ops: int, backend_pid: int, one: Callable[[int], Any]) -> dict[str, float]:
    server0 = _backend_cpu_s(backend_pid)
    started, cpu = time.perf_counter(), time.process_time()
    for n in range(ops):
        one(n)
    wall, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    return _figures(ops, wall, cpu_s, _backend_cpu_s(backend_pid) - server0)


def bench_psycopg(dsn: str, schema: str, ops: int, offset: int) -> dict[str, float]:
    import psycopg

    lock, loans = _sql(LOCK, "pyformat"), _sql(LOANS, "pyformat")
    insert_loan, insert_key = _sql(INSERT_LOAN, "pyformat"), _sql(INSERT_KEY, "pyformat")
    with psycopg.connect(dsn, autocommit=True, options=f"-c search_path={schema}") as conn:
        pid = conn.info.backend_pid

        def one(n: int) -> None:
            m, loan_id, key, session, now = _params(offset + n)
            with conn.transaction():
                conn.execute(lock, (m,)).fetchone()
                conn.execute(loans, (m,)).fetchall()
                conn.execute(insert_loan, (loan_id, m, key, session, now, now))
                conn.execute(insert_key, (key, "{}", now))

        for n in range(200):  # warm up: statements prepared (after 5 uses), caches filled
            one(ops + n)
        return _measure(ops, pid, one)


def bench_asyncpg(dsn: str, schema: str, ops: int, offset: int) -> dict[str, float]:
    import asyncpg

    lock, loans = _sql(LOCK, "numbered"), _sql(LOANS, "numbered")
    insert_loan, insert_key = _sql(INSERT_LOAN, "numbered"), _sql(INSERT_KEY, "numbered")

    async def run() -> dict[str, float]:
        conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
        try:
            pid = conn.get_server_pid()

            async def one(n: int) -> None:
                m, loan_id, key, session, now = _params(offset + n)
                async with conn.transaction():
                    await conn.fetchrow(lock, m)
                    await conn.fetch(loans, m)
                    await conn.execute(insert_loan, loan_id, m, key, session, now)
                    await conn.execute(insert_key, key, "{}", now)

            for n in range(200):
                await one(ops + n)
            server0 = _backend_cpu_s(pid)
            started, cpu = time.perf_counter(), time.process_time()
            for n in range(ops):
                await one(n)
            wall, cpu_s = time.perf_counter() - started, time.process_time() - cpu
            return _figures(ops, wall, cpu_s, _backend_cpu_s(pid) - server0)
        finally:
            await conn.close()

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m bench.pg_driver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get(
        "EB_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per driver")
    args = parser.parse_args(argv)

    import psycopg

    schema = f"eb_bench_{secrets.token_hex(4)}"
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            admin.execute(f"SET search_path TO {schema}")
            for _, _, sql in db.migrations(dialect="postgresql"):
                if sql:
                    admin.execute(sql)
            admin.execute(
                "INSERT INTO subscribers (msisdn, tenure_days, arpu_minor, updated_at)"
                " SELECT '2010' || lpad(g::text, 7, '0'), 400, 5000, %s"
                " FROM generate_series(0, %s) g", (NOW, SUBSCRIBERS - 1))
            runs: dict[str, list[dict[str, float]]] = {"psycopg": [], "asyncpg": []}
            offset = 0
            for _ in range(args.rounds):  # alternate, so a noisy neighbour hits both
                for name, fn in (("psycopg", bench_psycopg), ("asyncpg", bench_asyncpg)):
                    offset += 10 * args.ops
                    runs[name].append(fn(args.dsn, schema, args.ops, offset))
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
    result: dict[str, Any] = {"server": None, "rounds": args.rounds}
    with psycopg.connect(args.dsn) as c:
        result["server"] = c.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    result["psycopg_version"] = psycopg.__version__
    import asyncpg

    result["asyncpg_version"] = asyncpg.__version__
    for name, rounds in runs.items():
        best = max(rounds, key=lambda r: r["intents_per_s"])
        result[name] = {
            "best": best,
            "median_client_cpu_us_per_intent": sorted(
                r["client_cpu_us_per_intent"] for r in rounds)[len(rounds) // 2],
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
