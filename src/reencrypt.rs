//! Re-encryption after rotation: discovery of `encrypted_text` columns,
//! batched rewrap with `FOR UPDATE SKIP LOCKED` over TID ranges, progress
//! bookkeeping, key usage counts and statistics. Shared by the background
//! worker and the synchronous `kms_reencrypt_now()`.
//!
//! Trust boundary: every statement on a user table runs either as that
//! table's owner under `SECURITY_RESTRICTED_OPERATION`
//! ([`Runner::Owner`], see `identity::as_table_owner`) or as the calling
//! user ([`Runner::Caller`]), never as the catalog owner, so the table's
//! triggers, constraints, index expressions and policies gain nothing.
//! Those statements call no pg_kms function (the table owner needs no
//! grant): rows are selected by their envelope header with built-in bytea
//! operators only, rewrapped here in Rust, and written back from arrays.
//! Only `kms.*` is read and written as the catalog owner.
//!
//! Values sealed with a context are rewrapped only in a column whose
//! protected-column policy has a context (`crate::protect`): the pick query
//! then also evaluates the policy's expression (PostgreSQL's deparse of
//! it, over alias `kms_t`, never user input here) for each row, in the
//! same statement run as the table's owner (or the caller), and the row is
//! rewrapped with that context. Elsewhere only the application knows the
//! context: such rows are counted, not rewrapped.

use crate::catalog::{self, progress};
use crate::errors::{KmsError, KmsResult, OrRaise};
use crate::pg::datum::{EncryptedText, RawText, RegClass, SqlName};
use crate::pg::identity;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::IntoDatum;
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
pub struct Column {
    pub relid: pg_sys::Oid,
    /// The table's owner: the identity the worker uses on it.
    pub owner: pg_sys::Oid,
    /// schema-qualified, quoted
    pub table: String,
    /// quoted
    pub column: String,
    pub attname: String,
    /// pg_kms's own `kms.secrets` (its rows are counted for every
    /// kms_admin, who may list secrets anyway).
    pub internal: bool,
    /// For a column whose protected-column policy has a context (the
    /// protected column, or the shadow column of one being converted):
    /// the context of each row as an expression over alias `kms_t`, or why
    /// it could not be rendered (the column is then treated as one without
    /// a policy). None: no policy with a context.
    pub context: Option<Result<String, String>>,
}

impl Column {
    /// The row-context expression over `kms_t`, when the column's policy
    /// gives one.
    fn row_context(&self) -> Option<&str> {
        match &self.context {
            Some(Ok(e)) => Some(e),
            _ => None,
        }
    }

    /// The headers of the values this column's rows can be rewrapped from
    /// here, and those only the application can rewrap (sealed with a
    /// context no policy gives).
    fn headers(&self, targets: &Targets) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        if self.row_context().is_some() {
            let mut all = targets.rewrap.clone();
            all.extend(targets.context.iter().cloned());
            (all, Vec::new())
        } else {
            (targets.rewrap.clone(), targets.context.clone())
        }
    }
}

/// Who runs a statement on a user table.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Runner {
    /// The table's owner, under `SECURITY_RESTRICTED_OPERATION` (the
    /// worker, usage counts and the destroy guard).
    Owner,
    /// The current user, unchanged (`kms_reencrypt_now`).
    Caller,
}

fn on_table<R>(
    col: &Column,
    who: Runner,
    lockmode: u32,
    f: impl FnOnce(&Column) -> KmsResult<R>,
) -> KmsResult<Option<R>> {
    // Lock the table by oid first, then read its owner and name again in
    // this transaction: the statement below names the table, and a rename
    // (or a new owner) since the column list was read must not make it run
    // someone else's table code as this owner. Lock waits are bounded by
    // lock_timeout (the worker sets it).
    // SAFETY: called inside a transaction, where LockRelationOid may be
    // called with any oid and a valid lock mode (a dropped table only yields
    // a lock on a stale oid, which refresh() then finds gone); the lock is
    // held until the end of the transaction.
    unsafe { pg_sys::LockRelationOid(col.relid, lockmode as pg_sys::LOCKMODE) };
    let Some(fresh) = refresh(col)? else {
        return Ok(None);
    };
    match who {
        Runner::Owner => identity::as_table_owner(fresh.owner, || f(&fresh)).map(Some),
        Runner::Caller => f(&fresh).map(Some),
    }
}

