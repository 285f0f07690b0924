"""The ledger store's money functions against a model of what the journal must say,
per account and per subscriber (not only the total debt), and the store refusing
every loan and recovery transition its state table forbids.

Recoveries are booked as the service books them: `core.payback.split` divides what
the IN debited over the open loans and `store.apply_recovery` journals each part; the
guards that belong to the caller (a recovery already DONE books nothing again, a
debit larger than the debt is refused) are checked through `service.recovery.
settle_debit`. Transitions the saga table (`core.sagas`) forbids are asserted to be
refused with `IllegalTransition` and to leave every table as it was.

The property runs random histories (loans credited, failed and reversed, fee-first
and principal-first partial and full paybacks, write-offs) through the store's public
functions and checks after every step: each journal account's balance, each loan's
repaid columns and state, the open loans as the rules read them, the debt left and
the bad-debt count.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extrabalance.core.lending import BorrowRequest, Granted, decide
from extrabalance.core.model import OpenLoan
from extrabalance.core.payback import Recovery, RecoveryPart, split
from extrabalance.core.policy import PaybackOrder, RecoveryPolicy
from extrabalance.core.reasons import Reason
from extrabalance.ledger import store
from extrabalance.ledger.db import connect, migrate
from extrabalance.service.recovery import settle_debit
from tests.core.sample import NOW, POLICY

A, B = "201000000001", "201000000002"
FEE_FIRST = RecoveryPolicy()
PRINCIPAL_FIRST = RecoveryPolicy(order=PaybackOrder.PRINCIPAL_FIRST)
JOURNALLED = (store.ACTIVE, store.PARTIALLY_REPAID, store.CONFIRMING)
BOOKED = (*JOURNALLED, store.REPAID, store.WRITTEN_OFF)  # disbursed and not reversed


def fresh() -> sqlite3.Connection:
    conn = connect(":memory:", synchronous="OFF")
    migrate(conn)
    return conn


def balances(conn: sqlite3.Connection, msisdn: str) -> dict[str, int]:
    found = dict.fromkeys(store.ACCOUNTS, 0)
    for account, amount in conn.execute(
        "SELECT account, SUM(amount_minor) FROM journal WHERE msisdn = ? GROUP BY account",
        (msisdn,),
    ):
        found[account] = amount
    return found


def journal_lines(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM journal").fetchone()[0])


def book(conn: sqlite3.Connection, rid: str, debited: int, policy: RecoveryPolicy = FEE_FIRST,
         now=NOW) -> Recovery:
    """Book `debited` for recovery `rid` as the service does: split over the open loans
    (core), then applied by the store. Returns the allocation."""
    rec = store.get_recovery(conn, rid)
    allocation = split(store.open_loans(conn, rec.msisdn), debited, policy)
    store.apply_recovery(conn, rec, allocation, now)
    return allocation


def rolled_back(conn: sqlite3.Connection, fn, *args) -> Exception:
    """Run `fn` in a transaction that must fail; roll it back (as every caller does)
    and return the error."""
    conn.execute("BEGIN")
    try:
        fn(*args)
    except store.LedgerInvariantError as exc:
        return exc
    finally:
        conn.execute("ROLLBACK")
    raise AssertionError(f"{fn.__name__} did not refuse")


# -- the model ------------------------------------------------------------------------


@dataclass
class Loan:
    loan_id: str
    msisdn: str
    principal: int
    fee: int
    state: str
    created: int  # minutes after NOW
    p_paid: int = 0
    f_paid: int = 0
    written_off: int = 0

    @property
    def owed(self) -> int:
        return self.principal - self.p_paid + self.fee - self.f_paid


@dataclass
class Model:
    loans: list[Loan] = field(default_factory=list)
    recovered: dict[str, int] = field(default_factory=lambda: {A: 0, B: 0})
    count: dict[str, int] = field(default_factory=lambda: {A: 0, B: 0})

    def open(self, msisdn: str) -> list[Loan]:
        return sorted((x for x in self.loans if x.msisdn == msisdn
                       and x.state in (store.ACTIVE, store.PARTIALLY_REPAID)),
                      key=lambda x: (x.created, x.loan_id))

    def owed(self, msisdn: str) -> int:
        return sum(x.owed for x in self.open(msisdn))

    def expected_balances(self, msisdn: str) -> dict[str, int]:
        mine = [x for x in self.loans if x.msisdn == msisdn]
        journalled = [x for x in mine if x.state in JOURNALLED]
        booked = [x for x in mine if x.state in BOOKED]
        return {
            "principal_receivable": sum(x.principal - x.p_paid for x in journalled),
            "fee_receivable": sum(x.fee - x.f_paid for x in journalled),
            "disbursed_float": -sum(x.principal for x in booked),
            "fee_income": -sum(x.fee for x in booked),
            "recovered_cash": self.recovered[msisdn],
            "written_off": sum(x.written_off for x in mine),
        }


def expected_split(loans: list[Loan], budget: int, order: PaybackOrder) -> list[tuple]:
    """Oldest first; inside a loan fee then principal, or the reverse."""
    parts = []
    for loan in loans:
        fee_owed, principal_owed = loan.fee - loan.f_paid, loan.principal - loan.p_paid
        if order is PaybackOrder.FEE_FIRST:
            fee = min(budget, fee_owed)
            principal = min(budget - fee, principal_owed)
        else:
            principal = min(budget, principal_owed)
            fee = min(budget - principal, fee_owed)
        if fee or principal:
            parts.append((loan.loan_id, fee, principal))
        budget -= fee + principal
    return parts


class World:
    """The store and the model, driven together."""

    def __init__(self) -> None:
        self.conn = fresh()
        self.model = Model()
        self.minute = 0
        for msisdn in (A, B):
            store.ensure_subscriber(self.conn, msisdn, NOW)

    def now(self):
        self.minute += 1
        return NOW + timedelta(minutes=self.minute)

    def borrow(self, msisdn: str, principal: int, fee: int, how: str) -> None:
        now = self.now()
        loan_id = f"L{len(self.model.loans):04d}"
        first = {"active": store.ACTIVE, "credited": store.CREDITING, "failed": store.CREDITING,
                 "confirmed": store.CONFIRMING, "reversed": store.CONFIRMING}[how]
        store.insert_loan(self.conn, msisdn=msisdn, tier_id=1, principal_minor=principal,
                          fee_minor=fee, state=first, channel="ussd", idempotency_key=loan_id,
                          in_node="in-a", session_id=f"s-{loan_id}", now=now, loan_id=loan_id,
                          subscriber_known=True)
        final = first
        if how == "credited":
            final = store.settle_loan(self.conn, loan_id, store.ACTIVE, now).state
        elif how == "failed":
            final = store.settle_loan(self.conn, loan_id, store.FAILED, now).state
        elif how in ("confirmed", "reversed"):
            final = store.settle_advance(self.conn, loan_id, how == "confirmed", now).state
        assert final == {"active": store.ACTIVE, "credited": store.ACTIVE,
                         "failed": store.FAILED, "confirmed": store.ACTIVE,
                         "reversed": store.FAILED}[how]
        assert store.get_loan(self.conn, loan_id).state == final
        self.model.loans.append(Loan(loan_id, msisdn, principal, fee, final, self.minute))
        if final == store.ACTIVE:
            self.model.count[msisdn] += 1

    def recover(self, msisdn: str, amount: int, order: PaybackOrder) -> None:
        now = self.now()
        owed = self.model.owed(msisdn)
        debited = min(amount, owed)
        policy = FEE_FIRST if order is PaybackOrder.FEE_FIRST else PRINCIPAL_FIRST
        rid = store.insert_recovery(self.conn, event_id=f"e{self.minute}", msisdn=msisdn,
                                    recharge_minor=amount, balance_after_minor=None,
                                    in_node="in-a", now=now, session_id=f"r{self.minute}",
                                    requested_minor=debited)
        rec = store.get_recovery(self.conn, rid)
        assert (rec.state, rec.requested_minor, rec.attempts) == (store.RECOVERING, debited, 1)
        allocation = book(self.conn, rid, debited, policy, now)
        left = store.debt_owed(self.conn, msisdn)
        parts = expected_split(self.model.open(msisdn), debited, order)
        assert [(p.loan_id, p.fee_minor, p.principal_minor) for p in allocation.parts] == parts
        assert allocation.total_minor == debited and left == owed - debited
        assert allocation.clears_all == (debited == owed)
        by_id = {x.loan_id: x for x in self.model.loans}
        for loan_id, fee, principal in parts:
            loan = by_id[loan_id]
            loan.f_paid += fee
            loan.p_paid += principal
            loan.state = store.REPAID if loan.owed == 0 else store.PARTIALLY_REPAID
        self.model.recovered[msisdn] += debited
        if debited == owed:
            self.model.count[msisdn] = 0
        done = store.get_recovery(self.conn, rid)
        assert (done.state, done.recovered_minor) == (store.DONE, debited)

    def write_off(self, msisdn: str, pick: int) -> None:
        candidates = self.model.open(msisdn)
        if not candidates:
            return
        loan = candidates[pick % len(candidates)]
        assert store.write_off(self.conn, loan.loan_id, "ageing", self.now()) == loan.owed
        loan.written_off = loan.owed
        loan.state = store.WRITTEN_OFF

    def check(self) -> None:
        for msisdn in (A, B):
            assert balances(self.conn, msisdn) == self.model.expected_balances(msisdn), msisdn
            expected_open = tuple(
                OpenLoan(x.loan_id, 1, x.principal, x.fee, x.p_paid, x.f_paid,
                         NOW + timedelta(minutes=x.created))
                for x in self.model.open(msisdn))
            assert store.open_loans(self.conn, msisdn) == expected_open
            loaded = store.load_subscriber(self.conn, msisdn)
            assert loaded.state.open_loans == expected_open
            assert loaded.state.loans_since_full_payback == self.model.count[msisdn]
            assert not loaded.state.operation_pending and not loaded.recovery_pending
            assert store.debt_owed(self.conn, msisdn) == self.model.owed(msisdn)
            assert store.debt_from_journal(self.conn, msisdn) == self.model.owed(msisdn)
        for loan in self.model.loans:
            row = store.get_loan(self.conn, loan.loan_id)
            assert (row.state, row.principal_repaid_minor, row.fee_repaid_minor) == (
                loan.state, loan.p_paid, loan.f_paid), loan.loan_id
        totals = store.account_totals(self.conn)
        assert sum(totals.values()) == 0
        assert totals == {k: balances(self.conn, A)[k] + balances(self.conn, B)[k]
                          for k in store.ACCOUNTS}


who = st.sampled_from([A, B])
operation = st.one_of(
    st.tuples(st.just("borrow"), who, st.integers(1, 3000), st.integers(0, 300),
              st.sampled_from(["active", "credited", "failed", "confirmed", "reversed"])),
    st.tuples(st.just("recover"), who, st.integers(0, 4000),
              st.sampled_from([PaybackOrder.FEE_FIRST, PaybackOrder.PRINCIPAL_FIRST])),
    st.tuples(st.just("write_off"), who, st.integers(0, 5)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, min_size=1, max_size=14))
def test_every_account_matches_the_loans_after_any_history(ops):
    world = World()
    for op in ops:
        getattr(world, op[0])(*op[1:])
        world.check()
    world.conn.close()


# A loan is booked in REQUESTED, CREDITING, ACTIVE or CONFIRMING only; every other
# state is reached by the moves the saga table allows.
_BOOKED_AS = {store.UNKNOWN: store.CREDITING, store.FAILED: store.CREDITING,
              store.PARTIALLY_REPAID: store.ACTIVE, store.REPAID: store.ACTIVE,
              store.WRITTEN_OFF: store.ACTIVE}


def loan_in(conn: sqlite3.Connection, state: str, *, known: bool = False,
            channel: str = "ussd", key: str | None = None, loan_id: str | None = None,
            msisdn: str = A, now=NOW) -> str:
    """A loan of 100 + 10 fee in `state`, reached through the store's own moves."""
    loan_id = store.insert_loan(conn, msisdn=msisdn, tier_id=1, principal_minor=100,
                                fee_minor=10, state=_BOOKED_AS.get(state, state),
                                channel=channel, idempotency_key=key, in_node=None,
                                session_id=None, now=now, loan_id=loan_id,
                                subscriber_known=known)
    if state in (store.UNKNOWN, store.FAILED):
        store.settle_loan(conn, loan_id, state, now)
    elif state in (store.PARTIALLY_REPAID, store.REPAID):
        rid = store.insert_recovery(conn, event_id=f"pay-{loan_id}", msisdn=msisdn,
                                    recharge_minor=110, balance_after_minor=None,
                                    in_node=None, now=now)
        owed = 110 if state == store.REPAID else 30
        part = RecoveryPart(loan_id, 10, owed - 10)
        store.apply_recovery(conn, store.get_recovery(conn, rid),
                             Recovery(owed, (part,), clears_all=state == store.REPAID), now)
    elif state == store.WRITTEN_OFF:
        assert store.write_off(conn, loan_id, "ageing", now) == 110
    assert store.get_loan(conn, loan_id).state == state
    return loan_id


