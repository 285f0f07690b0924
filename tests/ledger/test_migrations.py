"""Schema upgrades keep every row: a ledger built at an older version and filled with
data comes out of `migrate` with the same data under the new layout."""

import os
import sqlite3

import pytest

from extrabalance.ledger.db import connect, migrate, migrations
from extrabalance.ledger.profiles import import_profiles

SUBSCRIBER_COLUMNS = (
    "msisdn, tenure_days, arpu_minor, attributes, language, auto_advance_opt_in,"
    " ads_opt_out, barred_manual, barred_reason, loans_since_full_payback,"
    " learned_in_node, updated_at"
)
SUBSCRIBERS = [
    ("201000000001", 400, 6000, '{"region":"cairo"}', "ar", 1, 0, 0, None, 2, "in-a", "t1"),
    ("201000000002", None, None, None, None, 0, 1, 1, "fraud", 0, None, "t2"),
    ("201000000003", 0, 0, "{}", "en", 0, 0, 0, None, 0, "in-b", "t3"),
]


def version_of(name: str) -> int:
    return next(v for v, n, _ in migrations() if n == name)


@pytest.fixture
def old_ledger(tmp_path):
    """A ledger at the schema just before subscribers became WITHOUT ROWID, with data."""
    path = tmp_path / "old.db"
    conn = connect(path)
    before = version_of("subscribers_without_rowid") - 1
    assert migrate(conn, target=before) == before
    conn.executemany(
        f"INSERT INTO subscribers ({SUBSCRIBER_COLUMNS}) VALUES ({', '.join('?' * 12)})",
        SUBSCRIBERS,
    )
    conn.execute(
        "INSERT INTO loans (loan_id, msisdn, tier_id, principal_minor, fee_minor, state,"
        " channel, created_at, updated_at) VALUES"
        " ('L1', '201000000001', 1, 1000, 100, 'ACTIVE', 'ussd', 't', 't')"
    )
    conn.close()
    return path


def test_upgrade_keeps_every_subscriber_and_drops_the_rowid(old_ledger):
    conn = connect(old_ledger)
    try:
        assert migrate(conn) == len(migrations())
        assert os.path.getsize(f"{old_ledger}-wal") == 0  # the copy is checkpointed
        got = conn.execute(
            f"SELECT {SUBSCRIBER_COLUMNS} FROM subscribers ORDER BY msisdn"
        ).fetchall()
        assert got == SUBSCRIBERS
        assert conn.execute("SELECT loan_id, msisdn FROM loans").fetchall() == [
            ("L1", "201000000001")
        ]
        with pytest.raises(sqlite3.OperationalError, match="rowid"):
            conn.execute("SELECT rowid FROM subscribers")
        # Lookups by MSISDN go straight to the table's own key: no separate index.
        plan = " ".join(
            r[3]
            for r in conn.execute(
                "EXPLAIN QUERY PLAN SELECT tenure_days FROM subscribers WHERE msisdn = ?",
                ("201000000001",),
            )
        )
        assert "PRIMARY KEY" in plan and "autoindex" not in plan
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO subscribers (msisdn, updated_at) VALUES (NULL, 't')")
    finally:
        conn.close()


def test_reimport_after_upgrade_updates_in_place(old_ledger, tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("msisdn,tenure_days,arpu_minor\n201000000001,30,40\n201000000004,5,6\n")
    report = import_profiles(old_ledger, csv_path)  # migrates on open
    assert (report.rows_ok, report.rows_updated) == (2, 1)
    conn = connect(old_ledger)
    try:
        first = conn.execute(
            f"SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE msisdn = '201000000001'"
        ).fetchone()
        # The profile columns changed; what the node owns did not.
        assert first[1:3] == (30, 40)
        assert first[4:11] == SUBSCRIBERS[0][4:11]
        assert conn.execute("SELECT COUNT(*) FROM subscribers").fetchone() == (4,)
    finally:
        conn.close()


def test_sqlite_only_migrations_are_empty_for_other_dialects():
    name = "subscribers_without_rowid"
    sqlite_sql = {n: sql for _, n, sql in migrations()}
    other_sql = {n: sql for _, n, sql in migrations(dialect="postgresql")}
    assert "WITHOUT ROWID" in sqlite_sql[name] and other_sql[name] == ""
    pg_only = ("postgresql_text_order", "postgresql_outbox_order",  # empty on SQLite
               "postgresql_campaign_claim_order")
    for pg in pg_only:
        assert "COLLATE" in other_sql[pg] and sqlite_sql[pg] == ""
    assert {n: s for n, s in other_sql.items() if n != name and n not in pg_only} == {
        n: s for n, s in sqlite_sql.items() if n != name and n not in pg_only
    }


def test_migrate_to_a_target_stops_there(tmp_path):
    conn = connect(tmp_path / "t.db")
    try:
        assert migrate(conn, target=1) == 1
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone() == (1,)
        assert migrate(conn) == len(migrations())
    finally:
        conn.close()
