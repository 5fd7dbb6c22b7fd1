//! Postgres functions the per-value paths call without pgrx's FFI guard.
//!
//! pgrx wraps every call through `pg_sys` in a `sigsetjmp` guard (about 175
//! instructions: a thread check, saving and restoring the error stacks),
//! because a Postgres function may raise an ERROR, which `siglongjmp`s and
//! must not cross Rust frames unguarded. The functions declared here are
//! called only in ways that cannot raise one, so they are declared again
//! without the guard; each use says why it cannot raise. Everything else
//! goes through `pg_sys` as usual.
//!
//! Per value this saves four guarded calls on decryption (the database
//! encoding, the result's allocation, the text check, which is now done in
//! Rust by [`crate::core::text::is_valid_utf8_text`], and the argument's
//! detoasting, now only for out-of-line or compressed values).

use pgrx::pg_sys;
use std::ffi::{c_int, c_void};

extern "C-unwind" {
    fn GetDatabaseEncoding() -> c_int;
    fn GetUserId() -> pg_sys::Oid;
    fn GetSessionUserId() -> pg_sys::Oid;
    fn GetCurrentStatementStartTimestamp() -> pg_sys::TimestampTz;
    fn MemoryContextAllocExtended(
        context: pg_sys::MemoryContext,
        size: pg_sys::Size,
        flags: c_int,
    ) -> *mut c_void;
}

/// `MCXT_ALLOC_NO_OOM`: return NULL instead of raising out of memory.
const MCXT_ALLOC_NO_OOM: c_int = 0x02;
/// `MaxAllocSize`: the largest ordinary allocation (1 GB - 1).
const MAX_ALLOC_SIZE: usize = 0x3fff_ffff;

/// The database encoding (`GetDatabaseEncoding()`).
#[inline]
pub fn database_encoding() -> i32 {
    // SAFETY: GetDatabaseEncoding returns a field of a backend global that
    // is set before any SQL runs (it points at the SQL_ASCII entry before
    // that); it takes no argument and cannot raise an ERROR.
    unsafe { GetDatabaseEncoding() }
}

/// The current user (`GetUserId()`).
#[inline]
pub fn current_user() -> pg_sys::Oid {
    // SAFETY: GetUserId returns a backend global, set once the backend is
    // connected (always, when SQL or the worker's transactions run); it
    // takes no argument and cannot raise an ERROR (it only Asserts).
    unsafe { GetUserId() }
}

/// The session user (`GetSessionUserId()`).
#[inline]
pub fn session_user() -> pg_sys::Oid {
    // SAFETY: as for GetUserId: a backend global, no ERROR.
    unsafe { GetSessionUserId() }
}

/// When the current statement started (a backend global: no clock call).
#[inline]
pub fn statement_start() -> i64 {
    // SAFETY: returns a backend global; takes no argument and cannot raise
    // an ERROR.
    unsafe { GetCurrentStatementStartTimestamp() }
}

/// `len` bytes from `CurrentMemoryContext`, or None when the context is
/// out of memory or `len` is over `MaxAllocSize` (the caller then takes
/// the guarded `palloc`, which raises the proper ERROR).
#[inline]
pub fn try_palloc(len: usize) -> Option<*mut u8> {
    if len > MAX_ALLOC_SIZE {
        return None;
    }
    // SAFETY: called during a function call or a transaction, where
    // CurrentMemoryContext is a valid context (an AllocSet, Generation or
    // Bump context: the kinds SQL functions run in; only a Slab context,
    // never current there, could raise on an unexpected size). With
    // MCXT_ALLOC_NO_OOM and a size within MaxAllocSize (checked above)
    // MemoryContextAllocExtended cannot raise an ERROR on any supported
    // major (13-18): an allocation failure returns NULL instead.
    let p =
        unsafe { MemoryContextAllocExtended(pg_sys::CurrentMemoryContext, len, MCXT_ALLOC_NO_OOM) };
    (!p.is_null()).then_some(p as *mut u8)
}
