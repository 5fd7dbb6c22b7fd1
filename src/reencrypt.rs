//! Re-encryption after rotation: discovery of `encrypted_text` columns,
//! batched rewrap with `FOR UPDATE SKIP LOCKED` over TID ranges, progress
//! bookkeeping, key usage counts and statistics. Shared by the background
//! worker and the synchronous `kms_reencrypt_now()`.
//!
//! All SQL here runs as the catalog owner (or the worker's superuser) with
//! `search_path` pinned; user tables are named by quoted identifiers read
//! from the catalog, and only `kms.*` helper functions are called.

use crate::errors::{KmsError, KmsResult, OrRaise};
use crate::keyring;
use crate::types::{RawText, RegClass, SqlName};
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::BTreeMap;

/// Status of a value for re-encryption (see `kms.rewrap_status`).
pub const CURRENT: i32 = 0;
pub const NEEDS_REWRAP: i32 = 1;
pub const NEEDS_CONTEXT: i32 = 2;
pub const CANNOT_OPEN: i32 = 3;

/// Internal helpers in schema `kms` (not granted to anyone: the worker and
/// the catalog owner call them).
#[pg_schema]
mod kms {
    use super::{CANNOT_OPEN, CURRENT, NEEDS_CONTEXT, NEEDS_REWRAP};
    use crate::errors::OrRaise;
    use crate::keyring;
    use crate::types::EncryptedText;
    use crate::values;
    use pgrx::prelude::*;

    /// 0 current; 1 needs rewrap; 2 needs rewrap but was sealed with a context
    /// (only the application can rewrap it); 3 cannot be opened (unknown key,
    /// disabled or destroyed version).
    #[pg_extern(stable, strict, parallel_safe)]
    fn rewrap_status(value: EncryptedText) -> i32 {
        let h = value.envelope().header;
        let Ok(key) = keyring::key_by_id(h.key_id) else { return CANNOT_OPEN };
        if h.key_version == key.primary {
            CURRENT
        } else if !key.can_open(h.key_version) {
            CANNOT_OPEN
        } else if h.has_context() {
            NEEDS_CONTEXT
        } else {
            NEEDS_REWRAP
        }
    }

    #[pg_extern(immutable, strict, parallel_safe)]
    fn value_key_id(value: EncryptedText) -> i32 {
        value.envelope().header.key_id as i32
    }

    #[pg_extern(immutable, strict, parallel_safe)]
    fn value_version(value: EncryptedText) -> i32 {
        value.envelope().header.key_version as i32
    }

    /// `kms_rewrap` without a context, for the worker's UPDATEs.
    #[pg_extern(volatile, strict, parallel_safe)]
    fn rewrap_value(value: EncryptedText) -> EncryptedText {
        values::rewrap(value, &[]).or_raise()
    }
}

fn spi_exec(q: &str, args: &[DatumWithOid<'_>]) -> KmsResult<()> {
    Spi::connect_mut(|c| c.update(q, None, args).map(|_| ())).map_err(KmsError::spi)
}

#[derive(Clone, Debug)]
pub struct Column {
    pub relid: pg_sys::Oid,
    /// schema-qualified, quoted
    pub table: String,
    /// quoted
    pub column: String,
    pub attname: String,
}

/// Every `encrypted_text` column of an ordinary table (partitions included:
/// rows live in the leaf tables) in this database.
pub fn encrypted_columns() -> KmsResult<Vec<Column>> {
    Spi::connect(|c| -> Result<Vec<Column>, pgrx::spi::Error> {
        let t = c.select(
            "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname), quote_ident(a.attname), a.attname::text
               FROM pg_catalog.pg_attribute a
               JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE a.atttypid = (SELECT t.oid FROM pg_catalog.pg_type t
                                    JOIN pg_catalog.pg_depend d ON d.objid = t.oid
                                     AND d.classid = 'pg_catalog.pg_type'::pg_catalog.regclass AND d.deptype = 'e'
                                    JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
                                   WHERE e.extname = 'pg_kms' AND t.typname = 'encrypted_text')
                AND a.attnum > 0 AND NOT a.attisdropped
                AND c.relkind = 'r' AND c.relpersistence <> 't'
                AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                AND (n.nspname <> 'kms' OR c.relname = 'secrets')
              ORDER BY c.oid, a.attnum",
            None,
            &[],
        )?;
        let mut out = Vec::new();
        for r in t {
            out.push(Column {
                relid: r.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid),
                table: r.get::<String>(2)?.unwrap_or_default(),
                column: r.get::<String>(3)?.unwrap_or_default(),
                attname: r.get::<String>(4)?.unwrap_or_default(),
            });
        }
        Ok(out)
    })
    .map_err(KmsError::spi)
}

