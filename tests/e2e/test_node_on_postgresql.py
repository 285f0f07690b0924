"""The node on the PostgreSQL ledger: the demo's whole story (USSD and SMS loans, two
recharges paid back over MQTT, an automatic advance in a CCA) over real sockets with the
IN and SMSC simulators, the ledger on a PostgreSQL schema of this test's own. The
figures must be those of the SQLite run (tests/e2e/test_demo_story.py), the ledger
must agree with what the IN applied, and stopping the node closes its pool."""

from __future__ import annotations

from extrabalance.demo import A, Transcript, demo_env, play
from extrabalance.ledger.postgres import PostgresLedger
from tests.pg import admin_connection, fresh_schema_url


async def test_the_demo_story_on_postgresql(tmp_path) -> None:
    admin_connection().close()  # skips, saying why, when no server answers
    with fresh_schema_url("eb_node") as url:
        transcript = Transcript()
        overrides = {"storage": {"backend": "postgresql", "url": url,
                                 "edr_dir": str(tmp_path / "edr-node-1"), "pool_max": 4}}
        async with demo_env(tmp_path, overrides) as env:
            ledger = env.node.ledger
            assert isinstance(ledger, PostgresLedger)
            summary = await play(env, transcript)
            view = await ledger.subscriber_view(A)
            edr_dir = env.node.edr.directory
        assert ledger.pool.closed  # the node's stop closed the pool
        assert not (tmp_path / "extrabalance.db").exists()  # no SQLite ledger on the side

    # The same figures as the SQLite run of the same story.
    assert summary.loans == 6 and summary.bundle_loans == 1  # with the demo's data bundle
    assert summary.principal_lent_minor == 2200 and summary.fees_minor == 230
    assert summary.recovered_minor == 550 and summary.outstanding_minor == 1880
    assert summary.in_credited_minor == 1700 and summary.in_debited_minor == 550
    assert summary.bundle_units_credited == {"data": 500 * 2**20}
    assert summary.ledger_matches_in and summary.journal_balanced
    # A: a USSD loan of 5.00 + 0.50, paid back by two recharges (3.00, then 2.50), then
    # the data bundle by SMS (5.00 + 0.50, owed).
    assert view["known"] and view["debt_minor"] == 550 and not view["operation_pending"]
    assert [loan["state"] for loan in view["loans"]] == ["REPAID", "ACTIVE"]
    assert sorted(r["recovered_minor"] for r in view["recoveries"]) == [250, 300]
    screens = [e.text for e in transcript.entries if e.kind == "screen" and e.msisdn == A]
    assert "Done: 5.00 EGP added to your balance. You owe 5.50 EGP." in screens
    sms = [e.text for e in transcript.entries if e.kind == "sms" and e.msisdn == A]
    assert "fully repaid" in sms[-2] and "2.50 EGP" in sms[-2]
    assert sms[-1].startswith("Extra Balance: 500 MB data added to your line")
    # EDRs went to the configured directory.
    assert edr_dir == tmp_path / "edr-node-1"
    lines = "".join(p.read_text() for p in sorted(edr_dir.glob("edr-*.csv")))
    assert lines.count(",loan,") == 5 and lines.count(",payback,") == 2
