-- pg_kms upgrade script 0.1.0 -> 0.2.0 (hand-written; frozen once 0.2.0 is
-- released). Run by ALTER EXTENSION pg_kms UPDATE [TO '0.2.0'].
--
-- 0.2.0 is the trust-boundary work (issue 12: keyed audit chain, MAC'd
-- key-state rows, destroyed keys that stay destroyed, per-key grants bound
-- to the role's oid) and the restructuring (issue 13: no SQL change).
-- After this script the catalog is, object by object, what a fresh
-- CREATE EXTENSION pg_kms VERSION '0.2.0' makes (pgrx_tests/tests/upgrade.rs
-- compares pg_dump --schema-only --binary-upgrade of both), and the rows of
-- a 0.1.0 keyring are in the state 0.2.0 reads as "made before rows carried
-- MACs": kms.keyring.integrity_since NULL, no row MACs, generation 0, an
-- unkeyed audit chain. The first lifecycle act under 0.2.0 checks every
-- wrapped key against the master key, MACs every row and appends an audited
-- 'adopt_integrity' row (src/keys/integrity.rs, adopt()); until then values
-- decrypt and the chain verifies as before.
--
-- Where to add to it (before 0.2.0 is released): a new function goes in
-- section 4 as `cargo pgrx schema pg15` prints it, a new view in section 5;
-- its privileges come from section 7, a copy of sql/grants.sql's block
-- (after adding the function's line there, run
-- `bash scripts/sync_upgrade_grants.sh`). pgrx_tests/README.md, "Changing
-- the SQL", has the rest.

\echo Use "ALTER EXTENSION pg_kms UPDATE TO '0.2.0'" to load this file. \quit

-- 1. Catalog tables. New columns are added where a fresh install has them
-- (at the end), without a default at ADD time so that no "missing value" is
-- stored (pg_upgrade's dump would show it); NOT NULL and defaults after the
-- rows are filled.

-- Master-key commitment: MACs on since (NULL: a keyring from before MACs),
-- and the row's own MAC.
ALTER TABLE kms.keyring ADD COLUMN integrity_since timestamptz;
ALTER TABLE kms.keyring ADD COLUMN row_mac bytea;

ALTER TABLE kms.keys ADD COLUMN destroyed_at timestamptz;
ALTER TABLE kms.keys ADD COLUMN generation bigint;
ALTER TABLE kms.keys ADD COLUMN row_mac bytea;
UPDATE kms.keys SET generation = 0;
ALTER TABLE kms.keys ALTER COLUMN generation SET DEFAULT 0;
ALTER TABLE kms.keys ALTER COLUMN generation SET NOT NULL;
-- A key destroyed by 0.1.0's kms_destroy_key (every version destroyed, its
-- index root erased) is marked destroyed, at the time of its audit row, so
-- that it stays destroyed and kms_audit_log_check() finds the catalog as
-- the chain records it (adopt() would otherwise mark it at the next act).
UPDATE kms.keys k
   SET destroyed_at = coalesce((SELECT max(a.at) FROM kms.audit_log a
                                 WHERE a.key_name = k.key_name AND a.operation = 'destroy_key'),
                               pg_catalog.now())
 WHERE k.index_key IS NULL
   AND NOT EXISTS (SELECT 1 FROM kms.key_versions v WHERE v.key_id = k.key_id AND v.state <> 'destroyed');

ALTER TABLE kms.key_versions ADD COLUMN row_mac bytea;

-- Per-key grants now name their role by oid too (a grant dies with its
-- role) and the cluster the oid belongs to. The table is rebuilt so that
-- its columns are in the order of a fresh install. A grant binds to the
-- role that has its name now (what 0.1.0 checked, by name); a grant whose
-- role no longer exists gets oid 0 (no role): it keeps the key closed, as
-- 0.2.0 does for a dropped role, until kms_revoke_key() removes it.
ALTER TABLE kms.key_grants RENAME TO key_grants_0_1_0;
ALTER TABLE kms.key_grants_0_1_0 RENAME CONSTRAINT key_grants_pkey TO key_grants_0_1_0_pkey;
ALTER TABLE kms.key_grants_0_1_0 RENAME CONSTRAINT key_grants_privilege_check TO key_grants_0_1_0_privilege_check;
-- PostgreSQL 18 also names NOT NULL constraints (key_grants_<column>_not_null):
-- move the old table's out of the way too, so the new table's get the names
-- of a fresh install (no such constraints before 18: the loop finds none).
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT c.conname FROM pg_catalog.pg_constraint c
              WHERE c.conrelid = 'kms.key_grants_0_1_0'::pg_catalog.regclass
                AND c.contype::text = 'n'
    LOOP
        EXECUTE pg_catalog.format('ALTER TABLE kms.key_grants_0_1_0 RENAME CONSTRAINT %I TO %I',
                                  r.conname, 'key_grants_0_1_0' || pg_catalog.substr(r.conname, 11));
    END LOOP;
END $$;
CREATE TABLE kms.key_grants (
    key_id      integer NOT NULL,
    grantee     text NOT NULL,
    grantee_oid oid NOT NULL,
    cluster_id  bigint NOT NULL,
    privilege   text NOT NULL CHECK (privilege IN ('encrypt', 'decrypt')),
    granted_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (key_id, grantee, privilege)
);
INSERT INTO kms.key_grants (key_id, grantee, grantee_oid, cluster_id, privilege, granted_at)
SELECT g.key_id, g.grantee,
       coalesce((SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname::pg_catalog.text = g.grantee), 0::oid),
       (SELECT c.system_identifier FROM pg_catalog.pg_control_system() c),
       g.privilege, g.granted_at
  FROM kms.key_grants_0_1_0 g;
DROP VIEW kms_key_grants;
-- Out of the extension first: that also takes it out of extconfig, which a
-- plain DROP TABLE would leave naming a dropped table.
ALTER EXTENSION pg_kms DROP TABLE kms.key_grants_0_1_0;
DROP TABLE kms.key_grants_0_1_0;
SELECT pg_catalog.pg_extension_config_dump('kms.key_grants', '');

-- The audit chain is keyed: 0.1.0's rows stay as they are (mac NULL, hash =
-- kms.audit_row_hash), the unkeyed prefix of the chain.
ALTER TABLE kms.audit_log ADD COLUMN detail text;
ALTER TABLE kms.audit_log ADD COLUMN key_fp bytea;
ALTER TABLE kms.audit_log ADD COLUMN mac bytea;
CREATE INDEX audit_log_key_name ON kms.audit_log (key_name, id);
CREATE INDEX audit_log_keyring_wide ON kms.audit_log (id)
    WHERE operation IN ('rotate_master_key', 'adopt_integrity');