/// The column as the catalog has it now (None: dropped, or no longer an
/// ordinary table).
fn refresh(col: &Column) -> KmsResult<Option<Column>> {
    Spi::connect(|c| -> Result<Option<Column>, pgrx::spi::Error> {
        let t = c.select(
            "SELECT c.relowner, pg_catalog.quote_ident(n.nspname) OPERATOR(pg_catalog.||) '.'
                    OPERATOR(pg_catalog.||) pg_catalog.quote_ident(c.relname), pg_catalog.quote_ident(a.attname)
               FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
               JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid
              WHERE c.oid OPERATOR(pg_catalog.=) $1 AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name
                AND NOT a.attisdropped AND c.relkind OPERATOR(pg_catalog.=) 'r'",
            Some(1),
            &[col.relid.into(), col.attname.as_str().into()],
        )?;
        if t.is_empty() {
            return Ok(None);
        }
        let r = t.first();
        Ok(Some(Column {
            owner: r.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid),
            table: r.get::<String>(2)?.unwrap_or_default(),
            column: r.get::<String>(3)?.unwrap_or_default(),
            ..col.clone()
        }))
    })
    .map_err(KmsError::spi)
}

/// Types that are `encrypted_text` or a domain over it (`$1`: its oid).
const DIRECT_TYPES: &str = "WITH RECURSIVE direct(oid) AS (
        SELECT $1::pg_catalog.oid
        UNION SELECT t.oid FROM pg_catalog.pg_type t JOIN direct d ON t.typbasetype OPERATOR(pg_catalog.=) d.oid)";

/// Every column of type `encrypted_text` or a domain over it in an
/// ordinary table of this database (partitions included: rows live in the
/// leaf tables): what the worker rewraps and the usage counts scan. Reads
/// pg_catalog only; every operator is qualified. The protected-column
/// policies are read once here and each context rendered (parse analysis
/// as the table's owner, under `SECURITY_RESTRICTED_OPERATION`), so a
/// pass of the worker reads them once, not per batch.
pub fn encrypted_columns() -> KmsResult<Vec<Column>> {
    let mut cols = list_columns()?;
    let policies = crate::protect::all_policies()?;
    for (col, relname) in cols.iter_mut() {
        let Some(expr) = policies
            .iter()
            .find(|p| {
                p.relid == col.relid
                    && match p.state {
                        crate::protect::PolicyState::Protected => p.attname == col.attname,
                        crate::protect::PolicyState::Converting => {
                            p.shadow_column.as_deref() == Some(col.attname.as_str())
                        }
                    }
            })
            .and_then(|p| p.context.as_deref())
        else {
            continue;
        };
        let rendered = identity::as_table_owner(col.owner, || {
            crate::protect::context::analyze(col.relid, &col.table, relname, expr, Some("kms_t"))
        });
        col.context = Some(rendered.map(|a| a.text).map_err(|e| e.message()));
    }
    Ok(cols.into_iter().map(|(c, _)| c).collect())
}

