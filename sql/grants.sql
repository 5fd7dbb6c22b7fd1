-- Views over generated functions (so they come last).
CREATE VIEW kms_reencryption_progress AS
SELECT p.relid::pg_catalog.regclass AS table_name,
       p.attname AS column_name,
       p.rows_rewrapped,
       p.rows_pending,
       p.rows_needing_context,
       p.started_at,
       p.last_batch_at,
       p.finished_at,
       p.last_error
  FROM kms.reencryption_progress p
 WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = p.relid);
COMMENT ON VIEW kms_reencryption_progress IS 'rows_pending is exact when a pass starts (a full count) and decremented as batches commit; rows_needing_context were sealed with a context, which only the application can supply (UPDATE ... SET col = kms_rewrap(col, ctx)).';

CREATE VIEW kms_stats AS
SELECT k.key_name, s.version, s.encryptions, s.decryptions,
       pg_catalog.round(s.encryptions::numeric / 4294967296, 6) AS nonce_budget_used
  FROM kms.stats() s
  JOIN kms.keys k ON k.key_id = s.key_id;
COMMENT ON VIEW kms_stats IS 'Encryptions and decryptions per key version since server start (shared memory; empty unless pg_kms is in shared_preload_libraries). nonce_budget_used is encryptions / 2^32.';

-- Privileges: nothing for PUBLIC; each function granted to its roles.
--   kms_user:    encrypt, decrypt, rewrap, header readers
--   kms_admin:   key lifecycle, audit read, health
--   kms_auditor: kms_keys, kms_audit_log, kms_health, kms_verify_audit_log (cannot decrypt)
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT p.oid::pg_catalog.regprocedure AS sig, p.proname
          FROM pg_catalog.pg_depend d
          JOIN pg_catalog.pg_proc p ON p.oid = d.objid
         WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
           AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
           AND d.deptype = 'e'
           AND d.refobjid = (SELECT oid FROM pg_catalog.pg_extension WHERE extname = 'pg_kms')
    LOOP
        -- Type I/O functions stay public: they only parse and format.
        CONTINUE WHEN r.proname LIKE 'encrypted\_text\_%';
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', r.sig);
        IF r.proname IN ('kms_encrypt', 'kms_decrypt', 'kms_encrypt_bytea', 'kms_decrypt_bytea',
                         'kms_rewrap', 'kms_key_name', 'kms_key_version') THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO kms_user', r.sig);
        ELSIF r.proname IN ('kms_create_key', 'kms_rotate_key', 'kms_set_primary', 'kms_disable_key_version',
                            'kms_enable_key_version', 'kms_destroy_key_version', 'kms_rotate_master_key',
                            'kms_key_usage', 'kms_reencrypt_now') THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO kms_admin', r.sig);
        ELSIF r.proname IN ('kms_health', 'kms_verify_audit_log') THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO kms_admin, kms_auditor', r.sig);
        END IF;
    END LOOP;
END
$$;

REVOKE ALL ON kms_keys, kms_audit_log, kms_reencryption_progress, kms_stats FROM PUBLIC;
GRANT SELECT ON kms_keys, kms_audit_log, kms_reencryption_progress, kms_stats TO kms_admin, kms_auditor;
