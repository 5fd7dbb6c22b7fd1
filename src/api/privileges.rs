//! Who may use each object of pg_kms: every function, view and table of the
//! extension is reachable by exactly the roles declared here (the same
//! intent as sql/grants.sql, written down a second time on purpose), and by
//! PUBLIC only where that is by design. A new function or view fails this
//! test until it is declared in both places.
//!
//! Also the behaviour of each role at the SQL level (`role_privileges`).
//! (No `#[pg_extern]` here; the grants themselves are in `sql/grants.sql`.)

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use crate::api::test_support::*;
    use pgrx::prelude::*;

    const PUBLIC: &str = "PUBLIC";
    const USER: &str = "kms_user";
    const ADMIN: &str = "kms_admin";
    const USER_ADMIN: &str = "kms_user kms_admin";
    const ADMIN_AUDITOR: &str = "kms_admin kms_auditor";
    /// Superuser only.
    const NOBODY: &str = "";

    /// (kind, name, who): `who` lists the pg_kms roles that may execute the
    /// function or SELECT from the view or table, or is PUBLIC. Names are
    /// unqualified in the extension's schema; overloads share an entry.
    const INTENT: &[(&str, &str, &str)] = &[
        ("function", "kms_encrypt", USER),
        ("function", "kms_decrypt", USER),
        ("function", "kms_encrypt_bytea", USER),
        ("function", "kms_decrypt_bytea", USER),
        ("function", "kms_rewrap", USER),
        ("function", "kms_key_name", USER),
        ("function", "kms_key_version", USER),
        ("function", "kms_encrypt_deterministic", USER),
        ("function", "kms_blind_index", USER),
        ("function", "kms_deterministic_candidates", USER),
        ("function", "kms_secret_get", USER_ADMIN),
        ("function", "kms_create_key", ADMIN),
        ("function", "kms_rotate_key", ADMIN),
        ("function", "kms_set_primary", ADMIN),
        ("function", "kms_disable_key_version", ADMIN),
        ("function", "kms_enable_key_version", ADMIN),
        ("function", "kms_destroy_key_version", ADMIN),
        ("function", "kms_destroy_key", ADMIN),
        ("function", "kms_rotate_master_key", ADMIN),
        ("function", "kms_grant_key", ADMIN),
        ("function", "kms_revoke_key", ADMIN),
        ("function", "kms_rebind_key_grants", ADMIN),
        ("function", "kms_key_usage", ADMIN),
        ("function", "kms_reencrypt_now", ADMIN),
        ("function", "kms_secret_set", ADMIN),
        ("function", "kms_secret_delete", ADMIN),
        ("function", "kms_secret_purge_expired", ADMIN),
        ("function", "kms_keyring_export", ADMIN),
        ("function", "kms_keyring_import", ADMIN),
        ("function", "kms_protect_column", ADMIN),
        ("function", "kms_unprotect_column", ADMIN),
        ("function", "kms_alter_key", ADMIN),
        ("function", "kms_health", ADMIN_AUDITOR),
        ("function", "kms_verify_audit_log", ADMIN_AUDITOR),
        ("function", "kms_audit_log_check", ADMIN_AUDITOR),
        ("function", "kms_stats_counters", ADMIN_AUDITOR),
        ("function", "kms_warnings_list", ADMIN_AUDITOR),
        ("function", "encrypted_text_in", PUBLIC),
        ("function", "encrypted_text_out", PUBLIC),
        ("function", "encrypted_text_recv", PUBLIC),
        ("function", "encrypted_text_send", PUBLIC),
        ("function", "encrypted_text_from_bytea", PUBLIC),
        ("function", "encrypted_text_eq", PUBLIC),
        ("function", "encrypted_text_ne", PUBLIC),
        ("function", "encrypted_text_lt", PUBLIC),
        ("function", "encrypted_text_le", PUBLIC),
        ("function", "encrypted_text_gt", PUBLIC),
        ("function", "encrypted_text_ge", PUBLIC),
        ("function", "encrypted_text_cmp", PUBLIC),
        ("function", "encrypted_text_hash", PUBLIC),
        ("function", "kms.audit_row_hash", NOBODY),
        ("function", "kms.audit_verify", NOBODY),
        ("function", "kms.audit_log_reject", NOBODY),
        ("function", "kms.protect_ddl_guard", NOBODY),
        ("view", "kms_keys", ADMIN_AUDITOR),
        ("view", "kms_audit_log", ADMIN_AUDITOR),
        ("view", "kms_destruction_receipts", ADMIN_AUDITOR),
        ("view", "kms_reencryption_progress", ADMIN_AUDITOR),
        ("view", "kms_stats", ADMIN_AUDITOR),
        ("view", "kms_secrets", ADMIN_AUDITOR),
        ("view", "kms_key_grants", ADMIN_AUDITOR),
        ("view", "kms_protected_columns", ADMIN_AUDITOR),
        ("view", "kms_warnings", ADMIN_AUDITOR),
        ("function", "kms_access_log_check", ADMIN_AUDITOR),
        ("view", "kms_access_log", ADMIN_AUDITOR),
        ("function", "kms.access_log_reject", NOBODY),
        ("table", "kms.keyring", NOBODY),
        ("table", "kms.keys", NOBODY),
        ("table", "kms.key_grants", NOBODY),
        ("table", "kms.key_versions", NOBODY),
        ("table", "kms.audit_log", NOBODY),
        ("table", "kms.audit_head", NOBODY),
        ("table", "kms.reencryption_progress", NOBODY),
        ("table", "kms.secrets", NOBODY),
        ("table", "kms.protected_columns", NOBODY),
        ("table", "kms.access_log", NOBODY),
        ("table", "kms.access_head", NOBODY),
    ];

    /// One row per function or relation of the extension (not the
    /// #[pg_test] functions of schema tests): its kind, name, signature, who
    /// may execute or SELECT it (PUBLIC, or the pg_kms roles that may), and
    /// whether any role may do more than SELECT on a relation.
    const ACTUAL: &str = r#"
        WITH ext AS (SELECT e.oid, e.extnamespace FROM pg_extension e WHERE e.extname = 'pg_kms'),
        member AS (
            SELECT d.classid, d.objid FROM ext JOIN pg_depend d ON d.refobjid = ext.oid
             WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
        ),
        obj AS (
            SELECT 'function' AS kind, p.oid,
                   CASE WHEN p.pronamespace = ext.extnamespace THEN p.proname::text
                        ELSE n.nspname || '.' || p.proname END AS name,
                   p.oid::regprocedure::text AS object
              FROM ext, member m JOIN pg_proc p ON p.oid = m.objid
              JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE m.classid = 'pg_proc'::regclass AND n.nspname <> 'tests'
            UNION ALL
            SELECT CASE WHEN c.relkind IN ('v', 'm') THEN 'view'
                        WHEN c.relkind IN ('r', 'p') THEN 'table' ELSE 'relkind ' || c.relkind::text END,
                   c.oid,
                   CASE WHEN c.relnamespace = ext.extnamespace THEN c.relname::text
                        ELSE n.nspname || '.' || c.relname END,
                   c.oid::regclass::text
              FROM ext, member m JOIN pg_class c ON c.oid = m.objid
              JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE m.classid = 'pg_class'::regclass
        ),
        allowed AS (
            SELECT o.*, r.role, r.n,
                   CASE WHEN o.kind = 'function' THEN has_function_privilege(r.role, o.oid, 'EXECUTE')
                        ELSE has_table_privilege(r.role, o.oid, 'SELECT') END AS can,
                   o.kind <> 'function'
                       AND has_table_privilege(r.role, o.oid, 'INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')
                       AS writes
              FROM obj o
             CROSS JOIN unnest(ARRAY['public', 'kms_user', 'kms_admin', 'kms_auditor']) WITH ORDINALITY r(role, n)
        )
        SELECT kind, name, object,
               CASE WHEN bool_or(can) FILTER (WHERE role = 'public') THEN 'PUBLIC'
                    ELSE coalesce(string_agg(role, ' ' ORDER BY n) FILTER (WHERE can), '') END AS who,
               bool_or(writes) AS writes
          FROM allowed
         GROUP BY kind, name, object
         ORDER BY kind, name, object
    "#;

    #[pg_test]
    fn grants_match_the_declared_intent() {
        let actual: Vec<(String, String, String, String, bool)> = Spi::connect(|c| {
            let mut v = Vec::new();
            for r in c.select(ACTUAL, None, &[])? {
                v.push((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?.unwrap_or_default(),
                    r.get::<String>(3)?.unwrap_or_default(),
                    r.get::<String>(4)?.unwrap_or_default(),
                    r.get::<bool>(5)?.unwrap_or(true),
                ));
            }
            Ok::<_, pgrx::spi::Error>(v)
        })
        .expect("list the extension's objects");
        assert!(
            actual.iter().any(|a| a.1 == "kms_encrypt"),
            "the object list is empty or wrong"
        );

        let mut wrong = Vec::new();
        for (kind, name, object, who, writes) in &actual {
            match INTENT
                .iter()
                .find(|i| i.0 == kind.as_str() && i.1 == name.as_str())
            {
                None if who.is_empty() => wrong.push(format!(
                    "{kind} {object} is reachable by no role and is not declared"
                )),
                None if who == PUBLIC => wrong.push(format!(
                    "{kind} {object} is reachable by PUBLIC and is not declared"
                )),
                None => wrong.push(format!(
                    "{kind} {object} (reachable by {who}) is not declared"
                )),
                Some(&(_, _, want)) if want != who => wrong.push(format!(
                    "{kind} {object} is reachable by [{who}], declared for [{want}]"
                )),
                Some(_) => {}
            }
            if *writes {
                wrong.push(format!("{kind} {object}: a role may write to it"));
            }
        }
        for (kind, name, _) in INTENT {
            if !actual.iter().any(|a| a.0 == *kind && a.1 == *name) {
                wrong.push(format!(
                    "{kind} {name} is declared but is not part of pg_kms"
                ));
            }
        }
        assert!(wrong.is_empty(), "privileges:\n  {}", wrong.join("\n  "));
    }

    #[pg_test]
    fn grants_close_the_catalog_schema_and_open_the_type() {
        for role in ["public", "kms_user", "kms_admin", "kms_auditor"] {
            let usage = Spi::get_one::<bool>(&format!(
                "SELECT has_schema_privilege('{role}', 'kms', 'USAGE, CREATE')"
            ))
            .unwrap();
            assert_eq!(usage, Some(false), "{role} must not use schema kms");
            let typ = Spi::get_one::<bool>(&format!(
                "SELECT has_type_privilege('{role}', 'encrypted_text', 'USAGE')"
            ))
            .unwrap();
            assert_eq!(typ, Some(true), "{role} must be able to use encrypted_text");
        }
    }

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
            "SELECT kms_secret_purge_expired()",
            "SELECT kms_rotate_master_key()", // 55000 (no previous key), not 42501
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
