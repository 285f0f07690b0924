"""`extrabalance ledger migrate`: copy an embedded (SQLite) ledger into PostgreSQL.

What this file owns: the copy, table by table in primary-key order and in batches,
each batch one PostgreSQL transaction that also records how far the copy got
(`ledger_copy_progress`), and the verification that follows it (rows per table, and the
journal's sum per account, on both sides).

Resumable: a copy that stops (a lost connection, Ctrl-C, a full disk) is run again
with the same arguments and continues after the last batch committed; rows are
inserted with `ON CONFLICT DO NOTHING`, so a batch never lands twice. A copy that
finished verifies again and copies nothing.

The source must not change while it is copied: stop the node first (or copy a
`extrabalance backup`). The copy reads the SQLite file read-only, in one snapshot.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from extrabalance.ledger import db
from extrabalance.ledger.postgres import migrate_postgres

BATCH_ROWS = 5_000
_PROGRESS_DDL = (
    "CREATE TABLE IF NOT EXISTS ledger_copy_progress ("
    " table_name TEXT PRIMARY KEY, last_key TEXT NOT NULL, rows_copied BIGINT NOT NULL,"
    " source TEXT NOT NULL)"
)


class CopyError(Exception):
    """The copy cannot start or did not verify; the message says why."""


@dataclass(slots=True)
class TableReport:
    table: str
    source_rows: int
    target_rows: int
    copied_now: int  # rows inserted by this run (0 on a re-run after a finished copy)

    @property
    def matches(self) -> bool:
        return self.source_rows == self.target_rows


@dataclass(slots=True)
class CopyReport:
    tables: list[TableReport] = field(default_factory=list)
    journal_source: dict[str, int] = field(default_factory=dict)
    journal_target: dict[str, int] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return (all(t.matches for t in self.tables)
                and self.journal_source == self.journal_target)

    def as_dict(self) -> dict[str, Any]:
        return {
            "verified": self.verified,
            "tables": {t.table: {"source_rows": t.source_rows, "target_rows": t.target_rows,
                                 "copied_now": t.copied_now} for t in self.tables},
            "journal_sum_per_account": {"source": self.journal_source,
                                        "target": self.journal_target},
        }


def _open_source(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise CopyError(f"{path}: no such ledger file")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        version = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise CopyError(f"{path}: not an Extra Balance ledger ({exc})") from exc
    latest = len(db.migrations())
    if version[0] != latest:
        conn.close()
        raise CopyError(f"{path}: ledger schema {version[0]}, this release's is {latest}: "
                        "start the node on it once (it upgrades the file), then copy")
    return conn


def _tables(src: sqlite3.Connection) -> list[tuple[str, list[str], list[str]]]:
    """(table, columns, primary-key columns) of every ledger table."""
    out = []
    for (name,) in src.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        " AND name <> 'schema_version' ORDER BY rowid"
    ).fetchall():
        info = src.execute(f"PRAGMA table_info({name})").fetchall()
        columns = [r[1] for r in info]
        key = [r[1] for r in sorted((r for r in info if r[5]), key=lambda r: r[5])]
        if not key:
            raise CopyError(f"table {name} has no primary key: cannot copy it in order")
        out.append((name, columns, key))
    out.sort(key=lambda t: t[0] != "subscribers")  # subscribers first, then as created
    return out


def copy_ledger(
    source: str | Path,
    conninfo: str,
    *,
    batch_rows: int = BATCH_ROWS,
    progress: Callable[[str, int, int], None] | None = None,
) -> CopyReport:
    """Copy the SQLite ledger at `source` into the PostgreSQL database at `conninfo`
    (migrated first), then verify; returns the report (`verified` tells)."""
    path = Path(source)
    src = _open_source(path)
    try:
        with psycopg.connect(conninfo, autocommit=True) as dst:
            migrate_postgres(dst)
            dst.execute(_PROGRESS_DDL)
            src.execute("BEGIN")  # one snapshot for the copy and the verification
            report = CopyReport()
            for table, columns, key in _tables(src):
                copied = _copy_table(src, dst, table, columns, key, str(path), batch_rows,
                                     progress)
                report.tables.append(TableReport(
                    table,
                    int(src.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]),
                    int(dst.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]),  # type: ignore[index]
                    copied,
                ))
            sums = "SELECT account, SUM(amount_minor) FROM journal GROUP BY account ORDER BY account"
            report.journal_source = {a: int(s) for a, s in src.execute(sums)}
            report.journal_target = {a: int(s) for a, s in dst.execute(sums)}
            src.execute("COMMIT")
            return report
    finally:
        src.close()


def _copy_table(
    src: sqlite3.Connection,
    dst: psycopg.Connection[Any],
    table: str,
    columns: list[str],
    key: list[str],
    source: str,
    batch_rows: int,
    progress: Callable[[str, int, int], None] | None,
) -> int:
    row = dst.execute(
        "SELECT last_key, rows_copied, source FROM ledger_copy_progress WHERE table_name = %s",
        (table,),
    ).fetchone()
    last: list[Any] | None = None
    copied_before = 0
    if row is not None:
        if row[2] != source:
            raise CopyError(f"the target holds a copy of {row[2]!r}, not of {source!r}: "
                            "copy into an empty database (or schema)")
        last, copied_before = json.loads(row[0]), int(row[1])
    elif dst.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None:
        raise CopyError(f"the target's {table} table already holds rows that no copy wrote: "
                        "copy into an empty database (or schema)")
    key_at = [columns.index(k) for k in key]
    cols = ", ".join(columns)
    keys = ", ".join(key)
    read_first = f"SELECT {cols} FROM {table} ORDER BY {keys} LIMIT ?"
    read_next = (f"SELECT {cols} FROM {table} WHERE ({keys}) > ({', '.join('?' * len(key))})"
                 f" ORDER BY {keys} LIMIT ?")
    insert = (f"INSERT INTO {table} ({cols}) VALUES ({', '.join(['%s'] * len(columns))})"
              f" ON CONFLICT ({keys}) DO NOTHING")
    copied_now = 0
    while True:
        if last is None:
            rows = src.execute(read_first, (batch_rows,)).fetchall()
        else:
            rows = src.execute(read_next, (*last, batch_rows)).fetchall()
        if not rows:
            return copied_now
        last = [rows[-1][i] for i in key_at]
        with dst.transaction():
            cur = dst.cursor()
            cur.executemany(insert, rows)
            copied_now += max(cur.rowcount, 0)
            dst.execute(
                "INSERT INTO ledger_copy_progress (table_name, last_key, rows_copied, source)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (table_name) DO UPDATE SET"
                " last_key = excluded.last_key, rows_copied = excluded.rows_copied",
                (table, json.dumps(last), copied_before + copied_now, source),
            )
        if progress is not None:
            progress(table, copied_before + copied_now, len(rows))
