"""Issue 16: an advance granted by an INITIAL is confirmed by the IN's own session.

An UPDATE or TERMINATION on that Session-Id (RFC 4006 §5.2, Used-Service-Unit §8.19)
shows the IN received the INITIAL's CCA and applied the grant: recorded on the advance,
and `reconcile-in` never reverses it, even when the IN's extract lacks it."""

from __future__ import annotations

from datetime import timedelta

from extrabalance.adapters.gy_server import result_code
from extrabalance.service.reconcile_in import reconcile_in
from tests.service.fakes import Harness

M = "201001234567"
IN_A = "in-a.operator.example"
INITIAL, UPDATE, TERMINATION, EVENT = 1, 2, 3, 4


async def _subscriber(h: Harness) -> None:
    await h.add_profile(M)
    await h.lending.set_preferences(M, auto_advance=True)


async def _evidence(h: Harness, loan_id: str):
    return await h.ledger.read(lambda c: c.session_evidence(loan_id))


async def _reconcile(h: Harness, *, apply: bool):
    until = h.clock() + timedelta(minutes=1)
    return await h.ledger.write(lambda tx: reconcile_in(
        tx, [], in_node=IN_A, until=until, apply=apply, now=h.clock()))


async def test_termination_with_used_units_confirms_the_initial_advance(h):
    await _subscriber(h)
    grant = await h.lending.out_of_balance("s1", 0, INITIAL, M, None, IN_A)
    assert result_code(grant) == 2001 and grant.loan_id
    assert await _evidence(h, grant.loan_id) is None
    end = await h.lending.out_of_balance("s1", 1, TERMINATION, M, None, IN_A, used_minor=420)
    assert result_code(end) == 2001
    assert await _evidence(h, grant.loan_id) == (TERMINATION, 1, 420)
    audit = [a for a in await h.audit(M) if a["action"] == "advance_session_evidence"]
    assert len(audit) == 1
    edr = [f for k, f in h.events.events if k == "advance_session_evidence"]
    assert [(f["loan_id"], f["detail"]) for f in edr] == [(grant.loan_id, "s1;3;1;420")]
    # A re-send of the TERMINATION records nothing twice.
    await h.lending.out_of_balance("s1", 1, TERMINATION, M, None, IN_A, used_minor=420)
    assert await _evidence(h, grant.loan_id) == (TERMINATION, 1, 420)

    debt = (await h.check_invariants())["debts"][M]
    for apply in (False, True):  # the extract lacks it: listed, never reversed
        report = await _reconcile(h, apply=apply)
        assert not report.reversed and not report.not_credited
        assert [r["loan_id"] for r in report.session_confirmed_missing] == [grant.loan_id]
        assert (report.session_confirmed_missing[0]["why"]
                == "confirmed by the IN's session, missing from the extract")
    assert (await h.check_invariants())["debts"][M] == debt
    state = await h.ledger.read(lambda c: c.get_loan(grant.loan_id))
    assert state is not None and state.state == "ACTIVE"


async def test_update_without_used_units_is_evidence_too(h):
    await _subscriber(h)
    grant = await h.lending.out_of_balance("s1", 0, INITIAL, M, None, IN_A)
    await h.lending.out_of_balance("s1", 1, UPDATE, M, None, IN_A)
    assert await _evidence(h, grant.loan_id) == (UPDATE, 1, None)


async def test_event_advances_are_unchanged(h):
    await _subscriber(h)
    grant = await h.lending.out_of_balance("e1", 0, EVENT, M, None, IN_A)
    assert result_code(grant) == 2001
    assert await _evidence(h, grant.loan_id) is None
    report = await _reconcile(h, apply=True)
    assert [r["loan_id"] for r in report.reversed] == [grant.loan_id]
    assert not report.session_confirmed_missing


async def test_update_or_termination_of_an_unknown_session_stays_5002(h):
    await _subscriber(h)
    for number, kind in ((1, UPDATE), (2, TERMINATION)):
        out = await h.lending.out_of_balance("nosuch", number, kind, M, None, IN_A,
                                             used_minor=100)
        assert result_code(out) == 5002
    assert not [a for a in await h.audit(M) if a["action"] == "advance_session_evidence"]
    assert await h.loans() == []  # no advance to hold evidence
