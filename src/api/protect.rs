//! Protected columns in SQL: `kms_protect_column`, `kms_unprotect_column`
//! (`kms_admin`, table owner; audited), and the DDL guard's event trigger
//! function (`kms.protect_ddl_guard`, declared in sql/protect.sql).

use crate::errors::OrRaise;
use crate::pg::datum::{RawText, RegClass, SqlName};
use crate::protect::guard::Event;
use pgrx::pg_sys;
use pgrx::prelude::*;

/// Records a policy for `tbl.col` and makes (or rebuilds) the table's
/// decrypted view; returns the view's qualified name. A `text`, `varchar`
/// or `bytea` column is encrypted online (see kms_protected_columns).
#[pg_extern(volatile, parallel_unsafe)]
fn kms_protect_column(
    tbl: RegClass,
    col: SqlName,
    key_name: RawText,
    context: default!(Option<String>, "NULL"),
    deterministic: default!(bool, false),
    blind_index_bits: default!(Option<i32>, "NULL"),
    view_name: default!(Option<String>, "NULL"),
) -> String {
    crate::protect::protect_column_sql(crate::protect::Request {
        relid: tbl.0,
        column: &col.0,
        key_name: key_name.bytes(),
        context: context.as_deref(),
        deterministic,
        blind_index_bits,
        view_name: view_name.as_deref(),
    })
}

/// Removes the policy of `tbl.col` (cancels an online conversion).
#[pg_extern(volatile, parallel_unsafe)]
fn kms_unprotect_column(tbl: RegClass, col: SqlName) {
    crate::protect::unprotect_column_sql(tbl.0, &col.0)
}