/// (rows needing a rewrap the worker can do, rows needing one that only
/// the application can do because they were sealed with a context).
pub fn pending_counts(col: &Column) -> KmsResult<(i64, i64)> {
    let q = format!(
        "SELECT count(*) FILTER (WHERE s = {NEEDS_REWRAP}), count(*) FILTER (WHERE s = {NEEDS_CONTEXT})
           FROM (SELECT kms.rewrap_status({c}) AS s FROM ONLY {t} WHERE {c} IS NOT NULL) x",
        c = col.column,
        t = col.table
    );
    Spi::connect(|c| c.select(&q, Some(1), &[])?.first().get_two::<i64, i64>())
        .map(|(a, b)| (a.unwrap_or(0), b.unwrap_or(0)))
        .map_err(KmsError::spi)
}

/// A position in a table: (block, line pointer), as in `ctid`.
pub type Tid = (u32, u16);

fn parse_tid(s: &str) -> Option<Tid> {
    let (b, o) = s.trim().strip_prefix('(')?.strip_suffix(')')?.split_once(',')?;
    Some((b.trim().parse().ok()?, o.trim().parse().ok()?))
}

fn tid_text(t: Tid) -> String {
    format!("({},{})", t.0, t.1)
}

pub struct Batch {
    pub picked: i64,
    pub updated: i64,
    /// The last row picked: the next batch starts there.
    pub last: Option<Tid>,
}

/// Rewraps up to `limit` rows (all with None) from block `from_block` on,
/// skipping rows locked by others. A concurrent UPDATE of the same row
/// always wins: we lock the row first, and rewrap its latest version.
pub fn rewrap_batch(col: &Column, from: Tid, limit: Option<i64>) -> KmsResult<Batch> {
    let q = format!(
        "WITH picked AS (
             SELECT ctid AS tid FROM ONLY {t}
              WHERE ctid >= $1::tid AND kms.rewrap_status({c}) = {NEEDS_REWRAP}
              LIMIT $2 FOR UPDATE SKIP LOCKED),
         upd AS (
             UPDATE ONLY {t} SET {c} = kms.rewrap_value({c})
              WHERE ctid = ANY (ARRAY(SELECT tid FROM picked)) RETURNING 1)
         SELECT (SELECT count(*) FROM picked), (SELECT count(*) FROM upd),
                (SELECT pg_catalog.max(tid)::text FROM picked)",
        t = col.table,
        c = col.column
    );
    let start = tid_text(from);
    Spi::connect_mut(|c| -> Result<Batch, pgrx::spi::Error> {
        let t = c.update(&q, Some(1), &[start.as_str().into(), limit.into()])?;
        let (a, b, last) = t.first().get_three::<i64, i64, String>()?;
        Ok(Batch { picked: a.unwrap_or(0), updated: b.unwrap_or(0), last: last.as_deref().and_then(parse_tid) })
    })
    .map_err(KmsError::spi)
}

