from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from extrabalance.core.payback import ageing, allocate_payback
from extrabalance.core.policy import PaybackOrder, RecoveryPolicy
from tests.core.sample import NOW, loan

FEE_FIRST = RecoveryPolicy()


def test_oldest_first_fee_then_principal():
    old = loan("old", 1000, 100, at=NOW - timedelta(days=2))
    new = loan("new", 500, 50, at=NOW)
    r = allocate_payback([new, old], 1150, FEE_FIRST)
    assert r.total_minor == 1150 and not r.clears_all
    assert [(p.loan_id, p.fee_minor, p.principal_minor) for p in r.parts] == [
        ("old", 100, 1000),
        ("new", 50, 0),
    ]


def test_principal_first_order():
    r = allocate_payback(
        [loan("a", 1000, 100)], 500, RecoveryPolicy(order=PaybackOrder.PRINCIPAL_FIRST)
    )
    assert [(p.fee_minor, p.principal_minor) for p in r.parts] == [(0, 500)]


def test_full_and_capped_at_owed():
    r = allocate_payback([loan("a", 1000, 100, p_paid=200, f_paid=100)], 5000, FEE_FIRST)
    assert r.total_minor == 800 and r.clears_all
    assert r.parts[0].fee_minor == 0 and r.parts[0].principal_minor == 800


def test_share_and_floor():
    pol = RecoveryPolicy(share_bp=5000, min_balance_left_minor=300)
    assert allocate_payback([loan("a", 1000, 0)], 1000, pol).total_minor == 500
    assert allocate_payback([loan("a", 1000, 0)], 500, pol).total_minor == 200
    assert allocate_payback([loan("a", 1000, 0)], 200, pol).total_minor == 0
    assert allocate_payback([loan("a", 1000, 0)], -5, pol).parts == ()


def test_nothing_owed_clears_all():
    r = allocate_payback([], 1000, FEE_FIRST)
    assert r.total_minor == 0 and r.clears_all and r.parts == ()


def test_ageing():
    pol = RecoveryPolicy(overdue_days=30, write_off_days=180)
    a = ageing(
        [
            loan("fresh", 100, 10, at=NOW - timedelta(days=29)),
            loan("overdue", 100, 10, at=NOW - timedelta(days=30)),
            loan("dead", 100, 10, at=NOW - timedelta(days=180)),
            loan("paid", 100, 10, p_paid=100, f_paid=10, at=NOW - timedelta(days=400)),
        ],
        NOW,
        pol,
    )
    assert a.overdue == {"overdue"} and a.to_write_off == {"dead"}


loans_st = st.lists(
    st.tuples(
        st.integers(0, 10**6),
        st.integers(0, 10**5),
        st.integers(0, 10**6),
        st.integers(0, 10**5),
        st.integers(0, 1000),
    ),
    max_size=6,
).map(
    lambda xs: [
        loan(f"l{i}", p, f, p_paid=min(pp, p), f_paid=min(fp, f), at=NOW - timedelta(hours=h))
        for i, (p, f, pp, fp, h) in enumerate(xs)
    ]
)


@given(
    loans=loans_st,
    available=st.integers(-100, 3 * 10**6),
    share=st.integers(0, 10_000),
    floor=st.integers(0, 10**5),
    order=st.sampled_from(list(PaybackOrder)),
)
def test_allocation_invariants(loans, available, share, floor, order):
    pol = RecoveryPolicy(order=order, share_bp=share, min_balance_left_minor=floor)
    r = allocate_payback(loans, available, pol)
    owed = sum(l.owed_minor for l in loans)
    by_id = {l.loan_id: l for l in loans}
    assert r.total_minor == sum(p.total_minor for p in r.parts)
    assert 0 <= r.total_minor <= owed
    if available > 0:
        assert r.total_minor <= available * share // 10_000
        assert available - r.total_minor >= min(floor, available) or r.total_minor == 0
    else:
        assert r.total_minor == 0
    assert r.clears_all == (r.total_minor == owed)
    for p in r.parts:
        l = by_id[p.loan_id]
        assert 0 <= p.fee_minor <= l.fee_owed_minor
        assert 0 <= p.principal_minor <= l.principal_owed_minor
        assert p.total_minor > 0
    # oldest first: every loan before the last touched one is fully paid
    order_ids = [l.loan_id for l in sorted(loans, key=lambda l: (l.created_at, l.loan_id))]
    touched = [p.loan_id for p in r.parts]
    assert touched == [i for i in order_ids if i in touched]
    for p in r.parts[:-1]:
        assert p.total_minor == by_id[p.loan_id].owed_minor
