"""A short fuzz run (20,000 frames) against a node process, in the default suite.

The full run is `make fuzz` (1,000,000 frames); docs/reliability.md has its figures.
"""

from __future__ import annotations

from bench.fuzz import FuzzConfig, format_report, run_fuzz

FRAMES = 20_000


async def test_short_fuzz_run_keeps_the_node_up_and_the_ledger_clean() -> None:
    report = await run_fuzz(FuzzConfig(frames=FRAMES, seed=20_000, smpp_kill_every=2_000,
                                       kill_every=200))
    text = format_report(report)
    assert report.frames >= FRAMES, text
    assert not report.node_crashed, text
    failed = [name for name, ok in report.checks.items() if not ok]
    assert not failed, text
    # every protocol was actually exercised, and the fatal lanes too
    assert report.diameter.answers["connection closed"] > 0, text
    assert report.smpp.extra["binds_killed_on_purpose"] > 0, text
    assert report.mqtt.answers["dead-lettered"] > 0, text