ALTER TABLE kms.audit_head ADD COLUMN last_mac bytea;

-- Re-encryption progress (issue 16): the worker's backoff per column and
-- the rows sealed under a disabled version.
ALTER TABLE kms.reencryption_progress ADD COLUMN failures integer;
ALTER TABLE kms.reencryption_progress ADD COLUMN backoff_until timestamptz;
ALTER TABLE kms.reencryption_progress ADD COLUMN rows_under_disabled bigint;
UPDATE kms.reencryption_progress SET failures = 0;
ALTER TABLE kms.reencryption_progress ALTER COLUMN failures SET DEFAULT 0;
ALTER TABLE kms.reencryption_progress ALTER COLUMN failures SET NOT NULL;

-- 2. Functions of 0.1.0 that 0.2.0 no longer has. The chain is appended in
-- Rust (keyed); the worker's helpers are gone (it rewraps as the table's
-- owner). The library keeps stubs under their C symbols that only raise
-- (src/api/legacy.rs), so that 0.1.0 still installs and loads.
DROP FUNCTION kms.audit_append(text, text, integer, text);
DROP FUNCTION kms.rewrap_status(encrypted_text);
DROP FUNCTION kms.rewrap_value(encrypted_text);
DROP FUNCTION kms.value_key_id(encrypted_text);
DROP FUNCTION kms.value_version(encrypted_text);

