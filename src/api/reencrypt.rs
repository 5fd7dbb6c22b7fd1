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
/// primary version; values sealed with a context only when the column is
/// protected with that context (each row's context computed from the
/// policy, as the caller). Returns the number of rows rewrapped.
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

    #[pg_test]
    fn progress_says_finished_at_once_and_counts_rows_under_a_disabled_version() {
        setup_key("pii");
        run("CREATE TABLE fin (id int PRIMARY KEY, v encrypted_text)");
        run("INSERT INTO fin SELECT g, kms_encrypt('v' || g, 'pii') FROM generate_series(1, 12) g");
        run("SELECT kms_rotate_key('pii')");
        let row = || {
            one::<String>(
                "SELECT rows_rewrapped || '/' || rows_pending || '/' || (finished_at IS NOT NULL)
                        || '/' || coalesce(rows_under_disabled::text, '-') || '/' || failures
                        || '/' || (backoff_until IS NULL)
                   FROM kms_reencryption_progress WHERE table_name = 'fin'::regclass",
            )
            .unwrap_or_default()
        };
        // Part of the rows: not finished.
        assert_eq!(
            one::<i64>("SELECT kms_reencrypt_now('fin', 'v', 5)"),
            Some(5)
        );
        assert_eq!(row(), "5/7/false/0/0/true");
        // The batch that rewraps the last pending row sets finished_at.
        assert_eq!(one::<i64>("SELECT kms_reencrypt_now('fin', 'v')"), Some(7));
        assert_eq!(row(), "12/0/true/0/0/true");
        // Rows sealed under a version that is then disabled: counted, and
        // not pending (nothing can rewrap them).
        run("SELECT kms_rotate_key('pii')");
        run("UPDATE fin SET v = kms_encrypt('w' || id, 'pii') WHERE id <= 4");
        run("SELECT kms_set_primary('pii', 2)");
        run("SELECT kms_disable_key_version('pii', 3)");
        assert_eq!(one::<i64>("SELECT kms_reencrypt_now('fin', 'v')"), Some(0));
        assert_eq!(row(), "12/0/true/4/0/true");
    }

    /// (rows_rewrapped, rows_pending, rows_needing_context, last_error) of
    /// `tbl.col` in kms_reencryption_progress.
    fn progress_of(tbl: &str, col: &str) -> String {
        one::<String>(&format!(
            "SELECT rows_rewrapped || '/' || rows_pending || '/' || rows_needing_context || '/' || coalesce(last_error, '-')
               FROM kms_reencryption_progress WHERE table_name = '{tbl}'::regclass AND column_name = '{col}'"
        ))
        .unwrap_or_default()
    }

    #[pg_test]
    fn reencrypt_now_rewraps_values_bound_to_their_policy_context() {
        setup_key("pii");
        run("CREATE TABLE pc (id int PRIMARY KEY, c encrypted_text)");
        run("SELECT kms_protect_column('pc', 'c', 'pii', context => 'id::text')");
        // Through the decrypted view (the context is computed from NEW) ...
        run("INSERT INTO pc_decrypted (id, c) SELECT g, 'v' || g FROM generate_series(1, 20) g");
        // ... or with kms_encrypt and the same context: the same.
        run("INSERT INTO pc SELECT g, kms_encrypt('v' || g, 'pii', g::text) FROM generate_series(21, 25) g");
        // Sealed without a context (e.g. before the policy): rewrapped without.
        run("INSERT INTO pc VALUES (26, kms_encrypt('v26', 'pii'))");
        // Sealed with another context than the policy gives the row.
        run("INSERT INTO pc VALUES (27, kms_encrypt('v27', 'pii', 'other'))");
        // A context over a nullable column: NULL for a row sealed with one.
        run("CREATE TABLE pn (id int PRIMARY KEY, tenant text, c encrypted_text)");
        run("SELECT kms_protect_column('pn', 'c', 'pii', context => 'tenant')");
        run("INSERT INTO pn_decrypted (id, tenant, c) VALUES (1, 'a', 'x1'), (2, NULL, 'x2')");
        run("INSERT INTO pn VALUES (3, NULL, kms_encrypt('x3', 'pii', 'b')), (4, 'c', kms_encrypt('x4', 'pii', 'c'))");
        // A plaintext column being converted: its shadow column is filled
        // with the context by the conversion trigger, and rewrapped with it.
        run("CREATE TABLE pl (id int PRIMARY KEY, email text)");
        run("SELECT kms_protect_column('pl', 'email', 'pii', context => 'id::text')");
        run("INSERT INTO pl SELECT g, 'e' || g FROM generate_series(1, 10) g");
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM pl WHERE kms_decrypt(email_kms_new, id::text) = email"
            ),
            Some(10)
        );
        run("SELECT kms_rotate_key('pii')");
        let usage = |v: i32| {
            one::<i64>(&format!(
                "SELECT rows FROM kms_key_usage('pii') WHERE version = {v}"
            ))
            .unwrap()
        };
        assert_eq!((usage(1), usage(2)), (41, 0));

        assert_eq!(one::<i64>("SELECT kms_reencrypt_now('pc', 'c')"), Some(26));
        assert_eq!(
            progress_of("pc", "c"),
            "26/1/0/row (0, 27) could not be re-encrypted: decryption failed: wrong key, wrong context, or corrupt data"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pc WHERE kms_key_version(c) = 2 AND kms_decrypt(c, nullif(id, 26)::text) = 'v' || id"),
            Some(26)
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pc_decrypted WHERE id <= 25 AND c = 'v' || id"),
            Some(25)
        );
        // The wrong row is left as it was (it opens with its own context).
        assert_eq!(
            one::<String>(
                "SELECT kms_key_version(c) || kms_decrypt(c, 'other') FROM pc WHERE id = 27"
            )
            .as_deref(),
            Some("1v27")
        );
        assert_eq!(one::<i64>("SELECT kms_reencrypt_now('pc', 'c')"), Some(0));

        assert_eq!(one::<i64>("SELECT kms_reencrypt_now('pn', 'c')"), Some(3));
        let p = progress_of("pn", "c");
        assert!(
            p.starts_with("3/1/0/row (0, 3) could not be re-encrypted: the value was sealed with a context and the policy's context expression is NULL"),
            "{p}"
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pn_decrypted WHERE id <> 3 AND c = 'x' || id"),
            Some(3)
        );

        assert_eq!(
            one::<i64>("SELECT kms_reencrypt_now('pl', 'email_kms_new')"),
            Some(10)
        );
        assert_eq!(progress_of("pl", "email_kms_new"), "10/0/0/-");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pl WHERE kms_key_version(email_kms_new) = 2 AND kms_decrypt(email_kms_new, id::text) = email"),
            Some(10)
        );
        assert_eq!((usage(1), usage(2)), (2, 39));
    }

    #[pg_test]
    fn reencrypt_now_of_a_policy_column_in_steps_and_as_its_caller() {
        setup_key("pii");
        run("CREATE TABLE pm (id int PRIMARY KEY, c encrypted_text)");
        run("CREATE FUNCTION public.pm_ctx(i int) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT 'pm' || i $$");
        run("REVOKE EXECUTE ON FUNCTION public.pm_ctx(int) FROM PUBLIC");
        run("SELECT kms_protect_column('pm', 'c', 'pii', context => 'public.pm_ctx(id)')");
        run("INSERT INTO pm_decrypted (id, c) SELECT g, 'v' || g FROM generate_series(1, 30) g");
        run("SELECT kms_rotate_key('pii')");
        assert_eq!(
            one::<i64>("SELECT kms_reencrypt_now('pm', 'c', 7)"),
            Some(7)
        );
        assert_eq!(progress_of("pm", "c"), "7/23/0/-");
        assert_eq!(one::<i64>("SELECT kms_reencrypt_now('pm', 'c')"), Some(23));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pm_decrypted WHERE c = 'v' || id"),
            Some(30)
        );
        // kms_reencrypt_now evaluates the context as its caller: one who may
        // not call the context's function gets 42501.
        run("SELECT kms_rotate_key('pii')");
        run("CREATE ROLE pm_writer IN ROLE kms_admin, kms_user");
        run("GRANT SELECT, UPDATE ON pm TO pm_writer");
        let e =
            full_error_as("pm_writer", "SELECT kms_reencrypt_now('pm', 'c')").unwrap_or_default();
        assert!(
            e.starts_with("42501|permission denied for function pm_ctx"),
            "{e}"
        );
        run("GRANT EXECUTE ON FUNCTION public.pm_ctx(int) TO pm_writer");
        assert_eq!(
            as_role("pm_writer", "SELECT kms_reencrypt_now('pm', 'c')"),
            None
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pm WHERE kms_key_version(c) = 3 AND kms_decrypt(c, public.pm_ctx(id)) = 'v' || id"),
            Some(30)
        );
    }
}
