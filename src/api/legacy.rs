//! C entry points of earlier versions' SQL that the current SQL no longer
//! has: stubs that only raise. Nothing else belongs here.
//!
//! Why they exist: the library (`$libdir/pg_kms`) is not versioned, so the
//! current library must load every function an older install script
//! declares. `CREATE FUNCTION ... LANGUAGE c` checks that the symbol
//! exists, so without these a database still at 0.1.0 could not be
//! restored by pg_upgrade (it recreates the extension's objects at their
//! installed version) and `CREATE EXTENSION pg_kms VERSION '0.1.0'` would
//! fail. They take no argument (the values passed are never read, so no
//! input is decoded), run no old logic, never switch identity, and raise
//! 0A000 telling to run `ALTER EXTENSION pg_kms UPDATE`, which drops them
//! from the SQL (sql/pg_kms--0.1.0--0.2.0.sql).
//!
//! `sql = false`: they are not part of the current version's SQL.
//! A stub stays as long as an install script that names its symbol is
//! supported (sql/pg_kms--0.1.0.sql).

use crate::errors::KmsError;
use pgrx::prelude::*;

fn removed(function: &'static str) -> ! {
    KmsError::RemovedFunction {
        function,
        since: "0.2.0",
    }
    .raise()
}

/// 0.1.0: `kms.rewrap_status(encrypted_text) RETURNS integer`, the worker's
/// classification of a value.
#[pg_extern(sql = false)]
fn rewrap_status() -> i32 {
    removed("kms.rewrap_status(encrypted_text)")
}

/// 0.1.0: `kms.value_key_id(encrypted_text) RETURNS integer`.
#[pg_extern(sql = false)]
fn value_key_id() -> i32 {
    removed("kms.value_key_id(encrypted_text)")
}

/// 0.1.0: `kms.value_version(encrypted_text) RETURNS integer`.
#[pg_extern(sql = false)]
fn value_version() -> i32 {
    removed("kms.value_version(encrypted_text)")
}

/// 0.1.0: `kms.rewrap_value(encrypted_text) RETURNS encrypted_text`, the
/// worker's rewrap without a context (it ran as the catalog owner inside
/// user tables' UPDATEs; 0.2.0 rewraps as the table's owner).
#[pg_extern(sql = false)]
fn rewrap_value() -> i32 {
    removed("kms.rewrap_value(encrypted_text)")
}
