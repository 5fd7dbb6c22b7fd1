//! `kms.reencryption_progress`: what the worker (and `kms_reencrypt_now`)
//! records per encrypted column, shown by the `kms_reencryption_progress`
//! view. Written as the catalog owner, whoever calls.

use crate::errors::KmsResult;
use crate::pg::spi;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;

/// Runs a statement on `kms.*` as the catalog owner (search_path pinned),
/// whoever calls: the worker, or `kms_reencrypt_now`'s caller.
fn exec(q: &str, args: &[DatumWithOid<'_>]) -> KmsResult<()> {
    super::as_catalog_owner(|_| spi::exec(q, args))
}

/// A column was counted (a pass starts, or one ended): `pending` rows to
/// rewrap, `with_context` sealed with a context only the application can
/// give, `under_disabled` sealed under a disabled version.
pub fn start(
    relid: pg_sys::Oid,
    attname: &str,
    pending: i64,
    with_context: i64,
    under_disabled: i64,
) -> KmsResult<()> {
    exec(
        "INSERT INTO kms.reencryption_progress AS p
              (relid, attname, rows_rewrapped, rows_pending, rows_needing_context, started_at, finished_at,
               rows_under_disabled)
         VALUES ($1, $2, 0, $3, $4, pg_catalog.now(), CASE WHEN $3 = 0 THEN pg_catalog.now() END, $5)
         ON CONFLICT (relid, attname) DO UPDATE SET
              rows_pending = excluded.rows_pending,
              rows_needing_context = excluded.rows_needing_context,
              rows_under_disabled = excluded.rows_under_disabled,
              -- A new pass (rows pending after a finished one) starts from 0;
              -- a count that finds the column still clean keeps the last
              -- pass's figures.
              rows_rewrapped = CASE WHEN p.finished_at IS NULL OR excluded.rows_pending = 0
                                    THEN p.rows_rewrapped ELSE 0 END,
              started_at = CASE WHEN p.finished_at IS NULL THEN coalesce(p.started_at, pg_catalog.now())
                                WHEN excluded.rows_pending > 0 THEN pg_catalog.now()
                                ELSE p.started_at END,
              finished_at = CASE WHEN excluded.rows_pending = 0
                                 THEN coalesce(p.finished_at, pg_catalog.now()) END,
              -- An error stays until the column is clean: a new pass over a
              -- table with a row that cannot be rewrapped keeps naming it.
              last_error = CASE WHEN excluded.rows_pending = 0 THEN NULL ELSE p.last_error END",
        &[
            relid.into(),
            attname.into(),
            pending.into(),
            with_context.into(),
            under_disabled.into(),
        ],
    )
}

/// A batch of `rewrapped` rows was committed (a batch that rewraps a row
/// ends any backoff).
pub fn batch(relid: pg_sys::Oid, attname: &str, rewrapped: i64) -> KmsResult<()> {
    exec(
        "UPDATE kms.reencryption_progress
            SET rows_rewrapped = rows_rewrapped + $3,
                rows_pending = greatest(rows_pending - $3, 0),
                last_batch_at = pg_catalog.now(),
                -- The batch that rewraps the last row pending ends the pass.
                finished_at = CASE WHEN $3 > 0 AND rows_pending <= $3 THEN pg_catalog.now()
                                   ELSE finished_at END,
                failures = CASE WHEN $3 > 0 THEN 0 ELSE failures END,
                backoff_until = CASE WHEN $3 > 0 THEN NULL ELSE backoff_until END
          WHERE relid = $1 AND attname = $2",
        &[relid.into(), attname.into(), rewrapped.into()],
    )
}

/// The column's last error (a row that cannot be rewrapped, a timeout).
pub fn error(relid: pg_sys::Oid, attname: &str, message: &str) -> KmsResult<()> {
    exec(
        "INSERT INTO kms.reencryption_progress AS p (relid, attname, last_error) VALUES ($1, $2, $3)
         ON CONFLICT (relid, attname) DO UPDATE SET last_error = excluded.last_error",
        &[relid.into(), attname.into(), message.into()],
    )
}

/// The worker backs off the column: `failures` attempts in a row failed;
/// it tries again in `secs` seconds.
pub fn backoff(relid: pg_sys::Oid, attname: &str, failures: i32, secs: f64) -> KmsResult<()> {
    exec(
        "INSERT INTO kms.reencryption_progress AS p (relid, attname, failures, backoff_until)
         VALUES ($1, $2, $3, pg_catalog.now() + pg_catalog.make_interval(secs => $4))
         ON CONFLICT (relid, attname) DO UPDATE
            SET failures = excluded.failures, backoff_until = excluded.backoff_until",
        &[relid.into(), attname.into(), failures.into(), secs.into()],
    )
}

/// Drops progress rows of tables or columns that no longer exist.
pub fn gc() -> KmsResult<()> {
    exec(
        "DELETE FROM kms.reencryption_progress p
          WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                             WHERE a.attrelid = p.relid AND a.attname = p.attname AND NOT a.attisdropped)",
        &[],
    )
}
