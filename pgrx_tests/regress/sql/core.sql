-- pg_kms user-visible SQL: golden output. Values are random, so only
-- deterministic facts (lengths, versions, states, decrypted text) are shown.
\set VERBOSITY sqlstate
CREATE EXTENSION pg_kms;

-- Keys and the encrypted_text type
SELECT kms_create_key('pii');
SELECT kms_create_key('cards', interval '90 days');
CREATE TABLE customers (
    id    int PRIMARY KEY,
    email encrypted_text,
    phone encrypted_text
);
INSERT INTO customers VALUES
    (1, kms_encrypt('alice@example.com', 'pii'), kms_encrypt('+33 6 12 34 56 78', 'pii', 'customer:1')),
    (2, kms_encrypt('bob@example.org', 'pii'), NULL),
    (3, kms_encrypt('', 'pii'), kms_encrypt('日本語', 'pii', 'customer:3'));

-- At rest: a kms: prefix and base64, never the plaintext.
SELECT id, email::text LIKE 'kms:%' AS sealed, position('alice' IN email::text) AS leaks,
       length(email::bytea) - octet_length(kms_decrypt(email)) AS overhead
  FROM customers ORDER BY id;
SELECT id, kms_decrypt(email) AS email, kms_decrypt(phone, 'customer:' || id) AS phone
  FROM customers ORDER BY id;
SELECT kms_key_name(email), kms_key_version(email) FROM customers WHERE id = 1;
SELECT pg_column_size(kms_encrypt(repeat('x',100),'pii')) - pg_column_size(repeat('x',100)) <= 40 AS overhead_ok;
SELECT kms_decrypt_bytea(kms_encrypt_bytea('\x00ff', 'pii')) AS bytes;
SELECT kms_encrypt(NULL, 'pii') IS NULL AS null_in_null_out;

-- Rotation: old and new versions side by side, then rewrap.
SELECT kms_rotate_key('pii', 'quarterly rotation');
INSERT INTO customers VALUES (4, kms_encrypt('carol@example.net', 'pii'), NULL);
SELECT kms_key_version(email) AS version, count(*) FROM customers GROUP BY 1 ORDER BY 1;
SELECT key_name, version, state, is_primary, rotation_period, next_rotation_at IS NOT NULL AS scheduled
  FROM kms_keys ORDER BY key_name, version;
UPDATE customers SET email = kms_rewrap(email), phone = kms_rewrap(phone, 'customer:' || id);
SELECT kms_key_version(email) AS version, count(*) FROM customers GROUP BY 1 ORDER BY 1;
SELECT id, kms_decrypt(email) FROM customers ORDER BY id;

-- Rollback, disable, destroy
SELECT kms_set_primary('pii', 1);
SELECT kms_key_version(kms_encrypt('x', 'pii'));
SELECT kms_set_primary('pii', 2);
SELECT kms_disable_key_version('pii', 1, 'suspected leak');
SELECT kms_decrypt(kms_encrypt('x', 'pii'));
SELECT kms_enable_key_version('pii', 1);
SELECT kms_destroy_key_version('pii', 1, 'retired');
SELECT key_name, version, state, is_primary FROM kms_keys WHERE key_name = 'pii' ORDER BY version;

-- Audit log
SELECT id, actor = session_user AS by_me, operation, key_name, version, reason, length(hash) AS hash_len
  FROM kms_audit_log ORDER BY id;
SELECT kms_verify_audit_log();
SELECT (kms_health()->'master_key'->>'matches_keyring')::boolean AS key_matches,
       kms_health()->'keys' AS keys, kms_health()->'versions' AS versions;

-- Errors (SQLSTATE only)
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
CREATE ROLE regress_plain;
SET ROLE regress_plain;
SELECT kms_encrypt('x', 'pii');
SELECT * FROM kms_keys;
RESET ROLE;
DROP ROLE regress_plain;