-- 3. Changed functions.
CREATE OR REPLACE FUNCTION kms.audit_verify()
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

-- Now PARALLEL RESTRICTED (it checks the keyed chain under the master key).
CREATE OR REPLACE FUNCTION "kms_verify_audit_log"() RETURNS bool
STRICT STABLE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'kms_verify_audit_log_wrapper';

-- Now STABLE, so that `col = kms_encrypt_deterministic($1, 'k')` is an
-- index scan (issue 15).
ALTER FUNCTION "kms_encrypt_deterministic"(text, text, text) STABLE;

-- 4. New functions (as `cargo pgrx schema` generates them).
CREATE FUNCTION "kms_audit_log_check"() RETURNS TABLE (
	"ok" bool,
	"rows_checked" bigint,
	"first_bad_id" bigint,
	"problem" TEXT,
	"head_id" bigint,
	"head_mac" TEXT
)
STRICT STABLE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'kms_audit_log_check_wrapper';

CREATE FUNCTION "kms_rebind_key_grants"() RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'kms_rebind_key_grants_wrapper';

CREATE FUNCTION "kms_keyring_export"() RETURNS jsonb
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'kms_keyring_export_wrapper';

CREATE FUNCTION "kms_keyring_import"(
	"doc" jsonb
) RETURNS jsonb
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'kms_keyring_import_wrapper';

CREATE FUNCTION "kms_protect_column"(
	"tbl" regclass,
	"col" name,
	"key_name" text,
	"context" TEXT DEFAULT NULL,
	"deterministic" bool DEFAULT false,
	"blind_index_bits" INT DEFAULT NULL,
	"view_name" TEXT DEFAULT NULL
) RETURNS TEXT
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'kms_protect_column_wrapper';