/// The first row from `from` on that still needs a rewrap (no lock): used
/// to step over a row whose rewrap fails, so that one bad row (e.g. a
/// deterministic duplicate under UNIQUE) cannot stall the whole table.
pub fn next_candidate(col: &Column, from: Tid) -> KmsResult<Option<Tid>> {
    let q = format!(
        "SELECT ctid::text FROM ONLY {t} WHERE ctid >= $1::tid AND kms.rewrap_status({c}) = {NEEDS_REWRAP} LIMIT 1",
        t = col.table,
        c = col.column
    );
    let start = tid_text(from);
    Spi::connect(|c| {
        let t = c.select(&q, Some(1), &[start.as_str().into()])?;
        if t.is_empty() {
            return Ok(None);
        }
        t.first().get_one::<String>()
    })
    .map(|s| s.as_deref().and_then(parse_tid))
    .map_err(KmsError::spi)
}

pub fn progress_start(col: &Column, pending: i64, with_context: i64) -> KmsResult<()> {
    spi_exec(
        "INSERT INTO kms.reencryption_progress AS p
              (relid, attname, rows_rewrapped, rows_pending, rows_needing_context, started_at, finished_at)
         VALUES ($1, $2, 0, $3, $4, pg_catalog.now(), CASE WHEN $3 = 0 THEN pg_catalog.now() END)
         ON CONFLICT (relid, attname) DO UPDATE SET
              rows_pending = excluded.rows_pending,
              rows_needing_context = excluded.rows_needing_context,
              rows_rewrapped = CASE WHEN p.finished_at IS NULL THEN p.rows_rewrapped ELSE 0 END,
              started_at = CASE WHEN p.finished_at IS NULL THEN coalesce(p.started_at, pg_catalog.now())
                                WHEN excluded.rows_pending > 0 THEN pg_catalog.now()
                                ELSE p.started_at END,
              finished_at = CASE WHEN excluded.rows_pending = 0
                                 THEN coalesce(p.finished_at, pg_catalog.now()) END,
              -- An error stays until the column is clean: a new pass over a
              -- table with a row that cannot be rewrapped keeps naming it.
              last_error = CASE WHEN excluded.rows_pending = 0 THEN NULL ELSE p.last_error END",
        &[col.relid.into(), col.attname.as_str().into(), pending.into(), with_context.into()],
    )
}

pub fn progress_batch(col: &Column, rewrapped: i64) -> KmsResult<()> {
    spi_exec(
        "UPDATE kms.reencryption_progress
            SET rows_rewrapped = rows_rewrapped + $3,
                rows_pending = greatest(rows_pending - $3, 0),
                last_batch_at = pg_catalog.now()
          WHERE relid = $1 AND attname = $2",
        &[col.relid.into(), col.attname.as_str().into(), rewrapped.into()],
    )
}

pub fn progress_error(col: &Column, message: &str) -> KmsResult<()> {
    spi_exec(
        "INSERT INTO kms.reencryption_progress AS p (relid, attname, last_error) VALUES ($1, $2, $3)
         ON CONFLICT (relid, attname) DO UPDATE SET last_error = excluded.last_error",
        &[col.relid.into(), col.attname.as_str().into(), message.into()],
    )
}

/// Drops progress rows of tables or columns that no longer exist.
pub fn progress_gc() -> KmsResult<()> {
    spi_exec(
        "DELETE FROM kms.reencryption_progress p
          WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                             WHERE a.attrelid = p.relid AND a.attname = p.attname AND NOT a.attisdropped)",
        &[],
    )
}

/// Rows per version of `key_id` over every encrypted column (a full scan
/// of each: cost proportional to the encrypted data in this database).
pub fn usage_by_version(key_id: i32) -> KmsResult<BTreeMap<i32, i64>> {
    let mut counts = BTreeMap::new();
    for col in encrypted_columns()? {
        let q = format!(
            "SELECT kms.value_version({c}), count(*) FROM ONLY {t} WHERE kms.value_key_id({c}) = $1 GROUP BY 1",
            c = col.column,
            t = col.table
        );
        Spi::connect(|c| -> Result<(), pgrx::spi::Error> {
            for r in c.select(&q, None, &[key_id.into()])? {
                let v = r.get::<i32>(1)?.unwrap_or(0);
                *counts.entry(v).or_insert(0) += r.get::<i64>(2)?.unwrap_or(0);
            }
            Ok(())
        })
        .map_err(KmsError::spi)?;
    }
    Ok(counts)
}

