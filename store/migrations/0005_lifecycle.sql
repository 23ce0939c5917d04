-- Operations: the data lifecycle (bodies removed after retention.content_days, finished messages
-- and their rows after retention.metadata_days, and by `postroom queue purge`), and encryption at
-- rest (a key check value that tells a wrong or missing key at start-up).

-- Set when the body was removed (retention, or store_content = false); the body is then empty.
ALTER TABLE messages ADD COLUMN content_removed_at REAL;
-- The messages whose body is still kept, oldest first: what the content purge walks.
CREATE INDEX messages_content_kept ON messages (created_at) WHERE content_removed_at IS NULL;

-- Removing a message removes its events' outbox rows and its idempotency rows with it.
CREATE INDEX webhook_outbox_event ON webhook_outbox (event_id);
CREATE INDEX idempotency_keys_message ON idempotency_keys (message_id);

-- Facts about the spool itself, by name (e.g. 'key_check': a known value encrypted at rest).
CREATE TABLE spool_meta (
    name   TEXT PRIMARY KEY,
    value  BLOB NOT NULL
);
