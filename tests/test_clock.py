"""The one clock: parsing a start instant, a clock that starts at it and advances in
real time, a fixed clock for tests, and `run --clock-start` on the command line."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from extrabalance.cli import build_parser
from extrabalance.clock import FixedClock, StartedClock, parse_instant


class _Manual:
    """A base clock whose monotonic seconds the test moves."""

    def __init__(self) -> None:
        self.s = 100.0

    def now(self) -> datetime:
        raise AssertionError("a started clock reads only the base's monotonic time")

    def time(self) -> float:
        raise AssertionError("a started clock reads only the base's monotonic time")

    def monotonic(self) -> float:
        return self.s


def test_parse_instant_needs_an_offset() -> None:
    assert parse_instant("2026-01-05T23:30:00+02:00") == datetime(2026, 1, 5, 21, 30, tzinfo=UTC)
    assert parse_instant("2026-01-05T21:30:00Z") == datetime(2026, 1, 5, 21, 30, tzinfo=UTC)
    with pytest.raises(ValueError, match="no UTC offset"):
        parse_instant("2026-01-05T23:30:00")
    with pytest.raises(ValueError, match="not an ISO 8601 instant"):
        parse_instant("half past eleven")


def test_started_clock_starts_at_the_instant_and_advances_in_real_time() -> None:
    base = _Manual()
    start = datetime(2026, 1, 5, 21, 30, tzinfo=UTC)
    clock = StartedClock(start, base)
    assert clock.now() == start
    base.s += 90.5
    assert clock.now() == start + timedelta(seconds=90.5)
    assert clock.time() == (start + timedelta(seconds=90.5)).timestamp()
    assert clock.monotonic() == base.s


def test_fixed_clock_moves_only_when_told() -> None:
    clock = FixedClock(datetime(2026, 1, 5, 10, 0, tzinfo=UTC))
    first = clock.now()
    assert clock.now() == first
    clock.advance(60)
    assert clock.now() == first + timedelta(minutes=1)
    assert clock.monotonic() == 60
    clock.set(datetime(2026, 1, 5, 12, 0, tzinfo=UTC))
    assert clock.now().hour == 12
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_run_takes_clock_start() -> None:
    args = build_parser().parse_args(
        ["run", "--config", "x.toml", "--clock-start", "2026-01-05T23:30:00+02:00"])
    assert args.clock_start == datetime(2026, 1, 5, 21, 30, tzinfo=UTC)


def test_run_refuses_a_clock_start_without_offset(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["run", "--config", "x.toml", "--clock-start", "23:30"])
    assert exc.value.code == 2
    assert "--clock-start" in capsys.readouterr().err


def test_nothing_in_the_node_reads_the_wall_clock_but_the_clock_module() -> None:
    import re
    from pathlib import Path

    import extrabalance

    root = Path(extrabalance.__file__).parent
    reads = re.compile(r"datetime\.(now|utcnow|today)\(|\btime\.time\(|date\.today\(|"
                       r"time\.(strftime|localtime)\(")
    found = [f"{path.relative_to(root)}:{n}: {line.strip()}"
             for path in sorted(root.rglob("*.py")) if path.name != "clock.py"
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if reads.search(line) and not line.lstrip().startswith("#")]
    assert not found, "read the time through extrabalance.clock:\n" + "\n".join(found)
