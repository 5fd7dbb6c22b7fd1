//! Online encryption of a plaintext column (a policy in state
//! `converting`): the background worker's backfill of the shadow column,
//! its progress, and the final swap.
//!
//! While a column converts, the table's conversion trigger
//! (`zzzz_kms_convert`, ENABLE ALWAYS) seals every row written, so the only
//! rows left for the worker are those written before: `shadow IS NULL AND
//! col IS NOT NULL`. The worker picks them in TID order with `FOR UPDATE
//! SKIP LOCKED`, computes each row's context in the same SELECT (the row is
//! locked, so it cannot change before the value is written), seals in Rust
//! with the policy's key (the policy is the authorization: no grant check;
//! the worker acts for no user) and writes them back from arrays restricted
//! to the TID range just read. The trigger leaves a non-NULL shadow alone
//! when the plaintext and context did not change, so the worker's UPDATE
//! keeps its values.
//!
//! When a pass finds nothing left (counted without the exclusive lock), one
//! short transaction locks the table ACCESS EXCLUSIVE (bounded by
//! `lock_timeout`), checks the conversion trigger is still there and
//! enabled ALWAYS (only then are all rows known to be sealed), marks the
//! policy protected, drops the plaintext column, renames the shadow to its
//! name and rebuilds the view: catalog-only work, whatever the table's size.
//!
//! Trust boundary: every statement on the user table runs as its owner
//! under `SECURITY_RESTRICTED_OPERATION`, after locking the table by oid
//! and reading its owner and name again; `kms.protected_columns` is written
//! as the catalog owner. No plaintext, context or key byte ever appears in
//! an error, a log line or `last_error` (rows are named by TID).

use super::{context, policies_of, regenerate, run_as_owner, sqlgen, Policy, PolicyState, Table};
use crate::crypto::envelope::{Header, DET_OVERHEAD, FLAG_BYTES, FLAG_DETERMINISTIC, OVERHEAD};
use crate::errors::{quote_ident, KmsError, KmsResult, ProtectCode};
use crate::keys;
use crate::pg::datum::{EncryptedText, RawText};
use crate::pg::encoding::text_to_utf8;
use crate::pg::{identity, spi};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

use crate::reencrypt::{encrypted_text_array, parse_tid, tid_of, tid_text, Tid};

/// The TID just after `t`.
pub fn after(t: Tid) -> Tid {
    (t.0, t.1.saturating_add(1))
}

/// The policies of this database whose column is being converted.
pub fn converting() -> KmsResult<Vec<Policy>> {
    Ok(super::all_policies()?
        .into_iter()
        .filter(|p| p.state == PolicyState::Converting)
        .collect())
}

/// A converting policy and its table, read again after locking the table.
struct Target {
    t: Table,
    p: Policy,
    /// The context rendered over the alias `kms_t` (None: no context).
    ctx: Option<String>,
    /// The plaintext and shadow columns, quoted.
    col: String,
    shadow: String,
}

/// Locks the table by oid, then reads the table and the policy again in
/// this transaction (None: the table is gone, or the conversion was
/// cancelled or finished meanwhile).
fn target(p: &Policy, lockmode: u32) -> KmsResult<Option<Target>> {
    // SAFETY: called inside a transaction, where LockRelationOid may be
    // called with any oid and a valid lock mode (a dropped table only yields
    // a lock on a stale oid, which Table::read then finds gone); the lock is
    // held until the end of the transaction. Waits are bounded by
    // lock_timeout (the worker sets it).
    unsafe { pg_sys::LockRelationOid(p.relid, lockmode as pg_sys::LOCKMODE) };
    let Some(t) = Table::read(p.relid)? else {
        return Ok(None);
    };
    if t.relkind != "r" {
        return Ok(None);
    }
    let Some(p) = policies_of(p.relid)?
        .into_iter()
        .find(|q| q.attname == p.attname && q.state == PolicyState::Converting)
    else {
        return Ok(None);
    };
    if p.shadow_column.is_none() {
        return Ok(None);
    }
    let shadow = quote_ident(p.cipher_column());
    let ctx = p
        .context
        .as_deref()
        .map(|c| context::analyze(t.relid, &t.qualified, &t.name, c, Some("kms_t")).map(|a| a.text))
        .transpose()?;
    Ok(Some(Target {
        col: quote_ident(&p.attname),
        shadow,
        t,
        p,
        ctx,
    }))
}

