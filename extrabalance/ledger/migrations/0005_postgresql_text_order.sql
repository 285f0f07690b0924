-- dialect: postgresql
-- Text order as SQLite has it, whatever the database's locale. The ledger compares
-- and sorts some text columns: timestamps (ISO-8601 UTC text: the idempotency purge,
-- ageing, the ads caps), MSISDNs (campaign audiences paged by `msisdn > $1`) and ids
-- (journal lines in the order written). SQLite compares text byte by byte; PostgreSQL
-- uses the database's collation, which in a locale such as en_US orders text by
-- language rules. `COLLATE "C"` on these columns makes PostgreSQL compare bytes too,
-- so both backends give the same order and the same pages.
--
-- PostgreSQL only (`dialect: postgresql`): on SQLite this migration is recorded as
-- applied without running, its text already compares as bytes. On a new database
-- the tables are empty and the indexes are rebuilt at once.

ALTER TABLE subscribers ALTER COLUMN msisdn TYPE TEXT COLLATE "C";
ALTER TABLE loans ALTER COLUMN loan_id TYPE TEXT COLLATE "C";
ALTER TABLE loans ALTER COLUMN msisdn TYPE TEXT COLLATE "C";
ALTER TABLE loans ALTER COLUMN created_at TYPE TEXT COLLATE "C";
ALTER TABLE recoveries ALTER COLUMN created_at TYPE TEXT COLLATE "C";
ALTER TABLE journal ALTER COLUMN tx_id TYPE TEXT COLLATE "C";
ALTER TABLE idempotency ALTER COLUMN created_at TYPE TEXT COLLATE "C";
ALTER TABLE ads_sent ALTER COLUMN sent_at TYPE TEXT COLLATE "C";
ALTER TABLE campaigns ALTER COLUMN created_at TYPE TEXT COLLATE "C";
ALTER TABLE campaign_recipients ALTER COLUMN msisdn TYPE TEXT COLLATE "C";
