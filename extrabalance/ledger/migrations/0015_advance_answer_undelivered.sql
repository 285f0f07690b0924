-- An automatic advance whose granting CCA could not be handed to a live connection
-- (the IN's connection was closed or closing when the answer was ready, so nothing
-- was written: docs/diameter.md "An answer the node could not deliver"). To an IN
-- without the confirmation extension the CCA's grant is the credit, so the IN never
-- credited it unless a later answer to its re-send reached it. One row per advance:
--   undelivered_at  the last answer granting it that could not be handed over (NULL:
--                   none yet, a later answer was delivered first);
--   delivered_at    an answer to the IN's re-send was handed to a live connection:
--                   the mark is cleared for good;
--   closed_at       the resolver settled the mark (reversed the advance, or left it
--                   for review when money had been recovered already).
-- Open mark: undelivered_at set, delivered_at and closed_at NULL. A recharge takes
-- nothing for an open mark; past `in_nodes[].undelivered_advance_hold_s` the resolver
-- reverses the advance as never credited. ISO-8601 UTC text like every other time.
CREATE TABLE advance_answer_undelivered (
    loan_id         TEXT PRIMARY KEY REFERENCES loans(loan_id),
    msisdn          TEXT NOT NULL,
    undelivered_at  TEXT,
    delivered_at    TEXT,
    closed_at       TEXT
);
CREATE INDEX advance_answer_undelivered_open ON advance_answer_undelivered (undelivered_at)
    WHERE delivered_at IS NULL AND closed_at IS NULL;
CREATE INDEX advance_answer_undelivered_msisdn ON advance_answer_undelivered (msisdn)
    WHERE delivered_at IS NULL AND closed_at IS NULL;
