-- The do-not-disturb list (docs/lending.md "Do not disturb"): MSISDNs that receive no
-- advertisement or campaign SMS, whatever their own preference says. Filled from the
-- operator's or regulator's list (`extrabalance dnd import`) and the admin API; kept
-- apart from `subscribers` because a listed number need not be a subscriber the node
-- has seen. Service messages (loan confirmations, payback SMS) are not advertisements
-- and still go out.
-- Portable SQL (SQLite and PostgreSQL).

CREATE TABLE do_not_disturb (
    msisdn TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    added_by TEXT NOT NULL,
    added_at TEXT NOT NULL
);
