-- dialect: postgresql
-- The claim compares `claimed_until` (ISO-8601 UTC text) with the present moment:
-- bytes order, as 0005 explains for the other time columns. PostgreSQL only: recorded
-- as applied on SQLite without running.
ALTER TABLE campaign_recipients ALTER COLUMN claimed_until TYPE TEXT COLLATE "C";
