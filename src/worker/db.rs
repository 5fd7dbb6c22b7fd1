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
use std::time::Instant;

/// What the worker remembers between passes (lost on restart, harmlessly).
#[derive(Default)]
struct ColumnState {
    /// Keyring signature under which the column was last found clean.
    clean_under: Option<String>,
    clean_at: Option<Instant>,
}

/// The keyring as the worker sees it, read in one transaction (one
/// snapshot): a signature of every key's primary and version states (a
/// column found clean under it stays clean until it changes), and the
/// headers to rewrap.
fn keyring_state() -> Result<(String, reencrypt::Targets), String> {
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
        Ok((signature.unwrap_or_default(), reencrypt::targets()?))
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
            log!("pg_kms worker for database {db} exits: worker {other} already serves it");
            return;
        }
    };
    log!("pg_kms worker started for database {db}");
    let mut columns: HashMap<(u32, String), ColumnState> = HashMap::new();
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
        if let Err(e) = xact(lifecycle::rotate_due_keys).map(|rotated| {
            for name in rotated {
                log!("pg_kms: rotated key \"{name}\" (scheduled)");
            }
        }) {
            warning!("pg_kms: scheduled rotation failed: {e}");
        }
        let (signature, targets) = match keyring_state() {
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
        let converted = match convert_pass(&mut throttle) {
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
        for col in cols {
            let st = columns
                .entry((col.relid.to_u32(), col.attname.clone()))
                .or_default();
            // Clean under this keyring: re-verify only now and then.
            let fresh = st.clean_at.is_some_and(|t| t.elapsed() < naptime() * 30);
            if st.clean_under.as_deref() == Some(signature.as_str()) && fresh {
                continue;
            }
            match xact_kms(|| {
                // Every statement on the table runs as its owner, under
                // SECURITY_RESTRICTED_OPERATION (see reencrypt::Runner).
                let (pending, ctx) = reencrypt::pending_counts(&col, Runner::Owner, &targets)?;
                progress::start(col.relid, &col.attname, pending, ctx)?;
                Ok(pending)
            }) {
                Ok(0) => {
                    st.clean_under = Some(signature.clone());
                    st.clean_at = Some(Instant::now());
                    continue;
                }
                Ok(_) => {}
                Err(msg) => {
                    let _ = xact(|| progress::error(col.relid, &col.attname, &msg));
                    continue;
                }
            }
            st.clean_under = None;
            // One pass over the table, in batches.
            let mut cursor: reencrypt::Tid = (0, 0);
            loop {
                reload_config_if_asked();
                throttle.refresh(guc::REENCRYPT_MAX_ROWS_PER_SECOND.get(), Instant::now());
                if let Some(d) = throttle.delay(Instant::now()) {
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
                        throttle.rows += b.picked as u64;
                        match b.last {
                            // Past the last row picked: it was rewrapped, or it
                            // cannot be (named in last_error) and is stepped over.
                            Some(last) if b.picked >= limit => {
                                cursor = (last.0, last.1.saturating_add(1))
                            }
                            _ => break, // reached the end of the table
                        }
                    }
                    Err(msg) => {
                        // Step forward one row at a time until the row that
                        // fails is found; name it in last_error and step over
                        // it; the rest of the table goes on. (The batch's own
                        // error is recorded only when no row is to blame, so
                        // last_error never goes back to the vaguer message.)
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
                                if let Err(e) = alone {
                                    let note = reencrypt::row_error(bad, &e);
                                    let _ =
                                        xact(|| progress::error(col.relid, &col.attname, &note));
                                }
                                cursor = (bad.0, bad.1.saturating_add(1));
                            }
                            _ => {
                                let _ = xact(|| progress::error(col.relid, &col.attname, &msg));
                                break;
                            }
                        }
                    }
                }
            }
        }
        if !did_work && !BackgroundWorker::wait_latch(Some(naptime().min(harvest.until_next()))) {
            break;
        }
    }
    harvest.tick(true); // append what is pending before stopping
    if let Some(s) = slot {
        shmem::unregister_worker(s);
    }
    log!("pg_kms worker for database {db} stopping");
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
fn convert_pass(throttle: &mut Throttle) -> Pass {
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
                let _ = xact_kms(|| convert::record_error(&p, &msg));
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
                                let note = convert::row_error(bad, &e);
                                let _ = xact_kms(|| convert::record_error(&p, &note));
                            }
                            cursor = convert::after(bad);
                            let _ = xact_kms(|| convert::set_resume(&p, Some(cursor)));
                        }
                        Ok(None) => {
                            finish(&p);
                            break;
                        }
                        Err(_) => {
                            let _ = xact_kms(|| convert::record_error(&p, &msg));
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
            Err(msg) => {
                let _ = xact_kms(|| convert::record_error(p, &msg));
            }
        },
        Ok(Some(_)) => {
            let _ = xact_kms(|| convert::set_resume(p, None));
        }
        Ok(None) => {}
        Err(msg) => {
            let _ = xact_kms(|| convert::record_error(p, &msg));
        }
    }
}
