-- Transactional outbox (issue 18): every message to a subscriber that reports money
-- (loan, advance, payback, refusal) is written in the same transaction as the money,
-- and sent afterwards by the node's outbox sender. A row stays until it is sent; a
-- node that stops (or dies) between the commit and the send sends it after restart.
-- `outbox_id` is random text like every other id here (portable, and unique across
-- nodes sharing one database); `created_at` orders the sending.
-- Portable SQL (SQLite and PostgreSQL), ISO-8601 UTC text timestamps.

CREATE TABLE outbox (
    outbox_id        TEXT PRIMARY KEY,
    msisdn           TEXT NOT NULL,
    template         TEXT NOT NULL,
    params           TEXT NOT NULL,    -- JSON object: template parameters
    kind             TEXT NOT NULL,    -- sms / ad
    language         TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    next_attempt_at  TEXT NOT NULL,    -- not sent before this time (retry backoff)
    attempts         INTEGER NOT NULL DEFAULT 0,
    sent_at          TEXT               -- NULL: still to send
);
-- The sender's query: unsent rows that are due, oldest first.
CREATE INDEX outbox_unsent ON outbox (next_attempt_at) WHERE sent_at IS NULL;
CREATE INDEX outbox_by_sent_at ON outbox (sent_at) WHERE sent_at IS NOT NULL;
