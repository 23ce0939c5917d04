-- Aging: a destination's overdue units are also claimed oldest first, whatever their priority,
-- so a stream of high-priority mail never starves normal and low (store/spool.py claim_due).
CREATE INDEX recipients_destination_due ON recipients (domain, due_at) WHERE due_at IS NOT NULL;
