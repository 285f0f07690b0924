"""Several nodes on one PostgreSQL ledger, for the end-to-end benchmark, the chaos run
and the demo (docs/scale-out.md).

What this file owns:
* `PgRun`: the run's own PostgreSQL schema, created at the start and dropped at the
  end, so that runs in parallel never share a ledger; the URL each node's
  `storage.url` takes (the schema and an `application_name` naming the node), and
  the copy of the prepared subscribers into it.
* `cluster_node_config`: node i's TOML (its own Origin-Host, Diameter port, EDR
  directory, MQTT client id; the one ledger) from the single node's.
* `PgServerCpu`: CPU seconds of the PostgreSQL server's processes that serve the run
  (the backends whose application_name is the run's, plus the WAL writer,
  checkpointer and background writer), read from /proc before and after, so that
  `cpu_ms_per_loan` counts the database too. The server must run on this machine.
* `snapshot_to_sqlite`: the PostgreSQL ledger copied into a SQLite file after the run,
  so that the reconciliation (bench/reconcile.py) reads one format.
* `ledger_reader`: a read-only DB-API connection on either ledger for the counts taken
  while the nodes run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench.procs import cpu_seconds

PG_DSN_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
PG_DSN_ENV = "EB_BENCH_PG_DSN"  # the server the runs use (each run a schema of its own)
# Server processes whose work a ledger load causes besides its own backends (other
# clients of the same server add to them: measure on a quiet server).
PG_SHARED_PROCESSES = ("walwriter", "checkpointer", "background writer")
NODES_MAX = 8  # node processes one run starts
NODE_POOL_MAX = 8  # each node's PostgreSQL connections


def pg_dsn() -> str:
    return os.environ.get(PG_DSN_ENV, PG_DSN_DEFAULT)


@dataclass
class PgRun:
    """One run's schema on the PostgreSQL server at `dsn`."""

    dsn: str
    schema: str = field(default_factory=lambda: f"eb_run_{secrets.token_hex(5)}")

    @property
    def application_prefix(self) -> str:
        """Every connection of this run's nodes has an application_name starting so."""
        return self.schema.replace("_", "-")

    def url(self, node: str = "bench") -> str:
        """A `storage.url` whose connections use the run's schema and name `node`."""
        options = quote(f"-c search_path={self.schema}", safe="")
        joiner = "&" if "?" in self.dsn else "?"
        return (f"{self.dsn}{joiner}options={options}"
                f"&application_name={quote(f'{self.application_prefix}-{node}', safe='')}")

    def create(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{self.schema}"')

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            # The nodes are stopped; a connection left over (a killed node's, until the
            # server notices) must not keep the schema alive.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name LIKE %s AND pid <> pg_backend_pid()",
                (self.application_prefix + "-%",))
            conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')

    def load(self, sqlite_path: Path) -> int:
        """Copy the prepared SQLite ledger (subscribers, opt-ins) into the schema,
        verified; returns the rows copied."""
        from extrabalance.ledger.pg_copy import copy_ledger

        report = copy_ledger(sqlite_path, self.url("load"))
        if not report.verified:
            raise RuntimeError(f"the subscribers did not copy into PostgreSQL: {report}")
        return sum(t.target_rows for t in report.tables)

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.url("reader"), autocommit=True)


@contextlib.contextmanager
def pg_run(dsn: str | None = None) -> Iterator[PgRun]:
    """A fresh schema for the run, dropped on the way out whatever happened."""
    run = PgRun(dsn or pg_dsn())
    try:
        run.create()
    except Exception as exc:  # noqa: BLE001 - the driver's errors, said plainly
        raise SystemExit(f"extrabalance bench: no PostgreSQL at {run.dsn} ({exc}); "
                         f"set {PG_DSN_ENV}") from None
    try:
        yield run
    finally:
        run.drop()


def node_origin_host(base_origin_host: str, index: int, nodes: int) -> str:
    """Node `index`'s Origin-Host: the configured one for a single node, else one per
    node in the same realm (RFC 6733 §6.3: each Diameter node its own identity)."""
    return base_origin_host if nodes == 1 else f"node{index + 1}.{base_origin_host}"


