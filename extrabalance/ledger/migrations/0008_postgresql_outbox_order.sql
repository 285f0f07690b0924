-- dialect: postgresql
-- The outbox compares and sorts text as 0005 explains for the other tables: the
-- sender takes due rows by `next_attempt_at` (ISO-8601 UTC text), then `outbox_id`,
-- and the prune deletes by `sent_at`. `COLLATE "C"` makes PostgreSQL compare bytes as
-- SQLite does. PostgreSQL only: recorded as applied on SQLite without running.

ALTER TABLE outbox ALTER COLUMN outbox_id TYPE TEXT COLLATE "C";
ALTER TABLE outbox ALTER COLUMN next_attempt_at TYPE TEXT COLLATE "C";
ALTER TABLE outbox ALTER COLUMN sent_at TYPE TEXT COLLATE "C";
