"""The life of a loan, an advance and a recovery: every state and every transition.

What this file owns: the states the ledger stores for loans (`loans.state`, advances
included) and recoveries (`recoveries.state`), and the one table of transitions
between them. Every ledger adapter asks `loan_step` / `recovery_step` before it
writes a new state, so a transition that is not in the table is refused (raises
`IllegalTransition`, which rolls the operation back) whichever database holds the
ledger. The diagrams and the generated table in docs/ledger.md are checked against
this table by `tests/core/test_sagas.py`.

Rules the table encodes (docs/ledger.md "Loan saga", "Advance saga", "Recovery saga"):

* money moves on these transitions only: a loan becoming ACTIVE (or being booked
  ACTIVE / CONFIRMING: the disbursement is journalled), a recovery becoming DONE (the
  repayment is journalled and the loans move to PARTIALLY_REPAID / REPAID), an
  operator's write-down (part of a loan waived: PARTIALLY_REPAID; all that is left:
  WRITTEN_OFF) and ageing (WRITTEN_OFF). A CONFIRMING advance refused by the IN is
  FAILED with a reversing entry;
* REPAID, FAILED, WRITTEN_OFF (loans) and DONE, FAILED (recoveries) are final;
* a transition to the state a record already has is a replay of the same settlement
  (an IN answer seen twice, a resolver run after the saga settled) and changes
  nothing; the adapters answer it with the record as it is. `loan_step` and
  `recovery_step` are only asked about real changes.

Pure data and functions: no IO, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

# -- loan states (advances are loans booked CONFIRMING) -------------------------------

REQUESTED: Final = "REQUESTED"  # in the schema for a two-step flow; never written today
CREDITING: Final = "CREDITING"  # intent recorded, REFUND_ACCOUNT sent or about to be
ACTIVE: Final = "ACTIVE"  # credited at the IN: owed in full
PARTIALLY_REPAID: Final = "PARTIALLY_REPAID"
REPAID: Final = "REPAID"
FAILED: Final = "FAILED"  # nothing owed (IN refused, never executed, advance refused)
UNKNOWN: Final = "UNKNOWN"  # the IN's answer was lost: the resolver finds out
WRITTEN_OFF: Final = "WRITTEN_OFF"
# An automatic advance answered 2001 + Granted-Service-Unit whose credit the IN has
# not yet confirmed (docs/diameter.md "Advance confirmation"). Journalled when booked
# (the debt is visible at once); confirmed → ACTIVE, refused → FAILED with a reversing
# journal entry.
CONFIRMING: Final = "CONFIRMING"

LOAN_STATES: Final = (
    REQUESTED,
    CREDITING,
    CONFIRMING,
    UNKNOWN,
    ACTIVE,
    PARTIALLY_REPAID,
    REPAID,
    FAILED,
    WRITTEN_OFF,
)
LOAN_OPEN_STATES: Final = (ACTIVE, PARTIALLY_REPAID)  # owing, recoverable
LOAN_UNSETTLED_STATES: Final = (REQUESTED, CREDITING, UNKNOWN, CONFIRMING)
# Loans whose amounts are in the journal (receivables) and in the repaid-columns cache.
LOAN_JOURNALLED_STATES: Final = (*LOAN_OPEN_STATES, CONFIRMING)
LOAN_FINAL_STATES: Final = (REPAID, FAILED, WRITTEN_OFF)

# -- recovery states -------------------------------------------------------------------

RECOVERING: Final = "RECOVERING"  # a DIRECT_DEBITING recorded, sent or about to be
DONE: Final = "DONE"
# FAILED and UNKNOWN are shared with loans (same words, same meaning).
RECOVERY_STATES: Final = (RECOVERING, UNKNOWN, DONE, FAILED)
RECOVERY_UNSETTLED_STATES: Final = (RECOVERING, UNKNOWN)
RECOVERY_FINAL_STATES: Final = (DONE, FAILED)

# -- advertisement campaigns (no money moves: words only, kept with the others) -----

CAMPAIGN_PREPARING: Final = "PREPARING"  # recipients being added; not drained yet
CAMPAIGN_QUEUED: Final = "QUEUED"
CAMPAIGN_RUNNING: Final = "RUNNING"
CAMPAIGN_DONE: Final = "DONE"
CAMPAIGN_CANCELLED: Final = "CANCELLED"
CAMPAIGN_ACTIVE_STATES: Final = (CAMPAIGN_QUEUED, CAMPAIGN_RUNNING)
RECIPIENT_PENDING: Final = "PENDING"
RECIPIENT_SENT: Final = "SENT"
RECIPIENT_SUPPRESSED: Final = "SUPPRESSED"

# -- events -----------------------------------------------------------------------------

# Loans. `BOOK_*` create the record (from no state).
BOOK_REQUEST: Final = "book_request"
BOOK_INTENT: Final = "book_intent"  # borrow: intent before REFUND_ACCOUNT
BOOK_CREDITED: Final = "book_credited"  # a loan recorded already credited (imports)
BOOK_ADVANCE: Final = "book_advance"  # out-of-balance CCR answered 2001 + GSU
IN_CREDITED: Final = "in_credited"  # 2001 to REFUND_ACCOUNT
IN_REFUSED: Final = "in_refused"  # the IN said no, or never executed it
IN_LOST: Final = "in_lost"  # timeout, connection lost: unknown outcome
ADVANCE_CONFIRMED: Final = "advance_confirmed"
ADVANCE_REFUSED: Final = "advance_refused"  # reversing entry, bad-debt count back
# reconcile-in: the IN's own records show it never applied the grant of an ACTIVE
# advance nothing was recovered of; reversed like a refused confirmation
ADVANCE_NEVER_CREDITED: Final = "advance_never_credited"
REPAID_PART: Final = "repaid_part"  # a recovery took part of what is owed
REPAID_ALL: Final = "repaid_all"  # a recovery took the rest
WRITE_OFF: Final = "write_off"  # aged past write_off_days, or the rest waived
WAIVE_PART: Final = "waive_part"  # an operator's write-down of part of what is owed

# Recoveries.
BOOK_RECOVERY: Final = "book_recovery"  # recharge: RECOVERING with its first attempt
NEXT_ATTEMPT: Final = "next_attempt"  # 4012: half the amount, a new Session-Id
IN_DEBITED: Final = "in_debited"  # 2001 to DIRECT_DEBITING: journal, loans
# IN_REFUSED and IN_LOST as for loans.

# (state before or None for a new record, event) → state after. Read it like the
# diagrams in docs/ledger.md.
LOAN_TRANSITIONS: Final[dict[tuple[str | None, str], str]] = {
    (None, BOOK_REQUEST): REQUESTED,
    (None, BOOK_INTENT): CREDITING,
    (None, BOOK_CREDITED): ACTIVE,
    (None, BOOK_ADVANCE): CONFIRMING,
    # a borrow: the IN's answer to REFUND_ACCOUNT, or the resolver's re-send
    (REQUESTED, IN_CREDITED): ACTIVE,
    (REQUESTED, IN_REFUSED): FAILED,
    (REQUESTED, IN_LOST): UNKNOWN,
    (CREDITING, IN_CREDITED): ACTIVE,
    (CREDITING, IN_REFUSED): FAILED,
    (CREDITING, IN_LOST): UNKNOWN,
    (UNKNOWN, IN_CREDITED): ACTIVE,
    (UNKNOWN, IN_REFUSED): FAILED,
    # an advance: the IN's answer to its confirmation
    (CONFIRMING, ADVANCE_CONFIRMED): ACTIVE,
    (CONFIRMING, ADVANCE_REFUSED): FAILED,
    (ACTIVE, ADVANCE_NEVER_CREDITED): FAILED,
    # paying back and ageing
    (ACTIVE, REPAID_PART): PARTIALLY_REPAID,
    (ACTIVE, REPAID_ALL): REPAID,
    (PARTIALLY_REPAID, REPAID_PART): PARTIALLY_REPAID,
    (PARTIALLY_REPAID, REPAID_ALL): REPAID,
    (ACTIVE, WAIVE_PART): PARTIALLY_REPAID,
    (PARTIALLY_REPAID, WAIVE_PART): PARTIALLY_REPAID,
    (ACTIVE, WRITE_OFF): WRITTEN_OFF,
    (PARTIALLY_REPAID, WRITE_OFF): WRITTEN_OFF,
}

RECOVERY_TRANSITIONS: Final[dict[tuple[str | None, str], str]] = {
    (None, BOOK_RECOVERY): RECOVERING,
    (RECOVERING, NEXT_ATTEMPT): RECOVERING,
    (RECOVERING, IN_DEBITED): DONE,
    (RECOVERING, IN_REFUSED): FAILED,
    (RECOVERING, IN_LOST): UNKNOWN,
    # the resolver's re-send of the same DIRECT_DEBITING (same Session-Id)
    (UNKNOWN, IN_DEBITED): DONE,
    (UNKNOWN, IN_REFUSED): FAILED,
    (UNKNOWN, NEXT_ATTEMPT): RECOVERING,
}


class LedgerInvariantError(AssertionError):
    """Money would be created or lost: the operation is rolled back."""


class IllegalTransition(LedgerInvariantError):
    """A state change the saga table does not allow."""


def _check_tables() -> None:
    for table, states in ((LOAN_TRANSITIONS, LOAN_STATES), (RECOVERY_TRANSITIONS, RECOVERY_STATES)):
        for (before, _), after in table.items():
            assert before is None or before in states, before
            assert after in states, after


_check_tables()


def _pairs(table: dict[tuple[str | None, str], str]) -> frozenset[tuple[str | None, str]]:
    return frozenset((before, after) for (before, _), after in table.items())


LOAN_MOVES: Final = _pairs(LOAN_TRANSITIONS)  # (before, after) pairs some event allows
RECOVERY_MOVES: Final = _pairs(RECOVERY_TRANSITIONS)  # (the docs' diagrams are checked on them)


# `key`: the loan's or recovery's id, for the error message (formatted only on error:
# these run on every loan and payback).


def loan_step(state: str | None, event: str, key: str = "") -> str:
    """The loan's next state on `event`; raises `IllegalTransition` if none."""
    after = LOAN_TRANSITIONS.get((state, event))
    if after is None:
        raise IllegalTransition(f"loan {key} is {state}: {event} is not allowed")
    return after


