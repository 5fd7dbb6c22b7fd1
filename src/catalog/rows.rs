//! Typed reads of the `kms.*` catalog (the caller has switched to the
//! catalog owner, see [`super::as_catalog_owner`]). Read-only statements use
//! `Spi::connect` (no transaction id: they work on a standby and in
//! parallel workers).

use crate::errors::{KmsError, KmsResult};
use crate::pg::spi;
use pgrx::pg_sys;
use pgrx::prelude::*;

/// One row of a key and one of its versions, as a cold load reads them.
pub struct VersionRow {
    pub key_id: i32,
    pub name: String,
    pub primary: i32,
    pub version: i32,
    pub state: String,
    pub wrapped: Option<Vec<u8>>,
    pub index_root: Option<Vec<u8>>,
    // What the rows' MACs cover besides the above (checked on load).
    pub destroyed_us: Option<i64>,
    pub generation: i64,
    pub key_mac: Option<Vec<u8>>,
    pub version_mac: Option<Vec<u8>>,
}

const LOAD_SQL: &str = "SELECT k.key_id, k.key_name, k.primary_version, v.version, v.state, v.wrapped_key, k.index_key,
           (EXTRACT(epoch FROM k.destroyed_at) * 1000000)::int8, k.generation, k.row_mac, v.row_mac
      FROM kms.keys k JOIN kms.key_versions v ON v.key_id = k.key_id";

/// A key's rows (one per version) by key name.
pub fn key_version_rows_by_name(name: &str) -> KmsResult<Vec<VersionRow>> {
    key_version_rows(&format!("{LOAD_SQL} WHERE k.key_name = $1"), name.into())
}

/// A key's rows (one per version) by key id.
pub fn key_version_rows_by_id(id: i32) -> KmsResult<Vec<VersionRow>> {
    key_version_rows(&format!("{LOAD_SQL} WHERE k.key_id = $1"), id.into())
}

fn key_version_rows(q: &str, arg: pgrx::datum::DatumWithOid<'_>) -> KmsResult<Vec<VersionRow>> {
    Spi::connect(|c| -> Result<Vec<VersionRow>, pgrx::spi::Error> {
        let mut rows = Vec::new();
        for r in c.select(q, None, &[arg])? {
            rows.push(VersionRow {
                key_id: r.get::<i32>(1)?.unwrap_or(0),
                name: r.get::<String>(2)?.unwrap_or_default(),
                primary: r.get::<i32>(3)?.unwrap_or(0),
                version: r.get::<i32>(4)?.unwrap_or(0),
                state: r.get::<String>(5)?.unwrap_or_default(),
                wrapped: r.get::<Vec<u8>>(6)?,
                index_root: r.get::<Vec<u8>>(7)?,
                destroyed_us: r.get::<i64>(8)?,
                generation: r.get::<i64>(9)?.unwrap_or(0),
                key_mac: r.get::<Vec<u8>>(10)?,
                version_mac: r.get::<Vec<u8>>(11)?,
            });
        }
        Ok(rows)
    })
    .map_err(KmsError::spi)
}

/// The grant rows of a key: (privilege, the grantee's oid while the role
/// with that oid still has the name it was granted to, else None).
///
/// A grant applies only while the role with the oid it was given to exists
/// and still has the name it was given to: a role dropped and recreated
/// under the same name has a new oid and does not inherit it, a renamed
/// role loses it. Grants restored from another cluster's dump apply only
/// once `kms_rebind_key_grants()` has bound them to this cluster's roles
/// (or if the oid happens to name the same role name here). Every row,
/// applicable or not, keeps the key restricted.
pub fn key_grant_rows(key_id: i32) -> KmsResult<Vec<(String, Option<pg_sys::Oid>)>> {
    Spi::connect(
        |c| -> Result<Vec<(String, Option<pg_sys::Oid>)>, pgrx::spi::Error> {
            let mut out = Vec::new();
            for r in c.select(
                "SELECT g.privilege, r.oid FROM kms.key_grants g
               LEFT JOIN pg_catalog.pg_roles r
                 ON r.oid OPERATOR(pg_catalog.=) g.grantee_oid
                AND r.rolname::pg_catalog.text OPERATOR(pg_catalog.=) g.grantee
              WHERE g.key_id OPERATOR(pg_catalog.=) $1",
                None,
                &[key_id.into()],
            )? {
                out.push((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<pg_sys::Oid>(2)?,
                ));
            }
            Ok(out)
        },
    )
    .map_err(KmsError::spi)
}

/// The keyring's stored master-key fingerprint (caller is catalog owner).
pub fn stored_fingerprint(lock: bool) -> KmsResult<Option<Vec<u8>>> {
    if lock {
        spi::first(
            "SELECT master_key_fingerprint FROM kms.keyring FOR UPDATE",
            &[],
            true,
        )
    } else {
        spi::first("SELECT master_key_fingerprint FROM kms.keyring", &[], false)
    }
}

/// Wrapped key material: a version's wrapped data key, or (version 0) a
/// key's wrapped blind-index root.
pub struct WrappedRow {
    pub key_id: i32,
    pub key_name: String,
    pub version: i32,
    pub wrapped: Vec<u8>,
}

