-- The first spool schema: API keys, messages stored once, per-recipient delivery units, events.
-- Times are UNIX seconds (REAL, UTC).

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,                 -- key_…, public
    name        TEXT NOT NULL,
    digest      BLOB NOT NULL UNIQUE,             -- SHA-256 or HMAC-SHA256 of the secret key
    hint        TEXT NOT NULL,                    -- the key's first characters, for humans
    scope       TEXT NOT NULL CHECK (scope IN ('send', 'full')),
    created_at  REAL NOT NULL,
    revoked_at  REAL
);

CREATE TABLE messages (
    seq         INTEGER PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,             -- msg_…, the queue id on both front doors
    created_at  REAL NOT NULL,
    source      TEXT NOT NULL CHECK (source IN ('smtp', 'api')),
    api_key_id  TEXT,
    mail_from   TEXT NOT NULL,                    -- envelope sender ('' for a null sender)
    from_header TEXT NOT NULL DEFAULT '',
    subject     TEXT NOT NULL DEFAULT '',
    size        INTEGER NOT NULL,
    body        BLOB NOT NULL                     -- the RFC 5322 message, CRLF line endings
);
CREATE INDEX messages_created ON messages (created_at);

-- One delivery unit per recipient. `due_at` is set exactly while the unit is pending: it is the
-- time of the next attempt, or — while an attempt holds the unit (status 'sending') — the end of
-- the lease, so that a crashed attempt's unit becomes due again by itself.
CREATE TABLE recipients (
    id            INTEGER PRIMARY KEY,
    message_seq   INTEGER NOT NULL REFERENCES messages (seq) ON DELETE CASCADE,
    email         TEXT NOT NULL,
    domain        TEXT NOT NULL,                  -- destination: the address's domain, lower case
    status        TEXT NOT NULL,
    priority      INTEGER NOT NULL DEFAULT 0,
    attempts      INTEGER NOT NULL DEFAULT 0,
    due_at        REAL,
    last_code     INTEGER,
    last_enhanced TEXT,
    last_text     TEXT,
    delivered_at  REAL,
    updated_at    REAL NOT NULL
);
CREATE INDEX recipients_message ON recipients (message_seq);
CREATE INDEX recipients_due ON recipients (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX recipients_destination ON recipients (domain, priority DESC, due_at)
    WHERE due_at IS NOT NULL;

CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT, -- monotonic: the cursor for every reader
    created_at  REAL NOT NULL,
    type        TEXT NOT NULL,
    message_seq INTEGER,
    recipient   TEXT,
    data        TEXT NOT NULL DEFAULT '{}'         -- JSON object
);
CREATE INDEX events_message ON events (message_seq, id);
