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


MSISDN_POOL_MAX = 1_000_000  # virtual subscribers one generator handles


def expand_msisdns(spec: str) -> list[str]:
    """`START-END` (inclusive, equal lengths) or a comma list → MSISDNs."""
    spec = spec.strip()
    if "-" in spec and "," not in spec:
        start, _, end = spec.partition("-")
        start, end = start.strip(), end.strip()
        if not (start.isdigit() and end.isdigit()) or len(start) != len(end) or start > end:
            raise ValueError(f"expected START-END of equal-length digits, got {spec!r}")
        count = int(end) - int(start) + 1
        if count > MSISDN_POOL_MAX:
            raise ValueError(f"{count} subscribers, at most {MSISDN_POOL_MAX}")
        return [str(n).zfill(len(start)) for n in range(int(start), int(end) + 1)]
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items or not all(s.isdigit() for s in items):
        raise ValueError(f"expected MSISDNs (digits), got {spec!r}")
    return items


class TrafficGenerator:
    """Runs the mix against the simulators; `run()` returns a `TrafficReport`."""

    def __init__(
        self,
        config: TrafficConfig,
        *,
        smsc: SmscSimulator | None = None,
        in_sim: InSimulator | None = None,
    ) -> None:
        self.config = config
        self.smsc = smsc
        self.in_sim = in_sim
        weights = dict(zip(KINDS, config.mix.weights(), strict=True))
        if smsc is None:
            for kind in ("ussd_menu", "ussd_shortcut", "sms_loan"):
                weights[kind] = 0.0
        if in_sim is None:
            for kind in ("out_of_balance", "recharge"):
                weights[kind] = 0.0
        if in_sim is not None and in_sim.node_peer is None:
            weights["out_of_balance"] = 0.0
        self._mix = TrafficMix(**weights)  # raises when nothing is left to run
        self._rng = random.Random(config.seed)
        self.report = TrafficReport(ussd_latency=Latencies(seed=config.seed))

    async def run(self, stop: asyncio.Event | None = None) -> TrafficReport:
        cfg = self.config
        idle: asyncio.Queue[str] = asyncio.Queue()
        pool = list(cfg.msisdns)
        self._rng.shuffle(pool)
        for msisdn in pool:
            idle.put_nowait(msisdn)
        slots = asyncio.Semaphore(min(cfg.concurrency_max, len(pool)))
        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        started_at = loop.time()
        deadline = started_at + cfg.duration_s if cfg.duration_s is not None else math.inf
        interval_s = 1.0 / cfg.rate_per_s if cfg.rate_per_s else 0.0
        n = 0
        try:
            while cfg.operations_max is None or n < cfg.operations_max:
                if stop is not None and stop.is_set():
                    break
                due = started_at + n * interval_s
                now = loop.time()
                if due >= deadline or now >= deadline:
                    break
                if due > now:
                    await asyncio.sleep(due - now)
                await slots.acquire()
                msisdn = await idle.get()
                if interval_s and loop.time() - due > max(interval_s, 0.005):
                    self.report.late_starts += 1
                kind = self._mix.pick(self._rng)
                self.report.started[kind] += 1
                task = asyncio.create_task(self._one(kind, msisdn, idle, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
            if tasks:
                await asyncio.wait(tasks, timeout=OPERATION_TIMEOUT_S)
        finally:
            for task in tasks:
                task.cancel()
            self.report.elapsed_s = loop.time() - started_at
        return self.report

    async def _one(
        self, kind: str, msisdn: str, idle: asyncio.Queue[str], slots: asyncio.Semaphore
    ) -> None:
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT_S):
                outcome = await getattr(self, f"_{kind}")(msisdn)
        except TimeoutError:
            outcome = "timeout"
        except Exception as exc:  # noqa: BLE001 - a failed operation is counted, not fatal
            outcome = f"error:{type(exc).__name__}"
        self.report.outcomes[f"{kind}:{outcome}"] += 1
        idle.put_nowait(msisdn)
        slots.release()

    async def _ussd(self, msisdn: str, code: str, replies: Sequence[str]) -> str:
        from simulators.handset import ScreenTimeout

        assert self.smsc is not None
        handset = self.smsc.handset(msisdn)
        t0 = time.perf_counter()
        try:
            screen = await handset.dial(code)
            for answer in replies:
                if screen.final:
                    break
                screen = await handset.reply(answer)
        except ScreenTimeout:
            return "screen_timeout"
        if not screen.final:
            await handset.abort()
            return "unfinished"
        self.report.ussd_latency.add((time.perf_counter() - t0) * 1000.0)
        return "final"

    async def _ussd_menu(self, msisdn: str) -> str:
        cfg = self.config
        return await self._ussd(msisdn, cfg.ussd_code, (cfg.menu_choice, cfg.confirm_choice))

    async def _ussd_shortcut(self, msisdn: str) -> str:
        cfg = self.config
        tier = self._rng.choice(cfg.shortcut_tiers)
        code = cfg.ussd_code.removesuffix("#") + f"*{tier}#"
        return await self._ussd(msisdn, code, (cfg.confirm_choice,))

    async def _sms_loan(self, msisdn: str) -> str:
        assert self.smsc is not None
        status = await self.smsc.handset(msisdn).send_sms(self._rng.choice(self.config.sms_keywords))
        return "sent" if status == 0 else f"status_{status:#04x}"

    async def _out_of_balance(self, msisdn: str) -> str:
        assert self.in_sim is not None
        if self.config.oob_spend:
            self.in_sim.spend(msisdn)
        result, _granted = await self.in_sim.send_out_of_balance(msisdn)
        return f"result_{result}"

    async def _recharge(self, msisdn: str) -> str:
        assert self.in_sim is not None
        low, high = self.config.recharge_minor
        await self.in_sim.recharge(msisdn, self._rng.randint(low, high))
        return "done"