def recovery_step(state: str | None, event: str, key: str = "") -> str:
    """The recovery's next state on `event`; raises `IllegalTransition` if none."""
    after = RECOVERY_TRANSITIONS.get((state, event))
    if after is None:
        raise IllegalTransition(f"recovery {key} is {state}: {event} is not allowed")
    return after


def check_loan_move(before: str | None, after: str, key: str = "") -> None:
    """Raise `IllegalTransition` unless some event takes a loan from `before` to `after`
    (a new loan: `before` is None and the events are the `BOOK_*` ones)."""
    if (before, after) not in LOAN_MOVES:
        raise IllegalTransition(f"loan {key} is {before}, cannot become {after}")


def sources(event: str, table: Mapping[tuple[str | None, str], str]) -> tuple[str, ...]:
    """The states (in table order) from which `event` moves a record: what an adapter
    may put in a guarded `UPDATE ... WHERE state IN (...)`."""
    return tuple(before for (before, ev) in table if ev == event and before is not None)


# Adapters handed a settlement's target state (`settle_loan(..., ACTIVE)`) map it to the
# event it stands for; any other target is refused, whatever other event reaches it.
LOAN_SETTLEMENTS: Final = {ACTIVE: IN_CREDITED, FAILED: IN_REFUSED, UNKNOWN: IN_LOST}
RECOVERY_SETTLEMENTS: Final = {FAILED: IN_REFUSED, UNKNOWN: IN_LOST}


