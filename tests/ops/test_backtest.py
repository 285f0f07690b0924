"""`extrabalance policy backtest`: replaying the EDRs a run wrote under the policy that
ran gives back the recorded totals exactly; a new policy (limits from behaviour) gives
its own, side by side."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from extrabalance import cli
from extrabalance.backtest import backtest, edr_rows, recorded_totals, replay
from extrabalance.core.limits import LimitPolicy
from extrabalance.core.model import SubscriberProfile
from extrabalance.observability import EdrWriter
from extrabalance.service.ports import RechargeEvent
from tests.core.sample import POLICY
from tests.service.fakes import Harness, ListEvents

IN_A = "in-a.operator.example"
SUBS = ("201001234567", "201001234568", "201001234569")


class EdrEvents(ListEvents):
    """The service tests' event list, each event also written as an EDR line."""

    def __init__(self, writer: EdrWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, kind: str, **fields: Any) -> None:
        super().emit(kind, **fields)
        self.writer.write(kind, fields)


async def _run(tmp_path: Path) -> tuple[Path, dict[str, SubscriberProfile]]:
    """A week of traffic through the services, its EDRs written to a directory."""
    h = Harness(tmp_path / "ledger.db", POLICY)
    edrs = tmp_path / "edr"
    writer = EdrWriter(edrs, "node-1", clock=lambda: h.clock().timestamp())
    sink = EdrEvents(writer)
    for service in (h.lending, h.payback, h.resolver, h.accounts):
        service.events = sink
    try:
        profiles = {}
        for n, m in enumerate(SUBS):
            await h.add_profile(m, arpu_minor=6000 + n)
            profiles[m] = SubscriberProfile(m, 400, 6000 + n, {})
        a, b, c = SUBS
        await h.payback.handle_recharge(RechargeEvent("r0", a, 3000, IN_A, 3000))
        for day in range(4):
            await h.lending.borrow(a, 4, "ussd", f"a{day}")  # 10.00 + 1.00
            await h.lending.borrow(b, None, "sms", f"b{day}")  # the largest that fits
            await h.lending.borrow(c, 2, "ussd", f"c{day}")
            h.clock.advance(hours=20)
            topup = 900 if day < 3 else 300  # partial paybacks: `a` ends owing
            h.fake_in.balances[a] = topup
            await h.payback.handle_recharge(RechargeEvent(f"ra{day}", a, topup, IN_A, topup))
            h.fake_in.balances[c] = 5000  # a full one
            await h.payback.handle_recharge(RechargeEvent(f"rc{day}", c, 5000, IN_A, 5000))
            h.clock.advance(hours=10)
        h.clock.advance(days=200)
        await h.accounts.age_debts()  # what b still owes is written off
        writer.flush()
        return edrs, profiles
    finally:
        await h.close()


async def test_the_current_policy_replayed_reproduces_the_recorded_totals(tmp_path):
    edrs, profiles = await _run(tmp_path)
    recorded = recorded_totals(edr_rows(edrs))
    assert recorded.loans >= 8 and recorded.refusals > 0
    assert recorded.recovered_minor > 0 and recorded.written_off_minor > 0
    assert replay(edr_rows(edrs), POLICY, profiles) == recorded

    limited = replace(POLICY, limits=LimitPolicy(recharge_share_bp=5000))
    result = backtest(edrs, POLICY, limited, profiles)
    assert result["current"] == result["recorded"] == recorded.as_dict()
    # Limits from recharges: only `a` recharged before borrowing; the others get less.
    assert result["new"]["lent_minor"] < result["current"]["lent_minor"]
    assert result["new"]["bad_debt_minor"] < result["current"]["bad_debt_minor"]


async def test_the_command_prints_recorded_current_and_new(tmp_path, capsys):
    edrs, _ = await _run(tmp_path)
    new = tmp_path / "new.toml"
    from extrabalance.config import default_config_text

    new.write_text(default_config_text().replace("[limits]\nenabled = false",
                                                 "[limits]\nenabled = true"))
    assert cli.main(["policy", "backtest", "--edrs", str(edrs), "--config", str(new),
                     "--ledger", str(tmp_path / "ledger.db"), "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"recorded", "current", "new"}
    assert cli.main(["policy", "backtest", "--edrs", str(tmp_path / "none"),
                     "--config", str(new)]) == 2


async def test_a_cap_per_window_replayed_lends_less(tmp_path):
    """The cap and the cooling-off are replayed from the replay's own loans: at most
    two loans per 72 h lends less than the week as it ran, and nothing more."""
    from extrabalance.core.protection import resolve

    edrs, profiles = await _run(tmp_path)
    capped = replace(POLICY, protection=resolve("none", {"loans_per_window_max": 2,
                                                           "window_hours": 72}))
    result = backtest(edrs, POLICY, capped, profiles)
    assert result["current"] == result["recorded"]
    # Each subscriber borrows every 30 h: the third loan within 72 h is refused.
    assert result["new"]["loans"] < result["current"]["loans"]
    assert result["new"]["lent_minor"] < result["current"]["lent_minor"]
    loose = replace(POLICY, protection=resolve("none", {"loans_per_window_max": 100}))
    assert backtest(edrs, POLICY, loose, profiles)["new"] == result["current"]
