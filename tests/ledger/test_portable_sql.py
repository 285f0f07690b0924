"""The ledger's SQL on PostgreSQL: every statement the node issues, prepared on a
fresh PostgreSQL schema built from the bundled migrations.

How the statements are gathered: a short scenario on SQLite (loans granted, refused,
replayed and resolved; an advance confirmed and one refused; paybacks full, partial,
retried and resolved; bar, unbar, ageing, a write-down, the ads and campaign tables,
a profile import, the idempotency purge) runs on connections that record each
statement with the line that issued it. `test_scenario_runs_every_sql_call_site`
checks that every `execute` call site in `extrabalance/ledger/` and
`extrabalance/service/` ran in the scenario, so a new statement cannot escape the
PostgreSQL check: it fails here until the scenario runs it (or it is listed in
`SITES_NOT_RUN` with the reason).

What PostgreSQL is asked: each migration's SQL is executed, then every recorded
statement is PREPAREd (parsed, names resolved, parameter types inferred) with its `?`
placeholders numbered `$1, $2, ...`. Statements that are SQLite's own are not sent;
`SQLITE_ONLY` lists them with their PostgreSQL equivalent (docs/ledger.md
"PostgreSQL"). The PostgreSQL test is skipped when no server answers at
`EB_TEST_PG_DSN` (default `postgresql://postgres@127.0.0.1:5432/test`).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import csv
import os
import re
import secrets
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from extrabalance.core.limits import LimitState
from extrabalance.core.model import SubscriberProfile
from extrabalance.ledger import ads_store, db, outbox_store, read_models, store
from extrabalance.ledger import ledger as ledger_module
from extrabalance.ledger import profiles as profiles_module
from extrabalance.ledger import writer as writer_module
from extrabalance.ledger.adjustments import apply_write_down
from extrabalance.ledger.sqlite_uow import SqliteLedgerTx
from extrabalance.ledger.views import subscriber_view
from extrabalance.service.ports import RechargeEvent
from extrabalance.service.retention import IdempotencyRetention
from tests.service.fakes import LOST_ANSWER, REFUSE, TIMEOUT, Harness

ROOT = Path(__file__).resolve().parents[2]
SQL_SOURCES = ("extrabalance/ledger", "extrabalance/service")
PG_DSN = os.environ.get("EB_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
PG_CONNECT_TIMEOUT_S = 3.0

# SQLite's own statements: never sent to PostgreSQL. (pattern, PostgreSQL equivalent)
SQLITE_ONLY: tuple[tuple[str, str], ...] = (
    (r"PRAGMA journal_mode=WAL", "none needed: PostgreSQL always writes ahead (WAL)"),
    (r"PRAGMA synchronous=", "synchronous_commit = on (the server default) and fsync = on"),
    (r"PRAGMA busy_timeout=", "SET lock_timeout (a session setting)"),
    (r"PRAGMA foreign_keys=", "none needed: constraints are always enforced"),
    (r"PRAGMA (cache_size|mmap_size)=", "shared_buffers, effective_cache_size (server)"),
    (r"PRAGMA wal_autocheckpoint=|PRAGMA wal_checkpoint|PRAGMA journal_size_limit=",
     "none: the server's checkpointer (checkpoint_timeout, max_wal_size, min_wal_size)"),
    (r"PRAGMA temp_store=",
     "none: a savepoint's undo lives in the server's own WAL records, no side file"),
    (r"BEGIN IMMEDIATE",
     ("BEGIN; one subscriber's operations are serialised by SELECT ... FOR UPDATE on his "
      "subscribers row, not by one database-wide write lock")),
)
_SQLITE_ONLY_RE = re.compile("|".join(f"(?:{p})" for p, _ in SQLITE_ONLY))

# Call sites the scenario does not reach, by (module, function): why, and why that is safe.
SITES_NOT_RUN: dict[tuple[str, str], str] = {
    ("extrabalance/ledger/writer.py", "_checkpoint_loop"):
        "PRAGMA wal_checkpoint on the checkpointer thread, past 64 MiB of WAL (SQLite only)",
    ("extrabalance/ledger/writer.py", "_set_busy_timeout"):
        "PRAGMA busy_timeout while another process holds the write lock (SQLite only)",
    ("extrabalance/ledger/writer.py", "_begin_waiting"):
        "BEGIN IMMEDIATE while another process holds the write lock (SQLite only)",
    ("extrabalance/ledger/writer.py", "_commit_and_check"):
        "PRAGMA wal_checkpoint(RESTART) past 1 GiB of WAL (SQLite only)",
    ("extrabalance/ledger/db.py", "migrate"):
        "ROLLBACK after a failed migration (the same word in PostgreSQL)",
    ("extrabalance/ledger/writer.py", "_in_savepoint"):
        "SAVEPOINT / RELEASE / ROLLBACK TO of a batch's second and later operations (the "
        "same words in PostgreSQL); the scenario writes one operation at a time",
    ("extrabalance/ledger/writer.py", "_run_later"):
        "SAVEPOINT / RELEASE / ROLLBACK TO around a batch's deferred operations (the "
        "same words in PostgreSQL, whose adapter defers nothing)",
    ("extrabalance/ledger/writer.py", "_rollback"):
        "ROLLBACK after a failed COMMIT (the same word in PostgreSQL)",
    ("extrabalance/ledger/profiles.py", "_flush"):
        "ROLLBACK after a failed import batch (the same word in PostgreSQL)",
    # The profile import's PostgreSQL path: its own SQL (COPY, DISTINCT ON, window),
    # run against PostgreSQL by tests/ledger/test_profiles_postgres.py.
    ("extrabalance/ledger/profiles.py", "import_profiles_postgresql"):
        "the import's staging table on PostgreSQL (tests/ledger/test_profiles_postgres.py)",
    ("extrabalance/ledger/profiles.py", "_count_pg"):
        "the subscriber count on PostgreSQL (tests/ledger/test_profiles_postgres.py)",
    ("extrabalance/ledger/profiles.py", "_flush_postgresql"):
        "COPY and upsert of an import batch on PostgreSQL (tests/ledger/test_profiles_postgres.py)",
}

# Files whose SQL is PostgreSQL's own (written for it, run against it by their own
# tests), so the SQLite scenario cannot and need not run it.
POSTGRESQL_FILES: dict[str, str] = {
    "extrabalance/ledger/postgres.py":
        "the PostgreSQL adapter's locks and migration runner "
        "(tests/ledger/test_unit_of_work_contract.py, test_postgres_migrations.py)",
    "extrabalance/ledger/pg_copy.py":
        "the copy of a SQLite ledger into PostgreSQL (tests/ledger/test_pg_copy.py)",
    "extrabalance/ledger/factory.py":
        "the reachability check of a PostgreSQL ledger (tests/test_preflight.py)",
}

M1, M2, M3, M4 = "201001234567", "201001234568", "201001234569", "201001234570"
IN_A = "in-a.operator.example"


@dataclass(frozen=True, slots=True)
class Recorded:
    sql: str
    file: str  # relative to the repository root
    line: int
    script: bool = False  # executescript: several statements (the migration runner)
    params: tuple[Any, ...] = ()  # execute: one row of parameters
    rows: list[tuple[Any, ...]] | None = None  # executemany: every row


class _Recorder:
    def __init__(self) -> None:
        self.statements: list[Recorded] = []

    def record(self, sql: str, *, script: bool = False, params: Any = (),
               rows: list[tuple[Any, ...]] | None = None) -> None:
        frame = sys._getframe(2)  # the caller of execute()
        path = Path(frame.f_code.co_filename).resolve()
        try:
            where = path.relative_to(ROOT).as_posix()
        except ValueError:
            where = path.as_posix()
        self.statements.append(Recorded(sql, where, frame.f_lineno, script, tuple(params), rows))


def _recording_class(recorder: _Recorder) -> type[sqlite3.Connection]:
    class RecordingConnection(SqliteLedgerTx):  # the ledger's own class, recorded
        def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
            recorder.record(sql, params=parameters)
            return super().execute(sql, parameters)

        def executemany(self, sql: str, parameters: Iterable[Any], /) -> sqlite3.Cursor:
            rows = [tuple(row) for row in parameters]
            recorder.record(sql, rows=rows)
            return super().executemany(sql, rows)

        def executescript(self, script: str, /) -> sqlite3.Cursor:
            recorder.record(script, script=True)
            return super().executescript(script)

    return RecordingConnection


async def _scenario(h: Harness, tmp_path: Path) -> None:
    """Loans, advances, paybacks, the resolver, operator actions, ads and housekeeping."""
    fake_in = h.fake_in
    for msisdn in (M1, M2, M3, M4):
        await h.add_profile(msisdn)
    # Loans: granted, replayed, refused; one left UNKNOWN, then resolved.
    await h.lending.borrow(M1, 4, "ussd", "k1")
    await h.lending.borrow(M1, 4, "ussd", "k1")
    await h.lending.borrow(M1, 99, "sms", "k2")
    fake_in.fail_next(TIMEOUT)
    await h.lending.borrow(M2, 2, "sms", "k3")
    fake_in.fail_next(TIMEOUT)
    await h.resolver.run_once()  # still unknown: an attempt counted
    await h.resolver.run_once()  # settled
    # A loan the IN never answers for: flagged for review after `review_after_attempts`.
    fake_in.fail_next(TIMEOUT)
    await h.lending.borrow(M4, 2, "ussd", "k4")
    for _ in range(h.review_after_attempts):
        fake_in.fail_next(TIMEOUT)
        await h.resolver.run_once()
    # An operation that raises is rolled back alone (its savepoint).
    with pytest.raises(store.LedgerInvariantError):
        await h.ledger.write(lambda c: store.post(
            c, [("fee_income", 1)], msisdn=M1, memo="unbalanced", now=h.clock()))
    await h.lending.quote(M1)
    await h.lending.status(M1)
    # Limits from behaviour (off in this policy): the state's write and read.
    kept = LimitState(((20000, 500),), 1000, 1, 0, 0)
    await h.ledger.write(lambda c: store.put_limit_state(c, M1, kept, h.clock()))
    assert await h.ledger.read(lambda c: store.limit_state(c, M1)) == kept
    # The do-not-disturb list: every statement.
    assert await h.ledger.write(lambda c: ads_store.dnd_add(c, [M4], "file", "ops", h.clock()))
    assert await h.ledger.read(lambda c: ads_store.dnd_listed(c, M4))
    assert len(await h.ledger.read(lambda c: ads_store.dnd_page(c, "", 5))) == 1
    assert await h.ledger.write(lambda c: ads_store.dnd_remove(c, M4))
    await h.ledger.learned_route(M1)
    # Advances: one confirmed, one whose confirmation the IN refuses.
    await h.lending.set_preferences(M3, auto_advance=True, ads_opt_out=False, language="ar")
    first = await h.lending.out_of_balance("s1", 0, 1, M3, None, IN_A)
    if first.granted_minor:
        fake_in.apply_grant("s1", 0, M3, first.granted_minor)
    await h.lending.drain_confirmations()
    await h.lending.out_of_balance("s1", 0, 1, M3, None, IN_A)  # retransmission
    fake_in.balances[M3] = 10_000
    await h.payback.handle_recharge(RechargeEvent("e0", M3, 10_000, IN_A, 10_000))
    fake_in.fail_next(REFUSE)
    await h.lending.out_of_balance("s2", 0, 1, M3, None, IN_A)
    await h.lending.drain_confirmations()
    await h.lending.out_of_balance("s2", 1, 3, M3, None, IN_A)  # termination
    # Session evidence: s1's TERMINATION confirms its INITIAL's advance.
    await h.lending.out_of_balance("s1", 1, 3, M3, None, IN_A, used_minor=100)
    if first.loan_id:
        assert await h.ledger.read(lambda c: store.session_evidence(c, first.loan_id or ""))
    # An answer granting an advance that could not be handed over: its mark.
    if first.loan_id:
        marked, now = first.loan_id, h.clock()
        await h.ledger.write(lambda c: store.mark_answer_undelivered(c, marked, now))
        await h.ledger.write(lambda c: store.restart_answer_hold(c, marked, now))
        await h.ledger.write(lambda c: store.mark_answer_undelivered(c, marked, now))
        await h.ledger.read(lambda c: (store.undelivered_loan_ids(c, M3),
                                       store.undelivered_due(c, now, 9),
                                       store.answer_mark_open_since(c, marked)))
        await h.ledger.write(lambda c: store.mark_answer_delivered(c, marked, now))
        await h.ledger.write(lambda c: store.close_answer_mark(c, marked, now))
    # Reconciliation with the IN's records (reconcile-in): its read of the advances.
    await h.ledger.read(lambda c: store.advances_of_in_node(c, IN_A, h.clock()))
    # Consumer protection: the loans a rolling-window cap counts, and the consent trail.
    await h.ledger.read(lambda c: store.loan_times(c, M1, h.clock() - timedelta(days=30)))
    await h.ledger.read(lambda c: store.audit_trail(c, M1))
    await h.ledger.read(lambda c: store.audit_trail(c, M1, ("bar", "unbar")))
    # Paybacks: nothing owed, partial after a 4012 retry, one left UNKNOWN and resolved.
    await h.payback.handle_recharge(RechargeEvent("e1", "201001239999", 500, IN_A, 500))
    fake_in.balances[M1] = 300
    fake_in.fail_next(REFUSE)
    await h.payback.handle_recharge(RechargeEvent("e2", M1, 300, IN_A, 300))
    await h.payback.handle_recharge(RechargeEvent("e2", M1, 300, IN_A, 300))
    fake_in.balances[M2] = 5_000
    fake_in.fail_next(LOST_ANSWER)
    await h.payback.handle_recharge(RechargeEvent("e3", M2, 5_000, IN_A, 5_000))
    await h.resolver.run_once()
    # Leases on the sagas (several nodes on one ledger): claim, renew, look.
    leased = h.clock() + timedelta(minutes=2)
    await h.ledger.write(lambda c: store.claim_unsettled_loans(c, "node-a", h.clock(), leased, 9))
    await h.ledger.write(
        lambda c: store.claim_unsettled_recoveries(c, "node-a", h.clock(), leased, 9))
    await h.ledger.read(lambda c: store.saga_lease(c, "recoveries", "none"))
    await h.ledger.read(lambda c: (store.unsettled_loans(c, 9), store.unsettled_recoveries(c, 9)))
    # Consumer protection's reads (off in this policy): the audit trail and loan times.
    await h.ledger.read(lambda c: (store.audit_trail(c, M1, ("bar",)),
                                   store.loan_times(c, M1, h.clock() - timedelta(days=30))))
    # Operator actions: bar, unbar, a write-down, ageing, the admin view.
    await h.accounts.bar(M2, "fraud check", "ops", notify=False)
    await h.accounts.unbar(M2, "ops", "cleared")
    await h.ledger.write(lambda c: apply_write_down(
        c, M1, kind="waive", amount_minor=1, who="ops", reason="goodwill", now=h.clock(),
        request_id="T-1"))
    await h.accounts.age_debts(h.clock() + timedelta(days=400))
    await h.ledger.subscriber_view(M1)
    await h.ledger.account_totals()
    await h.ledger.read(lambda c: subscriber_view(c, M2))
    # The reports' read models (the daily report, the backtest).
    day = h.clock().replace(hour=0, minute=0, second=0, microsecond=0)

    def reports(conn: sqlite3.Connection) -> None:
        cohort = read_models.cohort_loans(conn, day, day + timedelta(days=1))
        read_models.waived_minor(conn, {loan.loan_id for loan in cohort})
        read_models.open_loan_ages(conn)
        read_models.profiles(conn)
        read_models.profiles_of(conn, {M1, M2})
        # The audit trail and loan times the consumer-protection rules read.
        store.audit_trail(conn, M1, ("adjust",))
        store.loan_times(conn, M1, day)
        store.ping(conn)  # the node's readiness check

    await h.ledger.read(reports)
    # Ads and campaigns.
    now = h.clock()

    def outbox(conn: sqlite3.Connection) -> None:
        # The services queued messages above (outbox_put); the sender's side:
        for row in outbox_store.outbox_due(conn, now, 10):
            outbox_store.outbox_retry_later(conn, row.outbox_id, now)
            outbox_store.outbox_mark_sent(conn, row.outbox_id, now)
        outbox_store.outbox_prune(conn, now + timedelta(days=2), 100)
        outbox_store.outbox_claim_due(conn, now, now + timedelta(minutes=1), 10)  # several nodes

    await h.ledger.write(outbox)

    def ads(conn: sqlite3.Connection) -> None:
        ads_store.load_ad_subscriber(conn, M1)
        ads_store.recent_ads(conn, M1, now - timedelta(days=1))
        ads_store.record_ad(conn, M1, "out_of_balance", "ad_out_of_balance", now)
        ads_store.prune_ads(conn, now - timedelta(days=2), 100)
        ads_store.audience_chunk(conn, "", 10)
        campaign = ads_store.create_campaign(conn, "ad_campaign", None, "ops", now)
        ads_store.add_recipients(conn, campaign, [M1, M2], now)
        ads_store.get_campaign(conn, campaign)
        ads_store.list_campaigns(conn)
        ads_store.set_campaign_state(conn, campaign, ads_store.QUEUED, now)
        ads_store.active_campaigns(conn)
        ads_store.claim_recipients(conn, campaign, now, now + timedelta(minutes=2), 1)
        for msisdn in ads_store.pending_recipients(conn, campaign, 10):
            ads_store.settle_recipient(conn, campaign, msisdn, ads_store.SENT, None, now)
        store.put_profile(conn, SubscriberProfile(M4, 30, 100, {"plan": "youth"}), now)
        store.journal_entries(conn, M1)
        store.count_overdue(conn, now, now - timedelta(days=30))

    await h.ledger.write(ads)
    # Housekeeping: the idempotency purge.
    h.clock.advance(days=30)
    await IdempotencyRetention(h.ledger, timedelta(days=10), h.clock).purge()
    # The profile import (its own connection, like the command).
    csv_path = tmp_path / "profiles.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["msisdn", "tenure_days", "arpu_minor", "language"],
                                 [M1, "500", "7000", "en"]])
    profiles_module.import_profiles(h.db_path, csv_path)


@dataclass(frozen=True, slots=True)
class Run:
    statements: list[Recorded]  # everything, in the order it ran (the tests' own SQL too)
    db_path: Path  # the SQLite ledger the scenario left

    @property
    def node_statements(self) -> list[Recorded]:
        """What the node's own code issued."""
        return [r for r in self.statements if r.file.startswith("extrabalance/")]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    recorder = _Recorder()
    factory = _recording_class(recorder)

    def connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        return db.connect(*args, factory=factory, **kwargs)  # type: ignore[arg-type]

    tmp_path = tmp_path_factory.mktemp("portable")
    with pytest.MonkeyPatch.context() as patch:
        for module in (writer_module, ledger_module, profiles_module):
            patch.setattr(module, "connect", connect)

        async def scenario() -> None:
            h = Harness(tmp_path / "ledger.db", advance_confirmation=True)  # its SQL too
            try:
                await _scenario(h, tmp_path)
            finally:
                await h.close()

        asyncio.run(scenario())
    return Run(recorder.statements, tmp_path / "ledger.db")


