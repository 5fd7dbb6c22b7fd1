//! Key lifecycle in SQL: create, rotate, set primary, disable, enable,
//! destroy, master-key rotation; the audit log and `kms_health()`.
//!
//! Every act runs under the catalog owner's identity with a pinned
//! `search_path`, checks the MACs of the key-state rows it reads, appends
//! a keyed, chained audit row (see "Catalog and audit integrity" at the end
//! of this file), re-MACs the rows it changed, sends `NOTIFY kms_events`,
//! and invalidates every backend's key cache.

use crate::catalog;
use crate::crypto::integrity;
use crate::crypto::{Kek, MasterKey};
use crate::errors::{KmsError, KmsResult, OrRaise};
use crate::keys::audit::{append, audit, begin_act, check_audit_log, Act};
use crate::keys::integrity::*;
use crate::keys::{self, Privilege, State, Which};
use crate::pg::datum::{RawText, RegRole};
use crate::pg::spi;
use pgrx::datum::Interval;
use pgrx::pg_sys;
use pgrx::prelude::*;
use serde_json::json;
use zeroize::Zeroizing;

/// Runs a lifecycle act as the catalog owner, then invalidates caches.
pub(crate) fn lifecycle<R>(f: impl FnOnce() -> KmsResult<R>) -> R {
    // SAFETY: RecoveryInProgress reads shared memory under its own spinlock
    // (any backend may call it) and XactReadOnly is a plain read of a
    // backend global, in the backend's only thread.
    if unsafe { pg_sys::RecoveryInProgress() || pg_sys::XactReadOnly } {
        KmsError::ReadOnly.raise();
    }
    catalog::as_catalog_owner(|cat| {
        guard_catalog()?;
        let r = f()?;
        catalog::invalidate_all_backends(cat);
        // After commit, wake this database's re-encryption worker at once.
        pgrx::register_xact_callback(
            pgrx::PgXactCallbackEvent::Commit,
            crate::pg::shmem::wake_workers_of_this_db,
        );
        Ok(r)
    })
    .or_raise()
}

/// Before any check of an act: no other transaction may change the
/// key-state rows until this one ends (a row inserted or edited by a
/// concurrent, uncommitted transaction would otherwise be re-MAC'd by the
/// act as genuine once it commits), and no trigger or rule on `kms.*` may
/// run inside the act (it could change rows between the check and the
/// re-MAC). Loads (AccessShare) are not blocked; acts run one at a time.
fn guard_catalog() -> KmsResult<()> {
    spi::exec("LOCK TABLE kms.keyring, kms.keys, kms.key_versions, kms.key_grants IN SHARE ROW EXCLUSIVE MODE", &[])?;
    let foreign = spi::one::<String>(
        "SELECT x FROM (
             SELECT t.tgrelid::pg_catalog.regclass::pg_catalog.text || ' trigger ' || t.tgname AS x
               FROM pg_catalog.pg_trigger t
               JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'kms' AND NOT t.tgisinternal
                AND NOT (c.relname = 'audit_log' AND t.tgname IN ('audit_log_no_update_delete', 'audit_log_no_truncate'))
             UNION ALL
             SELECT r.ev_class::pg_catalog.regclass::pg_catalog.text || ' rule ' || r.rulename
               FROM pg_catalog.pg_rewrite r
               JOIN pg_catalog.pg_class c ON c.oid = r.ev_class
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'kms' AND r.rulename <> '_RETURN') f
          LIMIT 1",
        &[],
    )?;
    match foreign {
        Some(what) => Err(altered(what, "pg_kms did not create it; lifecycle acts refuse to run while kms.* has triggers or rules of others.")),
        None => Ok(()),
    }
}

/// Appends the audit row of a change to key `key_id`, then re-MACs the
/// key's rows under the new generation (that row's id). Returns the id.
fn record(
    act: &Act,
    operation: &str,
    key: &KeyRow,
    version: Option<i32>,
    reason: Option<RawText>,
    detail: Option<&str>,
) -> KmsResult<i64> {
    let id = append(
        &act.keys,
        &act.fp,
        operation,
        Some(&key.name),
        version,
        reason,
        detail,
    )?;
    reseal_key(&act.keys, key.id, id)?;
    Ok(id)
}

fn name_arg(key_name: &RawText) -> KmsResult<&str> {
    crate::crypto::names::key_name(key_name.bytes()).map_err(KmsError::from)
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
    name: String,
    primary: i32,
    destroyed: bool,
}

