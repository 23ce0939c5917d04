-- recipients_due served no query: every one that reads due units names their destination or
-- status too, and is served by recipients_destination, recipients_destination_due or
-- recipients_status (tests/test_store.py checks that each index serves a query). Intake, each
-- claim and each recorded outcome still had to keep it.
DROP INDEX IF EXISTS recipients_due;