fn wrapped_rows(t: pgrx::spi::SpiTupleTable<'_>) -> Result<Vec<WrappedRow>, pgrx::spi::Error> {
    t.map(|r| {
        Ok(WrappedRow {
            key_id: r.get::<i32>(1)?.unwrap_or(0),
            key_name: r.get::<String>(2)?.unwrap_or_default(),
            version: r.get::<i32>(3)?.unwrap_or(0),
            wrapped: r.get::<Vec<u8>>(4)?.unwrap_or_default(),
        })
    })
    .collect()
}

/// Every wrapped data key, locked for update (a master-key rotation).
pub fn wrapped_versions_for_update() -> KmsResult<Vec<WrappedRow>> {
    Spi::connect_mut(|c| {
        wrapped_rows(c.update(
            "SELECT v.key_id, k.key_name, v.version, v.wrapped_key
               FROM kms.key_versions v JOIN kms.keys k ON k.key_id = v.key_id
              WHERE v.wrapped_key IS NOT NULL ORDER BY 1, 3 FOR UPDATE OF v",
            None,
            &[],
        )?)
    })
    .map_err(KmsError::spi)
}

/// Every wrapped blind-index root (as version 0).
pub fn wrapped_index_roots() -> KmsResult<Vec<WrappedRow>> {
    Spi::connect(|c| {
        wrapped_rows(c.select(
            "SELECT key_id, key_name, 0, index_key FROM kms.keys WHERE index_key IS NOT NULL",
            None,
            &[],
        )?)
    })
    .map_err(KmsError::spi)
}

/// Every wrapped data key and (as version 0) blind-index root.
pub fn all_wrapped_material() -> KmsResult<Vec<WrappedRow>> {
    Spi::connect(|c| {
        wrapped_rows(c.select(
            "SELECT k.key_id, k.key_name, v.version, v.wrapped_key FROM kms.keys k JOIN kms.key_versions v ON v.key_id = k.key_id
              WHERE v.wrapped_key IS NOT NULL
             UNION ALL
             SELECT key_id, key_name, 0, index_key FROM kms.keys WHERE index_key IS NOT NULL",
            None,
            &[],
        )?)
    })
    .map_err(KmsError::spi)
}

/// A version of a secret as stored (its value is an envelope).
pub struct SecretRow {
    pub value: Vec<u8>,
    pub version: i32,
    pub expired: bool,
    /// When it expires(d), as UTC text, or empty.
    pub expires_at: String,
}

/// The secret `name` at `version` (None: its latest version).
pub fn secret_row(name: &str, version: Option<i32>) -> KmsResult<Option<SecretRow>> {
    Spi::connect(|c| -> Result<Option<SecretRow>, pgrx::spi::Error> {
        let t = c.select(
            "SELECT s.value::bytea, s.version, coalesce(s.expires_at <= pg_catalog.now(), false),
                    coalesce(pg_catalog.to_char(s.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS UTC'), '')
               FROM kms.secrets s
              WHERE s.name = $1 AND ($2::int IS NULL OR s.version = $2)
              ORDER BY s.version DESC LIMIT 1",
            Some(1),
            &[name.into(), version.into()],
        )?;
        if t.is_empty() {
            return Ok(None);
        }
        let r = t.first();
        Ok(Some(SecretRow {
            value: r.get::<Vec<u8>>(1)?.unwrap_or_default(),
            version: r.get::<i32>(2)?.unwrap_or(0),
            expired: r.get::<bool>(3)?.unwrap_or(false),
            expires_at: r.get::<String>(4)?.unwrap_or_default(),
        }))
    })
    .map_err(KmsError::spi)
}

/// (key id, version) of every usable version that is not its key's
/// primary: the versions whose values the worker rewraps.
pub fn versions_to_rewrap() -> KmsResult<Vec<(i32, i32)>> {
    versions_where("v.version <> k.primary_version AND v.state IN ('active', 'decrypt_only')")
}

/// (key id, version) of every disabled version: values sealed under one
/// can be neither read nor rewrapped until it is enabled again.
pub fn disabled_versions() -> KmsResult<Vec<(i32, i32)>> {
    versions_where("v.state = 'disabled'")
}

fn versions_where(cond: &'static str) -> KmsResult<Vec<(i32, i32)>> {
    Spi::connect(|c| -> Result<Vec<(i32, i32)>, pgrx::spi::Error> {
        let mut out = Vec::new();
        for r in c.select(
            &format!(
                "SELECT v.key_id, v.version FROM kms.keys k JOIN kms.key_versions v ON v.key_id = k.key_id
                  WHERE {cond} ORDER BY 1, 2"
            ),
            None,
            &[],
        )? {
            out.push((r.get::<i32>(1)?.unwrap_or(0), r.get::<i32>(2)?.unwrap_or(0)));
        }
        Ok(out)
    })
    .map_err(KmsError::spi)
}

/// (key id, version, state) of every version of the key `name`, in order
/// (empty: no such key).
pub fn versions_of_key(name: &str) -> KmsResult<Vec<(i32, i32, String)>> {
    Spi::connect(|c| -> Result<Vec<(i32, i32, String)>, pgrx::spi::Error> {
        let mut out = Vec::new();
        for r in c.select(
            "SELECT k.key_id, v.version, v.state FROM kms.keys k JOIN kms.key_versions v USING (key_id)
              WHERE k.key_name = $1 ORDER BY v.version",
            None,
            &[name.into()],
        )? {
            out.push((
                r.get::<i32>(1)?.unwrap_or(0),
                r.get::<i32>(2)?.unwrap_or(0),
                r.get::<String>(3)?.unwrap_or_default(),
            ));
        }
        Ok(out)
    })
    .map_err(KmsError::spi)
}
