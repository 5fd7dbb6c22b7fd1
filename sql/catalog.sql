-- pg_kms catalog: schema kms, reachable only through the extension's
-- functions and views (they switch to the catalog owner when they need it),
-- and its key tables. The audit chain is in audit.sql, the secrets table in
-- secrets.sql.

CREATE SCHEMA IF NOT EXISTS kms;
REVOKE ALL ON SCHEMA kms FROM PUBLIC;
COMMENT ON SCHEMA kms IS 'pg_kms keyring: wrapped data keys, master-key fingerprint, audit log. Superuser-only.';

-- One row: a commitment to the master key (HKDF output, never the key).
-- integrity_since: since when key-state rows carry MACs (NULL only in a
-- keyring made before MACs existed, until it adopts them); row_mac: MAC of
-- (fingerprint, integrity_since) under the master key's catalog-row key.
CREATE TABLE kms.keyring (
    singleton              boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    master_key_fingerprint bytea NOT NULL CHECK (pg_catalog.length(master_key_fingerprint) = 32),
    created_at             timestamptz NOT NULL DEFAULT pg_catalog.now(),
    rotated_at             timestamptz,
    integrity_since        timestamptz,
    row_mac                bytea
);

CREATE TABLE kms.keys (
    key_id          integer PRIMARY KEY CHECK (key_id > 0),
    key_name        text NOT NULL UNIQUE CHECK (key_name ~ '^[A-Za-z0-9_.:-]{1,63}$'),
    primary_version integer NOT NULL CHECK (primary_version > 0),
    rotation_period interval CHECK (rotation_period > interval '0'),
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- Random blind-index root of this key name, wrapped under the KEK
    -- (independent of versions; NULL once the key is destroyed).
    index_key       bytea,
    -- Set by kms_destroy_key(): the key refuses every further act.
    destroyed_at    timestamptz,
    -- Id of the audit row of the key's latest change (or of the latest
    -- master-key rotation): a saved row put back is older than the trail.
    generation      bigint NOT NULL DEFAULT 0,
    -- MAC (catalog-row key) of key_id, key_name, primary_version,
    -- destroyed_at, index_key, generation.
    row_mac         bytea,
    -- Key policy (kms_alter_key). Not covered by row_mac, like
    -- rotation_period: they only schedule acts an admin may do anyway, each
    -- audited, and the worker's retire/destroy keep the destroy guard.
    -- metadata: free-form (owner, purpose, tags...), shown in kms_keys.
    metadata        jsonb NOT NULL DEFAULT '{}',
    -- A decrypt_only version this long past state_changed_at that no row
    -- references is disabled by the worker (audited, reason 'policy').
    retire_after    interval CHECK (retire_after >= interval '0'),
    -- A disabled version this long past state_changed_at that no row
    -- references is destroyed by the worker (audited, reason 'policy').
    destroy_after   interval CHECK (destroy_after >= interval '0')
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
    -- MAC (catalog-row key) of key_id, version, state, wrapped_key and the
    -- key's generation.
    row_mac          bytea,
    -- Set by kms_rotate_key(..., emergency => true) on the version it
    -- replaced: the worker disables it as soon as no row references it
    -- (audited, reason 'emergency'), then clears the mark.
    retire_when_unreferenced boolean NOT NULL DEFAULT false,
    PRIMARY KEY (key_id, version),
    CHECK ((state = 'destroyed') = (wrapped_key IS NULL))
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
    -- Failed attempts in a row (reset by a batch that rewraps a row) and,
    -- while backing off after them, when the worker tries the column again.
    failures             integer NOT NULL DEFAULT 0,
    backoff_until        timestamptz,
    -- Rows sealed under a disabled version, which nothing can decrypt or
    -- rewrap until it is enabled again (counted when a pass starts).
    rows_under_disabled  bigint,
    PRIMARY KEY (relid, attname)
);

SELECT pg_catalog.pg_extension_config_dump('kms.keyring', '');
SELECT pg_catalog.pg_extension_config_dump('kms.key_grants', '');
SELECT pg_catalog.pg_extension_config_dump('kms.keys', '');
SELECT pg_catalog.pg_extension_config_dump('kms.key_versions', '');
