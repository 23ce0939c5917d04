-- Events served by an index for every filter of GET /v1/events, and the webhook side: endpoints,
-- the durable outbox (one row per event × endpoint, written with the event) and the attempt log.

CREATE INDEX events_type ON events (type, id);
CREATE INDEX events_recipient ON events (recipient COLLATE NOCASE, id);

CREATE TABLE webhook_endpoints (
    seq             INTEGER PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,         -- wh_…, public
    url             TEXT NOT NULL,
    event_types     TEXT NOT NULL,                -- JSON array of event types, or ["*"]
    description     TEXT NOT NULL DEFAULT '',
    enabled         INTEGER NOT NULL DEFAULT 1,
    disabled_reason TEXT,                         -- why Postroom disabled it (410 Gone)
    -- Signing secrets (whsec_…). After a rotation the previous one also signs until
    -- previous_until. Stored as given for now; encryption at rest wraps these columns.
    secret          TEXT NOT NULL,
    previous_secret TEXT,
    previous_until  REAL,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL
);

-- One row per (event, endpoint). `due_at` is set exactly while the row waits to be sent: the time
-- of the next attempt, or — while an attempt holds it (status 'sending') — the end of its lease,
-- so a crashed attempt's row becomes due again by itself. A disabled endpoint's rows wait with
-- due_at NULL until it is enabled again. No foreign key to events: event retention may purge them.
CREATE TABLE webhook_outbox (
    id           INTEGER PRIMARY KEY,
    endpoint_seq INTEGER NOT NULL REFERENCES webhook_endpoints (seq) ON DELETE CASCADE,
    event_id     INTEGER NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('pending', 'sending', 'delivered', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    due_at       REAL,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX webhook_outbox_endpoint_due ON webhook_outbox (endpoint_seq, due_at)
    WHERE due_at IS NOT NULL;

-- Every attempt, for GET /v1/webhooks/{id}/deliveries.
CREATE TABLE webhook_attempts (
    id           INTEGER PRIMARY KEY,
    endpoint_seq INTEGER NOT NULL REFERENCES webhook_endpoints (seq) ON DELETE CASCADE,
    event_id     INTEGER,                         -- NULL for a test send
    event_type   TEXT NOT NULL,
    attempt      INTEGER NOT NULL,                -- 1 for the first attempt of this row
    status_code  INTEGER,                         -- NULL when no response came
    latency      REAL NOT NULL,                   -- seconds
    error        TEXT,
    created_at   REAL NOT NULL
);
CREATE INDEX webhook_attempts_endpoint ON webhook_attempts (endpoint_seq, id);
