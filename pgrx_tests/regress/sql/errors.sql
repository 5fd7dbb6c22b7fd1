-- Errors of the SQL API (SQLSTATE only), on the state left by the files
-- before (see ../schedule).
\set VERBOSITY sqlstate

SELECT 'alice@example.com'::encrypted_text;
INSERT INTO customers VALUES (9, 'not encrypted', NULL);
SELECT 'kms:AAAA'::encrypted_text;
SELECT kms_encrypt('x', 'missing');
SELECT kms_create_key('pii');
SELECT kms_create_key('no spaces');
SELECT kms_create_key('p', interval '-1 day');
SELECT kms_set_primary('pii', 42);
SELECT kms_destroy_key_version('pii', 2);
SELECT kms_disable_key_version('pii', 2);
SELECT kms_decrypt(phone, 'customer:999') FROM customers WHERE id = 1;
SELECT kms_decrypt(phone) FROM customers WHERE id = 1;
UPDATE kms.audit_log SET reason = 'x';
SELECT length(email) FROM customers;
