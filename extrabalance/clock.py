"""The one clock: every read of the wall clock in the node goes through a `Clock`.

Why one: what the node decides depends on the hour (ads are suppressed in the
operator's quiet hours; EDR files and reports are cut per UTC day; loans age). A test
or a bench that plays a chosen hour gives the node a clock set to that hour instead of
changing the machine's clock. `SYSTEM_CLOCK` is the real one; `StartedClock` starts at
a chosen instant and then advances in real time (`extrabalance run --clock-start`);
`FixedClock` moves only when a test moves it.

Durations (timeouts, rates) are measured with `monotonic()`, which never jumps; only
`now()` and `time()` say what time it is.
"""

from __future__ import annotations

import time as _time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current instant, timezone-aware UTC."""
        ...

    def time(self) -> float:
        """The current instant in seconds since the Unix epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never goes backwards (for durations)."""
        ...


class SystemClock:
    """The machine's clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def time(self) -> float:
        return _time.time()

    def monotonic(self) -> float:
        return _time.monotonic()


SYSTEM_CLOCK = SystemClock()


def parse_instant(text: str) -> datetime:
    """An ISO 8601 instant with its offset (`2026-01-05T12:00:00+02:00`, or `Z`).

    A bare local time is refused: which hour it means would depend on the machine.
    """
    try:
        value = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 instant "
                         "(e.g. 2026-01-05T12:00:00+02:00)") from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{text!r} has no UTC offset: add one (e.g. +02:00 or Z)")
    return value.astimezone(UTC)


class StartedClock:
    """Starts at `start` and advances in real time (monotonic) from when it was made."""

    def __init__(self, start: datetime, base: Clock = SYSTEM_CLOCK) -> None:
        if start.tzinfo is None:
            raise ValueError("a clock's start instant needs a UTC offset")
        self._start = start.astimezone(UTC)
        self._base = base
        self._origin_s = base.monotonic()

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._base.monotonic() - self._origin_s)

    def time(self) -> float:
        return self.now().timestamp()

    def monotonic(self) -> float:
        return self._base.monotonic()


class FixedClock:
    """Stands still until `set()` or `advance()` moves it (tests)."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("a clock's start instant needs a UTC offset")
        self._now = start.astimezone(UTC)
        self._monotonic_s = 0.0

    def now(self) -> datetime:
        return self._now

    def time(self) -> float:
        return self._now.timestamp()

    def monotonic(self) -> float:
        return self._monotonic_s

    def set(self, instant: datetime) -> None:
        if instant.tzinfo is None:
            raise ValueError("a clock's instant needs a UTC offset")
        instant = instant.astimezone(UTC)
        if instant > self._now:
            self._monotonic_s += (instant - self._now).total_seconds()
        self._now = instant

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go backwards by advance(); use set()")
        self._now += timedelta(seconds=seconds)
        self._monotonic_s += seconds
