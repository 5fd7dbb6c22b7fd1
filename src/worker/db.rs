//! A database's worker: due rotations, then the rewrap of every column
//! not sealed under its key's primary version, throttled.

use super::*;
use crate::catalog::progress;
use crate::core::throttle::Throttle;
use crate::pg::{guc, shmem};
use crate::reencrypt::Runner;
use crate::{lifecycle, reencrypt};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What the worker remembers between passes (lost on restart, harmlessly).
#[derive(Default)]
struct ColumnState {
    /// Keyring signature under which the column was last found clean.
    clean_under: Option<String>,
    clean_at: Option<Instant>,
    /// Whether that count ran after every transaction older than the
    /// keyring had ended (else rows sealed under a former primary by such
    /// a transaction may commit after it: it is counted again soon).
    clean_trusted: bool,
    /// Failed attempts in a row, and while backing off, until when.
    failures: u32,
    backoff_until: Option<Instant>,
}

/// Failures in a row before the worker backs a column off.
const FAILURES_BEFORE_BACKOFF: u32 = 3;
/// The longest backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

impl ColumnState {
    fn mark_clean(&mut self, signature: &str, trusted: bool) {
        self.clean_under = Some(signature.to_owned());
        self.clean_at = Some(Instant::now());
        self.clean_trusted = trusted;
        self.succeeded();
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.backoff_until = None;
    }

    /// Records a failure on `col` (in the server log, without the
    /// message when it may quote data) and, after several in a row, backs
    /// the column off: naptime, doubled at each further failure, at most an
    /// hour. True when the column is now backed off.
    fn failed(&mut self, col: &reencrypt::Column, what: &str, why: &Failure) -> bool {
        self.failures = self.failures.saturating_add(1);
        let backoff = (self.failures >= FAILURES_BEFORE_BACKOFF).then(|| {
            let doublings = (self.failures - FAILURES_BEFORE_BACKOFF).min(20);
            naptime()
                .max(Duration::from_secs(1))
                .saturating_mul(1 << doublings)
                .min(MAX_BACKOFF)
        });
        match backoff {
            Some(d) => {
                warning!(
                    "pg_kms worker: column {} of table {}: {what}: {}; {} failures in a row, trying again in {} s",
                    col.column,
                    col.table,
                    why.loggable(),
                    self.failures,
                    d.as_secs()
                );
                self.backoff_until = Some(Instant::now() + d);
                let failures = self.failures.min(i32::MAX as u32) as i32;
                let _ =
                    xact(|| progress::backoff(col.relid, &col.attname, failures, d.as_secs_f64()));
            }
            None => warning!(
                "pg_kms worker: column {} of table {}: {what}: {}",
                col.column,
                col.table,
                why.loggable()
            ),
        }
        backoff.is_some()
    }
}

/// Counts what `col` has to rewrap (as its owner) and records it in the
/// progress row: the rows the worker can rewrap.
fn count_column(col: &reencrypt::Column, targets: &reencrypt::Targets) -> Result<i64, Failure> {
    let r = xact_kms(|| {
        // Every statement on the table runs as its owner, under
        // SECURITY_RESTRICTED_OPERATION (see reencrypt::Runner).
        let p = reencrypt::pending_counts(col, Runner::Owner, targets)?;
        progress::start(col.relid, &col.attname, p.rewrap, p.context, p.disabled)?;
        Ok(p.rewrap)
    });
    if let Err(msg) = &r {
        let _ = xact(|| progress::error(col.relid, &col.attname, msg));
    }
    r
}

/// The keyring as the worker sees it, read in one transaction (one
/// snapshot): a signature of every key's primary and version states (a
/// column found clean under it stays clean until it changes), and the
/// headers to rewrap.
fn keyring_state() -> Result<(String, reencrypt::Targets, i64), Failure> {
    xact_kms(|| {
        let signature = crate::catalog::as_catalog_owner(|_| {
            crate::pg::spi::first::<String>(
                "SELECT coalesce(string_agg(key_id || ':' || primary_version || ':' || v.states, ',' ORDER BY key_id), '')
                   FROM kms.keys k,
                        LATERAL (SELECT string_agg(version || state, '' ORDER BY version) AS states
                                   FROM kms.key_versions WHERE key_id = k.key_id) v",
                &[],
                false,
            )
        })?;
        let now_us = crate::pg::spi::first::<i64>(
            "SELECT (EXTRACT(epoch FROM pg_catalog.now()) * 1000000)::pg_catalog.int8",
            &[],
            false,
        )?;
        Ok((
            signature.unwrap_or_default(),
            reencrypt::targets()?,
            now_us.unwrap_or(0),
        ))
    })
}