CREATE FUNCTION "kms_unprotect_column"(
	"tbl" regclass,
	"col" name
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'kms_unprotect_column_wrapper';

-- Protected columns: a verbatim copy of sql/protect.sql (its table, the
-- DDL guard's event triggers and the kms_protected_columns view).
-- Protected columns (kms_protect_column): one row per column whose values
-- pg_kms seals by policy, and the decrypted view it keeps for the table.
-- The table is named by regclass (dumped as its name, so a restore binds
-- the policy to the restored table; pg_upgrade keeps table oids) and the
-- column by name: renaming either, or a column the context reads, is
-- refused while the policy exists (the event trigger below).
CREATE TABLE kms.protected_columns (
    relid              pg_catalog.regclass NOT NULL,
    attname            name NOT NULL,
    -- The table's name and schema when protected: a rename is refused.
    relname            name NOT NULL,
    relnamespace       name NOT NULL,
    key_id             integer NOT NULL,
    -- The context expression over the row's own columns, as PostgreSQL
    -- deparses it (NULL: no context), and the columns it reads.
    context            text,
    context_columns    name[] NOT NULL DEFAULT '{}',
    deterministic      boolean NOT NULL DEFAULT false,
    blind_index_bits   integer CHECK (blind_index_bits BETWEEN 16 AND 256 AND blind_index_bits % 8 = 0),
    blind_index_column name,
    -- The plaintext column's type while it is converted ('text',
    -- 'character varying(64)', 'bytea'); NULL for a column that was
    -- encrypted_text already.
    source_type        text,
    -- While converting: the encrypted_text column being filled.
    shadow_column      name,
    view_name          name NOT NULL,
    state              text NOT NULL CHECK (state IN ('converting', 'protected')),
    -- Online conversion progress (see the kms_protected_columns view).
    rows_done          bigint NOT NULL DEFAULT 0,
    rows_total         bigint,
    resume_at          text,
    started_at         timestamptz,
    last_batch_at      timestamptz,
    finished_at        timestamptz,
    last_error         text,
    protected_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    protected_by       text NOT NULL,
    PRIMARY KEY (relid, attname),
    CHECK ((state = 'converting') = (shadow_column IS NOT NULL))
);
SELECT pg_catalog.pg_extension_config_dump('kms.protected_columns', '');

-- Refuses DDL that would strand protected values: dropping or renaming a
-- protected table or column, its blind-index or shadow column or a column
-- its context reads, changing their types, disabling or dropping the
-- conversion trigger. pg_kms's own DDL is let through.
CREATE FUNCTION kms.protect_ddl_guard() RETURNS event_trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'kms_protect_ddl_guard_wrapper';
CREATE EVENT TRIGGER kms_protect_ddl_end ON ddl_command_end
    EXECUTE FUNCTION kms.protect_ddl_guard();
CREATE EVENT TRIGGER kms_protect_sql_drop ON sql_drop
    EXECUTE FUNCTION kms.protect_ddl_guard();

-- The policies, and the progress of online conversions: rows_left and eta
-- are estimates (rows_total is counted when the conversion starts).
CREATE VIEW kms_protected_columns AS
SELECT p.relid AS table_name,
       p.attname AS column_name,
       k.key_name,
       p.context,
       p.deterministic,
       p.blind_index_bits,
       p.blind_index_column,
       p.view_name,
       p.state,
       p.rows_done,
       CASE WHEN p.state = 'converting' THEN GREATEST(p.rows_total - p.rows_done, 0) ELSE 0 END AS rows_left,
       p.started_at,
       p.last_batch_at,
       CASE WHEN p.state = 'converting' AND p.rows_done > 0 AND p.rows_total IS NOT NULL
                 AND p.last_batch_at > p.started_at
            THEN p.last_batch_at + (p.last_batch_at - p.started_at)
                 * (GREATEST(p.rows_total - p.rows_done, 0)::float8 / p.rows_done) END AS eta,
       p.finished_at,
       p.last_error,
       p.protected_at,
       p.protected_by
  FROM kms.protected_columns p JOIN kms.keys k ON k.key_id = p.key_id;
COMMENT ON VIEW kms_protected_columns IS 'Column policies (kms_protect_column) and the progress of online encryption of plaintext columns (state converting, then protected).';

-- Rotation-safe deterministic lookups (issue 15).
CREATE FUNCTION "kms_deterministic_candidates"(
	"plaintext" text,
	"key_name" text,
	"context" text DEFAULT NULL
) RETURNS encrypted_text[]
STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'kms_deterministic_candidates_wrapper';

-- The explicit, validating cast bytea::encrypted_text (issue 15).
CREATE FUNCTION "encrypted_text_from_bytea"(
	"raw" bytea
) RETURNS encrypted_text
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'encrypted_text_from_bytea_wrapper';
CREATE CAST (bytea AS encrypted_text) WITH FUNCTION encrypted_text_from_bytea(bytea);

-- 5. Views (columns added at the end, so CREATE OR REPLACE keeps them and
-- their privileges).
CREATE OR REPLACE VIEW kms_keys AS
SELECT k.key_name,
       v.version,
       v.state,
       (v.version = k.primary_version) AS is_primary,
       v.created_at,
       v.state_changed_at,
       k.rotation_period,
       CASE WHEN k.rotation_period IS NOT NULL AND k.destroyed_at IS NULL
            THEN p.created_at + k.rotation_period END AS next_rotation_at,
       k.destroyed_at AS key_destroyed_at
  FROM kms.keys k
  JOIN kms.key_versions v ON v.key_id = k.key_id
  JOIN kms.key_versions p ON p.key_id = k.key_id AND p.version = k.primary_version;

CREATE OR REPLACE VIEW kms_audit_log AS
SELECT id, at, actor, operation, key_name, version, reason, pg_catalog.encode(hash, 'hex') AS hash,
       detail, pg_catalog.encode(mac, 'hex') AS mac
  FROM kms.audit_log;

-- Destruction receipts (kms_destroy_key_version, kms_destroy_key): key,
-- version(s), time, and the MAC of the erased material under a key derived
-- from the master key. Each is the detail of its row in the keyed chain.
CREATE VIEW kms_destruction_receipts AS
SELECT id AS audit_id, at, actor, key_name, version, reason, detail::jsonb AS receipt
  FROM kms.audit_log
 WHERE operation IN ('destroy_key_version', 'destroy_key');

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

-- Re-encryption progress (issue 16): backoff and rows under a disabled
-- version.
CREATE OR REPLACE VIEW kms_reencryption_progress AS
SELECT p.relid::pg_catalog.regclass AS table_name,
       p.attname AS column_name,
       p.rows_rewrapped,
       p.rows_pending,
       p.rows_needing_context,
       p.started_at,
       p.last_batch_at,
       p.finished_at,
       p.last_error,
       p.failures,
       p.backoff_until,
       p.rows_under_disabled
  FROM kms.reencryption_progress p
 WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = p.relid);

