"""`import-profiles` into the PostgreSQL ledger (each test on a schema of its own): the
same rows accepted and refused with the same reasons as on SQLite, the same ledger
rows, re-import in place (what the node owns untouched), the opt-in column audited
once per change, the last row of an MSISDN winning, and the command's exit codes."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from extrabalance.ledger.profiles import import_profiles, import_profiles_postgresql
from tests.pg import fresh_schema, fresh_schema_url

MIXED = (
    "msisdn,tenure_days,arpu_minor,language,auto_advance,region,level\n"
    "201001234567,400,6000,ar,yes,cairo,3\n"
    "20100123456x,400,6000,en,,cairo,3\n"
    "201001234568,-1,6000,en,,giza,1\n"
    "201001234569,10,6.5,en,,giza,1\n"
    "201001234570,10,0,english,,giza,1\n"
    "201001234571,10,0\n"
    "\n"
    "201001234572,10,0,,,,\n"
    "201001234573,5,7,en,maybe,,\n"
    "201001234574,1,1,en,no,alex,\n"
    "201001234574,2,2,,,\"a \"\"quoted\"\" one\",-7\n"  # twice: the last row wins
)
COLUMNS = "msisdn, tenure_days, arpu_minor, attributes, language, auto_advance_opt_in"


def pg_rows(conninfo: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(conninfo) as conn:
        return conn.execute(sql).fetchall()


def sqlite_rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_same_report_and_rows_as_sqlite(tmp_path: Path) -> None:
    csv_path = tmp_path / "p.csv"
    csv_path.write_text(MIXED)
    db = tmp_path / "l.db"
    on_sqlite = import_profiles(db, csv_path)
    with fresh_schema("eb_profiles") as conninfo:
        on_pg = import_profiles_postgresql(conninfo, csv_path, batch_rows=4)  # 574 twice in one
        assert (on_pg.rows_ok, on_pg.rows_updated, on_pg.bad_rows) == (
            on_sqlite.rows_ok, on_sqlite.rows_updated, on_sqlite.bad_rows)
        assert on_pg.rows_ok == 4 and len(on_pg.bad_rows) == 6
        query = f"SELECT {COLUMNS} FROM subscribers ORDER BY msisdn"
        assert pg_rows(conninfo, query) == sqlite_rows(db, query)
        last = {r[0]: r for r in pg_rows(conninfo, query)}["201001234574"]
        assert last[1:3] == (2, 2) and json.loads(last[3]) == {
            "region": 'a "quoted" one', "level": -7}
        audit = "SELECT msisdn, action, who, why FROM audit ORDER BY msisdn"
        assert pg_rows(conninfo, audit) == sqlite_rows(db, audit) == [
            ("201001234567", "auto_advance_on", "import-profiles", "profile file")]


def test_reimport_is_idempotent_and_keeps_what_the_node_owns(tmp_path: Path) -> None:
    first = tmp_path / "a.csv"
    first.write_text("msisdn,tenure_days,arpu_minor,language\n201000000001,1,2,ar\n")
    second = tmp_path / "b.csv"
    second.write_text("msisdn,tenure_days,arpu_minor,auto_advance\n"
                      "201000000001,30,40,\n201000000002,5,6,on\n")
    with fresh_schema("eb_profiles") as conninfo:
        import_profiles_postgresql(conninfo, first)
        import psycopg

        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("UPDATE subscribers SET barred_manual = 1, ads_opt_out = 1")
        report = import_profiles_postgresql(conninfo, second)
        assert (report.rows_ok, report.rows_updated) == (2, 1)
        again = import_profiles_postgresql(conninfo, second)  # the same file once more
        assert (again.rows_ok, again.rows_updated) == (2, 2)
        assert pg_rows(conninfo, "SELECT msisdn, tenure_days, arpu_minor, language,"
                       " barred_manual, ads_opt_out, auto_advance_opt_in FROM subscribers"
                       " ORDER BY msisdn") == [
            ("201000000001", 30, 40, "ar", 1, 1, 0), ("201000000002", 5, 6, None, 0, 0, 1)]
        # one audit line for the one change, however often the file is imported
        assert pg_rows(conninfo, "SELECT msisdn, action FROM audit") == [
            ("201000000002", "auto_advance_on")]


def test_command_imports_into_the_configured_postgresql_ledger(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from extrabalance.admin_cli import import_profiles_command
    from extrabalance.config import default_config_text

    csv_path = tmp_path / "p.csv"
    csv_path.write_text("msisdn,tenure_days,arpu_minor\n201000000001,1,2\nbad,1,2\n")
    with fresh_schema_url("eb_profiles") as url:
        config = tmp_path / "eb.toml"
        config.write_text(default_config_text().replace(
            'backend = "sqlite"', f'backend = "postgresql"\nurl = "{url}"'), encoding="utf-8")
        assert import_profiles_command(str(config), str(csv_path), progress=False) == 1
        out = capsys.readouterr().out
        assert "rows ok 1" in out and "line 3: msisdn 'bad' is not 6-15 digits" in out
        assert not (tmp_path / "var").exists()  # no SQLite file made beside it
    unreachable = tmp_path / "down.toml"
    unreachable.write_text(default_config_text().replace(
        'backend = "sqlite"',
        'backend = "postgresql"\nurl = "postgresql://postgres@127.0.0.1:9/none"'),
        encoding="utf-8")
    assert import_profiles_command(str(unreachable), str(csv_path), progress=False) == 2
    assert "import-profiles: PostgreSQL at postgresql://postgres@127.0.0.1:9/none" in (
        capsys.readouterr().err)
