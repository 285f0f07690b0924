"""The saga table (core/sagas.py) and docs/ledger.md agree; the table's rules hold."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from extrabalance.core import sagas

DOC = Path(__file__).resolve().parents[2] / "docs" / "ledger.md"
# Capitalised words in the diagrams that are protocol words, not states.
NOT_STATES = {"IN", "CCR", "CCA", "GSU", "DIRECT_DEBITING", "REFUND_ACCOUNT"}
_WORD = re.compile(r"(?<![\w-])[A-Z][A-Z_]+(?![\w-])")


def _diagram(heading: str) -> list[str]:
    """The first fenced block after `heading` in docs/ledger.md, as lines."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    fence = text.index("```", start)
    end = text.index("```", fence + 3)
    return text[fence + 3 : end].strip("\n").splitlines()


def _chains(line: str) -> list[set[str]]:
    """The states of one diagram line in arrow order: each element holds the states
    between two arrows (`A / B` and `A | B` are alternatives); words that are no state
    are skipped, and a stretch without a state joins its neighbours."""
    groups = []
    for stretch in line.split("►"):
        words = {w for w in _WORD.findall(stretch) if w not in NOT_STATES}
        if words:
            groups.append(words)
    return groups


_BRANCH = re.compile(r"^[\s│]*([├└])")


def _parent(lines: list[str], i: int) -> str | None:
    """The state a branch line (`├─►` / `└─►`) hangs from: on the nearest line above
    with a state word starting at or left of the branch's column, the rightmost one."""
    m = _BRANCH.match(lines[i])
    if m is None:
        return None
    col = m.start(1)
    for above in reversed(lines[:i]):
        words = [w for w in _WORD.finditer(above) if w.group() not in NOT_STATES]
        left = [w for w in words if w.start() <= col]
        if left:
            return left[-1].group()
    return None


def _arrows(lines: list[str]) -> list[tuple[str, str, str]]:
    """(before, after, line) for every arrow between two states in a diagram."""
    found = []
    for i, line in enumerate(lines):
        groups = _chains(line)
        parent = _parent(lines, i)
        if parent is not None and groups:
            groups = [{parent}, *groups]
        for before, after in itertools.pairwise(groups):
            found += [(a, b, line.strip()) for a in before for b in after]
    return found


DIAGRAMS = {
    "## Loan saga": (sagas.LOAN_STATES, sagas.LOAN_MOVES),
    "## Advance saga": (sagas.LOAN_STATES, sagas.LOAN_MOVES),
    "## Recovery saga": (sagas.RECOVERY_STATES, sagas.RECOVERY_MOVES),
}


@pytest.mark.parametrize("heading", list(DIAGRAMS))
def test_every_arrow_of_the_docs_diagrams_is_a_move_of_the_table(heading: str) -> None:
    states, moves = DIAGRAMS[heading]
    lines = _diagram(heading)
    for line in lines:
        for group in _chains(line):
            unknown = group - set(states)
            assert not unknown, f"{heading}: {sorted(unknown)} in {line!r} is not a state"
    arrows = _arrows(lines)
    assert len(arrows) >= 3, f"{heading}: the diagram's arrows were not found"
    for before, after, line in arrows:
        # "stays X" is drawn as an arrow to the same state: no change, as in the table
        assert before == after or (before, after) in moves, (
            f"{heading}: {before} → {after} ({line!r})"
        )


def test_every_state_written_today_is_in_a_diagram() -> None:
    drawn = set()
    for heading in DIAGRAMS:
        for line in _diagram(heading):
            drawn |= {w for g in _chains(line) for w in g}
    # REQUESTED is in the schema for a two-step flow; the docs say it is never written.
    missing = (set(sagas.LOAN_STATES) | set(sagas.RECOVERY_STATES)) - drawn - {sagas.REQUESTED}
    assert not missing


def test_the_docs_table_is_generated_from_the_saga_table() -> None:
    text = DOC.read_text(encoding="utf-8")
    begin = text.index("<!-- saga-table:begin")
    begin = text.index("\n", begin) + 1
    end = text.index("<!-- saga-table:end -->")
    assert text[begin:end] == sagas.render_markdown(), (
        "docs/ledger.md's saga table is out of date; replace it with "
        "extrabalance.core.sagas.render_markdown()"
    )


