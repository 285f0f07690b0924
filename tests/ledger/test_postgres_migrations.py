"""The migration runner on PostgreSQL: every bundled migration applied once, in order,
each recorded in `schema_version`; SQLite-only ones recorded without running; nodes
starting together take turns."""

from __future__ import annotations

import threading

import pytest

from extrabalance.ledger import db
from tests.pg import fresh_schema

psycopg = pytest.importorskip("psycopg")


def _connect(conninfo: str):  # type: ignore[no-untyped-def]
    return psycopg.connect(conninfo, autocommit=True)


def test_migrations_apply_once_and_are_recorded() -> None:
    from extrabalance.ledger.postgres import migrate_postgres, schema_version

    bundled = db.migrations(dialect="postgresql")
    with fresh_schema() as conninfo, _connect(conninfo) as conn:
        assert schema_version(conn) == 0
        assert migrate_postgres(conn, target=2) == 2
        assert migrate_postgres(conn) == len(bundled)
        assert migrate_postgres(conn) == len(bundled)  # nothing left to do
        rows = conn.execute("SELECT version, name FROM schema_version ORDER BY version").fetchall()
        assert rows == [(v, n) for v, n, _ in bundled]
        # the SQLite storage-layout migration is recorded, its SQL never ran here
        sqlite_only = [v for v, _, sql in db.migrations(dialect="postgresql") if not sql]
        assert sqlite_only and all(v in {r[0] for r in rows} for v in sqlite_only)
        assert conn.execute("SELECT to_regclass('subscribers_by_msisdn')").fetchone() == (None,)


def test_text_columns_order_as_bytes_like_sqlite() -> None:
    """MSISDNs and timestamps compare byte by byte whatever the database's locale."""
    from extrabalance.ledger.postgres import migrate_postgres

    with fresh_schema() as conninfo, _connect(conninfo) as conn:
        migrate_postgres(conn)
        collations = dict(conn.execute(
            "SELECT table_name || '.' || column_name, collation_name"
            " FROM information_schema.columns WHERE table_schema = current_schema()"
            " AND collation_name IS NOT NULL").fetchall())
        for column in ("subscribers.msisdn", "loans.created_at", "idempotency.created_at",
                       "ads_sent.sent_at", "journal.tx_id", "campaign_recipients.msisdn",
                       "outbox.next_attempt_at", "outbox.sent_at"):
            assert collations.get(column) == "C", column
        by_name = {name: sql for _, name, sql in db.migrations(dialect="sqlite")}
        assert by_name["postgresql_text_order"] == ""  # PostgreSQL's own: not SQLite's


def test_nodes_migrating_at_once_take_turns() -> None:
    from extrabalance.ledger.postgres import migrate_postgres

    with fresh_schema() as conninfo:
        results: list[int] = []
        errors: list[BaseException] = []

        def node() -> None:
            try:
                with _connect(conninfo) as conn:
                    results.append(migrate_postgres(conn))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=node) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert results == [len(db.migrations())] * 3
        with _connect(conninfo) as conn:
            count = conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()
            assert count == (len(db.migrations()),)
