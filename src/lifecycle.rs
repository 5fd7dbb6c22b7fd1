//! Key lifecycle in SQL: create, rotate, set primary, disable, enable,
//! destroy, master-key rotation; the audit log and `kms_health()`.
//!
//! Every act runs under the catalog owner's identity with a pinned
//! `search_path`, checks the MACs of the key-state rows it reads, appends
//! a keyed, chained audit row (see "Catalog and audit integrity" at the end
//! of this file), re-MACs the rows it changed, sends `NOTIFY kms_events`,
//! and invalidates every backend's key cache.

use crate::crypto::integrity::{self, AuditRow};
use crate::crypto::{IntegrityKeys, Kek, MasterKey};
use crate::errors::{KmsError, KmsResult, OrRaise};
use crate::keyring::{self, Privilege, State, Which};
use crate::pg::datum::{RawText, RegRole};
use crate::pg::spi;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::prelude::*;
use serde_json::json;
use std::cell::RefCell;
use std::rc::Rc;
use zeroize::Zeroizing;

/// Runs a lifecycle act as the catalog owner, then invalidates caches.
pub(crate) fn lifecycle<R>(f: impl FnOnce() -> KmsResult<R>) -> R {
    // SAFETY: RecoveryInProgress reads shared memory under its own spinlock
    // (any backend may call it) and XactReadOnly is a plain read of a
    // backend global, in the backend's only thread.
    if unsafe { pg_sys::RecoveryInProgress() || pg_sys::XactReadOnly } {
        KmsError::ReadOnly.raise();
    }
    keyring::as_catalog_owner(|cat| {
        guard_catalog()?;
        let r = f()?;
        keyring::invalidate_all_backends(cat);
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

/// Appends an audit row for an act that changes no key-state row (grants,
/// secrets). Caller is the catalog owner.
pub(crate) fn audit(
    operation: &str,
    key_name: Option<&str>,
    version: Option<i32>,
    reason: Option<RawText>,
) -> KmsResult<()> {
    let act = begin_act()?;
    append(
        &act.keys, &act.fp, operation, key_name, version, reason, None,
    )
    .map(|_| ())
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

/// What an act needs from the master key configured now: the KEK and the
/// integrity keys, with the keyring committed to that key (and, for a
/// keyring made before rows carried MACs, the MACs adopted).
struct Act {
    kek: Kek,
    keys: IntegrityKeys,
    fp: [u8; 32],
}

fn begin_act() -> KmsResult<Act> {
    let mk = keyring::load_master_key(Which::Current)?;
    let kr = commit_keyring(&mk)?;
    let act = Act {
        kek: mk.kek(),
        keys: mk.integrity_keys(),
        fp: mk.fingerprint(),
    };
    match kr.since_us {
        Some(since) => {
            if !kr.mac.as_deref().is_some_and(|m| {
                act.keys
                    .row
                    .verify(&integrity::keyring_row(&kr.fp, since), m)
            }) {
                return Err(altered("the kms.keyring row".into(), WHY_MAC));
            }
        }
        None => adopt(&act)?,
    }
    Ok(act)
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
    keyring::random_bytes(dk.as_mut())?;
    let mut nonce = [0u8; 12];
    keyring::random_bytes(&mut nonce)?;
    let wrapped = kek.wrap(key_id as u32, version as u32, &dk, &nonce);
    spi::exec(
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
            keyring::random_bytes(&mut b)?;
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
        keyring::random_bytes(root.as_mut())?;
        let mut nonce = [0u8; 12];
        keyring::random_bytes(&mut nonce)?;
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
    let (due, legacy) = keyring::as_catalog_owner(|_| {
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

#[pg_extern(volatile, parallel_unsafe)]
fn kms_rotate_key(key_name: RawText, reason: default!(Option<RawText>, "NULL")) -> i32 {
    lifecycle(|| rotate_key(name_arg(&key_name)?, reason))
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_set_primary(key_name: RawText, version: i32) {
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

#[pg_extern(volatile, parallel_unsafe)]
fn kms_disable_key_version(
    key_name: RawText,
    version: i32,
    reason: default!(Option<RawText>, "NULL"),
) {
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

#[pg_extern(volatile, parallel_unsafe)]
fn kms_enable_key_version(key_name: RawText, version: i32) {
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

/// Destroys every version of a key at once (erasing a tenant): all its
/// values become undecryptable (55000), its blind index unusable, and the
/// key refuses every further act. Audited, with its destruction receipt.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_destroy_key(key_name: RawText, reason: default!(Option<RawText>, "NULL")) {
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
    lifecycle(|| {
        let new = keyring::load_master_key(Which::Current)?;
        let stored = keyring::stored_fingerprint(true)?;
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
        let old: MasterKey = keyring::load_master_key(Which::Previous)?;
        keyring::check_commitment(&old, Some(&stored), Which::Previous)?;
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
            keyring::random_bytes(&mut nonce)?;
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
            keyring::random_bytes(&mut nonce)?;
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

#[pg_extern(stable, parallel_restricted)]
fn kms_verify_audit_log() -> bool {
    keyring::as_catalog_owner(|_| check_audit_log().map(|c| c.problem.is_none())).or_raise()
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
    let c = keyring::as_catalog_owner(|_| check_audit_log()).or_raise();
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

/// Configuration and keyring health, without any key material.
#[pg_extern(volatile, parallel_safe)]
fn kms_health() -> pgrx::JsonB {
    let report = keyring::as_catalog_owner(|_| {
        let stored = keyring::stored_fingerprint(false)?;
        let source = keyring::describe_source(Which::Current);
        // Reuses this backend's validated key while the source is unchanged
        // (no key command run per call).
        let (valid, matches, error) = match keyring::validate_current_master_key(stored.as_deref())
        {
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

// ---------------------------------------------------------------------------
// Catalog and audit integrity
//
// Keys derived from the master key (src/crypto/integrity.rs):
// * the audit-chain key MACs each audit row's chain hash, which commits to
//   every earlier row;
// * the catalog-row key MACs kms.keyring, kms.keys and kms.key_versions.
//   A key's rows are bound to its generation: the id of the audit row of
//   its latest change (or of the latest keyring-wide act), so a saved row
//   put back is older than the trail and refused.
// Checked on every cold load of a key (keyring::load) and by every act on
// the rows it reads; never on the per-row path.

const WHY_MAC: &str = "Its MAC does not verify under the master key.";
const WHY_STALE: &str = "It is older than the key's latest change recorded in the audit chain: a saved row was put back.";
const WHY_CUT: &str =
    "It is newer than the audit chain: the audit rows recording its latest change were removed.";
const WHY_TRAIL: &str =
    "The audit row that records the key's latest change does not verify under the master key.";

/// Acts that change a key's rows: the latest one is the key's generation.
const KEY_OPS: &str =
    "'create_key', 'rotate_key', 'set_primary', 'disable_key_version', 'enable_key_version', 'destroy_key_version', 'destroy_key'";

const KEY_ROW_SQL: &str =
    "SELECT key_id, key_name, primary_version, (EXTRACT(epoch FROM destroyed_at) * 1000000)::int8,
        index_key, generation, row_mac FROM kms.keys";
const VERSION_ROW_SQL: &str = "SELECT version, state, wrapped_key, row_mac FROM kms.key_versions";
const AUDIT_SQL: &str = "SELECT id, prev_hash, hash, mac, key_fp, (EXTRACT(epoch FROM at) * 1000000)::int8,
        pg_catalog.convert_to(actor, 'UTF8'), pg_catalog.convert_to(operation, 'UTF8'),
        pg_catalog.convert_to(key_name, 'UTF8'), version, pg_catalog.convert_to(reason, 'UTF8'),
        pg_catalog.convert_to(detail, 'UTF8'),
        CASE WHEN mac IS NULL THEN kms.audit_row_hash(prev_hash, id, at, actor, operation, key_name, version, reason) END
   FROM kms.audit_log";

fn altered(what: String, why: &'static str) -> KmsError {
    KmsError::CatalogAltered { what, why }
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

type Row<'a> = pgrx::spi::SpiHeapTupleData<'a>;

/// A `kms.keys` row as its MAC covers it.
pub(crate) struct KeyCheck<'a> {
    pub key_id: i32,
    pub name: &'a str,
    pub primary: i32,
    pub destroyed_us: Option<i64>,
    pub index_key: Option<&'a [u8]>,
    pub generation: i64,
    pub mac: Option<&'a [u8]>,
}

/// A `kms.key_versions` row as its MAC covers it.
pub(crate) struct VersionCheck<'a> {
    pub version: i32,
    pub state: &'a str,
    pub wrapped: Option<&'a [u8]>,
    pub mac: Option<&'a [u8]>,
}

struct KeyRowData {
    key_id: i32,
    name: String,
    primary: i32,
    destroyed_us: Option<i64>,
    index_key: Option<Vec<u8>>,
    generation: i64,
    mac: Option<Vec<u8>>,
}

impl KeyRowData {
    fn read(r: &Row<'_>) -> Result<KeyRowData, pgrx::spi::Error> {
        Ok(KeyRowData {
            key_id: r.get::<i32>(1)?.unwrap_or(0),
            name: r.get::<String>(2)?.unwrap_or_default(),
            primary: r.get::<i32>(3)?.unwrap_or(0),
            destroyed_us: r.get::<i64>(4)?,
            index_key: r.get::<Vec<u8>>(5)?,
            generation: r.get::<i64>(6)?.unwrap_or(0),
            mac: r.get::<Vec<u8>>(7)?,
        })
    }

    fn check(&self) -> KeyCheck<'_> {
        KeyCheck {
            key_id: self.key_id,
            name: &self.name,
            primary: self.primary,
            destroyed_us: self.destroyed_us,
            index_key: self.index_key.as_deref(),
            generation: self.generation,
            mac: self.mac.as_deref(),
        }
    }
}

struct VersionRowData {
    version: i32,
    state: String,
    wrapped: Option<Vec<u8>>,
    mac: Option<Vec<u8>>,
}

impl VersionRowData {
    fn read(r: &Row<'_>) -> Result<VersionRowData, pgrx::spi::Error> {
        Ok(VersionRowData {
            version: r.get::<i32>(1)?.unwrap_or(0),
            state: r.get::<String>(2)?.unwrap_or_default(),
            wrapped: r.get::<Vec<u8>>(3)?,
            mac: r.get::<Vec<u8>>(4)?,
        })
    }

    fn check(&self) -> VersionCheck<'_> {
        VersionCheck {
            version: self.version,
            state: &self.state,
            wrapped: self.wrapped.as_deref(),
            mac: self.mac.as_deref(),
        }
    }
}

/// A key's row and its versions' rows: read-write (it sees what the act
/// just changed) or read-only (kms_audit_log_check, a stable function).
fn key_rows(key_id: i32, write: bool) -> KmsResult<(KeyRowData, Vec<VersionRowData>)> {
    type Rows = Option<(KeyRowData, Vec<VersionRowData>)>;
    let (key_q, versions_q) = (
        format!("{KEY_ROW_SQL} WHERE key_id = $1"),
        format!("{VERSION_ROW_SQL} WHERE key_id = $1 ORDER BY version"),
    );
    let versions =
        |t: pgrx::spi::SpiTupleTable<'_>| -> Result<Vec<VersionRowData>, pgrx::spi::Error> {
            t.map(|r| VersionRowData::read(&r)).collect()
        };
    let args = [key_id.into()];
    if write {
        Spi::connect_mut(|c| -> Result<Rows, pgrx::spi::Error> {
            let Some(r) = c.update(&key_q, Some(1), &args)?.next() else {
                return Ok(None);
            };
            let key = KeyRowData::read(&r)?;
            Ok(Some((key, versions(c.update(&versions_q, None, &args)?)?)))
        })
    } else {
        Spi::connect(|c| -> Result<Rows, pgrx::spi::Error> {
            let Some(r) = c.select(&key_q, Some(1), &args)?.next() else {
                return Ok(None);
            };
            let key = KeyRowData::read(&r)?;
            Ok(Some((key, versions(c.select(&versions_q, None, &args)?)?)))
        })
    }
    .map_err(KmsError::spi)?
    .ok_or(KmsError::UnknownKeyId(key_id as u32))
}

fn key_mac(k: &KeyCheck<'_>) -> Vec<u8> {
    integrity::key_row(
        k.key_id,
        k.name.as_bytes(),
        k.primary,
        k.destroyed_us,
        k.index_key,
        k.generation,
    )
}

fn version_mac(k: &KeyCheck<'_>, v: &VersionCheck<'_>) -> Vec<u8> {
    integrity::version_row(
        k.key_id,
        v.version,
        v.state.as_bytes(),
        v.wrapped,
        k.generation,
    )
}

/// Sets a key's generation and re-MACs its row and its versions' rows.
fn reseal_key(keys: &IntegrityKeys, key_id: i32, generation: i64) -> KmsResult<()> {
    spi::exec(
        "UPDATE kms.keys SET generation = $2 WHERE key_id = $1",
        &[key_id.into(), generation.into()],
    )?;
    let (key, versions) = key_rows(key_id, true)?;
    let k = key.check();
    spi::exec(
        "UPDATE kms.keys SET row_mac = $2 WHERE key_id = $1",
        &[key_id.into(), keys.row.hmac(&key_mac(&k)).to_vec().into()],
    )?;
    for v in &versions {
        let mac = keys.row.hmac(&version_mac(&k, &v.check()));
        spi::exec(
            "UPDATE kms.key_versions SET row_mac = $3 WHERE key_id = $1 AND version = $2",
            &[key_id.into(), v.version.into(), mac.to_vec().into()],
        )?;
    }
    Ok(())
}

fn all_key_ids() -> KmsResult<Vec<i32>> {
    Spi::connect(|c| -> Result<Vec<i32>, pgrx::spi::Error> {
        let mut out = Vec::new();
        for r in c.select("SELECT key_id FROM kms.keys ORDER BY 1", None, &[])? {
            out.push(r.get::<i32>(1)?.unwrap_or(0));
        }
        Ok(out)
    })
    .map_err(KmsError::spi)
}

fn reseal_all(keys: &IntegrityKeys, generation: i64) -> KmsResult<()> {
    for id in all_key_ids()? {
        reseal_key(keys, id, generation)?;
    }
    Ok(())
}

/// Checks every key's rows under `keys` (before a master-key rotation
/// re-MACs them under the new key).
fn verify_all_keys(keys: &IntegrityKeys, fp: &[u8]) -> KmsResult<()> {
    for id in all_key_ids()? {
        let (key, versions) = key_rows(id, false)?;
        let vs: Vec<VersionCheck<'_>> = versions.iter().map(VersionRowData::check).collect();
        verify_with(keys, fp, &key.check(), &vs)?;
    }
    Ok(())
}

/// The keyring row: fingerprint, MACs on since (microseconds), its MAC.
struct KeyringRow {
    fp: Vec<u8>,
    since_us: Option<i64>,
    mac: Option<Vec<u8>>,
}

fn read_keyring(lock: bool) -> KmsResult<Option<KeyringRow>> {
    let q = format!(
        "SELECT master_key_fingerprint, (EXTRACT(epoch FROM integrity_since) * 1000000)::int8, row_mac FROM kms.keyring{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let first =
        |mut t: pgrx::spi::SpiTupleTable<'_>| -> Result<Option<KeyringRow>, pgrx::spi::Error> {
            let Some(r) = t.next() else { return Ok(None) };
            Ok(Some(KeyringRow {
                fp: r.get::<Vec<u8>>(1)?.unwrap_or_default(),
                since_us: r.get::<i64>(2)?,
                mac: r.get::<Vec<u8>>(3)?,
            }))
        };
    if lock {
        Spi::connect_mut(|c| first(c.update(&q, Some(1), &[])?))
    } else {
        Spi::connect(|c| first(c.select(&q, Some(1), &[])?))
    }
    .map_err(KmsError::spi)
}

/// MACs the keyring row (fingerprint, integrity_since) under `keys`.
fn seal_keyring(keys: &IntegrityKeys) -> KmsResult<()> {
    let kr = read_keyring(true)?.ok_or_else(|| KmsError::Spi("kms.keyring has no row".into()))?;
    let since = kr
        .since_us
        .ok_or_else(|| KmsError::Spi("kms.keyring.integrity_since is NULL".into()))?;
    let mac = keys.row.hmac(&integrity::keyring_row(&kr.fp, since));
    spi::exec(
        "UPDATE kms.keyring SET row_mac = $1",
        &[mac.to_vec().into()],
    )
}

/// Commits the keyring to `mk` on first use (rows MAC'd from the start),
/// locks its row and checks the commitment.
fn commit_keyring(mk: &MasterKey) -> KmsResult<KeyringRow> {
    let fresh = spi::one::<bool>(
        "INSERT INTO kms.keyring (singleton, master_key_fingerprint, integrity_since)
         VALUES (true, $1, pg_catalog.now()) ON CONFLICT DO NOTHING RETURNING true",
        &[mk.fingerprint().to_vec().into()],
    )?;
    if fresh.is_some() {
        seal_keyring(&mk.integrity_keys())?;
    }
    let kr = read_keyring(true)?.ok_or_else(|| KmsError::Spi("kms.keyring has no row".into()))?;
    keyring::check_commitment(mk, Some(&kr.fp), Which::Current)?;
    Ok(kr)
}

/// A keyring whose row says it carries no MACs is accepted only while the
/// audit chain has no keyed row: otherwise its row was edited (or removed)
/// to get altered rows accepted or re-blessed.
fn refuse_unkeyed_with_keyed_chain() -> KmsResult<()> {
    if spi::read::<bool>(
        "SELECT EXISTS (SELECT 1 FROM kms.audit_log WHERE mac IS NOT NULL)",
        &[],
    )? == Some(true)
    {
        return Err(altered(
            "the kms.keyring row".into(),
            "It says key-state rows carry no MACs (or is missing), but the audit chain has keyed rows.",
        ));
    }
    Ok(())
}

/// A keyring made before rows carried MACs adopts them: every wrapped key
/// and index root must open under the KEK (their AAD binds key id and
/// version, so a swapped or edited one is refused, not blessed), then every
/// row is MAC'd and the adoption is audited in the keyed chain.
fn adopt(act: &Act) -> KmsResult<()> {
    refuse_unkeyed_with_keyed_chain()?;
    let material = Spi::connect(|c| -> Result<Vec<(i32, String, i32, Vec<u8>)>, pgrx::spi::Error> {
        let mut out = Vec::new();
        for r in c.select(
            "SELECT k.key_id, k.key_name, v.version, v.wrapped_key FROM kms.keys k JOIN kms.key_versions v ON v.key_id = k.key_id
              WHERE v.wrapped_key IS NOT NULL
             UNION ALL
             SELECT key_id, key_name, 0, index_key FROM kms.keys WHERE index_key IS NOT NULL",
            None,
            &[],
        )? {
            out.push((
                r.get::<i32>(1)?.unwrap_or(0),
                r.get::<String>(2)?.unwrap_or_default(),
                r.get::<i32>(3)?.unwrap_or(0),
                r.get::<Vec<u8>>(4)?.unwrap_or_default(),
            ));
        }
        Ok(out)
    })
    .map_err(KmsError::spi)?;
    for (key_id, name, version, wrapped) in &material {
        let opened = if *version == 0 {
            act.kek.unwrap_index_root(*key_id as u32, wrapped)
        } else {
            act.kek.unwrap_raw(*key_id as u32, *version as u32, wrapped)
        };
        opened.map_err(|_| KmsError::CatalogCorrupt {
            key: name.clone(),
            version: *version,
        })?;
    }
    // A key destroyed before destroyed_at existed: every version destroyed, no index root.
    spi::exec(
        "UPDATE kms.keys k SET destroyed_at = pg_catalog.now()
          WHERE destroyed_at IS NULL AND index_key IS NULL
            AND NOT EXISTS (SELECT 1 FROM kms.key_versions v WHERE v.key_id = k.key_id AND v.state <> 'destroyed')",
        &[],
    )?;
    spi::exec(
        "UPDATE kms.keyring SET integrity_since = pg_catalog.now()",
        &[],
    )?;
    seal_keyring(&act.keys)?;
    let keys = all_key_ids()?.len();
    let reason = RawText::from_ascii(&format!(
        "rows of {keys} keys MAC'd (keyring made before MACs)"
    ));
    let id = append(
        &act.keys,
        &act.fp,
        "adopt_integrity",
        None,
        None,
        Some(reason),
        None,
    )?;
    reseal_all(&act.keys, id)
}

thread_local! {
    /// (key source, fingerprint, keys) of the master key last used to check rows.
    static INTEGRITY_KEYS: RefCell<Option<(String, Vec<u8>, Rc<IntegrityKeys>)>> = const { RefCell::new(None) };
}

/// The integrity keys of the master key configured now, which must match
/// the keyring's fingerprint `stored_fp`; cached per backend.
fn integrity_keys(stored_fp: &[u8]) -> KmsResult<Rc<IntegrityKeys>> {
    let source = keyring::master_key_source(Which::Current).map(|(s, _, v)| format!("{s}={v}"));
    let hit = INTEGRITY_KEYS.with(|c| match (&*c.borrow(), &source) {
        (Some((src, fp, keys)), Some(now)) if src == now && fp.as_slice() == stored_fp => {
            Some(keys.clone())
        }
        _ => None,
    });
    if let Some(keys) = hit {
        return Ok(keys);
    }
    let mk = keyring::load_master_key(Which::Current)?;
    keyring::check_commitment(&mk, Some(stored_fp), Which::Current)?;
    let keys = Rc::new(mk.integrity_keys());
    if let Some(src) = source {
        INTEGRITY_KEYS.with(|c| *c.borrow_mut() = Some((src, stored_fp.to_vec(), keys.clone())));
    }
    Ok(keys)
}

/// Checks a key's rows as read (keyring::load, cold path; and every act
/// through lock_key): their MACs, that they are the key's latest state in
/// the audit chain, and that the audit row recording it is authentic.
/// XX001 "catalog row altered" otherwise. Caller is the catalog owner;
/// read-only (works in parallel workers and on a standby).
pub(crate) fn verify_key_rows(key: &KeyCheck<'_>, versions: &[VersionCheck<'_>]) -> KmsResult<()> {
    match read_keyring(false)? {
        Some(KeyringRow {
            fp,
            since_us: Some(since),
            mac,
        }) => {
            let keys = integrity_keys(&fp)?;
            if !mac
                .as_deref()
                .is_some_and(|m| keys.row.verify(&integrity::keyring_row(&fp, since), m))
            {
                return Err(altered("the kms.keyring row".into(), WHY_MAC));
            }
            verify_with(&keys, &fp, key, versions)
        }
        _ => refuse_unkeyed_with_keyed_chain(),
    }
}

fn verify_with(
    keys: &IntegrityKeys,
    fp: &[u8],
    key: &KeyCheck<'_>,
    versions: &[VersionCheck<'_>],
) -> KmsResult<()> {
    let whose = || format!("the kms.keys row of key \"{}\"", key.name);
    if !key.mac.is_some_and(|m| keys.row.verify(&key_mac(key), m)) {
        return Err(altered(whose(), WHY_MAC));
    }
    for v in versions {
        if !v
            .mac
            .is_some_and(|m| keys.row.verify(&version_mac(key, v), m))
        {
            return Err(altered(
                format!(
                    "the kms.key_versions row of version {} of key \"{}\"",
                    v.version, key.name
                ),
                WHY_MAC,
            ));
        }
    }
    let latest = spi::read::<i64>(
        &format!(
            "SELECT GREATEST((SELECT max(id) FROM kms.audit_log WHERE key_name = $1 AND operation IN ({KEY_OPS})),
                             (SELECT max(id) FROM kms.audit_log WHERE operation IN ('rotate_master_key', 'adopt_integrity')))"
        ),
        &[key.name.into()],
    )?;
    match latest {
        Some(l) if l == key.generation => {}
        Some(l) if l > key.generation => return Err(altered(whose(), WHY_STALE)),
        _ => return Err(altered(whose(), WHY_CUT)),
    }
    let authentic = read_audit(Some(key.generation))?.first().is_some_and(|r| {
        r.key_fp.as_deref() == Some(fp)
            && r.content_ok()
            && r.mac
                .as_deref()
                .is_some_and(|m| keys.audit.verify(&r.hash, m))
    });
    if !authentic {
        return Err(altered(whose(), WHY_TRAIL));
    }
    Ok(())
}

/// Appends one audit row to the keyed chain under `keys` (the master key
/// whose fingerprint is `fp`), updates kms.audit_head, queues NOTIFY
/// kms_events, and at commit writes the new head to the server log (row
/// id and MAC: no secret). Returns the row's id.
fn append(
    keys: &IntegrityKeys,
    fp: &[u8; 32],
    operation: &str,
    key_name: Option<&str>,
    version: Option<i32>,
    reason: Option<RawText>,
    detail: Option<&str>,
) -> KmsResult<i64> {
    // Self-conflicting lock: concurrent acts are chained one after another.
    spi::exec("LOCK TABLE kms.audit_log IN SHARE ROW EXCLUSIVE MODE", &[])?;
    type Head = Option<(i64, Vec<u8>)>;
    let last = Spi::connect(|c| -> Result<Head, pgrx::spi::Error> {
        let Some(r) = c
            .select(
                "SELECT id, hash FROM kms.audit_log ORDER BY id DESC LIMIT 1",
                None,
                &[],
            )?
            .next()
        else {
            return Ok(None);
        };
        Ok(Some((
            r.get::<i64>(1)?.unwrap_or(0),
            r.get::<Vec<u8>>(2)?.unwrap_or_default(),
        )))
    })
    .map_err(KmsError::spi)?;
    let (id, prev) = match last {
        Some((id, hash)) => (id + 1, hash),
        None => (1, vec![0u8; 32]),
    };
    type Now = (
        Option<TimestampWithTimeZone>,
        i64,
        Vec<u8>,
        Option<Vec<u8>>,
        String,
    );
    let (at, at_us, actor, reason_utf8, db) = Spi::connect(|c| -> Result<Now, pgrx::spi::Error> {
        let t = c.select(
            "SELECT t, (EXTRACT(epoch FROM t) * 1000000)::int8, pg_catalog.convert_to(session_user::text, 'UTF8'),
                    pg_catalog.convert_to($1, 'UTF8'), pg_catalog.quote_ident(pg_catalog.current_database())
               FROM (SELECT pg_catalog.clock_timestamp() AS t) s",
            Some(1),
            &[reason.into()],
        )?;
        let r = t.first();
        Ok((
            r.get::<TimestampWithTimeZone>(1)?,
            r.get::<i64>(2)?.unwrap_or(0),
            r.get::<Vec<u8>>(3)?.unwrap_or_default(),
            r.get::<Vec<u8>>(4)?,
            r.get::<String>(5)?.unwrap_or_default(),
        ))
    })
    .map_err(KmsError::spi)?;
    let row = AuditRow {
        id,
        at_us,
        actor: &actor,
        operation: operation.as_bytes(),
        key_name: key_name.map(str::as_bytes),
        version,
        reason: reason_utf8.as_deref(),
        detail: detail.map(str::as_bytes),
        key_fp: fp,
    };
    let hash = row.chain_hash(&prev);
    let mac = keys.audit.hmac(&hash);
    spi::exec(
        "INSERT INTO kms.audit_log (id, at, actor, operation, key_name, version, reason, prev_hash, hash, detail, key_fp, mac)
         VALUES ($1, $2, session_user, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        &[
            id.into(),
            at.into(),
            operation.into(),
            key_name.into(),
            version.into(),
            reason.into(),
            prev.into(),
            hash.to_vec().into(),
            detail.into(),
            fp.to_vec().into(),
            mac.to_vec().into(),
        ],
    )?;
    spi::exec(
        "INSERT INTO kms.audit_head (singleton, last_id, last_hash, last_mac) VALUES (true, $1, $2, $3)
         ON CONFLICT (singleton) DO UPDATE SET last_id = excluded.last_id, last_hash = excluded.last_hash, last_mac = excluded.last_mac",
        &[id.into(), hash.to_vec().into(), mac.to_vec().into()],
    )?;
    spi::exec(
        "SELECT pg_catalog.pg_notify('kms_events', pg_catalog.jsonb_build_object(
                'operation', $1::text, 'key_name', $2::text, 'version', $3::integer)::text)",
        &[operation.into(), key_name.into(), version.into()],
    )?;
    let line = format!(
        "pg_kms: audit chain head of database {db}: id={id} mac={}",
        hex_of(&mac)
    );
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || {
        pgrx::log!("{line}")
    });
    Ok(id)
}

/// One audit row as stored (text fields as UTF-8 bytes).
struct AuditRecord {
    id: i64,
    prev: Vec<u8>,
    hash: Vec<u8>,
    mac: Option<Vec<u8>>,
    key_fp: Option<Vec<u8>>,
    at_us: i64,
    actor: Vec<u8>,
    operation: Vec<u8>,
    key_name: Option<Vec<u8>>,
    version: Option<i32>,
    reason: Option<Vec<u8>>,
    detail: Option<Vec<u8>>,
    /// kms.audit_row_hash of an unkeyed row (made before the chain was keyed).
    legacy_hash: Option<Vec<u8>>,
}

impl AuditRecord {
    fn read(r: &Row<'_>) -> Result<AuditRecord, pgrx::spi::Error> {
        Ok(AuditRecord {
            id: r.get::<i64>(1)?.unwrap_or(0),
            prev: r.get::<Vec<u8>>(2)?.unwrap_or_default(),
            hash: r.get::<Vec<u8>>(3)?.unwrap_or_default(),
            mac: r.get::<Vec<u8>>(4)?,
            key_fp: r.get::<Vec<u8>>(5)?,
            at_us: r.get::<i64>(6)?.unwrap_or(0),
            actor: r.get::<Vec<u8>>(7)?.unwrap_or_default(),
            operation: r.get::<Vec<u8>>(8)?.unwrap_or_default(),
            key_name: r.get::<Vec<u8>>(9)?,
            version: r.get::<i32>(10)?,
            reason: r.get::<Vec<u8>>(11)?,
            detail: r.get::<Vec<u8>>(12)?,
            legacy_hash: r.get::<Vec<u8>>(13)?,
        })
    }

    /// Whether the stored hash is SHA-256(prev_hash || canonical row).
    fn content_ok(&self) -> bool {
        let row = AuditRow {
            id: self.id,
            at_us: self.at_us,
            actor: &self.actor,
            operation: &self.operation,
            key_name: self.key_name.as_deref(),
            version: self.version,
            reason: self.reason.as_deref(),
            detail: self.detail.as_deref(),
            key_fp: self.key_fp.as_deref().unwrap_or(&[]),
        };
        row.chain_hash(&self.prev).as_slice() == self.hash.as_slice()
    }
}

/// Audit rows in id order (or the one with id `only`). Read-only.
fn read_audit(only: Option<i64>) -> KmsResult<Vec<AuditRecord>> {
    Spi::connect(|c| -> Result<Vec<AuditRecord>, pgrx::spi::Error> {
        let t = match only {
            Some(id) => c.select(&format!("{AUDIT_SQL} WHERE id = $1"), None, &[id.into()])?,
            None => c.select(&format!("{AUDIT_SQL} ORDER BY id"), None, &[])?,
        };
        let mut out = Vec::new();
        for r in t {
            out.push(AuditRecord::read(&r)?);
        }
        Ok(out)
    })
    .map_err(KmsError::spi)
}

struct AuditCheck {
    rows: i64,
    first_bad: Option<i64>,
    problem: Option<String>,
    head_id: Option<i64>,
    head_mac: Option<String>,
}

/// The whole chain checked under the master key configured now. Caller is
/// the catalog owner.
fn check_audit_log() -> KmsResult<AuditCheck> {
    let kr = read_keyring(false)?;
    let current = match &kr {
        Some(k) => Some((k.fp.clone(), integrity_keys(&k.fp)?)),
        None => None,
    };
    let recs = read_audit(None)?;
    let last = recs.last();
    let mut out = AuditCheck {
        rows: recs.len() as i64,
        first_bad: None,
        problem: None,
        head_id: last.map(|r| r.id),
        head_mac: last.and_then(|r| r.mac.as_deref().map(hex_of)),
    };
    if let Some((id, why)) = find_problem(
        kr.as_ref(),
        current.as_ref().map(|(fp, k)| (fp.as_slice(), &**k)),
        &recs,
    )? {
        out.first_bad = id;
        out.problem = Some(why);
    }
    Ok(out)
}

fn find_problem(
    kr: Option<&KeyringRow>,
    current: Option<(&[u8], &IntegrityKeys)>,
    recs: &[AuditRecord],
) -> KmsResult<Option<(Option<i64>, String)>> {
    let bad = |id: i64, why: &str| Ok(Some((Some(id), format!("row {id}: {why}"))));
    let mut prev = vec![0u8; 32];
    let mut last_fp: Option<&[u8]> = None;
    let mut seen_current = false;
    for (i, r) in recs.iter().enumerate() {
        let expect = i as i64 + 1;
        if r.id != expect {
            return bad(expect, &format!("missing (the next row is {})", r.id));
        }
        if r.prev != prev {
            return bad(r.id, "prev_hash is not the hash of the row before it: rows were removed, inserted or reordered");
        }
        let op = r.operation.as_slice();
        match (&r.mac, &r.key_fp) {
            (None, _) => {
                if last_fp.is_some() {
                    return bad(r.id, "an unkeyed row after keyed rows");
                }
                if r.legacy_hash.as_deref() != Some(r.hash.as_slice()) {
                    return bad(r.id, "hash does not match the row's content");
                }
            }
            (Some(mac), Some(fp)) => {
                if !r.content_ok() {
                    return bad(r.id, "hash does not match the row's content");
                }
                match last_fp {
                    None if r.id != 1 && op != b"adopt_integrity" && op != b"rotate_master_key" => {
                        return bad(
                            r.id,
                            "the first keyed row after unkeyed rows is not an adoption of MACs",
                        );
                    }
                    Some(l) if l != fp.as_slice() && op != b"rotate_master_key" => {
                        return bad(
                            r.id,
                            "the master key changes at a row that is not a master-key rotation",
                        );
                    }
                    _ => {}
                }
                match current {
                    Some((cfp, keys)) if cfp == fp.as_slice() => {
                        if !keys.audit.verify(&r.hash, mac) {
                            return bad(r.id, "its MAC does not verify under the master key: the row was altered or forged");
                        }
                        seen_current = true;
                    }
                    _ if seen_current => {
                        return bad(
                            r.id,
                            "MAC'd under another master key after rows MAC'd under the current one",
                        );
                    }
                    _ => {}
                }
                last_fp = Some(fp);
            }
            (Some(_), None) => {
                return bad(
                    r.id,
                    "a keyed row without the fingerprint of its master key",
                )
            }
        }
        prev.clone_from(&r.hash);
    }
    let keyed_keyring = kr.is_some_and(|k| k.since_us.is_some());
    match recs.last() {
        Some(r) if last_fp.is_some() && !seen_current => {
            return bad(
                r.id,
                "the newest row is not MAC'd under the current master key",
            );
        }
        Some(r) if keyed_keyring && r.mac.is_none() => {
            return bad(
                r.id,
                "the keyring's rows carry MACs but the newest audit row is unkeyed",
            );
        }
        Some(r) if !keyed_keyring && last_fp.is_some() => {
            return bad(r.id, "the chain is keyed but the kms.keyring row says rows carry no MACs: the keyring row was edited");
        }
        None if keyed_keyring => {
            return bad(
                1,
                "the audit log is empty although the keyring's rows carry MACs: rows were removed",
            );
        }
        _ => {}
    }
    let n = recs.len() as i64;
    let head = Spi::connect(|c| -> Result<Option<(i64, Vec<u8>)>, pgrx::spi::Error> {
        let Some(r) = c
            .select(
                "SELECT last_id, last_hash FROM kms.audit_head",
                Some(1),
                &[],
            )?
            .next()
        else {
            return Ok(None);
        };
        Ok(Some((
            r.get::<i64>(1)?.unwrap_or(0),
            r.get::<Vec<u8>>(2)?.unwrap_or_default(),
        )))
    })
    .map_err(KmsError::spi)?;
    if let Some((hid, hhash)) = head {
        if hid != n || hhash != prev {
            return bad(
                if hid > n { n + 1 } else { hid },
                &format!("kms.audit_head names row {hid} but the log ends at row {n}"),
            );
        }
    }
    // Destroyed material must stay destroyed.
    let revived = Spi::connect(|c| -> Result<Option<(i64, String)>, pgrx::spi::Error> {
        let Some(r) = c
            .select(
                "SELECT a.id, a.key_name || coalesce(' version ' || a.version, '')
                   FROM kms.audit_log a JOIN kms.keys k ON k.key_name = a.key_name
                  WHERE (a.operation = 'destroy_key_version'
                         AND EXISTS (SELECT 1 FROM kms.key_versions v
                                      WHERE v.key_id = k.key_id AND v.version = a.version AND v.state <> 'destroyed'))
                     OR (a.operation = 'destroy_key'
                         AND (k.destroyed_at IS NULL OR k.index_key IS NOT NULL
                              OR EXISTS (SELECT 1 FROM kms.key_versions v WHERE v.key_id = k.key_id AND v.state <> 'destroyed')))
                  ORDER BY a.id LIMIT 1",
                None,
                &[],
            )?
            .next()
        else {
            return Ok(None);
        };
        Ok(Some((r.get::<i64>(1)?.unwrap_or(0), r.get::<String>(2)?.unwrap_or_default())))
    })
    .map_err(KmsError::spi)?;
    if let Some((id, what)) = revived {
        return bad(id, &format!("records the destruction of {what}, but the catalog holds it again: a saved row was put back"));
    }
    // Key-state rows, as a load would check them (no audit row to name).
    if let (true, Some((fp, keys))) = (keyed_keyring, current) {
        for id in all_key_ids()? {
            let (key, versions) = key_rows(id, false)?;
            let vs: Vec<VersionCheck<'_>> = versions.iter().map(VersionRowData::check).collect();
            match verify_with(keys, fp, &key.check(), &vs) {
                Ok(()) => {}
                Err(KmsError::CatalogAltered { what, why }) => {
                    return Ok(Some((None, format!("catalog row altered: {what}: {why}"))))
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(None)
}

// kms_audit_log_check() is for the same roles as kms_verify_audit_log()
// (grants.sql then revokes PUBLIC's EXECUTE on every function).
extension_sql!(
    "GRANT EXECUTE ON FUNCTION kms_audit_log_check() TO kms_admin, kms_auditor;",
    name = "audit_log_check_grant",
    requires = [kms_audit_log_check]
);
