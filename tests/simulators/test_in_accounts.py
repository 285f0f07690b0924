"""The IN simulator's account book and fault model, without sockets."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulators.in_node import (
    Action,
    BalanceOp,
    CheckBalanceResult,
    InAccounts,
    InFaults,
    InNodeSpec,
    MsisdnRange,
    OpAnswer,
    parse_share_map,
    plan_faults,
)

SPEC = InNodeSpec(
    name="in-a",
    origin_host="in-a.test",
    realm="test",
    ranges=(MsisdnRange.parse("201000000000-201049999999"), MsisdnRange.parse("20106*")),
)


def op(session: str, action: Action, amount: int, msisdn: str = "201000000001", n: int = 0) -> BalanceOp:
    return BalanceOp(session, n, action, msisdn, amount)


def test_ranges() -> None:
    assert "201000000001" in SPEC.ranges[0]
    assert "201050000000" not in SPEC.ranges[0]
    assert "2010000000011" not in SPEC.ranges[0]  # length differs
    assert SPEC.owns("201060000000")
    assert not SPEC.owns("201070000000")
    with pytest.raises(ValueError):
        MsisdnRange.parse("2010-201")
    with pytest.raises(ValueError):
        MsisdnRange.parse("20x")


def test_refund_debit_check() -> None:
    book = InAccounts(SPEC)
    answer, dup = book.execute(op("s1", Action.REFUND_ACCOUNT, 500))
    assert (answer.result_code, dup) == (2001, False)
    assert book.balance("201000000001") == 500
    answer, _ = book.execute(op("s2", Action.CHECK_BALANCE, 500))
    assert answer.check_balance_result is CheckBalanceResult.ENOUGH_CREDIT
    answer, _ = book.execute(op("s3", Action.CHECK_BALANCE, 501))
    assert answer.check_balance_result is CheckBalanceResult.NO_CREDIT
    answer, _ = book.execute(op("s4", Action.DIRECT_DEBITING, 501))
    assert answer.result_code == 4012
    assert book.balance("201000000001") == 500
    answer, _ = book.execute(op("s5", Action.DIRECT_DEBITING, 200))
    assert (answer.result_code, answer.granted_minor) == (2001, 200)
    assert book.balance("201000000001") == 300


def test_outside_ranges_is_5030_and_not_applied() -> None:
    book = InAccounts(SPEC)
    answer, _ = book.execute(op("s1", Action.REFUND_ACCOUNT, 500, msisdn="209990000000"))
    assert answer.result_code == 5030
    assert book.balances() == {}


def test_duplicate_key_gets_first_answer_and_applies_once() -> None:
    book = InAccounts(SPEC)
    first, _ = book.execute(op("s1", Action.REFUND_ACCOUNT, 500))
    again, dup = book.execute(op("s1", Action.REFUND_ACCOUNT, 500))
    assert dup and again == first
    assert book.balance("201000000001") == 500
    # Another request number of the same session is another operation.
    book.execute(op("s1", Action.REFUND_ACCOUNT, 500, n=1))
    assert book.balance("201000000001") == 1000
    assert book.stats["duplicates"] == 1


def test_forced_busy_is_not_stored_so_the_retry_executes() -> None:
    book = InAccounts(SPEC)
    answer, _ = book.execute(op("s1", Action.REFUND_ACCOUNT, 500), forced_result=3004)
    assert answer.result_code == 3004
    assert book.balance("201000000001") == 0
    answer, dup = book.execute(op("s1", Action.REFUND_ACCOUNT, 500))
    assert (answer.result_code, dup) == (2001, False)
    assert book.balance("201000000001") == 500


def test_forced_final_refusal_is_stored() -> None:
    book = InAccounts(SPEC)
    answer, _ = book.execute(op("s1", Action.REFUND_ACCOUNT, 500), forced_result=4010)
    assert answer.result_code == 4010
    answer, dup = book.execute(op("s1", Action.REFUND_ACCOUNT, 500))
    assert (answer.result_code, dup) == (4010, True)
    assert book.balance("201000000001") == 0


def test_answers_table_is_bounded() -> None:
    book = InAccounts(SPEC, answers_max=2)
    for i in range(3):
        book.execute(op(f"s{i}", Action.CHECK_BALANCE, 1))
    assert book.first_answer("s0", 0) is None
    assert book.first_answer("s2", 0) is not None
    assert book.stats["answers_evicted"] == 1


@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),  # session
            st.sampled_from([Action.REFUND_ACCOUNT, Action.DIRECT_DEBITING, Action.CHECK_BALANCE]),
            st.integers(1, 1000),
        ),
        max_size=60,
    )
)
def test_ledger_reconciles_with_balance(requests: list[tuple[int, Action, int]]) -> None:
    """Whatever the duplicates, the balance is the sum of the ledger's movements."""
    book = InAccounts(SPEC)
    for session, action, amount in requests:
        book.execute(op(f"s{session}", action, amount))
        assert book.balance("201000000001") >= 0
    ledger = book.applied()
    assert sum(e.moved_minor for e in ledger) == book.balance("201000000001")
    assert len({(e.session_id, e.request_number) for e in ledger}) == len(ledger)


