//! Running a piece of server code that may raise an ERROR, and getting the
//! error back instead of aborting the caller's transaction: an internal
//! subtransaction, rolled back on error, as PL/pgSQL's EXCEPTION blocks do.

use pgrx::pg_sys;
use pgrx::prelude::*;

/// An ERROR caught by [`catch`]: its SQLSTATE (five characters) and message.
#[derive(Debug, Clone)]
pub struct Caught {
    pub sqlstate: String,
    pub message: String,
}

/// Runs `f` in an internal subtransaction. On an ERROR the subtransaction
/// is rolled back (locks, memory and resources it took are released) and
/// the error comes back; the caller's transaction goes on.
pub fn catch<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Result<R, Caught> {
    // SAFETY: the memory context and resource owner are saved before the
    // subtransaction starts and restored on both exits, as PL/pgSQL and
    // PL/Python do around their subtransactions; the subtransaction is
    // released or rolled back on every path. Called inside a transaction.
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
        let r = PgTryBuilder::new(|| Ok(f()))
            .catch_others(|e| {
                Err(match e {
                    pg_sys::panic::CaughtError::PostgresError(r)
                    | pg_sys::panic::CaughtError::ErrorReport(r)
                    | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => Caught {
                        sqlstate: sqlstate_text(r.sql_error_code()),
                        message: r.message().to_string(),
                    },
                })
            })
            .execute();
        match r {
            Ok(_) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
        r
    }
}

fn sqlstate_text(code: PgSqlErrorCode) -> String {
    let mut n = code as i32;
    let mut s = String::with_capacity(5);
    for _ in 0..5 {
        // PGSIXBIT: six bits per character, from '0'.
        s.push((((n & 0x3F) as u8) + b'0') as char);
        n >>= 6;
    }
    s
}
