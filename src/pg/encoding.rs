//! The database encoding and conversion to UTF-8 (text and contexts are
//! sealed as UTF-8 whatever the database encoding).

use pgrx::pg_sys;
use zeroize::Zeroizing;

#[inline]
pub fn db_encoding() -> i32 {
    super::fast::database_encoding()
}

pub const PG_UTF8: i32 = pg_sys::pg_enc::PG_UTF8 as i32;
pub const PG_SQL_ASCII: i32 = pg_sys::pg_enc::PG_SQL_ASCII as i32;

/// Bytes in UTF-8: borrowed when no conversion was needed, else an owned
/// copy wiped when dropped (it may be plaintext).
pub enum Utf8<'a> {
    Borrowed(&'a [u8]),
    Owned(Zeroizing<Vec<u8>>),
}

impl std::ops::Deref for Utf8<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Utf8::Borrowed(b) => b,
            Utf8::Owned(v) => v,
        }
    }
}

/// Text is sealed as UTF-8 so values survive a dump into a database with
/// another encoding; in a UTF-8 (or SQL_ASCII) database this borrows.
#[inline(always)]
pub fn text_to_utf8(bytes: &[u8]) -> Utf8<'_> {
    let enc = db_encoding();
    if enc == PG_UTF8 || enc == PG_SQL_ASCII || bytes.is_ascii() {
        return Utf8::Borrowed(bytes);
    }
    server_to_utf8(bytes)
}

/// [`text_to_utf8`] for text that is not ASCII (so not empty) in a
/// database of another encoding; out of line, as the per-row path in a
/// UTF-8 database is the test above.
#[inline(never)]
fn server_to_utf8(bytes: &[u8]) -> Utf8<'_> {
    // SAFETY: pg_server_to_any reads exactly `bytes.len()` (> 0 here, as
    // the empty string is ASCII) bytes from `bytes` and returns either that
    // same pointer (no conversion needed: detected and borrowed, so never
    // read as a C string) or a new NUL-terminated palloc'd string in
    // CurrentMemoryContext, copied, wiped and freed at once. Database text
    // contains no NUL, so CStr sees the whole converted value. A bad byte
    // sequence raises an ERROR (through pgrx's FFI guard), not UB.
    unsafe {
        let p = pg_sys::pg_server_to_any(bytes.as_ptr() as *const _, bytes.len() as i32, PG_UTF8);
        if p as *const u8 == bytes.as_ptr() {
            Utf8::Borrowed(bytes)
        } else {
            let len = std::ffi::CStr::from_ptr(p).to_bytes().len();
            let copy = Zeroizing::new(std::slice::from_raw_parts(p as *const u8, len).to_vec());
            std::ptr::write_bytes(p, 0, len);
            pg_sys::pfree(p as *mut std::ffi::c_void);
            Utf8::Owned(copy)
        }
    }
}
