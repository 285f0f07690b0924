"""PostgreSQL restarted under a node's traffic (docs/reliability.md "PostgreSQL
restarts"): a cluster of the test's own (initdb/pg_ctl on a free loopback port — the
machine's shared server is never restarted), the lending service borrowing for many
subscribers at once, and the server stopped mid-traffic, fast (`pg_ctl -m fast`) or by
a crash (`-m immediate`), down a second, started again.

Units in flight fail (unknown outcomes for the sagas), units while it is down fail
fast, the ledger reconnects on its own, and after the resolver's pass and a replay of
every request that failed, no money is lost or doubled: every credit the IN applied is
a granted loan of the ledger and the other way round, once each, the journal balanced.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

import tests.service.fakes
from tests.service.fakes import Harness

SUBSCRIBERS = 40
CONCURRENCY = 8
BEFORE = 60  # borrow requests decided before the restart
AFTER_OK = 40  # requests that must succeed after it
DOWN_S = 1.0
ROUNDS_MAX = 200  # rounds of CONCURRENCY requests in any phase (a ledger that stays
# down fails each request within half a second: the test ends, failing)


@pytest.fixture(scope="module")
def pg_server():  # type: ignore[no-untyped-def]
    from bench.pg_server import PgServer, PgServerUnavailable

    try:
        server = PgServer().__enter__()
    except PgServerUnavailable as exc:
        pytest.skip(f"cannot start a PostgreSQL cluster of the test's own: {exc}")
    yield server
    server.remove()


def schema_on(dsn: str) -> Any:
    """`tests.pg.fresh_schema` on `dsn`, each step on a connection of its own (the
    server restarts in between)."""

    @contextlib.contextmanager
    def fresh(prefix: str = "eb_test") -> Iterator[str]:
        import psycopg
        from psycopg.conninfo import make_conninfo

        schema = f"{prefix}_restart"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            conn.execute(f"CREATE SCHEMA {schema}")
        yield make_conninfo(dsn, options=f"-c search_path={schema}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")

    return fresh


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_restart_mid_traffic_loses_and_doubles_nothing(
        pg_server: Any, mode: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tests.service.fakes, "fresh_schema", schema_on(pg_server.dsn))
    h = Harness(tmp_path / "unused.db", backend="postgresql")
    try:
        msisdns = [f"2010020{i:05d}" for i in range(SUBSCRIBERS)]
        for msisdn in msisdns:
            await h.add_profile(msisdn)
        failed: list[tuple[str, str]] = []
        done: list[str] = []
        counter = iter(range(10**6))

        async def one() -> None:
            n = next(counter)
            msisdn, key = msisdns[n % SUBSCRIBERS], f"ussd:restart-{n}"
            try:
                await h.lending.borrow(msisdn, 1, "ussd", key)
                done.append(key)
            except Exception:  # noqa: BLE001 - the ledger's errors while it is down
                failed.append((msisdn, key))

        async def traffic(stop: Any) -> None:
            for _ in range(ROUNDS_MAX):
                if stop():
                    return
                await asyncio.gather(*(one() for _ in range(CONCURRENCY)))
            raise AssertionError(f"{len(done)} requests done, {len(failed)} failed: the"
                                 " ledger did not come back")

        await traffic(lambda: len(done) + len(failed) >= BEFORE)
        before = len(done)
        restart = asyncio.create_task(asyncio.to_thread(pg_server.restart, mode, DOWN_S))
        await traffic(restart.done)  # traffic all through the restart
        await restart
        assert failed, "no request failed while PostgreSQL was down: the test saw nothing"
        await traffic(lambda: len(done) >= before + AFTER_OK)  # the ledger is back by itself
        assert h.ledger.reconnects >= 1

        # The resolver settles what was in flight; every failed request is replayed (the
        # USSD gateway's retry): an answer, never a second loan.
        report = await h.resolver.run_once()
        assert report is not None
        for msisdn, key in failed:
            await h.lending.borrow(msisdn, 1, "ussd", key)
        await h.resolver.run_once()
        unsettled = [ln for ln in await h.loans() if ln.state == "CREDITING"]
        assert unsettled == []
        inv = await h.check_invariants()
        assert inv["granted_sessions"] == h.fake_in.credits
        assert len(h.fake_in.credits) == h.fake_in.credits_applied  # none credited twice
    finally:
        await h.close()