/// Runs a statement on `kms.protected_columns` as the catalog owner.
fn progress(q: &str, p: &Policy, args: Vec<pgrx::datum::DatumWithOid<'_>>) -> KmsResult<()> {
    let mut all: Vec<pgrx::datum::DatumWithOid<'_>> =
        vec![p.relid.into(), p.attname.as_str().into()];
    all.extend(args);
    crate::catalog::as_catalog_owner(|_| spi::exec(q, &all))
}

/// Records the conversion's last error (a row that cannot be sealed, a
/// lock timeout), kept until the conversion finishes.
pub fn record_error(p: &Policy, message: &str) -> KmsResult<()> {
    progress(
        "UPDATE kms.protected_columns SET last_error = $3
          WHERE relid::oid = $1 AND attname = $2 AND state = 'converting'",
        p,
        vec![message.into()],
    )
}

/// Sets where the next pass starts (None: at the beginning).
pub fn set_resume(p: &Policy, at: Option<Tid>) -> KmsResult<()> {
    progress(
        "UPDATE kms.protected_columns SET resume_at = $3
          WHERE relid::oid = $1 AND attname = $2 AND state = 'converting'",
        p,
        vec![at.map(tid_text).into()],
    )
}

/// Rows still to seal: `shadow IS NULL AND col IS NOT NULL` (None: the
/// conversion is gone). A full scan as the table's owner.
pub fn pending(p: &Policy) -> KmsResult<Option<i64>> {
    let Some(tg) = target(p, pg_sys::AccessShareLock)? else {
        return Ok(None);
    };
    identity::as_table_owner(tg.t.owner, || {
        spi::read::<i64>(
            &format!(
                "SELECT pg_catalog.count(*) FROM ONLY {t} kms_t
                  WHERE kms_t.{s} IS NULL AND kms_t.{c} IS NOT NULL",
                t = tg.t.qualified,
                s = tg.shadow,
                c = tg.col
            ),
            &[],
        )
    })
    .map(|n| Some(n.unwrap_or(0)))
}

/// A pass over the table starts: counts what is left (rows_total becomes
/// rows_done + left) and returns where to start (the saved cursor, so a
/// restarted worker resumes near where it was), or None when the
/// conversion is gone.
pub fn begin_pass(p: &Policy) -> KmsResult<Option<(Tid, i64)>> {
    let Some(left) = pending(p)? else {
        return Ok(None);
    };
    let resume = crate::catalog::as_catalog_owner(|_| {
        spi::one::<String>(
            "UPDATE kms.protected_columns
                SET rows_total = rows_done + $3, started_at = coalesce(started_at, pg_catalog.now())
              WHERE relid::oid = $1 AND attname = $2 AND state = 'converting'
             RETURNING resume_at",
            &[p.relid.into(), p.attname.as_str().into(), left.into()],
        )
    })?;
    Ok(Some((
        resume.as_deref().and_then(parse_tid).unwrap_or((0, 0)),
        left,
    )))
}

pub struct Batch {
    pub picked: i64,
    pub updated: i64,
    /// The last row picked: the next batch starts after it.
    pub last: Option<Tid>,
    /// The first row that could not be sealed (left as it is), and why.
    pub failed: Option<(Tid, String)>,
}

/// One row read for sealing: its TID, plaintext and context (both as
/// stored, in the database encoding; wiped when dropped).
type Row = (
    pg_sys::ItemPointerData,
    Zeroizing<Vec<u8>>,
    Option<Zeroizing<Vec<u8>>>,
);