/// The event trigger function (declared in sql/protect.sql).
#[pg_extern(sql = false)]
fn kms_protect_ddl_guard(fcinfo: pg_sys::FunctionCallInfo) -> Option<i32> {
    // SAFETY: fcinfo is the call's own; an event trigger call carries an
    // EventTriggerData node as its context, whose `event` is a C string.
    let event = unsafe {
        let ctx = (*fcinfo).context;
        if ctx.is_null() || (*ctx).type_ != pg_sys::NodeTag::T_EventTriggerData {
            return None;
        }
        let data = ctx as *mut pg_sys::EventTriggerData;
        std::ffi::CStr::from_ptr((*data).event).to_bytes() == b"sql_drop"
    };
    let event = if event {
        Event::SqlDrop
    } else {
        Event::DdlCommandEnd
    };
    crate::protect::guard::fire(event).or_raise();
    None
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::api::test_support::*;
    use pgrx::prelude::*;

    fn people() {
        setup_key("pii");
        run("CREATE TABLE people (id bigserial PRIMARY KEY, name text, email encrypted_text)");
    }

    #[pg_test]
    fn protect_encrypted_column_and_write_through_the_view() {
        people();
        assert_eq!(
            one::<String>("SELECT kms_protect_column('people', 'email', 'pii', context => 'id::text', blind_index_bits => 16)").as_deref(),
            Some("public.people_decrypted")
        );
        // Insert through the view: the id comes from the table's sequence
        // (a default copied onto the view) before the context is computed.
        assert_eq!(
            one::<String>("INSERT INTO people_decrypted (name, email) VALUES ('ann', 'ann@example.com') RETURNING id || ':' || email").as_deref(),
            Some("1:ann@example.com")
        );
        run("INSERT INTO people_decrypted (name, email) SELECT 'p' || g, 'p' || g || '@example.com' FROM generate_series(1, 5) g");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM people WHERE kms_decrypt(email, id::text) = (SELECT email FROM people_decrypted d WHERE d.id = people.id)"),
            Some(6)
        );
        // Sealed with the row's context: no other context opens it.
        assert_sqlstate(
            "SELECT kms_decrypt(email) FROM people WHERE id = 1",
            "39000",
        );
        // The blind index column is filled and indexed.
        assert_eq!(
            one::<i64>("SELECT count(*) FROM people_decrypted WHERE email_bidx = kms_blind_index('ann@example.com', 'pii', NULL, 16)"),
            Some(1)
        );
        // Update: the ciphertext changes only with the plaintext.
        let before = one::<Vec<u8>>("SELECT email::bytea FROM people WHERE id = 1").unwrap();
        run("UPDATE people_decrypted SET name = 'anne' WHERE id = 1");
        assert_eq!(
            one::<Vec<u8>>("SELECT email::bytea FROM people WHERE id = 1").unwrap(),
            before
        );
        assert_eq!(
            one::<String>("UPDATE people_decrypted SET email = 'anne@example.com' WHERE id = 1 RETURNING email").as_deref(),
            Some("anne@example.com")
        );
        assert_ne!(
            one::<Vec<u8>>("SELECT email::bytea FROM people WHERE id = 1").unwrap(),
            before
        );
        assert_eq!(
            one::<String>("SELECT kms_decrypt(email, id::text) FROM people WHERE id = 1")
                .as_deref(),
            Some("anne@example.com")
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM people WHERE email_bidx = kms_blind_index('anne@example.com', 'pii', NULL, 16)"),
            Some(1)
        );
        assert_eq!(one::<i64>("WITH d AS (DELETE FROM people_decrypted WHERE id = 1 RETURNING 1) SELECT count(*) FROM d"), Some(1));
        assert_eq!(one::<i64>("SELECT count(*) FROM people"), Some(5));
        // Listed, and audited.
        assert_eq!(
            one::<String>(
                "SELECT state || ':' || context || ':' || view_name FROM kms_protected_columns"
            )
            .as_deref(),
            Some("protected:(id)::text:people_decrypted")
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM kms_audit_log WHERE operation = 'protect_column' AND key_name = 'pii'"), Some(1));
        assert_eq!(one::<bool>("SELECT kms_verify_audit_log()"), Some(true));
        // PostgreSQL has no upsert through a view with INSTEAD OF triggers:
        // a conflict target finds no unique constraint on the view, and
        // DO NOTHING without one does not catch the table's conflict.
        assert_sqlstate("INSERT INTO people_decrypted (id, name, email) VALUES (2, 'a', 'b') ON CONFLICT (id) DO UPDATE SET name = 'c'", "42P10");
        assert_sqlstate("INSERT INTO people_decrypted (id, name, email) VALUES (2, 'a', 'b') ON CONFLICT DO NOTHING", "23505");
        // The view is security_invoker.
        assert_eq!(
            one::<bool>("SELECT 'security_invoker=true' = ANY (reloptions) FROM pg_class WHERE relname = 'people_decrypted'"),
            Some(true)
        );
    }

    #[pg_test]
    fn bad_requests_are_refused_with_their_sqlstate() {
        people();
        run("CREATE TABLE nopk (a text, b encrypted_text)");
        for (sql, code) in [
            ("SELECT kms_protect_column('people', 'nope', 'pii')", "42703"),
            ("SELECT kms_protect_column('people', 'id', 'pii')", "0A000"),
            ("SELECT kms_protect_column('people', 'email', 'nokey')", "42704"),
            ("SELECT kms_protect_column('people', 'email', 'pii', context => 'nope::text')", "42P17"),
            ("SELECT kms_protect_column('people', 'email', 'pii', context => 'random()::text')", "42P17"),
            ("SELECT kms_protect_column('people', 'email', 'pii', context => 'id')", "42P17"),
            ("SELECT kms_protect_column('people', 'email', 'pii', context => 'ctid::text')", "42P17"),
            ("SELECT kms_protect_column('people', 'email', 'pii', context => 'email::text')", "42P17"),
            ("SELECT kms_protect_column('people', 'email', 'pii', context => '(SELECT rolname FROM pg_authid LIMIT 1)')", "42P17"),
            ("SELECT kms_protect_column('people', 'email', 'pii', context => 'id::text) FROM pg_authid --')", "42P17"),
            ("SELECT kms_protect_column('people', 'email', 'pii', context => 'id::text FROM people WHERE true')", "42P17"),
            ("SELECT kms_protect_column('people', 'email', 'pii', blind_index_bits => 12)", "22023"),
            ("SELECT kms_protect_column('nopk', 'b', 'pii')", "55000"),
        ] {
            assert_sqlstate(sql, code);
        }
        run("SELECT kms_protect_column('people', 'email', 'pii')");
        assert_sqlstate(
            "SELECT kms_protect_column('people', 'email', 'pii')",
            "42710",
        );
        assert_sqlstate("SELECT kms_unprotect_column('people', 'name')", "42704");
        // Nothing was left behind by the refused calls.
        assert_eq!(
            one::<i64>("SELECT count(*) FROM kms_protected_columns"),
            Some(1)
        );
    }

    #[pg_test]
    fn ddl_that_would_strand_values_is_refused() {
        people();
        run("SELECT kms_protect_column('people', 'email', 'pii', context => 'id::text', blind_index_bits => 16)");
        for (sql, code) in [
            ("ALTER TABLE people DROP COLUMN email", "2BP01"),
            ("ALTER TABLE people DROP COLUMN email_bidx", "2BP01"),
            ("ALTER TABLE people RENAME COLUMN email TO mail", "55006"),
            ("ALTER TABLE people RENAME TO persons", "55006"),
            // PostgreSQL itself refuses first (the view uses the column).
            (
                "ALTER TABLE people ALTER COLUMN email TYPE bytea USING email::bytea",
                "0A000",
            ),
            ("DROP TABLE people CASCADE", "2BP01"),
        ] {
            assert_sqlstate(sql, code);
        }
        // The context's id column is needed too (the view depends on it as well).
        assert!(error_of("ALTER TABLE people DROP COLUMN id CASCADE").is_some());
        // A new column shows in the view.
        run("ALTER TABLE people ADD COLUMN phone text");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pg_attribute WHERE attrelid = 'people_decrypted'::regclass AND attname = 'phone'"),
            Some(1)
        );
        run("INSERT INTO people_decrypted (name, email, phone) VALUES ('x', 'x@example.com', '555')");
        assert_eq!(
            one::<String>("SELECT phone FROM people_decrypted").as_deref(),
            Some("555")
        );
        // Unprotecting a context-bound column that holds values is refused.
        assert_sqlstate("SELECT kms_unprotect_column('people', 'email')", "55006");
        run("DELETE FROM people");
        run("SELECT kms_unprotect_column('people', 'email')");
        assert_eq!(
            one::<bool>("SELECT to_regclass('people_decrypted') IS NULL"),
            Some(true)
        );
        run("ALTER TABLE people RENAME COLUMN email TO mail");
    }

    #[pg_test]
    fn plaintext_column_starts_converting_and_can_be_cancelled() {
        setup_key("pii");
        run("CREATE TABLE legacy (id int PRIMARY KEY, email varchar(64), note bytea)");
        run("INSERT INTO legacy SELECT g, 'u' || g || '@example.com', 'n'::bytea FROM generate_series(1, 10) g");
        run("SELECT kms_protect_column('legacy', 'email', 'pii', deterministic => true, blind_index_bits => 32)");
        assert_eq!(
            one::<String>("SELECT state FROM kms_protected_columns WHERE column_name = 'email'")
                .as_deref(),
            Some("converting")
        );
        // Until the backfill, the view shows the plaintext column, typed as it was.
        assert_eq!(
            one::<String>("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'legacy_decrypted'::regclass AND attname = 'email'").as_deref(),
            Some("character varying(64)")
        );
        // Writes keep the shadow column in step (the table's trigger).
        run("INSERT INTO legacy VALUES (11, 'new@example.com', NULL)");
        run("UPDATE legacy SET email = 'changed@example.com' WHERE id = 2");
        run("INSERT INTO legacy_decrypted (id, email) VALUES (12, 'view@example.com')");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM legacy WHERE email_kms_new IS NOT NULL AND kms_decrypt(email_kms_new) = email AND email_bidx = kms_blind_index(email, 'pii', NULL, 32)"),
            Some(3)
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM legacy WHERE email_kms_new = kms_encrypt_deterministic('changed@example.com', 'pii')"),
            Some(1)
        );
        // The trigger cannot be disabled or dropped while converting.
        assert_sqlstate(
            "ALTER TABLE legacy DISABLE TRIGGER zzzz_kms_convert",
            "55006",
        );
        assert_sqlstate("DROP TRIGGER zzzz_kms_convert ON legacy", "2BP01");
        assert_sqlstate("ALTER TABLE legacy DROP COLUMN email_kms_new", "2BP01");
        // bytea: no deterministic or blind index.
        assert_sqlstate(
            "SELECT kms_protect_column('legacy', 'note', 'pii', deterministic => true)",
            "0A000",
        );
        run("SELECT kms_protect_column('legacy', 'note', 'pii')");
        // Cancelling: the plaintext column is untouched, pg_kms's columns go.
        run("SELECT kms_unprotect_column('legacy', 'email')");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM legacy WHERE email LIKE '%@example.com'"),
            Some(12)
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pg_attribute WHERE attrelid = 'legacy'::regclass AND attname IN ('email_kms_new', 'email_bidx') AND NOT attisdropped"),
            Some(0)
        );
        // The other policy keeps the view and the trigger.
        assert_eq!(one::<i64>("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'legacy'::regclass AND tgname = 'zzzz_kms_convert'"), Some(1));
        run("SELECT kms_unprotect_column('legacy', 'note')");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'legacy'::regclass"),
            Some(0)
        );
    }

    #[pg_test]
    fn only_the_owner_protects_and_writers_encrypt_as_themselves() {
        setup_key("pii");
        run("CREATE ROLE prot_admin IN ROLE kms_admin, kms_user");
        run("CREATE ROLE prot_app IN ROLE kms_user");
        run("CREATE TABLE acct (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, secret encrypted_text)");
        run("GRANT SELECT, INSERT, UPDATE, DELETE ON acct TO prot_app");
        assert_eq!(
            as_role(
                "prot_admin",
                "SELECT kms_protect_column('acct', 'secret', 'pii')"
            )
            .as_deref(),
            Some("42501")
        );
        run("SELECT kms_protect_column('acct', 'secret', 'pii')");
        // The table's grants are copied onto the view; the identity's
        // nextval() on the view needs USAGE on its sequence, granted with
        // INSERT.
        assert_eq!(
            as_role(
                "prot_app",
                "INSERT INTO acct_decrypted (secret) VALUES ('s1')"
            ),
            None
        );
        assert_eq!(
            one::<String>("SELECT id || ':' || secret FROM acct_decrypted").as_deref(),
            Some("1:s1")
        );
        assert_eq!(
            as_role("prot_app", "SELECT secret FROM acct_decrypted"),
            None
        );
        // Per-key grants apply to the writer.
        run("SELECT kms_grant_key('pii', 'prot_admin', 'encrypt')");
        assert_eq!(
            as_role(
                "prot_app",
                "INSERT INTO acct_decrypted (secret) VALUES ('s2')"
            )
            .as_deref(),
            Some("42501")
        );
        // ... and to the owner who protects: a key it may not use is refused.
        setup_key("other");
        run("SELECT kms_grant_key('other', 'prot_app', 'encrypt')");
        run("CREATE TABLE acct2 (id int PRIMARY KEY, secret encrypted_text)");
        run("ALTER TABLE acct2 OWNER TO prot_admin");
        // (PostgreSQL 15+: CREATE on schema public is not for everyone.)
        run("GRANT CREATE ON SCHEMA public TO prot_admin");
        assert_eq!(
            as_role(
                "prot_admin",
                "SELECT kms_protect_column('acct2', 'secret', 'other')"
            )
            .as_deref(),
            Some("42501")
        );
        assert_eq!(
            as_role(
                "prot_admin",
                "SELECT kms_protect_column('acct2', 'secret', 'pii')"
            ),
            None
        );
        // The objects pg_kms made belong to the table's owner.
        assert_eq!(
            one::<String>(
                "SELECT relowner::regrole::text FROM pg_class WHERE relname = 'acct2_decrypted'"
            )
            .as_deref(),
            Some("prot_admin")
        );
    }
}
