"""`extrabalance demo --nodes 2`: two node processes on one PostgreSQL schema of the
demo's own; the node holding A's dialog is SIGKILLed before A confirms. The other node
ends that dialog with the expired screen and lends nothing; A borrows again on it, the
IN's out-of-balance CCR reaches it, and it recovers the loan from A's recharge. The
ledger must agree with the IN, and the schema must be gone afterwards."""

from __future__ import annotations

from pathlib import Path

from extrabalance.demo import A, B, Transcript
from tests.pg import PG_DSN, admin_connection

EXPIRED = "Session expired. Dial *123# again."


async def test_a_node_killed_mid_dialog_the_other_finishes_the_story(tmp_path: Path) -> None:
    from extrabalance.demo_cluster import cluster_env, play_cluster

    admin = admin_connection()  # skips, saying why, when no server answers
    transcript = Transcript()
    async with cluster_env(tmp_path, 2, PG_DSN) as env:
        summary = await play_cluster(env, transcript)
        schema = env.schema
        alive = [n.name for n in env.nodes if n.alive]
        killed = [n for n in env.nodes if not n.alive]
    assert len(alive) == 1 and len(killed) == 1 and killed[0].process.returncode == -9
    screens = [e for e in transcript.entries if e.kind == "screen" and e.msisdn == A]
    # dial, tier, (kill) confirm -> expired; dial, tier, confirm -> done
    assert [s.dialled for s in screens] == ["*123#", "1", "1", "*123#", "1", "1"]
    assert screens[1].text.startswith("Borrow 1.00 EGP?") and not screens[1].final
    assert screens[2].text == EXPIRED and screens[2].final
    assert screens[5].text.startswith("Done: 1.00 EGP") and screens[5].final
    notes = [e.text for e in transcript.entries if e.kind == "note"]
    assert any("loans for A: 0" in n for n in notes)  # no loan without the confirm screen
    survivor_host = f"node{alive[0][-1]}."
    assert any(n.startswith("answered by " + survivor_host) for n in notes)
    sms_b = [e.text for e in transcript.entries if e.kind == "sms" and e.msisdn == B]
    assert sms_b and "Dial *123#" in sms_b[0]
    sms_a = [e.text for e in transcript.entries if e.kind == "sms" and e.msisdn == A]
    assert sms_a[-1].startswith("Thank you. 1.10 EGP was deducted")
    assert summary.loans == 1 and summary.principal_lent_minor == 100
    assert summary.recovered_minor == 110 and summary.outstanding_minor == 0
    assert summary.ledger_matches_in and summary.journal_balanced
    assert not admin.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                             (schema,)).fetchone()
    admin.close()