/// The tables of this database that a subscription replicates into
/// (`pg_subscription_rel`, in any state).
fn subscription_targets() -> crate::errors::KmsResult<std::collections::HashSet<u32>> {
    Spi::connect(|c| -> Result<_, pgrx::spi::Error> {
        let mut out = std::collections::HashSet::new();
        for r in c.select(
            "SELECT srrelid FROM pg_catalog.pg_subscription_rel",
            None,
            &[],
        )? {
            if let Some(oid) = r.get::<pg_sys::Oid>(1)? {
                out.insert(oid.to_u32());
            }
        }
        Ok(out)
    })
    .map_err(crate::errors::KmsError::spi)
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_kms_db_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = arg.value() as u32;
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(db)), None);
    let installed = xact(|| {
        Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_kms')",
        )
    });
    if !matches!(installed, Ok(Ok(Some(true)))) {
        return; // not installed here: the launcher will look again later
    }
    // Log lines name the database, not its oid (as bytes: any encoding).
    let db_name = match xact(|| {
        Spi::get_one::<Vec<u8>>(
            "SELECT pg_catalog.textsend(pg_catalog.quote_ident(pg_catalog.current_database()))",
        )
    }) {
        Ok(Ok(Some(n))) => String::from_utf8_lossy(&n).into_owned(),
        _ => db.to_string(),
    };
    // SAFETY: both names and values are NUL-terminated literals naming
    // existing GUCs with valid values; SetConfigOption copies them. The
    // worker runs as the bootstrap superuser, so PGC_SUSET applies, and
    // these GUCs' check/assign hooks need no open transaction. An invalid
    // setting would raise an ERROR, not UB.
    let set = |name: &std::ffi::CStr, value: &std::ffi::CStr| unsafe {
        pg_sys::SetConfigOption(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        )
    };
    // Rewrapping is not a logical change: do not fire application triggers.
    set(c"session_replication_role", c"replica");
    // Resolve every function and operator in pg_catalog only (no
    // search_path hijack). Statements on user tables run as their owners
    // (reencrypt::Runner::Owner), never as this worker's superuser.
    set(c"search_path", c"pg_catalog, pg_temp");
    // A rewrap batch is idempotent: losing the last ones in a crash only
    // means they are done again. Do not make the application wait on our
    // WAL flushes.
    set(c"synchronous_commit", c"off");
    // A table owner holding a lock on their table must not stall the
    // worker (and with it every other table and scheduled rotation): a
    // wait longer than this fails that batch, named in last_error, and the
    // worker moves on.
    set(c"lock_timeout", c"5s");
    set(c"application_name", c"pg_kms worker");
    let slot = match shmem::register_worker(db) {
        Ok(slot) => slot,
        Err(other) => {
            log!("pg_kms worker for database {db_name} exits: worker {other} already serves it");
            return;
        }
    };
    log!("pg_kms worker started for database {db_name}");
    let mut columns: HashMap<(u32, String), ColumnState> = HashMap::new();
    // The keyring signature last seen, and when it was first seen.
    let mut sig_seen: Option<(String, i64)> = None;
    let mut throttle = Throttle::new(guc::REENCRYPT_MAX_ROWS_PER_SECOND.get(), Instant::now());
    let mut harvest = access::Harvest::default();
    'main: loop {
        reload_config_if_asked();
        if BackgroundWorker::sigterm_received() {
            break;
        }
        harvest.tick(false);
        let still_installed = xact(|| {
            Spi::get_one::<bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_kms')",
            )
        });
        if matches!(still_installed, Ok(Ok(Some(false)))) {
            break; // DROP EXTENSION
        }
        if !guc::REENCRYPT_ENABLED.get() {
            if !BackgroundWorker::wait_latch(Some(naptime())) {
                break;
            }
            continue;
        }
        if let Err(e) = xact(|| {
            // An act is durable before its audit head reaches the log.
            let _ = crate::pg::spi::exec("SET LOCAL synchronous_commit = on", &[]);
            lifecycle::rotate_due_keys()
        })
        .map(|rotated| {
            for name in rotated {
                log!("pg_kms: rotated key \"{name}\" (scheduled)");
            }
        }) {
            warning!("pg_kms: scheduled rotation failed: {e}");
        }
        let (signature, targets, seen_at_us) = match keyring_state() {
            Ok(state) => state,
            Err(e) => {
                warning!("pg_kms: could not read the keyring: {e}");
                if !BackgroundWorker::wait_latch(Some(naptime())) {
                    break;
                }
                continue;
            }
        };
        // Online encryption of plaintext columns (kms_protect_column).
        let converted = match convert_pass(&mut throttle, &mut harvest) {
            Pass::Stop => break 'main,
            Pass::Disabled => continue 'main,
            // Rows sealed: come back without the nap (rows skipped as
            // locked may be left).
            Pass::Done(worked) => worked,
        };
        let cols = match xact(|| {
            let _ = progress::gc();
            let cols = reencrypt::encrypted_columns()?;
            // Tables a logical-replication subscription writes to are the
            // publisher's: it rewraps them and its UPDATEs arrive here. A
            // rewrap here would diverge from the publisher (and be undone
            // by its next update), so they are left alone.
            let replicated = subscription_targets()?;
            Ok::<_, crate::errors::KmsError>(
                cols.into_iter()
                    .filter(|c| !replicated.contains(&c.relid.to_u32()))
                    .collect::<Vec<_>>(),
            )
        }) {
            Ok(Ok(c)) => c,
            _ => Vec::new(),
        };
        let mut did_work = converted;
        if sig_seen.as_ref().map(|(s, _)| s) != Some(&signature) {
            sig_seen = Some((signature.clone(), seen_at_us));
        }
        let since_us = sig_seen.as_ref().map_or(seen_at_us, |(_, t)| *t);
        // Whether a transaction that began before this keyring was first
        // seen may still be running (it may still seal rows under a former
        // primary): asked at most once per loop, when a verdict needs it.
        let mut old_xacts: Option<bool> = None;
        let mut old_xacts_running = || {
            *old_xacts.get_or_insert_with(|| {
                !matches!(
                    xact_kms(|| crate::pg::activity::no_transaction_older_than(since_us)),
                    Ok(true)
                )
            })
        };
        // After an emergency rotation (kms_rotate_key(..., emergency =>
        // true)) the rewrap runs without the throttle until the marked
        // version is retired.
        let unthrottled = xact(lifecycle::policy::emergency_keys)
            .map(|k| !k.is_empty())
            .unwrap_or(false);
        for col in cols {
            let st = columns
                .entry((col.relid.to_u32(), col.attname.clone()))
                .or_default();
            if st.backoff_until.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            // Clean under this keyring: re-verify only now and then. A
            // verdict reached while older transactions still ran is
            // re-verified as soon as they are gone (or after 3 naptimes).
            if st.clean_under.as_deref() == Some(signature.as_str()) {
                let age = st.clean_at.map_or(Duration::MAX, |t| t.elapsed());
                let fresh = if st.clean_trusted {
                    age < naptime() * 30
                } else {
                    age < naptime() * 3 && old_xacts_running()
                };
                if fresh {
                    continue;
                }
            }
            let trusted = !old_xacts_running();
            match count_column(&col, &targets) {
                Ok(0) => {
                    st.mark_clean(&signature, trusted);
                    continue;
                }
                Ok(_) => {}
                Err(msg) => {
                    st.failed(&col, "could not count the rows to re-encrypt", &msg);
                    continue;
                }
            }
            st.clean_under = None;
            // One pass over the table, in batches.
            let mut cursor: reencrypt::Tid = (0, 0);
            let finished = loop {
                reload_config_if_asked();
                throttle.refresh(guc::REENCRYPT_MAX_ROWS_PER_SECOND.get(), Instant::now());
                if let Some(d) = throttle.delay(Instant::now()).filter(|_| !unthrottled) {
                    if !BackgroundWorker::wait_latch(Some(d)) {
                        break 'main;
                    }
                    continue;
                }
                if BackgroundWorker::sigterm_received() {
                    break 'main;
                }
                if !guc::REENCRYPT_ENABLED.get() {
                    continue 'main;
                }
                // A long pass still hands the access counts over on time.
                harvest.tick(false);
                let limit = throttle.batch_size(guc::REENCRYPT_BATCH_SIZE.get());
                let r = xact_kms(|| {
                    let b = reencrypt::rewrap_batch(
                        &col,
                        Runner::Owner,
                        &targets,
                        cursor,
                        Some(limit),
                    )?;
                    progress::batch(col.relid, &col.attname, b.updated)?;
                    if let Some((tid, why)) = &b.failed {
                        progress::error(col.relid, &col.attname, &reencrypt::row_error(*tid, why))?;
                    }
                    Ok(b)
                });
                match r {
                    Ok(b) => {
                        did_work |= b.updated > 0;
                        if b.updated > 0 {
                            st.succeeded();
                        }
                        throttle.rows += b.picked as u64;
                        match b.last {
                            // Past the last row picked: it was rewrapped, or it
                            // cannot be (named in last_error) and is stepped over.
                            Some(last) if b.picked >= limit => {
                                cursor = (last.0, last.1.saturating_add(1))
                            }
                            _ => break true, // reached the end of the table
                        }
                    }
                    Err(msg) => {
                        // Step forward one row at a time until the row that
                        // fails is found; name it in last_error and step over
                        // it; the rest of the table goes on. (The batch's own
                        // error is recorded only when no row is to blame, so
                        // last_error never goes back to the vaguer message.)
                        // Failures in a row back the column off.
                        throttle.rows += 1;
                        match xact_kms(|| {
                            reencrypt::next_candidate(&col, Runner::Owner, &targets, cursor)
                        }) {
                            Ok(Some(bad)) => {
                                let alone = xact_kms(|| {
                                    let b = reencrypt::rewrap_batch(
                                        &col,
                                        Runner::Owner,
                                        &targets,
                                        bad,
                                        Some(1),
                                    )?;
                                    progress::batch(col.relid, &col.attname, b.updated)?;
                                    Ok(b)
                                });
                                cursor = (bad.0, bad.1.saturating_add(1));
                                match alone {
                                    Ok(b) if b.updated > 0 => st.succeeded(),
                                    Ok(_) => {}
                                    Err(e) => {
                                        let note = reencrypt::row_error(bad, &e);
                                        let _ = xact(|| {
                                            progress::error(col.relid, &col.attname, &note)
                                        });
                                        let failure = Failure {
                                            message: note,
                                            sqlstate: e.sqlstate.clone(),
                                        };
                                        if st.failed(
                                            &col,
                                            "a row could not be re-encrypted",
                                            &failure,
                                        ) {
                                            break false;
                                        }
                                    }
                                }
                            }
                            _ => {
                                let _ = xact(|| progress::error(col.relid, &col.attname, &msg));
                                st.failed(&col, "a batch failed", &msg);
                                break false;
                            }
                        }
                    }
                }
            };
            if finished {
                // The pass is over: count again, so that the progress row
                // says at once whether the column is done (finished_at) or
                // what is left (rows skipped as locked, or failing).
                let trusted = !old_xacts_running();
                if let Ok(0) = count_column(&col, &targets) {
                    st.mark_clean(&signature, trusted);
                }
            }
        }
        // Key policy: retire_after, destroy_after, emergency (lifecycle::policy).
        for c in xact_kms(lifecycle::policy::due).unwrap_or_default() {
            let _ = xact(|| lifecycle::policy::apply(&c));
        }
        if !did_work && !BackgroundWorker::wait_latch(Some(naptime().min(harvest.until_next()))) {
            break;
        }
    }
    harvest.tick(true); // append what is pending before stopping
    if let Some(s) = slot {
        shmem::unregister_worker(s);
    }
    log!("pg_kms worker for database {db_name} stopping");
}

