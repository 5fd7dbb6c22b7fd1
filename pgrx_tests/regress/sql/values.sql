-- Values: sealing, opening, header readers, overhead. Runs after setup
-- (see ../schedule), on its keys and customers table.
\set VERBOSITY sqlstate

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
