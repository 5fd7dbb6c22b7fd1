//! The secrets store in SQL: `kms_secret_set/get/delete`.

use crate::pg::datum::{OutText, RawText};
use pgrx::datum::Interval;
use pgrx::prelude::*;

#[pg_extern(volatile, parallel_unsafe)]
fn kms_secret_set(
    name: Option<RawText>,
    value: Option<RawText>,
    key_name: default!(Option<RawText>, "NULL"),
    ttl: default!(Option<Interval>, "NULL"),
    tags: default!(Option<pgrx::JsonB>, "'{}'"),
) -> i32 {
    crate::secrets::secret_set(name, value, key_name, ttl, tags)
}

/// Reads a secret. Permission comes first: for a caller who is neither a
/// kms_admin member nor granted 'decrypt' on the secret's key, an unknown
/// secret (or version), an expired one and a forbidden one give the same
/// error, so nothing about a secret is revealed to who may not read it.
#[pg_extern(stable, parallel_unsafe)]
fn kms_secret_get(
    name: Option<RawText>,
    version: default!(Option<i32>, "NULL"),
) -> Option<OutText> {
    crate::secrets::secret_get(name, version)
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_secret_delete(name: Option<RawText>) -> i64 {
    crate::secrets::secret_delete(name)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::api::test_support::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn secrets_store() {
        assert_eq!(
            one::<i32>("SELECT kms_secret_set('db/password', 's3cret!')"),
            Some(1)
        );
        assert_eq!(
            one::<i32>(
                "SELECT kms_secret_set('db/password', 'n3w', tags => '{\"env\": \"prod\"}')"
            ),
            Some(2)
        );
        assert_eq!(
            one::<String>("SELECT kms_secret_get('db/password')").as_deref(),
            Some("n3w")
        );
        assert_eq!(
            one::<String>("SELECT kms_secret_get('db/password', 1)").as_deref(),
            Some("s3cret!")
        );
        assert_eq!(one::<String>("SELECT string_agg(version || ':' || key_name || ':' || (tags->>'env') , ',') FROM kms_secrets WHERE version = 2").as_deref(), Some("2:kms.secrets:prod"));
        // The view never shows the value.
        assert_eq!(one::<i64>("SELECT count(*) FROM kms_secrets s WHERE s::text LIKE '%s3cret%' OR s::text LIKE '%n3w%'"), Some(0));
        assert_sqlstate("SELECT kms_secret_get('nope')", "42704");
        assert_sqlstate("SELECT kms_secret_get('db/password', 9)", "42704");
        assert_sqlstate("SELECT kms_secret_set('bad name', 'x')", "22023");
        assert_sqlstate("SELECT kms_secret_set('x', NULL)", "22023");
        // Expiry.
        run("SELECT kms_secret_set('token', 'abc', ttl => interval '1 hour')");
        run("UPDATE kms.secrets SET expires_at = now() - interval '1 second' WHERE name = 'token'");
        assert_sqlstate("SELECT kms_secret_get('token')", "55000");
        // Who may read: kms_admin, or roles granted decrypt on the key.
        setup_key("app-secrets");
        run("SELECT kms_secret_set('api', 'apitokvalue9', key_name => 'app-secrets')");
        run("CREATE ROLE kt_app IN ROLE kms_user");
        run("CREATE ROLE kt_admin3 IN ROLE kms_admin");
        assert_eq!(
            as_role("kt_app", "SELECT kms_secret_get('api')").as_deref(),
            Some("42501")
        );
        assert_eq!(as_role("kt_admin3", "SELECT kms_secret_get('api')"), None);
        run("SELECT kms_grant_key('app-secrets', 'kt_app', 'decrypt')");
        assert_eq!(as_role("kt_app", "SELECT kms_secret_get('api')"), None);
        assert_eq!(
            as_role("kt_app", "SELECT kms_secret_get('db/password')").as_deref(),
            Some("42501")
        );
        assert_eq!(
            as_role("kt_app", "SELECT kms_secret_set('api', 'x')").as_deref(),
            Some("42501")
        );
        // Delete, audited, without the value.
        assert_eq!(
            one::<i64>("SELECT kms_secret_delete('db/password')"),
            Some(2)
        );
        assert_sqlstate("SELECT kms_secret_get('db/password')", "42704");
        assert_eq!(one::<i64>("SELECT count(*) FROM kms_audit_log WHERE operation LIKE 'secret%' AND reason ~ '(s3cret|n3w|apitokvalue9)'"), Some(0));
        // Stored as encrypted_text: the worker's discovery sees the column.
        assert_eq!(
            one::<i64>("SELECT count(*) FROM kms_key_usage('kms.secrets')"),
            Some(1)
        );
    }

    #[pg_test]
    fn secret_get_hides_existence_from_the_unprivileged() {
        setup_key("sk");
        run("SELECT kms_secret_set('present', 'v1', key_name => 'sk')");
        run("SELECT kms_secret_set('expired', 'v2', key_name => 'sk', ttl => interval '1 hour')");
        run("UPDATE kms.secrets SET expires_at = now() - interval '1 second' WHERE name = 'expired'");
        run("CREATE ROLE kt_snoop IN ROLE kms_user");
        let expect = |name: &str| {
            format!(
                "42501|permission denied for role kt_snoop to read secret \"{name}\", or it does not exist|Secrets can be read by members of kms_admin and by roles granted 'decrypt' on the secret's key with kms_grant_key(); an unknown secret gives this same error."
            )
        };
        for (name, sql) in [
            ("present", "SELECT kms_secret_get('present')"),
            ("expired", "SELECT kms_secret_get('expired')"),
            ("absent", "SELECT kms_secret_get('absent')"),
            ("present", "SELECT kms_secret_get('present', 7)"),
        ] {
            assert_eq!(full_error_as("kt_snoop", sql), Some(expect(name)), "{sql}");
        }
        // A grant on another key does not help.
        setup_key("sk2");
        run("SELECT kms_grant_key('sk2', 'kt_snoop', 'decrypt')");
        assert_eq!(
            full_error_as("kt_snoop", "SELECT kms_secret_get('present')"),
            Some(expect("present"))
        );
        // With 'decrypt' on the secret's key: the real answers.
        run("SELECT kms_grant_key('sk', 'kt_snoop', 'decrypt')");
        assert_eq!(
            full_error_as("kt_snoop", "SELECT kms_secret_get('present')"),
            None
        );
        assert!(
            full_error_as("kt_snoop", "SELECT kms_secret_get('expired')")
                .unwrap()
                .starts_with("55000|")
        );
        // Unknown secrets stay hidden even then (only kms_admin sees 42704).
        assert_eq!(
            full_error_as("kt_snoop", "SELECT kms_secret_get('absent')"),
            Some(expect("absent"))
        );
        assert_sqlstate("SELECT kms_secret_get('absent')", "42704");
    }
}
