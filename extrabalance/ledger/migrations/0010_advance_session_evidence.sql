-- An automatic advance granted by an INITIAL_REQUEST is confirmed by the IN's own
-- session: its later UPDATE or TERMINATION on that Session-Id (RFC 4006 §5.2, §8.3
-- Used-Service-Unit) shows the IN received the INITIAL's answer and applied the grant.
-- One row per advance, the first such request; reconcile-in never reverses it.
CREATE TABLE advance_session_evidence (
    loan_id         TEXT PRIMARY KEY REFERENCES loans(loan_id),
    session_id      TEXT NOT NULL,
    request_type    INTEGER NOT NULL,
    request_number  INTEGER NOT NULL,
    used_minor      INTEGER,
    created_at      TEXT NOT NULL
);
