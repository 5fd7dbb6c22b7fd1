//! A small secrets store (API tokens, passwords): versioned values sealed
//! as `encrypted_text` in `kms.secrets`, so rotation and the background
//! worker cover them like any other column. Only kms_admin members and
//! roles granted 'decrypt' on the secret's key may read a value; the
//! `kms_secrets` view never shows values.

use crate::catalog;
use crate::errors::{KmsError, KmsResult, OrRaise};
use crate::keys::audit::{append, audit, begin_act};
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
            if spi::one::<bool>("SELECT $1 >= interval '0'", &[t.into()])? != Some(true) {
                return Err(KmsError::BadArgument {
                    message: "ttl must not be a negative interval".into(),
                    hint: "Pass NULL to keep the previous version's ttl (none for a new secret), or interval '0' for a version that does not expire.",
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
        // ttl and tags not given (NULL): the previous version's (its ttl is
        // expires_at - created_at); ttl interval '0': no expiry.
        spi::exec(
            "INSERT INTO kms.secrets (name, version, value, created_at, expires_at, tags)
             SELECT $1, $2, $3, pg_catalog.now(),
                    CASE WHEN $4 = interval '0' THEN NULL ELSE pg_catalog.now() + coalesce($4, p.ttl) END,
                    coalesce($5, p.tags, '{}'::jsonb)
               FROM (SELECT 1) one
               LEFT JOIN (SELECT s.expires_at - s.created_at AS ttl, s.tags FROM kms.secrets s
                           WHERE s.name = $1 ORDER BY s.version DESC LIMIT 1) p ON true",
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
    // Every read is audited: it needs a read-write transaction (the same
    // error for every caller, before anything about the secret is looked at).
    // SAFETY: as in lifecycle::lifecycle: a spinlock-protected shared read
    // and a plain read of a backend global.
    if unsafe { pg_sys::RecoveryInProgress() || pg_sys::XactReadOnly } {
        KmsError::SecretReadOnly.raise();
    }
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
        let out = crate::values::decrypt_secret_text(&value, caller)?;
        audit_read(&name, v, version.is_some(), &value)?;
        Ok(out)
    });
    Some(r.or_raise())
}

/// Appends the lifecycle-audit row of one secret read (`secret_read`: the
/// key and key version that opened it, the secret's name and version, and
/// whether that version was asked for by number). Caller is the catalog
/// owner.
fn audit_read(name: &str, version: i32, explicit: bool, value: &EncryptedText) -> KmsResult<()> {
    let h = value.envelope().header;
    let key = spi::read::<String>(
        "SELECT key_name FROM kms.keys WHERE key_id = $1",
        &[(h.key_id as i32).into()],
    )?;
    let newest = spi::read::<i32>(
        "SELECT max(version) FROM kms.secrets WHERE name = $1",
        &[name.into()],
    )?;
    let newest = newest.unwrap_or(version);
    let how = match (explicit, version == newest) {
        (false, _) => String::new(),
        (true, true) => " (asked for by number)".into(),
        (true, false) => format!(" (asked for by number; the newest is {newest})"),
    };
    let detail = serde_json::json!({
        "secret": name,
        "secret_version": version,
        "newest_version": newest,
        "explicit_version": explicit,
    })
    .to_string();
    // The audit row exists only if the reader's transaction commits: the
    // server log gets a line at once, so a read rolled back is not
    // unrecorded (no value; the secret's name, as the audit row has it).
    pgrx::log!(
        "pg_kms: secret read: {} version {version}{how} by role {}",
        crate::errors::quote_ident(name),
        crate::errors::role_display(crate::pg::identity::acting_user())
    );
    // A read is an act: the same guard as the others (a keyring from before
    // MACs adopts them here as it would at any act). Like every act it holds
    // the audit chain's lock until the reader's transaction ends: read
    // secrets in short transactions.
    crate::lifecycle::guard_catalog()?;
    let act = begin_act()?;
    append(
        &act.keys,
        &act.fp,
        "secret_read",
        key.as_deref(),
        Some(h.key_version as i32),
        Some(RawText::from_ascii(&format!(
            "secret {name} version {version}{how}"
        ))),
        Some(&detail),
    )?;
    Ok(())
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

/// The body of SQL `kms_secret_purge_expired()`: deletes every expired
/// version of every secret, audited (which versions, in the detail), and
/// returns how many.
pub fn secret_purge_expired() -> i64 {
    lifecycle(|| {
        spi::exec("LOCK TABLE kms.secrets IN SHARE ROW EXCLUSIVE MODE", &[])?;
        let purged = spi::one::<pgrx::JsonB>(
            "WITH d AS (DELETE FROM kms.secrets WHERE expires_at <= pg_catalog.now() RETURNING name, version)
             SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object('secret', name, 'version', version)
                                                  ORDER BY name, version), '[]')
               FROM d",
            &[],
        )?
        .map(|j| j.0)
        .unwrap_or_default();
        let n = purged.as_array().map_or(0, Vec::len) as i64;
        let detail = purged.to_string();
        let act = begin_act()?;
        append(
            &act.keys,
            &act.fp,
            "secret_purge_expired",
            None,
            None,
            Some(RawText::from_ascii(&format!("{n} expired secret versions"))),
            Some(&detail),
        )?;
        Ok(n)
    })
}
