-- pg_kms access audit: who used which key (see src/keys/access.rs).
-- Every use of a key version (encrypt, decrypt, blind_index, rewrap,
-- secret_read) is counted in the backend per (session user, current user,
-- key, version, operation), handed to shared memory at transaction end,
-- and appended here by the database's worker at most every
-- pg_kms.access_audit_interval: one row per aggregate, with the number of
-- uses and the first and last time. A crash loses at most the counts of
-- the last interval. No plaintext, context or key material.
--
-- Append-only and chained, keyed like kms.audit_log but as a chain of its
-- own: hash = SHA-256(prev_hash || canonical row, label "pg_kms v1 access
-- row"), mac = HMAC(audit-chain key derived from the master key, hash);
-- key_fp names that master key. Checked by kms_access_log_check().
-- actor is the session user, role the current user (as in kms.audit_log);
-- their names are those at the time the row was written (NULL: the role
-- was dropped before), next to the oids. version is NULL for blind_index
-- (the blind-index key is the key's, not a version's).
CREATE TABLE kms.access_log (
    id        bigint PRIMARY KEY,
    logged_at timestamptz NOT NULL,
    actor_oid oid NOT NULL,
    actor     text,
    role_oid  oid NOT NULL,
    role      text,
    key_id    integer NOT NULL,
    key_name  text,
    version   integer,
    operation text NOT NULL
        CHECK (operation IN ('encrypt', 'decrypt', 'blind_index', 'rewrap', 'secret_read')),
    count     bigint NOT NULL CHECK (count > 0),
    first_at  timestamptz NOT NULL,
    last_at   timestamptz NOT NULL,
    key_fp    bytea NOT NULL,
    prev_hash bytea NOT NULL,
    hash      bytea NOT NULL,
    mac       bytea NOT NULL
);

-- The chain's head (a convenience: the authoritative copy is the LOG line
-- "pg_kms: access log head" written at every append).
CREATE TABLE kms.access_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_id   bigint NOT NULL,
    last_hash bytea NOT NULL,
    last_mac  bytea NOT NULL
);

SELECT pg_catalog.pg_extension_config_dump('kms.access_log', '');
SELECT pg_catalog.pg_extension_config_dump('kms.access_head', '');

CREATE FUNCTION kms.access_log_reject()
RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'the pg_kms access log is append-only'
        USING ERRCODE = '42501', HINT = 'Rows of kms.access_log can be neither updated nor deleted.';
END
$$;

CREATE TRIGGER access_log_no_update_delete BEFORE UPDATE OR DELETE ON kms.access_log
    FOR EACH ROW EXECUTE FUNCTION kms.access_log_reject();
CREATE TRIGGER access_log_no_truncate BEFORE TRUNCATE ON kms.access_log
    FOR EACH STATEMENT EXECUTE FUNCTION kms.access_log_reject();

CREATE VIEW kms_access_log AS
SELECT id, logged_at, actor, role, key_name, version, operation, count, first_at, last_at,
       actor_oid, role_oid, key_id, pg_catalog.encode(hash, 'hex') AS hash,
       pg_catalog.encode(mac, 'hex') AS mac
  FROM kms.access_log;
COMMENT ON VIEW kms_access_log IS 'Uses of keys per session user (actor), current user (role), key, version and operation, with their count and first and last time; appended by the worker every pg_kms.access_audit_interval (a crash loses at most the last interval). version is NULL for blind_index. Check the chain with kms_access_log_check().';
