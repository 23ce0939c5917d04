-- Suppression expiry: the retention sweep reads expired entries straight from this index
-- (store/queries.sql delete_expired_batch), so a sweep costs the expired rows, never the list.
-- Entries that never expire are not in it.
CREATE INDEX suppressions_expires ON suppressions (expires_at) WHERE expires_at IS NOT NULL;