/// [`encrypted_columns`] without their policies' contexts (usage counts
/// need none), each with its table's bare name.
fn list_columns() -> KmsResult<Vec<(Column, String)>> {
    let et = crate::pg::datum::encrypted_text_oid()?;
    let q = format!(
        "{DIRECT_TYPES}
         SELECT c.oid, c.relowner, pg_catalog.quote_ident(n.nspname) OPERATOR(pg_catalog.||) '.'
                    OPERATOR(pg_catalog.||) pg_catalog.quote_ident(c.relname),
                pg_catalog.quote_ident(a.attname), a.attname::pg_catalog.text,
                n.nspname OPERATOR(pg_catalog.=) 'kms', c.relname::pg_catalog.text
           FROM pg_catalog.pg_attribute a
           JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) a.attrelid
           JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
          WHERE a.atttypid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT oid FROM direct))
            AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
            AND c.relkind OPERATOR(pg_catalog.=) 'r' AND c.relpersistence OPERATOR(pg_catalog.<>) 't'
            AND n.nspname OPERATOR(pg_catalog.<>) ALL ('{{pg_catalog,information_schema}}'::pg_catalog.name[])
            AND (n.nspname OPERATOR(pg_catalog.<>) 'kms' OR c.relname OPERATOR(pg_catalog.=) 'secrets')
          ORDER BY c.oid, a.attnum"
    );
    Spi::connect(|c| -> Result<Vec<(Column, String)>, pgrx::spi::Error> {
        let mut out = Vec::new();
        for r in c.select(&q, None, &[et.into()])? {
            out.push((
                Column {
                    relid: r.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid),
                    owner: r.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
                    table: r.get::<String>(3)?.unwrap_or_default(),
                    column: r.get::<String>(4)?.unwrap_or_default(),
                    attname: r.get::<String>(5)?.unwrap_or_default(),
                    internal: r.get::<bool>(6)?.unwrap_or(false),
                    context: None,
                },
                r.get::<String>(7)?.unwrap_or_default(),
            ));
        }
        Ok(out)
    })
    .map_err(KmsError::spi)
}

/// Columns (as `table.column`) that hold `encrypted_text` values where no
/// scan can count them: inside an array, a composite or a domain over
/// those, or in a materialized view or foreign table. While any exists, a
/// destroy guard cannot prove a version unused. (Slower than
/// [`encrypted_columns`]: only usage counts call it.)
pub fn opaque_columns() -> KmsResult<Vec<String>> {
    let et = crate::pg::datum::encrypted_text_oid()?;
    let q = format!(
        "{DIRECT_TYPES},
         holds(oid) AS (
            SELECT oid FROM direct
            UNION SELECT t.oid FROM pg_catalog.pg_type t JOIN holds h
               ON t.typbasetype OPERATOR(pg_catalog.=) h.oid OR t.typelem OPERATOR(pg_catalog.=) h.oid
               OR (t.typtype OPERATOR(pg_catalog.=) 'c' AND EXISTS (
                     SELECT 1 FROM pg_catalog.pg_attribute x
                      WHERE x.attrelid OPERATOR(pg_catalog.=) t.typrelid AND x.atttypid OPERATOR(pg_catalog.=) h.oid
                        AND NOT x.attisdropped)))
         SELECT pg_catalog.quote_ident(n.nspname) OPERATOR(pg_catalog.||) '.'
                    OPERATOR(pg_catalog.||) pg_catalog.quote_ident(c.relname)
                    OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(a.attname)
           FROM pg_catalog.pg_attribute a
           JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) a.attrelid
           JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
          WHERE a.atttypid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT oid FROM holds))
            AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
            AND c.relkind OPERATOR(pg_catalog.=) ANY ('{{r,m,f}}'::pg_catalog.\"char\"[])
            AND c.relpersistence OPERATOR(pg_catalog.<>) 't'
            AND NOT (c.relkind OPERATOR(pg_catalog.=) 'r'
                     AND a.atttypid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT oid FROM direct)))
            AND n.nspname OPERATOR(pg_catalog.<>) ALL ('{{pg_catalog,information_schema}}'::pg_catalog.name[])
          ORDER BY c.oid, a.attnum"
    );
    Spi::connect(|c| -> Result<Vec<String>, pgrx::spi::Error> {
        let mut out = Vec::new();
        for r in c.select(&q, None, &[et.into()])? {
            out.push(r.get::<String>(1)?.unwrap_or_default());
        }
        Ok(out)
    })
    .map_err(KmsError::spi)
}

