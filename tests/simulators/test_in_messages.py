"""The IN simulator's Diameter answers, message in → message out (no sockets).

The loopback tests (test_in_loopback.py) run the same paths through real DiameterNode
connections; these pin down every answer precisely and fast.
"""

from __future__ import annotations

from extrabalance.diameter import codec, gy
from simulators.in_node import InNodeSpec, InSimulator, MsisdnRange

A = InNodeSpec("in-a", "in-a.test", "test", ranges=(MsisdnRange.parse("2010*"),))
B = InNodeSpec("in-b", "in-b.test", "test", ranges=(MsisdnRange.parse("2011*"),))
SUB = "201000000001"


def ccr(
    action: int | None, amount: int | None, *, session: str = "eb;1;1", number: int = 0,
    msisdn: str = SUB, dest: str | None = "in-a.test", request_type: int = 4,
    retransmit: bool = False, currency: int = 818,
) -> codec.Message:
    return gy.build_ccr(
        gy.CreditControlRequest(
            session_id=session, origin_host="eb.test", origin_realm="test",
            destination_realm="test", destination_host=dest, request_type=request_type,
            request_number=number, msisdn=msisdn, requested_action=action,
            requested_minor=amount, currency_numeric=currency,
        ),
        retransmit=retransmit,
    )


async def ask(sim: InSimulator, msg: codec.Message, node: str = "in-a") -> gy.CreditControlAnswer | None:
    answer = await sim._handle(node, msg)
    if answer is None:
        return None
    # Round trip through the codec, as the wire would.
    return gy.parse_cca(codec.decode(codec.encode(answer)))


def sim(**kw: object) -> InSimulator:
    return InSimulator([A, B], None, seed=1, **kw)  # type: ignore[arg-type]


async def test_refund_then_duplicates_with_and_without_t_flag_apply_once() -> None:
    s = sim()
    first = await ask(s, ccr(gy.REFUND_ACCOUNT, 500))
    again = await ask(s, ccr(gy.REFUND_ACCOUNT, 500))
    with_t = await ask(s, ccr(gy.REFUND_ACCOUNT, 500, retransmit=True))
    assert first is not None and first.result_code == 2001
    assert again == first and with_t is not None
    assert (with_t.result_code, with_t.session_id) == (2001, "eb;1;1")
    assert s.balance(SUB) == 500
    assert [(e.action, e.amount_minor, e.result_code) for e in s.applied()] == [
        ("REFUND_ACCOUNT", 500, 2001)
    ]
    assert s.stats["in-a"]["duplicates"] == 2


async def test_debit_enough_and_not_enough() -> None:
    s = sim()
    s.set_balance(SUB, 300)
    refused = await ask(s, ccr(gy.DIRECT_DEBITING, 301, session="s1"))
    assert refused is not None and refused.result_code == 4012 and not refused.is_error
    ok = await ask(s, ccr(gy.DIRECT_DEBITING, 200, session="s2"))
    assert ok is not None and (ok.result_code, ok.granted_minor) == (2001, 200)
    assert s.balance(SUB) == 100


async def test_check_balance() -> None:
    s = sim()
    s.set_balance(SUB, 300)
    enough = await ask(s, ccr(gy.CHECK_BALANCE, 300, session="s1"))
    short = await ask(s, ccr(gy.CHECK_BALANCE, 301, session="s2"))
    assert enough is not None and short is not None
    assert (enough.result_code, enough.check_balance_result) == (2001, gy.ENOUGH_CREDIT)
    assert (short.result_code, short.check_balance_result) == (2001, gy.NO_CREDIT)
    assert s.balance(SUB) == 300


async def test_outside_ranges_is_5030() -> None:
    s = sim()
    answer = await ask(s, ccr(gy.REFUND_ACCOUNT, 500, msisdn="201100000001"))
    assert answer is not None and answer.result_code == 5030
    assert s.balances() == {}


