"""A small but realistic policy shared by the core and service tests."""

from __future__ import annotations

from datetime import UTC, datetime

from extrabalance.core.model import OpenLoan, SubscriberProfile, SubscriberState
from extrabalance.core.policy import (
    Condition,
    Currency,
    EligibilityPolicy,
    FeePlan,
    Policy,
    RecoveryPolicy,
    RuleOp,
    Segment,
    Tier,
)

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
EGP = Currency("EGP", 818, 2)

# 12 tiers: 1.00, 2.00, 5.00, 10.00, 15.00, 20.00, 25.00, 30.00, 40.00, 50.00, 75.00, 100.00
TIER_AMOUNTS_MINOR = (100, 200, 500, 1000, 1500, 2000, 2500, 3000, 4000, 5000, 7500, 10000)
TIERS = {i + 1: Tier(i + 1, a) for i, a in enumerate(TIER_AMOUNTS_MINOR)}

GOLD = Segment(
    name="gold",
    conditions=(
        Condition("tenure_days", RuleOp.GE, 365),
        Condition("arpu_minor", RuleOp.GE, 5000),
    ),
    ceiling_minor=12000,
    tier_ids=tuple(range(1, 13)),
    fee_plan="ten_percent",
    bad_debt_limit=3,
)
STANDARD = Segment(
    name="standard",
    conditions=(Condition("tenure_days", RuleOp.GE, 90),),
    ceiling_minor=3300,
    tier_ids=(1, 2, 3, 4, 5, 6, 7, 8),
    fee_plan="flat",
    bad_debt_limit=2,
)
NEWCOMER = Segment(
    name="newcomer",
    conditions=(Condition("region", RuleOp.IN, ("cairo", "giza")),),
    ceiling_minor=600,
    tier_ids=(1, 2, 3),
    fee_plan="flat",
    bad_debt_limit=1,
)


def make_policy(**overrides: object) -> Policy:
    fields: dict[str, object] = {
        "currency": EGP,
        "tiers": TIERS,
        "fee_plans": {
            "ten_percent": FeePlan("ten_percent", percent_bp=1000, min_fee_minor=10),
            "flat": FeePlan("flat", flat_minor=50, by_tier_minor={1: 20}),
        },
        "segments": (GOLD, STANDARD, NEWCOMER),
        "eligibility": EligibilityPolicy(min_tenure_days=30, max_balance_to_borrow_minor=500),
        "recovery": RecoveryPolicy(),
        "auto_advance_tier_id": 3,
    }
    fields.update(overrides)
    return Policy(**fields)  # type: ignore[arg-type]


POLICY = make_policy()


def profile(
    msisdn: str = "201001234567", tenure: int = 400, arpu: int = 6000, **attrs: str | int
) -> SubscriberProfile:
    return SubscriberProfile(msisdn, tenure, arpu, attrs)


def state(
    msisdn: str = "201001234567",
    *,
    prof: SubscriberProfile | None = None,
    loans: tuple[OpenLoan, ...] = (),
    **kw: object,
) -> SubscriberState:
    p = prof if prof is not None else profile(msisdn)
    return SubscriberState(msisdn=msisdn, profile=p, open_loans=loans, **kw)  # type: ignore[arg-type]


def loan(
    loan_id: str, principal: int, fee: int, *, p_paid: int = 0, f_paid: int = 0, at: datetime = NOW
) -> OpenLoan:
    return OpenLoan(loan_id, 1, principal, fee, p_paid, f_paid, at)
