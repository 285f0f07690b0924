"""Random sequences of borrow / recharge / out-of-balance (its answer reaching the IN
in time, lost, or overtaken by the confirmation) / replay / IN faults /
crash-restart, checking the money invariants after every step and, at the end, that
the IN's applied credits and debits match the ledger exactly."""

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from extrabalance.adapters.gy_server import result_code
from extrabalance.core.segments import match_segment
from extrabalance.service.ports import RechargeEvent
from tests.core.sample import POLICY, profile
from tests.service.fakes import (
    CRASH_AFTER,
    CRASH_BEFORE,
    LOST_ANSWER,
    NOT_EXECUTED,
    REFUSE,
    TIMEOUT,
    Harness,
    SimulatedCrash,
    credit_key,
)

SUBS = {"201000000001": (400, 6000), "201000000002": (100, 0), "201100000003": (400, 9000)}
CEILING = {
    m: match_segment(profile(m, t, a), POLICY.segments).ceiling_minor for m, (t, a) in SUBS.items()
}
msisdns = st.sampled_from(sorted(SUBS))
faults = st.sampled_from(
    [None, None, None, REFUSE, NOT_EXECUTED, TIMEOUT, LOST_ANSWER, CRASH_BEFORE, CRASH_AFTER]
)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp())
        self.h = Harness(self.dir / "l.db", review_after_attempts=10_000, batch_window_ms=0,
                         advance_confirmation=True)  # the extension: the paths with most cases
        self.run(self._setup())
        self.crashes = 0

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    async def _setup(self):
        for m, (tenure, arpu) in SUBS.items():
            await self.h.add_profile(m, tenure, arpu)
        await self.h.lending.set_preferences("201000000001", auto_advance=True)

    def _with_fault(self, fault, coro_fn):
        if fault:
            self.h.fake_in.fail_next(fault)
        try:
            return self.run(coro_fn())
        except SimulatedCrash:
            self.crashes += 1
            self.run(self.h.restart())
            return None
        finally:
            self.h.fake_in.faults.clear()

    @rule(m=msisdns, tier=st.none() | st.integers(1, 13), key=st.integers(0, 8), fault=faults)
    def borrow(self, m, tier, key, fault):
        self._with_fault(fault, lambda: self.h.lending.borrow(m, tier, "ussd", f"{m}:{key}"))

    @rule(
        m=msisdns,
        event=st.integers(0, 8),
        amount=st.integers(0, 8000),
        extra=st.integers(-2000, 4000),
        fault=faults,
    )
    def recharge(self, m, event, amount, extra, fault):
        # The IN's real balance may differ from what the event says (spent meanwhile).
        self.h.fake_in.balances[m] = max(0, self.h.fake_in.balances.get(m, 0) + amount + extra)
        ev = RechargeEvent(
            f"{m}:e{event}",
            m,
            amount,
            "in-a.operator.example",
            self.h.fake_in.balances[m] if extra % 2 else None,
        )
        self._with_fault(fault, lambda: self.h.payback.handle_recharge(ev))

    @rule(
        m=msisdns,
        session=st.integers(0, 5),
        number=st.integers(0, 2),
        delivery=st.sampled_from(["in_time", "in_time", "lost", "after_confirmation", "crash"]),
        fault=faults,
    )
    def out_of_balance(self, m, session, number, delivery, fault):
        """The IN's out-of-balance CCR. `delivery` says what became of the CCA: it
        reached the IN in time (grant applied), it was lost or came after the IN's
        timer (never applied), it came after the node's confirmation (a duplicate the
        IN ignores), or the node died right after the commit; `fault` hits the
        confirmation."""
        sid = f"in;{m};{session}"
        if fault:
            self.h.fake_in.fail_next(fault)
        try:
            out = self.run(
                self.h.lending.out_of_balance(sid, number, 1, m, None, "in-a.operator.example")
            )
            granted = result_code(out) == 2001 and out.granted_minor and not out.replayed
            if delivery == "crash":
                self.crashes += 1
                self.run(self.h.restart())
                return
            if granted and delivery == "in_time":
                self.h.fake_in.apply_grant(sid, number, m, out.granted_minor)
            self.run(self.h.lending.drain_confirmations())
            if granted and delivery == "after_confirmation":
                self.h.fake_in.apply_grant(sid, number, m, out.granted_minor)
            if fault in (CRASH_BEFORE, CRASH_AFTER):  # the confirmation took the node down
                self.crashes += 1
                self.run(self.h.restart())
        finally:
            self.h.fake_in.faults.clear()

    @rule(fault=st.sampled_from([None, TIMEOUT, LOST_ANSWER]))
    def resolve(self, fault):
        self._with_fault(fault, self.h.resolver.run_once)

    @rule()
    def restart(self):
        self.run(self.h.restart())

    @precondition(lambda self: True)
    @rule(days=st.integers(0, 200))
    def age(self, days):
        self.h.clock.advance(days=days)
        self.run(self.h.accounts.age_debts())

    @invariant()
    def money_invariants(self):
        inv = self.run(self.h.check_invariants())
        for m, debt in inv["debts"].items():
            assert 0 <= debt <= CEILING[m]
        totals = inv["totals"]
        assert totals["recovered_cash"] <= -(totals["disbursed_float"] + totals["fee_income"])
        # every credit the IN applied (advances included) belongs to a loan that is
        # not FAILED
        states = self.run(
            self.h.ledger.read(
                lambda c: {
                    credit_key(sid, number): state
                    for sid, number, state in c.execute(
                        "SELECT diameter_session_id, request_number, state FROM loans"
                    )
                }
            )
        )
        for session in self.h.fake_in.credits:
            assert states.get(session) not in (None, "FAILED"), (session, states.get(session))

    def teardown(self):
        try:
            self.h.fake_in.faults.clear()
            self.run(self.h.resolver.run_once())
            inv = self.run(self.h.check_invariants())
            assert inv["granted_sessions"] == self.h.fake_in.credits
            assert inv["recovered"] == sum(self.h.fake_in.debits.values())
            pending = self.run(
                self.h.ledger.read(
                    lambda c: c.execute(
                        "SELECT (SELECT COUNT(*) FROM loans WHERE state IN"
                        " ('REQUESTED', 'CREDITING', 'UNKNOWN', 'CONFIRMING')) + (SELECT COUNT(*) FROM recoveries"
                        " WHERE state IN ('RECOVERING', 'UNKNOWN'))"
                    ).fetchone()[0]
                )
            )
            assert pending == 0
        finally:
            self.run(self.h.close())
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)


LedgerMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLedgerMachine = LedgerMachine.TestCase


class DeepLedgerMachine(LedgerMachine):
    pass


DeepLedgerMachine.TestCase.settings = settings(
    max_examples=1000,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDeepLedgerMachine = pytest.mark.slow(DeepLedgerMachine.TestCase)
