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