/// Whether `caller` may read every row of `col` that its owner's scan
/// counts: SELECT on the column, USAGE on the schema, and no row-level
/// security that applies to the caller (the owner's scan would count rows
/// the caller's policies hide); and whether that scan counts every row at
/// all: row-level security forced on the table hides rows from its owner
/// too, unless the owner bypasses it (a count that missed them could let a
/// destroy or a retirement strand them).
fn caller_sees_all(caller: pg_sys::Oid, col: &Column) -> KmsResult<bool> {
    crate::pg::spi::first::<bool>(
        "SELECT pg_catalog.has_column_privilege($1, c.oid, $3::pg_catalog.text, 'SELECT')
            AND pg_catalog.has_schema_privilege($1, c.relnamespace, 'USAGE')
            AND (NOT c.relrowsecurity OR r.rolsuper OR r.rolbypassrls
                 OR (c.relowner OPERATOR(pg_catalog.=) r.oid AND NOT c.relforcerowsecurity))
            AND (NOT (c.relrowsecurity AND c.relforcerowsecurity) OR o.rolsuper OR o.rolbypassrls)
           FROM pg_catalog.pg_class c, pg_catalog.pg_roles r, pg_catalog.pg_roles o
          WHERE c.oid OPERATOR(pg_catalog.=) $2 AND r.oid OPERATOR(pg_catalog.=) $1
            AND o.oid OPERATOR(pg_catalog.=) c.relowner",
        &[caller.into(), col.relid.into(), col.attname.as_str().into()],
        false,
    )
    .map(|b| b == Some(true))
}

/// The envelope headers (first 10 bytes) that the worker may rewrap, and
/// those that need a rewrap but were sealed with a context (rewrapped only
/// in a column whose policy gives the context, see [`Column::headers`];
/// elsewhere only the application can): one per usable, non-primary
/// version and flag combination.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    pub rewrap: Vec<Vec<u8>>,
    pub context: Vec<Vec<u8>>,
    /// Headers of disabled versions (counted, never rewrapped).
    pub disabled: Vec<Vec<u8>>,
}

impl Targets {
    pub fn is_empty(&self) -> bool {
        self.rewrap.is_empty() && self.context.is_empty()
    }
}

/// Reads the keyring (as the catalog owner) for [`Targets`].
pub fn targets() -> KmsResult<Targets> {
    let (versions, disabled) = catalog::as_catalog_owner(|_| {
        Ok((
            catalog::rows::versions_to_rewrap()?,
            catalog::rows::disabled_versions()?,
        ))
    })?;
    let mut t = Targets::default();
    for (key_id, version) in versions {
        for (ctx, h) in headers_of(key_id, version) {
            if ctx {
                t.context.push(h);
            } else {
                t.rewrap.push(h);
            }
        }
    }
    for (key_id, version) in disabled {
        t.disabled
            .extend(headers_of(key_id, version).into_iter().map(|(_, h)| h));
    }
    Ok(t)
}

/// Every envelope header a value of (key id, version) may carry, and
/// whether it says the value was sealed with a context.
fn headers_of(key_id: i32, version: i32) -> Vec<(bool, Vec<u8>)> {
    use crate::crypto::envelope::{Header, FLAG_BYTES, FLAG_CONTEXT, FLAG_DETERMINISTIC};
    let mut out = Vec::with_capacity(8);
    for bytes in [0, FLAG_BYTES] {
        for det in [0, FLAG_DETERMINISTIC] {
            for ctx in [0, FLAG_CONTEXT] {
                let h = Header {
                    flags: bytes | det | ctx,
                    key_id: key_id as u32,
                    key_version: version as u32,
                };
                out.push((ctx != 0, h.encode().to_vec()));
            }
        }
    }
    out
}

/// `col`'s first 10 bytes (the envelope header), with built-in functions
/// only (`encrypted_text` is binary-coercible to bytea).
fn header_expr(alias: &str, col: &Column) -> String {
    format!(
        "pg_catalog.substring({alias}.{c}::pg_catalog.bytea, 1, 10)",
        c = col.column
    )
}

/// What a count of a column finds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// Rows the worker can rewrap.
    pub rewrap: i64,
    /// Rows needing a rewrap only the application can do: sealed with a
    /// context that no policy of the column gives.
    pub context: i64,
    /// Rows sealed under a disabled version (neither readable nor
    /// rewrappable until it is enabled again).
    pub disabled: i64,
}