/// Seals `plain` under the primary version of `key` (no grant check: the
/// policy is the authorization). A minimal copy of values.rs's seal path.
fn seal(
    key: &keys::version::CachedKey,
    plain: &[u8],
    ctx: &[u8],
    flags: u8,
) -> KmsResult<EncryptedText> {
    let v = key.primary_version()?;
    let header = Header {
        flags,
        key_id: v.key_id,
        key_version: v.number,
    };
    let out = if flags & FLAG_DETERMINISTIC != 0 {
        let (out, buf) = EncryptedText::alloc(plain.len() + DET_OVERHEAD);
        v.det.seal_into(header, ctx, plain, buf);
        out
    } else {
        let nonce = keys::nonce()?;
        let (out, buf) = EncryptedText::alloc(plain.len() + OVERHEAD);
        crate::crypto::seal_into(v.data_key(), header, &nonce, ctx, plain, buf);
        out
    };
    v.count_encryption();
    Ok(out)
}

/// Seals up to `limit` rows from `from` on (skipping rows locked by
/// others), writes them back and records the progress, in the caller's
/// transaction. None: the conversion is gone. A row that cannot be sealed
/// is left as it is and reported in `failed`.
pub fn backfill_batch(p: &Policy, from: Tid, limit: i64) -> KmsResult<Option<Batch>> {
    // The key, loaded (as the catalog owner) before any identity switch.
    let key = keys::key_by_id(p.key_id as u32)?;
    let Some(tg) = target(p, pg_sys::RowExclusiveLock)? else {
        return Ok(None);
    };
    let p = &tg.p;
    let bytea = p.is_bytea();
    let value = if bytea {
        format!("kms_t.{}", tg.col)
    } else {
        format!("kms_t.{}::pg_catalog.text", tg.col)
    };
    let ctx = match &tg.ctx {
        Some(c) => format!("({c})::pg_catalog.text"),
        None => "NULL::pg_catalog.text".into(),
    };
    let pick = format!(
        "SELECT kms_t.ctid, {value}, {ctx} FROM ONLY {t} kms_t
          WHERE kms_t.ctid OPERATOR(pg_catalog.>=) $1::pg_catalog.tid
            AND kms_t.{s} IS NULL AND kms_t.{c} IS NOT NULL
          LIMIT $2 FOR UPDATE OF kms_t SKIP LOCKED",
        t = tg.t.qualified,
        s = tg.shadow,
        c = tg.col
    );
    let start = tid_text(from);
    let rows: Vec<Row> = identity::as_table_owner(tg.t.owner, || {
        Spi::connect_mut(|c| -> Result<Vec<Row>, pgrx::spi::Error> {
            let table = c.update(&pick, None, &[start.as_str().into(), limit.into()])?;
            let mut out = Vec::new();
            for r in table {
                let Some(tid) = r.get::<pg_sys::ItemPointerData>(1)? else {
                    continue;
                };
                let plain = if bytea {
                    r.get::<Vec<u8>>(2)?.map(Zeroizing::new)
                } else {
                    r.get::<RawText>(2)?
                        .map(|v| Zeroizing::new(v.bytes().to_vec()))
                };
                let Some(plain) = plain else { continue };
                let ctx = r
                    .get::<RawText>(3)?
                    .map(|v| Zeroizing::new(v.bytes().to_vec()));
                out.push((tid, plain, ctx));
            }
            Ok(out)
        })
        .map_err(KmsError::spi)
    })?;
    let mut batch = Batch {
        picked: rows.len() as i64,
        updated: 0,
        last: rows.iter().map(|r| tid_of(r.0)).max(),
        failed: None,
    };
    let flags = if bytea {
        FLAG_BYTES
    } else if p.deterministic {
        FLAG_DETERMINISTIC
    } else {
        0
    };
    let bits = p.blind_index_bits;
    let index = match bits {
        Some(_) => Some(key.index.as_ref().ok_or_else(|| KmsError::KeyDestroyed {
            key: key.name.clone(),
            action: "compute a blind index",
        })?),
        None => None,
    };
    let (mut tids, mut values, mut bidx) = (Vec::new(), Vec::new(), Vec::new());
    for (tid, plain, ctx) in &rows {
        // A NULL context seals without one, as kms_encrypt does and as the
        // view's trigger and the conversion trigger do for that row.
        let ctx_utf8 = match ctx {
            Some(c) => text_to_utf8(c),
            None => crate::pg::encoding::Utf8::Borrowed(&[]),
        };
        let sealed = if bytea {
            seal(&key, plain, &ctx_utf8, flags)
        } else {
            seal(&key, &text_to_utf8(plain), &ctx_utf8, flags)
        };
        let sealed = match sealed {
            Ok(v) => v,
            Err(e) => {
                if batch.failed.is_none() {
                    batch.failed = Some((tid_of(*tid), e.message()));
                }
                continue;
            }
        };
        if let (Some(bits), Some(index)) = (bits, index) {
            let mac = index
                .blind_index(&[], &text_to_utf8(plain), bits as u32)
                .ok_or_else(|| KmsError::BadArgument {
                    message: format!("invalid blind index size {bits}"),
                    hint: "bits must be a multiple of 8 from 16 to 256.",
                })?;
            bidx.push(mac);
        }
        tids.push(*tid);
        values.push(sealed);
    }
    drop(rows);
    if !tids.is_empty() {
        let arr = encrypted_text_array(values)?;
        // The rows picked lie between the lowest and highest TID: that range
        // (a TID Range Scan of the pages just read) joined with the values.
        let lo = *tids.iter().min_by_key(|t| tid_of(**t)).expect("not empty");
        let hi = *tids.iter().max_by_key(|t| tid_of(**t)).expect("not empty");
        let (set_bidx, from_bidx) = match &p.blind_index_column {
            Some(b) if bits.is_some() => (
                format!(", {} = kms_u.b", quote_ident(b)),
                ", pg_catalog.unnest($5::pg_catalog.bytea[])",
            ),
            _ => (String::new(), ""),
        };
        let update = format!(
            "UPDATE ONLY {t} kms_t SET {s} = kms_u.n{set_bidx}
               FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2){from_bidx}) AS kms_u(tid, n{b})
              WHERE kms_t.ctid OPERATOR(pg_catalog.=) kms_u.tid
                AND kms_t.ctid OPERATOR(pg_catalog.>=) $3 AND kms_t.ctid OPERATOR(pg_catalog.<=) $4",
            t = tg.t.qualified,
            s = tg.shadow,
            b = if from_bidx.is_empty() { "" } else { ", b" },
        );
        batch.updated = identity::as_table_owner(tg.t.owner, || {
            Spi::connect_mut(|c| {
                let mut args = vec![tids.into(), arr, lo.into(), hi.into()];
                if !from_bidx.is_empty() {
                    args.push(bidx.into());
                }
                c.update(&update, None, &args).map(|t| t.len() as i64)
            })
            .map_err(KmsError::spi)
        })?;
    }
    progress(
        "UPDATE kms.protected_columns
            SET rows_done = rows_done + $3, last_batch_at = pg_catalog.now(),
                resume_at = coalesce($4, resume_at)
          WHERE relid::oid = $1 AND attname = $2 AND state = 'converting'",
        p,
        vec![
            batch.updated.into(),
            batch.last.map(after).map(tid_text).into(),
        ],
    )?;
    if let Some((tid, why)) = &batch.failed {
        record_error(p, &row_error(*tid, why))?;
    }
    Ok(Some(batch))
}

