"""Virtual subscribers: a load generator for the Extra Balance node over real sockets.

What this file owns: the traffic mix (USSD loans through the menu and by shortcut, SMS
loans, out-of-balance CCRs from the IN, recharges), the pacing (a target rate or as
fast as the concurrency bound allows, for a duration or a number of operations), the
bounded concurrency, and what is measured (counters, and the latency from the first
USSD request to the final screen as a bounded sample for p50/p95/p99).

It drives the node only through the simulators (`SmscSimulator` handsets and
`InSimulator`), exactly as the network would; it never imports the node's code.
One subscriber has at most one operation in flight (a handset holds one USSD dialog),
so the MSISDN pool bounds the concurrency too.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from simulators.in_node import InSimulator
    from simulators.smsc import SmscSimulator

KINDS = ("ussd_menu", "ussd_shortcut", "sms_loan", "out_of_balance", "recharge")
LATENCY_SAMPLES_MAX = 200_000  # kept per run; beyond it a uniform reservoir sample is kept
CONCURRENCY_MAX = 10_000  # hard ceiling whatever the caller asks
OPERATION_TIMEOUT_S = 30.0  # one virtual subscriber's operation, end to end


@dataclass(frozen=True, slots=True)
class TrafficMix:
    """Relative weights of the operation kinds (need not sum to 1)."""

    ussd_menu: float = 4.0
    ussd_shortcut: float = 2.0
    sms_loan: float = 1.5
    out_of_balance: float = 1.5
    recharge: float = 1.0

    def __post_init__(self) -> None:
        weights = self.weights()
        if any(w < 0 or math.isnan(w) for w in weights):
            raise ValueError("traffic mix weights must be >= 0")
        if sum(weights) <= 0:
            raise ValueError("traffic mix has no positive weight")

    def weights(self) -> tuple[float, ...]:
        return tuple(float(getattr(self, k)) for k in KINDS)

    def pick(self, rng: random.Random) -> str:
        return rng.choices(KINDS, weights=self.weights())[0]

    @classmethod
    def parse(cls, text: str) -> TrafficMix:
        """`ussd_menu=4,sms_loan=1` (kinds left out weigh 0); empty text: the default."""
        if not text.strip():
            return cls()
        values = dict.fromkeys(KINDS, 0.0)
        for item in text.split(","):
            name, sep, weight = item.partition("=")
            name = name.strip()
            if not sep or name not in values:
                raise ValueError(f"expected KIND=WEIGHT with KIND in {', '.join(KINDS)}: {item!r}")
            values[name] = float(weight)
        return cls(**values)


class Latencies:
    """A bounded sample of latencies in milliseconds (reservoir sampling past the bound)."""

    def __init__(self, samples_max: int = LATENCY_SAMPLES_MAX, seed: int = 0) -> None:
        self.samples_max = samples_max
        self._samples: list[float] = []
        self._seen = 0
        self._rng = random.Random(seed)

    def add(self, latency_ms: float) -> None:
        self._seen += 1
        if len(self._samples) < self.samples_max:
            self._samples.append(latency_ms)
            return
        slot = self._rng.randrange(self._seen)
        if slot < self.samples_max:
            self._samples[slot] = latency_ms

    def __len__(self) -> int:
        return self._seen

    def samples(self) -> list[float]:
        return list(self._samples)

    def percentile(self, p: float) -> float | None:
        """Nearest-rank percentile, p in 0..100; None without samples."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        rank = max(1, math.ceil(p / 100.0 * len(ordered)))
        return ordered[min(rank, len(ordered)) - 1]

    def summary(self) -> dict[str, float | None]:
        return {
            "count": float(self._seen),
            "p50_ms": self.percentile(50),
            "p95_ms": self.percentile(95),
            "p99_ms": self.percentile(99),
            "max_ms": max(self._samples) if self._samples else None,
        }


@dataclass(frozen=True, slots=True)
class TrafficConfig:
    msisdns: Sequence[str]
    mix: TrafficMix = field(default_factory=TrafficMix)
    rate_per_s: float | None = 50.0  # None: as fast as concurrency_max allows
    duration_s: float | None = 10.0
    operations_max: int | None = None  # stop after this many operations (whichever first)
    concurrency_max: int = 100
    ussd_code: str = "*123#"
    menu_choice: str = "1"  # option picked on the menu screen
    confirm_choice: str = "1"  # option picked on the confirmation screen
    shortcut_tiers: tuple[int, ...] = (1, 2, 3)  # `*123*N#`
    sms_keywords: tuple[str, ...] = ("LOAN", "LOAN 5", "loan 2")
    recharge_minor: tuple[int, int] = (500, 5000)  # uniform range
    oob_spend: bool = True  # drive the balance to zero before the out-of-balance CCR
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.msisdns:
            raise ValueError("traffic needs at least one MSISDN")
        if self.rate_per_s is not None and self.rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive (or None for max)")
        if self.duration_s is None and self.operations_max is None:
            raise ValueError("give duration_s or operations_max, or the run never ends")
        if not 1 <= self.concurrency_max <= CONCURRENCY_MAX:
            raise ValueError(f"concurrency_max must be within 1..{CONCURRENCY_MAX}")


@dataclass(slots=True)
class TrafficReport:
    started: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)  # "<kind>:<outcome>"
    ussd_latency: Latencies = field(default_factory=Latencies)
    late_starts: int = 0  # operations that started later than the rate asked (saturated)
    elapsed_s: float = 0.0

    @property
    def operations(self) -> int:
        return sum(self.started.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "operations": self.operations,
            "elapsed_s": round(self.elapsed_s, 3),
            "rate_per_s": round(self.operations / self.elapsed_s, 1) if self.elapsed_s else None,
            "started": dict(self.started),
            "outcomes": dict(sorted(self.outcomes.items())),
            "late_starts": self.late_starts,
            "ussd_latency": self.ussd_latency.summary(),
        }
