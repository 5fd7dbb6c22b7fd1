//! `kms_health()`, `kms_warnings` and the audit log checks behind
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
    let paused = !crate::pg::guc::REENCRYPT_ENABLED.get();
    let reason = if pid.is_some() {
        // Alive but idle: it rewraps nothing and rotates nothing.
        paused.then_some("paused: pg_kms.reencrypt_enabled = off")
    } else if !crate::pg::preloaded() {
        Some("pg_kms is not in shared_preload_libraries: no background re-encryption or scheduled rotation (use kms_reencrypt_now())")
    // SAFETY: RecoveryInProgress only reads shared state (any backend may
    // call it).
    } else if unsafe { pg_sys::RecoveryInProgress() } {
        Some("this server is a standby: the worker starts after promotion")
    } else if paused {
        Some("paused: pg_kms.reencrypt_enabled = off")
    } else {
        Some("the worker for this database has not started yet (it is started within pg_kms.reencrypt_naptime), or max_worker_processes is exhausted")
    };
    Ok(json!({ "running": pid.is_some() && !paused, "pid": pid, "reason": reason }))
}

/// Active key versions (the only ones that still encrypt) whose
/// encryptions since start reached the warning level: (key, version,
/// encryptions).
fn nonce_budget() -> KmsResult<Vec<(String, i32, u64)>> {
    let threshold = crate::pg::guc::NONCE_WARNING_ENCRYPTIONS.get() as u64;
    let mut out = Vec::new();
    for (key_id, version, enc, _) in crate::pg::shmem::stats_of_this_db() {
        if enc >= threshold {
            let name = spi::read::<String>(
                "SELECT k.key_name FROM kms.keys k JOIN kms.key_versions v ON v.key_id = k.key_id
                  WHERE k.key_id = $1 AND v.version = $2 AND v.state = 'active' AND k.destroyed_at IS NULL",
                &[(key_id as i32).into(), (version as i32).into()],
            )?;
            if let Some(name) = name {
                out.push((name, version as i32, enc));
            }
        }
    }
    Ok(out)
}

const NONCE_MESSAGE: &str =
    "rotate this key: AES-GCM random nonces allow at most 2^32 encryptions per key";

/// Key versions whose encryptions since start reached the warning level.
fn nonce_warnings() -> KmsResult<serde_json::Value> {
    Ok(serde_json::Value::Array(
        nonce_budget()?
            .into_iter()
            .map(|(name, version, enc)| {
                json!({ "key_name": name, "version": version, "encryptions": enc,
                        "message": NONCE_MESSAGE })
            })
            .collect(),
    ))
}

