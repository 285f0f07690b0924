"""Dynamic routing: a subscriber outside every static range is found by probing the IN
nodes with CHECK_BALANCE, remembered, and lent to on the right IN."""

from extrabalance.service.outcomes import BorrowStatus
from extrabalance.service.ports import InAction
from extrabalance.service.routing import RouteProber

UNROUTED = "201201234567"  # no static rule covers 2012…
IN_A, IN_B = "in-a.operator.example", "in-b.operator.example"


async def test_unknown_subscriber_is_probed_learned_and_served(h):
    await h.add_profile(UNROUTED)
    h.fake_in.owners[UNROUTED] = IN_B
    h.lending.prober = RouteProber(h.fake_in, [IN_A, IN_B])
    out = await h.lending.borrow(UNROUTED, 1, "ussd", "k1")
    assert out.status is BorrowStatus.GRANTED
    probes = [c for c in h.fake_in.calls if c.action is InAction.CHECK_BALANCE]
    assert [c.in_node for c in probes] == [IN_A, IN_B]  # in-a said 5030, in-b knows him
    credit = [c for c in h.fake_in.calls if c.action is InAction.REFUND_ACCOUNT]
    assert [c.in_node for c in credit] == [IN_B]
    assert await h.learned_route(UNROUTED) == IN_B
    # Known now: the next loan needs no probe.
    h.fake_in.calls.clear()
    await h.lending.borrow(UNROUTED, 1, "ussd", "k2")
    assert not [c for c in h.fake_in.calls if c.action is InAction.CHECK_BALANCE]


async def test_no_in_knows_him_refused_unknown_subscriber(h):
    await h.add_profile(UNROUTED)
    h.fake_in.owners[UNROUTED] = "in-z.operator.example"
    h.lending.prober = RouteProber(h.fake_in, [IN_A, IN_B])
    out = await h.lending.borrow(UNROUTED, 1, "ussd", "k1")
    assert out.status is BorrowStatus.REFUSED and out.reason.value == "UNKNOWN_SUBSCRIBER"
    assert not [c for c in h.fake_in.calls if c.action is InAction.REFUND_ACCOUNT]
