//! The secrets store in SQL: `kms_secret_set/get/delete/purge_expired`.

use crate::pg::datum::{OutText, RawText};
use pgrx::datum::Interval;
use pgrx::prelude::*;

#[pg_extern(volatile, parallel_unsafe)]
fn kms_secret_set(
    name: Option<RawText>,
    value: Option<RawText>,
    key_name: default!(Option<RawText>, "NULL"),
    ttl: default!(Option<Interval>, "NULL"),
    tags: default!(Option<pgrx::JsonB>, "NULL"),
) -> i32 {
    crate::secrets::secret_set(name, value, key_name, ttl, tags)
}

/// Reads a secret. Permission comes first: for a caller who is neither a
/// kms_admin member nor granted 'decrypt' on the secret's key, an unknown
/// secret (or version), an expired one and a forbidden one give the same
/// error, so nothing about a secret is revealed to who may not read it.
/// Without `version`, the newest version; an older one only when asked for
/// by number. Every read appends a `secret_read` row to the audit log.
#[pg_extern(volatile, parallel_unsafe)]
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

/// Deletes every expired version of every secret (kms_admin), audited;
/// returns how many.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_secret_purge_expired() -> i64 {
    crate::secrets::secret_purge_expired()
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

    #[pg_test]
    fn secret_versions_keep_ttl_and_tags() {
        run("SELECT kms_secret_set('cfg', 'a', ttl => interval '1 hour', tags => '{\"env\": \"prod\"}')");
        // Not given: the previous version's ttl and tags.
        run("SELECT kms_secret_set('cfg', 'b')");
        assert_eq!(
            one::<String>("SELECT (expires_at - created_at)::text || ' ' || (tags->>'env') FROM kms.secrets WHERE name = 'cfg' AND version = 2").as_deref(),
            Some("01:00:00 prod")
        );
        // Given: replaced; interval '0' means no expiry, '{}' no tags.
        run("SELECT kms_secret_set('cfg', 'c', ttl => interval '0', tags => '{}')");
        assert_eq!(
            one::<String>("SELECT coalesce(expires_at::text, 'never') || ' ' || tags::text FROM kms.secrets WHERE name = 'cfg' AND version = 3").as_deref(),
            Some("never {}")
        );
        run("SELECT kms_secret_set('cfg', 'd', ttl => interval '2 days')");
        assert_eq!(
            one::<String>("SELECT (expires_at - created_at)::text || ' ' || tags::text FROM kms.secrets WHERE name = 'cfg' AND version = 4").as_deref(),
            Some("2 days {}")
        );
        // A new secret starts with neither.
        run("SELECT kms_secret_set('fresh', 'x')");
        assert_eq!(
            one::<String>("SELECT coalesce(expires_at::text, 'never') || ' ' || tags::text FROM kms.secrets WHERE name = 'fresh'").as_deref(),
            Some("never {}")
        );
        assert_sqlstate(
            "SELECT kms_secret_set('cfg', 'e', ttl => interval '-1 second')",
            "22023",
        );
        assert_eq!(
            one::<String>("SELECT kms_secret_get('cfg')").as_deref(),
            Some("d")
        );
    }

    #[pg_test]
    fn secret_reads_are_audited() {
        setup_key("rk");
        run("SELECT kms_secret_set('api', 'v1value', key_name => 'rk')");
        run("SELECT kms_rotate_key('rk')");
        run("SELECT kms_secret_set('api', 'v2value', key_name => 'rk')");
        let reads = || {
            one::<String>("SELECT string_agg(key_name || ':' || version || ':' || reason || ':' || (detail::jsonb->>'explicit_version') || ':' || actor || ':' || role, ',' ORDER BY id) FROM kms_audit_log WHERE operation = 'secret_read'")
        };
        assert_eq!(reads(), None);
        // The newest version by default ...
        assert_eq!(
            one::<String>("SELECT kms_secret_get('api')").as_deref(),
            Some("v2value")
        );
        // ... an older one only by number, audited as such.
        assert_eq!(
            one::<String>("SELECT kms_secret_get('api', 1)").as_deref(),
            Some("v1value")
        );
        assert_eq!(
            one::<String>("SELECT kms_secret_get('api', 2)").as_deref(),
            Some("v2value")
        );
        let me = one::<String>("SELECT session_user::text").unwrap();
        assert_eq!(
            reads().as_deref(),
            Some(
                format!(
                    "rk:2:secret api version 2:false:{me}:{me},\
                     rk:1:secret api version 1 (asked for by number; the newest is 2):true:{me}:{me},\
                     rk:2:secret api version 2 (asked for by number):true:{me}:{me}"
                )
                .as_str()
            )
        );
        // A role granted decrypt: actor is the session user, role the role.
        run("CREATE ROLE kt_reader IN ROLE kms_user");
        run("SELECT kms_grant_key('rk', 'kt_reader', 'decrypt')");
        assert_eq!(as_role("kt_reader", "SELECT kms_secret_get('api')"), None);
        assert_eq!(
            one::<String>("SELECT actor || ':' || role FROM kms_audit_log WHERE operation = 'secret_read' ORDER BY id DESC LIMIT 1"),
            Some(format!("{me}:kt_reader"))
        );
        // Refused reads leave no row (and no value anywhere in the log).
        run("CREATE ROLE kt_nosy IN ROLE kms_user");
        let before = one::<i64>("SELECT count(*) FROM kms.audit_log");
        assert_eq!(
            as_role("kt_nosy", "SELECT kms_secret_get('api')").as_deref(),
            Some("42501")
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM kms.audit_log"), before);
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM kms_audit_log WHERE reason ~ 'value' OR detail ~ 'value'"
            ),
            Some(0)
        );
        assert_eq!(
            one::<bool>("SELECT ok FROM kms_audit_log_check()"),
            Some(true)
        );
        // Unauditable: refused in a read-only transaction (last: it stays read-only).
        run("SET transaction_read_only = on");
        assert_sqlstate("SELECT kms_secret_get('api')", "25006");
    }

    #[pg_test]
    fn expired_secret_versions_are_purged() {
        run("SELECT kms_secret_set('t1', 'a', ttl => interval '1 hour')");
        run("SELECT kms_secret_set('t1', 'b')");
        run("SELECT kms_secret_set('t2', 'c', ttl => interval '1 hour')");
        run("SELECT kms_secret_set('keep', 'd')");
        run("UPDATE kms.secrets SET expires_at = now() - interval '1 second' WHERE (name, version) IN (('t1', 1), ('t2', 1))");
        assert_eq!(one::<i64>("SELECT kms_secret_purge_expired()"), Some(2));
        assert_eq!(
            one::<String>("SELECT string_agg(name || ':' || version, ',' ORDER BY name, version) FROM kms_secrets").as_deref(),
            Some("keep:1,t1:2")
        );
        assert_eq!(
            one::<String>("SELECT reason || ' ' || detail FROM kms_audit_log WHERE operation = 'secret_purge_expired'").as_deref(),
            Some(r#"2 expired secret versions [{"secret":"t1","version":1},{"secret":"t2","version":1}]"#)
        );
        // Nothing left to purge: 0, still audited.
        assert_eq!(one::<i64>("SELECT kms_secret_purge_expired()"), Some(0));
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM kms_audit_log WHERE operation = 'secret_purge_expired'"
            ),
            Some(2)
        );
        run("CREATE ROLE kt_user9 IN ROLE kms_user");
        assert_eq!(
            as_role("kt_user9", "SELECT kms_secret_purge_expired()").as_deref(),
            Some("42501")
        );
    }
}