/// Counts the rows of `col` that need a rewrap, or cannot have one.
pub fn pending_counts(col: &Column, who: Runner, targets: &Targets) -> KmsResult<Pending> {
    if targets.is_empty() && targets.disabled.is_empty() {
        return Ok(Pending::default());
    }
    if let Some(Err(why)) = &col.context {
        warning!(
            "pg_kms: the context of the policy of column {}.{} cannot be evaluated, so its values sealed with a context are not re-encrypted: {why}",
            col.table,
            col.column
        );
    }
    let (rewrap, context) = col.headers(targets);
    let counts = on_table(col, who, pg_sys::AccessShareLock, |col| {
        let q = format!(
            "SELECT pg_catalog.count(*) FILTER (WHERE h OPERATOR(pg_catalog.=) ANY ($1)),
                    pg_catalog.count(*) FILTER (WHERE h OPERATOR(pg_catalog.=) ANY ($2)),
                    pg_catalog.count(*) FILTER (WHERE h OPERATOR(pg_catalog.=) ANY ($3))
               FROM (SELECT {h} AS h FROM ONLY {t} kms_t WHERE kms_t.{c} IS NOT NULL) x",
            h = header_expr("kms_t", col),
            c = col.column,
            t = col.table
        );
        Spi::connect(|c| {
            let t = c.select(
                &q,
                Some(1),
                &[
                    rewrap.into(),
                    context.into(),
                    targets.disabled.clone().into(),
                ],
            )?;
            let r = t.first();
            Ok(Pending {
                rewrap: r.get::<i64>(1)?.unwrap_or(0),
                context: r.get::<i64>(2)?.unwrap_or(0),
                disabled: r.get::<i64>(3)?.unwrap_or(0),
            })
        })
        .map_err(KmsError::spi)
    })?;
    // A table dropped meanwhile has nothing pending.
    Ok(counts.unwrap_or_default())
}

/// A position in a table: (block, line pointer), as in `ctid`.
pub type Tid = (u32, u16);

pub(crate) fn parse_tid(s: &str) -> Option<Tid> {
    let (b, o) = s
        .trim()
        .strip_prefix('(')?
        .strip_suffix(')')?
        .split_once(',')?;
    Some((b.trim().parse().ok()?, o.trim().parse().ok()?))
}

pub(crate) fn tid_of(ip: pg_sys::ItemPointerData) -> Tid {
    pgrx::itemptr::item_pointer_get_both(ip)
}

pub(crate) fn tid_text(t: Tid) -> String {
    format!("({},{})", t.0, t.1)
}

pub struct Batch {
    pub picked: i64,
    pub updated: i64,
    /// The last row picked: the next batch starts there.
    pub last: Option<Tid>,
    /// The first row that could not be rewrapped (left as it is), and why.
    pub failed: Option<(Tid, String)>,
}

/// A row picked for a rewrap: its TID, its value, and its context (as
/// UTF-8) when the column's policy gives one.
type Picked = (pg_sys::ItemPointerData, Vec<u8>, Option<Vec<u8>>);

/// An `encrypted_text[]` built from values (its oid given explicitly).
struct ArrayDatum(pg_sys::Datum);

impl IntoDatum for ArrayDatum {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.0)
    }
    fn type_oid() -> pg_sys::Oid {
        pg_sys::InvalidOid
    }
}

pub(crate) fn encrypted_text_array(values: Vec<EncryptedText>) -> KmsResult<DatumWithOid<'static>> {
    let elem = crate::pg::datum::encrypted_text_oid()?;
    let mut datums: Vec<pg_sys::Datum> =
        values.into_iter().filter_map(|v| v.into_datum()).collect();
    // SAFETY: `elem` is the oid of encrypted_text (a varlena, int4-aligned,
    // not by value); `datums` are palloc'd varlenas of that type that live
    // in the current memory context; construct_array copies them.
    unsafe {
        let (mut len, mut byval, mut align) = (0i16, false, 0 as std::ffi::c_char);
        pg_sys::get_typlenbyvalalign(elem, &mut len, &mut byval, &mut align);
        let arr = pg_sys::construct_array(
            datums.as_mut_ptr(),
            datums.len() as i32,
            elem,
            len as i32,
            byval,
            align,
        );
        let array_oid = pg_sys::get_array_type(elem);
        Ok(DatumWithOid::new(
            ArrayDatum(pg_sys::Datum::from(arr)),
            array_oid,
        ))
    }
}

