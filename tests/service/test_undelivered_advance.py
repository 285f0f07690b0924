"""An advance whose granting CCA could not be handed to the IN's connection
(service/undelivered.py, docs/diameter.md "An answer the node could not deliver").

The Gy adapter is driven as the Diameter node drives it: the CCR in, the CCA out, then
`answer_handed(request, answer, delivered)` as the transport reports it. An RFC-only IN
never credits an advance whose answer did not leave, so no recharge may take money for
it, and after the IN's hold the resolver reverses it; an answer to the IN's re-send
that did leave clears the mark."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from extrabalance.adapters.gy_server import GyServer
from extrabalance.config import InNodeSection
from extrabalance.diameter import gy
from extrabalance.diameter.codec import FLAG_RETRANSMIT, Message
from extrabalance.diameter.constants import AVP_RESULT_CODE
from extrabalance.service.outcomes import PaybackStatus
from extrabalance.service.ports import RechargeEvent
from extrabalance.service.reconcile_in import reconcile_in
from extrabalance.service.undelivered import REVERSAL_REASON, UNDELIVERED_ADVANCE_HOLD_S
from tests.diameter.helpers import sample_ccr
from tests.service.fakes import Harness

M = "201001234567"
IN_A = "in-a.operator.example"
NODE_HOST, REALM = "eb.operator.example", "operator.example"
ADVANCE, FEE = 500, 50  # the policy's automatic advance and its fee
HOLD_S = UNDELIVERED_ADVANCE_HOLD_S


def gy_server(h: Harness) -> GyServer:
    return GyServer(h.lending, origin_host=NODE_HOST, origin_realm=REALM,
                    service_context_id="extrabalance@3gpp.org", currency_numeric=818,
                    currency_exponent=2, deliveries=h.undelivered)


def oob_ccr(session_id: str = "in-a;1;1", number: int = 0, *, resend: bool = False) -> Message:
    msg = sample_ccr(session_id=session_id, origin_host=IN_A, origin_realm=REALM,
                     destination_realm=REALM, destination_host=NODE_HOST,
                     request_type=gy.INITIAL_REQUEST, request_number=number, msisdn=M,
                     requested_action=None, requested_minor=None, currency_numeric=None)
    return msg._replace(flags=msg.flags | FLAG_RETRANSMIT) if resend else msg


async def answered(h: Harness, server: GyServer, msg: Message, *, delivered: bool) -> Message:
    answer = await server(msg, IN_A)
    server.answer_handed(msg, answer, delivered)
    await server.drain_notes()
    return answer


async def subscriber(h: Harness) -> None:
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)


async def recharge(h: Harness, event_id: str, amount: int = 10_000):
    h.fake_in.balances[M] = h.fake_in.balances.get(M, 0) + amount
    return await h.payback.handle_recharge(RechargeEvent(event_id, M, amount, IN_A, amount))


async def marked(h: Harness) -> frozenset[str]:
    return await h.ledger.read(lambda tx: tx.undelivered_loan_ids(M))


async def test_an_undelivered_grant_is_never_recovered_and_is_reversed_after_the_hold(h):
    await subscriber(h)
    server = gy_server(h)
    answer = await answered(h, server, oob_ccr(), delivered=False)
    assert answer.get(AVP_RESULT_CODE) == 2001  # booked: the grant is the credit
    [loan] = await h.loans(M)
    assert await marked(h) == {loan.loan_id}
    assert (await h.check_invariants())["debts"][M] == ADVANCE + FEE  # counts as debt

    # The IN never credited it: a recharge takes nothing for it.
    out = await recharge(h, "e1")
    assert out.status is PaybackStatus.NOTHING_RECOVERABLE and out.recovered_minor == 0
    assert h.fake_in.balances[M] == 10_000

    # Within the hold the resolver leaves it (the IN may still re-send).
    h.clock.advance(seconds=HOLD_S - 1)
    assert (await h.resolver.run_once()).advances_reversed == 0
    h.clock.advance(seconds=2)
    assert (await h.resolver.run_once()).advances_reversed == 1
    [loan] = await h.loans(M)
    assert loan.state == "FAILED"
    assert (await h.check_invariants())["debts"].get(M, 0) == 0
    assert await marked(h) == frozenset()
    [edr] = [f for k, f in h.events.events if k == "advance_reversed"]
    assert edr["reason"] == REVERSAL_REASON and edr["loan_id"] == loan.loan_id
    assert edr["amount_minor"] == ADVANCE and edr["debt_after_minor"] == 0
    view = await h.view(M)
    assert any(a["action"] == "advance_reversed" and a["who"] == "resolver"
               for a in view["audit"])
    # A late re-send of the IN's request is refused, not granted again; a second pass
    # reverses nothing more.
    late = await answered(h, server, oob_ccr(resend=True), delivered=True)
    assert late.get(AVP_RESULT_CODE) == 4012
    assert (await h.resolver.run_once()).advances_reversed == 0
    assert [loan.state for loan in await h.loans(M)] == ["FAILED"]


async def test_a_delivered_answer_to_the_resend_clears_the_mark(h):
    await subscriber(h)
    server = gy_server(h)
    await answered(h, server, oob_ccr(), delivered=False)
    [loan] = await h.loans(M)
    assert await marked(h) == {loan.loan_id}
    # The IN re-sends with the T flag (here or on another node): the replayed grant
    # reaches it, and it credits the subscriber.
    again = await answered(h, server, oob_ccr(resend=True), delivered=True)
    assert again.get(AVP_RESULT_CODE) == 2001
    h.fake_in.apply_grant("in-a;1;1", 0, M, ADVANCE)
    assert await marked(h) == frozenset()
    out = await recharge(h, "e1")
    assert out.status is PaybackStatus.RECOVERED and out.recovered_minor == ADVANCE + FEE
    h.clock.advance(seconds=HOLD_S * 2)
    assert (await h.resolver.run_once()).advances_reversed == 0
    assert [loan.state for loan in await h.loans(M)] == ["REPAID"]
    await h.check_invariants()


async def test_a_replayed_grant_restarts_the_hold_and_undelivered_again_keeps_the_mark(h):
    await subscriber(h)
    server = gy_server(h)
    await answered(h, server, oob_ccr(), delivered=False)
    h.clock.advance(seconds=HOLD_S - 10)
    # A re-send is answered from the ledger, but its connection dies too.
    again = await answered(h, server, oob_ccr(resend=True), delivered=False)
    assert again.get(AVP_RESULT_CODE) == 2001
    h.clock.advance(seconds=20)  # past the first answer's hold, not the re-send's
    assert (await h.resolver.run_once()).advances_reversed == 0
    assert len(await marked(h)) == 1
    h.clock.advance(seconds=HOLD_S)
    assert (await h.resolver.run_once()).advances_reversed == 1


async def test_only_the_recharge_share_of_other_loans_is_taken(h):
    """A delivered advance is recovered; the undelivered one next to it is not."""
    await subscriber(h)
    server = gy_server(h)
    await answered(h, server, oob_ccr("in-a;1;1"), delivered=True)
    h.fake_in.apply_grant("in-a;1;1", 0, M, ADVANCE)
    h.clock.advance(seconds=1)
    await answered(h, server, oob_ccr("in-a;1;2"), delivered=False)
    first, second = await h.loans(M)
    assert await marked(h) == {second.loan_id}
    out = await recharge(h, "e1")
    assert out.recovered_minor == ADVANCE + FEE  # the first advance only
    assert out.debt_minor == ADVANCE + FEE  # the second still counts as debt
    first, second = await h.loans(M)
    assert (first.state, second.principal_repaid_minor, second.fee_repaid_minor) == (
        "REPAID", 0, 0)
    h.clock.advance(seconds=HOLD_S + 1)
    assert (await h.resolver.run_once()).advances_reversed == 1
    assert (await h.check_invariants())["debts"].get(M, 0) == 0


async def test_a_delivered_first_answer_writes_no_mark(h):
    await subscriber(h)
    server = gy_server(h)
    await answered(h, server, oob_ccr(), delivered=True)
    assert await marked(h) == frozenset()
    h.clock.advance(seconds=HOLD_S * 2)
    assert (await h.resolver.run_once()).advances_reversed == 0


async def test_an_in_with_the_confirmation_extension_gets_no_mark(tmp_path):
    h = Harness(tmp_path / "ledger.db", advance_confirmation=True)
    try:
        await subscriber(h)
        server = gy_server(h)
        await answered(h, server, oob_ccr(), delivered=False)
        assert await marked(h) == frozenset()  # its confirmation settles the advance
        await h.lending.drain_confirmations()
    finally:
        await h.close()


def test_the_hold_is_validated_with_a_clear_message():
    base = {"name": "a", "origin_host": IN_A, "realm": REALM,
            "peers": [{"host": "127.0.0.1", "port": 3868}]}
    assert InNodeSection.model_validate(base).undelivered_advance_hold_s == 300
    with pytest.raises(ValidationError, match="more than 120 s"):
        InNodeSection.model_validate({**base, "undelivered_advance_hold_s": 60})
    with pytest.raises(ValidationError, match="at most 86400 s"):
        InNodeSection.model_validate({**base, "undelivered_advance_hold_s": 10**6})


async def test_reconcile_in_reversing_a_marked_advance_closes_its_mark(h):
    await subscriber(h)
    server = gy_server(h)
    await answered(h, server, oob_ccr(), delivered=False)
    until = h.clock() + timedelta(minutes=1)
    report = await h.ledger.write(lambda tx: reconcile_in(
        tx, [], in_node=IN_A, until=until, apply=True, now=h.clock()))
    assert len(report.reversed) == 1
    assert await marked(h) == frozenset()
    h.clock.advance(seconds=HOLD_S + 1)
    assert (await h.resolver.run_once()).advances_reversed == 0
    assert "review" not in h.events.kinds()
    assert (await h.check_invariants())["debts"].get(M, 0) == 0
