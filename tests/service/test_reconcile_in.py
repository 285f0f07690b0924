"""Issue 16: settle advances by the IN's own records (`extrabalance reconcile-in`).

An advance whose every answer came too late for an RFC-only IN is booked and owed but
never credited; only the IN's records can show it. The reconciliation confirms the
advances the IN applied, reverses (with --apply) those it did not when nothing was
recovered yet, and lists the rest."""

from __future__ import annotations

import asyncio
import io
import json
from datetime import timedelta

from extrabalance.adapters.gy_server import result_code
from extrabalance.admin_cli import reconcile_in_command
from extrabalance.config import load_settings
from extrabalance.report import read_edrs
from extrabalance.service.ports import RechargeEvent
from extrabalance.service.reconcile_in import InGrant, read_extract, reconcile_in
from tests.ops.support import write_config
from tests.service.fakes import Harness

M, M2 = "201001234567", "201001234568"
IN_A = "in-a.operator.example"


async def advances(h: Harness) -> None:
    for msisdn in (M, M2):
        await h.add_profile(msisdn)
        await h.lending.set_preferences(msisdn, auto_advance=True)
    for number in range(3):  # M: three advances in one session
        out = await h.lending.out_of_balance("s1", number, 1 if number == 0 else 2, M, None, IN_A)
        assert result_code(out) == 2001
    assert result_code(await h.lending.out_of_balance("s2", 0, 1, M2, None, IN_A)) == 2001


def extract(*keys: tuple[str, int, str]) -> list[InGrant]:
    return [InGrant(sid, number, msisdn, 500) for sid, number, msisdn in keys]


async def run(h: Harness, grants: list[InGrant], *, apply: bool):
    until = h.clock() + timedelta(minutes=1)
    return await h.ledger.write(lambda tx: reconcile_in(
        tx, grants, in_node=IN_A, until=until, apply=apply, now=h.clock()))


async def test_advances_the_in_never_applied_are_reversed_the_rest_confirmed(h):
    await advances(h)
    # M2 paid part of his debt already: his advance is not reversible by this tool.
    h.fake_in.balances[M2] = 300
    await h.payback.handle_recharge(RechargeEvent("e1", M2, 300, IN_A, 300))
    grants = extract(("s1", 0, M), ("s1", 1, M), ("in-a;9;9", 0, M))  # s1#2 and s2 missing
    dry = await run(h, grants, apply=False)
    assert (dry.advances_checked, dry.confirmed) == (4, 2)
    assert [r["request_number"] for r in dry.not_credited] == [2]
    assert [r["msisdn"] for r in dry.needs_review] == [M2]
    assert [g["session_id"] for g in dry.grants_without_advance] == ["in-a;9;9"]
    assert (await h.check_invariants())["debts"][M] == 1650  # a dry run writes nothing

    done = await run(h, grants, apply=True)
    assert [r["request_number"] for r in done.reversed] == [2] and not done.not_credited
    assert (await h.check_invariants())["debts"][M] == 1100  # 550 no longer owed
    states = sorted((loan.request_number, loan.state) for loan in await h.loans(M))
    assert states == [(0, "ACTIVE"), (1, "ACTIVE"), (2, "FAILED")]
    # The IN's late re-send of that request is refused, not granted again.
    again = await h.lending.out_of_balance("s1", 2, 2, M, None, IN_A)
    assert again.replayed and result_code(again) == 4012
    # Idempotent: a second run reverses nothing more.
    assert not (await run(h, grants, apply=True)).reversed


async def test_the_command_reports_and_applies(h_sqlite, tmp_path):
    h = h_sqlite  # the command opens the configured SQLite file

    async def command(*args, **kwargs):  # as from a shell: a process (thread) of its own
        return await asyncio.to_thread(reconcile_in_command, *args, **kwargs)

    await advances(h)
    config = write_config(tmp_path)
    # The command opens the configured ledger: point it at the harness's.
    text = config.read_text().replace(str(tmp_path / "ledger.db"), str(h.db_path))
    config.write_text(text)
    csv_path = tmp_path / "in-a-grants.csv"
    csv_path.write_text("session_id,request_number,msisdn,amount_minor\n"
                        f"s1,0,{M},500\ns1,1,{M},500\ns1,2,{M},500\n")
    assert len(read_extract(csv_path)) == 3
    until = (h.clock() + timedelta(minutes=1)).isoformat()
    out = io.StringIO()
    code = await command(str(config), str(csv_path), IN_A, until, json_output=True,
                                out=out)
    report = json.loads(out.getvalue())
    assert code == 1 and [r["msisdn"] for r in report["not_credited"]] == [M2]
    out = io.StringIO()
    assert await command(str(config), str(csv_path), IN_A, until, apply=True,
                                json_output=True, out=out) == 0
    assert [r["msisdn"] for r in json.loads(out.getvalue())["reversed"]] == [M2]
    assert (await h.check_invariants())["debts"].get(M2, 0) == 0
    # The reversal is in the EDR, as the report and the policy backtest read it.
    edr_dir = load_settings(str(config)).storage.edr_directory()
    lines = [row for path in sorted(edr_dir.glob("edr-*.csv")) for row in read_edrs(path)]
    reversed_lines = [row for row in lines if row["kind"] == "advance_reversed"]
    assert [(r["msisdn"], r["amount_minor"], r["reason"], r["in_node"], r["debt_after_minor"])
            for r in reversed_lines] == [(M2, "500", "reconcile-in", IN_A, "0")]
    assert reversed_lines[0]["fee_minor"] != ""
    # Usage errors: an unknown IN node, a time without a zone, a bad extract.
    assert await command(str(config), str(csv_path), "in-x.example", until) == 2
    assert await command(str(config), str(csv_path), IN_A, "2026-12-07T00:00:00") == 2
    csv_path.write_text("session_id,msisdn\ns1,1\n")
    assert await command(str(config), str(csv_path), IN_A, until) == 2