async def test_request_for_another_in_node_is_not_executed() -> None:
    s = sim()
    answer = await ask(s, ccr(gy.REFUND_ACCOUNT, 500, dest="in-b.test"))
    assert answer is not None and answer.result_code == 3002 and answer.is_error
    assert s.balances() == {}


async def test_forced_busy_not_applied_and_retry_executes() -> None:
    s = sim()
    s.set_result_share(3004, 1.0)
    busy = await ask(s, ccr(gy.REFUND_ACCOUNT, 500))
    assert busy is not None and busy.result_code == 3004 and busy.is_error
    assert s.balance(SUB) == 0
    s.set_result_share(3004, 0.0)
    ok = await ask(s, ccr(gy.REFUND_ACCOUNT, 500))
    assert ok is not None and ok.result_code == 2001
    assert s.balance(SUB) == 500


async def test_forced_results_per_msisdn() -> None:
    s = sim()
    for number, code in enumerate((3002, 4012, 5030, 4010)):
        s.force_result(SUB, code)
        answer = await ask(s, ccr(gy.REFUND_ACCOUNT, 500, number=number))
        assert answer is not None and answer.result_code == code
        assert answer.is_error == (code < 4000)
    assert s.balance(SUB) == 0
    s.force_result(SUB, None)
    answer = await ask(s, ccr(gy.REFUND_ACCOUNT, 500, number=9))
    assert answer is not None and answer.result_code == 2001


async def test_dropped_answer_is_applied_and_the_retry_gets_the_first_answer() -> None:
    s = sim()
    s.set_drop_share(1.0)
    assert await ask(s, ccr(gy.REFUND_ACCOUNT, 500)) is None
    assert s.balance(SUB) == 500  # applied, answer lost
    s.set_drop_share(0.0)
    retry = await ask(s, ccr(gy.REFUND_ACCOUNT, 500, retransmit=True))
    assert retry is not None and retry.result_code == 2001
    assert s.balance(SUB) == 500
    assert s.stats["in-a"]["dropped"] == 1


async def test_bad_requests_get_protocol_answers() -> None:
    s = sim()
    no_action = await ask(s, ccr(None, 500))
    assert no_action is not None and no_action.result_code == 5005
    no_amount = await ask(s, ccr(gy.REFUND_ACCOUNT, None, session="s2"))
    assert no_amount is not None and no_amount.result_code == 5005
    initial = await ask(s, ccr(gy.REFUND_ACCOUNT, 500, session="s3", request_type=1))
    assert initial is not None and initial.result_code == 5004
    dollars = await ask(s, ccr(gy.REFUND_ACCOUNT, 500, session="s4", currency=840))
    assert dollars is not None and dollars.result_code == 5004
    assert s.balances() == {}


async def test_answer_delay_is_applied() -> None:
    s = sim()
    s.set_delay(30)
    answer = await ask(s, ccr(gy.CHECK_BALANCE, 1))
    assert answer is not None and answer.result_code == 2001
    assert s.faults("in-a").answer_delay_ms == 30


async def test_recharge_event_without_broker() -> None:
    s = sim()
    s.set_balance(SUB, 100)
    first = await s.recharge(SUB, 2500)
    second = await s.recharge(SUB, 100)
    assert first.event_id != second.event_id and first.event_id.startswith("IN-A-")
    assert (first.in_node, first.balance_after_minor, first.currency) == ("in-a.test", 2600, "EGP")
    assert s.balance(SUB) == 2700
    kinds = [(e.action, e.moved_minor) for e in s.applied()]
    assert kinds == [("RECHARGE", 2500), ("RECHARGE", 100)]