/// How a conversion pass ended.
enum Pass {
    /// SIGTERM: the worker stops.
    Stop,
    /// pg_kms.reencrypt_enabled was turned off.
    Disabled,
    /// Done for now (whether any row was sealed).
    Done(bool),
}

/// One pass over every column being encrypted online: the backfill in
/// throttled batches from where the last pass stopped, then, when nothing
/// is left, the swap (see `crate::protect::convert`).
fn convert_pass(throttle: &mut Throttle, harvest: &mut access::Harvest) -> Pass {
    use crate::protect::convert;
    let policies = match xact_kms(convert::converting) {
        Ok(p) => p,
        Err(e) => {
            warning!("pg_kms: could not read the protected columns: {e}");
            return Pass::Done(false);
        }
    };
    let mut worked = false;
    for p in policies {
        let mut cursor = match xact_kms(|| convert::begin_pass(&p)) {
            Ok(Some((at, _left))) => at,
            Ok(None) => continue,
            Err(msg) => {
                convert_failed(&p, "could not start a pass", &msg);
                continue;
            }
        };
        loop {
            reload_config_if_asked();
            throttle.refresh(guc::REENCRYPT_MAX_ROWS_PER_SECOND.get(), Instant::now());
            if let Some(d) = throttle.delay(Instant::now()) {
                if !BackgroundWorker::wait_latch(Some(d)) {
                    return Pass::Stop;
                }
                continue;
            }
            if BackgroundWorker::sigterm_received() {
                return Pass::Stop;
            }
            if !guc::REENCRYPT_ENABLED.get() {
                return Pass::Disabled;
            }
            harvest.tick(false);
            let limit = throttle.batch_size(guc::REENCRYPT_BATCH_SIZE.get());
            match xact_kms(|| convert::backfill_batch(&p, cursor, limit)) {
                Ok(None) => break, // cancelled, finished or dropped meanwhile
                Ok(Some(b)) => {
                    worked |= b.updated > 0;
                    throttle.rows += b.picked as u64;
                    match b.last {
                        Some(last) if b.picked >= limit => cursor = convert::after(last),
                        _ => {
                            finish(&p);
                            break;
                        }
                    }
                }
                Err(msg) => {
                    // A batch failed as a whole (e.g. a context expression
                    // raised an error for one row): find the first row left,
                    // try it alone, and step over it if it fails too.
                    match xact_kms(|| convert::next_candidate(&p, cursor)) {
                        Ok(Some(bad)) => {
                            if let Err(e) = xact_kms(|| convert::backfill_batch(&p, bad, 1)) {
                                let note = Failure {
                                    message: convert::row_error(bad, &e),
                                    sqlstate: e.sqlstate.clone(),
                                };
                                convert_failed(&p, "a row could not be encrypted", &note);
                            }
                            cursor = convert::after(bad);
                            let _ = xact_kms(|| convert::set_resume(&p, Some(cursor)));
                        }
                        Ok(None) => {
                            finish(&p);
                            break;
                        }
                        Err(_) => {
                            convert_failed(&p, "a batch failed", &msg);
                            break;
                        }
                    }
                }
            }
        }
    }
    Pass::Done(worked)
}

