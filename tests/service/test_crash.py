"""A node killed with SIGKILL between recording a loan and settling it: on restart the
resolver settles it against the IN's own memory, and the credit exists exactly once."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from extrabalance.service.outcomes import BorrowStatus
from tests.service.crash_child import RecordedIn
from tests.service.fakes import Harness

ROOT = Path(__file__).resolve().parents[2]
M = "201001234567"


def run_child_until(db: Path, in_state: Path, mode: str, marker: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.service.crash_child", str(db), str(in_state), mode],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        for line in child.stdout:
            if line.strip() == marker:
                break
        else:
            pytest.fail(f"child exited before {marker}: rc={child.wait()}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


@pytest.mark.parametrize(("mode", "marker"), [("after", "APPLIED"), ("before", "SENDING")])
async def test_sigkill_between_intent_and_settlement(tmp_path, mode, marker):
    db, in_state = tmp_path / "ledger.db", tmp_path / "in.json"
    run_child_until(db, in_state, mode, marker)
    fake = RecordedIn.load(in_state)
    fake.path = in_state
    h = Harness(db, fake_in=fake)
    try:
        view = await h.ledger.subscriber_view(M)
        assert [ln["state"] for ln in view["loans"]] == ["CREDITING"]
        report = await h.resolver.run_once()
        assert report.loans_settled == 1
        assert list(fake.credits.values()) == [1000]  # once, whether or not it had landed
        replay = await h.lending.borrow(M, 4, "ussd", "ussd:dialog-1:1")
        assert replay.replayed and replay.status is BorrowStatus.GRANTED
        inv = await h.check_invariants()
        assert inv["granted_sessions"] == fake.credits and inv["debts"] == {M: 1100}
    finally:
        await h.close()
