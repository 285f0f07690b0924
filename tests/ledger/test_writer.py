import asyncio
import sqlite3

import pytest

from extrabalance.ledger import Ledger, store
from extrabalance.ledger.db import connect, migrate, migrations
from extrabalance.ledger.writer import LedgerClosed
from tests.core.sample import NOW


@pytest.fixture
async def ledger(tmp_path):
    led = Ledger(tmp_path / "l.db", batch_window_ms=2)
    yield led
    await led.close()


def insert(key):
    def fn(conn):
        conn.execute(
            "INSERT INTO idempotency (key, outcome, created_at) VALUES (?, '{}', 'x')", (key,)
        )
        return key

    return fn


async def test_pragmas_and_schema(tmp_path):
    led = Ledger(tmp_path / "l.db")
    try:
        mode, sync = await led.read(
            lambda c: (
                c.execute("PRAGMA journal_mode").fetchone()[0],
                c.execute("PRAGMA synchronous").fetchone()[0],
            )
        )
        assert mode == "wal" and sync == 2  # FULL
        versions = await led.read(
            lambda c: c.execute("SELECT version FROM schema_version").fetchall()
        )
        assert versions == [(v,) for v, _, _ in migrations()]
    finally:
        await led.close()


def test_migrate_is_idempotent(tmp_path):
    conn = connect(tmp_path / "m.db")
    assert migrate(conn) == migrate(conn) == len(migrations())
    conn.close()


async def test_failing_op_rolls_back_alone(ledger):
    def bad(conn):
        conn.execute("INSERT INTO idempotency (key, outcome, created_at) VALUES ('b', '{}', 'x')")
        raise ValueError("business rule broke")

    results = await asyncio.gather(
        ledger.write(insert("a")),
        ledger.write(bad),
        ledger.write(insert("c")),
        return_exceptions=True,
    )
    assert results[0] == "a" and results[2] == "c"
    assert isinstance(results[1], ValueError)
    keys = await ledger.read(
        lambda c: [r[0] for r in c.execute("SELECT key FROM idempotency ORDER BY key")]
    )
    assert keys == ["a", "c"]


async def test_failing_first_op_of_a_batch_rolls_back_alone(ledger):
    """The first operation of a batch runs without a SAVEPOINT; when it raises, its
    writes are gone and the operations after it still commit."""
    def bad(conn):
        conn.execute("INSERT INTO idempotency (key, outcome, created_at) VALUES ('b', '{}', 'x')")
        raise ValueError("business rule broke")

    results = await asyncio.gather(
        ledger.write(bad), ledger.write(insert("a")), ledger.write(insert("c")),
        return_exceptions=True,
    )
    assert isinstance(results[0], ValueError)
    assert results[1:] == ["a", "c"]
    keys = await ledger.read(
        lambda c: [r[0] for r in c.execute("SELECT key FROM idempotency ORDER BY key")]
    )
    assert keys == ["a", "c"]
    await ledger.write(insert("d"))  # the writer goes on
    assert ledger.writer.ops_committed == 3


async def test_a_batch_of_one_runs_no_savepoint(ledger):
    """A lone write is BEGIN, its own statements and COMMIT: nothing more."""
    statements: list[str] = []
    ledger.writer._conn.set_trace_callback(statements.append)
    await ledger.write(insert("solo"))
    ledger.writer._conn.set_trace_callback(None)
    assert [s.split()[0] for s in statements] == ["BEGIN", "INSERT", "COMMIT"], statements


async def test_constraint_violation_reaches_caller(ledger):
    await ledger.write(insert("dup"))
    with pytest.raises(sqlite3.IntegrityError):
        await ledger.write(insert("dup"))


async def test_group_commit_batches_concurrent_ops(ledger):
    await asyncio.gather(*(ledger.write(insert(f"k{i}")) for i in range(500)))
    w = ledger.writer
    assert w.ops_committed == 500
    assert w.batches_committed < 100  # many ops per fsync
    assert (
        await ledger.read(lambda c: c.execute("SELECT COUNT(*) FROM idempotency").fetchone()[0])
        == 500
    )


async def test_unbalanced_journal_is_refused(ledger):
    def unbalanced(conn):
        store.post(
            conn,
            [("principal_receivable", 100), ("disbursed_float", -99)],
            msisdn="1",
            memo="bad",
            now=NOW,
        )

    with pytest.raises(store.LedgerInvariantError):
        await ledger.write(unbalanced)
    assert await ledger.account_totals() == dict.fromkeys(store.ACCOUNTS, 0)


async def test_closed_ledger_refuses_work(tmp_path):
    led = Ledger(tmp_path / "l.db")
    await led.close()
    with pytest.raises(LedgerClosed):
        await led.write(insert("x"))


