//! Keys and their versions: create, rotate, set primary, disable, enable,
//! destroy (a version or the whole key, with its destruction receipt).

use super::*;
use crate::crypto::integrity;
use crate::errors::{KmsError, KmsResult};
use crate::keys::audit::{begin_act, Act};
use crate::keys::integrity::*;
use crate::keys::{self, State};
use crate::pg::datum::RawText;
use crate::pg::spi;
use pgrx::datum::Interval;
use pgrx::prelude::*;
use serde_json::json;
use zeroize::Zeroizing;

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
/// `emergency`: the version replaced is marked `retire_when_unreferenced`
/// (the worker rewraps the key's rows at once and disables that version as
/// soon as no row references it, see [`super::policy`]).
pub fn rotate_key(name: &str, reason: Option<RawText>, emergency: bool) -> KmsResult<i32> {
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
    let detail = if emergency {
        // The replaced version, if it is decrypt_only now (set_primary may
        // have left the primary elsewhere: nothing else is marked).
        let marked = spi::one::<i32>(
            "UPDATE kms.key_versions SET retire_when_unreferenced = true
              WHERE key_id = $1 AND version = $2 AND state = 'decrypt_only' RETURNING version",
            &[key.id.into(), key.primary.into()],
        )?;
        Some(json!({ "emergency": true, "retire_when_unreferenced": marked }).to_string())
    } else {
        None
    };
    record(
        &act,
        "rotate_key",
        &key,
        Some(new_version),
        reason,
        detail.as_deref(),
    )?;
    Ok(new_version)
}

/// The body of SQL `kms_rotate_key()`.
pub fn rotate_key_sql(key_name: RawText, reason: Option<RawText>, emergency: bool) -> i32 {
    lifecycle(|| rotate_key(name_arg(&key_name)?, reason, emergency))
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
                state,
                action: "make it primary",
            });
        }
        set_state(&key, key.primary, State::DecryptOnly)?;
        set_state(&key, version, State::Active)?;
        // Made primary again by hand: an emergency rotation's mark is undone.
        spi::exec(
            "UPDATE kms.key_versions SET retire_when_unreferenced = false
              WHERE key_id = $1 AND version = $2",
            &[key.id.into(), version.into()],
        )?;
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
            state: State::Destroyed,
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
                state: State::Destroyed,
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
        destroy_version_row(&act, name, &key, version, reason)
    })
}

/// Erases a version's wrapped material and appends its audit row with the
/// destruction receipt (callers checked the guard). Also the worker's
/// `destroy_after` policy.
pub(super) fn destroy_version_row(
    act: &Act,
    name: &str,
    key: &KeyRow,
    version: i32,
    reason: Option<RawText>,
) -> KmsResult<()> {
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
        "material_mac": material_mac(act, key.id, version, &wrapped),
    });
    set_state(key, version, State::Destroyed)?;
    record(
        act,
        "destroy_key_version",
        key,
        Some(version),
        reason,
        Some(&receipt.to_string()),
    )
    .map(|_| ())
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
