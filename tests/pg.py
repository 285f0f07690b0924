"""PostgreSQL for the tests: the server at `EB_TEST_PG_DSN` (default the machine's,
`postgresql://postgres@127.0.0.1:5432/test`), each test on a schema of its own that is
dropped afterwards. Skipped, with the reason, only when no server answers; CI always
has one."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

PG_DSN = os.environ.get("EB_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
CONNECT_TIMEOUT_S = 3


def admin_connection():  # type: ignore[no-untyped-def]
    """An autocommit connection to the test server (skips the test when none answers)."""
    psycopg = pytest.importorskip("psycopg")
    try:
        return psycopg.connect(PG_DSN, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL answers at {PG_DSN} ({exc}); set EB_TEST_PG_DSN")


def schema_conninfo(schema: str) -> str:
    """`PG_DSN` with every connection's search_path set to `schema`."""
    from psycopg.conninfo import make_conninfo

    return make_conninfo(PG_DSN, options=f"-c search_path={schema}")


def schema_url(schema: str) -> str:
    """`PG_DSN` as a postgresql:// URL (what `storage.url` takes) whose connections use
    `schema`."""
    from urllib.parse import quote

    joiner = "&" if "?" in PG_DSN else "?"
    return f"{PG_DSN}{joiner}options={quote(f'-c search_path={schema}', safe='')}"


@contextlib.contextmanager
def fresh_schema_url(prefix: str = "eb_test") -> Iterator[str]:
    """As `fresh_schema`, yielding a URL for `storage.url` (a node's config)."""
    with fresh_schema(prefix) as conninfo:
        from psycopg.conninfo import conninfo_to_dict

        options = str(conninfo_to_dict(conninfo)["options"])
        yield schema_url(options.split("search_path=", 1)[1])


@contextlib.contextmanager
def fresh_schema(prefix: str = "eb_test") -> Iterator[str]:
    """A new empty schema; yields a conninfo whose connections use it; dropped after."""
    schema = f"{prefix}_{secrets.token_hex(5)}"
    admin = admin_connection()
    try:
        admin.execute(f"CREATE SCHEMA {schema}")
        yield schema_conninfo(schema)
    finally:
        admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.close()


@contextlib.asynccontextmanager
async def pg_ledger(pool_max: int = 2) -> AsyncIterator[Any]:
    """A `PostgresLedger` on a fresh schema, closed (and the schema dropped) after."""
    from extrabalance.ledger.postgres import PostgresLedger

    with fresh_schema() as conninfo:
        ledger = PostgresLedger(conninfo, pool_max=pool_max)
        try:
            yield ledger
        finally:
            await ledger.close()
