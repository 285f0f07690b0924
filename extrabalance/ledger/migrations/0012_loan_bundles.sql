-- Bundle advances (docs/lending.md "Bundle advances"): the units a bundle loan asked
-- the IN to credit, stored on the loan by the unit of work that books it. Every send
-- of that loan's REFUND_ACCOUNT (the first, its re-sends, the resolver's after a
-- restart) is built from these columns, never from the tier as configured now, so a
-- tier changed or removed while the loan is unsettled cannot change what one
-- Session-Id asks for. `bundle_kind` is 'data', 'voice' or 'sms'; `bundle_quantity`
-- is in the kind's unit on the wire (octets, seconds, SMS); the service identifiers
-- are those of the tier at booking (either may be NULL). All NULL on a money loan.
-- Portable SQL (SQLite and PostgreSQL).
ALTER TABLE loans ADD COLUMN bundle_kind TEXT;
ALTER TABLE loans ADD COLUMN bundle_quantity BIGINT;
ALTER TABLE loans ADD COLUMN bundle_service_identifier BIGINT;
ALTER TABLE loans ADD COLUMN bundle_rating_group BIGINT;
