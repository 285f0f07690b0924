"""Live figures for the admin API and the status page.

`RateSampler` reads the node's Prometheus counters once a second into a bounded ring
(`SAMPLES_MAX`) and turns the oldest and newest sample into per-second rates over the
last minute. Reading counters (not hooking the services) keeps the services unaware of
the admin API. Money figures come from the ledger's journal, the one source of truth.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

SAMPLE_PERIOD_S = 1.0
WINDOW_S = 60.0
SAMPLES_MAX = int(WINDOW_S / SAMPLE_PERIOD_S) + 1  # one minute of samples, both ends

# Counter families summed for each rate (names as prometheus_client exports them).
RATE_COUNTERS = {
    "loans": ("eb_loans_total", None),
    "paybacks": ("eb_paybacks_total", None),
    "ads": ("eb_ads_total", ("outcome", "sent")),
}


def counter_sum(registry: CollectorRegistry, sample_name: str,
                label: tuple[str, str] | None = None) -> float:
    """Sum of a counter family's samples, optionally only where label == value."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name != sample_name:
                continue
            if label is not None and sample.labels.get(label[0]) != label[1]:
                continue
            total += sample.value
    return total


def counter_by_label(registry: CollectorRegistry, sample_name: str, label: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == sample_name:
                key = sample.labels.get(label, "")
                out[key] = out.get(key, 0) + int(sample.value)
    return out


@dataclass(frozen=True, slots=True)
class Sample:
    at_s: float  # monotonic
    values: dict[str, float]


class RateSampler:
    def __init__(self, registry: CollectorRegistry,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.clock = clock
        self.samples: deque[Sample] = deque(maxlen=SAMPLES_MAX)
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        values = {key: counter_sum(self.registry, name, label)
                  for key, (name, label) in RATE_COUNTERS.items()}
        self.samples.append(Sample(self.clock(), values))

    def rates_per_s(self) -> dict[str, float]:
        """Per-second rates over the window (0 until two samples exist)."""
        if len(self.samples) < 2:
            return dict.fromkeys(RATE_COUNTERS, 0.0)
        first, last = self.samples[0], self.samples[-1]
        span_s = last.at_s - first.at_s
        if span_s <= 0:
            return dict.fromkeys(RATE_COUNTERS, 0.0)
        return {key: round((last.values[key] - first.values[key]) / span_s, 3)
                for key in RATE_COUNTERS}

    def window_s(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        return round(self.samples[-1].at_s - self.samples[0].at_s, 3)

    def start(self) -> None:
        self.sample()
        self._task = asyncio.create_task(self._run(), name="admin-rate-sampler")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_PERIOD_S)
            self.sample()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


def money_figures(totals: dict[str, int]) -> dict[str, Any]:
    """Outstanding debt and recovery rate from the journal's account totals.

    Recovery rate = recovered / (principal lent + fees charged), over the ledger's
    whole life; `None` before the first loan.
    """
    due = -(totals.get("disbursed_float", 0) + totals.get("fee_income", 0))
    recovered = totals.get("recovered_cash", 0)
    return {
        "outstanding_minor": totals.get("principal_receivable", 0)
        + totals.get("fee_receivable", 0),
        "lent_minor": -totals.get("disbursed_float", 0),
        "fees_minor": -totals.get("fee_income", 0),
        "recovered_minor": recovered,
        "written_off_minor": totals.get("written_off", 0),
        "recovery_rate": round(recovered / due, 4) if due > 0 else None,
    }