# -- the survivors of the mutation run, as examples ----------------------------------


def world_with_loan(principal: int = 500, fee: int = 50) -> World:
    world = World()
    world.borrow(A, principal, fee, "active")
    return world


def test_fee_first_partial_payback_per_account():
    world = world_with_loan()
    world.recover(A, 120, PaybackOrder.FEE_FIRST)  # 50 fee, then 70 principal
    assert balances(world.conn, A) == {
        "principal_receivable": 430, "fee_receivable": 0, "disbursed_float": -500,
        "fee_income": -50, "recovered_cash": 120, "written_off": 0}
    lines = world.conn.execute(
        "SELECT account, amount_minor FROM journal WHERE memo = 'recover' ORDER BY line_no"
    ).fetchall()
    assert lines == [("recovered_cash", 120), ("fee_receivable", -50),
                     ("principal_receivable", -70)]
    (row,) = store.open_loans(world.conn, A)
    assert (row.principal_repaid_minor, row.fee_repaid_minor) == (70, 50)


def test_principal_first_partial_payback_per_account():
    world = world_with_loan()
    world.recover(A, 520, PaybackOrder.PRINCIPAL_FIRST)
    assert balances(world.conn, A)["principal_receivable"] == 0
    assert balances(world.conn, A)["fee_receivable"] == 30
    world.check()