/// Locks a key's row and its versions' rows and checks their MACs (XX001
/// if a row was altered behind pg_kms's back).
fn lock_key(name: &str) -> KmsResult<KeyRow> {
    let rows = Spi::connect_mut(
        |c| -> Result<Option<(KeyRowData, Vec<VersionRowData>)>, pgrx::spi::Error> {
            let Some(r) = c
                .update(
                    &format!("{KEY_ROW_SQL} WHERE key_name = $1 FOR UPDATE"),
                    Some(1),
                    &[name.into()],
                )?
                .next()
            else {
                return Ok(None);
            };
            let key = KeyRowData::read(&r)?;
            let mut versions = Vec::new();
            for r in c.update(
                &format!("{VERSION_ROW_SQL} WHERE key_id = $1 ORDER BY version FOR UPDATE"),
                None,
                &[key.key_id.into()],
            )? {
                versions.push(VersionRowData::read(&r)?);
            }
            Ok(Some((key, versions)))
        },
    )
    .map_err(KmsError::spi)?;
    let (key, versions) = rows.ok_or_else(|| KmsError::UnknownKey(name.into()))?;
    let vs: Vec<VersionCheck<'_>> = versions.iter().map(VersionRowData::check).collect();
    verify_key_rows(&key.check(), &vs)?;
    Ok(KeyRow {
        id: key.key_id,
        name: key.name,
        primary: key.primary,
        destroyed: key.destroyed_us.is_some(),
    })
}

fn refuse_destroyed(key: &KeyRow, action: &'static str) -> KmsResult<()> {
    if key.destroyed {
        return Err(KmsError::KeyDestroyed {
            key: key.name.clone(),
            action,
        });
    }
    Ok(())
}

