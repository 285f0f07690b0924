import pytest

from extrabalance.service.ads import AdRules, AdTrigger, Advertiser
from tests.service.fakes import Harness

# The sample policy's segments: gold (ceiling 120.00), standard, newcomer.
RULES = AdRules(
    max_per_day=2,
    min_interval_s=3600,
    trigger_max_per_day={AdTrigger.LOW_BALANCE: 1, AdTrigger.CAMPAIGN: 1},
    quiet_start_min=22 * 60,
    quiet_end_min=8 * 60,
    timezone="Africa/Cairo",  # NOW (10:00 UTC) is 12:00 there
    send_rate_max_per_s=1000,
    debt_limit_share_bp=8000,
    segment_templates={"gold": {"ad_out_of_balance": "ad_out_of_balance_vip"}},
)


class Ticks:
    """A monotonic clock the test moves by hand (for the token bucket)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def h(tmp_path):
    harness = Harness(tmp_path / "ledger.db")
    harness.ticks = Ticks()
    harness.ads = Advertiser(harness.ledger, harness.notifier, harness.events, harness.policy,
                             RULES, harness.clock, monotonic=harness.ticks)
    harness.lending.ads = harness.ads
    yield harness
    await harness.ads.drain()
    await harness.close()