def test_write_off_of_a_partly_repaid_loan_writes_off_only_what_is_left():
    world = world_with_loan()
    world.recover(A, 120, PaybackOrder.FEE_FIRST)
    (loan,) = world.model.open(A)
    assert store.write_off(world.conn, loan.loan_id, "ageing", NOW) == 430
    assert balances(world.conn, A) == {
        "principal_receivable": 0, "fee_receivable": 0, "disbursed_float": -500,
        "fee_income": -50, "recovered_cash": 120, "written_off": 430}
    assert store.get_loan(world.conn, loan.loan_id).state == store.WRITTEN_OFF
    audit = world.conn.execute("SELECT action, who, detail FROM audit").fetchall()
    assert [(a, w, json.loads(d)) for a, w, d in audit] == [
        ("write_off", "ageing", {"loan_id": loan.loan_id, "amount_minor": 430})]
    # written off once: a second call finds no open loan
    assert store.write_off(world.conn, loan.loan_id, "ageing", NOW) == 0
    assert balances(world.conn, A)["written_off"] == 430


def test_write_off_of_a_loan_owing_only_fee():
    world = world_with_loan()
    world.recover(A, 500, PaybackOrder.PRINCIPAL_FIRST)
    (loan,) = world.model.open(A)
    assert store.write_off(world.conn, loan.loan_id, "ageing", NOW) == 50
    assert balances(world.conn, A)["fee_receivable"] == 0
    assert balances(world.conn, A)["principal_receivable"] == 0
    assert balances(world.conn, A)["written_off"] == 50


