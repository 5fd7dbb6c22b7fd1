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

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::api::test_support::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn key_usage_reencrypt_now_and_destroy_guard() {
        setup_key("pii");
        run("CREATE TABLE people (id int PRIMARY KEY, email encrypted_text, ssn encrypted_text)");
        run("INSERT INTO people SELECT g, kms_encrypt('e' || g, 'pii'), kms_encrypt('s' || g, 'pii', 'ctx' || g) FROM generate_series(1, 20) g");
        run("SELECT kms_rotate_key('pii')");
        let usage = |v: i32| {
            one::<i64>(&format!(
                "SELECT rows FROM kms_key_usage('pii') WHERE version = {v}"
            ))
            .unwrap()
        };
        assert_eq!((usage(1), usage(2)), (40, 0));
        assert_sqlstate("SELECT * FROM kms_key_usage('nope')", "42704");
        // The destroy guard counts rows still sealed under the version.
        let e = error_of("SELECT kms_destroy_key_version('pii', 1)").unwrap();
        assert!(
            e.starts_with("55000") && e.contains("40 rows in this database still reference it"),
            "{e}"
        );
        // Synchronous re-encryption: at most max_rows, then the rest.
        assert_eq!(
            one::<i64>("SELECT kms_reencrypt_now('people', 'email', 5)"),
            Some(5)
        );
        assert_eq!(
            one::<i64>("SELECT kms_reencrypt_now('people'::regclass, 'email')"),
            Some(15)
        );
        assert_eq!(
            one::<i64>("SELECT kms_reencrypt_now('people', 'email')"),
            Some(0)
        );
        // Context-bound values are left to the application.
        assert_eq!(
            one::<i64>("SELECT kms_reencrypt_now('people', 'ssn')"),
            Some(0)
        );
        assert_eq!(
            one::<String>("SELECT rows_rewrapped || '/' || rows_pending || '/' || rows_needing_context FROM kms_reencryption_progress WHERE column_name = 'ssn'").as_deref(),
            Some("0/0/20")
        );
        assert_eq!((usage(1), usage(2)), (20, 20));
        assert_eq!(one::<i64>("SELECT count(*) FROM people WHERE kms_decrypt(email) = 'e' || id AND kms_decrypt(ssn, 'ctx' || id) = 's' || id"), Some(20));
        run("UPDATE people SET ssn = kms_rewrap(ssn, 'ctx' || id)");
        assert_eq!((usage(1), usage(2)), (0, 40));
        run("SELECT kms_destroy_key_version('pii', 1)");
        // force => true shreds on purpose.
        run("SELECT kms_rotate_key('pii')");
        run("SELECT kms_destroy_key_version('pii', 2, 'tenant erased', force => true)");
        assert_sqlstate("SELECT kms_decrypt(email) FROM people", "55000");
        // Argument checks.
        assert_sqlstate("SELECT kms_reencrypt_now('people', 'id')", "22023");
        assert_sqlstate("SELECT kms_reencrypt_now('people', 'email', -1)", "22023");
        run("CREATE ROLE kt_admin2 IN ROLE kms_admin");
        run("SET LOCAL ROLE kt_admin2");
        assert_sqlstate("SELECT kms_reencrypt_now('people', 'email')", "42501");
        run("RESET ROLE");
    }
}
