"""The SQLite adapter of the unit-of-work port (`extrabalance.service.unit_of_work`).

What this file owns: `SqliteLedgerTx`, the ledger's connection class, whose methods
are the port's operations (each one the function of the same name in `store.py` or
`ads_store.py`, called with the connection itself). The port's runner is the existing
`Ledger`: writes in the group-commit writer's next batch (one savepoint each, WAL,
`synchronous=FULL`), reads on the reader connections or inline on the loop.

Why the connection is the transaction object: every connection the ledger opens is a
`SqliteLedgerTx` (`db.connect`), so `Ledger.write(fn)` hands `fn` an object that already
speaks the port. A unit of work costs no wrapper object and no extra call over a
closure that took the connection, and the ledger's own tools (which still do) share one
batch and one COMMIT with the services.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from extrabalance.ledger import adjustments, ads_store, outbox_store, store

if TYPE_CHECKING:
    from extrabalance.ledger.ledger import Ledger
    from extrabalance.service.unit_of_work import LedgerTx


class SqliteLedgerTx(sqlite3.Connection):
    """A ledger connection; inside `Ledger.write` / `read` it is the unit of work's
    `LedgerTx` (a function assigned here is called with the connection as its first
    argument, exactly as the services called it before the port)."""

    ping = store.ping
    # subscribers
    load_subscriber = store.load_subscriber
    put_profile = store.put_profile
    open_loans = store.open_loans
    debt_owed = store.debt_owed
    learn_route = store.learn_route
    learned_route = store.learned_route
    set_preferences = store.set_preferences
    limit_state = store.limit_state
    put_limit_state = store.put_limit_state
    set_bar = store.set_bar
    audit = store.audit
    audit_trail = store.audit_trail
    loan_times = store.loan_times
    # idempotency
    idempotent_get = store.idempotent_get
    idempotent_put = store.idempotent_put
    idempotent_replace = store.idempotent_replace
    purge_idempotency = store.purge_idempotency
    # loans and advances
    get_loan = store.get_loan
    loan_by_idempotency_key = store.loan_by_idempotency_key
    insert_loan = store.insert_loan
    settle_loan = store.settle_loan
    settle_advance = store.settle_advance
    record_session_evidence = store.record_session_evidence
    session_evidence = store.session_evidence
    advances_of_in_node = store.advances_of_in_node
    unsettled_loans = store.unsettled_loans
    note_resolve_attempt = store.note_resolve_attempt
    write_off_candidates = store.write_off_candidates
    write_off = store.write_off
    count_overdue = store.count_overdue
    write_down = adjustments.apply_write_down
    # recoveries
    get_recovery = store.get_recovery
    recovery_by_event = store.recovery_by_event
    insert_recovery = store.insert_recovery
    start_recovery_attempt = store.start_recovery_attempt
    note_recovery_attempt = store.note_recovery_attempt
    set_recovery_state = store.set_recovery_state
    apply_recovery = store.apply_recovery
    unsettled_recoveries = store.unsettled_recoveries
    # leases on the sagas
    claim_unsettled_loans = store.claim_unsettled_loans
    claim_unsettled_recoveries = store.claim_unsettled_recoveries
    saga_lease = store.saga_lease
    # journal
    debt_from_journal = store.debt_from_journal
    account_totals = store.account_totals
    journal_entries = store.journal_entries
    # advertisements
    load_ad_subscriber = ads_store.load_ad_subscriber
    recent_ads = ads_store.recent_ads
    record_ad = ads_store.record_ad
    prune_ads = ads_store.prune_ads
    # the do-not-disturb list
    dnd_listed = ads_store.dnd_listed
    dnd_add = ads_store.dnd_add
    dnd_remove = ads_store.dnd_remove
    dnd_page = ads_store.dnd_page
    # campaigns
    audience_chunk = ads_store.audience_chunk
    create_campaign = ads_store.create_campaign
    add_recipients = ads_store.add_recipients
    get_campaign = ads_store.get_campaign
    list_campaigns = ads_store.list_campaigns
    active_campaigns = ads_store.active_campaigns
    set_campaign_state = ads_store.set_campaign_state
    pending_recipients = ads_store.pending_recipients
    claim_recipients = ads_store.claim_recipients
    settle_recipient = ads_store.settle_recipient
    # outbox
    outbox_put = outbox_store.outbox_put
    outbox_due = outbox_store.outbox_due
    outbox_claim_due = outbox_store.outbox_claim_due
    outbox_retry_later = outbox_store.outbox_retry_later
    outbox_mark_sent = outbox_store.outbox_mark_sent
    outbox_prune = outbox_store.outbox_prune


if TYPE_CHECKING:  # mypy holds the adapter to the port

    def _conforms(tx: SqliteLedgerTx, uow: Ledger) -> None:
        from extrabalance.service.unit_of_work import UnitOfWork

        _tx: LedgerTx = tx
        _uow: UnitOfWork = uow
