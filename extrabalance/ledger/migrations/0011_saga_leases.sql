-- Leases on the sagas (docs/scale-out.md "How two nodes stay correct"). A loan being
-- credited or an advance confirming, and a recovery in progress, belong to the node
-- that started it until `lease_until`; that node's resolver renews the lease while the
-- row is unsettled. When the node dies the lease runs out and another node's resolver
-- claims the row (UPDATE ... RETURNING; on PostgreSQL over FOR UPDATE SKIP LOCKED), so
-- each unknown outcome is settled by one node at a time, cluster-wide. Rows without an
-- owner (booked before this migration, or by a tool) are claimable at once.
-- lease_until is an ISO-8601 UTC timestamp like every other time in the ledger.
ALTER TABLE loans ADD COLUMN owner_node TEXT;
ALTER TABLE loans ADD COLUMN lease_until TEXT;
ALTER TABLE recoveries ADD COLUMN owner_node TEXT;
ALTER TABLE recoveries ADD COLUMN lease_until TEXT;
