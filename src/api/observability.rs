//! What auditors and operators read: the audit log checks, the health
//! report and the usage counters.

use pgrx::prelude::*;

#[pg_extern(stable, parallel_restricted)]
fn kms_verify_audit_log() -> bool {
    crate::lifecycle::verify_audit_log()
}

/// The whole audit chain checked under the master key configured now:
/// `ok`, the number of rows, the first row that fails and why, and the
/// chain's head (compare it with the last "pg_kms: audit chain head" line
/// of the server log).
#[pg_extern(stable, parallel_restricted)]
fn kms_audit_log_check() -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(rows_checked, i64),
        name!(first_bad_id, Option<i64>),
        name!(problem, Option<String>),
        name!(head_id, Option<i64>),
        name!(head_mac, Option<String>),
    ),
> {
    crate::lifecycle::audit_log_check()
}

/// Configuration and keyring health, without any key material.
#[pg_extern(volatile, parallel_safe)]
fn kms_health() -> pgrx::JsonB {
    crate::lifecycle::health()
}

// kms_audit_log_check() is for the same roles as kms_verify_audit_log()
// (grants.sql then revokes PUBLIC's EXECUTE on every function).
extension_sql!(
    "GRANT EXECUTE ON FUNCTION kms_audit_log_check() TO kms_admin, kms_auditor;",
    name = "audit_log_check_grant",
    requires = [kms_audit_log_check]
);

/// Encryptions and decryptions per key version of this database since
/// server start (shared memory; empty without shared_preload_libraries).
/// Counters only; read through the `kms_stats` view.
#[pg_extern(volatile, parallel_restricted)]
fn kms_stats_counters() -> TableIterator<
    'static,
    (
        name!(key_id, i32),
        name!(version, i32),
        name!(encryptions, i64),
        name!(decryptions, i64),
    ),
> {
    crate::reencrypt::stats_counters()
}
