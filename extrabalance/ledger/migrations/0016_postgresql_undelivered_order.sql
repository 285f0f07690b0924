-- dialect: postgresql
-- The resolver compares `undelivered_at` (ISO-8601 UTC text) with the end of the hold:
-- bytes order, as 0005 explains for the other time columns. PostgreSQL only: recorded
-- as applied on SQLite without running.
ALTER TABLE advance_answer_undelivered ALTER COLUMN undelivered_at TYPE TEXT COLLATE "C";