async def test_committed_before_future_resolves(tmp_path):
    led = Ledger(tmp_path / "l.db")
    await led.write(insert("durable"))
    # a separate connection (another process would do the same) sees it at once
    other = connect(tmp_path / "l.db")
    assert other.execute("SELECT key FROM idempotency").fetchall() == [("durable",)]
    other.close()
    await led.close()


async def test_loan_lifecycle_and_view(ledger):
    def credit(conn):
        lid = store.insert_loan(
            conn,
            msisdn="2010",
            tier_id=3,
            principal_minor=500,
            fee_minor=50,
            state=store.CREDITING,
            channel="ussd",
            idempotency_key="borrow:x",
            in_node="in-a",
            session_id="s1",
            now=NOW,
        )
        store.settle_loan(conn, lid, store.ACTIVE, NOW, result_code=2001)
        store.settle_loan(conn, lid, store.ACTIVE, NOW)  # idempotent
        return lid

    lid = await ledger.write(credit)
    with pytest.raises(store.LedgerInvariantError):
        await ledger.write(lambda c: store.settle_loan(c, lid, store.FAILED, NOW))
    view = await ledger.subscriber_view("2010")
    assert view["debt_minor"] == 550 and view["loans"][0]["state"] == "ACTIVE"
    assert sorted(j["account"] for j in view["journal"]) == [
        "disbursed_float",
        "fee_income",
        "fee_receivable",
        "principal_receivable",
    ]
    assert view["known"] and view["route"] == {"learned_in_node": None}


async def test_a_deferred_write_rides_in_the_next_batch(ledger):
    """`write_later` starts no batch of its own while work flows: it joins the next
    one, after that batch's own operation, with no savepoint (one statement)."""
    ledger.writer.later_flush_s = 60.0  # only the next write can carry it
    marked = ledger.write_later(insert("later"))
    await asyncio.sleep(0.01)
    assert not marked.done() and ledger.writer.batches_committed == 0
    statements: list[str] = []
    ledger.writer._conn.set_trace_callback(statements.append)
    assert await ledger.write(insert("now")) == "now"
    ledger.writer._conn.set_trace_callback(None)
    assert marked.done() and marked.result() == "later"
    assert ledger.writer.batches_committed == 1 and ledger.writer.ops_committed == 2
    assert [s.split()[0] for s in statements] == [
        "BEGIN", "INSERT", "INSERT", "COMMIT"], statements


async def test_a_deferred_write_alone_commits_after_the_flush_delay(ledger):
    ledger.writer.later_flush_s = 0.01
    marked = ledger.write_later(insert("alone"))
    assert await asyncio.wait_for(marked, 5) == "alone"
    keys = await ledger.read(lambda c: [r[0] for r in c.execute("SELECT key FROM idempotency")])
    assert keys == ["alone"]


async def test_a_failing_deferred_write_fails_alone(ledger):
    """A deferred operation's one statement that fails is undone by SQLite: only that
    operation fails, the batch and the other deferred ones commit."""
    ledger.writer.later_flush_s = 60.0
    await ledger.write(insert("dup"))
    first = ledger.write_later(insert("a"))
    failing = ledger.write_later(insert("dup"))
    last = ledger.write_later(insert("b"))
    assert await ledger.write(insert("c")) == "c"
    assert first.result() == "a" and last.result() == "b"
    assert isinstance(failing.exception(), sqlite3.IntegrityError)
    keys = await ledger.read(
        lambda c: [r[0] for r in c.execute("SELECT key FROM idempotency ORDER BY key")]
    )
    assert keys == ["a", "b", "c", "dup"]


async def test_close_commits_the_deferred_writes(tmp_path):
    led = Ledger(tmp_path / "l.db")
    led.writer.later_flush_s = 60.0
    marked = led.write_later(insert("kept"))
    await led.close()
    assert marked.result() == "kept"
    other = connect(tmp_path / "l.db")
    assert other.execute("SELECT key FROM idempotency").fetchall() == [("kept",)]
    other.close()


async def test_a_deferred_write_that_fails_half_written_fails_its_whole_batch(ledger):
    """Two statements, the second failing: the first cannot be undone alone (there is
    no savepoint), so nothing of the batch is committed and every caller hears it."""
    ledger.writer.later_flush_s = 60.0
    await ledger.write(insert("dup"))

    def two(conn):
        insert("half")(conn)
        return insert("dup")(conn)

    later = ledger.write_later(two)
    with pytest.raises(sqlite3.IntegrityError):
        await ledger.write(insert("c"))
    assert isinstance(later.exception(), sqlite3.IntegrityError)
    keys = await ledger.read(lambda c: [r[0] for r in c.execute("SELECT key FROM idempotency")])
    assert keys == ["dup"]
    assert await ledger.write(insert("d")) == "d"  # the writer goes on