@pytest.fixture(scope="module")
def recorded(run: Run) -> list[Recorded]:
    return run.node_statements


# -- every call site ran ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallSite:
    file: str
    function: str
    first_line: int
    last_line: int


def _is_sql_argument(node: ast.expr) -> bool:
    """A literal, an f-string, a concatenation or a CONSTANT: SQL text (not `op`)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.Name):
        return node.id.isupper()
    return isinstance(node, ast.JoinedStr | ast.BinOp)


def sql_call_sites() -> list[CallSite]:
    sites = []
    for folder in SQL_SOURCES:
        for path in sorted((ROOT / folder).glob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative in POSTGRESQL_FILES:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for func in ast.walk(tree):
                if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(func):
                    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                            and node.func.attr in ("execute", "executemany", "executescript")
                            and node.args and _is_sql_argument(node.args[0])):
                        sites.append(CallSite(relative, func.name, node.lineno,
                                              node.end_lineno or node.lineno))
    # A nested function's calls are found under it and under its parent: keep the
    # innermost (the smallest enclosing function names it).
    unique: dict[tuple[str, int], CallSite] = {}
    for site in sites:
        unique[(site.file, site.first_line)] = site
    return sorted(unique.values(), key=lambda s: (s.file, s.first_line))


def test_scenario_runs_every_sql_call_site(recorded: list[Recorded]) -> None:
    sites = sql_call_sites()
    assert len(sites) > 50, "the call-site scan found too little: is the source layout changed?"
    ran = {(r.file, r.line) for r in recorded}
    missing = [
        f"{s.file}:{s.first_line} ({s.function})"
        for s in sites
        if (s.file, s.function) not in SITES_NOT_RUN
        and not any((s.file, line) in ran for line in range(s.first_line, s.last_line + 1))
    ]
    assert not missing, (
        "SQL call sites the scenario never ran (so PostgreSQL never saw them); "
        "extend `_scenario` or list them in SITES_NOT_RUN:\n  " + "\n  ".join(missing))


# -- placeholders ------------------------------------------------------------------------

_QUOTED_OR_MARK = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?")


def to_numbered(sql: str) -> str:
    """`?` → `$1, $2, ...` (asyncpg's placeholders), leaving quoted text alone."""
    counter = iter(range(1, sql.count("?") + 1))

    def number(m: re.Match[str]) -> str:
        return f"${next(counter)}" if m.group(0) == "?" else m.group(0)

    return _QUOTED_OR_MARK.sub(number, sql)


def test_to_numbered() -> None:
    assert to_numbered("SELECT a FROM t WHERE b = ? AND c IN (?, ?)") == (
        "SELECT a FROM t WHERE b = $1 AND c IN ($2, $3)")
    assert to_numbered("SELECT '?', \"a?\" FROM t WHERE x = ? AND y = 'it''s ?'") == (
        "SELECT '?', \"a?\" FROM t WHERE x = $1 AND y = 'it''s ?'")


# -- PostgreSQL --------------------------------------------------------------------------


def portable_statements(recorded: list[Recorded]) -> dict[str, list[str]]:
    """statement → where it was issued, for every statement PostgreSQL must accept."""
    out: dict[str, list[str]] = {}
    for r in recorded:
        if r.script or _SQLITE_ONLY_RE.match(r.sql.strip()):
            continue
        out.setdefault(" ".join(r.sql.split()), []).append(f"{r.file}:{r.line}")
    return out


def test_sqlite_only_statements_are_the_documented_ones(recorded: list[Recorded]) -> None:
    only = {" ".join(r.sql.split()) for r in recorded
            if not r.script and _SQLITE_ONLY_RE.match(r.sql.strip())}
    assert only, "the scenario issued no PRAGMA: is it recording?"
    assert all(s.startswith(("PRAGMA ", "BEGIN IMMEDIATE")) for s in only), only
    scripts = {r.file for r in recorded if r.script}
    # The only script is the migration runner: BEGIN IMMEDIATE; <migration>; record; COMMIT
    # (on PostgreSQL: BEGIN; <migration>; ...; COMMIT, DDL being transactional there too).
    assert scripts == {"extrabalance/ledger/db.py"}


async def _pg_connect():  # type: ignore[no-untyped-def]
    asyncpg = pytest.importorskip("asyncpg")
    try:
        return await asyncpg.connect(PG_DSN, timeout=PG_CONNECT_TIMEOUT_S)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"no PostgreSQL at {PG_DSN} ({exc.__class__.__name__}: {exc}); "
                    "set EB_TEST_PG_DSN to run the portability check")