def settlement_event(target: str, settlements: Mapping[str, str], key: str = "") -> str:
    """The event a settlement to `target` stands for; `IllegalTransition` if none."""
    event = settlements.get(target)
    if event is None:
        raise IllegalTransition(f"{key}: a settlement cannot set {target}")
    return event


def advance_settlement_event(
    state: str, confirmed: bool, *, never_credited: bool, channel: str, repaid_minor: int
) -> str:
    """The event settling an advance stands for: confirmed or refused by its IN, or
    (`never_credited`, reconciliation with the IN's records) an ACTIVE automatic
    advance nothing was recovered of, which the IN shows it never applied."""
    if (never_credited and not confirmed and state == ACTIVE and channel == "auto"
            and repaid_minor == 0):
        return ADVANCE_NEVER_CREDITED
    return ADVANCE_CONFIRMED if confirmed else ADVANCE_REFUSED


def render_markdown() -> str:
    """The transition tables as Markdown, as docs/ledger.md carries them."""
    lines = []
    for title, table in (("loan / advance", LOAN_TRANSITIONS), ("recovery", RECOVERY_TRANSITIONS)):
        lines += [f"| {title}: state before | event | state after |", "|---|---|---|"]
        for (before, event), after in table.items():
            lines.append(f"| {before or '(new)'} | `{event}` | {after} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


# Several nodes on one ledger (docs/scale-out.md "How two nodes stay correct"): an
# unsettled loan or recovery is leased to the node running its saga for this long; that
# node's resolver renews the lease on every run (every 30 s), so only a node that has
# stopped for longer than this loses its sagas to another node's resolver.
SAGA_LEASE_S: Final = 120.0
