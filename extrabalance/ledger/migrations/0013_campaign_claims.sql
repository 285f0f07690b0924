-- Campaign recipients taken for sending (docs/ads.md "Several nodes"). Several nodes
-- on one ledger each drain the active campaign; a node takes a page of PENDING
-- recipients by setting `claimed_until` (UPDATE ... RETURNING; on PostgreSQL over
-- FOR UPDATE SKIP LOCKED), so no other node takes them before that moment. A node that
-- dies mid-page leaves its unsent recipients PENDING: claimable again once the claim
-- ran out. ISO-8601 UTC text like every other time in the ledger; NULL: never claimed.
ALTER TABLE campaign_recipients ADD COLUMN claimed_until TEXT;
