-- Equality and ordering on the envelope bytes (the representation is the
-- same as bytea's, so PostgreSQL's own bytea functions do the work). With
-- kms_encrypt_deterministic this gives UNIQUE, hash joins and GROUP BY.
CREATE FUNCTION encrypted_text_eq(encrypted_text, encrypted_text) RETURNS boolean
    LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'byteaeq';
CREATE FUNCTION encrypted_text_ne(encrypted_text, encrypted_text) RETURNS boolean
    LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'byteane';
CREATE FUNCTION encrypted_text_lt(encrypted_text, encrypted_text) RETURNS boolean
    LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'bytealt';
CREATE FUNCTION encrypted_text_le(encrypted_text, encrypted_text) RETURNS boolean
    LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'byteale';
CREATE FUNCTION encrypted_text_gt(encrypted_text, encrypted_text) RETURNS boolean
    LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'byteagt';
CREATE FUNCTION encrypted_text_ge(encrypted_text, encrypted_text) RETURNS boolean
    LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'byteage';
CREATE FUNCTION encrypted_text_cmp(encrypted_text, encrypted_text) RETURNS integer
    LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'byteacmp';
CREATE FUNCTION encrypted_text_hash(encrypted_text) RETURNS integer
    LANGUAGE internal IMMUTABLE STRICT PARALLEL SAFE AS 'hashvarlena';

CREATE OPERATOR = (LEFTARG = encrypted_text, RIGHTARG = encrypted_text, FUNCTION = encrypted_text_eq,
    COMMUTATOR = =, NEGATOR = <>, RESTRICT = eqsel, JOIN = eqjoinsel, HASHES, MERGES);
CREATE OPERATOR <> (LEFTARG = encrypted_text, RIGHTARG = encrypted_text, FUNCTION = encrypted_text_ne,
    COMMUTATOR = <>, NEGATOR = =, RESTRICT = neqsel, JOIN = neqjoinsel);
CREATE OPERATOR < (LEFTARG = encrypted_text, RIGHTARG = encrypted_text, FUNCTION = encrypted_text_lt,
    COMMUTATOR = >, NEGATOR = >=, RESTRICT = scalarltsel, JOIN = scalarltjoinsel);
CREATE OPERATOR <= (LEFTARG = encrypted_text, RIGHTARG = encrypted_text, FUNCTION = encrypted_text_le,
    COMMUTATOR = >=, NEGATOR = >, RESTRICT = scalarlesel, JOIN = scalarlejoinsel);
CREATE OPERATOR > (LEFTARG = encrypted_text, RIGHTARG = encrypted_text, FUNCTION = encrypted_text_gt,
    COMMUTATOR = <, NEGATOR = <=, RESTRICT = scalargtsel, JOIN = scalargtjoinsel);
CREATE OPERATOR >= (LEFTARG = encrypted_text, RIGHTARG = encrypted_text, FUNCTION = encrypted_text_ge,
    COMMUTATOR = <=, NEGATOR = <, RESTRICT = scalargesel, JOIN = scalargejoinsel);

CREATE OPERATOR CLASS encrypted_text_ops DEFAULT FOR TYPE encrypted_text USING btree AS
    OPERATOR 1 <, OPERATOR 2 <=, OPERATOR 3 =, OPERATOR 4 >=, OPERATOR 5 >,
    FUNCTION 1 encrypted_text_cmp(encrypted_text, encrypted_text);
CREATE OPERATOR CLASS encrypted_text_hash_ops DEFAULT FOR TYPE encrypted_text USING hash AS
    OPERATOR 1 =,
    FUNCTION 1 encrypted_text_hash(encrypted_text);

-- Secrets store: values sealed under a key (no context), so rotation and
-- the background worker cover them.
CREATE TABLE kms.secrets (
    name       text NOT NULL,
    version    integer NOT NULL,
    value      encrypted_text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    expires_at timestamptz,
    tags       jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (name, version)
);
SELECT pg_catalog.pg_extension_config_dump('kms.secrets', '');

CREATE VIEW kms_secrets AS
SELECT s.name, s.version, s.created_at, s.expires_at, s.tags,
       (SELECT k.key_name FROM kms.keys k
         WHERE k.key_id = ('x' || pg_catalog.encode(pg_catalog.substring(s.value::bytea, 3, 4), 'hex'))::bit(32)::integer) AS key_name
  FROM kms.secrets s;
COMMENT ON VIEW kms_secrets IS 'Secrets and their versions; never the values (read them with kms_secret_get).';

-- status: 'valid' while the role granted to exists under its oid and name;
-- otherwise why the grant does not apply (it still keeps the key closed to
-- roles without a grant).
CREATE VIEW kms_key_grants AS
SELECT k.key_name, g.grantee, g.privilege, g.granted_at,
       CASE WHEN r.rolname::text = g.grantee THEN 'valid'
            WHEN g.cluster_id <> (SELECT c.system_identifier FROM pg_catalog.pg_control_system() c)
                 THEN 'unbound: restored from another cluster, see kms_rebind_key_grants()'
            WHEN r.oid IS NULL THEN 'stale: role dropped'
            ELSE 'stale: role renamed to ' || r.oid::pg_catalog.regrole::text
       END AS status
  FROM kms.key_grants g JOIN kms.keys k ON k.key_id = g.key_id
  LEFT JOIN pg_catalog.pg_roles r ON r.oid = g.grantee_oid;
COMMENT ON VIEW kms_key_grants IS 'Per-key grants. Only status = ''valid'' grants let a role use the key; any grant, valid or not, closes the key to roles without one.';
-- Bound after a restore by a kms_admin (the loop below revokes PUBLIC only).
GRANT EXECUTE ON FUNCTION kms_rebind_key_grants() TO kms_admin;

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
  FROM kms_stats_counters() s
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
        -- Type I/O and comparison functions stay public: they only parse, format and compare bytes.
        CONTINUE WHEN r.proname LIKE 'encrypted\_text\_%';
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', r.sig);
        IF r.proname IN ('kms_encrypt', 'kms_decrypt', 'kms_encrypt_bytea', 'kms_decrypt_bytea',
                         'kms_rewrap', 'kms_key_name', 'kms_key_version',
                         'kms_encrypt_deterministic', 'kms_blind_index') THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO kms_user', r.sig);
        ELSIF r.proname = 'kms_secret_get' THEN
            -- Checked inside: kms_admin members, or roles granted 'decrypt' on the key.
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO kms_user, kms_admin', r.sig);
        ELSIF r.proname IN ('kms_create_key', 'kms_rotate_key', 'kms_set_primary', 'kms_disable_key_version',
                            'kms_enable_key_version', 'kms_destroy_key_version', 'kms_rotate_master_key',
                            'kms_key_usage', 'kms_reencrypt_now', 'kms_destroy_key', 'kms_grant_key',
                            'kms_revoke_key', 'kms_secret_set', 'kms_secret_delete') THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO kms_admin', r.sig);
        ELSIF r.proname IN ('kms_health', 'kms_verify_audit_log', 'kms_stats_counters') THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO kms_admin, kms_auditor', r.sig);
        END IF;
    END LOOP;
END
$$;

REVOKE ALL ON kms_keys, kms_audit_log, kms_reencryption_progress, kms_stats, kms_secrets, kms_key_grants FROM PUBLIC;
GRANT SELECT ON kms_keys, kms_audit_log, kms_reencryption_progress, kms_stats, kms_secrets, kms_key_grants
    TO kms_admin, kms_auditor;
