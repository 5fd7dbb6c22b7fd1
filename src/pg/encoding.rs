//! The database encoding and conversion to UTF-8 (text and contexts are
//! sealed as UTF-8 whatever the database encoding).

use pgrx::pg_sys;
use std::borrow::Cow;

#[inline]
pub fn db_encoding() -> i32 {
    // SAFETY: GetDatabaseEncoding reads a backend global set when the
    // backend connects; no other precondition.
    unsafe { pg_sys::GetDatabaseEncoding() }
}

pub const PG_UTF8: i32 = pg_sys::pg_enc::PG_UTF8 as i32;
pub const PG_SQL_ASCII: i32 = pg_sys::pg_enc::PG_SQL_ASCII as i32;

/// Text is sealed as UTF-8 so values survive a dump into a database with
/// another encoding; in a UTF-8 (or SQL_ASCII) database this borrows.
pub fn text_to_utf8(bytes: &[u8]) -> Cow<'_, [u8]> {
    let enc = db_encoding();
    if enc == PG_UTF8 || enc == PG_SQL_ASCII || bytes.is_ascii() {
        return Cow::Borrowed(bytes);
    }
    // SAFETY: pg_server_to_any reads exactly `bytes.len()` (> 0 here, as
    // the empty string is ASCII) bytes from `bytes` and returns either that
    // same pointer (no conversion needed: detected and borrowed, so never
    // read as a C string) or a new NUL-terminated palloc'd string in
    // CurrentMemoryContext, valid for the copy made at once. Database text
    // contains no NUL, so CStr sees the whole converted value. A bad byte
    // sequence raises an ERROR (through pgrx's FFI guard), not UB.
    unsafe {
        let p = pg_sys::pg_server_to_any(bytes.as_ptr() as *const _, bytes.len() as i32, PG_UTF8);
        if p as *const u8 == bytes.as_ptr() {
            Cow::Borrowed(bytes)
        } else {
            Cow::Owned(std::ffi::CStr::from_ptr(p).to_bytes().to_vec())
        }
    }
}
