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
            Spi::connect(|c| -> Result<Vec<u32>, pgrx::spi::Error> {
                let mut v = Vec::new();
                for r in c.select("SELECT oid FROM pg_catalog.pg_database WHERE datallowconn AND NOT datistemplate", None, &[])? {
                    v.push(r.get::<pg_sys::Oid>(1)?.map(|o| o.to_u32()).unwrap_or(0));
                }
                Ok(v)
            })
        });
        if let Ok(Ok(dbs)) = dbs {
            workers.retain(|db, w| {
                dbs.contains(db)
                    && !matches!(
                        w.pid(),
                        Err(BackgroundWorkerStatus::Stopped
                            | BackgroundWorkerStatus::PostmasterDied)
                    )
            });
            for db in dbs {
                if workers.contains_key(&db) {
                    continue;
                }
                let started =
                    BackgroundWorkerBuilder::new(&format!("pg_kms worker for database {db}"))
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
