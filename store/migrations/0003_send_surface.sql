-- The full send surface: sender-domain restricted keys, message attributes (tags, metadata,
-- type, schedule), and idempotency keys stored in the same transaction as their message.

-- JSON array of lower-case ASCII (IDNA) domains; empty: the key may send from any domain.
ALTER TABLE api_keys ADD COLUMN sender_domains TEXT NOT NULL DEFAULT '[]';

ALTER TABLE messages ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';          -- JSON array
ALTER TABLE messages ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}';      -- JSON object of strings
ALTER TABLE messages ADD COLUMN message_type TEXT NOT NULL DEFAULT 'transactional'
    CHECK (message_type IN ('transactional', 'marketing'));
ALTER TABLE messages ADD COLUMN scheduled_at REAL;

-- One row per (API key, Idempotency-Key): the request's fingerprint and what it was answered.
-- Written in the same transaction as the message, so a key never names a message that was lost.
CREATE TABLE idempotency_keys (
    api_key_id  TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint BLOB NOT NULL,                    -- SHA-256 of the canonical request
    message_id  TEXT NOT NULL,
    status      TEXT NOT NULL,                    -- the message status answered at acceptance
    created_at  REAL NOT NULL,                    -- the message's creation time, as answered
    PRIMARY KEY (api_key_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
