"""SQLite connections and numbered schema migrations.

Every connection gets WAL and `synchronous=FULL`: a commit the node has acknowledged
(a loan credited, a recharge acknowledged to MQTT) survives a power cut. Migrations
are `migrations/NNNN_name.sql`, applied in order, each in its own transaction,
recorded in `schema_version`.

Migrations are portable SQL (SQLite and PostgreSQL) unless their first line is
`-- dialect: sqlite`: such a migration changes only SQLite's storage layout (no
column, type or key changes), so on another database it is recorded as applied
without running (`migrations(dialect=...)` gives it empty SQL there).
"""

from __future__ import annotations

import re
import sqlite3
from importlib import resources
from pathlib import Path

from extrabalance.clock import SYSTEM_CLOCK
from extrabalance.private_files import narrow, private_file

BUSY_TIMEOUT_MS = 10_000  # how long a reader/importer waits behind the writer's lock
# Pages read through a memory map instead of a read() call each: a point lookup in a
# 30-million-row table touches four pages. SQLite only reads through the map (writes
# still go to the WAL with write() and fsync), so durability is unchanged; the price
# is that a disk read error arrives as SIGBUS rather than an SQLite error. SQLite
# clamps the value to its compile-time SQLITE_MAX_MMAP_SIZE (`PRAGMA compile_options`;
# SQLite's default is 0x7fff0000, just under 2 GiB, and common builds keep it), so the
# pages past that offset of a larger file are read with pread() into the page cache.
MMAP_SIZE_BYTES = 1 << 34
CACHE_KIB_DEFAULT = 8_192  # page cache per connection (SQLite's own default is 2 MiB)
STATEMENTS_CACHED_MAX = 256  # prepared statements kept per connection (the business
# SQL is a few dozen fixed strings, so every hot statement is prepared once)
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_DIALECT_LINE = re.compile(r"^-- dialect: ([a-z]+)\s*$")
DIALECT = "sqlite"  # the database these connections and this runner serve


def connect(
    path: str | Path,
    *,
    synchronous: str = "FULL",
    cache_kib: int = CACHE_KIB_DEFAULT,
    factory: type[sqlite3.Connection] | None = None,
) -> sqlite3.Connection:
    """A connection in autocommit mode; callers issue BEGIN/COMMIT themselves.
    `factory`: the connection class; by default `SqliteLedgerTx`, whose methods are the
    unit-of-work port's operations (the PostgreSQL portability test records every
    statement with a subclass)."""
    if factory is None:
        from extrabalance.ledger.sqlite_uow import SqliteLedgerTx  # imports store: late

        factory = SqliteLedgerTx
    private = str(path) != ":memory:" and not str(path).startswith("file:")
    if private:
        private_file(path)  # before SQLite creates it: 0600, and its WAL/SHM inherit that
    conn = sqlite3.connect(
        str(path),
        isolation_level=None,
        check_same_thread=False,
        timeout=BUSY_TIMEOUT_MS / 1000,
        cached_statements=STATEMENTS_CACHED_MAX,
        factory=factory,
    )
    conn.execute("PRAGMA journal_mode=WAL")
    if private:
        for suffix in ("-wal", "-shm"):  # made by an older release under a loose umask
            narrow(f"{path}{suffix}")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
    conn.execute(f"PRAGMA mmap_size={MMAP_SIZE_BYTES}")
    return conn


def migrations(dialect: str = DIALECT) -> list[tuple[int, str, str]]:
    """(version, name, sql) for every bundled migration, in order; a migration meant
    for another dialect only (`-- dialect: NAME` first line) has empty SQL."""
    found = []
    for entry in resources.files("extrabalance.ledger.migrations").iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if m:
            sql = entry.read_text(encoding="utf-8")
            only = _DIALECT_LINE.match(sql.partition("\n")[0])
            if only is not None and only.group(1) != dialect:
                sql = ""
            found.append((int(m.group(1)), m.group(2), sql))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"migration numbers must be 1..N without gaps, got {versions}")
    return found


def migrate(conn: sqlite3.Connection, *, target: int | None = None) -> int:
    """Apply pending migrations (up to `target`, default all); returns the schema
    version now in force."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
    applied_from = current
    for version, name, sql in migrations():
        if version <= current:
            continue
        if target is not None and version > target:
            break
        # executescript would commit on its own; wrap the script so it is all-or-nothing.
        try:
            conn.executescript(
                "BEGIN IMMEDIATE;\n" + sql + "\n"
                f"INSERT INTO schema_version (version, name, applied_at) "
                f"VALUES ({version}, '{name}', '{SYSTEM_CLOCK.now().isoformat()}');\nCOMMIT;"
            )
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise RuntimeError(f"migration {version:04d}_{name} failed: {exc}") from exc
        current = version
    if current != applied_from:
        # A migration that rebuilt a table leaves a WAL file as large as the table;
        # copy it into the database and cut the file back to zero, or its size alone
        # would keep the writer checkpointing after every commit (WAL_BYTES_MAX).
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return int(current)
