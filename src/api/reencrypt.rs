//! Re-encryption and key usage in SQL: `kms_reencrypt_now()` (as its
//! caller) and `kms_key_usage()`. The worker does the same work in the
//! background (`crate::worker`).

use crate::pg::datum::{RawText, RegClass, SqlName};
use pgrx::prelude::*;

/// Per version: state and how many rows in this database reference it,
/// counting only the columns the caller may SELECT (a NOTICE names the
/// others), each scanned as its table's owner.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_key_usage(
    key_name: RawText,
) -> TableIterator<'static, (name!(version, i32), name!(state, String), name!(rows, i64))> {
    crate::reencrypt::key_usage(key_name)
}

/// Rewraps synchronously, in the caller's transaction and as the caller
/// (who needs SELECT and UPDATE on the column, and the key's privileges if
/// it has grants), the rows of `tbl.col` not sealed under their key's
/// primary version. Returns the number of rows rewrapped.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_reencrypt_now(tbl: RegClass, col: SqlName, max_rows: default!(Option<i32>, "NULL")) -> i64 {
    crate::reencrypt::reencrypt_now(tbl, col, max_rows)
}
