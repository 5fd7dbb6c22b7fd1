//! The launcher: one per cluster, starts (and restarts) one worker per
//! connectable database every naptime.

use super::*;
use crate::pg::shmem;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::HashMap;

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_kms_launcher_main(_arg: pg_sys::Datum) {
    if crate::pg::binary_upgrade() {
        // Not registered in binary-upgrade mode (see _PG_init); in case it
        // was started anyway, do nothing there.
        return;
    }
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some("postgres"), None);
    log!("pg_kms launcher started");
    let mut workers: HashMap<u32, pgrx::bgworkers::DynamicBackgroundWorker> = HashMap::new();
    let mut warned_full = false;
    loop {
        reload_config_if_asked();
        shmem::forget_dead_workers();
        let dbs = xact(|| {
            // (oid, what the worker's name shows: the database's name when it
            // is printable ASCII, so that it fits any encoding, else the oid).
            Spi::connect(|c| -> Result<Vec<(u32, String)>, pgrx::spi::Error> {
                let mut v = Vec::new();
                for r in c.select("SELECT oid, pg_catalog.textsend(datname::pg_catalog.text) FROM pg_catalog.pg_database WHERE datallowconn AND NOT datistemplate", None, &[])? {
                    let oid = r.get::<pg_sys::Oid>(1)?.map(|o| o.to_u32()).unwrap_or(0);
                    let name = r.get::<Vec<u8>>(2)?.unwrap_or_default();
                    let label = match std::str::from_utf8(&name) {
                        Ok(n) if n.bytes().all(|b| (b' '..=b'~').contains(&b)) => n.to_string(),
                        _ => oid.to_string(),
                    };
                    v.push((oid, label));
                }
                Ok(v)
            })
        });
        if let Ok(Ok(dbs)) = dbs {
            workers.retain(|db, w| {
                dbs.iter().any(|(d, _)| d == db)
                    && !matches!(
                        w.pid(),
                        Err(BackgroundWorkerStatus::Stopped
                            | BackgroundWorkerStatus::PostmasterDied)
                    )
            });
            for (db, label) in dbs {
                if workers.contains_key(&db) {
                    continue;
                }
                let started =
                    BackgroundWorkerBuilder::new(&format!("pg_kms worker for database {label}"))
                        .set_type(WORKER_TYPE)
                        .set_library("pg_kms")
                        .set_function("pg_kms_db_worker_main")
                        .enable_spi_access()
                        .set_start_time(BgWorkerStartTime::RecoveryFinished)
                        .set_restart_time(None)
                        .set_argument(Some(pg_sys::Datum::from(db as usize)))
                        // SAFETY: a plain read of a backend global set at
                        // process start.
                        .set_notify_pid(unsafe { pg_sys::MyProcPid })
                        .load_dynamic();
                match started {
                    Ok(w) => {
                        workers.insert(db, w);
                    }
                    Err(_) if !warned_full => {
                        warning!("pg_kms: could not start a re-encryption worker; raise max_worker_processes");
                        warned_full = true;
                    }
                    Err(_) => {}
                }
            }
        }
        if !BackgroundWorker::wait_latch(Some(naptime())) {
            break;
        }
    }
    log!("pg_kms launcher stopping");
}
