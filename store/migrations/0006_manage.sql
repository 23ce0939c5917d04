-- Managing messages, keys and limits: test-mode and rate-limited keys, the indexes behind every
-- filter of GET /v1/messages, and message tags in a table of their own so a tag filter is an
-- index probe rather than a walk over every message's JSON.

-- A test-mode key's messages are stored and get their events but never leave the machine.
ALTER TABLE api_keys ADD COLUMN test INTEGER NOT NULL DEFAULT 0;
-- Requests per minute for this key; NULL: `api.rate_limit_per_minute`; 0: unlimited.
ALTER TABLE api_keys ADD COLUMN rate_limit INTEGER;

-- GET /v1/messages filters, each paging by message seq, newest first.
CREATE INDEX recipients_status ON recipients (status, message_seq);
CREATE INDEX recipients_email ON recipients (email COLLATE NOCASE, message_seq);
CREATE INDEX messages_mail_from ON messages (mail_from COLLATE NOCASE);

-- One row per (tag name, message). Kept by triggers, so every writer of messages (both front
-- doors, restores) keeps it right without knowing it exists.
CREATE TABLE message_tags (
    name        TEXT NOT NULL,
    message_seq INTEGER NOT NULL REFERENCES messages (seq) ON DELETE CASCADE,
    PRIMARY KEY (name, message_seq)
) WITHOUT ROWID;
CREATE INDEX message_tags_message ON message_tags (message_seq);

CREATE TRIGGER messages_tags_insert AFTER INSERT ON messages WHEN NEW.tags <> '[]'
BEGIN
    INSERT OR IGNORE INTO message_tags (name, message_seq)
    SELECT CASE WHEN type = 'object' THEN json_extract(value, '$.name') ELSE value END, NEW.seq
    FROM json_each(NEW.tags);
END;

INSERT OR IGNORE INTO message_tags (name, message_seq)
SELECT CASE WHEN j.type = 'object' THEN json_extract(j.value, '$.name') ELSE j.value END, m.seq
FROM messages m, json_each(m.tags) j WHERE m.tags <> '[]';