/// Rewraps up to `limit` rows (all with None) from `from` on, skipping rows
/// locked by others. A concurrent UPDATE of the same row always wins: the
/// row is locked first and its latest version rewrapped. A value that
/// cannot be opened (forged, altered, its version disabled meanwhile, or
/// sealed with another context than its policy gives the row) or whose
/// row's context is NULL is left as it is and reported in `failed`.
pub fn rewrap_batch(
    col: &Column,
    who: Runner,
    targets: &Targets,
    from: Tid,
    limit: Option<i64>,
) -> KmsResult<Batch> {
    let none = Batch {
        picked: 0,
        updated: 0,
        last: None,
        failed: None,
    };
    let (headers, _) = col.headers(targets);
    if headers.is_empty() {
        return Ok(none);
    }
    let start = tid_text(from);
    // The row's context (as UTF-8, as every context is sealed; NULL when
    // the column's policy has none), computed in the statement that locks
    // the row, so it is that of the row version rewrapped.
    let ctx = match col.row_context() {
        Some(e) => format!("pg_catalog.convert_to(({e})::pg_catalog.text, 'UTF8')"),
        None => "NULL::pg_catalog.bytea".to_string(),
    };
    let rows = on_table(col, who, pg_sys::RowExclusiveLock, |col| {
        let pick = format!(
            "SELECT kms_t.ctid, kms_t.{c}::pg_catalog.bytea, {ctx} FROM ONLY {t} kms_t
              WHERE kms_t.ctid OPERATOR(pg_catalog.>=) $1::pg_catalog.tid
                AND {h} OPERATOR(pg_catalog.=) ANY ($2)
              LIMIT $3 FOR UPDATE OF kms_t SKIP LOCKED",
            h = header_expr("kms_t", col),
            c = col.column,
            t = col.table
        );
        Spi::connect_mut(|c| -> Result<Vec<Picked>, pgrx::spi::Error> {
            let t = c.update(
                &pick,
                None,
                &[start.as_str().into(), headers.into(), limit.into()],
            )?;
            let mut out = Vec::new();
            for r in t {
                if let (Some(tid), Some(v)) =
                    (r.get::<pg_sys::ItemPointerData>(1)?, r.get::<Vec<u8>>(2)?)
                {
                    out.push((tid, v, r.get::<Vec<u8>>(3)?));
                }
            }
            Ok(out)
        })
        .map_err(KmsError::spi)
    })?
    .unwrap_or_default();
    let mut batch = Batch {
        picked: rows.len() as i64,
        last: rows.iter().map(|(t, _, _)| tid_of(*t)).max(),
        ..none
    };
    let (mut tids, mut values) = (Vec::new(), Vec::new());
    for (tid, bytes, row_ctx) in rows {
        let sealed_with_context = bytes
            .get(1)
            .is_some_and(|f| f & crate::crypto::envelope::FLAG_CONTEXT != 0);
        let context: &[u8] = match (sealed_with_context, &row_ctx) {
            (false, _) => &[],
            (true, Some(c)) => c,
            (true, None) => {
                if batch.failed.is_none() {
                    batch.failed = Some((
                        tid_of(tid),
                        "the value was sealed with a context and the policy's context expression is NULL for this row".into(),
                    ));
                }
                continue;
            }
        };
        match crate::values::rewrap(EncryptedText::from_bytes(&bytes), context) {
            Ok(v) => {
                tids.push(tid);
                values.push(v);
            }
            Err(e) => {
                if batch.failed.is_none() {
                    batch.failed = Some((tid_of(tid), e.message()));
                }
            }
        }
    }
    if tids.is_empty() {
        return Ok(batch);
    }
    let arr = encrypted_text_array(values)?;
    // The rows picked lie between the lowest and highest TID: that range
    // (a TID Range Scan of the pages just read) joined with the new values.
    // A `ctid = ANY (array)` qual made the planner scan the whole table.
    let lo = tids
        .iter()
        .copied()
        .min_by_key(|t| tid_of(*t))
        .expect("not empty");
    let hi = tids
        .iter()
        .copied()
        .max_by_key(|t| tid_of(*t))
        .expect("not empty");
    batch.updated = on_table(col, who, pg_sys::RowExclusiveLock, |col| {
        let update = format!(
            "UPDATE ONLY {t} kms_t SET {c} = kms_u.n
               FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2)) AS kms_u(tid, n)
              WHERE kms_t.ctid OPERATOR(pg_catalog.=) kms_u.tid
                AND kms_t.ctid OPERATOR(pg_catalog.>=) $3 AND kms_t.ctid OPERATOR(pg_catalog.<=) $4",
            c = col.column,
            t = col.table
        );
        Spi::connect_mut(|c| {
            c.update(&update, None, &[tids.into(), arr, lo.into(), hi.into()]).map(|t| t.len() as i64)
        })
        .map_err(KmsError::spi)
    })?
    .unwrap_or(0);
    Ok(batch)
}

