-- Sending domains, templates, suppressions with reasons and expiry, one-click unsubscribe.

-- Used as the From: display name when a message's `from` has none.
ALTER TABLE domains ADD COLUMN default_sender_name TEXT;

-- reason: hard_bounce | complaint | unsubscribe | manual. An unsubscribe blocks marketing mail
-- only; the others block everything. NULL expires_at: never expires.
ALTER TABLE suppressions ADD COLUMN expires_at REAL;
ALTER TABLE suppressions ADD COLUMN message_id TEXT;   -- the source message's public id

-- Message templates (Jinja2, rendered in a sandbox when a message is sent).
CREATE TABLE templates (
    id            TEXT PRIMARY KEY,               -- tpl_…
    name          TEXT NOT NULL UNIQUE,
    subject       TEXT NOT NULL,
    html          TEXT,
    text          TEXT,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);

-- Secrets Postroom generates for itself and keeps with the spool (backups cover them).
CREATE TABLE spool_secrets (
    name          TEXT PRIMARY KEY,
    value         BLOB NOT NULL
);
-- The key that signs one-click unsubscribe tokens (HMAC-SHA256), made when the spool is created.
INSERT INTO spool_secrets (name, value) VALUES ('unsubscribe', randomblob(32));
