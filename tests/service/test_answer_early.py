"""A USSD loan answered on the IN's word, before its settlement is durable
(`borrow(answer_early=True)`): the screen comes first, the money stays exactly-once."""

import asyncio

import pytest

from extrabalance.ledger import store
from extrabalance.service.outcomes import BorrowStatus


@pytest.fixture
def h(h_sqlite):
    """SQLite only: the group-commit writer's staged answers are the SQLite ledger's own."""
    return h_sqlite


M = "201001234567"  # routed statically to in-a


def hold_commits(h, *, from_commit: int):
    """COMMITs from the `from_commit`-th on wait until the returned event is set."""
    release = asyncio.Event()
    loop = asyncio.get_running_loop()
    writer = h.ledger.writer
    plain = writer._commit_and_check
    commits = []

    def held(conn):
        commits.append(1)
        if len(commits) >= from_commit:
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
        plain(conn)

    writer._commit_and_check = held
    return release


def loan_state(conn):
    return conn.execute("SELECT state FROM loans").fetchall()


async def test_the_answer_comes_before_the_settlement_is_durable(h):
    await h.add_profile(M)
    release = hold_commits(h, from_commit=2)  # the intent commits, the settlement waits
    out = await asyncio.wait_for(
        h.lending.borrow(M, 4, "ussd", "ussd:d1:confirm", answer_early=True), 5)
    assert out.status is BorrowStatus.GRANTED and out.debt_minor == 1100
    # Not durable yet: no EDR, no SMS, and a reader still sees the intent.
    assert h.events.kinds() == [] and h.notifier.templates() == []
    assert await h.ledger.read(loan_state) == [(store.CREDITING,)]
    release.set()
    await h.lending.drain_sagas()
    assert await h.ledger.read(loan_state) == [(store.ACTIVE,)]
    assert h.events.kinds() == ["loan"] and h.notifier.templates() == ["loan_granted"]
    assert (await h.check_invariants())["debts"] == {M: 1100}


async def test_a_settlement_lost_with_its_batch_is_redone_by_the_resolver(h):
    await h.add_profile(M)
    writer = h.ledger.writer
    plain = writer._commit_and_check
    commits = []

    def second_commit_fails(conn):
        commits.append(1)
        if len(commits) == 2:  # the settlement's batch (the intent's was the first)
            raise OSError("disk I/O error (injected)")
        plain(conn)

    writer._commit_and_check = second_commit_fails
    out = await h.lending.borrow(M, 4, "ussd", "ussd:d1:confirm", answer_early=True)
    assert out.status is BorrowStatus.GRANTED  # the IN did credit the subscriber
    await h.lending.drain_sagas()
    assert await h.ledger.read(loan_state) == [(store.CREDITING,)]
    assert h.events.kinds() == []  # nothing billed for a settlement that was lost
    # The same dialog step replayed meanwhile: no second loan, the loan is pending.
    again = await h.lending.borrow(M, 4, "ussd", "ussd:d1:confirm", answer_early=True)
    assert again.replayed and again.status is BorrowStatus.PENDING
    report = await h.resolver.run_once()
    assert report is not None
    assert await h.ledger.read(loan_state) == [(store.ACTIVE,)]
    assert len(h.fake_in.credits) == 1 and h.fake_in.balances[M] == 1000  # credited once
    assert h.events.kinds() == ["loan"]
    assert (await h.check_invariants())["debts"] == {M: 1100}


async def test_a_refusal_answers_early_too(h):
    await h.add_profile(M, tenure_days=100, arpu_minor=0)  # standard segment: no tier 9
    out = await h.lending.borrow(M, 9, "ussd", "k1", answer_early=True)
    assert out.status is BorrowStatus.REFUSED
    assert h.fake_in.calls == []


async def test_a_menu_asked_for_meanwhile_waits_for_the_settlement(h):
    await h.add_profile(M)
    release = hold_commits(h, from_commit=2)
    await asyncio.wait_for(
        h.lending.borrow(M, 4, "ussd", "ussd:d1:confirm", answer_early=True), 5)
    menu = asyncio.ensure_future(h.lending.overview(M))
    await asyncio.sleep(0.05)
    assert not menu.done()  # the subscriber's lock is held until the loan is durable
    release.set()
    status, offer = await asyncio.wait_for(menu, 5)
    assert not status.operation_pending and status.debt_minor == 1100
    assert offer.debt_minor == 1100


async def test_a_menu_does_not_wait_long_for_a_slow_operation(h):
    await h.add_profile(M)
    async with h.lending.locks.hold(M):  # e.g. a debit the IN is slow to answer
        status, _ = await asyncio.wait_for(h.lending.overview(M), 5)
    assert status.debt_minor == 0