/// Per version: state and how many rows in this database reference it.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_key_usage(
    key_name: RawText,
) -> TableIterator<'static, (name!(version, i32), name!(state, String), name!(rows, i64))> {
    let rows = keyring::as_catalog_owner(|_| {
        let name = keyring::validate_key_name(key_name.bytes())?;
        let versions = Spi::connect(|c| -> Result<Vec<(i32, i32, String)>, pgrx::spi::Error> {
            let mut out = Vec::new();
            for r in c.select(
                "SELECT k.key_id, v.version, v.state FROM kms.keys k JOIN kms.key_versions v USING (key_id)
                  WHERE k.key_name = $1 ORDER BY v.version",
                None,
                &[name.into()],
            )? {
                out.push((r.get::<i32>(1)?.unwrap_or(0), r.get::<i32>(2)?.unwrap_or(0), r.get::<String>(3)?.unwrap_or_default()));
            }
            Ok(out)
        })
        .map_err(KmsError::spi)?;
        let Some(&(key_id, _, _)) = versions.first() else { return Err(KmsError::UnknownKey(name.into())) };
        let counts = usage_by_version(key_id)?;
        Ok(versions.into_iter().map(|(_, v, s)| (v, s, counts.get(&v).copied().unwrap_or(0))).collect::<Vec<_>>())
    })
    .or_raise();
    TableIterator::new(rows)
}

/// Rewraps synchronously, in the caller's transaction, the rows of `tbl.col`
/// not sealed under their key's primary version. Requires UPDATE on the
/// column. Returns the number of rows rewrapped.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_reencrypt_now(tbl: RegClass, col: SqlName, max_rows: default!(Option<i32>, "NULL")) -> i64 {
    let (tbl, col) = (tbl.0, col.0.as_str());
    if let Some(m) = max_rows {
        if m < 0 {
            KmsError::BadArgument { message: "max_rows must not be negative".into(), hint: "Pass NULL for all rows." }.raise();
        }
    }
    let allowed = Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.has_column_privilege($1, $2, 'SELECT, UPDATE')",
        &[tbl.into(), col.into()],
    )
    .map_err(KmsError::spi)
    .or_raise();
    if allowed != Some(true) {
        KmsError::NotAllowed(format!("permission denied to re-encrypt column \"{col}\" of relation {}", tbl.to_u32())).raise();
    }
    keyring::as_catalog_owner(|_| {
        let column = encrypted_columns()?
            .into_iter()
            .find(|c| c.relid == tbl && c.attname == col)
            .ok_or_else(|| KmsError::BadArgument {
                message: format!("column \"{col}\" is not an encrypted_text column of an ordinary table"),
                hint: "Pass a table and one of its encrypted_text columns.",
            })?;
        let (pending, ctx) = pending_counts(&column)?;
        progress_start(&column, pending, ctx)?;
        let b = rewrap_batch(&column, (0, 0), max_rows.map(i64::from))?;
        progress_batch(&column, b.updated)?;
        if ctx > 0 {
            notice!(
                "{ctx} rows of column \"{col}\" were sealed with a context and were not re-encrypted; \
                 the application must run UPDATE ... SET {col} = kms_rewrap({col}, <context>)"
            );
        }
        Ok(b.updated)
    })
    .or_raise()
}

/// Encryptions and decryptions per key version of this database since
/// server start (shared memory; empty without shared_preload_libraries).
/// Counters only; read through the `kms_stats` view.
#[pg_extern(volatile, parallel_restricted)]
fn kms_stats_counters() -> TableIterator<
    'static,
    (name!(key_id, i32), name!(version, i32), name!(encryptions, i64), name!(decryptions, i64)),
> {
    TableIterator::new(
        crate::shmem::stats_of_this_db()
            .into_iter()
            .map(|(k, v, e, d)| (k as i32, v as i32, e as i64, d as i64))
            .collect::<Vec<_>>(),
    )
}
