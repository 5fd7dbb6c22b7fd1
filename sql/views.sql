-- pg_kms views (in the extension's schema). They run with the owner's rights
-- and expose no key material; who may read them is declared in grants.sql.

CREATE VIEW kms_keys AS
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

CREATE VIEW kms_audit_log AS
SELECT id, at, actor, operation, key_name, version, reason, pg_catalog.encode(hash, 'hex') AS hash,
       detail, pg_catalog.encode(mac, 'hex') AS mac, role
  FROM kms.audit_log;

-- Destruction receipts (kms_destroy_key_version, kms_destroy_key): key,
-- version(s), time, and the MAC of the erased material under a key derived
-- from the master key. Each is the detail of its row in the keyed chain.
CREATE VIEW kms_destruction_receipts AS
SELECT id AS audit_id, at, actor, key_name, version, reason, detail::jsonb AS receipt
  FROM kms.audit_log
 WHERE operation IN ('destroy_key_version', 'destroy_key');

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

CREATE VIEW kms_reencryption_progress AS
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
COMMENT ON VIEW kms_reencryption_progress IS 'rows_pending is exact when a pass starts (a full count) and decremented as batches commit; rows_needing_context were sealed with a context that no protected-column policy of the column gives, which only the application can supply (UPDATE ... SET col = kms_rewrap(col, ctx)); a column protected with its context is rewrapped with each row''s context and counts none. failures counts failed attempts in a row; while backoff_until is in the future the worker leaves the column alone (it doubles each time, up to an hour). rows_under_disabled were sealed under a disabled version: nothing can read or rewrap them until it is enabled again.';

-- Over a function generated from Rust (kms_stats_counters): src/lib.rs
-- orders views.sql after it.
CREATE VIEW kms_stats AS
SELECT k.key_name, s.version, s.encryptions, s.decryptions,
       pg_catalog.round(s.encryptions::numeric / 4294967296, 6) AS nonce_budget_used
  FROM kms_stats_counters() s
  JOIN kms.keys k ON k.key_id = s.key_id;
COMMENT ON VIEW kms_stats IS 'Encryptions and decryptions per key version since server start (shared memory; empty unless pg_kms is in shared_preload_libraries). nonce_budget_used is encryptions / 2^32.';

-- Over a function generated from Rust (kms_warnings_list): src/lib.rs
-- orders views.sql after it. The same list is kms_health()->'warnings'.
CREATE VIEW kms_warnings AS
SELECT w.severity, w.kind, w.key_name, w.version, w.table_name, w.column_name, w.message, w.hint
  FROM kms_warnings_list() w;
COMMENT ON VIEW kms_warnings IS 'What needs attention now: rotations due within pg_kms.rotation_warning or overdue, rows still sealed under a disabled version, a paused, stalled or backing-off worker, nonce budgets of active versions.';
