-- Delivery: DKIM keys per sending domain, and the suppression list.

-- A sending domain and its DKIM keys. They live in the spool so that backups (and encryption at
-- rest) cover them. The RSA key signs every message From the domain; the ed25519 key, when there
-- is one, adds a second signature under the selector `<selector>-ed25519`.
CREATE TABLE domains (
    name          TEXT PRIMARY KEY,               -- lower case, no trailing dot
    selector      TEXT NOT NULL,
    rsa_key       BLOB NOT NULL,                  -- PKCS#8 PEM, RSA 2048
    ed25519_key   BLOB,                           -- the 32-byte seed, base64; NULL: RSA only
    created_at    REAL NOT NULL
);

-- Addresses Postroom no longer sends to: intake records them as suppressed.
CREATE TABLE suppressions (
    email         TEXT PRIMARY KEY,               -- lower case
    reason        TEXT NOT NULL,                  -- 'bounce' (recipient-caused) or 'manual'
    code          INTEGER,
    enhanced      TEXT,
    text          TEXT,
    message_seq   INTEGER,
    created_at    REAL NOT NULL
);
