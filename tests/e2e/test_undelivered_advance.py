"""The chaos run's money bug, end to end: an RFC-only IN (no confirmation extension)
asks the node for credit and its link to the node is cut before the node answers. The
node books the advance (the grant in the CCA is the credit) but the CCA never leaves:
the connection is gone when the answer is ready, and asyncio drops the write without a
word. The IN never credits the subscriber and, here, sends no re-send.

Before the fix the subscriber's next recharge over MQTT recovered that advance: money
taken for airtime never given. Now the node marks the advance when the answer cannot
be handed over, the recharge recovers nothing of it, and once the IN's hold has passed
(the node's clock jumps; nothing sleeps) the resolver reverses it: the ledger matches
what the IN applied."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from extrabalance.clock import StartedClock
from extrabalance.demo import C, demo_env
from extrabalance.diameter.aio.node import NoPeerAvailable, RequestTimeout
from extrabalance.mosquitto import find_mosquitto
from extrabalance.service.recovery import recharge_key
from extrabalance.service.undelivered import UNDELIVERED_ADVANCE_HOLD_S

BOUND_S = 20  # every wait below is bounded by this, never a timing margin
RECHARGE_MINOR = 10_000


class JumpingClock(StartedClock):
    """The node's wall clock, which the test moves forward past the hold."""

    def jump(self, seconds: float) -> None:
        self._start += timedelta(seconds=seconds)


async def until(check: Any) -> Any:
    async with asyncio.timeout(BOUND_S):
        while not (found := await check()):
            await asyncio.sleep(0.02)
    return found


@pytest.mark.skipif(find_mosquitto() is None, reason="needs Mosquitto (make test installs it)")
async def test_an_advance_whose_answer_never_left_is_not_recovered_and_is_reversed(tmp_path):
    clock = JumpingClock(datetime.now(UTC))
    async with demo_env(tmp_path, clock=clock) as env:
        node, in_sim = env.node, env.in_sim
        await node.lending.set_preferences(C, auto_advance=True)
        in_sim.set_balance(C, 0)
        in_sim.oob_resends_max = 0  # the IN gives up; no other node answers a re-send
        applied_before = len(in_sim.applied())

        decide = node.lending.out_of_balance
        cut: list[object] = []

        async def cut_before_answering(*args: Any, **kwargs: Any) -> Any:
            outcome = await decide(*args, **kwargs)  # booked: the grant is the credit
            connections = set(node.diameter._connections)
            await in_sim.disconnect()
            async with asyncio.timeout(BOUND_S):  # the node sees its end close
                while not all(conn._lost for conn in connections):
                    await asyncio.sleep(0.01)
            cut.append(outcome)
            return outcome

        node.lending.out_of_balance = cut_before_answering  # type: ignore[method-assign]
        with pytest.raises((RequestTimeout, NoPeerAvailable, ConnectionError)):
            await in_sim.send_out_of_balance(C)  # the IN's request dies with its link
        async with asyncio.timeout(BOUND_S):  # the node's decision ends after the cut
            while not cut:
                await asyncio.sleep(0.02)
        node.lending.out_of_balance = decide  # type: ignore[method-assign]
        assert cut[0].granted_minor  # type: ignore[attr-defined]  # booked: an advance
        [loan] = await node.ledger.read(lambda tx: tx.open_loans(C))
        advance_owed = loan.owed_minor
        assert await until(lambda: node.ledger.read(lambda tx: tx.undelivered_loan_ids(C))) == {
            loan.loan_id}
        # The IN applied nothing: no grant reached it.
        assert not [op for op in in_sim.applied()[applied_before:] if op.msisdn == C]

        # The subscriber recharges; the IN publishes it over MQTT.
        await in_sim.wait_connected(BOUND_S)
        event = await in_sim.recharge(C, RECHARGE_MINOR)
        key = recharge_key(event.event_id)
        outcome = await until(lambda: node.ledger.read(lambda tx: tx.idempotent_get(key)))
        assert outcome["status"] == "NOTHING_RECOVERABLE", outcome
        assert in_sim.balance(C) == RECHARGE_MINOR  # nothing taken for that advance
        assert await node.ledger.read(lambda tx: tx.debt_owed(C)) == advance_owed

        # Within the hold nothing is reversed; past it the resolver reverses it.
        assert (await node.resolver.run_once()).advances_reversed == 0
        clock.jump(UNDELIVERED_ADVANCE_HOLD_S + 1)
        assert (await node.resolver.run_once()).advances_reversed == 1
        assert await node.ledger.read(lambda tx: tx.debt_owed(C)) == 0
        reversed_loan = await node.ledger.read(lambda tx: tx.get_loan(loan.loan_id))
        assert reversed_loan is not None and reversed_loan.state == "FAILED"
        # The ledger matches the IN: what the node says it advanced and is owed equals
        # what the IN credited (nothing), and the subscriber kept his whole recharge.
        grants = [op for op in in_sim.applied() if op.msisdn == C
                  and op.action == "OUT_OF_BALANCE_GRANT"]
        assert sum(op.amount_minor for op in grants) == 0
        assert in_sim.balance(C) == RECHARGE_MINOR
        audit = await node.ledger.read(lambda tx: tx.audit_trail(C, ("advance_reversed",)))
        assert len(audit) == 1  # one reversal, by the resolver
        # What the operator's dashboard reads (eb_advance_answers_undelivered).
        counted = node.undelivered_advances()
        assert (counted["marked"], counted["reversed"], counted["cleared"]) == (1, 1, 0)
