//! Key lifecycle: the acts behind the SQL of `crate::api::keys` (create,
//! rotate, set primary, disable, enable, destroy, grants, master-key
//! rotation) and the health report.
//!
//! Every act runs under the catalog owner's identity with a pinned
//! `search_path`, checks the MACs of the key-state rows it reads, appends
//! a keyed, chained audit row (see `crate::keys::audit` and
//! `crate::keys::integrity`), re-MACs the rows it changed, sends `NOTIFY kms_events`,
//! and invalidates every backend's key cache.

//!
//! * this file: the frame every act runs in ([`lifecycle`]) and the helpers
//!   acts share (argument checks, locking a key's rows, state changes);
//! * [`versions`]: keys and versions (create, rotate, set primary,
//!   disable, enable, destroy);
//! * [`grants`]: per-key grants; [`master`]: master-key rotation;
//! * [`policy`]: key policy after creation (`kms_alter_key`) and what the
//!   worker does with it (retire_after, destroy_after, emergency rotation);
//! * [`sync`]: one keyring across clusters (export, import);
//! * [`health`](mod@health): `kms_health()` and the audit log checks.

mod grants;
mod health;
mod master;
pub mod policy;
mod sync;
mod versions;

pub use grants::*;
pub use health::*;
pub use master::*;
pub use policy::alter_key_sql;
pub use sync::*;
pub use versions::*;

use crate::catalog;
use crate::crypto::Kek;
use crate::errors::{KmsError, KmsResult, OrRaise};
use crate::keys::audit::{append, begin_act, Act};
use crate::keys::integrity::*;
use crate::keys::{self, State};
use crate::pg::datum::RawText;
use crate::pg::spi;
use pgrx::pg_sys;
use pgrx::prelude::*;
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
pub(crate) fn guard_catalog() -> KmsResult<()> {
    spi::exec("LOCK TABLE kms.keyring, kms.keys, kms.key_versions, kms.key_grants IN SHARE ROW EXCLUSIVE MODE", &[])?;
    let foreign = spi::one::<String>(
        "SELECT x FROM (
             SELECT t.tgrelid::pg_catalog.regclass::pg_catalog.text || ' trigger ' || t.tgname AS x
               FROM pg_catalog.pg_trigger t
               JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'kms' AND NOT t.tgisinternal
                AND NOT (c.relname = 'audit_log' AND t.tgname IN ('audit_log_no_update_delete', 'audit_log_no_truncate'))
                AND NOT (c.relname = 'access_log' AND t.tgname IN ('access_log_no_update_delete', 'access_log_no_truncate'))
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
            rotate_key(name, Some(RawText::from_ascii("scheduled")), false)?;
        }
        Ok(())
    });
    due
}

/// Runs an act on `kms.protected_columns` (kms_protect_column,
/// kms_unprotect_column) as the catalog owner, then appends its audit row:
/// `f` returns (operation, key name, detail). Statements on the user's
/// table are not run here (they run as its owner, see `crate::protect`).
pub fn protect_act(f: impl FnOnce() -> KmsResult<(&'static str, String, String)>) -> KmsResult<()> {
    lifecycle(|| {
        let act = begin_act()?;
        let (operation, key, detail) = f()?;
        append(
            &act.keys,
            &act.fp,
            operation,
            Some(&key),
            None,
            None,
            Some(&detail),
        )?;
        Ok(())
    });
    Ok(())
}
