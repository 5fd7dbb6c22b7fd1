//! Key lifecycle in SQL: create, rotate, set primary, disable, enable,
//! destroy, master-key rotation; the audit log and `kms_health()`.
//!
//! Every act runs under the catalog owner's identity with a pinned
//! `search_path`, appends a hash-chained audit row, sends
//! `NOTIFY kms_events`, and invalidates every backend's key cache.

use crate::crypto::{Kek, MasterKey};
use crate::errors::{KmsError, KmsResult, OrRaise};
use crate::keyring::{self, Privilege, State, Which};
use crate::types::{RawText, RegRole};
use pgrx::datum::{DatumWithOid, Interval};
use pgrx::pg_sys;
use pgrx::prelude::*;
use serde_json::json;
use zeroize::Zeroizing;

pub(crate) fn spi_exec(q: &str, args: &[DatumWithOid<'_>]) -> KmsResult<()> {
    Spi::connect_mut(|c| c.update(q, None, args).map(|_| ())).map_err(KmsError::spi)
}

pub(crate) fn spi_one<T: FromDatum + IntoDatum>(q: &str, args: &[DatumWithOid<'_>]) -> KmsResult<Option<T>> {
    keyring::spi_first(q, args, true)
}

/// Read-only variant (no transaction id: works on a standby and in
/// parallel workers).
pub(crate) fn spi_read<T: FromDatum + IntoDatum>(q: &str, args: &[DatumWithOid<'_>]) -> KmsResult<Option<T>> {
    keyring::spi_first(q, args, false)
}

/// Runs a lifecycle act as the catalog owner, then invalidates caches.
pub(crate) fn lifecycle<R>(f: impl FnOnce() -> KmsResult<R>) -> R {
    if unsafe { pg_sys::RecoveryInProgress() || pg_sys::XactReadOnly } {
        KmsError::ReadOnly.raise();
    }
    keyring::as_catalog_owner(|cat| {
        let r = f()?;
        keyring::invalidate_all_backends(cat);
        // After commit, wake this database's re-encryption worker at once.
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, crate::shmem::wake_workers_of_this_db);
        Ok(r)
    })
    .or_raise()
}

pub(crate) fn audit(operation: &str, key_name: Option<&str>, version: Option<i32>, reason: Option<RawText>) -> KmsResult<()> {
    spi_exec(
        "SELECT kms.audit_append($1, $2, $3, $4)",
        &[operation.into(), key_name.into(), version.into(), reason.into()],
    )
}

/// The current master key's KEK, committing its fingerprint on first use.
fn kek_for_write() -> KmsResult<Kek> {
    let mk = keyring::load_master_key(Which::Current)?;
    let fp = mk.fingerprint().to_vec();
    spi_exec(
        "INSERT INTO kms.keyring (singleton, master_key_fingerprint) VALUES (true, $1) ON CONFLICT DO NOTHING",
        &[fp.into()],
    )?;
    let stored = keyring::stored_fingerprint(true)?;
    keyring::check_commitment(&mk, stored.as_deref(), Which::Current)?;
    Ok(mk.kek())
}

fn name_arg(key_name: &RawText) -> KmsResult<&str> {
    keyring::validate_key_name(key_name.bytes())
}

fn version_arg(version: i32) -> KmsResult<i32> {
    if version <= 0 {
        return Err(KmsError::BadArgument {
            message: format!("invalid key version {version}"),
            hint: "Key versions are positive integers; see the kms_keys view.",
        });
    }
    Ok(version)
}

struct KeyRow {
    id: i32,
    primary: i32,
}

fn lock_key(name: &str) -> KmsResult<KeyRow> {
    let row = Spi::connect_mut(|c| -> Result<Option<(i32, i32)>, pgrx::spi::Error> {
        let t = c.update(
            "SELECT key_id, primary_version FROM kms.keys WHERE key_name = $1 FOR UPDATE",
            Some(1),
            &[name.into()],
        )?;
        if t.is_empty() {
            return Ok(None);
        }
        let (a, b) = t.first().get_two::<i32, i32>()?;
        Ok(Some((a.unwrap_or(0), b.unwrap_or(0))))
    })
    .map_err(KmsError::spi)?;
    row.map(|(id, primary)| KeyRow { id, primary }).ok_or_else(|| KmsError::UnknownKey(name.into()))
}

fn version_state(key: &KeyRow, name: &str, version: i32) -> KmsResult<State> {
    let s = spi_one::<String>(
        "SELECT state FROM kms.key_versions WHERE key_id = $1 AND version = $2 FOR UPDATE",
        &[key.id.into(), version.into()],
    )?;
    s.map(|s| State::parse(&s)).ok_or_else(|| KmsError::BadArgument {
        message: format!("key \"{name}\" has no version {version}"),
        hint: "See the kms_keys view for existing versions.",
    })
}

fn set_state(key: &KeyRow, version: i32, state: State) -> KmsResult<()> {
    let q = if state == State::Destroyed {
        "UPDATE kms.key_versions SET state = $3, wrapped_key = NULL, state_changed_at = pg_catalog.now()
          WHERE key_id = $1 AND version = $2"
    } else {
        "UPDATE kms.key_versions SET state = $3, state_changed_at = pg_catalog.now()
          WHERE key_id = $1 AND version = $2"
    };
    spi_exec(q, &[key.id.into(), version.into(), state.as_str().into()])
}

/// Inserts a version with a fresh random data key, wrapped under `kek`.
fn add_version(kek: &Kek, key_id: i32, version: i32, state: State) -> KmsResult<()> {
    let mut dk = Zeroizing::new([0u8; 32]);
    keyring::random_bytes(dk.as_mut())?;
    let mut nonce = [0u8; 12];
    keyring::random_bytes(&mut nonce)?;
    let wrapped = kek.wrap(key_id as u32, version as u32, &dk, &nonce);
    spi_exec(
        "INSERT INTO kms.key_versions (key_id, version, state, wrapped_key) VALUES ($1, $2, $3, $4)",
        &[key_id.into(), version.into(), state.as_str().into(), wrapped.into()],
    )
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_create_key(key_name: RawText, rotation_period: default!(Option<Interval>, "NULL")) -> i32 {
    lifecycle(|| create_key(name_arg(&key_name)?, rotation_period))
}

/// The catalog part of `kms_create_key` (caller is the catalog owner).
pub fn create_key(name: &str, rotation_period: Option<Interval>) -> KmsResult<i32> {
    {
        if let Some(p) = rotation_period {
            let positive = spi_one::<bool>("SELECT $1 > interval '0'", &[p.into()])?.unwrap_or(false);
            if !positive {
                return Err(KmsError::BadArgument {
                    message: "rotation_period must be a positive interval".into(),
                    hint: "For example '90 days'; pass NULL for no scheduled rotation.",
                });
            }
        }
        let kek = kek_for_write()?;
        let key_id = loop {
            let mut b = [0u8; 4];
            keyring::random_bytes(&mut b)?;
            let id = (u32::from_be_bytes(b) & 0x7FFF_FFFF) as i32;
            if id == 0 {
                continue;
            }
            let inserted = spi_one::<i32>(
                "INSERT INTO kms.keys (key_id, key_name, primary_version, rotation_period)
                 VALUES ($1, $2, 1, $3) ON CONFLICT DO NOTHING RETURNING key_id",
                &[id.into(), name.into(), rotation_period.into()],
            )?;
            if inserted.is_some() {
                break id;
            }
            let exists = spi_one::<bool>("SELECT true FROM kms.keys WHERE key_name = $1", &[name.into()])?;
            if exists.is_some() {
                return Err(KmsError::KeyExists(name.into()));
            }
            // Otherwise the random id collided: draw again.
        };
        add_version(&kek, key_id, 1, State::Active)?;
        let mut root = Zeroizing::new([0u8; 32]);
        keyring::random_bytes(root.as_mut())?;
        let mut nonce = [0u8; 12];
        keyring::random_bytes(&mut nonce)?;
        spi_exec(
            "UPDATE kms.keys SET index_key = $2 WHERE key_id = $1",
            &[key_id.into(), kek.wrap_index_root(key_id as u32, &root, &nonce).into()],
        )?;
        audit("create_key", Some(name), Some(1), None)?;
        Ok(1)
    }
}

/// Adds a new primary version (the catalog part of `kms_rotate_key`, also
/// used by the worker's scheduled rotation). Caller is the catalog owner.
pub fn rotate_key(name: &str, reason: Option<RawText>) -> KmsResult<i32> {
    let kek = kek_for_write()?;
    let key = lock_key(name)?;
    let new_version = spi_one::<i32>(
        "SELECT max(version) + 1 FROM kms.key_versions WHERE key_id = $1",
        &[key.id.into()],
    )?
    .unwrap_or(1);
    add_version(&kek, key.id, new_version, State::Active)?;
    spi_exec(
        "UPDATE kms.key_versions SET state = 'decrypt_only', state_changed_at = pg_catalog.now()
          WHERE key_id = $1 AND version = $2 AND state = 'active'",
        &[key.id.into(), key.primary.into()],
    )?;
    spi_exec(
        "UPDATE kms.keys SET primary_version = $2 WHERE key_id = $1",
        &[key.id.into(), new_version.into()],
    )?;
    audit("rotate_key", Some(name), Some(new_version), reason)?;
    Ok(new_version)
}

/// Rotates, with reason 'scheduled', every key whose primary version is
/// older than its rotation_period. Returns the names rotated.
pub fn rotate_due_keys() -> Vec<String> {
    let due = keyring::as_catalog_owner(|_| {
        Spi::connect(|c| -> Result<Vec<String>, pgrx::spi::Error> {
            let mut out = Vec::new();
            for r in c.select(
                "SELECT k.key_name FROM kms.keys k
                   JOIN kms.key_versions p ON p.key_id = k.key_id AND p.version = k.primary_version
                  WHERE k.rotation_period IS NOT NULL AND p.created_at + k.rotation_period <= pg_catalog.now()
                  ORDER BY 1",
                None,
                &[],
            )? {
                out.push(r.get::<String>(1)?.unwrap_or_default());
            }
            Ok(out)
        })
        .map_err(KmsError::spi)
    })
    .or_raise();
    if due.is_empty() {
        return due;
    }
    lifecycle(|| {
        for name in &due {
            rotate_key(name, Some(RawText::from_ascii("scheduled")))?;
        }
        Ok(())
    });
    due
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_rotate_key(key_name: RawText, reason: default!(Option<RawText>, "NULL")) -> i32 {
    lifecycle(|| rotate_key(name_arg(&key_name)?, reason))
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_set_primary(key_name: RawText, version: i32) {
    lifecycle(|| {
        let name = name_arg(&key_name)?;
        let version = version_arg(version)?;
        let key = lock_key(name)?;
        let state = version_state(&key, name, version)?;
        if version == key.primary {
            return Ok(());
        }
        if matches!(state, State::Disabled | State::Destroyed) {
            return Err(KmsError::VersionState {
                key: name.into(),
                version,
                state: state.as_str().into(),
                action: "make it primary",
            });
        }
        set_state(&key, key.primary, State::DecryptOnly)?;
        set_state(&key, version, State::Active)?;
        spi_exec("UPDATE kms.keys SET primary_version = $2 WHERE key_id = $1", &[key.id.into(), version.into()])?;
        audit("set_primary", Some(name), Some(version), None)
    })
}

/// Locks a version that may be disabled or destroyed: it exists, is not the
/// primary, and is not destroyed already.
fn lock_retirable<'a>(key_name: &'a RawText, version: i32, verb: &'static str, again: &'static str) -> KmsResult<(&'a str, KeyRow, i32)> {
    let name = name_arg(key_name)?;
    let version = version_arg(version)?;
    let key = lock_key(name)?;
    let state = version_state(&key, name, version)?;
    if version == key.primary {
        return Err(KmsError::PrimaryVersion { key: name.into(), version, action: verb });
    }
    if state == State::Destroyed {
        return Err(KmsError::VersionState { key: name.into(), version, state: "destroyed".into(), action: again });
    }
    Ok((name, key, version))
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_disable_key_version(key_name: RawText, version: i32, reason: default!(Option<RawText>, "NULL")) {
    lifecycle(|| {
        let (name, key, version) = lock_retirable(&key_name, version, "disable", "disable it")?;
        set_state(&key, version, State::Disabled)?;
        audit("disable_key_version", Some(name), Some(version), reason)
    })
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_enable_key_version(key_name: RawText, version: i32) {
    lifecycle(|| {
        let name = name_arg(&key_name)?;
        let version = version_arg(version)?;
        let key = lock_key(name)?;
        match version_state(&key, name, version)? {
            State::Destroyed => Err(KmsError::VersionState {
                key: name.into(),
                version,
                state: "destroyed".into(),
                action: "enable it",
            }),
            State::Disabled => {
                set_state(&key, version, State::DecryptOnly)?;
                audit("enable_key_version", Some(name), Some(version), None)
            }
            // Already usable: nothing to do, nothing to audit.
            State::Active | State::DecryptOnly => Ok(()),
        }
    })
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_destroy_key_version(
    key_name: RawText,
    version: i32,
    reason: default!(Option<RawText>, "NULL"),
    force: default!(bool, false),
) {
    // The guard counts only what the caller may read, each table scanned as
    // its owner (never as the catalog owner).
    let caller = keyring::current_user();
    lifecycle(|| {
        let (name, key, version) = lock_retirable(&key_name, version, "destroy", "destroy it again")?;
        if !force {
            let (counts, skipped) = crate::reencrypt::usage_by_version(key.id, caller)?;
            let rows = counts.get(&version).copied().unwrap_or(0);
            if rows > 0 {
                return Err(KmsError::StillReferenced { key: name.into(), version, rows });
            }
            if !skipped.is_empty() {
                return Err(KmsError::UsageUnverifiable {
                    key: name.into(),
                    version,
                    detail: crate::reencrypt::skipped_notice(&skipped),
                });
            }
        }
        set_state(&key, version, State::Destroyed)?;
        audit("destroy_key_version", Some(name), Some(version), reason)
    })
}

/// Destroys every version of a key at once (erasing a tenant): all its
/// values become undecryptable (55000), its blind index unusable. Audited.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_destroy_key(key_name: RawText, reason: default!(Option<RawText>, "NULL")) {
    lifecycle(|| {
        let name = name_arg(&key_name)?;
        let key = lock_key(name)?;
        spi_exec(
            "UPDATE kms.key_versions SET state = 'destroyed', wrapped_key = NULL, state_changed_at = pg_catalog.now()
              WHERE key_id = $1 AND state <> 'destroyed'",
            &[key.id.into()],
        )?;
        spi_exec("UPDATE kms.keys SET index_key = NULL WHERE key_id = $1", &[key.id.into()])?;
        audit("destroy_key", Some(name), None, reason)
    })
}

fn grant_args<'a>(key_name: &'a RawText, grantee: &RegRole, privilege: &RawText) -> KmsResult<(&'a str, String, Privilege)> {
    let name = name_arg(key_name)?;
    let privilege = String::from_utf8_lossy(privilege.bytes());
    let p = Privilege::parse(&privilege).ok_or_else(|| KmsError::BadArgument {
        message: format!("unknown key privilege \"{}\"", privilege.escape_default()),
        hint: "Key privileges are 'encrypt' and 'decrypt'.",
    })?;
    let role = spi_read::<String>("SELECT rolname::text FROM pg_catalog.pg_roles WHERE oid = $1", &[grantee.0.into()])?
        .ok_or_else(|| KmsError::BadArgument { message: "role does not exist".into(), hint: "Pass an existing role." })?;
    Ok((name, role, p))
}

/// Grants `privilege` ('encrypt' or 'decrypt') on a key. A key with no
/// grants is usable by every kms_user; once it has grants, only grantees
/// (and members of them) may use it for that privilege.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_grant_key(key_name: RawText, grantee: RegRole, privilege: RawText) {
    change_grant(&key_name, &grantee, &privilege, true)
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_revoke_key(key_name: RawText, grantee: RegRole, privilege: RawText) {
    change_grant(&key_name, &grantee, &privilege, false)
}

/// This cluster's identity (pg_control_system().system_identifier), stored
/// with each grant's role oid.
const CLUSTER_ID_SQL: &str = "(SELECT c.system_identifier FROM pg_catalog.pg_control_system() c)";

fn change_grant(key_name: &RawText, grantee: &RegRole, privilege: &RawText, grant: bool) {
    lifecycle(|| {
        let (name, role, p) = grant_args(key_name, grantee, privilege)?;
        let key = lock_key(name)?;
        if grant {
            // By name and oid: granting again to a new role of the same
            // name (or after a restore) binds the grant to that role.
            spi_exec(
                &format!(
                    "INSERT INTO kms.key_grants AS g (key_id, grantee, grantee_oid, cluster_id, privilege)
                     VALUES ($1, $2, $3, {CLUSTER_ID_SQL}, $4)
                     ON CONFLICT (key_id, grantee, privilege) DO UPDATE
                        SET grantee_oid = excluded.grantee_oid, cluster_id = excluded.cluster_id, granted_at = excluded.granted_at
                      WHERE (g.grantee_oid, g.cluster_id) IS DISTINCT FROM (excluded.grantee_oid, excluded.cluster_id)"
                ),
                &[key.id.into(), role.as_str().into(), grantee.0.into(), p.as_str().into()],
            )?;
        } else {
            // By name: also removes a stale grant left by a dropped role of
            // that name.
            spi_exec(
                "DELETE FROM kms.key_grants WHERE key_id = $1 AND grantee = $2 AND privilege = $3",
                &[key.id.into(), role.as_str().into(), p.as_str().into()],
            )?;
        }
        let (op, word) = if grant { ("grant_key", "to") } else { ("revoke_key", "from") };
        // The role as regrole prints it (quoted if needed), never its oid.
        spi_exec(
            "SELECT kms.audit_append($1, $2, NULL, $3 || ' role ' || $4::pg_catalog.regrole::pg_catalog.text)",
            &[op.into(), name.into(), format!("{} {word}", p.as_str()).into(), grantee.0.into()],
        )
    })
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
    lifecycle(|| {
        let rebound = Spi::connect_mut(|c| -> Result<Vec<(String, String, String)>, pgrx::spi::Error> {
            let t = c.update(
                &format!(
                    "UPDATE kms.key_grants g SET grantee_oid = r.oid, cluster_id = {CLUSTER_ID_SQL}
                       FROM pg_catalog.pg_roles r, kms.keys k
                      WHERE r.rolname::pg_catalog.text = g.grantee AND k.key_id = g.key_id
                        AND g.cluster_id <> {CLUSTER_ID_SQL}
                  RETURNING k.key_name, g.privilege, r.oid::pg_catalog.regrole::pg_catalog.text"
                ),
                None,
                &[],
            )?;
            let mut out = Vec::new();
            for r in t {
                out.push((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?.unwrap_or_default(),
                    r.get::<String>(3)?.unwrap_or_default(),
                ));
            }
            Ok(out)
        })
        .map_err(KmsError::spi)?;
        let mut sorted = rebound;
        sorted.sort();
        for (key, privilege, role) in &sorted {
            spi_exec(
                "SELECT kms.audit_append('rebind_key_grant', $1, NULL, $2)",
                &[key.as_str().into(), format!("{privilege} to role {role} (restored from another cluster, bound by name)").into()],
            )?;
        }
        Ok(sorted.len() as i64)
    })
}

/// Re-wraps every data key under the master key configured now, reading
/// the old one from `pg_kms.previous_master_key_*`. Returns the number of
/// versions re-wrapped (0 if the keyring already uses the current key).
#[pg_extern(volatile, parallel_unsafe)]
fn kms_rotate_master_key() -> i64 {
    lifecycle(|| {
        let new = keyring::load_master_key(Which::Current)?;
        let stored = keyring::stored_fingerprint(true)?;
        let Some(stored) = stored else {
            // Nothing was ever wrapped: just commit to the new key.
            kek_for_write()?;
            audit("rotate_master_key", None, None, Some(RawText::from_ascii("0 versions re-wrapped")))?;
            return Ok(0);
        };
        if stored == new.fingerprint() {
            return Ok(0);
        }
        let old: MasterKey = keyring::load_master_key(Which::Previous)?;
        keyring::check_commitment(&old, Some(&stored), Which::Previous)?;
        let (old_kek, new_kek) = (old.kek(), new.kek());
        let rows = Spi::connect_mut(|c| -> Result<Vec<(i32, i32, String, Vec<u8>)>, pgrx::spi::Error> {
            let t = c.update(
                "SELECT v.key_id, v.version, k.key_name, v.wrapped_key
                   FROM kms.key_versions v JOIN kms.keys k ON k.key_id = v.key_id
                  WHERE v.wrapped_key IS NOT NULL ORDER BY 1, 2 FOR UPDATE OF v",
                None,
                &[],
            )?;
            let mut out = Vec::new();
            for r in t {
                out.push((
                    r.get::<i32>(1)?.unwrap_or(0),
                    r.get::<i32>(2)?.unwrap_or(0),
                    r.get::<String>(3)?.unwrap_or_default(),
                    r.get::<Vec<u8>>(4)?.unwrap_or_default(),
                ));
            }
            Ok(out)
        })
        .map_err(KmsError::spi)?;
        for (key_id, version, name, wrapped) in &rows {
            let dk = old_kek
                .unwrap_raw(*key_id as u32, *version as u32, wrapped)
                .map_err(|_| KmsError::CatalogCorrupt { key: name.clone(), version: *version })?;
            let mut nonce = [0u8; 12];
            keyring::random_bytes(&mut nonce)?;
            let rewrapped = new_kek.wrap(*key_id as u32, *version as u32, &dk, &nonce);
            spi_exec(
                "UPDATE kms.key_versions SET wrapped_key = $3 WHERE key_id = $1 AND version = $2",
                &[(*key_id).into(), (*version).into(), rewrapped.into()],
            )?;
        }
        let roots = Spi::connect(|c| -> Result<Vec<(i32, String, Vec<u8>)>, pgrx::spi::Error> {
            let mut out = Vec::new();
            for r in c.select("SELECT key_id, key_name, index_key FROM kms.keys WHERE index_key IS NOT NULL", None, &[])? {
                out.push((r.get::<i32>(1)?.unwrap_or(0), r.get::<String>(2)?.unwrap_or_default(), r.get::<Vec<u8>>(3)?.unwrap_or_default()));
            }
            Ok(out)
        })
        .map_err(KmsError::spi)?;
        for (key_id, name, wrapped) in &roots {
            let root = old_kek
                .unwrap_index_root(*key_id as u32, wrapped)
                .map_err(|_| KmsError::CatalogCorrupt { key: name.clone(), version: 0 })?;
            let mut nonce = [0u8; 12];
            keyring::random_bytes(&mut nonce)?;
            spi_exec(
                "UPDATE kms.keys SET index_key = $2 WHERE key_id = $1",
                &[(*key_id).into(), new_kek.wrap_index_root(*key_id as u32, &root, &nonce).into()],
            )?;
        }
        spi_exec(
            "UPDATE kms.keyring SET master_key_fingerprint = $1, rotated_at = pg_catalog.now()",
            &[new.fingerprint().to_vec().into()],
        )?;
        let n = rows.len() as i64;
        audit("rotate_master_key", None, None, Some(RawText::from_ascii(&format!("{n} versions re-wrapped"))))?;
        Ok(n)
    })
}

#[pg_extern(stable, parallel_safe)]
fn kms_verify_audit_log() -> bool {
    keyring::as_catalog_owner(|_| Ok(spi_read::<bool>("SELECT kms.audit_verify()", &[])?.unwrap_or(false))).or_raise()
}

/// Whether this database's re-encryption worker runs, and if not, why.
fn worker_status() -> KmsResult<serde_json::Value> {
    let pid = spi_read::<i32>(
        "SELECT pid FROM pg_catalog.pg_stat_activity
          WHERE backend_type = 'pg_kms worker' AND datid = (SELECT oid FROM pg_catalog.pg_database
                                                           WHERE datname = pg_catalog.current_database())",
        &[],
    )?;
    let reason = if pid.is_some() {
        None
    } else if !keyring::preloaded() {
        Some("pg_kms is not in shared_preload_libraries: no background re-encryption or scheduled rotation (use kms_reencrypt_now())")
    } else if unsafe { pg_sys::RecoveryInProgress() } {
        Some("this server is a standby: the worker starts after promotion")
    } else if !crate::guc::REENCRYPT_ENABLED.get() {
        Some("pg_kms.reencrypt_enabled is off")
    } else {
        Some("the worker for this database has not started yet (it is started within pg_kms.reencrypt_naptime), or max_worker_processes is exhausted")
    };
    Ok(json!({ "running": pid.is_some(), "pid": pid, "reason": reason }))
}

/// Key versions whose encryptions since start reached the warning level.
fn nonce_warnings() -> KmsResult<serde_json::Value> {
    let threshold = crate::guc::NONCE_WARNING_ENCRYPTIONS.get() as u64;
    let mut out = Vec::new();
    for (key_id, version, enc, _) in crate::shmem::stats_of_this_db() {
        if enc >= threshold {
            let name = spi_read::<String>("SELECT key_name FROM kms.keys WHERE key_id = $1", &[(key_id as i32).into()])?;
            out.push(json!({ "key_name": name, "version": version, "encryptions": enc,
                             "message": "rotate this key: AES-GCM random nonces allow at most 2^32 encryptions per key" }));
        }
    }
    Ok(serde_json::Value::Array(out))
}

/// Configuration and keyring health, without any key material.
#[pg_extern(volatile, parallel_safe)]
fn kms_health() -> pgrx::JsonB {
    let report = keyring::as_catalog_owner(|_| {
        let stored = keyring::stored_fingerprint(false)?;
        let source = keyring::describe_source(Which::Current);
        // Reuses this backend's validated key while the source is unchanged
        // (no key command run per call).
        let (valid, matches, error) = match keyring::validate_current_master_key(stored.as_deref()) {
            Ok(()) => (true, stored.is_some().then_some(true), None),
            Err(e @ KmsError::MasterKeyMismatch { .. }) => (true, Some(false), Some(e.message())),
            Err(e) => (false, None, Some(e.message())),
        };
        let counts = spi_read::<pgrx::JsonB>(
            "SELECT jsonb_build_object(
                'keys', (SELECT count(*) FROM kms.keys),
                'versions', jsonb_build_object(
                    'active', count(*) FILTER (WHERE state = 'active'),
                    'decrypt_only', count(*) FILTER (WHERE state = 'decrypt_only'),
                    'disabled', count(*) FILTER (WHERE state = 'disabled'),
                    'destroyed', count(*) FILTER (WHERE state = 'destroyed')),
                'overdue_rotation', coalesce((
                    SELECT jsonb_agg(k.key_name ORDER BY k.key_name)
                      FROM kms.keys k JOIN kms.key_versions p
                        ON p.key_id = k.key_id AND p.version = k.primary_version
                     WHERE k.rotation_period IS NOT NULL
                       AND p.created_at + k.rotation_period < pg_catalog.now()), '[]'::jsonb))
               FROM kms.key_versions",
            &[],
        )?
        .map(|j| j.0)
        .unwrap_or_default();
        let mut v = json!({
            "master_key": {
                "configured": source.is_some(),
                "source": source.map(|(s, _)| s),
                "valid": valid,
                "matches_keyring": matches,
                "keyring_initialized": stored.is_some(),
                "error": error,
            },
            "preloaded": keyring::preloaded(),
            "worker": worker_status()?,
            "nonce_warnings": nonce_warnings()?,
        });
        if let (Some(obj), serde_json::Value::Object(c)) = (v.as_object_mut(), counts) {
            obj.extend(c);
        }
        Ok(v)
    })
    .or_raise();
    pgrx::JsonB(report)
}