/// One line of `kms_warnings` (and of `kms_health()->'warnings'`).
#[derive(Debug, Clone)]
pub struct Warning {
    /// 'warning' (needs action) or 'notice' (will need action soon).
    pub severity: &'static str,
    pub kind: &'static str,
    pub key_name: Option<String>,
    pub version: Option<i32>,
    pub table_name: Option<String>,
    pub column_name: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

impl Warning {
    fn json(&self) -> serde_json::Value {
        json!({
            "severity": self.severity, "kind": self.kind, "key_name": self.key_name,
            "version": self.version, "table_name": self.table_name,
            "column_name": self.column_name, "message": self.message, "hint": self.hint,
        })
    }
}

type Row = (
    Option<String>,
    Option<i32>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// Rows of `q`: (key_name, version, table_name, column_name, message).
fn rows(q: &str, args: &[pgrx::datum::DatumWithOid<'_>]) -> KmsResult<Vec<Row>> {
    pgrx::Spi::connect(|c| -> Result<Vec<Row>, pgrx::spi::Error> {
        let mut out = Vec::new();
        for r in c.select(q, None, args)? {
            out.push((
                r.get::<String>(1)?,
                r.get::<i32>(2)?,
                r.get::<String>(3)?,
                r.get::<String>(4)?,
                r.get::<String>(5)?,
            ));
        }
        Ok(out)
    })
    .map_err(KmsError::spi)
}

fn add(
    out: &mut Vec<Warning>,
    severity: &'static str,
    kind: &'static str,
    hint: &str,
    found: Vec<Row>,
) {
    for (key_name, version, table_name, column_name, message) in found {
        out.push(Warning {
            severity,
            kind,
            key_name,
            version,
            table_name,
            column_name,
            message: message.unwrap_or_default(),
            hint: Some(hint.into()),
        });
    }
}

/// Everything that needs attention now (caller is the catalog owner).
fn collect_warnings() -> KmsResult<Vec<Warning>> {
    let mut out = Vec::new();
    let soon = crate::pg::guc::ROTATION_WARNING_S.get();
    // Scheduled rotations: overdue, or due within pg_kms.rotation_warning.
    add(
        &mut out,
        "warning",
        "rotation_overdue",
        "The background worker rotates due keys within pg_kms.reencrypt_naptime: check kms_health()->'worker', or rotate now with kms_rotate_key().",
        rows(
            "SELECT k.key_name, k.primary_version, NULL, NULL,
                    pg_catalog.format('key \"%s\" is overdue for rotation since %s (rotation_period %s)',
                                      k.key_name, p.created_at + k.rotation_period, k.rotation_period)
               FROM kms.keys k JOIN kms.key_versions p ON p.key_id = k.key_id AND p.version = k.primary_version
              WHERE k.rotation_period IS NOT NULL AND k.destroyed_at IS NULL
                AND p.created_at + k.rotation_period <= pg_catalog.now()
              ORDER BY 1",
            &[],
        )?,
    );
    add(
        &mut out,
        "notice",
        "rotation_due",
        "The background worker rotates it then (reason 'scheduled'); kms_rotate_key() rotates it now, kms_alter_key() changes the period.",
        rows(
            "SELECT k.key_name, k.primary_version, NULL, NULL,
                    pg_catalog.format('key \"%s\" is due for rotation at %s (within pg_kms.rotation_warning)',
                                      k.key_name, p.created_at + k.rotation_period)
               FROM kms.keys k JOIN kms.key_versions p ON p.key_id = k.key_id AND p.version = k.primary_version
              WHERE k.rotation_period IS NOT NULL AND k.destroyed_at IS NULL
                AND p.created_at + k.rotation_period > pg_catalog.now()
                AND p.created_at + k.rotation_period <= pg_catalog.now() + pg_catalog.make_interval(secs => $1)
              ORDER BY 1",
            &[(soon as f64).into()],
        )?,
    );
    // Rows sealed under a disabled version (counted by the worker's passes).
    add(
        &mut out,
        "warning",
        "rows_under_disabled",
        "They cannot be decrypted or rewrapped: see kms_key_usage(); enable the version (kms_enable_key_version) for the worker to rewrap them, or rewrite or delete those rows.",
        rows(
            "SELECT NULL, NULL, p.relid::pg_catalog.regclass::pg_catalog.text, p.attname::pg_catalog.text,
                    pg_catalog.format('%s rows of %s.%s are sealed under a disabled key version',
                                      p.rows_under_disabled, p.relid::pg_catalog.regclass, pg_catalog.quote_ident(p.attname))
               FROM kms.reencryption_progress p
              WHERE p.rows_under_disabled > 0
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = p.relid)
              ORDER BY 3, 4",
            &[],
        )?,
    );
    // The worker.
    let paused = !crate::pg::guc::REENCRYPT_ENABLED.get();
    if paused {
        out.push(Warning {
            severity: "warning",
            kind: "worker_paused",
            key_name: None,
            version: None,
            table_name: None,
            column_name: None,
            message: "the background worker is paused: pg_kms.reencrypt_enabled = off (no re-encryption, no scheduled rotation, no retirement)".into(),
            hint: Some("ALTER SYSTEM SET pg_kms.reencrypt_enabled = on; SELECT pg_reload_conf();".into()),
        });
    }
    if crate::pg::preloaded() && !paused {
        let naptime_s = (crate::pg::guc::REENCRYPT_NAPTIME_MS.get() as f64) / 1000.0;
        let limit = (naptime_s * 6.0).max(60.0);
        add(
            &mut out,
            "warning",
            "worker_stalled",
            "Check the server log and last_error in kms_reencryption_progress; kms_reencrypt_now() rewraps a column at once.",
            rows(
                    "SELECT NULL, NULL, p.relid::pg_catalog.regclass::pg_catalog.text, p.attname::pg_catalog.text,
                            pg_catalog.format('the worker made no progress on %s.%s since %s while %s rows are pending%s',
                                              p.relid::pg_catalog.regclass, pg_catalog.quote_ident(p.attname),
                                              coalesce(p.last_batch_at, p.started_at), p.rows_pending,
                                              coalesce(' (last error: ' || p.last_error || ')', ''))
                       FROM kms.reencryption_progress p
                      WHERE p.rows_pending > 0
                        AND coalesce(p.last_batch_at, p.started_at) < pg_catalog.now() - pg_catalog.make_interval(secs => $1)
                        AND EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = p.relid)
                        AND (p.backoff_until IS NULL OR p.backoff_until <= pg_catalog.now())
                      ORDER BY 3, 4",
                &[limit.into()],
            )?,
        );
    }
    add(
        &mut out,
        "warning",
        "worker_backoff",
        "The worker retries the table when the backoff ends; fix the cause named in last_error (kms_reencryption_progress).",
        rows(
            "SELECT NULL, NULL, p.relid::pg_catalog.regclass::pg_catalog.text, p.attname::pg_catalog.text,
                    pg_catalog.format('the worker backs off %s.%s after %s failed attempts, until %s%s',
                                      p.relid::pg_catalog.regclass, pg_catalog.quote_ident(p.attname),
                                      p.failures, p.backoff_until,
                                      coalesce(' (last error: ' || p.last_error || ')', ''))
               FROM kms.reencryption_progress p
              WHERE p.failures > 0 AND p.backoff_until > pg_catalog.now()
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = p.relid)
              ORDER BY 3, 4",
            &[],
        )?,
    );
    for (name, version, enc) in nonce_budget()? {
        out.push(Warning {
            severity: "warning",
            kind: "nonce_budget",
            key_name: Some(name),
            version: Some(version),
            table_name: None,
            column_name: None,
            message: format!("{enc} encryptions under this version since server start: {NONCE_MESSAGE}"),
            hint: Some("kms_rotate_key() makes a new version primary; pg_kms.nonce_warning_encryptions sets the level.".into()),
        });
    }
    Ok(out)
}

/// The body of SQL `kms_warnings_list()` (view `kms_warnings`).
pub fn warnings() -> Vec<Warning> {
    catalog::as_catalog_owner(|_| collect_warnings()).or_raise()
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
        // Destroyed keys are not counted (their versions show as destroyed).
        let counts = spi::read::<pgrx::JsonB>(
            "SELECT jsonb_build_object(
                'keys', (SELECT count(*) FROM kms.keys WHERE destroyed_at IS NULL),
                'destroyed_keys', (SELECT count(*) FROM kms.keys WHERE destroyed_at IS NOT NULL),
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
            "warnings": collect_warnings()?.iter().map(Warning::json).collect::<Vec<_>>(),
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
