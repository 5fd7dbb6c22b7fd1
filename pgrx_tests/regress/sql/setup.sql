-- pg_kms user-visible SQL: golden output, one file per feature, run in the
-- order of ../schedule on one database (each file continues the state the
-- files before it left). Values are random, so only deterministic facts
-- (lengths, versions, states, decrypted text) are shown.
\set VERBOSITY sqlstate
CREATE EXTENSION pg_kms;

-- Fixture of the files after this one: two keys and a table of encrypted_text.
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
