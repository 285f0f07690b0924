"""The service fee of a tier under a fee plan, in integer minor units."""

from __future__ import annotations

from extrabalance.core.policy import FeePlan, Tier

BP_PER_UNIT = 10_000  # basis points in 100 %


def fee_for(tier: Tier, plan: FeePlan) -> int:
    """Fee in minor units: per-tier table, else flat + percent (half up), then clamped."""
    if tier.tier_id in plan.by_tier_minor:
        fee = plan.by_tier_minor[tier.tier_id]
    else:
        # Round half up in integers: floor((2*a*bp + 10_000) / 20_000).
        percent_part = (2 * tier.amount_minor * plan.percent_bp + BP_PER_UNIT) // (2 * BP_PER_UNIT)
        fee = plan.flat_minor + percent_part
    fee = max(fee, plan.min_fee_minor)
    if plan.max_fee_minor is not None and fee > plan.max_fee_minor:
        fee = plan.max_fee_minor
    return max(fee, 0)
