-- pg_kms catalog: schema kms, reachable only through the extension's
-- functions and views (they switch to the catalog owner when they need it).

CREATE SCHEMA IF NOT EXISTS kms;
REVOKE ALL ON SCHEMA kms FROM PUBLIC;
COMMENT ON SCHEMA kms IS 'pg_kms keyring: wrapped data keys, master-key fingerprint, audit log. Superuser-only.';

-- Roles (cluster-wide, so created only when missing).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'kms_admin') THEN
        CREATE ROLE kms_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'kms_user') THEN
        CREATE ROLE kms_user NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'kms_auditor') THEN
        CREATE ROLE kms_auditor NOLOGIN;
    END IF;
END
$$;

-- One row: a commitment to the master key (HKDF output, never the key).
CREATE TABLE kms.keyring (
    singleton              boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    master_key_fingerprint bytea NOT NULL CHECK (pg_catalog.length(master_key_fingerprint) = 32),
    created_at             timestamptz NOT NULL DEFAULT pg_catalog.now(),
    rotated_at             timestamptz
);

CREATE TABLE kms.keys (
    key_id          integer PRIMARY KEY CHECK (key_id > 0),
    key_name        text NOT NULL UNIQUE CHECK (key_name ~ '^[A-Za-z0-9_.:-]{1,63}$'),
    primary_version integer NOT NULL CHECK (primary_version > 0),
    rotation_period interval CHECK (rotation_period > interval '0'),
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- Random blind-index root of this key name, wrapped under the KEK
    -- (independent of versions; NULL once the key is destroyed).
    index_key       bytea
);

-- Per-key grants: once a key has grants, only grantees may use it for that
-- privilege. A grant names its role twice: by oid, so that it dies with the
-- role (a role dropped and recreated under the same name gets a new oid and
-- does not inherit it), and by name, so that a dump restored into another
-- cluster (other oids) can be bound again to the roles of that name there,
-- by an explicit, audited kms_rebind_key_grants(). cluster_id is the
-- pg_control_system() system identifier of the cluster where the oid was
-- taken; only rows from another cluster are rebound.
CREATE TABLE kms.key_grants (
    key_id      integer NOT NULL,
    grantee     text NOT NULL,
    grantee_oid oid NOT NULL,
    cluster_id  bigint NOT NULL,
    privilege   text NOT NULL CHECK (privilege IN ('encrypt', 'decrypt')),
    granted_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_id, grantee, privilege)
);

-- Each version's random 32-byte data key, wrapped (AES-256-GCM) under the
-- KEK derived from the master key, with key id and version bound as AAD.
CREATE TABLE kms.key_versions (
    key_id           integer NOT NULL,
    version          integer NOT NULL CHECK (version > 0),
    state            text NOT NULL CHECK (state IN ('active', 'decrypt_only', 'disabled', 'destroyed')),
    wrapped_key      bytea,
    created_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    state_changed_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_id, version),
    CHECK ((state = 'destroyed') = (wrapped_key IS NULL))
);

-- Append-only, hash-chained audit log.
CREATE TABLE kms.audit_log (
    id        bigint PRIMARY KEY,
    at        timestamptz NOT NULL,
    actor     text NOT NULL,
    operation text NOT NULL,
    key_name  text,
    version   integer,
    reason    text,
    prev_hash bytea NOT NULL,
    hash      bytea NOT NULL
);

-- The chain's head, so that removing the newest rows is detected too.
CREATE TABLE kms.audit_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_id   bigint NOT NULL,
    last_hash bytea NOT NULL
);

-- Re-encryption progress per (table, column) of this database, written by
-- the background worker and kms_reencrypt_now(). Operational state: not
-- dumped (a restored database recounts).
CREATE TABLE kms.reencryption_progress (
    relid                oid NOT NULL,
    attname              name NOT NULL,
    rows_rewrapped       bigint NOT NULL DEFAULT 0,
    rows_pending         bigint,
    rows_needing_context bigint,
    started_at           timestamptz,
    last_batch_at        timestamptz,
    finished_at          timestamptz,
    last_error           text,
    PRIMARY KEY (relid, attname)
);

