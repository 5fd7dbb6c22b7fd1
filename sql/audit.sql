-- pg_kms audit chain: the append-only log, its head, the check of its
-- unkeyed prefix and the trigger that refuses UPDATE, DELETE and TRUNCATE.
-- The keyed chain itself is written and checked in Rust.

-- Append-only audit log, chained and keyed (written by pg_kms in Rust):
-- hash = SHA-256(prev_hash || canonical row), mac = HMAC(audit-chain key
-- derived from the master key, hash); key_fp names that master key.
-- Rows with mac NULL come from a keyring made before the chain was keyed
-- (hash = kms.audit_row_hash) and may only precede keyed rows.
-- actor is session_user, role the current_user of the act (the role whose
-- privileges it used, e.g. after SET ROLE; NULL in rows made before it was
-- recorded, whose hashes do not cover it).
CREATE TABLE kms.audit_log (
    id        bigint PRIMARY KEY,
    at        timestamptz NOT NULL,
    actor     text NOT NULL,
    operation text NOT NULL,
    key_name  text,
    version   integer,
    reason    text,
    prev_hash bytea NOT NULL,
    hash      bytea NOT NULL,
    detail    text,
    key_fp    bytea,
    mac       bytea,
    role      text
);
-- Cold-path lookups of a key's latest change (see kms.keys.generation).
CREATE INDEX audit_log_key_name ON kms.audit_log (key_name, id);
CREATE INDEX audit_log_keyring_wide ON kms.audit_log (id)
    WHERE operation IN ('rotate_master_key', 'adopt_integrity');

-- The chain's head (a convenience: the authoritative copy of the head is
-- the LOG line "pg_kms: audit chain head" written at every append).
CREATE TABLE kms.audit_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_id   bigint NOT NULL,
    last_hash bytea NOT NULL,
    last_mac  bytea
);

SELECT pg_catalog.pg_extension_config_dump('kms.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('kms.audit_head', '');

-- The unkeyed hash of rows written before the chain was keyed: SHA-256
-- over the previous hash and a canonical JSON encoding of the row.
CREATE FUNCTION kms.audit_row_hash(prev bytea, id bigint, at timestamptz, actor text, operation text,
                                   key_name text, version integer, reason text)
RETURNS bytea LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT sha256(prev || convert_to(jsonb_build_array(
        id, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'),
        actor, operation, key_name, version, reason)::text, 'UTF8'))
$$;

-- Checks the unkeyed prefix (rows from before the chain was keyed) only;
-- the whole chain is checked by kms_audit_log_check().
CREATE FUNCTION kms.audit_verify()
RETURNS boolean LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r        record;
    v_prev   bytea := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
    v_expect bigint := 1;
BEGIN
    FOR r IN SELECT * FROM kms.audit_log a WHERE a.mac IS NULL ORDER BY a.id LOOP
        IF r.id <> v_expect OR r.prev_hash <> v_prev
           OR r.hash <> kms.audit_row_hash(r.prev_hash, r.id, r.at, r.actor, r.operation, r.key_name, r.version, r.reason) THEN
            RETURN false;
        END IF;
        v_prev := r.hash;
        v_expect := v_expect + 1;
    END LOOP;
    RETURN true;
END
$$;

CREATE FUNCTION kms.audit_log_reject()
RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'the pg_kms audit log is append-only'
        USING ERRCODE = '42501', HINT = 'Rows of kms.audit_log can be neither updated nor deleted.';
END
$$;

CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON kms.audit_log
    FOR EACH ROW EXECUTE FUNCTION kms.audit_log_reject();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON kms.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION kms.audit_log_reject();
