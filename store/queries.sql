-- Every SQL statement Postroom runs, by name (`-- name: NAME`). Loaded once by store/sql.py.

-- name: insert_key
INSERT INTO api_keys (id, name, digest, hint, scope, created_at)
VALUES (:id, :name, :digest, :hint, :scope, :now);

-- name: key_by_digest
SELECT id, name, digest, hint, scope, created_at, revoked_at FROM api_keys WHERE digest = :digest;

-- name: list_keys
SELECT id, name, digest, hint, scope, created_at, revoked_at FROM api_keys ORDER BY created_at, id;

-- name: revoke_key
UPDATE api_keys SET revoked_at = :now WHERE id = :id AND revoked_at IS NULL;

-- name: key_exists
SELECT 1 FROM api_keys WHERE id = :id;

-- name: insert_message
INSERT INTO messages (id, created_at, source, api_key_id, mail_from, from_header, subject, size, body)
VALUES (:id, :now, :source, :api_key_id, :mail_from, :from_header, :subject, :size, :body);

-- name: insert_recipient
INSERT INTO recipients (message_seq, email, domain, status, priority, due_at, updated_at)
VALUES (:message_seq, :email, :domain, :status, :priority, :due_at, :now);

-- name: insert_event
INSERT INTO events (created_at, type, message_seq, recipient, data)
VALUES (:now, :type, :message_seq, :recipient, :data);

-- name: message_by_id
SELECT seq, id, created_at, source, api_key_id, mail_from, from_header, subject, size
FROM messages WHERE id = :id;

-- name: message_body
SELECT body FROM messages WHERE seq = :seq;

-- name: recipients_of_message
SELECT id, message_seq, email, domain, status, priority, attempts, due_at, last_code,
       last_enhanced, last_text, delivered_at, updated_at
FROM recipients WHERE message_seq = :seq ORDER BY id;

-- name: events_of_message
SELECT id, created_at, type, message_seq, recipient, data
FROM events WHERE message_seq = :seq ORDER BY id;

-- name: list_messages
SELECT seq, id, created_at, source, api_key_id, mail_from, from_header, subject, size
FROM messages
WHERE (:status IS NULL OR seq IN (SELECT message_seq FROM recipients WHERE status = :status))
  AND seq < :before
ORDER BY seq DESC LIMIT :limit;

-- name: recipients_of_messages
SELECT id, message_seq, email, domain, status, priority, attempts, due_at, last_code,
       last_enhanced, last_text, delivered_at, updated_at
FROM recipients WHERE message_seq IN (SELECT value FROM json_each(:seqs)) ORDER BY id;

-- name: due_destinations
-- Destinations that have due work, for the round-robin over destinations.
SELECT DISTINCT domain FROM recipients WHERE due_at <= :now LIMIT :limit;

-- name: claim_destination
-- Lease up to :limit due units of one destination: highest priority, then oldest due time first.
-- SQLite has no SKIP LOCKED; the single writer makes this UPDATE … RETURNING race-free.
UPDATE recipients
SET status = 'sending', due_at = :lease_until, updated_at = :now
WHERE id IN (
    SELECT id FROM recipients
    WHERE domain = :domain AND due_at <= :now
    ORDER BY priority DESC, due_at
    LIMIT :limit
)
RETURNING id, message_seq, email, domain, status, priority, attempts, due_at, last_code,
          last_enhanced, last_text, delivered_at, updated_at;

-- name: messages_for_delivery
SELECT seq, id, created_at, source, mail_from, body FROM messages WHERE seq IN (SELECT value FROM json_each(:seqs));

-- name: record_outcome
UPDATE recipients
SET status = :status, attempts = attempts + 1, due_at = :due_at, last_code = :code,
    last_enhanced = :enhanced, last_text = :text, delivered_at = :delivered_at, updated_at = :now
WHERE id = :id AND status = 'sending';

-- name: release_all_leases
-- At start-up of the process that owns the spool: units left 'sending' by a crash are due now.
UPDATE recipients
SET status = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END,
    due_at = :now, updated_at = :now
WHERE status = 'sending';

-- name: release_lease
-- Give a claimed unit back without an attempt (shutdown): due now, status as before the claim.
UPDATE recipients
SET status = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END,
    due_at = :now, updated_at = :now
WHERE id = :id AND status = 'sending';

-- ==== delivery: DKIM domains ====

-- name: insert_domain
INSERT INTO domains (name, selector, rsa_key, ed25519_key, created_at)
VALUES (:name, :selector, :rsa_key, :ed25519_key, :now);

-- name: domain_exists
SELECT 1 FROM domains WHERE name = :name;

-- name: domain_keys
SELECT name, selector, rsa_key, ed25519_key, created_at FROM domains WHERE name = :name;

-- ==== delivery: suppressions ====

-- name: insert_suppression
-- A no-op (rowcount 0) when the address is already suppressed.
INSERT INTO suppressions (email, reason, code, enhanced, text, message_seq, created_at)
VALUES (:email, :reason, :code, :enhanced, :text, :message_seq, :now)
ON CONFLICT (email) DO NOTHING;

-- name: suppressed_among
SELECT email FROM suppressions WHERE email IN (SELECT value FROM json_each(:emails));

-- name: suppression_by_email
SELECT email, reason, code, enhanced, text, created_at FROM suppressions WHERE email = :email;