SELECT pg_catalog.pg_extension_config_dump('kms.keyring', '');
SELECT pg_catalog.pg_extension_config_dump('kms.key_grants', '');
SELECT pg_catalog.pg_extension_config_dump('kms.keys', '');
SELECT pg_catalog.pg_extension_config_dump('kms.key_versions', '');
SELECT pg_catalog.pg_extension_config_dump('kms.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('kms.audit_head', '');

-- SHA-256 over the previous hash and a canonical JSON encoding of the row.
CREATE FUNCTION kms.audit_row_hash(prev bytea, id bigint, at timestamptz, actor text, operation text,
                                   key_name text, version integer, reason text)
RETURNS bytea LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT sha256(prev || convert_to(jsonb_build_array(
        id, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'),
        actor, operation, key_name, version, reason)::text, 'UTF8'))
$$;

CREATE FUNCTION kms.audit_append(p_operation text, p_key_name text, p_version integer, p_reason text)
RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id   bigint;
    v_prev bytea;
    v_at   timestamptz := clock_timestamp();
    v_hash bytea;
BEGIN
    -- Self-conflicting lock: concurrent acts are chained one after another.
    LOCK TABLE kms.audit_log IN SHARE ROW EXCLUSIVE MODE;
    SELECT a.id, a.hash INTO v_id, v_prev FROM kms.audit_log a ORDER BY a.id DESC LIMIT 1;
    v_id := coalesce(v_id, 0) + 1;
    v_prev := coalesce(v_prev, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    v_hash := kms.audit_row_hash(v_prev, v_id, v_at, session_user::text, p_operation, p_key_name, p_version, p_reason);
    INSERT INTO kms.audit_log (id, at, actor, operation, key_name, version, reason, prev_hash, hash)
    VALUES (v_id, v_at, session_user, p_operation, p_key_name, p_version, p_reason, v_prev, v_hash);
    INSERT INTO kms.audit_head (singleton, last_id, last_hash) VALUES (true, v_id, v_hash)
    ON CONFLICT (singleton) DO UPDATE SET last_id = excluded.last_id, last_hash = excluded.last_hash;
    PERFORM pg_notify('kms_events', jsonb_build_object(
        'operation', p_operation, 'key_name', p_key_name, 'version', p_version)::text);
END
$$;

CREATE FUNCTION kms.audit_verify()
RETURNS boolean LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r        record;
    v_prev   bytea := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
    v_expect bigint := 1;
    v_head   record;
BEGIN
    FOR r IN SELECT * FROM kms.audit_log ORDER BY id LOOP
        IF r.id <> v_expect OR r.prev_hash <> v_prev
           OR r.hash <> kms.audit_row_hash(r.prev_hash, r.id, r.at, r.actor, r.operation, r.key_name, r.version, r.reason) THEN
            RETURN false;
        END IF;
        v_prev := r.hash;
        v_expect := v_expect + 1;
    END LOOP;
    SELECT * INTO v_head FROM kms.audit_head;
    IF v_head IS NULL THEN
        RETURN v_expect = 1;
    END IF;
    RETURN v_head.last_id = v_expect - 1 AND v_head.last_hash = v_prev;
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

-- Views (in the extension's schema). They run with the owner's rights and
-- expose no key material.
CREATE VIEW kms_keys AS
SELECT k.key_name,
       v.version,
       v.state,
       (v.version = k.primary_version) AS is_primary,
       v.created_at,
       v.state_changed_at,
       k.rotation_period,
       CASE WHEN k.rotation_period IS NOT NULL THEN p.created_at + k.rotation_period END AS next_rotation_at
  FROM kms.keys k
  JOIN kms.key_versions v ON v.key_id = k.key_id
  JOIN kms.key_versions p ON p.key_id = k.key_id AND p.version = k.primary_version;

CREATE VIEW kms_audit_log AS
SELECT id, at, actor, operation, key_name, version, reason, pg_catalog.encode(hash, 'hex') AS hash
  FROM kms.audit_log;