def cluster_node_config(doc: dict[str, Any], *, index: int, nodes: int, workdir: Path,
                        diameter_port: int, pg: PgRun | None, client_id: str,
                        saga_lease_s: float | None = None) -> dict[str, Any]:
    """Node `index` of `nodes` from the single node's config `doc` (not changed).

    Each node its own name (the sagas it runs are leased to it), Origin-Host, port,
    MQTT client id and EDR directory; `saga_lease_s` how soon a dead node's sagas go to
    another node."""
    out = json.loads(json.dumps(doc))  # deep copy
    out["node"]["origin_host"] = node_origin_host(doc["node"]["origin_host"], index, nodes)
    out["diameter"]["listen_port"] = diameter_port
    if nodes > 1:
        out["node"]["name"] = f"{re.sub(r'-?[0-9]+$', '', doc['node']['name'])}-{index + 1}"
        out["mqtt"]["client_id"] = f"{client_id}-{index + 1}"
    if saga_lease_s is not None:
        out["storage"]["saga_lease_s"] = saga_lease_s
    if pg is not None:
        storage = out["storage"]
        storage["backend"] = "postgresql"
        storage["url"] = pg.url(f"node{index + 1}")
        storage["pool_max"] = NODE_POOL_MAX
        storage["edr_dir"] = str(workdir / f"edr-node{index + 1}")
        for key in ("group_commit_max_ops", "group_commit_wait_ms"):
            storage.pop(key, None)
    return out


class PgServerCpu:
    """CPU seconds the PostgreSQL server spends on the run, between two readings."""

    def __init__(self, pg: PgRun) -> None:
        self.pg = pg
        self._start: dict[int, float] = {}

    def _pids(self) -> list[int]:
        import psycopg

        with psycopg.connect(self.pg.dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid, backend_type, COALESCE(application_name, '')"
                " FROM pg_stat_activity").fetchall()
        prefix = self.pg.application_prefix + "-node"
        return [pid for pid, kind, app in rows
                if app.startswith(prefix) or kind in PG_SHARED_PROCESSES]

    def _reading(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for pid in self._pids():
            seconds = cpu_seconds(pid)
            if seconds is not None:
                out[pid] = seconds
        return out

    def start(self) -> None:
        self._start = self._reading()

    def seconds(self) -> float:
        """CPU seconds since `start` of the processes alive now (a backend that ended
        in between is not counted: the pools keep theirs for the whole run)."""
        now = self._reading()
        return sum(now[pid] - self._start.get(pid, 0.0) for pid in now)

    def pids(self) -> int:
        return len(self._pids())


def snapshot_to_sqlite(pg: PgRun, sqlite_path: Path) -> dict[str, int]:
    """Copy every ledger table of the run's schema into a new SQLite ledger at
    `sqlite_path` (replaced), for the reconciliation; returns rows per table."""
    from extrabalance.ledger.db import connect, migrate

    for suffix in ("", "-wal", "-shm"):
        Path(f"{sqlite_path}{suffix}").unlink(missing_ok=True)
    dst = connect(sqlite_path)
    copied: dict[str, int] = {}
    try:
        migrate(dst)
        tables = [(name, [r[1] for r in dst.execute(f"PRAGMA table_info({name})")])
                  for (name,) in dst.execute(
                      "SELECT name FROM sqlite_master WHERE type = 'table'"
                      " AND name NOT LIKE 'sqlite_%' AND name <> 'schema_version'").fetchall()]
        with pg.connect() as src:
            dst.execute("BEGIN")
            for name, columns in tables:
                cols = ", ".join(columns)
                rows = src.execute(f"SELECT {cols} FROM {name}").fetchall()
                dst.execute(f"DELETE FROM {name}")
                dst.executemany(
                    f"INSERT INTO {name} ({cols}) VALUES ({', '.join('?' * len(columns))})",
                    rows)
                copied[name] = len(rows)
            dst.execute("COMMIT")
    finally:
        dst.close()
    return copied


def ledger_reader(db_path: Path, pg: PgRun | None) -> Any:
    """A read-only connection on the run's ledger (PostgreSQL when `pg`, else the file);
    both take the same parameterless SQL."""
    if pg is not None:
        return pg.connect()
    return sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