def test_a_full_payback_resets_the_bad_debt_count_and_lifts_the_bar():
    # NEWCOMER segment: bad_debt_limit = 1
    world = World()
    world.conn.execute(
        "UPDATE subscribers SET tenure_days = 40, arpu_minor = 0, attributes = ?"
        " WHERE msisdn = ?", (json.dumps({"region": "cairo"}), A))
    world.borrow(A, 100, 20, "active")

    def decision():
        st = store.load_subscriber(world.conn, A).state
        return decide(BorrowRequest(A, 1, "ussd"), st, POLICY, NOW)

    assert decision().reason is Reason.BARRED_BAD_DEBT
    world.recover(A, 119, PaybackOrder.FEE_FIRST)  # one minor unit short
    assert store.load_subscriber(world.conn, A).state.loans_since_full_payback == 1
    assert decision().reason is Reason.BARRED_BAD_DEBT
    world.recover(A, 1, PaybackOrder.FEE_FIRST)
    assert store.load_subscriber(world.conn, A).state.loans_since_full_payback == 0
    assert isinstance(decision(), Granted)
    world.check()


def test_a_refused_advance_takes_its_count_back_but_never_below_zero():
    world = World()
    world.borrow(A, 100, 10, "active")
    world.borrow(A, 300, 30, "reversed")
    assert store.load_subscriber(world.conn, A).state.loans_since_full_payback == 1
    world.conn.execute("UPDATE subscribers SET loans_since_full_payback = 0")
    world.borrow(A, 300, 30, "reversed")
    assert store.load_subscriber(world.conn, A).state.loans_since_full_payback == 0
    lines = world.conn.execute(
        "SELECT account, amount_minor FROM journal WHERE memo = 'advance_reversed'"
        " ORDER BY tx_id, line_no").fetchall()
    assert lines[:4] == [("principal_receivable", -300), ("disbursed_float", 300),
                         ("fee_receivable", -30), ("fee_income", 30)]


def test_disbursement_journal_lines():
    world = world_with_loan(500, 50)
    lines = world.conn.execute(
        "SELECT account, amount_minor, msisdn, loan_id, memo FROM journal ORDER BY line_no"
    ).fetchall()
    assert lines == [("principal_receivable", 500, A, "L0000", "disburse"),
                     ("disbursed_float", -500, A, "L0000", "disburse"),
                     ("fee_receivable", 50, A, "L0000", "disburse"),
                     ("fee_income", -50, A, "L0000", "disburse")]


# -- a recovery booked by itself (apply_recovery, and the service's settle_debit) -----


def recovering(world: World, msisdn: str = A, session: str | None = "s1") -> str:
    return store.insert_recovery(world.conn, event_id=f"ev-{world.now()}", msisdn=msisdn,
                                 recharge_minor=1000, balance_after_minor=1000,
                                 in_node="in-a", now=NOW, session_id=session,
                                 requested_minor=300)


def test_a_recovery_is_booked_once():
    # Was: settle_recovery idempotent by itself. The DONE guard now lives in the
    # caller (settle_debit), and the store refuses to book a DONE recovery again
    # (the saga table has no DONE --in_debited--> move).
    world = world_with_loan()
    rid = recovering(world)
    rec = store.get_recovery(world.conn, rid)
    assert settle_debit(world.conn, rec, 300, POLICY, NOW) == 250
    lines = journal_lines(world.conn)
    done = store.get_recovery(world.conn, rid)
    assert (done.state, done.recovered_minor) == (store.DONE, 300)
    assert settle_debit(world.conn, done, 300, POLICY, NOW) == 250  # books nothing
    assert journal_lines(world.conn) == lines
    again = Recovery(300, (RecoveryPart("L0000", 0, 300),), clears_all=False)
    err = rolled_back(world.conn, store.apply_recovery, world.conn, done, again, NOW)
    assert isinstance(err, store.IllegalTransition)
    assert journal_lines(world.conn) == lines
    assert store.open_loans(world.conn, A)[0].owed_minor == 250
    # the whole debt paid by a second recovery; the first replayed still books nothing
    rid2 = recovering(world)
    assert settle_debit(world.conn, store.get_recovery(world.conn, rid2), 250, POLICY,
                        NOW) == 0
    lines = journal_lines(world.conn)
    assert settle_debit(world.conn, store.get_recovery(world.conn, rid), 300, POLICY, NOW) == 0
    assert journal_lines(world.conn) == lines
    assert store.load_subscriber(world.conn, A).state.loans_since_full_payback == 0


@pytest.mark.parametrize("debited", [551, -1])
def test_a_debit_that_cannot_be_accounted_for_is_refused(debited):
    world = world_with_loan()
    rid = recovering(world)
    rec = store.get_recovery(world.conn, rid)
    rolled_back(world.conn, settle_debit, world.conn, rec, debited, POLICY, NOW)
    assert journal_lines(world.conn) == 4  # the disbursement only
    assert store.get_recovery(world.conn, rid).state == store.RECOVERING
    # the store by itself: a part larger than the loan owes, or with one side negative
    parts = ([RecoveryPart("L0000", 50, 501), RecoveryPart("L0000", 51, 500)] if debited > 0
             else [RecoveryPart("L0000", 10, -1), RecoveryPart("L0000", -1, 10)])
    for part in parts:
        err = rolled_back(world.conn, store.apply_recovery, world.conn, rec,
                          Recovery(part.total_minor, (part,), clears_all=False), NOW)
        assert not isinstance(err, store.IllegalTransition)
        assert journal_lines(world.conn) == 4
    assert store.get_recovery(world.conn, rid).state == store.RECOVERING
    # parts that do not add up to the total are refused too
    rolled_back(world.conn, store.apply_recovery, world.conn, rec,
                Recovery(100, (RecoveryPart("L0000", 50, 40),), clears_all=False), NOW)
    assert journal_lines(world.conn) == 4


