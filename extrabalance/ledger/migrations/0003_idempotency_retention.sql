-- Idempotency retention: the purge deletes the oldest keys first, in small batches
-- (`store.purge_idempotency`), so it needs `created_at` in an index. Keys are stamped
-- in time order, so the index grows at its right-hand end (one page per batch of
-- inserts) and the purge reads its left-hand end.
-- On a ledger that already holds many keys this migration reads the whole table
-- once, at the first start after the upgrade; the node takes traffic only after it.
-- Portable SQL (SQLite and PostgreSQL).

CREATE INDEX idempotency_by_created_at ON idempotency (created_at);