fn version_state(key: &KeyRow, name: &str, version: i32) -> KmsResult<State> {
    let s = spi::one::<String>(
        "SELECT state FROM kms.key_versions WHERE key_id = $1 AND version = $2 FOR UPDATE",
        &[key.id.into(), version.into()],
    )?;
    s.map(|s| State::parse(&s))
        .ok_or_else(|| KmsError::BadArgument {
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
    spi::exec(q, &[key.id.into(), version.into(), state.as_str().into()])
}

/// Inserts a version with a fresh random data key, wrapped under `kek`.
fn add_version(kek: &Kek, key_id: i32, version: i32, state: State) -> KmsResult<()> {
    let mut dk = Zeroizing::new([0u8; 32]);
    keys::random_bytes(dk.as_mut())?;
    let mut nonce = [0u8; 12];
    keys::random_bytes(&mut nonce)?;
    let wrapped = kek.wrap(key_id as u32, version as u32, &dk, &nonce);
    spi::exec(
        "INSERT INTO kms.key_versions (key_id, version, state, wrapped_key) VALUES ($1, $2, $3, $4)",
        &[key_id.into(), version.into(), state.as_str().into(), wrapped.into()],
    )
}

/// The body of SQL `kms_create_key()`.
pub fn create_key_sql(key_name: RawText, rotation_period: Option<Interval>) -> i32 {
    lifecycle(|| create_key(name_arg(&key_name)?, rotation_period))
}

/// The catalog part of `kms_create_key` (caller is the catalog owner).
pub fn create_key(name: &str, rotation_period: Option<Interval>) -> KmsResult<i32> {
    {
        if let Some(p) = rotation_period {
            let positive =
                spi::one::<bool>("SELECT $1 > interval '0'", &[p.into()])?.unwrap_or(false);
            if !positive {
                return Err(KmsError::BadArgument {
                    message: "rotation_period must be a positive interval".into(),
                    hint: "For example '90 days'; pass NULL for no scheduled rotation.",
                });
            }
        }
        let act = begin_act()?;
        let kek = &act.kek;
        let key_id = loop {
            let mut b = [0u8; 4];
            keys::random_bytes(&mut b)?;
            let id = (u32::from_be_bytes(b) & 0x7FFF_FFFF) as i32;
            if id == 0 {
                continue;
            }
            let inserted = spi::one::<i32>(
                "INSERT INTO kms.keys (key_id, key_name, primary_version, rotation_period)
                 VALUES ($1, $2, 1, $3) ON CONFLICT DO NOTHING RETURNING key_id",
                &[id.into(), name.into(), rotation_period.into()],
            )?;
            if inserted.is_some() {
                break id;
            }
            let exists = spi::one::<bool>(
                "SELECT true FROM kms.keys WHERE key_name = $1",
                &[name.into()],
            )?;
            if exists.is_some() {
                return Err(KmsError::KeyExists(name.into()));
            }
            // Otherwise the random id collided: draw again.
        };
        add_version(kek, key_id, 1, State::Active)?;
        let mut root = Zeroizing::new([0u8; 32]);
        keys::random_bytes(root.as_mut())?;
        let mut nonce = [0u8; 12];
        keys::random_bytes(&mut nonce)?;
        spi::exec(
            "UPDATE kms.keys SET index_key = $2 WHERE key_id = $1",
            &[
                key_id.into(),
                kek.wrap_index_root(key_id as u32, &root, &nonce).into(),
            ],
        )?;
        let key = KeyRow {
            id: key_id,
            name: name.into(),
            primary: 1,
            destroyed: false,
        };
        record(&act, "create_key", &key, Some(1), None, None)?;
        Ok(1)
    }
}

/// Adds a new primary version (the catalog part of `kms_rotate_key`, also
/// used by the worker's scheduled rotation). Caller is the catalog owner.
pub fn rotate_key(name: &str, reason: Option<RawText>) -> KmsResult<i32> {
    let act = begin_act()?;
    let key = lock_key(name)?;
    refuse_destroyed(&key, "rotate it")?;
    let new_version = spi::one::<i32>(
        "SELECT max(version) + 1 FROM kms.key_versions WHERE key_id = $1",
        &[key.id.into()],
    )?
    .unwrap_or(1);
    add_version(&act.kek, key.id, new_version, State::Active)?;
    spi::exec(
        "UPDATE kms.key_versions SET state = 'decrypt_only', state_changed_at = pg_catalog.now()
          WHERE key_id = $1 AND version = $2 AND state = 'active'",
        &[key.id.into(), key.primary.into()],
    )?;
    spi::exec(
        "UPDATE kms.keys SET primary_version = $2 WHERE key_id = $1",
        &[key.id.into(), new_version.into()],
    )?;
    record(&act, "rotate_key", &key, Some(new_version), reason, None)?;
    Ok(new_version)
}

/// Rotates, with reason 'scheduled', every key whose primary version is
/// older than its rotation_period (never a destroyed key). Returns the
/// names rotated. A keyring made before rows carried MACs adopts them here
/// (the worker calls this every naptime).
pub fn rotate_due_keys() -> Vec<String> {
    let (due, legacy) = catalog::as_catalog_owner(|_| {
        let due = Spi::connect(|c| -> Result<Vec<String>, pgrx::spi::Error> {
            let mut out = Vec::new();
            for r in c.select(
                "SELECT k.key_name FROM kms.keys k
                   JOIN kms.key_versions p ON p.key_id = k.key_id AND p.version = k.primary_version
                  WHERE k.rotation_period IS NOT NULL AND k.destroyed_at IS NULL
                    AND p.created_at + k.rotation_period <= pg_catalog.now()
                  ORDER BY 1",
                None,
                &[],
            )? {
                out.push(r.get::<String>(1)?.unwrap_or_default());
            }
            Ok(out)
        })
        .map_err(KmsError::spi)?;
        let legacy = spi::read::<bool>("SELECT integrity_since IS NULL FROM kms.keyring", &[])?
            .unwrap_or(false);
        Ok((due, legacy))
    })
    .or_raise();
    if legacy {
        lifecycle(|| begin_act().map(|_| ()));
    }
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

/// The body of SQL `kms_rotate_key()`.
pub fn rotate_key_sql(key_name: RawText, reason: Option<RawText>) -> i32 {
    lifecycle(|| rotate_key(name_arg(&key_name)?, reason))
}

/// The body of SQL `kms_set_primary()`.
pub fn set_primary(key_name: RawText, version: i32) {
    lifecycle(|| {
        let name = name_arg(&key_name)?;
        let version = version_arg(version)?;
        let act = begin_act()?;
        let key = lock_key(name)?;
        refuse_destroyed(&key, "make a version primary")?;
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
        spi::exec(
            "UPDATE kms.keys SET primary_version = $2 WHERE key_id = $1",
            &[key.id.into(), version.into()],
        )?;
        record(&act, "set_primary", &key, Some(version), None, None).map(|_| ())
    })
}

/// Locks a version that may be disabled or destroyed: its key is not
/// destroyed, it exists, is not the primary, and is not destroyed already.
fn lock_retirable<'a>(
    key_name: &'a RawText,
    version: i32,
    verb: &'static str,
    again: &'static str,
    key_verb: &'static str,
) -> KmsResult<(&'a str, KeyRow, i32)> {
    let name = name_arg(key_name)?;
    let version = version_arg(version)?;
    let key = lock_key(name)?;
    refuse_destroyed(&key, key_verb)?;
    let state = version_state(&key, name, version)?;
    if version == key.primary {
        return Err(KmsError::PrimaryVersion {
            key: name.into(),
            version,
            action: verb,
        });
    }
    if state == State::Destroyed {
        return Err(KmsError::VersionState {
            key: name.into(),
            version,
            state: "destroyed".into(),
            action: again,
        });
    }
    Ok((name, key, version))
}

/// The body of SQL `kms_disable_key_version()`.
pub fn disable_key_version(key_name: RawText, version: i32, reason: Option<RawText>) {
    lifecycle(|| {
        let act = begin_act()?;
        let (_, key, version) = lock_retirable(
            &key_name,
            version,
            "disable",
            "disable it",
            "disable a version",
        )?;
        set_state(&key, version, State::Disabled)?;
        record(
            &act,
            "disable_key_version",
            &key,
            Some(version),
            reason,
            None,
        )
        .map(|_| ())
    })
}

/// The body of SQL `kms_enable_key_version()`.
pub fn enable_key_version(key_name: RawText, version: i32) {
    lifecycle(|| {
        let name = name_arg(&key_name)?;
        let version = version_arg(version)?;
        let act = begin_act()?;
        let key = lock_key(name)?;
        refuse_destroyed(&key, "enable a version")?;
        match version_state(&key, name, version)? {
            State::Destroyed => Err(KmsError::VersionState {
                key: name.into(),
                version,
                state: "destroyed".into(),
                action: "enable it",
            }),
            State::Disabled => {
                set_state(&key, version, State::DecryptOnly)?;
                record(&act, "enable_key_version", &key, Some(version), None, None).map(|_| ())
            }
            // Already usable: nothing to do, nothing to audit.
            State::Active | State::DecryptOnly => Ok(()),
        }
    })
}

/// Now, in UTC, as the receipts write it.
fn now_utc_text() -> KmsResult<String> {
    Ok(spi::one::<String>(
        "SELECT pg_catalog.to_char(pg_catalog.now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        &[],
    )?
    .unwrap_or_default())
}

/// The MAC (catalog-row key) of erased material, hex: lets whoever holds
/// the master key recognize the erased bytes in an old backup, without
/// revealing them.
fn material_mac(act: &Act, key_id: i32, version: i32, wrapped: &[u8]) -> String {
    hex_of(
        &act.keys
            .row
            .hmac(&integrity::destroyed_material(key_id, version, wrapped)),
    )
}

/// The body of SQL `kms_destroy_key_version()`.
pub fn destroy_key_version(
    key_name: RawText,
    version: i32,
    reason: Option<RawText>,
    force: default!(bool, false),
) {
    // The guard counts only what the caller may read, each table scanned as
    // its owner (never as the catalog owner).
    let caller = crate::pg::identity::current_user();
    lifecycle(|| {
        let act = begin_act()?;
        let (name, key, version) = lock_retirable(
            &key_name,
            version,
            "destroy",
            "destroy it again",
            "destroy a version",
        )?;
        if !force {
            let (counts, skipped) = crate::reencrypt::usage_by_version(key.id, caller)?;
            let rows = counts.get(&version).copied().unwrap_or(0);
            if rows > 0 {
                return Err(KmsError::StillReferenced {
                    key: name.into(),
                    version,
                    rows,
                });
            }
            if !skipped.is_empty() {
                return Err(KmsError::UsageUnverifiable {
                    key: name.into(),
                    version,
                    detail: crate::reencrypt::skipped_notice(&skipped),
                });
            }
        }
        let wrapped = spi::one::<Vec<u8>>(
            "SELECT wrapped_key FROM kms.key_versions WHERE key_id = $1 AND version = $2",
            &[key.id.into(), version.into()],
        )?
        .unwrap_or_default();
        let receipt = json!({
            "receipt": "pg_kms destruction",
            "key_name": name,
            "key_id": key.id,
            "version": version,
            "destroyed_at": now_utc_text()?,
            "material_mac": material_mac(&act, key.id, version, &wrapped),
        });
        set_state(&key, version, State::Destroyed)?;
        record(
            &act,
            "destroy_key_version",
            &key,
            Some(version),
            reason,
            Some(&receipt.to_string()),
        )
        .map(|_| ())
    })
}

/// The body of SQL `kms_destroy_key()`.
pub fn destroy_key(key_name: RawText, reason: Option<RawText>) {
    lifecycle(|| {
        let name = name_arg(&key_name)?;
        let act = begin_act()?;
        let key = lock_key(name)?;
        refuse_destroyed(&key, "destroy it again")?;
        let erased = Spi::connect(|c| -> Result<Vec<(i32, Vec<u8>)>, pgrx::spi::Error> {
            let mut out = Vec::new();
            for r in c.select(
                "SELECT version, wrapped_key FROM kms.key_versions WHERE key_id = $1 AND wrapped_key IS NOT NULL ORDER BY 1",
                None,
                &[key.id.into()],
            )? {
                out.push((r.get::<i32>(1)?.unwrap_or(0), r.get::<Vec<u8>>(2)?.unwrap_or_default()));
            }
            Ok(out)
        })
        .map_err(KmsError::spi)?;
        let root = spi::one::<Vec<u8>>(
            "SELECT index_key FROM kms.keys WHERE key_id = $1",
            &[key.id.into()],
        )?;
        let versions: Vec<serde_json::Value> = erased
            .iter()
            .map(
                |(v, w)| json!({ "version": v, "material_mac": material_mac(&act, key.id, *v, w) }),
            )
            .collect();
        let receipt = json!({
            "receipt": "pg_kms destruction",
            "key_name": name,
            "key_id": key.id,
            "destroyed_at": now_utc_text()?,
            "versions": versions,
            "index_root_mac": root.as_deref().map(|r| material_mac(&act, key.id, 0, r)),
        });
        spi::exec(
            "UPDATE kms.key_versions SET state = 'destroyed', wrapped_key = NULL, state_changed_at = pg_catalog.now()
              WHERE key_id = $1 AND state <> 'destroyed'",
            &[key.id.into()],
        )?;
        spi::exec(
            "UPDATE kms.keys SET index_key = NULL, destroyed_at = pg_catalog.now() WHERE key_id = $1",
            &[key.id.into()],
        )?;
        record(
            &act,
            "destroy_key",
            &key,
            None,
            reason,
            Some(&receipt.to_string()),
        )
        .map(|_| ())
    })
}

fn grant_args<'a>(
    key_name: &'a RawText,
    grantee: &RegRole,
    privilege: &RawText,
) -> KmsResult<(&'a str, String, Privilege)> {
    let name = name_arg(key_name)?;
    let privilege = String::from_utf8_lossy(privilege.bytes());
    let p = Privilege::parse(&privilege).ok_or_else(|| KmsError::BadArgument {
        message: format!("unknown key privilege \"{}\"", privilege.escape_default()),
        hint: "Key privileges are 'encrypt' and 'decrypt'.",
    })?;
    let role = spi::read::<String>(
        "SELECT rolname::text FROM pg_catalog.pg_roles WHERE oid = $1",
        &[grantee.0.into()],
    )?
    .ok_or_else(|| KmsError::BadArgument {
        message: "role does not exist".into(),
        hint: "Pass an existing role.",
    })?;
    Ok((name, role, p))
}

/// The body of SQL `kms_grant_key()`.
pub fn grant_key(key_name: RawText, grantee: RegRole, privilege: RawText) {
    change_grant(&key_name, &grantee, &privilege, true)
}

/// The body of SQL `kms_revoke_key()`.
pub fn revoke_key(key_name: RawText, grantee: RegRole, privilege: RawText) {
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
            spi::exec(
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
            spi::exec(
                "DELETE FROM kms.key_grants WHERE key_id = $1 AND grantee = $2 AND privilege = $3",
                &[key.id.into(), role.as_str().into(), p.as_str().into()],
            )?;
        }
        let (op, word) = if grant {
            ("grant_key", "to")
        } else {
            ("revoke_key", "from")
        };
        // The role as regrole prints it (quoted if needed), never its oid.
        let reason = format!(
            "{} {word} role {}",
            p.as_str(),
            crate::errors::role_display(grantee.0)
        );
        audit(op, Some(name), None, Some(RawText::from_ascii(&reason)))
    })
}