/// The first row from `from` on that still needs a rewrap (no lock): used
/// to step over a row whose rewrap fails, so that one bad row (e.g. a
/// deterministic duplicate under UNIQUE) cannot stall the whole table.
pub fn next_candidate(
    col: &Column,
    who: Runner,
    targets: &Targets,
    from: Tid,
) -> KmsResult<Option<Tid>> {
    let (headers, _) = col.headers(targets);
    if headers.is_empty() {
        return Ok(None);
    }
    let start = tid_text(from);
    on_table(col, who, pg_sys::AccessShareLock, |col| {
        let q = format!(
            "SELECT kms_t.ctid::pg_catalog.text FROM ONLY {t} kms_t
              WHERE kms_t.ctid OPERATOR(pg_catalog.>=) $1::pg_catalog.tid AND {h} OPERATOR(pg_catalog.=) ANY ($2)
              LIMIT 1",
            h = header_expr("kms_t", col),
            t = col.table
        );
        Spi::connect(|c| {
            let t = c.select(&q, Some(1), &[start.as_str().into(), headers.into()])?;
            if t.is_empty() {
                return Ok(None);
            }
            t.first().get_one::<String>()
        })
        .map(|s| s.as_deref().and_then(parse_tid))
        .map_err(KmsError::spi)
    })
    .map(Option::flatten)
}

/// The message recorded for a row that could not be rewrapped.
pub fn row_error(tid: Tid, why: &str) -> String {
    format!("row {tid:?} could not be re-encrypted: {why}")
}

/// Rows per version of `key_id`, over every encrypted column that `caller`
/// may SELECT (each counted by a full scan run as its table's owner under
/// `SECURITY_RESTRICTED_OPERATION`), and the columns skipped because
/// `caller` may not read them (`table.column`).
pub fn usage_by_version(
    key_id: i32,
    caller: pg_sys::Oid,
) -> KmsResult<(BTreeMap<i32, i64>, Vec<String>)> {
    let mut counts = BTreeMap::new();
    let id = (key_id as u32).to_be_bytes().to_vec();
    // Values inside arrays, composites, materialized views or foreign
    // tables cannot be counted: they are reported as skipped.
    let mut skipped = opaque_columns()?;
    for (col, _) in list_columns()? {
        if !col.internal && !caller_sees_all(caller, &col)? {
            skipped.push(format!("{}.{}", col.table, col.column));
            continue;
        }
        on_table(&col, Runner::Owner, pg_sys::AccessShareLock, |col| {
            let q = format!(
                "SELECT pg_catalog.substring(kms_t.{c}::pg_catalog.bytea, 7, 4), pg_catalog.count(*) FROM ONLY {t} kms_t
                  WHERE pg_catalog.substring(kms_t.{c}::pg_catalog.bytea, 3, 4) OPERATOR(pg_catalog.=) $1 GROUP BY 1",
                c = col.column,
                t = col.table
            );
            Spi::connect(|c| -> Result<(), pgrx::spi::Error> {
                for r in c.select(&q, None, &[id.clone().into()])? {
                    let v = r.get::<Vec<u8>>(1)?.unwrap_or_default();
                    let v = <[u8; 4]>::try_from(v.as_slice())
                        .map(i32::from_be_bytes)
                        .unwrap_or(0);
                    *counts.entry(v).or_insert(0) += r.get::<i64>(2)?.unwrap_or(0);
                }
                Ok(())
            })
            .map_err(KmsError::spi)
        })?;
    }
    Ok((counts, skipped))
}