@pytest.mark.parametrize("debited", [550, 0])
def test_a_recovery_of_the_whole_debt_or_of_nothing_is_booked(debited):
    world = world_with_loan()
    rid = recovering(world)
    allocation = book(world.conn, rid, debited)
    left = store.debt_owed(world.conn, A)
    assert left == 550 - debited and allocation.total_minor == debited
    assert allocation.clears_all is (debited == 550)
    done = store.get_recovery(world.conn, rid)
    assert (done.state, done.recovered_minor) == (store.DONE, debited)
    (loan,) = store.open_loans(world.conn, A) or (None,)
    assert (loan is None) == (debited == 550)
    assert store.load_subscriber(world.conn, A).state.loans_since_full_payback == (
        0 if debited == 550 else 1)


def test_a_recovery_pays_only_its_own_subscribers_loans():
    # Was: settle_recovery reads its own row. apply_recovery is handed the row; a part
    # naming another subscriber's loan matches no open loan of this one and is refused.
    world = world_with_loan()
    world.borrow(B, 200, 20, "active")
    rec_b = store.get_recovery(world.conn, recovering(world, B))
    lines = journal_lines(world.conn)
    rolled_back(world.conn, store.apply_recovery, world.conn, rec_b,
                Recovery(100, (RecoveryPart("L0000", 50, 50),), clears_all=False), NOW)
    assert journal_lines(world.conn) == lines
    assert store.debt_owed(world.conn, A) == 550 and store.debt_owed(world.conn, B) == 220
    # nor is B's loan written off while its recovery runs
    assert store.write_off(world.conn, "L0001", "ageing", NOW) == 0
    assert store.debt_owed(world.conn, B) == 220
    with pytest.raises(KeyError):
        store.set_recovery_state(world.conn, "no-such", store.FAILED, NOW)


def test_insert_recovery_without_a_session_records_no_attempt():
    world = world_with_loan()
    rid = recovering(world, session=None)
    rec = store.get_recovery(world.conn, rid)
    assert (rec.requested_minor, rec.attempts, rec.diameter_session_id, rec.state) == (
        0, 0, None, store.RECOVERING)
    assert world.conn.execute("SELECT COUNT(*) FROM recovery_attempts").fetchone()[0] == 0
    rid = recovering(world, session="s9")
    rec = store.get_recovery(world.conn, rid)
    assert (rec.requested_minor, rec.attempts, rec.recharge_minor, rec.balance_after_minor,
            rec.in_node) == (300, 1, 1000, 1000, "in-a")
    assert world.conn.execute(
        "SELECT attempt_no, diameter_session_id, requested_minor FROM recovery_attempts"
    ).fetchall() == [(1, "s9", 300)]
    # a session without an amount asked: the attempt records 0 asked
    rid = store.insert_recovery(world.conn, event_id="ev-no-amount", msisdn=A,
                                recharge_minor=10, balance_after_minor=None, in_node=None,
                                now=NOW, session_id="s10")
    assert store.get_recovery(world.conn, rid).requested_minor == 0
    assert world.conn.execute("SELECT requested_minor FROM recovery_attempts"
                              " WHERE diameter_session_id = 's10'").fetchone() == (0,)


# -- what is pending: recoveries wait for CONFIRMING advances ------------------------


@pytest.mark.parametrize(
    ("loan_state", "recovery_state", "pending", "recovery_pending"),
    [
        (store.ACTIVE, None, False, False),
        (store.CONFIRMING, None, True, True),
        (store.CREDITING, None, True, False),
        (store.REQUESTED, None, True, False),
        (store.UNKNOWN, None, True, False),
        (store.FAILED, None, False, False),
        (store.REPAID, None, False, False),
        (store.ACTIVE, store.RECOVERING, True, True),
        (store.ACTIVE, store.UNKNOWN, True, True),
        (store.ACTIVE, store.DONE, False, False),
        (None, store.RECOVERING, True, True),
    ],
)
@pytest.mark.parametrize("known", [True, False])
def test_pending_operations(loan_state, recovery_state, pending, recovery_pending, known):
    conn = fresh()
    if known:
        store.ensure_subscriber(conn, A, NOW)
    if loan_state is not None:
        loan_in(conn, loan_state, known=True, key="k")
    if recovery_state is not None:
        rid = store.insert_recovery(conn, event_id="e", msisdn=A, recharge_minor=10,
                                    balance_after_minor=None, in_node=None, now=NOW)
        if recovery_state == store.UNKNOWN:
            store.set_recovery_state(conn, rid, recovery_state, NOW)
        elif recovery_state == store.DONE:  # nothing taken: DONE through apply_recovery
            store.apply_recovery(conn, store.get_recovery(conn, rid),
                                 Recovery(0, (), clears_all=False), NOW)
        assert store.get_recovery(conn, rid).state == recovery_state
    # another subscriber's pending work is not his
    store.insert_loan(conn, msisdn=B, tier_id=1, principal_minor=1, fee_minor=0,
                      state=store.CONFIRMING, channel="auto", idempotency_key="kb",
                      in_node=None, session_id=None, now=NOW)
    loaded = store.load_subscriber(conn, A)
    assert loaded.state.operation_pending is pending
    assert loaded.recovery_pending is recovery_pending
    assert store.has_unsettled(conn, A) is pending
    assert loaded.known is known  # the loan was inserted without ensuring the row