/// The first row from `from` on still to seal (no lock, no context): used
/// to step over a row whose batch fails (e.g. its context expression
/// raises an error), so one bad row cannot stall the table.
pub fn next_candidate(p: &Policy, from: Tid) -> KmsResult<Option<Tid>> {
    let Some(tg) = target(p, pg_sys::AccessShareLock)? else {
        return Ok(None);
    };
    let start = tid_text(from);
    let s = identity::as_table_owner(tg.t.owner, || {
        spi::read::<String>(
            &format!(
                "SELECT kms_t.ctid::pg_catalog.text FROM ONLY {t} kms_t
                  WHERE kms_t.ctid OPERATOR(pg_catalog.>=) $1::pg_catalog.tid
                    AND kms_t.{s} IS NULL AND kms_t.{c} IS NOT NULL
                  LIMIT 1",
                t = tg.t.qualified,
                s = tg.shadow,
                c = tg.col
            ),
            &[start.as_str().into()],
        )
    })?;
    Ok(s.as_deref().and_then(parse_tid))
}

/// The message recorded for a row that could not be sealed.
pub fn row_error(tid: Tid, why: &str) -> String {
    format!("row {tid:?} could not be encrypted: {why}")
}

/// How long the swap may wait for its ACCESS EXCLUSIVE lock.
const SWAP_LOCK_TIMEOUT: &str = "2s";

