"""Domain core: money, segments, tiers, fees, eligibility and payback. No IO here."""