def test_no_write_off_while_anything_is_unsettled():
    world = world_with_loan()
    store.insert_loan(world.conn, msisdn=A, tier_id=1, principal_minor=100, fee_minor=10,
                      state=store.CONFIRMING, channel="auto", idempotency_key="adv",
                      in_node=None, session_id=None, now=NOW, loan_id="ADV")
    lines = journal_lines(world.conn)
    assert store.write_off(world.conn, "L0000", "ageing", NOW) == 0
    assert journal_lines(world.conn) == lines
    assert store.get_loan(world.conn, "L0000").state == store.ACTIVE
    store.settle_advance(world.conn, "ADV", True, NOW)
    rid = recovering(world)
    assert store.write_off(world.conn, "L0000", "ageing", NOW) == 0
    book(world.conn, rid, 0)
    assert store.write_off(world.conn, "L0000", "ageing", NOW) == 550


def test_write_off_refuses_loans_not_open():
    # each loan its own subscriber: an unsettled one would hold back the others
    for n, state in enumerate((store.FAILED, store.REPAID, store.WRITTEN_OFF)):
        conn = fresh()
        loan_in(conn, state, loan_id=state, msisdn=f"2019{n}")
        before = snapshot(conn)
        assert store.write_off(conn, state, "ageing", NOW) == 0
        assert snapshot(conn) == before
    conn = fresh()
    for state in (store.CREDITING, store.CONFIRMING):
        loan_in(conn, state, key=state, loan_id=state, msisdn=B)
    lines = journal_lines(conn)
    for state in (store.CREDITING, store.CONFIRMING, "missing"):
        assert store.write_off(conn, state, "ageing", NOW) == 0
    assert journal_lines(conn) == lines


# -- the loan state table: every forbidden transition is refused -----------------------

LOAN_STATES = (store.REQUESTED, store.CREDITING, store.ACTIVE, store.PARTIALLY_REPAID,
               store.REPAID, store.FAILED, store.UNKNOWN, store.WRITTEN_OFF, store.CONFIRMING)




def snapshot(conn: sqlite3.Connection) -> tuple:
    return (conn.execute("SELECT * FROM loans ORDER BY loan_id").fetchall(),
            conn.execute("SELECT * FROM journal ORDER BY tx_id, line_no").fetchall(),
            conn.execute("SELECT * FROM subscribers").fetchall())


@pytest.mark.parametrize("to", [store.ACTIVE, store.FAILED, store.UNKNOWN, store.CONFIRMING,
                                store.REPAID])
@pytest.mark.parametrize("start", LOAN_STATES)
def test_settle_loan_state_table(start, to):
    conn = fresh()
    loan_id = loan_in(conn, start)
    before = snapshot(conn)
    if start == to:
        assert store.settle_loan(conn, loan_id, to, NOW).state == to
        assert snapshot(conn) == before
        return
    if store.CONFIRMING in (start, to):
        # an advance settles through settle_advance only (said before the saga table
        # is asked, which would refuse it too)
        with pytest.raises(store.LedgerInvariantError, match="through settle_advance"):
            store.settle_loan(conn, loan_id, to, NOW, result_code=5003)
        assert snapshot(conn) == before
        return
    allowed = start in (store.REQUESTED, store.CREDITING, store.UNKNOWN) and (
        to != store.REPAID)
    if not allowed:
        # Refused by the saga table. A settlement never sets REPAID (a loan is repaid by
        # apply_recovery only), nor moves a loan out of ACTIVE, PARTIALLY_REPAID or a
        # final state.
        with pytest.raises(store.IllegalTransition,
                           match="cannot set" if to == store.REPAID else "not allowed"):
            store.settle_loan(conn, loan_id, to, NOW, result_code=5003)
        assert snapshot(conn) == before
        return
    row = store.settle_loan(conn, loan_id, to, NOW, result_code=2001)
    assert row.state == to == store.get_loan(conn, loan_id).state
    journalled = balances(conn, A)["principal_receivable"]
    assert journalled == (100 if to == store.ACTIVE else 0)
    assert store.load_subscriber(conn, A).state.loans_since_full_payback == (
        1 if to == store.ACTIVE else 0)
    code = conn.execute("SELECT result_code FROM loans").fetchone()[0]
    assert code == 2001


@pytest.mark.parametrize("confirmed", [True, False])
@pytest.mark.parametrize("start", LOAN_STATES)
def test_settle_advance_state_table(start, confirmed):
    conn = fresh()
    loan_id = loan_in(conn, start)
    before = snapshot(conn)
    target = store.ACTIVE if confirmed else store.FAILED
    if start == target:
        assert store.settle_advance(conn, loan_id, confirmed, NOW).state == target
        assert snapshot(conn) == before
    elif start != store.CONFIRMING:
        # only a CONFIRMING advance is confirmed or refused (the saga table)
        with pytest.raises(store.IllegalTransition):
            store.settle_advance(conn, loan_id, confirmed, NOW)
        assert snapshot(conn) == before
    else:
        assert store.settle_advance(conn, loan_id, confirmed, NOW).state == target
        assert store.get_loan(conn, loan_id).state == target
        assert balances(conn, A)["principal_receivable"] == (100 if confirmed else 0)
        assert balances(conn, A)["fee_income"] == (-10 if confirmed else 0)


@pytest.mark.parametrize("state", [store.UNKNOWN, store.PARTIALLY_REPAID, store.REPAID,
                                   store.FAILED, store.WRITTEN_OFF])
