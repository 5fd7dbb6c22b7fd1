//! Background re-encryption (needs `shared_preload_libraries = 'pg_kms'`).
//!
//! * The launcher (one per cluster, started once recovery has finished, so
//!   never on a standby) starts one dynamic worker per connectable database
//!   and restarts any that stopped, every naptime.
//! * A database worker exits at once where pg_kms is not installed (the
//!   launcher retries later, so a later CREATE EXTENSION is noticed). Where
//!   it is installed it rotates keys that are due, discovers every
//!   `encrypted_text` column, and rewraps the rows not sealed under their
//!   key's primary version in short batches (`FOR UPDATE SKIP LOCKED`,
//!   resuming by TID range), throttled, then sleeps until the naptime ends
//!   or a committed rotation sets its latch.
//! * It keeps no state that matters across a crash: after `kill -9` or an
//!   immediate shutdown it recounts what is pending and carries on.
//!
//! This file: registration and the transaction wrapper both use;
//! [`launcher`] and [`db`] are the two kinds of process.

mod access;
mod db;
mod launcher;

use crate::pg::guc;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::time::Duration;

pub const LAUNCHER_TYPE: &str = "pg_kms launcher";
pub const WORKER_TYPE: &str = "pg_kms worker";

pub fn register_launcher() {
    BackgroundWorkerBuilder::new(LAUNCHER_TYPE)
        .set_type(LAUNCHER_TYPE)
        .set_library("pg_kms")
        .set_function("pg_kms_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

pub(super) fn naptime() -> Duration {
    Duration::from_millis(guc::REENCRYPT_NAPTIME_MS.get().max(10) as u64)
}

pub(super) fn reload_config_if_asked() -> bool {
    if BackgroundWorker::sighup_received() {
        // SAFETY: the documented way for a background worker to reload the
        // configuration after SIGHUP: called from the worker's main loop
        // (its only thread), outside any transaction and not from a signal
        // handler (the handler only set the flag read above).
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        return true;
    }
    false
}

// PostgreSQL's timeout API (utils/timeout.h), not in pgrx's bindings.
// `STATEMENT_TIMEOUT` is the fourth `TimeoutId` in PostgreSQL 13 to 18; its
// handler (registered by InitPostgres for every backend with a database,
// background workers included) sends SIGINT, which a background worker with
// a database connection handles as a query cancel, so the running statement
// fails at its next CHECK_FOR_INTERRUPTS with "canceling statement due to
// statement timeout".
const STATEMENT_TIMEOUT: std::ffi::c_int = 3;
extern "C-unwind" {
    fn enable_timeout_after(id: std::ffi::c_int, delay_ms: std::ffi::c_int);
    fn disable_timeout(id: std::ffi::c_int, keep_indicator: bool);
}

/// Why a worker transaction failed: the error's message (what
/// `last_error` shows), and what may go to the server log.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub message: String,
    /// The SQLSTATE, when PostgreSQL raised the error.
    pub sqlstate: Option<String>,
}

impl Failure {
    /// The failure as the server log may show it. pg_kms's own messages
    /// never carry a value; of PostgreSQL's, only classes whose messages
    /// name objects and never quote data are logged in full (an input
    /// syntax error, say, quotes the value, and a user function may raise
    /// anything): the others are logged by SQLSTATE, their message is in
    /// `last_error` only (readable by kms_admin and kms_auditor).
    pub fn loggable(&self) -> String {
        match &self.sqlstate {
            None => self.message.clone(),
            Some(code) if message_is_loggable(code) => {
                format!("{} (SQLSTATE {code})", self.message)
            }
            Some(code) => format!(
                "SQLSTATE {code} (the message may quote data: see last_error in kms_reencryption_progress or kms_protected_columns)"
            ),
        }
    }
}

/// SQLSTATE classes whose messages name objects, never data: transaction
/// rollback (40), insufficient resources (53), program limits (54), object
/// not in prerequisite state (55: lock timeouts), operator intervention
/// (57: cancels, statement timeouts), insufficient privilege (42501),
/// undefined or dropped objects (42P01, 42703, 42883).
fn message_is_loggable(code: &str) -> bool {
    matches!(code.get(..2), Some("40" | "53" | "54" | "55" | "57"))
        || matches!(code, "42501" | "42P01" | "42703" | "42883")
}

impl std::ops::Deref for Failure {
    type Target = str;
    fn deref(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Runs `f` in its own transaction, cancelled after
/// `pg_kms.reencrypt_statement_timeout`. An ERROR aborts that transaction
/// and comes back as its message, so one bad table never stops the worker.
pub(super) fn xact<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Result<R, Failure> {
    let limit = guc::REENCRYPT_STATEMENT_TIMEOUT_MS.get();
    // SAFETY: a transaction is started and ended below on every path; the
    // timer is armed only inside it and disarmed on both exits.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        if limit > 0 {
            enable_timeout_after(STATEMENT_TIMEOUT, limit);
        }
    }
    let r = PgTryBuilder::new(|| Ok(f()))
        .catch_others(|e| {
            Err(match e {
                pg_sys::panic::CaughtError::PostgresError(r)
                | pg_sys::panic::CaughtError::ErrorReport(r)
                | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => Failure {
                    message: r.message().to_string(),
                    sqlstate: Some(sqlstate_text(r.sql_error_code())),
                },
            })
        })
        .execute();
    // SAFETY: ends the transaction started above; a cancel that fired after
    // `f` returned is cleared so it cannot hit the next transaction.
    unsafe {
        if limit > 0 {
            disable_timeout(STATEMENT_TIMEOUT, false);
            pg_sys::QueryCancelPending = 0;
        }
        match &r {
            Ok(_) => {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Err(_) => pg_sys::AbortCurrentTransaction(),
        }
    }
    r
}

/// [`xact`] for bodies returning a `KmsResult`: any failure as its message.
pub(super) fn xact_kms<R>(
    f: impl FnOnce() -> crate::errors::KmsResult<R> + std::panic::UnwindSafe,
) -> Result<R, Failure> {
    xact(f).and_then(|r| {
        r.map_err(|e| Failure {
            message: e.message(),
            sqlstate: None,
        })
    })
}

/// The five-character SQLSTATE of an error code (PostgreSQL's
/// MAKE_SQLSTATE packing: six bits per character, from '0').
fn sqlstate_text(code: pg_sys::errcodes::PgSqlErrorCode) -> String {
    let mut n = code as isize as i32;
    let mut out = String::with_capacity(5);
    for _ in 0..5 {
        out.push(char::from(b'0' + (n & 0x3f) as u8));
        n >>= 6;
    }
    out
}