/// The end of the table was reached: the swap if no row is left (counted
/// without the exclusive lock), else the next pass starts over.
fn finish(p: &crate::protect::Policy) {
    use crate::protect::convert;
    match xact_kms(|| convert::pending(p)) {
        Ok(Some(0)) => match xact_kms(|| convert::swap(p)) {
            Ok(Some(held)) => log!(
                "pg_kms: column \"{}\" of table \"{}\" is encrypted; the swap held its lock for {} ms",
                p.attname,
                p.relname,
                held.as_millis()
            ),
            Ok(None) => {}
            Err(msg) => convert_failed(p, "the swap failed", &msg),
        },
        Ok(Some(_)) => {
            let _ = xact_kms(|| convert::set_resume(p, None));
        }
        Ok(None) => {}
        Err(msg) => convert_failed(p, "could not count the rows left", &msg),
    }
}

/// Records a failure of the online encryption of `p`'s column in its
/// policy's last_error, and in the server log (without the message when it
/// may quote data).
fn convert_failed(p: &crate::protect::Policy, what: &str, why: &Failure) {
    let _ = xact_kms(|| crate::protect::convert::record_error(p, why));
    warning!(
        "pg_kms worker: online encryption of column \"{}\" of table \"{}\": {what}: {}",
        p.attname,
        p.relname,
        why.loggable()
    );
}