/// The body of SQL `kms_rebind_key_grants()`.
pub fn rebind_key_grants() -> i64 {
    lifecycle(|| {
        let rebound = Spi::connect_mut(
            |c| -> Result<Vec<(String, String, String)>, pgrx::spi::Error> {
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
            },
        )
        .map_err(KmsError::spi)?;
        let mut sorted = rebound;
        sorted.sort();
        for (key, privilege, role) in &sorted {
            let reason = format!(
                "{privilege} to role {role} (restored from another cluster, bound by name)"
            );
            audit(
                "rebind_key_grant",
                Some(key),
                None,
                Some(RawText::from_ascii(&reason)),
            )?;
        }
        Ok(sorted.len() as i64)
    })
}

/// The body of SQL `kms_rotate_master_key()`.
pub fn rotate_master_key() -> i64 {
    lifecycle(|| {
        let new = keys::load_master_key(Which::Current)?;
        let stored = catalog::rows::stored_fingerprint(true)?;
        let Some(stored) = stored else {
            // Nothing was ever wrapped: just commit to the new key.
            audit(
                "rotate_master_key",
                None,
                None,
                Some(RawText::from_ascii("0 versions re-wrapped")),
            )?;
            return Ok(0);
        };
        if stored == new.fingerprint() {
            return Ok(0);
        }
        let old: MasterKey = keys::load_master_key(Which::Previous)?;
        keys::check_commitment(&old, Some(&stored), Which::Previous)?;
        let (old_keys, new_keys) = (old.integrity_keys(), new.integrity_keys());
        // Authentic under the old key, or a keyring from before MACs that may adopt them.
        match read_keyring(true)? {
            Some(KeyringRow {
                since_us: Some(since),
                mac,
                fp,
            }) => {
                if !mac
                    .as_deref()
                    .is_some_and(|m| old_keys.row.verify(&integrity::keyring_row(&fp, since), m))
                {
                    return Err(altered("the kms.keyring row".into(), WHY_MAC));
                }
                verify_all_keys(&old_keys, &old.fingerprint())?;
            }
            _ => refuse_unkeyed_with_keyed_chain()?,
        }
        let (old_kek, new_kek) = (old.kek(), new.kek());
        let rows = Spi::connect_mut(
            |c| -> Result<Vec<(i32, i32, String, Vec<u8>)>, pgrx::spi::Error> {
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
            },
        )
        .map_err(KmsError::spi)?;
        for (key_id, version, name, wrapped) in &rows {
            let dk = old_kek
                .unwrap_raw(*key_id as u32, *version as u32, wrapped)
                .map_err(|_| KmsError::CatalogCorrupt {
                    key: name.clone(),
                    version: *version,
                })?;
            let mut nonce = [0u8; 12];
            keys::random_bytes(&mut nonce)?;
            let rewrapped = new_kek.wrap(*key_id as u32, *version as u32, &dk, &nonce);
            spi::exec(
                "UPDATE kms.key_versions SET wrapped_key = $3 WHERE key_id = $1 AND version = $2",
                &[(*key_id).into(), (*version).into(), rewrapped.into()],
            )?;
        }
        let roots = Spi::connect(
            |c| -> Result<Vec<(i32, String, Vec<u8>)>, pgrx::spi::Error> {
                let mut out = Vec::new();
                for r in c.select(
                    "SELECT key_id, key_name, index_key FROM kms.keys WHERE index_key IS NOT NULL",
                    None,
                    &[],
                )? {
                    out.push((
                        r.get::<i32>(1)?.unwrap_or(0),
                        r.get::<String>(2)?.unwrap_or_default(),
                        r.get::<Vec<u8>>(3)?.unwrap_or_default(),
                    ));
                }
                Ok(out)
            },
        )
        .map_err(KmsError::spi)?;
        for (key_id, name, wrapped) in &roots {
            let root = old_kek
                .unwrap_index_root(*key_id as u32, wrapped)
                .map_err(|_| KmsError::CatalogCorrupt {
                    key: name.clone(),
                    version: 0,
                })?;
            let mut nonce = [0u8; 12];
            keys::random_bytes(&mut nonce)?;
            spi::exec(
                "UPDATE kms.keys SET index_key = $2 WHERE key_id = $1",
                &[
                    (*key_id).into(),
                    new_kek
                        .wrap_index_root(*key_id as u32, &root, &nonce)
                        .into(),
                ],
            )?;
        }
        let new_fp = new.fingerprint();
        spi::exec(
            "UPDATE kms.keyring SET master_key_fingerprint = $1, rotated_at = pg_catalog.now(),
                    integrity_since = coalesce(integrity_since, pg_catalog.now())",
            &[new_fp.to_vec().into()],
        )?;
        seal_keyring(&new_keys)?;
        let n = rows.len() as i64;
        let reason = RawText::from_ascii(&format!("{n} versions re-wrapped"));
        let id = append(
            &new_keys,
            &new_fp,
            "rotate_master_key",
            None,
            None,
            Some(reason),
            None,
        )?;
        reseal_all(&new_keys, id)?;
        Ok(n)
    })
}