-- 6. Comments.
COMMENT ON VIEW kms_reencryption_progress IS 'rows_pending is exact when a pass starts (a full count) and decremented as batches commit; rows_needing_context were sealed with a context that no protected-column policy of the column gives, which only the application can supply (UPDATE ... SET col = kms_rewrap(col, ctx)); a column protected with its context is rewrapped with each row''s context and counts none. failures counts failed attempts in a row; while backoff_until is in the future the worker leaves the column alone (it doubles each time, up to an hour). rows_under_disabled were sealed under a disabled version: nothing can read or rewrap them until it is enabled again.';
COMMENT ON TYPE encrypted_text IS 'AES-256-GCM envelope (format, key id, key version, nonce, ciphertext, tag) produced by kms_encrypt(), or AES-256-SIV (header, synthetic IV, ciphertext) from kms_encrypt_deterministic(); text form kms:<base64>';

-- Issue 16, helper C ("audit"): current_user of each act in the audit
-- log, audited secret reads, secrets that keep their ttl and tags, purge of
-- expired secret versions. (Before section 7, which grants every function.)
ALTER TABLE kms.audit_log ADD COLUMN role text;

CREATE OR REPLACE VIEW kms_audit_log AS
SELECT id, at, actor, operation, key_name, version, reason, pg_catalog.encode(hash, 'hex') AS hash,
       detail, pg_catalog.encode(mac, 'hex') AS mac, role
  FROM kms.audit_log;

-- Now VOLATILE: every read appends an audit row.
ALTER FUNCTION "kms_secret_get"(text, integer) VOLATILE;

-- tags now DEFAULT NULL: a new version keeps the previous version's tags.
CREATE OR REPLACE FUNCTION "kms_secret_set"(
	"name" text,
	"value" text,
	"key_name" text DEFAULT NULL,
	"ttl" interval DEFAULT NULL,
	"tags" jsonb DEFAULT NULL
) RETURNS INT
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'kms_secret_set_wrapper';

CREATE FUNCTION "kms_secret_purge_expired"() RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'kms_secret_purge_expired_wrapper';