/// The body of SQL `kms_key_usage()`.
pub fn key_usage(
    key_name: RawText,
) -> TableIterator<'static, (name!(version, i32), name!(state, String), name!(rows, i64))> {
    let caller = identity::current_user();
    let rows = (|| {
        let name = crate::crypto::names::key_name(key_name.bytes())?;
        let versions = catalog::as_catalog_owner(|_| catalog::rows::versions_of_key(name))?;
        let Some(&(key_id, _, _)) = versions.first() else {
            return Err(KmsError::UnknownKey(name.into()));
        };
        let (counts, skipped) = usage_by_version(key_id, caller)?;
        if !skipped.is_empty() {
            notice!("{}", skipped_notice(&skipped));
        }
        Ok(versions
            .into_iter()
            .map(|(_, v, s)| (v, s, counts.get(&v).copied().unwrap_or(0)))
            .collect::<Vec<_>>())
    })()
    .or_raise();
    TableIterator::new(rows)
}

/// "N encrypted columns were not counted ...", naming at most ten.
pub fn skipped_notice(skipped: &[String]) -> String {
    let mut names = skipped
        .iter()
        .take(10)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if skipped.len() > 10 {
        names.push_str(", ...");
    }
    format!(
        "{} encrypted_text columns were not counted because you may not SELECT them: {names}",
        skipped.len()
    )
}

/// The body of SQL `kms_reencrypt_now()`.
pub fn reencrypt_now(tbl: RegClass, col: SqlName, max_rows: Option<i32>) -> i64 {
    let (tbl, col) = (tbl.0, col.0.as_str());
    if let Some(m) = max_rows {
        if m < 0 {
            KmsError::BadArgument {
                message: "max_rows must not be negative".into(),
                hint: "Pass NULL for all rows.",
            }
            .raise();
        }
    }
    let r = (|| {
        let allowed = crate::pg::spi::first::<bool>(
            // Both: with a list, has_column_privilege is true if *any* is held.
            "SELECT pg_catalog.has_column_privilege($1, $2, 'SELECT') AND pg_catalog.has_column_privilege($1, $2, 'UPDATE')",
            &[tbl.into(), col.into()],
            false,
        )?;
        if allowed != Some(true) {
            return Err(KmsError::NotAllowed {
                role: crate::errors::role_display(identity::current_user()),
                column: crate::errors::quote_ident(col),
                table: crate::errors::relation_display(tbl),
            });
        }
        let column = encrypted_columns()?
            .into_iter()
            .find(|c| c.relid == tbl && c.attname == col)
            .ok_or_else(|| KmsError::BadArgument {
                message: format!(
                    "column \"{col}\" is not an encrypted_text column of an ordinary table"
                ),
                hint: "Pass a table and one of its encrypted_text columns.",
            })?;
        let targets = targets()?;
        // The user table is read and written as the caller; only the
        // progress row is written as the catalog owner, and only when the
        // caller sees every row (no row-level security applies to it):
        // otherwise its partial view must not mark the column clean.
        let shared = caller_sees_all(identity::current_user(), &column)?;
        let pending = pending_counts(&column, Runner::Caller, &targets)?;
        let ctx = pending.context;
        if shared {
            progress::start(
                column.relid,
                &column.attname,
                pending.rewrap,
                ctx,
                pending.disabled,
            )?;
        }
        let b = rewrap_batch(
            &column,
            Runner::Caller,
            &targets,
            (0, 0),
            max_rows.map(i64::from),
        )?;
        if shared {
            progress::batch(column.relid, &column.attname, b.updated)?;
            if let Some((tid, why)) = &b.failed {
                progress::error(column.relid, &column.attname, &row_error(*tid, why))?;
            }
        }
        if let Some((tid, why)) = &b.failed {
            warning!("{}", row_error(*tid, why));
        }
        if ctx > 0 {
            notice!(
                "{ctx} rows of column \"{col}\" were sealed with a context and were not re-encrypted; \
                 the application must run UPDATE ... SET {col} = kms_rewrap({col}, <context>), \
                 or protect the column with its context (kms_protect_column(..., context => ...))"
            );
        }
        Ok(b.updated)
    })();
    r.or_raise()
}