/// The swap, in the caller's transaction (to be called when a count found
/// no row left): returns how long the ACCESS EXCLUSIVE lock was held until
/// the work before the commit was done, or None when the conversion is
/// gone. A lock wait longer than `SWAP_LOCK_TIMEOUT` fails it (retried on
/// the next pass).
pub fn swap(p: &Policy) -> KmsResult<Option<Duration>> {
    spi::exec(
        "SELECT pg_catalog.set_config('lock_timeout', $1, true)",
        &[SWAP_LOCK_TIMEOUT.into()],
    )?;
    // The decrypted view first: statements through it lock the view, then
    // the table; taking the table first would deadlock with them (and wait
    // deadlock_timeout) when the swap drops the view.
    let view = spi::read::<pg_sys::Oid>(
        "SELECT pg_catalog.to_regclass(pg_catalog.quote_ident($1) OPERATOR(pg_catalog.||) '.'
                OPERATOR(pg_catalog.||) pg_catalog.quote_ident($2))::pg_catalog.oid",
        &[p.relnamespace.as_str().into(), p.view_name.as_str().into()],
    )?;
    if let Some(v) = view.filter(|v| *v != pg_sys::InvalidOid) {
        // SAFETY: as in target(): inside a transaction, any oid, a valid
        // mode, held until the end of the transaction.
        unsafe { pg_sys::LockRelationOid(v, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE) };
    }
    let locked = Instant::now();
    let Some(tg) = target(p, pg_sys::AccessExclusiveLock)? else {
        return Ok(None);
    };
    let (t, p) = (&tg.t, &tg.p);
    let shadow = p.shadow_column.clone().unwrap_or_default();
    // Every row written since the conversion started was sealed by the
    // trigger only if it is still there, enabled ALWAYS (the DDL guard
    // refuses to disable or drop it, but a superuser may bypass the guard).
    let function = format!(
        "{}.{}()",
        quote_ident(&t.schema),
        quote_ident(&sqlgen::convert_function_name(&t.name))
    );
    let trigger_ok = spi::read::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
          WHERE g.tgrelid OPERATOR(pg_catalog.=) $1 AND g.tgname OPERATOR(pg_catalog.=) $2
            AND g.tgenabled OPERATOR(pg_catalog.=) 'A'
            AND g.tgfoid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure($3)::pg_catalog.oid)",
        &[
            t.relid.into(),
            sqlgen::CONVERT_TRIGGER.into(),
            function.as_str().into(),
        ],
    )?;
    if trigger_ok != Some(true) {
        return Err(KmsError::Protect {
            code: ProtectCode::Prerequisite,
            message: format!(
                "the conversion trigger {} on table {} is missing or not enabled ALWAYS: rows written meanwhile may not be encrypted, so the column is not swapped",
                sqlgen::CONVERT_TRIGGER,
                t.qualified
            ),
            hint: "Cancel the conversion with kms_unprotect_column() and protect the column again.".into(),
        });
    }
    progress(
        "UPDATE kms.protected_columns
            SET state = 'protected', shadow_column = NULL, resume_at = NULL, last_error = NULL,
                finished_at = pg_catalog.now()
          WHERE relid::oid = $1 AND attname = $2 AND state = 'converting'",
        p,
        vec![],
    )?;
    run_as_owner(
        t,
        &[
            format!(
                "DROP VIEW IF EXISTS {}.{}",
                quote_ident(&t.schema),
                quote_ident(&p.view_name)
            ),
            format!("ALTER TABLE {} DROP COLUMN {}", t.qualified, tg.col),
            format!(
                "ALTER TABLE {} RENAME COLUMN {} TO {}",
                t.qualified,
                quote_ident(&shadow),
                tg.col
            ),
        ],
    )?;
    regenerate(t.relid, None, true)?;
    Ok(Some(locked.elapsed()))
}
