//! What differs between the PostgreSQL majors pg_kms supports (15 to 18,
//! one cargo feature each: `pg15` (default), `pg16`, `pg17`, `pg18`).
//!
//! The one place for version differences: code elsewhere asks this module
//! rather than testing `cfg(feature = "pgNN")` itself. What was checked
//! against each major's headers and found NOT to differ, so that nobody
//! adds a cfg for it:
//!
//! * `ErrorData` (utils/elog.h): the same fields in 15 to 18, and the
//!   `emit_log_hook` signature; the statement-log formats of tcop/postgres.c
//!   and auto_explain are the same strings.
//! * gram.h's constant token codes (`FCONST` 260 ... `ICONST` 266, used by
//!   `core::sqlscan`): bison numbers tokens in declaration order and gram.y
//!   declares `IDENT UIDENT FCONST SCONST USCONST BCONST XCONST Op` then
//!   `ICONST PARAM` first in every major from 13 to 18. A `#[pg_test]` in
//!   `hooks::redact` lexes one literal of each kind with the server's
//!   scanner and fails if a major ever renumbers them.
//! * utils/timeout.h: `STATEMENT_TIMEOUT` is the fourth `TimeoutId` (3) in
//!   13 to 18 (18 adds `TRANSACTION_TIMEOUT` after it), used by
//!   `worker::xact`.
//! * The background worker API as pgrx wraps it.

use pgrx::pg_sys;
use std::ffi::CString;

/// The major this build is for (15, 16, 17 or 18).
pub const MAJOR: u32 = pg_sys::PG_MAJORVERSION_NUM;

/// The backend's gettext domain, `PG_TEXTDOMAIN("postgres")`:
/// `postgres-15`, `postgres-18`, ...
pub fn backend_text_domain() -> CString {
    CString::new(format!("postgres-{MAJOR}")).unwrap_or_default()
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// The library is loaded by the server it was built for.
    #[pg_test]
    fn built_for_the_running_major() {
        let v = Spi::get_one::<i32>("SELECT current_setting('server_version_num')::int / 10000")
            .unwrap()
            .unwrap();
        assert_eq!(v as u32, super::MAJOR);
        assert_eq!(
            super::backend_text_domain().to_str().unwrap(),
            format!("postgres-{v}")
        );
    }
}