/// The body of SQL `kms_verify_audit_log()`.
pub fn verify_audit_log() -> bool {
    catalog::as_catalog_owner(|_| check_audit_log().map(|c| c.problem.is_none())).or_raise()
}

/// The body of SQL `kms_audit_log_check()`.
pub fn audit_log_check() -> TableIterator<
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
    let c = catalog::as_catalog_owner(|_| check_audit_log()).or_raise();
    TableIterator::once((
        c.problem.is_none(),
        c.rows,
        c.first_bad,
        c.problem,
        c.head_id,
        c.head_mac,
    ))
}

/// Whether this database's re-encryption worker runs, and if not, why.
fn worker_status() -> KmsResult<serde_json::Value> {
    let pid = spi::read::<i32>(
        "SELECT pid FROM pg_catalog.pg_stat_activity
          WHERE backend_type = 'pg_kms worker' AND datid = (SELECT oid FROM pg_catalog.pg_database
                                                           WHERE datname = pg_catalog.current_database())",
        &[],
    )?;
    let reason = if pid.is_some() {
        None
    } else if !crate::pg::preloaded() {
        Some("pg_kms is not in shared_preload_libraries: no background re-encryption or scheduled rotation (use kms_reencrypt_now())")
    // SAFETY: RecoveryInProgress only reads shared state (any backend may
    // call it).
    } else if unsafe { pg_sys::RecoveryInProgress() } {
        Some("this server is a standby: the worker starts after promotion")
    } else if !crate::pg::guc::REENCRYPT_ENABLED.get() {
        Some("pg_kms.reencrypt_enabled is off")
    } else {
        Some("the worker for this database has not started yet (it is started within pg_kms.reencrypt_naptime), or max_worker_processes is exhausted")
    };
    Ok(json!({ "running": pid.is_some(), "pid": pid, "reason": reason }))
}

