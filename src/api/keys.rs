//! Key management in SQL: create, rotate, set the primary version,
//! disable, enable and destroy versions and keys, per-key grants, and
//! master-key rotation (`kms_admin`). The acts themselves are in
//! `crate::lifecycle`.

use crate::pg::datum::{RawText, RegRole};
use pgrx::datum::Interval;
use pgrx::prelude::*;

#[pg_extern(volatile, parallel_unsafe)]
fn kms_create_key(key_name: RawText, rotation_period: default!(Option<Interval>, "NULL")) -> i32 {
    crate::lifecycle::create_key_sql(key_name, rotation_period)
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_rotate_key(key_name: RawText, reason: default!(Option<RawText>, "NULL")) -> i32 {
    crate::lifecycle::rotate_key_sql(key_name, reason)
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_set_primary(key_name: RawText, version: i32) {
    crate::lifecycle::set_primary(key_name, version)
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_disable_key_version(
    key_name: RawText,
    version: i32,
    reason: default!(Option<RawText>, "NULL"),
) {
    crate::lifecycle::disable_key_version(key_name, version, reason)
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_enable_key_version(key_name: RawText, version: i32) {
    crate::lifecycle::enable_key_version(key_name, version)
}

/// Erases the wrapped material of a version (see the README, "Crypto-shredding
/// and backups"). Its destruction receipt is the audit row's `detail`
/// (view kms_destruction_receipts).
#[pg_extern(volatile, parallel_unsafe)]
fn kms_destroy_key_version(
    key_name: RawText,
    version: i32,
    reason: default!(Option<RawText>, "NULL"),
    force: default!(bool, false),
) {
    crate::lifecycle::destroy_key_version(key_name, version, reason, force)
}

/// Destroys every version of a key at once (erasing a tenant): all its
/// values become undecryptable (55000), its blind index unusable, and the
/// key refuses every further act. Audited, with its destruction receipt.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_destroy_key(key_name: RawText, reason: default!(Option<RawText>, "NULL")) {
    crate::lifecycle::destroy_key(key_name, reason)
}

/// Grants `privilege` ('encrypt' or 'decrypt') on a key. A key with no
/// grants is usable by every kms_user; once it has grants, only grantees
/// (and members of them) may use it for that privilege.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_grant_key(key_name: RawText, grantee: RegRole, privilege: RawText) {
    crate::lifecycle::grant_key(key_name, grantee, privilege)
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_revoke_key(key_name: RawText, grantee: RegRole, privilege: RawText) {
    crate::lifecycle::revoke_key(key_name, grantee, privilege)
}

/// After a dump of another cluster was restored here: binds each grant
/// that came from that cluster to the role of the same name in this one
/// (grants whose name has no role here stay unbound). One audit row per
/// grant bound (operation `rebind_key_grant`). Grants made in this cluster
/// are never rebound, so a role dropped and recreated under the same name
/// does not get its predecessor's grants; grant them again instead.
/// Returns the number of grants bound.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_rebind_key_grants() -> i64 {
    crate::lifecycle::rebind_key_grants()
}

/// Re-wraps every data key under the master key configured now, reading
/// the old one from `pg_kms.previous_master_key_*`. Returns the number of
/// versions re-wrapped (0 if the keyring already uses the current key).
///
/// The key-state rows are first checked under the old key (so that a row
/// edited behind pg_kms's back is refused, not blessed), then re-MAC'd
/// under the new one; the rotation's audit row is the first row MAC'd
/// under the new key, and its hash commits to every earlier row.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_rotate_master_key() -> i64 {
    crate::lifecycle::rotate_master_key()
}
