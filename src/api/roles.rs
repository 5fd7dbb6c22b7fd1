//! The privilege surface of the SQL API: which role may call what.
//! (No `#[pg_extern]` here; the grants themselves are in `sql/grants.sql`.)

use pgrx::prelude::*;

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::api::test_support::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn role_privileges() {
        setup_key("pii");
        run("CREATE TEMP TABLE t AS SELECT kms_encrypt('v', 'pii') AS v");
        run("GRANT SELECT, UPDATE ON t TO PUBLIC");
        run("CREATE ROLE kt_user IN ROLE kms_user");
        run("CREATE ROLE kt_admin IN ROLE kms_admin");
        run("CREATE ROLE kt_auditor IN ROLE kms_auditor");
        run("CREATE ROLE kt_plain");
        let user_ok = [
            "SELECT kms_encrypt('a', 'pii')",
            "SELECT kms_decrypt(v) FROM t",
            "SELECT kms_encrypt_bytea('\\x00', 'pii')",
            "SELECT kms_decrypt_bytea(v) FROM t",
            "SELECT kms_rewrap(v) FROM t",
            "SELECT kms_key_name(v) FROM t",
            "SELECT kms_key_version(v) FROM t",
            "SELECT kms_encrypt_deterministic('a', 'pii')",
            "SELECT kms_blind_index('a', 'pii')",
        ];
        let admin_ok = [
            "SELECT kms_create_key('k_' || md5(random()::text))",
            "SELECT kms_rotate_key('pii')",
            "SELECT kms_set_primary('pii', 1)",
            "SELECT kms_disable_key_version('pii', 1)",
            "SELECT kms_enable_key_version('pii', 1)",
            "SELECT kms_destroy_key_version('nope', 1)", // 42704, not 42501
            "SELECT kms_destroy_key('nope')",            // 42704, not 42501
            "SELECT kms_grant_key('pii', 'kt_user', 'decrypt')",
            "SELECT kms_revoke_key('pii', 'kt_user', 'decrypt')",
            "SELECT * FROM kms_key_usage('pii')",
            "SELECT kms_reencrypt_now('t', 'v')",
            "SELECT kms_secret_set('s1', 'v')",
            "SELECT kms_secret_delete('nope')", // 42704, not 42501
            "SELECT kms_rotate_master_key()",   // 55000 (no previous key), not 42501
        ];
        let read_ok = [
            "SELECT * FROM kms_keys",
            "SELECT * FROM kms_audit_log",
            "SELECT * FROM kms_reencryption_progress",
            "SELECT * FROM kms_stats",
            "SELECT * FROM kms_secrets",
            "SELECT * FROM kms_key_grants",
            "SELECT kms_health()",
            "SELECT kms_verify_audit_log()",
        ];
        let catalog = [
            "SELECT * FROM kms.keys",
            "SELECT * FROM kms.key_versions",
            "SELECT * FROM kms.keyring",
            "SELECT * FROM kms.audit_log",
            "SELECT * FROM kms.key_grants",
            "SELECT * FROM kms.secrets",
            "SELECT kms.audit_verify()",
        ];
        let allowed = |role: &str, sql: &str| {
            run(&format!("SET LOCAL ROLE {role}"));
            let e = error_of(sql);
            run("RESET ROLE");
            !matches!(e, Some(ref s) if s.starts_with("42501"))
        };
        for sql in user_ok {
            assert!(allowed("kt_user", sql), "kms_user: {sql}");
            for r in ["kt_admin", "kt_auditor", "kt_plain"] {
                assert!(!allowed(r, sql), "{r} must not: {sql}");
            }
        }
        for sql in admin_ok {
            assert!(allowed("kt_admin", sql), "kms_admin: {sql}");
            for r in ["kt_user", "kt_auditor", "kt_plain"] {
                assert!(!allowed(r, sql), "{r} must not: {sql}");
            }
        }
        for sql in read_ok {
            assert!(allowed("kt_admin", sql), "kms_admin: {sql}");
            assert!(allowed("kt_auditor", sql), "kms_auditor: {sql}");
            for r in ["kt_user", "kt_plain"] {
                assert!(!allowed(r, sql), "{r} must not: {sql}");
            }
        }
        // kms_secret_get: EXECUTE for kms_user and kms_admin (checked inside),
        // not for auditors or plain roles.
        run("SELECT kms_secret_set('s0', 'v')");
        assert!(allowed("kt_admin", "SELECT kms_secret_get('s0')"));
        for r in ["kt_auditor", "kt_plain", "kt_user"] {
            assert!(
                !allowed(r, "SELECT kms_secret_get('s0')"),
                "{r} must not read secret s0"
            );
        }
        for sql in catalog {
            for r in ["kt_user", "kt_admin", "kt_auditor", "kt_plain"] {
                assert!(!allowed(r, sql), "{r} must not read the catalog: {sql}");
            }
        }
        // The identity switch on a cache miss does not leak out.
        run("SELECT kms_rotate_key('pii')");
        run("SET LOCAL ROLE kt_user");
        run("SELECT kms_encrypt('a', 'pii')");
        assert_eq!(
            one::<String>("SELECT current_user::text").as_deref(),
            Some("kt_user")
        );
        assert_eq!(
            one::<String>("SELECT current_setting('search_path')").as_deref(),
            Some("\"$user\", public")
        );
        run("RESET ROLE");
    }
}
