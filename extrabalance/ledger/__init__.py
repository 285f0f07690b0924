"""The ledger: double-entry journal, loans and recoveries as sagas, idempotency keys,
audit; SQLite with one group-commit writer. See docs/ledger.md."""

from extrabalance.ledger.ledger import Ledger

__all__ = ["Ledger"]