@contextlib.asynccontextmanager
async def _fresh_schema() -> AsyncIterator[Any]:
    """A PostgreSQL connection on a schema of its own with every migration applied;
    the schema is dropped afterwards."""
    conn = await _pg_connect()
    schema = f"eb_portable_{secrets.token_hex(6)}"
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"SET search_path TO {schema}")
        # A SQLite-only migration (storage layout, `-- dialect: sqlite`) comes with no
        # SQL for PostgreSQL: it is recorded as applied there without running.
        for version, name, sql in db.migrations(dialect="postgresql"):
            if not sql:
                continue
            try:
                await conn.execute(sql)  # simple protocol: the whole file at once
            except Exception as exc:  # noqa: BLE001 - reported with the migration
                pytest.fail(f"migration {version:04d}_{name} fails on PostgreSQL: {exc}")
        yield conn
    finally:
        with contextlib.suppress(Exception):
            await conn.execute("ROLLBACK")
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


async def test_every_statement_prepares_on_postgresql(recorded: list[Recorded]) -> None:
    statements = portable_statements(recorded)
    assert len(statements) > 60, f"only {len(statements)} statements recorded"
    async with _fresh_schema() as conn:
        failures = []
        ddl = [s for s in statements if s.startswith("CREATE ")]
        for sql in ddl + [s for s in statements if not s.startswith("CREATE ")]:
            try:
                if sql in ddl:
                    await conn.execute(sql)  # the runner's own table: create it
                else:
                    await conn.prepare(to_numbered(sql))
            except Exception as exc:  # noqa: BLE001 - collected, reported together
                failures.append(f"{sql}\n    issued at {', '.join(sorted(set(statements[sql])))}"
                                f"\n    PostgreSQL: {exc.__class__.__name__}: {exc}")
        assert not failures, (f"{len(failures)} of {len(statements)} statements rejected by "
                              "PostgreSQL:\n" + "\n".join(failures))


