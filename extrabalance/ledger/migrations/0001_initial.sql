-- Extra Balance ledger, schema 1.
-- Portable SQL: runs unchanged on SQLite 3.35+ and PostgreSQL 13+ (BIGINT, TEXT,
-- partial-free indexes, ISO-8601 UTC text timestamps, 0/1 integer flags).

CREATE TABLE subscribers (
    msisdn                   TEXT PRIMARY KEY,
    tenure_days              INTEGER,          -- NULL: no profile imported
    arpu_minor               BIGINT,
    attributes               TEXT,             -- JSON object of extra CSV columns
    language                 TEXT,             -- NULL: node default
    auto_advance_opt_in      INTEGER NOT NULL DEFAULT 0,
    ads_opt_out              INTEGER NOT NULL DEFAULT 0,
    barred_manual            INTEGER NOT NULL DEFAULT 0,
    barred_reason            TEXT,
    loans_since_full_payback INTEGER NOT NULL DEFAULT 0,
    learned_in_node          TEXT,
    updated_at               TEXT NOT NULL
);

-- One row per loan; `state` follows the saga in docs/ledger.md.
CREATE TABLE loans (
    loan_id                TEXT PRIMARY KEY,
    msisdn                 TEXT NOT NULL,
    tier_id                INTEGER NOT NULL,
    principal_minor        BIGINT NOT NULL,
    fee_minor              BIGINT NOT NULL,
    principal_repaid_minor BIGINT NOT NULL DEFAULT 0,
    fee_repaid_minor       BIGINT NOT NULL DEFAULT 0,
    state                  TEXT NOT NULL,
    channel                TEXT NOT NULL,
    idempotency_key        TEXT UNIQUE,
    in_node                TEXT,
    diameter_session_id    TEXT,
    request_number         INTEGER NOT NULL DEFAULT 0,
    resolve_attempts       INTEGER NOT NULL DEFAULT 0,
    needs_review           INTEGER NOT NULL DEFAULT 0,
    result_code            INTEGER,
    created_at             TEXT NOT NULL,
    updated_at             TEXT NOT NULL,
    CHECK (principal_repaid_minor >= 0 AND principal_repaid_minor <= principal_minor),
    CHECK (fee_repaid_minor >= 0 AND fee_repaid_minor <= fee_minor)
);
CREATE INDEX loans_by_msisdn ON loans (msisdn, state);
CREATE INDEX loans_by_state ON loans (state);

-- One row per recharge that found something owed; attempts below.
CREATE TABLE recoveries (
    recovery_id          TEXT PRIMARY KEY,
    event_id             TEXT NOT NULL UNIQUE,
    msisdn               TEXT NOT NULL,
    recharge_minor       BIGINT NOT NULL,
    balance_after_minor  BIGINT,
    requested_minor      BIGINT NOT NULL,   -- of the current attempt
    recovered_minor      BIGINT NOT NULL DEFAULT 0,
    state                TEXT NOT NULL,     -- RECOVERING / DONE / FAILED / UNKNOWN
    in_node              TEXT,
    diameter_session_id  TEXT,              -- of the current attempt
    request_number       INTEGER NOT NULL DEFAULT 0,
    attempts             INTEGER NOT NULL DEFAULT 0,
    resolve_attempts     INTEGER NOT NULL DEFAULT 0,
    needs_review         INTEGER NOT NULL DEFAULT 0,
    created_at           TEXT NOT NULL,
    updated_at           TEXT NOT NULL
);
CREATE INDEX recoveries_by_msisdn ON recoveries (msisdn, state);
CREATE INDEX recoveries_by_state ON recoveries (state);

-- Every DIRECT_DEBITING sent for a recovery, each with its own Session-Id.
CREATE TABLE recovery_attempts (
    recovery_id          TEXT NOT NULL,
    attempt_no           INTEGER NOT NULL,
    diameter_session_id  TEXT NOT NULL,
    requested_minor      BIGINT NOT NULL,
    outcome              TEXT,              -- NULL while in flight
    result_code          INTEGER,
    created_at           TEXT NOT NULL,
    PRIMARY KEY (recovery_id, attempt_no)
);

-- Double entry: the lines of one tx_id sum to zero. Debits positive, credits negative.
CREATE TABLE journal (
    tx_id        TEXT NOT NULL,
    line_no      INTEGER NOT NULL,
    account      TEXT NOT NULL,
    msisdn       TEXT NOT NULL,
    amount_minor BIGINT NOT NULL,
    loan_id      TEXT,
    recovery_id  TEXT,
    memo         TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (tx_id, line_no),
    CHECK (account IN ('principal_receivable', 'fee_receivable', 'disbursed_float',
                       'fee_income', 'recovered_cash', 'written_off'))
);
CREATE INDEX journal_by_msisdn ON journal (msisdn, account);

-- First outcome of every inbound request, so a replay gets the same answer.
CREATE TABLE idempotency (
    key        TEXT PRIMARY KEY,
    outcome    TEXT NOT NULL,   -- JSON
    created_at TEXT NOT NULL
);

CREATE TABLE audit (
    audit_id   TEXT PRIMARY KEY,
    msisdn     TEXT NOT NULL,
    action     TEXT NOT NULL,   -- bar / unbar / adjust / write_off / review
    who        TEXT NOT NULL,
    why        TEXT NOT NULL,
    detail     TEXT,            -- JSON
    created_at TEXT NOT NULL
);
CREATE INDEX audit_by_msisdn ON audit (msisdn);
