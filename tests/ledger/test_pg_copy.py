"""`extrabalance ledger migrate`: an embedded ledger copied into PostgreSQL, verified
(rows per table, journal sums per account), resumable after a stop, and a re-run
copies nothing twice."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from extrabalance import cli
from extrabalance.core import sagas
from extrabalance.core.limits import LimitState
from extrabalance.core.model import SubscriberProfile
from extrabalance.ledger import Ledger
from tests.ledger.test_unit_of_work_contract import NOW, _loan
from tests.pg import fresh_schema

psycopg = pytest.importorskip("psycopg")
SUBSCRIBERS = 60


async def _embedded_ledger(path: Path) -> dict[str, int]:
    """A ledger with every table holding rows; returns its account totals."""
    ledger = Ledger(path, batch_window_ms=0.5)
    try:
        def fill(tx):  # type: ignore[no-untyped-def]
            for n in range(SUBSCRIBERS):
                m = f"2010012{n:05d}"
                tx.put_profile(SubscriberProfile(m, 100 + n, 5000), NOW)
                loan = _loan(tx, m, key=f"ussd:{n}", now=NOW + timedelta(seconds=n))
                tx.idempotent_put(f"ussd:{n}", {"loan_id": loan}, NOW)
                if n % 3 == 0:
                    rec = tx.insert_recovery(event_id=f"e{n}", msisdn=m, recharge_minor=500,
                                             balance_after_minor=500, in_node="in-a", now=NOW,
                                             session_id=f"d{n}", requested_minor=500)
                    tx.apply_recovery(tx.get_recovery(rec), _split(tx, m, 500), NOW)
                if n % 5 == 0:
                    tx.record_ad(m, "out_of_balance", "ad_oob", NOW)
                if n % 7 == 0:
                    tx.dnd_add([m], "file", "ops", NOW)
                if n % 4 == 0:
                    tx.put_limit_state(m, LimitState(((20500, 100 * n),), 500, 1, 0, 0), NOW)
                if n % 6 == 0:
                    tx.record_session_evidence(loan, f"s{n}", 3, 1, 100 + n, NOW)
                if n % 8 == 0:
                    tx.mark_answer_undelivered(loan, NOW)
                if n % 7 == 0:
                    tx.outbox_put(msisdn=m, template="loan_granted", params={"amount": 1000},
                                  kind="sms", language="en", now=NOW)
            _loan(tx, "201001299999", state=sagas.CREDITING, key="ussd:pending")
            campaign = tx.create_campaign("ad_campaign", None, "ops", NOW)
            tx.add_recipients(campaign, ["201001200001", "201001200002"], NOW)
            tx.set_bar("201001200003", True, "fraud", "ops", NOW)

        await ledger.write(fill)
        return await ledger.account_totals()
    finally:
        await ledger.close()


def _split(tx, msisdn: str, amount: int):  # type: ignore[no-untyped-def]
    from extrabalance.core.payback import split
    from extrabalance.core.policy import RecoveryPolicy

    return split(tx.open_loans(msisdn), amount, RecoveryPolicy())


async def test_copy_verifies_resumes_and_never_duplicates(tmp_path, capsys) -> None:
    from extrabalance.ledger import pg_copy

    source = tmp_path / "ledger.db"
    totals = await _embedded_ledger(source)
    with fresh_schema("eb_copy") as conninfo:
        # A copy that stops after a few batches (the connection lost mid-table).
        seen = []

        def stop_after_three(table: str, total: int, batch: int) -> None:
            seen.append(table)
            if len(seen) == 3:
                raise ConnectionError("lost the server")

        with pytest.raises(ConnectionError):
            pg_copy.copy_ledger(source, conninfo, batch_rows=7, progress=stop_after_three)
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("SELECT COUNT(*) FROM subscribers").fetchone() == (21,)
        # Run again: it continues after the last batch committed.
        resumed: list[tuple[str, int]] = []
        report = pg_copy.copy_ledger(source, conninfo, batch_rows=7,
                                     progress=lambda t, total, n: resumed.append((t, total)))
        assert resumed[0] == ("subscribers", 28)  # the batch after the three committed
        assert report.verified, report.as_dict()
        by_table = {t.table: t for t in report.tables}
        subs = by_table["subscribers"]
        assert subs.source_rows == SUBSCRIBERS + 1 and subs.copied_now == subs.source_rows - 21
        assert all(t.source_rows > 0 for t in report.tables), report.as_dict()
        assert {a: s for a, s in report.journal_target.items()} == {
            a: s for a, s in totals.items() if s or a in report.journal_source}
        # A finished copy, run again through the command: verifies, copies nothing.
        rc = cli.main(["ledger", "migrate", "--from", str(source), "--to",
                       _url(conninfo), "--quiet"])
        out = json.loads(capsys.readouterr().out)
        assert rc == 0 and out["verified"]
        assert all(t["copied_now"] == 0 for t in out["tables"].values())
        # The copy is a ledger the PostgreSQL adapter serves as it is.
        from extrabalance.ledger.postgres import PostgresLedger

        pg = PostgresLedger(conninfo, pool_max=1)
        try:
            assert await pg.account_totals() == totals
            loaded = await pg.read(lambda tx: tx.load_subscriber("201001200003"))
            assert loaded.state.barred_manual and len(loaded.state.open_loans) == 1
        finally:
            await pg.close()


async def test_a_copy_that_does_not_match_is_reported(tmp_path, capsys) -> None:
    source = tmp_path / "ledger.db"
    await _embedded_ledger(source)
    with fresh_schema("eb_copy") as conninfo:
        assert cli.main(["ledger", "migrate", "--from", str(source), "--to", _url(conninfo),
                         "--quiet"]) == 0
        with psycopg.connect(conninfo, autocommit=True) as conn:  # a row lost on the way
            conn.execute("DELETE FROM journal WHERE line_no = 0 AND tx_id = "
                         "(SELECT MIN(tx_id) FROM journal)")
        capsys.readouterr()
        assert cli.main(["ledger", "migrate", "--from", str(source), "--to", _url(conninfo),
                         "--quiet"]) == 1
        captured = capsys.readouterr()
        assert "does NOT match" in captured.err
        out = json.loads(captured.out)
        assert not out["verified"]
        assert out["tables"]["journal"]["source_rows"] == out["tables"]["journal"][
            "target_rows"] + 1


def test_refusals_are_one_clear_line(tmp_path, capsys) -> None:
    assert cli.main(["ledger", "migrate", "--from", str(tmp_path / "none.db"), "--to",
                     "postgresql://eb@127.0.0.1/test"]) == 2
    assert "no such ledger file" in capsys.readouterr().err
    assert cli.main(["ledger", "migrate", "--from", "x.db", "--to",
                     "postgresql://eb:pw@127.0.0.1/test"]) == 2
    err = capsys.readouterr().err
    assert "carries a password" in err and "pw@" not in err


def _url(conninfo: str) -> str:
    """The test schema's conninfo as the URL form the command takes."""
    from psycopg.conninfo import conninfo_to_dict

    from tests.pg import PG_DSN

    options = conninfo_to_dict(conninfo)["options"]
    return f"{PG_DSN}?options={options.replace(' ', '%20').replace('=', '%3D')}"