/// Key versions whose encryptions since start reached the warning level.
fn nonce_warnings() -> KmsResult<serde_json::Value> {
    let threshold = crate::pg::guc::NONCE_WARNING_ENCRYPTIONS.get() as u64;
    let mut out = Vec::new();
    for (key_id, version, enc, _) in crate::pg::shmem::stats_of_this_db() {
        if enc >= threshold {
            let name = spi::read::<String>(
                "SELECT key_name FROM kms.keys WHERE key_id = $1",
                &[(key_id as i32).into()],
            )?;
            out.push(json!({ "key_name": name, "version": version, "encryptions": enc,
                             "message": "rotate this key: AES-GCM random nonces allow at most 2^32 encryptions per key" }));
        }
    }
    Ok(serde_json::Value::Array(out))
}

/// The body of SQL `kms_health()`.
pub fn health() -> pgrx::JsonB {
    let report = catalog::as_catalog_owner(|_| {
        let stored = catalog::rows::stored_fingerprint(false)?;
        let source = keys::describe_source(Which::Current);
        // Reuses this backend's validated key while the source is unchanged
        // (no key command run per call).
        let (valid, matches, error) = match keys::validate_current_master_key(stored.as_deref()) {
            Ok(()) => (true, stored.is_some().then_some(true), None),
            Err(e @ KmsError::MasterKeyMismatch { .. }) => (true, Some(false), Some(e.message())),
            Err(e) => (false, None, Some(e.message())),
        };
        let counts = spi::read::<pgrx::JsonB>(
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
                     WHERE k.rotation_period IS NOT NULL AND k.destroyed_at IS NULL
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
            "preloaded": crate::pg::preloaded(),
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
