-- Privileges of every function and view of pg_kms, from one declared list.
-- Runs last (finalize), when every object of the extension exists.
--
--   kms_user:    encrypt, decrypt, rewrap, header readers, blind index
--   kms_admin:   key lifecycle, secrets, re-encryption, audit read, health
--   kms_auditor: the views, kms_health and the audit checks (cannot decrypt)
--   PUBLIC:      only the encrypted_text type's I/O, comparison and cast
--                functions (they parse, format and compare bytes)
--   nobody:      internal helpers and the kms schema (superuser only)
--
-- Every function and view that belongs to the extension gets exactly the
-- privileges of its entry below: PUBLIC's are revoked first, unless the
-- entry is PUBLIC. One that has no entry, or an entry that names no object,
-- makes CREATE EXTENSION fail: a new function cannot be forgotten (usable
-- by no role) nor left to PUBLIC by mistake. Overloads share their name's
-- entry. The #[pg_test] grants_tests checks the resulting privileges.
DO $grants$
DECLARE
    r        record;
    problems text[] := '{}';
BEGIN
    FOR r IN
        WITH intent(kind, name, grantees) AS (VALUES
            -- kms_user
            ('function', 'kms_encrypt',               '{kms_user}'::text[]),
            ('function', 'kms_decrypt',               '{kms_user}'),
            ('function', 'kms_encrypt_bytea',         '{kms_user}'),
            ('function', 'kms_decrypt_bytea',         '{kms_user}'),
            ('function', 'kms_rewrap',                '{kms_user}'),
            ('function', 'kms_key_name',              '{kms_user}'),
            ('function', 'kms_key_version',           '{kms_user}'),
            ('function', 'kms_encrypt_deterministic', '{kms_user}'),
            ('function', 'kms_blind_index',           '{kms_user}'),
            ('function', 'kms_deterministic_candidates', '{kms_user}'),
            -- Checked inside: kms_admin members, or roles granted 'decrypt' on the key.
            ('function', 'kms_secret_get',            '{kms_user,kms_admin}'),
            -- kms_admin
            ('function', 'kms_create_key',            '{kms_admin}'),
            ('function', 'kms_rotate_key',            '{kms_admin}'),
            ('function', 'kms_set_primary',           '{kms_admin}'),
            ('function', 'kms_disable_key_version',   '{kms_admin}'),
            ('function', 'kms_enable_key_version',    '{kms_admin}'),
            ('function', 'kms_destroy_key_version',   '{kms_admin}'),
            ('function', 'kms_destroy_key',           '{kms_admin}'),
            ('function', 'kms_rotate_master_key',     '{kms_admin}'),
            ('function', 'kms_grant_key',             '{kms_admin}'),
            ('function', 'kms_revoke_key',            '{kms_admin}'),
            -- Bound after a restore into another cluster.
            ('function', 'kms_rebind_key_grants',     '{kms_admin}'),
            ('function', 'kms_key_usage',             '{kms_admin}'),
            ('function', 'kms_reencrypt_now',         '{kms_admin}'),
            ('function', 'kms_secret_set',            '{kms_admin}'),
            ('function', 'kms_secret_delete',         '{kms_admin}'),
            ('function', 'kms_secret_purge_expired',  '{kms_admin}'),
            -- One keyring across clusters (logical replication, Citus nodes).
            ('function', 'kms_keyring_export',        '{kms_admin}'),
            ('function', 'kms_keyring_import',        '{kms_admin}'),
            -- Protected columns (the table's owner, checked inside).
            ('function', 'kms_protect_column',        '{kms_admin}'),
            ('function', 'kms_unprotect_column',      '{kms_admin}'),
            -- Key policy after creation (issue 16).
            ('function', 'kms_alter_key',             '{kms_admin}'),
            -- kms_admin and kms_auditor
            ('function', 'kms_health',                '{kms_admin,kms_auditor}'),
            ('function', 'kms_verify_audit_log',      '{kms_admin,kms_auditor}'),
            ('function', 'kms_audit_log_check',       '{kms_admin,kms_auditor}'),
            ('function', 'kms_stats_counters',        '{kms_admin,kms_auditor}'),
            ('function', 'kms_warnings_list',         '{kms_admin,kms_auditor}'),
            ('view',     'kms_keys',                  '{kms_admin,kms_auditor}'),
            ('view',     'kms_audit_log',             '{kms_admin,kms_auditor}'),
            ('view',     'kms_destruction_receipts',  '{kms_admin,kms_auditor}'),
            ('view',     'kms_reencryption_progress', '{kms_admin,kms_auditor}'),
            ('view',     'kms_stats',                 '{kms_admin,kms_auditor}'),
            ('view',     'kms_secrets',               '{kms_admin,kms_auditor}'),
            ('view',     'kms_key_grants',            '{kms_admin,kms_auditor}'),
            ('view',     'kms_protected_columns',     '{kms_admin,kms_auditor}'),
            ('view',     'kms_warnings',              '{kms_admin,kms_auditor}'),
            -- The access audit (issue 16): who used which key.
            ('function', 'kms_access_log_check',      '{kms_admin,kms_auditor}'),
            ('view',     'kms_access_log',            '{kms_admin,kms_auditor}'),
            -- PUBLIC by design: the type's I/O and its operators' functions.
            ('function', 'encrypted_text_in',         '{PUBLIC}'),
            ('function', 'encrypted_text_out',        '{PUBLIC}'),
            ('function', 'encrypted_text_recv',       '{PUBLIC}'),
            ('function', 'encrypted_text_send',       '{PUBLIC}'),
            -- The cast bytea::encrypted_text (validates, never encrypts).
            ('function', 'encrypted_text_from_bytea', '{PUBLIC}'),
            ('function', 'encrypted_text_eq',         '{PUBLIC}'),
            ('function', 'encrypted_text_ne',         '{PUBLIC}'),
            ('function', 'encrypted_text_lt',         '{PUBLIC}'),
            ('function', 'encrypted_text_le',         '{PUBLIC}'),
            ('function', 'encrypted_text_gt',         '{PUBLIC}'),
            ('function', 'encrypted_text_ge',         '{PUBLIC}'),
            ('function', 'encrypted_text_cmp',        '{PUBLIC}'),
            ('function', 'encrypted_text_hash',       '{PUBLIC}'),
            -- Nobody (superuser only): internal helpers of the audit chain,
            -- and the #[pg_test] functions of test builds (schema tests).
            ('function', 'kms.audit_row_hash',        '{}'),
            ('function', 'kms.audit_verify',          '{}'),
            ('function', 'kms.audit_log_reject',      '{}'),
            -- The DDL guard's event trigger function.
            ('function', 'kms.protect_ddl_guard',     '{}'),
            -- The access log's append-only trigger function.
            ('function', 'kms.access_log_reject',     '{}'),
            ('function', 'tests.*',                   '{}')
        ),
        ext AS (
            SELECT e.oid, e.extnamespace FROM pg_catalog.pg_extension e WHERE e.extname = 'pg_kms'
        ),
        member AS (
            SELECT 'function' AS kind, p.oid::pg_catalog.regprocedure::text AS object,
                   CASE WHEN p.pronamespace = ext.extnamespace THEN p.proname::text
                        WHEN n.nspname = 'tests' THEN 'tests.*'
                        ELSE n.nspname || '.' || p.proname END AS name
              FROM ext
              JOIN pg_catalog.pg_depend d ON d.refobjid = ext.oid
              JOIN pg_catalog.pg_proc p ON p.oid = d.objid
              JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
             WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
               AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
               AND d.deptype = 'e'
            UNION ALL
            -- Views are declared one by one; any other relation must be in
            -- schema kms (no USAGE for anyone).
            SELECT CASE WHEN c.relkind IN ('v', 'm') THEN 'view' ELSE 'relation' END,
                   c.oid::pg_catalog.regclass::text,
                   CASE WHEN c.relkind NOT IN ('v', 'm') AND n.nspname = 'kms' THEN NULL
                        WHEN c.relnamespace = ext.extnamespace THEN c.relname::text
                        ELSE n.nspname || '.' || c.relname END
              FROM ext
              JOIN pg_catalog.pg_depend d ON d.refobjid = ext.oid
              JOIN pg_catalog.pg_class c ON c.oid = d.objid
              JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
               AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
               AND d.deptype = 'e'
        )
        SELECT m.kind AS member_kind, m.object, i.kind, i.name, i.grantees
          FROM (SELECT * FROM member WHERE name IS NOT NULL) m
          FULL JOIN intent i ON i.kind = m.kind AND i.name = m.name
         ORDER BY i.name, m.object
    LOOP
        IF r.object IS NULL THEN
            CONTINUE WHEN r.name = 'tests.*';  -- test builds only
            problems := problems || pg_catalog.format('%s %s is declared but is not part of pg_kms', r.kind, r.name);
        ELSIF r.name IS NULL THEN
            problems := problems || pg_catalog.format('%s %s has no declared privileges', r.member_kind, r.object);
        ELSIF r.grantees <> '{PUBLIC}' THEN
            EXECUTE pg_catalog.format('REVOKE ALL ON %s %s FROM PUBLIC',
                                      CASE r.kind WHEN 'function' THEN 'FUNCTION' ELSE 'TABLE' END, r.object);
            IF pg_catalog.cardinality(r.grantees) > 0 THEN
                EXECUTE pg_catalog.format('GRANT %s ON %s %s TO %s',
                                          CASE r.kind WHEN 'function' THEN 'EXECUTE' ELSE 'SELECT' END,
                                          CASE r.kind WHEN 'function' THEN 'FUNCTION' ELSE 'TABLE' END,
                                          r.object,
                                          (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(g.role), ', ' ORDER BY g.n)
                                             FROM pg_catalog.unnest(r.grantees) WITH ORDINALITY g(role, n)));
            END IF;
        END IF;
    END LOOP;
    IF pg_catalog.cardinality(problems) > 0 THEN
        RAISE EXCEPTION 'pg_kms: privileges not declared: %', pg_catalog.array_to_string(problems, '; ')
            USING HINT = 'Declare every function and view of pg_kms, with its roles, in sql/grants.sql.';
    END IF;
END
$grants$;
