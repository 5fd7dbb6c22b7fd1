//! Per-key grants: grant, revoke, and rebinding grants restored from
//! another cluster to this cluster's roles.

use super::*;
use crate::errors::{KmsError, KmsResult};
use crate::keys::audit::audit;
use crate::keys::Privilege;
use crate::pg::datum::{RawText, RegRole};
use crate::pg::spi;
use pgrx::prelude::*;

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
