//! `kms_health()` and the audit log checks behind
//! `kms_verify_audit_log()` and `kms_audit_log_check()`.

use crate::catalog;
use crate::errors::{KmsError, KmsResult, OrRaise};
use crate::keys::audit::check_audit_log;
use crate::keys::{self, Which};
use crate::pg::spi;
use pgrx::pg_sys;
use serde_json::json;

/// The body of SQL `kms_verify_audit_log()`.
pub fn verify_audit_log() -> bool {
    catalog::as_catalog_owner(|_| check_audit_log().map(|c| c.problem.is_none())).or_raise()
}

/// The body of SQL `kms_audit_log_check()`: the whole chain checked.
pub fn audit_log_check() -> crate::keys::audit::AuditCheck {
    catalog::as_catalog_owner(|_| check_audit_log()).or_raise()
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
            "access_audit": keys::access_log::health_status()?,
        });
        if let (Some(obj), serde_json::Value::Object(c)) = (v.as_object_mut(), counts) {
            obj.extend(c);
        }
        Ok(v)
    })
    .or_raise();
    pgrx::JsonB(report)
}
