"""eb_recharges_total{outcome} counts every recharge the node handled (the Grafana
recharges panel reads it), a redelivered one as `replayed`."""

from __future__ import annotations

from datetime import UTC, datetime

from extrabalance.config import load_settings
from extrabalance.node import Node
from extrabalance.recharge.events import RechargeEvent
from extrabalance.service.outcomes import PaybackOutcome, PaybackStatus

STAMP = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


class _Payback:
    def __init__(self, outcomes: list[PaybackOutcome]) -> None:
        self.outcomes = outcomes

    async def handle_recharge(self, event: object) -> PaybackOutcome:
        return self.outcomes.pop(0)


async def test_recharges_are_counted_by_outcome(tmp_path) -> None:
    settings = load_settings(overrides={"storage": {"path": str(tmp_path / "ledger.db")}})
    node = Node(settings, edr_dir=tmp_path / "edr")
    try:
        node.payback = _Payback([  # type: ignore[assignment]
            PaybackOutcome(PaybackStatus.RECOVERED, 550, 0),
            PaybackOutcome(PaybackStatus.NOTHING_OWED),
            PaybackOutcome(PaybackStatus.RECOVERED, 550, 0, replayed=True),
        ])
        for n in range(3):
            await node._on_recharge(RechargeEvent(f"e{n}", "201000000001", 1000, "EGP",
                                                  None, "in-a", STAMP))
        sample = node.metrics.registry.get_sample_value
        assert sample("eb_recharges_total", {"outcome": "recovered"}) == 1
        assert sample("eb_recharges_total", {"outcome": "nothing_owed"}) == 1
        assert sample("eb_recharges_total", {"outcome": "replayed"}) == 1
    finally:
        await node.ledger.close()