def test_a_loan_is_never_booked_in_a_state_only_a_settlement_reaches(state):
    # booked REPAID or WRITTEN_OFF it would owe nothing and never be journalled
    conn = fresh()
    with pytest.raises(store.IllegalTransition, match="loan L is None, cannot become"):
        store.insert_loan(conn, msisdn=A, tier_id=1, principal_minor=100, fee_minor=10,
                          state=state, channel="ussd", idempotency_key=None, in_node=None,
                          session_id=None, now=NOW, loan_id="L")
    assert snapshot(conn) == ([], [], [])


@pytest.mark.parametrize("start", [store.RECOVERING, store.UNKNOWN, store.DONE, store.FAILED])
@pytest.mark.parametrize("to", [store.RECOVERING, store.UNKNOWN, store.DONE, store.FAILED])
def test_set_recovery_state_table(start, to):
    # Only UNKNOWN (answer lost) and FAILED (nothing taken) are settlements; DONE is
    # reached by apply_recovery alone, a new attempt by start_recovery_attempt.
    conn = fresh()
    rid = store.insert_recovery(conn, event_id="e", msisdn=A, recharge_minor=10,
                                balance_after_minor=None, in_node=None, now=NOW)
    if start == store.DONE:
        store.apply_recovery(conn, store.get_recovery(conn, rid),
                             Recovery(0, (), clears_all=False), NOW)
    elif start != store.RECOVERING:
        store.set_recovery_state(conn, rid, start, NOW)
    if to not in (store.UNKNOWN, store.FAILED):
        with pytest.raises(store.IllegalTransition, match="cannot set"):
            store.set_recovery_state(conn, rid, to, NOW)
    elif start == to or start in (store.RECOVERING, store.UNKNOWN):
        store.set_recovery_state(conn, rid, to, NOW)  # a replay of the same one: no-op
    else:
        with pytest.raises(store.IllegalTransition, match="not allowed"):
            store.set_recovery_state(conn, rid, to, NOW)
    final = to if to in (store.UNKNOWN, store.FAILED) and (
        start in (store.RECOVERING, store.UNKNOWN)) else start
    assert store.get_recovery(conn, rid).state == final


def test_settling_an_unknown_loan_is_a_key_error():
    conn = fresh()
    with pytest.raises(KeyError):
        store.settle_loan(conn, "nope", store.ACTIVE, NOW)
    with pytest.raises(KeyError):
        store.settle_advance(conn, "nope", True, NOW)


def test_a_crediting_loan_is_not_journalled_until_settled_active():
    conn = fresh()
    loan_id = loan_in(conn, store.CREDITING)
    assert journal_lines(conn) == 0 and store.debt_owed(conn, A) == 0
    store.settle_loan(conn, loan_id, store.UNKNOWN, NOW)
    assert journal_lines(conn) == 0
    store.settle_loan(conn, loan_id, store.ACTIVE, NOW)
    assert journal_lines(conn) == 4 and store.debt_owed(conn, A) == 110


# -- reads ----------------------------------------------------------------------------


def test_load_subscriber_reads_every_column_into_its_place():
    conn = fresh()
    store.ensure_subscriber(conn, A, NOW)
    conn.execute(
        "UPDATE subscribers SET tenure_days = 400, arpu_minor = 6000, attributes = ?,"
        " language = 'ar', auto_advance_opt_in = 1, ads_opt_out = 0, barred_manual = 1,"
        " barred_reason = 'fraud', loans_since_full_payback = 2, learned_in_node = 'in-b'"
        " WHERE msisdn = ?", (json.dumps({"region": "giza"}), A))
    later = NOW + timedelta(hours=1)
    store.insert_loan(conn, msisdn=A, tier_id=7, principal_minor=2500, fee_minor=250,
                      state=store.ACTIVE, channel="ussd", idempotency_key=None, in_node=None,
                      session_id=None, now=later, loan_id="A-later")
    store.insert_loan(conn, msisdn=A, tier_id=3, principal_minor=500, fee_minor=50,
                      state=store.ACTIVE, channel="ussd", idempotency_key=None, in_node=None,
                      session_id=None, now=NOW, loan_id="Z-first")
    conn.execute("UPDATE loans SET principal_repaid_minor = 7, fee_repaid_minor = 3,"
                 " state = ? WHERE loan_id = 'Z-first'", (store.PARTIALLY_REPAID,))
    loaded = store.load_subscriber(conn, A, balance_minor=77, default_language="en")
    s = loaded.state
    assert (loaded.known, loaded.learned_in_node, loaded.recovery_pending) == (True, "in-b", False)
    assert (s.profile.tenure_days, s.profile.arpu_minor, dict(s.profile.attributes)) == (
        400, 6000, {"region": "giza"})
    assert (s.language, s.auto_advance_opt_in, s.ads_opt_out, s.barred_manual,
            s.barred_reason, s.loans_since_full_payback, s.balance_minor) == (
        "ar", True, False, True, "fraud", 4, 77)  # 2 before + the two loans
    expected = (OpenLoan("Z-first", 3, 500, 50, 7, 3, NOW),
                OpenLoan("A-later", 7, 2500, 250, 0, 0, later))
    assert s.open_loans == expected == store.open_loans(conn, A)
    assert s.debt_minor == 540 + 2750

    conn.execute("UPDATE subscribers SET ads_opt_out = 1, auto_advance_opt_in = 0,"
                 " barred_manual = 0, language = NULL, arpu_minor = NULL, attributes = NULL")
    s = store.load_subscriber(conn, A, default_language="fr").state
    assert (s.ads_opt_out, s.auto_advance_opt_in, s.barred_manual, s.language) == (
        True, False, False, "fr")
    assert (s.profile.arpu_minor, dict(s.profile.attributes)) == (0, {})


