"""The lending policy as plain frozen data.

The operator's TOML config is validated by `extrabalance.config` and turned into a
`Policy`; everything in `core/` reads only these types. Amounts are integer minor
units (piastres, cents) of the node's one currency; percentages are basis points
(1 % = 100 bp) so that no float ever touches money.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from extrabalance.core.limits import LimitPolicy
from extrabalance.core.protection import ProtectionPolicy


@dataclass(frozen=True, slots=True)
class Currency:
    code: str  # ISO 4217 alpha, e.g. "EGP"
    numeric: int  # ISO 4217 numeric, e.g. 818 (Diameter Currency-Code)
    exponent: int  # minor units per major = 10**exponent, e.g. 2


BUNDLE_KINDS = ("data", "voice", "sms")  # what a bundle tier credits at the IN
MONEY = "money"  # the kind of a tier that credits airtime


@dataclass(frozen=True, slots=True)
class Bundle:
    """What a bundle tier credits at the IN instead of money: `quantity` in the unit
    of its kind on the wire (RFC 4006 §8.16-8.26): data in octets (CC-Total-Octets),
    voice in seconds (CC-Time), SMS in units (CC-Service-Specific-Units), for the
    service the IN knows by `service_identifier` and/or `rating_group`."""

    kind: str  # one of BUNDLE_KINDS
    quantity: int
    service_identifier: int | None = None
    rating_group: int | None = None

    def as_param(self) -> str:
        """The bundle as a message parameter, `kind:quantity` (`data:524288000`): the
        templates turn it into words in the subscriber's language (`{bundle}`)."""
        return f"{self.kind}:{self.quantity}"


@dataclass(frozen=True, slots=True)
class Tier:
    """A loan denomination. `tier_id` is what the subscriber types (1..N).

    `amount_minor` is what he owes for it (before the fee): the airtime credited, or,
    for a bundle tier, the bundle's money price; fees, ceilings and recovery read it
    alike."""

    tier_id: int
    amount_minor: int
    bundle: Bundle | None = None

    @property
    def kind(self) -> str:
        return self.bundle.kind if self.bundle is not None else MONEY


@dataclass(frozen=True, slots=True)
class FeePlan:
    """Fee for a tier: a flat amount, a percentage, or a per-tier table.

    Resolution order: `by_tier_minor[tier_id]` if present, else
    `flat_minor + amount * percent_bp / 10_000` (rounded half up), then clamped to
    [`min_fee_minor`, `max_fee_minor`] when those are set.
    """

    name: str
    flat_minor: int = 0
    percent_bp: int = 0
    min_fee_minor: int = 0
    max_fee_minor: int | None = None
    by_tier_minor: Mapping[int, int] = field(default_factory=dict)


class RuleOp(str, Enum):
    GE = ">="
    GT = ">"
    LE = "<="
    LT = "<"
    EQ = "=="
    NE = "!="
    IN = "in"


@dataclass(frozen=True, slots=True)
class Condition:
    """One test on a subscriber attribute: `tenure_days >= 365`, `region in [..]`.

    Built-in attributes: `tenure_days`, `arpu_minor`; any other name is looked up in
    the imported profile attributes. A missing attribute makes the condition false.
    """

    attribute: str
    op: RuleOp
    value: int | str | tuple[int | str, ...]


@dataclass(frozen=True, slots=True)
class Segment:
    """A class of subscribers: all `conditions` must hold (first matching segment wins)."""

    name: str
    conditions: tuple[Condition, ...]
    ceiling_minor: int  # most a subscriber may owe at once (principal + fee)
    tier_ids: tuple[int, ...]  # tiers this segment may take
    fee_plan: str  # name of a FeePlan
    bad_debt_limit: int  # loans without a full payback before barring


class PaybackOrder(str, Enum):
    FEE_FIRST = "fee_first"
    PRINCIPAL_FIRST = "principal_first"


@dataclass(frozen=True, slots=True)
class RecoveryPolicy:
    order: PaybackOrder = PaybackOrder.FEE_FIRST
    share_bp: int = 10_000  # share of each recharge that may go to debt (100 %)
    min_balance_left_minor: int = 0  # never leave the subscriber below this
    overdue_days: int = 30
    write_off_days: int = 180


@dataclass(frozen=True, slots=True)
class EligibilityPolicy:
    min_tenure_days: int = 0
    max_balance_to_borrow_minor: int | None = None  # refuse if balance is above this
    check_balance_at_in: bool = False  # ask the IN (CHECK_BALANCE) for that before a loan


@dataclass(frozen=True, slots=True)
class Policy:
    currency: Currency
    tiers: Mapping[int, Tier]
    fee_plans: Mapping[str, FeePlan]
    segments: tuple[Segment, ...]  # in config order; first match wins
    eligibility: EligibilityPolicy
    recovery: RecoveryPolicy
    auto_advance_tier_id: int | None = None  # tier granted inside an out-of-balance CCR
    limits: LimitPolicy | None = None  # limits from behaviour (core/limits.py); None: off
    # consumer protection (core/protection.py); the default changes nothing
    protection: ProtectionPolicy = field(default_factory=ProtectionPolicy)
