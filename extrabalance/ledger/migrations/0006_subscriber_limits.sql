-- Limits from behaviour (docs/lending.md): what a subscriber's limit is computed from,
-- kept per subscriber and updated in the same unit of work as each recharge and
-- payback, so no batch ever recomputes it. `recharge_days` is his recharge total per
-- day inside the configured window (JSON `[[day, minor], ...]`, days since 1970-01-01
-- UTC, at most `limits.window_days` pairs); `adjust_bp` is the payback record's
-- adjustment in basis points; the counters explain it in the admin view.
-- A subscriber without a row has no history yet (an empty window, no adjustment).
-- Portable SQL (SQLite and PostgreSQL).

CREATE TABLE subscriber_limits (
    msisdn TEXT PRIMARY KEY,
    recharge_days TEXT NOT NULL,
    adjust_bp INTEGER NOT NULL,
    on_time_paybacks INTEGER NOT NULL,
    late_paybacks INTEGER NOT NULL,
    partial_paybacks INTEGER NOT NULL,
    updated_at TEXT NOT NULL
);
