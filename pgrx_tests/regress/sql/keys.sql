-- Key lifecycle: rotation, rewrap, rollback, disable, destroy (kms_keys).
-- Runs after values (see ../schedule).
\set VERBOSITY sqlstate

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