-- Helper B "policy" (issue 16 sections 2-4): key policy after creation,
-- versions that retire themselves, emergency rotation, warnings. Placed
-- before section 7 (the privileges block names these objects).
ALTER TABLE kms.keys ADD COLUMN metadata jsonb;
ALTER TABLE kms.keys ADD COLUMN retire_after interval CHECK (retire_after >= interval '0');
ALTER TABLE kms.keys ADD COLUMN destroy_after interval CHECK (destroy_after >= interval '0');
UPDATE kms.keys SET metadata = '{}';
ALTER TABLE kms.keys ALTER COLUMN metadata SET DEFAULT '{}';
ALTER TABLE kms.keys ALTER COLUMN metadata SET NOT NULL;
ALTER TABLE kms.key_versions ADD COLUMN retire_when_unreferenced boolean;
UPDATE kms.key_versions SET retire_when_unreferenced = false;
ALTER TABLE kms.key_versions ALTER COLUMN retire_when_unreferenced SET DEFAULT false;
ALTER TABLE kms.key_versions ALTER COLUMN retire_when_unreferenced SET NOT NULL;

-- kms_rotate_key gained emergency (a new signature: the old one goes).
DROP FUNCTION "kms_rotate_key"(text, text);
CREATE FUNCTION "kms_rotate_key"(
	"key_name" text,
	"reason" text DEFAULT NULL,
	"emergency" bool DEFAULT false
) RETURNS INT
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'kms_rotate_key_wrapper';

CREATE FUNCTION "kms_alter_key"(
	"key_name" text,
	"rotation_period" interval DEFAULT NULL,
	"retire_after" interval DEFAULT NULL,
	"destroy_after" interval DEFAULT NULL,
	"metadata" jsonb DEFAULT NULL,
	"clear" TEXT[] DEFAULT NULL
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'kms_alter_key_wrapper';

CREATE FUNCTION "kms_warnings_list"() RETURNS TABLE (
	"severity" TEXT,
	"kind" TEXT,
	"key_name" TEXT,
	"version" INT,
	"table_name" TEXT,
	"column_name" TEXT,
	"message" TEXT,
	"hint" TEXT
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'kms_warnings_list_wrapper';

CREATE OR REPLACE VIEW kms_keys AS
SELECT k.key_name,
       v.version,
       v.state,
       (v.version = k.primary_version) AS is_primary,
       v.created_at,
       v.state_changed_at,
       k.rotation_period,
       CASE WHEN k.rotation_period IS NOT NULL AND k.destroyed_at IS NULL
            THEN p.created_at + k.rotation_period END AS next_rotation_at,
       k.destroyed_at AS key_destroyed_at,
       k.retire_after,
       k.destroy_after,
       k.metadata
  FROM kms.keys k
  JOIN kms.key_versions v ON v.key_id = k.key_id
  JOIN kms.key_versions p ON p.key_id = k.key_id AND p.version = k.primary_version;

CREATE VIEW kms_warnings AS
SELECT w.severity, w.kind, w.key_name, w.version, w.table_name, w.column_name, w.message, w.hint
  FROM kms_warnings_list() w;
COMMENT ON VIEW kms_warnings IS 'What needs attention now: rotations due within pg_kms.rotation_warning or overdue, rows still sealed under a disabled version, a paused, stalled or backing-off worker, nonce budgets of active versions.';
-- End of helper B's block.

-- helper A (access): the access audit (issue 16): kms.access_log, its
-- head, append-only trigger and view (as sql/access.sql), and its check.
-- Placed before the privileges block so that the block grants them.
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

CREATE FUNCTION "kms_access_log_check"() RETURNS TABLE (
	"ok" bool,
	"rows_checked" bigint,
	"first_bad_id" bigint,
	"problem" TEXT,
	"head_id" bigint,
	"head_mac" TEXT
)
STRICT STABLE PARALLEL RESTRICTED
LANGUAGE c
AS 'MODULE_PATHNAME', 'kms_access_log_check_wrapper';
-- end helper A (access)

-- 7. Privileges of every function and view, as a fresh install of 0.2.0
-- sets them: a verbatim copy of sql/grants.sql's DO block, between the
-- BEGIN and END lines (pgrx_tests/tests/upgrade.rs checks it; after a
-- change to sql/grants.sql, run `bash scripts/sync_upgrade_grants.sh`).
-- BEGIN sql/grants.sql
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
-- END sql/grants.sql
