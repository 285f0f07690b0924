"""The node's ledger as configured: `open_ledger(settings.storage)` is the embedded
SQLite `Ledger` (`backend = "sqlite"`) or a `PostgresLedger` over the server every node
of the cluster shares (`backend = "postgresql"`). Both are the services' unit-of-work
port (`extrabalance.service.unit_of_work`); both apply the bundled migrations when
they open, so a node never runs on a schema older than its code.

A few operator commands work on the SQLite file itself (`backup`, `import-profiles`,
`subscriber show|bar|...`, the ledger figures of `report`); `sqlite_only` is their
clear refusal when the ledger is on PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from extrabalance.config import ConfigError, StorageSection
from extrabalance.ledger.ledger import Ledger

if TYPE_CHECKING:
    from extrabalance.ledger.postgres import PostgresLedger

NodeLedger: TypeAlias = "Ledger | PostgresLedger"


def ledger_errors() -> tuple[type[Exception], ...]:
    """The database errors either ledger may raise out of a unit of work."""
    try:
        import psycopg
    except ImportError:
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)


def open_ledger(storage: StorageSection, *, migrate: bool = True,
                node_name: str | None = None) -> NodeLedger:
    """The configured ledger, migrated (raises `ConfigError` when PostgreSQL cannot be
    reached or its schema cannot be brought up to date). `node_name`: on PostgreSQL,
    the node every new saga is leased to (docs/scale-out.md); the node passes its own,
    the commands none."""
    if storage.backend == "sqlite":
        return Ledger(
            storage.path,
            batch_ops_max=storage.group_commit_max_ops,
            batch_window_ms=storage.group_commit_wait_ms,
        )
    conninfo = storage.postgresql_conninfo()
    try:
        import psycopg

        from extrabalance.ledger.postgres import PostgresLedger
    except ImportError as exc:  # the optional extra
        raise ConfigError('storage.backend = "postgresql" needs the PostgreSQL driver: '
                          "pip install 'extrabalance[postgresql]'") from exc
    try:
        if migrate:
            _refuse_to_start_empty_beside_a_file(storage, conninfo)
        return PostgresLedger(conninfo, pool_max=storage.pool_max, migrate=migrate,
                              node_name=node_name, saga_lease_s=storage.saga_lease_s)
    except psycopg.OperationalError as exc:
        raise ConfigError(f"storage.url {storage.postgresql_url_shown()!r}: cannot connect "
                          f"to PostgreSQL: {_first_line(exc)}") from exc
    except RuntimeError as exc:  # a migration failed: the schema is not what this code needs
        raise ConfigError(f"storage.url {storage.postgresql_url_shown()!r}: {exc}") from exc


def _refuse_to_start_empty_beside_a_file(storage: StorageSection, conninfo: str) -> None:
    """A PostgreSQL database without a ledger while `storage.path` holds an SQLite
    ledger with loans: the operator switched the backend without copying the ledger.
    Starting would lend from an empty ledger (every debt forgotten): refuse, saying how
    to copy it."""
    import psycopg

    from extrabalance.ledger.postgres import CONNECT_TIMEOUT_S, schema_version

    path = Path(storage.path)
    if not path.is_file():
        return
    with psycopg.connect(conninfo, autocommit=True,
                         connect_timeout=int(CONNECT_TIMEOUT_S)) as conn:
        if schema_version(conn) > 0:
            return
    try:
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            loans = src.execute("SELECT COUNT(*) FROM loans").fetchone()[0]
        finally:
            src.close()
    except sqlite3.Error:
        return  # not a ledger (or not one with loans): nothing to lose
    if loans:
        raise ConfigError(
            f"storage.url {storage.postgresql_url_shown()!r} has no ledger yet, and the "
            f"SQLite ledger at storage.path {str(path)!r} holds {loans} loans: copy it first "
            f"(stop the node, then `extrabalance ledger migrate --from {path} --config ...`),"
            " or point storage.path elsewhere to start an empty ledger")


def postgresql_problem(storage: StorageSection) -> str | None:
    """Why the configured PostgreSQL ledger cannot be used (None: it answers). Asked by
    `check-config` and before `run`: connects once and runs `SELECT 1`."""
    try:
        conninfo = storage.postgresql_conninfo()
    except ConfigError as exc:
        return str(exc)
    try:
        import psycopg
    except ImportError:
        return ('storage.backend = "postgresql" needs the PostgreSQL driver: '
                "pip install 'extrabalance[postgresql]'")
    from extrabalance.ledger.postgres import CONNECT_TIMEOUT_S

    try:
        with psycopg.connect(conninfo, connect_timeout=int(CONNECT_TIMEOUT_S)) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return (f"storage.url {storage.postgresql_url_shown()!r}: cannot connect to "
                f"PostgreSQL: {_first_line(exc)}")
    return None


def sqlite_only(storage: StorageSection, command: str, instead: str) -> str | None:
    """The refusal of a command that works on the SQLite file when the ledger is on
    PostgreSQL (None on SQLite)."""
    if storage.backend == "sqlite":
        return None
    return (f"{command}: works on the embedded SQLite ledger (storage.path); this "
            f'config has storage.backend = "postgresql": {instead}')


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
