//! A small secrets store (API tokens, passwords): versioned values sealed
//! as `encrypted_text` in `kms.secrets`, so rotation and the background
//! worker cover them like any other column. Only kms_admin members and
//! roles granted 'decrypt' on the secret's key may read a value; the
//! `kms_secrets` view never shows values.

use crate::catalog;
use crate::errors::{KmsError, KmsResult, OrRaise};
use crate::keys::audit::audit;
use crate::lifecycle::lifecycle;
use crate::pg::datum::{EncryptedText, OutText, RawText};
use crate::pg::spi;
use pgrx::datum::Interval;
use pgrx::pg_sys;

/// Key used when `kms_secret_set` is given no key (created on first use).
pub const DEFAULT_KEY: &str = "kms.secrets";

fn secret_name(name: &Option<RawText>) -> KmsResult<String> {
    let b = name.as_ref().map(|n| n.bytes()).unwrap_or(&[]);
    Ok(crate::crypto::names::secret_name(b)?.to_string())
}

/// The body of SQL `kms_secret_set()`.
pub fn secret_set(
    name: Option<RawText>,
    value: Option<RawText>,
    key_name: Option<RawText>,
    ttl: Option<Interval>,
    tags: Option<pgrx::JsonB>,
) -> i32 {
    lifecycle(|| {
        let name = secret_name(&name)?;
        let Some(value) = value else {
            return Err(KmsError::BadArgument {
                message: "secret value must not be NULL".into(),
                hint: "Use kms_secret_delete() to remove a secret.",
            });
        };
        let key = match &key_name {
            Some(k) => crate::crypto::names::key_name(k.bytes())?.to_string(),
            None => {
                let exists = spi::one::<bool>(
                    "SELECT true FROM kms.keys WHERE key_name = $1",
                    &[DEFAULT_KEY.into()],
                )?;
                if exists.is_none() {
                    crate::lifecycle::create_key(DEFAULT_KEY, None)?;
                }
                DEFAULT_KEY.to_string()
            }
        };
        if let Some(t) = ttl {
            if spi::one::<bool>("SELECT $1 > interval '0'", &[t.into()])? != Some(true) {
                return Err(KmsError::BadArgument {
                    message: "ttl must be a positive interval".into(),
                    hint: "Pass NULL for a secret that does not expire.",
                });
            }
        }
        let sealed = crate::values::seal_text(value.bytes(), key.as_bytes(), &[])?;
        spi::exec("LOCK TABLE kms.secrets IN SHARE ROW EXCLUSIVE MODE", &[])?;
        let version = spi::one::<i32>(
            "SELECT coalesce(max(version), 0) + 1 FROM kms.secrets WHERE name = $1",
            &[name.as_str().into()],
        )?
        .unwrap_or(1);
        let type_oid = crate::pg::datum::encrypted_text_oid()?;
        spi::exec(
            "INSERT INTO kms.secrets (name, version, value, created_at, expires_at, tags)
             VALUES ($1, $2, $3, pg_catalog.now(), pg_catalog.now() + $4, coalesce($5, '{}'::jsonb))",
            &[
                name.as_str().into(),
                version.into(),
                // SAFETY: `sealed` is an encrypted_text varlena palloc'd in
                // the current memory context, alive until spi::exec returns,
                // and `type_oid` is the oid of encrypted_text: the Datum
                // and the declared type agree.
                unsafe { pgrx::datum::DatumWithOid::new(sealed, type_oid) },
                ttl.into(),
                tags.into(),
            ],
        )?;
        audit(
            "secret_set",
            Some(&key),
            None,
            Some(RawText::from_ascii(&format!(
                "secret {name} version {version}"
            ))),
        )?;
        Ok(version)
    })
}

/// The body of SQL `kms_secret_get()`.
pub fn secret_get(name: Option<RawText>, version: Option<i32>) -> Option<OutText> {
    let caller = crate::pg::identity::current_user();
    let r = catalog::as_catalog_owner(|_| {
        let name = secret_name(&name)?;
        let admin = spi::read::<pg_sys::Oid>(
            "SELECT oid FROM pg_catalog.pg_roles WHERE rolname = 'kms_admin'",
            &[],
        )?;
        // SAFETY: plain catalog (syscache) lookup on two role oids, inside
        // the transaction running this function.
        let is_admin = admin.is_some_and(|a| unsafe { pg_sys::has_privs_of_role(caller, a) });
        let denied = || KmsError::SecretNotAllowed {
            role: crate::errors::role_display(caller),
            name: name.clone(),
        };
        let row = crate::catalog::rows::secret_row(&name, version)?;
        let Some(crate::catalog::rows::SecretRow {
            value: bytes,
            version: v,
            expired,
            expires_at: at,
        }) = row
        else {
            if !is_admin {
                return Err(denied());
            }
            return Err(KmsError::UnknownSecret { name, version });
        };
        let value = EncryptedText::from_bytes(&bytes);
        let key_id = value.envelope().header.key_id;
        // Not a kms_admin member: needs a valid 'decrypt' grant on this very
        // key (a key without grants does not open secrets to every kms_user).
        // Decided from the catalog alone, before the key is loaded, so no
        // key or master-key error can tell such a caller anything either.
        if !is_admin && !may_decrypt(caller, key_id)? {
            return Err(denied());
        }
        if expired {
            return Err(KmsError::SecretExpired {
                name,
                version: v,
                at,
            });
        }
        crate::values::decrypt_secret_text(&value, caller)
    });
    Some(r.or_raise())
}

/// Whether `role` holds (directly or through membership) a valid 'decrypt'
/// grant on key `key_id` (caller is the catalog owner).
fn may_decrypt(role: pg_sys::Oid, key_id: u32) -> KmsResult<bool> {
    Ok(spi::read::<bool>(
        "SELECT EXISTS (SELECT 1 FROM kms.key_grants g
                          JOIN pg_catalog.pg_roles r ON r.oid = g.grantee_oid AND r.rolname::pg_catalog.text = g.grantee
                         WHERE g.key_id = $1 AND g.privilege = 'decrypt'
                           AND pg_catalog.pg_has_role($2, r.oid, 'USAGE'))",
        &[(key_id as i32).into(), role.into()],
    )?
    .unwrap_or(false))
}

/// The body of SQL `kms_secret_delete()`.
pub fn secret_delete(name: Option<RawText>) -> i64 {
    lifecycle(|| {
        let name = secret_name(&name)?;
        let n = spi::one::<i64>(
            "WITH d AS (DELETE FROM kms.secrets WHERE name = $1 RETURNING 1) SELECT count(*) FROM d",
            &[name.as_str().into()],
        )?
        .unwrap_or(0);
        if n == 0 {
            return Err(KmsError::UnknownSecret {
                name,
                version: None,
            });
        }
        audit(
            "secret_delete",
            None,
            None,
            Some(RawText::from_ascii(&format!("secret {name}, {n} versions"))),
        )?;
        Ok(n)
    })
}