def test_load_subscriber_without_a_row_or_a_profile():
    conn = fresh()
    loaded = store.load_subscriber(conn, A, balance_minor=5, default_language="ar")
    assert (loaded.known, loaded.learned_in_node, loaded.state.profile) == (False, None, None)
    assert (loaded.state.language, loaded.state.balance_minor) == ("ar", 5)
    # a subscriber never seen: no loans counted, not barred, not opted in or out
    s = loaded.state
    assert (s.loans_since_full_payback, s.barred_manual, s.barred_reason, s.auto_advance_opt_in,
            s.ads_opt_out, s.operation_pending, s.open_loans) == (0, False, None, False, False,
                                                                  False, ())
    store.ensure_subscriber(conn, A, NOW)
    loaded = store.load_subscriber(conn, A)
    assert loaded.known and loaded.state.profile is None


def test_write_off_candidates_are_open_loans_strictly_older_oldest_first():
    conn = fresh()
    for minutes, state, loan_id in [(3, store.ACTIVE, "c"), (1, store.PARTIALLY_REPAID, "a"),
                                    (2, store.REPAID, "b"), (4, store.ACTIVE, "d"),
                                    (0, store.CONFIRMING, "e")]:
        store.insert_loan(conn, msisdn=A if loan_id != "c" else B, tier_id=1,
                          principal_minor=10, fee_minor=1, state=store.ACTIVE, channel="ussd",
                          idempotency_key=None, in_node=None, session_id=None,
                          now=NOW + timedelta(minutes=minutes), loan_id=loan_id)
        conn.execute("UPDATE loans SET state = ? WHERE loan_id = ?", (state, loan_id))
    cutoff = NOW + timedelta(minutes=4)
    assert store.write_off_candidates(conn, cutoff, 10) == [(A, "a"), (B, "c")]
    assert store.write_off_candidates(conn, cutoff, 1) == [(A, "a")]
    assert store.write_off_candidates(conn, cutoff + timedelta(microseconds=1), 10)[-1] == (
        A, "d")


def test_post_refuses_an_unbalanced_entry_and_drops_zero_lines():
    conn = fresh()
    with pytest.raises(store.LedgerInvariantError):
        store.post(conn, [("recovered_cash", 5), ("fee_receivable", -4)], msisdn=A,
                   memo="bad", now=NOW)
    assert journal_lines(conn) == 0
    tx = store.post(conn, [("recovered_cash", 5), ("fee_receivable", 0),
                           ("principal_receivable", -5)], msisdn=A, memo="ok", now=NOW,
                    loan_id="L", recovery_id="R")
    rows = conn.execute("SELECT tx_id, line_no, account, amount_minor, loan_id, recovery_id"
                        " FROM journal ORDER BY line_no").fetchall()
    assert rows == [(tx, 0, "recovered_cash", 5, "L", "R"),
                    (tx, 1, "principal_receivable", -5, "L", "R")]


def test_open_loans_created_at_the_same_moment_are_ordered_by_id():
    conn = fresh()
    for loan_id, tier, state in [("L-b", 1, store.ACTIVE), ("L-a", 9, store.PARTIALLY_REPAID)]:
        store.insert_loan(conn, msisdn=A, tier_id=tier, principal_minor=100, fee_minor=10,
                          state=store.ACTIVE, channel="ussd", idempotency_key=None,
                          in_node=None, session_id=None, now=NOW, loan_id=loan_id)
        conn.execute("UPDATE loans SET state = ? WHERE loan_id = ?", (state, loan_id))
    expected = ["L-a", "L-b"]
    assert [x.loan_id for x in store.open_loans(conn, A)] == expected
    assert [x.loan_id for x in store.load_subscriber(conn, A).state.open_loans] == expected


@pytest.mark.parametrize("settled", [store.DONE, store.FAILED])
def test_a_stale_copy_of_a_settled_recovery_books_nothing(settled):
    # The row handed in was read before the recovery settled (DONE or FAILED since):
    # booking it again would take the same debit twice. The guard is the stored row.
    conn = fresh()
    store.ensure_subscriber(conn, A, NOW)
    loan_id = store.insert_loan(conn, msisdn=A, tier_id=1, principal_minor=100, fee_minor=10,
                                state=store.ACTIVE, channel="ussd", idempotency_key="k",
                                in_node=None, session_id=None, now=NOW)
    rid = store.insert_recovery(conn, event_id="e", msisdn=A, recharge_minor=50,
                                balance_after_minor=None, in_node=None, now=NOW)
    stale = store.get_recovery(conn, rid)
    allocation = Recovery(50, (RecoveryPart(loan_id, 10, 40),), clears_all=False)
    if settled == store.DONE:
        store.apply_recovery(conn, stale, allocation, NOW)
    else:
        store.set_recovery_state(conn, rid, store.FAILED, NOW)
    before = (balances(conn, A), journal_lines(conn), store.get_loan(conn, loan_id))
    error = rolled_back(conn, store.apply_recovery, conn, stale, allocation, NOW)
    assert "not an unsettled recovery" in str(error)
    assert (balances(conn, A), journal_lines(conn), store.get_loan(conn, loan_id)) == before
