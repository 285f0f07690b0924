-- Advertisement SMS (issue 7): what was sent (for the frequency caps) and campaigns.
-- Numbered 0002 because the runner refuses gaps; meant as 0005 — renumber at merge
-- if another 0002 lands first (see docs/ads.md).
-- Portable SQL (SQLite and PostgreSQL), ISO-8601 UTC text timestamps.

-- One row per ad submitted (or about to be): the caps read the last 24 hours of it.
-- Written in the same transaction as the decision, so two triggers for one subscriber
-- can never both pass a cap.
CREATE TABLE ads_sent (
    ad_id        TEXT PRIMARY KEY,
    msisdn       TEXT NOT NULL,
    sent_at      TEXT NOT NULL,
    ad_trigger   TEXT NOT NULL,   -- out_of_balance / low_balance / debt_limit / campaign
    template     TEXT NOT NULL,
    campaign_id  TEXT
);
CREATE INDEX ads_sent_by_msisdn ON ads_sent (msisdn, sent_at);
CREATE INDEX ads_sent_by_time ON ads_sent (sent_at);

-- A campaign queued by `extrabalance campaign`; a running node drains it.
CREATE TABLE campaigns (
    campaign_id  TEXT PRIMARY KEY,
    template     TEXT NOT NULL,
    segment      TEXT,            -- NULL: every segment
    state        TEXT NOT NULL,   -- PREPARING / QUEUED / RUNNING / DONE / CANCELLED
    recipients   INTEGER NOT NULL DEFAULT 0,
    sent         INTEGER NOT NULL DEFAULT 0,
    suppressed   INTEGER NOT NULL DEFAULT 0,
    created_by   TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);
CREATE INDEX campaigns_by_state ON campaigns (state);

CREATE TABLE campaign_recipients (
    campaign_id  TEXT NOT NULL,
    msisdn       TEXT NOT NULL,
    state        TEXT NOT NULL,   -- PENDING / SENT / SUPPRESSED
    reason       TEXT,            -- why suppressed
    updated_at   TEXT NOT NULL,
    PRIMARY KEY (campaign_id, msisdn)
);
CREATE INDEX campaign_recipients_by_state ON campaign_recipients (campaign_id, state);
