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
                            'kms_enable_key_version', 'kms_destroy_key_version', 'kms_rotate_master_key') THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO kms_admin', r.sig);
        ELSIF r.proname IN ('kms_health', 'kms_verify_audit_log') THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO kms_admin, kms_auditor', r.sig);
        END IF;
    END LOOP;
END
$$;

REVOKE ALL ON kms_keys, kms_audit_log FROM PUBLIC;
GRANT SELECT ON kms_keys, kms_audit_log TO kms_admin, kms_auditor;
