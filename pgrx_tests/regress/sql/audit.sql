-- Audit log, its check and kms_health, after the acts of the files before
-- (see ../schedule).
\set VERBOSITY sqlstate

SELECT id, actor = session_user AS by_me, operation, key_name, version, reason, length(hash) AS hash_len
  FROM kms_audit_log ORDER BY id;
SELECT kms_verify_audit_log();
SELECT (kms_health()->'master_key'->>'matches_keyring')::boolean AS key_matches,
       kms_health()->'keys' AS keys, kms_health()->'versions' AS versions;