async def test_reject_nonstandard_refuses_a_refund_under_the_ins_own_session() -> None:
    own = "in-a.test;7;1"  # a Session-Id of the IN's own out-of-balance CCR
    counted = sim()
    assert (await ask(counted, ccr(gy.REFUND_ACCOUNT, 300, session=own))).result_code == 2001
    assert counted.balance(SUB) == 300  # only counted: a second credit
    strict = sim(reject_nonstandard=True)
    for _ in range(2):  # refused every time, never stored as a first answer
        refused = await ask(strict, ccr(gy.REFUND_ACCOUNT, 300, session=own))
        assert refused is not None and refused.result_code == 5012 and not refused.is_error
        assert refused.session_id == own and refused.request_number == 0
    assert strict.balance(SUB) == 0 and strict.applied() == []
    assert strict.stats["in-a"]["rejected_nonstandard"] == 2
    assert strict.nonstandard()["nonstandard_refund_own_session"] == 2
    # a refund under the node's own Session-Id is standard and applied
    assert (await ask(strict, ccr(gy.REFUND_ACCOUNT, 300, session="eb;9;9"))).result_code == 2001


async def test_reject_nonstandard_refuses_a_resend_under_another_end_to_end_id() -> None:
    strict = sim(reject_nonstandard=True)
    first = ccr(gy.REFUND_ACCOUNT, 500)
    assert (await ask(strict, first)).result_code == 2001
    same_ids = first._replace(hop_by_hop_id=first.hop_by_hop_id + 1, flags=first.flags | codec.FLAG_RETRANSMIT)
    assert (await ask(strict, same_ids)).result_code == 2001  # a proper re-send
    other_e2e = first._replace(end_to_end_id=first.end_to_end_id ^ 1, flags=first.flags | codec.FLAG_RETRANSMIT)
    refused = await ask(strict, other_e2e)
    assert refused is not None and refused.result_code == 5012
    assert strict.balance(SUB) == 500
    assert strict.nonstandard()["nonstandard_end_to_end_changed"] == 1
    # without the mode the same re-send is only counted and gets the first answer
    counted = sim()
    await ask(counted, first)
    assert (await ask(counted, other_e2e)).result_code == 2001
    assert counted.nonstandard()["nonstandard_end_to_end_changed"] == 1


async def test_reject_nonstandard_still_processes_a_t_flag_on_the_first_copy() -> None:
    strict = sim(reject_nonstandard=True)
    answer = await ask(strict, ccr(gy.REFUND_ACCOUNT, 200, retransmit=True))
    assert answer is not None and answer.result_code == 2001 and strict.balance(SUB) == 200
    assert strict.nonstandard()["nonstandard_t_flag_on_first_request"] == 1


def bundle_ccr(kind: str, quantity: int, *, session: str = "eb;9;1",
               action: int = gy.REFUND_ACCOUNT) -> codec.Message:
    return gy.build_ccr(gy.CreditControlRequest(
        session_id=session, origin_host="eb.test", origin_realm="test",
        destination_realm="test", destination_host="in-a.test", msisdn=SUB,
        requested_action=action, has_mscc=True,
        bundle=gy.BundleUnits(kind, quantity, service_identifier=1, rating_group=10)))


async def test_a_bundle_credit_fills_the_bucket_once_and_moves_no_money() -> None:
    """RFC 4006 §8.16: the units come in an MSCC; the answer grants them in the same
    unit with the request's Service-Identifier and Rating-Group."""
    s = sim()
    answer = await ask(s, bundle_ccr("data", 524_288_000))
    assert answer is not None and answer.result_code == 2001 and answer.granted_minor is None
    assert answer.granted_units == gy.BundleUnits("data", 524_288_000, 1, 10)
    assert await ask(s, bundle_ccr("data", 524_288_000)) == answer  # a duplicate
    await ask(s, bundle_ccr("voice", 1800, session="eb;9;2"))
    assert s.buckets(SUB) == {"data": 524_288_000, "voice": 1800}
    assert s.balance(SUB) == 0
    assert [(e.bundle_kind, e.units, e.moved_minor) for e in s.applied()] == [
        ("data", 524_288_000, 0), ("voice", 1800, 0)]


async def test_units_other_than_money_are_never_debited() -> None:
    s = sim()
    answer = await ask(s, bundle_ccr("sms", 50, action=gy.DIRECT_DEBITING))
    assert answer is not None and answer.result_code == 5004
    assert s.buckets(SUB) == {}