def test_fault_plan() -> None:
    rng = random.Random(1)
    faults = InFaults(result_share={3004: 1.0})
    assert plan_faults(faults, rng, "1").forced_result == 3004
    faults = InFaults(result_msisdns={"1": 5030}, drop_share=1.0, answer_delay_ms=7)
    plan = plan_faults(faults, rng, "1")
    assert (plan.forced_result, plan.drop, plan.delay_ms) == (5030, True, 7)
    assert plan_faults(faults, rng, "2").forced_result is None
    shares = [plan_faults(InFaults(result_share={4012: 0.3}), rng, "x").forced_result for _ in range(2000)]
    assert 400 < shares.count(4012) < 800
    with pytest.raises(ValueError):
        InFaults(result_share={2001: 0.5}).validate()
    with pytest.raises(ValueError):
        InFaults(result_share={3004: 0.7, 3002: 0.7}).validate()
    assert parse_share_map(["3004=0.25"]) == {3004: 0.25}


def test_grant_from_a_cca_then_its_confirmation_is_a_duplicate() -> None:
    book = InAccounts(SPEC, confirmation_extension=True)
    assert book.apply_grant("in-a;1;5", 2, "201000000001", 500)
    assert book.balance("201000000001") == 500
    assert book.first_answer("in-a;1;5", 2) == OpAnswer(2001)
    # The node confirms the advance under the same key: first answer, nothing new.
    answer, duplicate = book.execute(op("in-a;1;5", Action.REFUND_ACCOUNT, 500, n=2))
    assert duplicate and answer.result_code == 2001
    assert book.balance("201000000001") == 500
    assert book.stats["duplicate_mismatch"] == 0
    assert [(a.action, a.request_number) for a in book.applied()] == [
        ("OUT_OF_BALANCE_GRANT", 2)]


def test_confirmation_first_then_the_cca_grant_applies_nothing() -> None:
    book = InAccounts(SPEC, confirmation_extension=True)
    answer, duplicate = book.execute(op("in-a;1;6", Action.REFUND_ACCOUNT, 500))
    assert not duplicate and answer.result_code == 2001
    assert not book.apply_grant("in-a;1;6", 0, "201000000001", 500)
    assert book.balance("201000000001") == 500
    assert len(book.applied()) == 1


def test_refused_confirmation_blocks_a_later_grant() -> None:
    book = InAccounts(SPEC, confirmation_extension=True)
    answer, _ = book.execute(op("in-a;1;7", Action.REFUND_ACCOUNT, 500), forced_result=4010)
    assert answer.result_code == 4010
    assert not book.apply_grant("in-a;1;7", 0, "201000000001", 500)
    assert book.balance("201000000001") == 0


@given(st.lists(st.sampled_from(["grant", "confirm"]), min_size=1, max_size=6))
def test_an_advance_is_credited_once_in_any_order(order: list[str]) -> None:
    book = InAccounts(SPEC, confirmation_extension=True)
    for what in order:
        if what == "grant":
            book.apply_grant("in-a;1;8", 1, "201000000001", 300)
        else:
            book.execute(op("in-a;1;8", Action.REFUND_ACCOUNT, 300, n=1))
    assert book.balance("201000000001") == 300
    assert sum(a.moved_minor for a in book.applied()) == 300


def test_strict_in_a_refund_under_our_own_session_is_a_second_credit() -> None:
    """RFC 4006 alone: the CCA's grant is applied once per request of ours, and a
    REFUND_ACCOUNT is a credit of its own; one that re-uses our Session-Id (the
    private confirmation rule) is also counted as non-standard."""
    book = InAccounts(SPEC)
    assert book.apply_grant("in-a.test;1;5", 2, "201000000001", 500)
    assert not book.apply_grant("in-a.test;1;5", 2, "201000000001", 500)  # once per request
    answer, duplicate = book.execute(op("in-a.test;1;5", Action.REFUND_ACCOUNT, 500, n=2))
    assert not duplicate and answer.result_code == 2001
    assert book.balance("201000000001") == 1000
    assert book.stats["nonstandard_refund_own_session"] == 1