def _sqlite_tables(db_path: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(db_path)
    try:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            " AND name <> 'schema_version' ORDER BY name")]
        return {n: sorted(conn.execute(f"SELECT * FROM {n}").fetchall(), key=repr)
                for n in names}
    finally:
        conn.close()


async def test_scenario_replayed_on_postgresql_leaves_the_same_ledger(run: Run) -> None:
    """Every statement of the scenario, with its parameters and in its order, executed
    on PostgreSQL (BEGIN IMMEDIATE as BEGIN, PRAGMAs left out): it must bind the same
    Python values and leave every table exactly as SQLite did."""
    async with _fresh_schema() as conn:
        for r in run.statements:
            sql = r.sql.strip()
            if r.script or sql.startswith("PRAGMA "):
                continue  # the migrations are applied already; PRAGMAs: see SQLITE_ONLY
            if sql == "BEGIN IMMEDIATE":
                sql = "BEGIN"
            try:
                if r.rows is not None:
                    await conn.executemany(to_numbered(sql), r.rows)
                elif r.params:
                    await conn.execute(to_numbered(sql), *r.params)
                else:
                    await conn.execute(sql)
            except Exception as exc:  # noqa: BLE001 - the first failure ends the replay
                pytest.fail(f"{r.file}:{r.line}: {sql}\n    parameters "
                            f"{r.rows if r.rows is not None else r.params}\n"
                            f"    PostgreSQL: {exc.__class__.__name__}: {exc}")
        expected = _sqlite_tables(run.db_path)
        for table, rows in expected.items():
            got = sorted((tuple(rec) for rec in await conn.fetch(f"SELECT * FROM {table}")),
                         key=repr)
            assert got == rows, f"table {table} differs between SQLite and PostgreSQL"
        assert sum(len(rows) for rows in expected.values()) > 50