def test_final_states_have_no_way_out() -> None:
    for before, _ in sagas.LOAN_TRANSITIONS:
        assert before not in sagas.LOAN_FINAL_STATES
    for before, _ in sagas.RECOVERY_TRANSITIONS:
        assert before not in sagas.RECOVERY_FINAL_STATES


def test_every_state_is_reachable_and_every_unsettled_state_can_settle() -> None:
    for table, states, final in (
        (sagas.LOAN_TRANSITIONS, sagas.LOAN_STATES, sagas.LOAN_FINAL_STATES),
        (sagas.RECOVERY_TRANSITIONS, sagas.RECOVERY_STATES, sagas.RECOVERY_FINAL_STATES),
    ):
        reached = {None}
        while True:
            more = {after for (before, _), after in table.items() if before in reached}
            if more <= reached:
                break
            reached |= more
        assert reached - {None} == set(states)
        for state in states:
            if state in final:
                continue
            # some path leads from it to a final state
            seen, frontier = {state}, {state}
            while frontier:
                frontier = {a for (b, _), a in table.items() if b in frontier} - seen
                seen |= frontier
            assert seen & set(final), state


def test_illegal_moves_raise_and_are_ledger_invariant_errors() -> None:
    assert sagas.loan_step(sagas.CREDITING, sagas.IN_CREDITED) == sagas.ACTIVE
    with pytest.raises(sagas.IllegalTransition):
        sagas.loan_step(sagas.REPAID, sagas.WRITE_OFF)
    with pytest.raises(sagas.LedgerInvariantError):
        sagas.check_loan_move(sagas.FAILED, sagas.ACTIVE)
    with pytest.raises(sagas.IllegalTransition):
        sagas.recovery_step(sagas.DONE, sagas.IN_REFUSED)
    assert (sagas.UNKNOWN, sagas.DONE) in sagas.RECOVERY_MOVES
    assert sagas.sources(sagas.WRITE_OFF, sagas.LOAN_TRANSITIONS) == sagas.LOAN_OPEN_STATES
    # a settlement is the IN's answer: ACTIVE → REPAID is a move of the table, but
    # not one a settlement may make
    assert sagas.settlement_event(sagas.ACTIVE, sagas.LOAN_SETTLEMENTS) == sagas.IN_CREDITED
    with pytest.raises(sagas.IllegalTransition):
        sagas.settlement_event(sagas.REPAID, sagas.LOAN_SETTLEMENTS)
    with pytest.raises(sagas.IllegalTransition):
        sagas.settlement_event(sagas.DONE, sagas.RECOVERY_SETTLEMENTS)


def test_store_reads_its_state_words_from_the_table() -> None:
    from extrabalance.ledger import store

    for name in ("ACTIVE", "CONFIRMING", "CREDITING", "DONE", "RECOVERING", "UNKNOWN"):
        assert getattr(store, name) is getattr(sagas, name)
    assert store.LedgerInvariantError is sagas.LedgerInvariantError


@pytest.mark.parametrize(
    ("table", "entry"),
    [
        ("LOAN_TRANSITIONS", {("ACTIVE", "repaid_all"): "PAID"}),  # no such state after
        ("LOAN_TRANSITIONS", {("OWING", "repaid_all"): "REPAID"}),  # nor before
        ("RECOVERY_TRANSITIONS", {("RECOVERING", "in_debited"): "REPAID"}),  # a loan's
    ],
)
def test_a_table_naming_a_state_that_does_not_exist_is_refused_at_import(
    monkeypatch: pytest.MonkeyPatch, table: str, entry: dict[tuple[str, str], str]
) -> None:
    sagas._check_tables()  # the table as shipped
    monkeypatch.setattr(sagas, table, {**getattr(sagas, table), **entry})
    with pytest.raises(AssertionError):
        sagas._check_tables()


def test_each_step_answers_the_state_its_table_names() -> None:
    for (before, event), after in sagas.LOAN_TRANSITIONS.items():
        assert sagas.loan_step(before, event, "L") == after
    for (before, event), after in sagas.RECOVERY_TRANSITIONS.items():
        assert sagas.recovery_step(before, event, "R") == after
