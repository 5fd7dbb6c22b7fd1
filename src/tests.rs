//! `#[pg_test]`s: every SQL function and every documented error, inside a
//! real backend. Each test runs in a transaction that is rolled back.

use pgrx::prelude::*;
use std::sync::OnceLock;

/// The test cluster gets a master key generated now (never stored in the
/// repository), supplied through `pg_kms.master_key_command`.
#[allow(dead_code)] // used by the pg_test harness only under cfg(test)
pub fn postgresql_conf_options() -> Vec<&'static str> {
    static CONF: OnceLock<Vec<&'static str>> = OnceLock::new();
    CONF.get_or_init(|| {
        let line = format!("pg_kms.master_key_command = 'echo {}'", random_hex());
        vec![Box::leak(line.into_boxed_str())]
    })
    .clone()
}

pub fn random_hex() -> String {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).expect("random");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[pg_schema]
mod tests {
    use super::random_hex;
    use pgrx::prelude::*;

    fn run(sql: &str) {
        Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn one<T: FromDatum + IntoDatum>(sql: &str) -> Option<T> {
        Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// "SQLSTATE message" of the error `sql` raises, or None.
    fn error_of(sql: &str) -> Option<String> {
        if one::<bool>("SELECT to_regprocedure('pg_temp.error_of(text)') IS NOT NULL") != Some(true)
        {
            run(
                r#"CREATE FUNCTION pg_temp.error_of(q text) RETURNS text LANGUAGE plpgsql AS $$
               BEGIN EXECUTE q; RETURN NULL;
               EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE || ' ' || SQLERRM; END $$"#,
            );
            run("GRANT EXECUTE ON FUNCTION pg_temp.error_of(text) TO PUBLIC");
        }
        Spi::get_one_with_args::<String>("SELECT pg_temp.error_of($1)", &[sql.into()]).unwrap()
    }

    #[track_caller]
    fn assert_sqlstate(sql: &str, code: &str) {
        match error_of(sql) {
            Some(e) => assert!(e.starts_with(code), "{sql}: expected {code}, got {e}"),
            None => panic!("{sql}: expected {code}, got success"),
        }
    }

    /// The SQLSTATE `sql` raises when run as `role` (None: it succeeded).
    fn as_role(role: &str, sql: &str) -> Option<String> {
        run(&format!("SET LOCAL ROLE {role}"));
        let e = error_of(sql);
        run("RESET ROLE");
        e.map(|e| e[..5].to_string())
    }

    fn setup_key(name: &str) {
        assert_eq!(
            one::<i32>(&format!("SELECT kms_create_key('{name}')")),
            Some(1)
        );
    }

    #[pg_test]
    fn encrypt_decrypt_round_trips() {
        setup_key("pii");
        for s in ["alice@example.com", "", "Ünïcödé ✓ 𝄞 🙂", "tab\tnew\nline"] {
            let got = Spi::get_one_with_args::<String>(
                "SELECT kms_decrypt(kms_encrypt($1, 'pii'))",
                &[s.into()],
            )
            .unwrap();
            assert_eq!(got.as_deref(), Some(s));
        }
        assert_eq!(
            one::<bool>("SELECT kms_encrypt(NULL, 'pii') IS NULL"),
            Some(true)
        );
        assert_eq!(one::<bool>("SELECT kms_decrypt(NULL) IS NULL"), Some(true));
        assert_eq!(
            one::<bool>("SELECT kms_encrypt('a', 'pii')::text <> kms_encrypt('a', 'pii')::text"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT kms_encrypt('a', 'pii')::text LIKE 'kms:%'"),
            Some(true)
        );
        let big = one::<bool>(
            "SELECT kms_decrypt(kms_encrypt(repeat('xyz', 400000), 'pii')) = repeat('xyz', 400000)",
        );
        assert_eq!(big, Some(true));
    }

    #[pg_test]
    fn bytea_round_trip() {
        setup_key("pii");
        assert_eq!(
            one::<bool>("SELECT kms_decrypt_bytea(kms_encrypt_bytea('\\x00ff00'::bytea, 'pii')) = '\\x00ff00'::bytea"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT kms_encrypt_bytea(NULL, 'pii') IS NULL"),
            Some(true)
        );
        // bytea sealed with context needs it back.
        assert_eq!(
            one::<bool>(
                "SELECT kms_decrypt_bytea(kms_encrypt_bytea('\\x01', 'pii', 'c'), 'c') = '\\x01'"
            ),
            Some(true)
        );
        // Text sealed as text can be read back as its UTF-8 bytes.
        assert_eq!(
            one::<bool>(
                "SELECT kms_decrypt_bytea(kms_encrypt('hé', 'pii')) = convert_to('hé', 'UTF8')"
            ),
            Some(true)
        );
        // Invalid UTF-8 sealed as bytea cannot come back as text.
        assert_sqlstate(
            "SELECT kms_decrypt(kms_encrypt_bytea('\\xff'::bytea, 'pii'))",
            "22021",
        );
        assert_eq!(
            one::<String>("SELECT kms_decrypt(kms_encrypt_bytea(convert_to('ok', 'UTF8'), 'pii'))")
                .as_deref(),
            Some("ok")
        );
    }

    #[pg_test]
    fn context_is_bound() {
        setup_key("pii");
        assert_eq!(
            one::<String>("SELECT kms_decrypt(kms_encrypt('v', 'pii', 'user:1'), 'user:1')")
                .as_deref(),
            Some("v")
        );
        assert_sqlstate(
            "SELECT kms_decrypt(kms_encrypt('v', 'pii', 'user:1'), 'user:2')",
            "39000",
        );
        assert_sqlstate(
            "SELECT kms_decrypt(kms_encrypt('v', 'pii', 'user:1'))",
            "39000",
        );
        assert_sqlstate(
            "SELECT kms_decrypt(kms_encrypt('v', 'pii'), 'user:1')",
            "39000",
        );
        // NULL context and empty context are the same.
        assert_eq!(
            one::<String>("SELECT kms_decrypt(kms_encrypt('v', 'pii', NULL), '')").as_deref(),
            Some("v")
        );
    }

    #[pg_test]
    fn overhead_is_at_most_40_bytes() {
        setup_key("k");
        let o = one::<i32>("SELECT pg_column_size(kms_encrypt(repeat('x',100),'k')) - pg_column_size(repeat('x',100))").unwrap();
        assert!(o <= 40, "overhead {o}");
        assert_eq!(
            one::<i32>("SELECT length(kms_encrypt('abc','k')::bytea)"),
            Some(3 + 38)
        );
    }

    #[pg_test]
    fn tampering_fails_with_39000() {
        setup_key("pii");
        run("CREATE TEMP TABLE t AS SELECT kms_encrypt('secret', 'pii')::bytea AS b");
        let n = one::<i32>("SELECT length(b) FROM t").unwrap();
        // Flip one bit in each byte after the header (nonce, ciphertext, tag).
        for i in 10..n {
            let sql = format!(
                "SELECT kms_decrypt(('kms:' || encode(set_byte(b, {i}, get_byte(b, {i}) # 1), 'base64'))::encrypted_text) FROM t"
            );
            assert_sqlstate(&sql, "39000");
        }
    }

    #[pg_test]
    fn malformed_literals_give_22p02() {
        let env = "AQAAAAABAAAAAQ"; // header only (10 bytes), no nonce/tag
        for lit in [
            "".to_string(),
            "hello".into(),
            "kms:".into(),
            "kms:!!!!".into(),
            "KMS:AAAA".into(),
            format!("kms:{env}=="),
            "kms:AgAAAAABAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(), // format version 2
            "kms:AQAAAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(), // key id 0
            "kms:AQAAAAABAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(), // version 0
            "kms:AYAAAAABAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(), // unknown flags
        ] {
            assert_sqlstate(&format!("SELECT '{lit}'::encrypted_text"), "22P02");
        }
        // A literal into a column is parsed, never encrypted.
        run("CREATE TEMP TABLE people (email encrypted_text)");
        assert_sqlstate("INSERT INTO people VALUES ('alice@example.com')", "22P02");
        // No implicit cast to or from text.
        assert_sqlstate("INSERT INTO people SELECT 'x'::text", "42804");
        assert_sqlstate("SELECT length(email) FROM people", "42883");
        // A valid literal round-trips through text unchanged.
        setup_key("pii");
        assert_eq!(
            one::<bool>("SELECT v::text::encrypted_text::text = v::text FROM (SELECT kms_encrypt('a','pii') v) s"),
            Some(true)
        );
    }

    #[pg_test]
    fn header_readers() {
        setup_key("pii.v1:x-y_z");
        assert_eq!(
            one::<String>("SELECT kms_key_name(kms_encrypt('a', 'pii.v1:x-y_z'))").as_deref(),
            Some("pii.v1:x-y_z")
        );
        assert_eq!(
            one::<i32>("SELECT kms_key_version(kms_encrypt('a', 'pii.v1:x-y_z'))"),
            Some(1)
        );
        assert_eq!(
            one::<bool>("SELECT kms_key_version(NULL) IS NULL"),
            Some(true)
        );
    }

    #[pg_test]
    fn rotation_rewrap_and_rollback() {
        setup_key("pii");
        run("CREATE TEMP TABLE t AS SELECT kms_encrypt('old', 'pii') AS v");
        assert_eq!(
            one::<i32>("SELECT kms_rotate_key('pii', 'quarterly')"),
            Some(2)
        );
        assert_eq!(
            one::<i32>("SELECT kms_key_version(kms_encrypt('new', 'pii'))"),
            Some(2)
        );
        assert_eq!(
            one::<String>("SELECT kms_decrypt(v) FROM t").as_deref(),
            Some("old")
        );
        assert_eq!(
            one::<String>("SELECT string_agg(version || ':' || state || ':' || is_primary, ',' ORDER BY version) FROM kms_keys WHERE key_name = 'pii'")
                .as_deref(),
            Some("1:decrypt_only:false,2:active:true")
        );
        assert_eq!(
            one::<i32>("SELECT kms_key_version(kms_rewrap(v)) FROM t"),
            Some(2)
        );
        assert_eq!(
            one::<String>("SELECT kms_decrypt(kms_rewrap(v)) FROM t").as_deref(),
            Some("old")
        );
        // rewrap with context keeps the context binding
        assert_eq!(
            one::<String>(
                "SELECT kms_decrypt(kms_rewrap(kms_encrypt('c', 'pii', 'ctx'), 'ctx'), 'ctx')"
            )
            .as_deref(),
            Some("c")
        );
        assert_sqlstate("SELECT kms_rewrap(v, 'wrong') FROM t", "39000");
        // Roll back to version 1.
        run("SELECT kms_set_primary('pii', 1)");
        assert_eq!(
            one::<i32>("SELECT kms_key_version(kms_encrypt('x', 'pii'))"),
            Some(1)
        );
        assert_eq!(
            one::<String>("SELECT string_agg(version || ':' || state, ',' ORDER BY version) FROM kms_keys WHERE key_name = 'pii'").as_deref(),
            Some("1:active,2:decrypt_only")
        );
        assert_eq!(one::<i32>("SELECT kms_rotate_key('pii')"), Some(3));
    }

    #[pg_test]
    fn disable_enable_destroy() {
        setup_key("pii");
        run("CREATE TEMP TABLE t AS SELECT kms_encrypt('v1 value', 'pii') AS v");
        run("SELECT kms_rotate_key('pii')");
        run("SELECT kms_disable_key_version('pii', 1, 'suspected leak')");
        assert_sqlstate("SELECT kms_decrypt(v) FROM t", "55000");
        assert_sqlstate("SELECT kms_rewrap(v) FROM t", "55000");
        assert_sqlstate("SELECT kms_set_primary('pii', 1)", "55000");
        run("SELECT kms_enable_key_version('pii', 1)");
        assert_eq!(
            one::<String>("SELECT kms_decrypt(v) FROM t").as_deref(),
            Some("v1 value")
        );
        assert_sqlstate("SELECT kms_disable_key_version('pii', 2)", "55000");
        assert_sqlstate("SELECT kms_destroy_key_version('pii', 2)", "55000");
        run("SELECT kms_destroy_key_version('pii', 1, 'retired')");
        assert_sqlstate("SELECT kms_decrypt(v) FROM t", "55000");
        assert_sqlstate("SELECT kms_enable_key_version('pii', 1)", "55000");
        assert_sqlstate("SELECT kms_destroy_key_version('pii', 1)", "55000");
        assert_sqlstate("SELECT kms_disable_key_version('pii', 1)", "55000");
        assert_eq!(
            one::<String>("SELECT state FROM kms_keys WHERE key_name = 'pii' AND version = 1")
                .as_deref(),
            Some("destroyed")
        );
        // The wrapped material is gone for good.
        assert_eq!(one::<bool>("SELECT wrapped_key IS NULL FROM kms.key_versions v JOIN kms.keys k USING (key_id) WHERE key_name = 'pii' AND version = 1"), Some(true));
    }

    #[pg_test]
    fn argument_errors() {
        setup_key("pii");
        assert_sqlstate("SELECT kms_create_key('pii')", "42710");
        for bad in ["", "has space", "semi;colon", "é", &"x".repeat(64)] {
            assert_sqlstate(&format!("SELECT kms_create_key('{bad}')"), "22023");
            assert_sqlstate(&format!("SELECT kms_encrypt('a', '{bad}')"), "22023");
        }
        assert_eq!(
            one::<i32>(&format!("SELECT kms_create_key('{}')", "x".repeat(63))),
            Some(1)
        );
        assert_sqlstate("SELECT kms_encrypt('a', NULL)", "22023");
        assert_sqlstate("SELECT kms_create_key('p2', interval '-1 day')", "22023");
        assert_sqlstate("SELECT kms_create_key('p2', interval '0')", "22023");
        assert_sqlstate("SELECT kms_set_primary('pii', 0)", "22023");
        assert_sqlstate("SELECT kms_set_primary('pii', 7)", "22023");
        assert_sqlstate("SELECT kms_disable_key_version('pii', -1)", "22023");
        for f in [
            "kms_encrypt('a', 'nope')",
            "kms_encrypt_bytea('\\x00', 'nope')",
            "kms_rotate_key('nope')",
            "kms_set_primary('nope', 1)",
            "kms_disable_key_version('nope', 1)",
            "kms_enable_key_version('nope', 1)",
            "kms_destroy_key_version('nope', 1)",
        ] {
            assert_sqlstate(&format!("SELECT {f}"), "42704");
        }
    }

    #[pg_test]
    fn rotation_period_and_views() {
        assert_eq!(
            one::<i32>("SELECT kms_create_key('sched', interval '30 days')"),
            Some(1)
        );
        assert_eq!(
            one::<bool>("SELECT next_rotation_at = created_at + interval '30 days' FROM kms_keys WHERE key_name = 'sched'"),
            Some(true)
        );
        run("UPDATE kms.key_versions SET created_at = now() - interval '31 days'");
        let overdue = one::<pgrx::JsonB>("SELECT kms_health()->'overdue_rotation'")
            .unwrap()
            .0;
        assert_eq!(overdue, serde_json::json!(["sched"]));
    }

    #[pg_test]
    fn audit_log_is_chained_and_append_only() {
        setup_key("pii");
        run("SELECT kms_rotate_key('pii', 'why')");
        run("SELECT kms_set_primary('pii', 1)");
        run("SELECT kms_disable_key_version('pii', 2, 'r')");
        run("SELECT kms_enable_key_version('pii', 2)");
        run("SELECT kms_destroy_key_version('pii', 2, 'r2')");
        assert_eq!(
            one::<String>("SELECT string_agg(operation || ':' || coalesce(version::text, '-') || ':' || coalesce(reason, '-'), ',' ORDER BY id) FROM kms_audit_log").as_deref(),
            Some("create_key:1:-,rotate_key:2:why,set_primary:1:-,disable_key_version:2:r,enable_key_version:2:-,destroy_key_version:2:r2")
        );
        assert_eq!(
            one::<bool>("SELECT bool_and(actor = session_user::text) FROM kms_audit_log"),
            Some(true)
        );
        assert_eq!(one::<bool>("SELECT kms_verify_audit_log()"), Some(true));
        assert_sqlstate("UPDATE kms.audit_log SET reason = 'x'", "42501");
        assert_sqlstate("DELETE FROM kms.audit_log", "42501");
        assert_sqlstate("TRUNCATE kms.audit_log", "42501");
        // A superuser who disables the trigger and edits a row is caught.
        run("ALTER TABLE kms.audit_log DISABLE TRIGGER USER");
        run("UPDATE kms.audit_log SET reason = 'forged' WHERE id = 2");
        assert_eq!(one::<bool>("SELECT kms_verify_audit_log()"), Some(false));
        run("UPDATE kms.audit_log SET reason = 'why' WHERE id = 2");
        assert_eq!(one::<bool>("SELECT kms_verify_audit_log()"), Some(true));
        // Dropping the newest row is caught too (the head is kept apart).
        run("DELETE FROM kms.audit_log WHERE id = (SELECT max(id) FROM kms.audit_log)");
        assert_eq!(one::<bool>("SELECT kms_verify_audit_log()"), Some(false));
    }

    #[pg_test]
    fn master_key_missing_malformed_or_wrong() {
        setup_key("pii");
        run("SET pg_kms.master_key_command = ''");
        let e = error_of("SELECT kms_create_key('k2')").unwrap();
        assert!(
            e.starts_with("55000 pg_kms master key is not configured"),
            "{e}"
        );
        run("SET pg_kms.master_key_command = 'echo not-a-key'");
        assert_sqlstate("SELECT kms_rotate_key('pii')", "55000");
        run("SET pg_kms.master_key_command = 'exit 1'");
        assert_sqlstate("SELECT kms_rotate_key('pii')", "55000");
        run("SET pg_kms.master_key_file = '/nonexistent/master.key'");
        assert_sqlstate("SELECT kms_rotate_key('pii')", "55000");
        run("RESET pg_kms.master_key_file");
        run(&format!(
            "SET pg_kms.master_key_command = 'echo {}'",
            random_hex()
        ));
        let e = error_of("SELECT kms_rotate_key('pii')").unwrap();
        assert!(
            e.starts_with("55000 the master key does not match this keyring"),
            "{e}"
        );
        let h = one::<pgrx::JsonB>("SELECT kms_health()->'master_key'")
            .unwrap()
            .0;
        assert_eq!(h["matches_keyring"], serde_json::json!(false));
        assert_eq!(h["valid"], serde_json::json!(true));
        // The error never echoes the configured command or key.
        assert!(!e.contains("echo"));
    }

    #[pg_test]
    fn master_key_settings_are_hidden() {
        // pg_settings lists what SHOW ALL lists.
        let shown = one::<i64>("SELECT count(*) FROM pg_settings WHERE name ~ '^pg_kms\\.(previous_)?master_key_(file|command)$'");
        assert_eq!(
            shown,
            Some(0),
            "pg_kms master-key settings must not appear in SHOW ALL"
        );
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM pg_settings WHERE name = 'pg_kms.master_key_command_timeout'"
            ),
            Some(1)
        );
        run("CREATE ROLE kms_test_plain");
        run("SET LOCAL ROLE kms_test_plain");
        assert_sqlstate("SHOW pg_kms.master_key_command", "42501");
        assert_sqlstate("SET pg_kms.master_key_command = 'echo x'", "42501");
        run("RESET ROLE");
    }

    #[pg_test]
    fn master_key_rotation() {
        setup_key("a");
        setup_key("b");
        run("SELECT kms_rotate_key('a')");
        run("CREATE TEMP TABLE t AS SELECT kms_encrypt('va', 'a') AS va, kms_encrypt('vb', 'b') AS vb");
        let old_cmd = one::<String>("SELECT current_setting('pg_kms.master_key_command')").unwrap();
        let old_fp = one::<Vec<u8>>("SELECT master_key_fingerprint FROM kms.keyring").unwrap();
        run(&format!(
            "SET pg_kms.master_key_command = 'echo {}'",
            random_hex()
        ));
        assert_sqlstate("SELECT kms_rotate_master_key()", "55000"); // previous key not configured
        run(&format!(
            "SET pg_kms.previous_master_key_command = 'echo {}'",
            random_hex()
        ));
        assert_sqlstate("SELECT kms_rotate_master_key()", "55000"); // previous key is not the keyring's
        run(&format!(
            "SET pg_kms.previous_master_key_command = '{}'",
            old_cmd.replace('\'', "''")
        ));
        assert_eq!(one::<i64>("SELECT kms_rotate_master_key()"), Some(3));
        assert_ne!(
            one::<Vec<u8>>("SELECT master_key_fingerprint FROM kms.keyring").unwrap(),
            old_fp
        );
        assert_eq!(
            one::<String>("SELECT kms_decrypt(va) || kms_decrypt(vb) FROM t").as_deref(),
            Some("vavb")
        );
        assert_eq!(one::<i64>("SELECT kms_rotate_master_key()"), Some(0));
        // The old key no longer opens the keyring.
        run(&format!(
            "SET pg_kms.master_key_command = '{}'",
            old_cmd.replace('\'', "''")
        ));
        assert_sqlstate("SELECT kms_create_key('c')", "55000");
        assert_eq!(
            one::<String>("SELECT operation FROM kms_audit_log ORDER BY id DESC LIMIT 1")
                .as_deref(),
            Some("rotate_master_key")
        );
    }

    #[pg_test]
    fn health_report() {
        setup_key("pii");
        run("SELECT kms_rotate_key('pii')");
        let h = one::<pgrx::JsonB>("SELECT kms_health()").unwrap().0;
        assert_eq!(h["keys"], serde_json::json!(1));
        assert_eq!(h["versions"]["active"], serde_json::json!(1));
        assert_eq!(h["versions"]["decrypt_only"], serde_json::json!(1));
        assert_eq!(h["master_key"]["configured"], serde_json::json!(true));
        assert_eq!(h["master_key"]["matches_keyring"], serde_json::json!(true));
        assert_eq!(
            h["master_key"]["source"],
            serde_json::json!("pg_kms.master_key_command")
        );
        assert!(h["preloaded"].is_boolean());
        let text = h.to_string();
        assert!(
            !text.contains("echo"),
            "health must not reveal the key source value"
        );
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
    fn stats_view_and_internal_helpers() {
        setup_key("pii");
        // Without shared_preload_libraries there are no shared counters.
        assert_eq!(one::<i64>("SELECT count(*) FROM kms_stats"), Some(0));
        assert_eq!(
            one::<bool>("SELECT (kms_health()->'worker'->>'running')::boolean"),
            Some(false)
        );
        assert!(one::<String>("SELECT kms_health()->'worker'->>'reason'")
            .unwrap()
            .contains("shared_preload_libraries"));
        // What needs a rewrap is decided from the envelope header alone:
        // an old version without context (rewrapped), with a context (left
        // to the application), the primary (current), a disabled version
        // (cannot be opened: left alone).
        run("CREATE TABLE v AS SELECT kms_encrypt('a', 'pii') AS plain, kms_encrypt('a', 'pii', 'c') AS ctx");
        run("SELECT kms_rotate_key('pii')");
        run("INSERT INTO v VALUES (kms_encrypt('b', 'pii'), kms_encrypt('b', 'pii', 'c'))");
        run("CREATE TABLE w AS SELECT * FROM v");
        assert_eq!(one::<i64>("SELECT kms_reencrypt_now('v', 'ctx')"), Some(0));
        assert_eq!(
            one::<String>("SELECT rows_pending || '/' || rows_needing_context FROM kms_reencryption_progress WHERE table_name = 'v'::regclass AND column_name = 'ctx'").as_deref(),
            Some("0/1")
        );
        assert_eq!(
            one::<i64>("SELECT kms_reencrypt_now('v', 'plain')"),
            Some(1)
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM v WHERE kms_key_version(plain) = 2 AND kms_decrypt(plain) IN ('a', 'b')"), Some(2));
        run("SELECT kms_disable_key_version('pii', 1)");
        assert_eq!(
            one::<i64>("SELECT kms_reencrypt_now('w', 'plain')"),
            Some(0)
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM w WHERE kms_key_version(plain) = 1"),
            Some(1)
        );
        run("CREATE ROLE kt_user2 IN ROLE kms_user");
        run("SET LOCAL ROLE kt_user2");
        assert_sqlstate("SELECT * FROM kms_stats", "42501");
        run("RESET ROLE");
    }

    #[pg_test]
    fn deterministic_encryption_and_operators() {
        setup_key("pii");
        assert_eq!(one::<bool>("SELECT kms_encrypt_deterministic('123-45-6789', 'pii') = kms_encrypt_deterministic('123-45-6789', 'pii')"), Some(true));
        assert_eq!(one::<bool>("SELECT kms_encrypt_deterministic('a', 'pii') <> kms_encrypt_deterministic('b', 'pii')"), Some(true));
        assert_eq!(one::<bool>("SELECT kms_encrypt_deterministic('a', 'pii', 'c1') <> kms_encrypt_deterministic('a', 'pii', 'c2')"), Some(true));
        assert_eq!(
            one::<bool>("SELECT kms_encrypt('a', 'pii') <> kms_encrypt('a', 'pii')"),
            Some(true)
        );
        assert_eq!(
            one::<String>("SELECT kms_decrypt(kms_encrypt_deterministic('héllo', 'pii'))")
                .as_deref(),
            Some("héllo")
        );
        run("CREATE TEMP TABLE people (id int, ssn encrypted_text UNIQUE)");
        run("INSERT INTO people VALUES (1, kms_encrypt_deterministic('111', 'pii')), (2, kms_encrypt_deterministic('222', 'pii'))");
        assert_sqlstate(
            "INSERT INTO people VALUES (3, kms_encrypt_deterministic('111', 'pii'))",
            "23505",
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM (SELECT ssn FROM people UNION ALL SELECT kms_encrypt_deterministic('111','pii')) s GROUP BY ssn ORDER BY 1 DESC LIMIT 1"), Some(2));
        assert_eq!(
            one::<i32>("SELECT id FROM people WHERE ssn = kms_encrypt_deterministic('222', 'pii')"),
            Some(2)
        );
        // Rewrap keeps a deterministic value deterministic (under the new version).
        run("SELECT kms_rotate_key('pii')");
        assert_eq!(one::<bool>("SELECT kms_rewrap(ssn) = kms_encrypt_deterministic('111', 'pii') FROM people WHERE id = 1"), Some(true));
        assert_eq!(
            one::<bool>(
                "SELECT ssn <> kms_encrypt_deterministic('111', 'pii') FROM people WHERE id = 1"
            ),
            Some(true)
        );
    }

    #[pg_test]
    fn blind_index() {
        setup_key("pii");
        let a = one::<Vec<u8>>("SELECT kms_blind_index('alice@example.com', 'pii')").unwrap();
        assert_eq!(a.len(), 32);
        assert_eq!(
            one::<Vec<u8>>("SELECT kms_blind_index('alice@example.com', 'pii', bits => 64)")
                .unwrap(),
            a[..8].to_vec()
        );
        assert_ne!(
            one::<Vec<u8>>("SELECT kms_blind_index('alice@example.com', 'pii', 'ctx')").unwrap(),
            a
        );
        assert_ne!(
            one::<Vec<u8>>("SELECT kms_blind_index('bob@example.com', 'pii')").unwrap(),
            a
        );
        assert_eq!(
            one::<bool>("SELECT kms_blind_index(NULL, 'pii') IS NULL"),
            Some(true)
        );
        for bad in [0, 8, 12, 264] {
            assert_sqlstate(
                &format!("SELECT kms_blind_index('x', 'pii', bits => {bad})"),
                "22023",
            );
        }
        assert_sqlstate("SELECT kms_blind_index('x', 'nope')", "42704");
        // Rotation never changes it; another key name gives another index.
        run("SELECT kms_rotate_key('pii')");
        assert_eq!(
            one::<Vec<u8>>("SELECT kms_blind_index('alice@example.com', 'pii')").unwrap(),
            a
        );
        setup_key("other");
        assert_ne!(
            one::<Vec<u8>>("SELECT kms_blind_index('alice@example.com', 'other')").unwrap(),
            a
        );
        // Master-key rotation keeps it too.
        let old_cmd = one::<String>("SELECT current_setting('pg_kms.master_key_command')").unwrap();
        run(&format!(
            "SET pg_kms.previous_master_key_command = '{old_cmd}'"
        ));
        run(&format!(
            "SET pg_kms.master_key_command = 'echo {}'",
            random_hex()
        ));
        run("SELECT kms_rotate_master_key()");
        assert_eq!(
            one::<Vec<u8>>("SELECT kms_blind_index('alice@example.com', 'pii')").unwrap(),
            a
        );
        // Destroying the key makes it unusable.
        run("SELECT kms_destroy_key('pii', 'tenant erased')");
        assert_sqlstate(
            "SELECT kms_blind_index('alice@example.com', 'pii')",
            "55000",
        );
    }

    #[pg_test]
    fn tenant_erasure_and_per_key_grants() {
        setup_key("tenant1");
        setup_key("tenant2");
        run("CREATE TEMP TABLE t AS SELECT kms_encrypt('t1 data', 'tenant1') AS a, kms_encrypt('t2 data', 'tenant2') AS b");
        run("GRANT SELECT ON t TO PUBLIC");
        run("CREATE ROLE kt_alice IN ROLE kms_user");
        run("CREATE ROLE kt_bob IN ROLE kms_user");
        run("CREATE ROLE kt_team IN ROLE kms_user");
        run("GRANT kt_team TO kt_bob");
        // No grants: every kms_user may use the key.
        assert_eq!(as_role("kt_alice", "SELECT kms_decrypt(a) FROM t"), None);
        run("SELECT kms_grant_key('tenant1', 'kt_team', 'decrypt')");
        assert_eq!(
            as_role("kt_alice", "SELECT kms_decrypt(a) FROM t").as_deref(),
            Some("42501")
        );
        assert_eq!(
            as_role("kt_bob", "SELECT kms_decrypt(a) FROM t"),
            None,
            "member of a grantee"
        );
        // encrypt is granted separately: nobody has it yet except... no one.
        assert_eq!(
            as_role("kt_bob", "SELECT kms_encrypt('x', 'tenant1')").as_deref(),
            Some("42501")
        );
        run("SELECT kms_grant_key('tenant1', 'kt_alice', 'encrypt')");
        assert_eq!(
            as_role("kt_alice", "SELECT kms_encrypt('x', 'tenant1')"),
            None
        );
        assert_eq!(
            as_role("kt_alice", "SELECT kms_blind_index('x', 'tenant1')"),
            None
        );
        assert_eq!(
            as_role("kt_bob", "SELECT kms_blind_index('x', 'tenant1')").as_deref(),
            Some("42501")
        );
        // The other tenant's key is untouched.
        assert_eq!(as_role("kt_alice", "SELECT kms_decrypt(b) FROM t"), None);
        run("SELECT kms_revoke_key('tenant1', 'kt_team', 'decrypt')");
        assert_eq!(
            as_role("kt_bob", "SELECT kms_decrypt(a) FROM t").as_deref(),
            Some("42501"),
            "still has grants (alice encrypt)"
        );
        run("SELECT kms_revoke_key('tenant1', 'kt_alice', 'encrypt')");
        assert_eq!(
            as_role("kt_bob", "SELECT kms_decrypt(a) FROM t"),
            None,
            "no grants left: every kms_user again"
        );
        assert_sqlstate(
            "SELECT kms_grant_key('tenant1', 'kt_alice', 'admin')",
            "22023",
        );
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM kms_audit_log WHERE operation IN ('grant_key', 'revoke_key')"
            ),
            Some(4)
        );
        // Erase tenant1: every version destroyed at once, tenant2 unaffected.
        run("SELECT kms_rotate_key('tenant1')");
        run("SELECT kms_destroy_key('tenant1', 'customer left')");
        assert_sqlstate("SELECT kms_decrypt(a) FROM t", "55000");
        assert_sqlstate("SELECT kms_encrypt('x', 'tenant1')", "55000");
        assert_eq!(
            one::<String>("SELECT kms_decrypt(b) FROM t").as_deref(),
            Some("t2 data")
        );
        assert_eq!(
            one::<String>(
                "SELECT string_agg(DISTINCT state, ',') FROM kms_keys WHERE key_name = 'tenant1'"
            )
            .as_deref(),
            Some("destroyed")
        );
        assert_eq!(
            one::<String>("SELECT reason FROM kms_audit_log WHERE operation = 'destroy_key'")
                .as_deref(),
            Some("customer left")
        );
    }

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

    /// "SQLSTATE|message|hint" of the error `sql` raises as `role` (None: it succeeded).
    fn full_error_as(role: &str, sql: &str) -> Option<String> {
        if one::<bool>("SELECT to_regprocedure('pg_temp.error_full(text)') IS NOT NULL")
            != Some(true)
        {
            run(
                r#"CREATE FUNCTION pg_temp.error_full(q text) RETURNS text LANGUAGE plpgsql AS $$
               DECLARE h text;
               BEGIN EXECUTE q; RETURN NULL;
               EXCEPTION WHEN OTHERS THEN
                   GET STACKED DIAGNOSTICS h = PG_EXCEPTION_HINT;
                   RETURN SQLSTATE || '|' || SQLERRM || '|' || h;
               END $$"#,
            );
            run("GRANT EXECUTE ON FUNCTION pg_temp.error_full(text) TO PUBLIC");
        }
        run(&format!("SET LOCAL ROLE {role}"));
        let e = Spi::get_one_with_args::<String>("SELECT pg_temp.error_full($1)", &[sql.into()])
            .unwrap();
        run("RESET ROLE");
        e
    }

    #[pg_test]
    fn key_grants_die_with_the_role() {
        // Create the error helper as the superuser: created inside as_role()
        // it would belong to kt_g1, and DROP ROLE would then be refused.
        assert_eq!(error_of("SELECT 1"), None);
        setup_key("gk");
        run("CREATE TEMP TABLE gt AS SELECT kms_encrypt('secret row', 'gk') AS v");
        run("GRANT SELECT ON gt TO PUBLIC");
        run("CREATE ROLE kt_g1 IN ROLE kms_user");
        run("CREATE ROLE kt_other IN ROLE kms_user");
        run("SELECT kms_grant_key('gk', 'kt_g1', 'decrypt')");
        assert_eq!(as_role("kt_g1", "SELECT kms_decrypt(v) FROM gt"), None);
        assert_eq!(
            as_role("kt_other", "SELECT kms_decrypt(v) FROM gt").as_deref(),
            Some("42501")
        );
        // DROP ROLE is not blocked by the grant; a new role of the same name
        // does not inherit it, and the key stays closed to everyone else.
        run("DROP ROLE kt_g1");
        run("CREATE ROLE kt_g1 IN ROLE kms_user");
        assert_eq!(
            as_role("kt_g1", "SELECT kms_decrypt(v) FROM gt").as_deref(),
            Some("42501")
        );
        assert_eq!(
            as_role("kt_other", "SELECT kms_decrypt(v) FROM gt").as_deref(),
            Some("42501")
        );
        assert_eq!(
            one::<String>("SELECT status FROM kms_key_grants WHERE key_name = 'gk'").as_deref(),
            Some("stale: role dropped")
        );
        // Rebinding only concerns grants restored from another cluster; it
        // is for kms_admin members only.
        assert_eq!(one::<i64>("SELECT kms_rebind_key_grants()"), Some(0));
        run("CREATE ROLE kt_gadmin IN ROLE kms_admin");
        assert_eq!(as_role("kt_gadmin", "SELECT kms_rebind_key_grants()"), None);
        for r in ["kt_other", "kt_g1"] {
            assert_eq!(
                as_role(r, "SELECT kms_rebind_key_grants()").as_deref(),
                Some("42501"),
                "{r}"
            );
        }
        assert_eq!(
            as_role("kt_g1", "SELECT kms_decrypt(v) FROM gt").as_deref(),
            Some("42501")
        );
        // Granting again binds the grant to the new role.
        run("SELECT kms_grant_key('gk', 'kt_g1', 'decrypt')");
        assert_eq!(
            one::<String>("SELECT status FROM kms_key_grants WHERE key_name = 'gk'").as_deref(),
            Some("valid")
        );
        assert_eq!(as_role("kt_g1", "SELECT kms_decrypt(v) FROM gt"), None);
        // A renamed role loses it too.
        run("ALTER ROLE kt_g1 RENAME TO kt_g1_renamed");
        assert_eq!(
            as_role("kt_g1_renamed", "SELECT kms_decrypt(v) FROM gt").as_deref(),
            Some("42501")
        );
        assert_eq!(
            one::<String>("SELECT status FROM kms_key_grants WHERE key_name = 'gk'").as_deref(),
            Some("stale: role renamed to kt_g1_renamed")
        );
        // Revoking by name removes the stale grant: the key is open again.
        run("ALTER ROLE kt_g1_renamed RENAME TO kt_g1");
        run("SELECT kms_revoke_key('gk', 'kt_g1', 'decrypt')");
        assert_eq!(as_role("kt_other", "SELECT kms_decrypt(v) FROM gt"), None);
        // The audit log names roles, not oids (quoted like regrole).
        run(r#"CREATE ROLE "Kt Weird" IN ROLE kms_user"#);
        run(r#"SELECT kms_grant_key('gk', '"Kt Weird"', 'encrypt')"#);
        let reasons = one::<String>("SELECT string_agg(reason, ';' ORDER BY id) FROM kms_audit_log WHERE operation IN ('grant_key', 'revoke_key')").unwrap();
        assert_eq!(
            reasons,
            r#"decrypt to role kt_g1;decrypt to role kt_g1;decrypt from role kt_g1;encrypt to role "Kt Weird""#
        );
        assert!(!reasons.contains("oid"), "{reasons}");
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
    fn permission_errors_have_their_own_hints() {
        setup_key("hk");
        run("CREATE TEMP TABLE ht (v encrypted_text)");
        run("INSERT INTO ht SELECT kms_encrypt('x', 'hk')");
        run("GRANT SELECT ON ht TO PUBLIC");
        run(r#"CREATE ROLE "Kt Hinted" IN ROLE kms_user, kms_admin"#);
        run("CREATE ROLE kt_granted IN ROLE kms_user");
        run("SELECT kms_grant_key('hk', 'kt_granted', 'decrypt')");
        run("SELECT kms_grant_key('hk', 'kt_granted', 'encrypt')");
        let key_hint = |p: &str| {
            format!("Key \"hk\" has per-key grants (see the kms_key_grants view); a kms_admin can allow this with kms_grant_key('hk', <role>, '{p}').")
        };
        for (p, sql) in [
            ("decrypt", "SELECT kms_decrypt(v) FROM ht"),
            ("encrypt", "SELECT kms_encrypt('y', 'hk')"),
            ("encrypt", "SELECT kms_blind_index('y', 'hk')"),
        ] {
            assert_eq!(
                full_error_as(r#""Kt Hinted""#, sql),
                Some(format!(
                    "42501|permission denied for role \"Kt Hinted\" to {p} with key \"hk\"|{}",
                    key_hint(p)
                )),
                "{sql}"
            );
        }
        // Secrets: their own hint (the role is a kms_admin member here, so
        // use a plain kms_user).
        run("SELECT kms_secret_set('hs', 'v', key_name => 'hk')");
        run("CREATE ROLE kt_plainuser IN ROLE kms_user");
        let e = full_error_as("kt_plainuser", "SELECT kms_secret_get('hs')").unwrap();
        assert!(
            e.starts_with("42501|permission denied for role kt_plainuser to read secret \"hs\""),
            "{e}"
        );
        assert!(e.ends_with("|Secrets can be read by members of kms_admin and by roles granted 'decrypt' on the secret's key with kms_grant_key(); an unknown secret gives this same error."), "{e}");
        // kms_reencrypt_now: the column privilege hint (no privilege on ht2).
        run("CREATE TEMP TABLE ht2 (v encrypted_text)");
        let e = full_error_as(r#""Kt Hinted""#, "SELECT kms_reencrypt_now('ht2', 'v')").unwrap();
        assert!(e.starts_with("42501|"), "{e}");
        assert!(
            e.ends_with("|Ask the table owner for SELECT and UPDATE on the column."),
            "{e}"
        );
        // No message names a role by oid.
        let oid = one::<pgrx::pg_sys::Oid>(r#"SELECT '"Kt Hinted"'::regrole::oid"#)
            .unwrap()
            .to_u32()
            .to_string();
        assert!(
            !full_error_as(r#""Kt Hinted""#, "SELECT kms_decrypt(v) FROM ht")
                .unwrap()
                .contains(&oid)
        );
    }

    /// Deterministic values are AES-256-SIV envelopes: 26 bytes of overhead
    /// (header, synthetic IV) against 38 for AES-GCM, flag bit 1 (and bit 2
    /// with a context), bound to their context and tamper-evident.
    #[pg_test]
    fn deterministic_values_are_aes_siv() {
        setup_key("pii");
        let raw = |v: &str| format!("decode(substr(({v})::text, 5), 'base64')");
        assert_eq!(
            one::<i32>(&format!(
                "SELECT length({})",
                raw("kms_encrypt_deterministic('abc', 'pii')")
            )),
            Some(3 + 26)
        );
        assert_eq!(
            one::<i32>(&format!(
                "SELECT length({})",
                raw("kms_encrypt('abc', 'pii')")
            )),
            Some(3 + 38)
        );
        assert_eq!(
            one::<i32>(&format!(
                "SELECT get_byte({}, 1)",
                raw("kms_encrypt_deterministic('abc', 'pii')")
            )),
            Some(2)
        );
        assert_eq!(
            one::<i32>(&format!(
                "SELECT get_byte({}, 1)",
                raw("kms_encrypt_deterministic('abc', 'pii', 'c')")
            )),
            Some(6)
        );
        assert_eq!(
            one::<String>("SELECT kms_decrypt(kms_encrypt_deterministic('', 'pii'))").as_deref(),
            Some("")
        );
        assert_eq!(
            one::<String>("SELECT kms_decrypt(kms_encrypt_deterministic('x', 'pii', 'c'), 'c')")
                .as_deref(),
            Some("x")
        );
        assert_eq!(
            one::<Vec<u8>>("SELECT kms_decrypt_bytea(kms_encrypt_deterministic('é', 'pii'))"),
            Some(vec![0xc3, 0xa9])
        );
        assert_sqlstate(
            "SELECT kms_decrypt(kms_encrypt_deterministic('x', 'pii', 'c'), 'd')",
            "39000",
        );
        assert_sqlstate(
            "SELECT kms_decrypt(kms_encrypt_deterministic('x', 'pii', 'c'))",
            "39000",
        );
        run("CREATE TEMP TABLE det_raw AS SELECT decode(substr(kms_encrypt_deterministic('secret', 'pii')::text, 5), 'base64') AS b");
        // Every byte after the header, flipped, fails to open (SIV and ciphertext).
        let flipped = "SELECT count(*) FROM det_raw, generate_series(10, length(b) - 1) i
                        WHERE pg_temp.error_of(format('SELECT kms_decrypt(%L::encrypted_text)',
                              'kms:' || encode(set_byte(b, i, get_byte(b, i) # 1), 'base64'))) LIKE '39000%'";
        error_of("SELECT 1");
        assert_eq!(one::<i64>(flipped), Some(22));
        // Clearing the deterministic flag makes it parse as AES-GCM: too short
        // here (22P02), and never opened with the wrong primitive.
        assert_sqlstate(
            "SELECT ('kms:' || encode(set_byte(b, 1, 0), 'base64'))::encrypted_text FROM det_raw",
            "22P02",
        );
    }

    /// "SQLSTATE message | hint" of the error `sql` raises, or None.
    fn error_with_hint(sql: &str) -> Option<String> {
        if one::<bool>("SELECT to_regprocedure('pg_temp.error_hint_of(text)') IS NOT NULL")
            != Some(true)
        {
            run(
                r#"CREATE FUNCTION pg_temp.error_hint_of(q text) RETURNS text LANGUAGE plpgsql AS $$
               DECLARE h text;
               BEGIN EXECUTE q; RETURN NULL;
               EXCEPTION WHEN OTHERS THEN
                   GET STACKED DIAGNOSTICS h = PG_EXCEPTION_HINT;
                   RETURN SQLSTATE || ' ' || SQLERRM || ' | ' || coalesce(h, ''); END $$"#,
            );
        }
        Spi::get_one_with_args::<String>("SELECT pg_temp.error_hint_of($1)", &[sql.into()]).unwrap()
    }

    /// Drops this backend's key cache (every lifecycle act invalidates it).
    fn drop_key_cache() {
        run("SELECT kms_create_key('cache_buster_' || md5(random()::text))");
    }

    #[track_caller]
    fn assert_altered(sql: &str, what: &str) {
        let e = error_of(sql).unwrap_or_else(|| panic!("{sql}: expected XX001, got success"));
        assert!(
            e.starts_with("XX001 catalog row altered: ") && e.contains(what),
            "{sql}: expected XX001 naming {what}, got {e}"
        );
    }

    #[pg_test]
    fn destroyed_key_refuses_every_act() {
        setup_key("gone");
        run("SELECT kms_rotate_key('gone')");
        run("SELECT kms_destroy_key('gone', 'tenant left')");
        let receipt = one::<pgrx::JsonB>(
            "SELECT receipt FROM kms_destruction_receipts WHERE key_name = 'gone'",
        )
        .unwrap()
        .0;
        assert_eq!(receipt["key_name"], serde_json::json!("gone"));
        assert_eq!(receipt["versions"].as_array().map(|v| v.len()), Some(2));
        assert!(receipt["versions"][0]["material_mac"]
            .as_str()
            .is_some_and(|m| m.len() == 64));
        assert!(receipt["index_root_mac"]
            .as_str()
            .is_some_and(|m| m.len() == 64));
        assert_eq!(
            one::<String>("SELECT a.operation FROM kms_audit_log a JOIN kms_destruction_receipts r ON r.audit_id = a.id").as_deref(),
            Some("destroy_key")
        );
        for (sql, what) in [
            ("SELECT kms_rotate_key('gone')", "rotate"),
            ("SELECT kms_set_primary('gone', 1)", "primary"),
            ("SELECT kms_enable_key_version('gone', 1)", "enable"),
            ("SELECT kms_disable_key_version('gone', 1)", "disable"),
            ("SELECT kms_destroy_key_version('gone', 1)", "destroy"),
            ("SELECT kms_destroy_key('gone')", "destroy"),
            ("SELECT kms_blind_index('x', 'gone')", "blind index"),
        ] {
            let e = error_with_hint(sql).unwrap_or_else(|| panic!("{sql} succeeded"));
            assert!(
                e.starts_with("55000")
                    && e.contains("key \"gone\" is destroyed")
                    && e.contains(what),
                "{sql}: {e}"
            );
            assert!(
                e.contains("| A destroyed key stays destroyed"),
                "{sql}: hint missing: {e}"
            );
        }
        let e = error_with_hint("SELECT kms_encrypt('x', 'gone')").unwrap();
        assert!(
            e.starts_with("55000") && e.contains("destroyed") && !e.ends_with(" | "),
            "{e}"
        );
        assert_sqlstate("SELECT kms_create_key('gone')", "42710");
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM kms_keys WHERE key_name = 'gone' AND state <> 'destroyed'"
            ),
            Some(0)
        );
        assert_eq!(one::<bool>("SELECT bool_and(key_destroyed_at IS NOT NULL) FROM kms_keys WHERE key_name = 'gone'"), Some(true));
        // Scheduled rotation skips it even when overdue (rotation_period and
        // created_at are not what the MAC covers: no act could change them).
        run("UPDATE kms.keys SET rotation_period = interval '1 second' WHERE key_name = 'gone'");
        run("UPDATE kms.key_versions SET created_at = now() - interval '1 day'");
        let due = crate::lifecycle::rotate_due_keys();
        assert!(!due.contains(&"gone".to_string()), "{due:?}");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM kms_keys WHERE key_name = 'gone'"),
            Some(2)
        );
        assert_eq!(one::<bool>("SELECT kms_verify_audit_log()"), Some(true));
    }

    #[pg_test]
    fn destruction_receipt_of_a_version() {
        setup_key("r");
        run("SELECT kms_rotate_key('r')");
        let before = one::<Vec<u8>>("SELECT wrapped_key FROM kms.key_versions v JOIN kms.keys k USING (key_id) WHERE key_name = 'r' AND version = 1").unwrap();
        run("SELECT kms_destroy_key_version('r', 1, 'retired')");
        let receipt =
            one::<pgrx::JsonB>("SELECT receipt FROM kms_destruction_receipts WHERE key_name = 'r'")
                .unwrap()
                .0;
        assert_eq!(receipt["version"], serde_json::json!(1));
        assert_eq!(receipt["receipt"], serde_json::json!("pg_kms destruction"));
        let mac = receipt["material_mac"].as_str().unwrap().to_string();
        assert_eq!(mac.len(), 64);
        // The receipt MACs the erased bytes without containing them.
        let hex: String = before.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!receipt.to_string().contains(&hex));
        assert_eq!(
            one::<String>("SELECT operation || ':' || version || ':' || (detail::jsonb->>'material_mac') FROM kms_audit_log ORDER BY id DESC LIMIT 1"),
            Some(format!("destroy_key_version:1:{mac}"))
        );
        assert_eq!(one::<bool>("SELECT kms_verify_audit_log()"), Some(true));
    }

    #[pg_test]
    fn key_rows_edited_behind_pg_kms_are_refused() {
        for k in ["e1", "e2", "e3", "e4", "e5", "e6"] {
            setup_key(k);
            run(&format!("SELECT kms_rotate_key('{k}')"));
        }
        run("CREATE TEMP TABLE v1 AS SELECT kms_encrypt('one', 'e1') AS e1");
        run("CREATE TEMP TABLE saved_v AS SELECT v.* FROM kms.key_versions v JOIN kms.keys k USING (key_id)
              WHERE (key_name = 'e4' AND version = 1) OR key_name = 'e5'");
        run("CREATE TEMP TABLE saved_k AS SELECT * FROM kms.keys WHERE key_name = 'e5'");
        run("SELECT kms_disable_key_version('e2', 1)");
        run("SELECT kms_destroy_key_version('e4', 1, force => true)");
        run("SELECT kms_destroy_key_version('e5', 1, force => true)");
        // Re-point the primary.
        run("UPDATE kms.keys SET primary_version = 1 WHERE key_name = 'e1'");
        // Re-enable a disabled version.
        run("UPDATE kms.key_versions v SET state = 'decrypt_only' FROM kms.keys k WHERE k.key_id = v.key_id AND key_name = 'e2' AND version = 1");
        // Swap the wrapped keys of two versions.
        run("UPDATE kms.key_versions v SET wrapped_key = o.wrapped_key FROM kms.key_versions o, kms.keys k
              WHERE k.key_name = 'e3' AND v.key_id = k.key_id AND o.key_id = k.key_id AND v.version + o.version = 3");
        // Put a saved row of a destroyed version back, MAC and all ...
        run("UPDATE kms.key_versions v SET state = s.state, wrapped_key = s.wrapped_key, row_mac = s.row_mac
               FROM saved_v s JOIN kms.keys k ON k.key_id = s.key_id AND k.key_name = 'e4'
              WHERE v.key_id = s.key_id AND v.version = s.version");
        // ... or the key's row with it (a consistent older state of the key).
        run("UPDATE kms.key_versions v SET state = s.state, wrapped_key = s.wrapped_key, row_mac = s.row_mac
               FROM saved_v s JOIN kms.keys k ON k.key_id = s.key_id AND k.key_name = 'e5'
              WHERE v.key_id = s.key_id AND v.version = s.version");
        run("UPDATE kms.keys k SET generation = s.generation, row_mac = s.row_mac FROM saved_k s WHERE k.key_id = s.key_id");
        // NULL a row's MAC to get an edited row re-blessed.
        run("UPDATE kms.keys SET primary_version = 1, row_mac = NULL WHERE key_name = 'e6'");
        drop_key_cache();
        assert_altered(
            "SELECT kms_encrypt('x', 'e1')",
            "kms.keys row of key \"e1\"",
        );
        assert_altered(
            "SELECT kms_decrypt(e1) FROM v1",
            "kms.keys row of key \"e1\"",
        );
        assert_altered("SELECT kms_rotate_key('e1')", "kms.keys row of key \"e1\"");
        assert_altered("SELECT kms_encrypt('x', 'e2')", "version 1 of key \"e2\"");
        assert_altered("SELECT kms_set_primary('e2', 1)", "version 1 of key \"e2\"");
        assert_altered("SELECT kms_encrypt('x', 'e3')", "of key \"e3\"");
        assert_altered("SELECT kms_encrypt('x', 'e4')", "version 1 of key \"e4\"");
        assert_altered(
            "SELECT kms_encrypt('x', 'e5')",
            "kms.keys row of key \"e5\"",
        );
        let e = error_of("SELECT kms_encrypt('x', 'e5')").unwrap();
        assert!(e.contains("kms.keys row of key \"e5\""), "{e}");
        assert_altered(
            "SELECT kms_encrypt('x', 'e6')",
            "kms.keys row of key \"e6\"",
        );
        assert_altered(
            "SELECT kms_blind_index('x', 'e6')",
            "kms.keys row of key \"e6\"",
        );
        // The audit check names the destruction that was undone.
        let (ok, bad, why) = Spi::get_three::<bool, i64, String>(
            "SELECT ok, first_bad_id, problem FROM kms_audit_log_check()",
        )
        .unwrap();
        assert_eq!(ok, Some(false));
        let destroyed_e4 = one::<i64>("SELECT id FROM kms_audit_log WHERE key_name = 'e4' AND operation = 'destroy_key_version'");
        assert_eq!(bad, destroyed_e4, "{why:?}");
        assert!(why.unwrap_or_default().contains("e4 version 1"));
        // Editing the keyring row to say MACs were never enabled does not help.
        run("UPDATE kms.keyring SET integrity_since = NULL, row_mac = NULL");
        drop_key_cache_expect_altered();
        assert_altered("SELECT kms_encrypt('x', 'e6')", "the kms.keyring row");
        assert_altered("SELECT kms_rotate_key('e6')", "the kms.keyring row");
    }

    fn drop_key_cache_expect_altered() {
        assert_altered(
            "SELECT kms_create_key('cache_buster_x')",
            "the kms.keyring row",
        );
    }

    #[pg_test]
    fn audit_chain_is_keyed() {
        setup_key("pii");
        run("SELECT kms_rotate_key('pii', 'why')");
        run("SELECT kms_disable_key_version('pii', 1, 'r')");
        assert_eq!(
            one::<String>("SELECT ok || ':' || rows_checked || ':' || coalesce(first_bad_id::text, '-') || ':' || head_id || ':' || length(head_mac) FROM kms_audit_log_check()").as_deref(),
            Some("true:3:-:3:64")
        );
        assert_eq!(
            one::<bool>("SELECT bool_and(length(mac) = 64) FROM kms_audit_log"),
            Some(true)
        );
        // Forge row 2 and recompute every hash with SHA-256, as the unkeyed
        // chain allowed: the MACs no longer match.
        run("ALTER TABLE kms.audit_log DISABLE TRIGGER USER");
        run("UPDATE kms.audit_log SET reason = 'forged' WHERE id = 2");
        run(r#"DO $$ DECLARE r record; p bytea; BEGIN
                 FOR r IN SELECT * FROM kms.audit_log WHERE id >= 2 ORDER BY id LOOP
                   SELECT hash INTO p FROM kms.audit_log WHERE id = r.id - 1;
                   UPDATE kms.audit_log SET prev_hash = p,
                          hash = kms.audit_row_hash(p, r.id, r.at, r.actor, r.operation, r.key_name, r.version, r.reason)
                    WHERE id = r.id;
                 END LOOP;
                 UPDATE kms.audit_head SET last_hash = (SELECT hash FROM kms.audit_log ORDER BY id DESC LIMIT 1);
               END $$"#);
        assert_eq!(one::<bool>("SELECT kms_verify_audit_log()"), Some(false));
        let (bad, why) =
            Spi::get_two::<i64, String>("SELECT first_bad_id, problem FROM kms_audit_log_check()")
                .unwrap();
        assert_eq!(bad, Some(2), "{why:?}");
        // Turning the forged rows into unkeyed ones is caught too.
        run("UPDATE kms.audit_log SET mac = NULL, key_fp = NULL WHERE id >= 2");
        assert_eq!(one::<bool>("SELECT kms_verify_audit_log()"), Some(false));
        assert_eq!(
            one::<i64>("SELECT first_bad_id FROM kms_audit_log_check()"),
            Some(2)
        );
    }

    #[pg_test]
    fn audit_log_check_is_for_auditors() {
        setup_key("pii");
        run("CREATE ROLE kt_aud2 IN ROLE kms_auditor");
        run("CREATE ROLE kt_adm2 IN ROLE kms_admin");
        run("CREATE ROLE kt_usr2 IN ROLE kms_user");
        run("CREATE ROLE kt_pln2");
        assert_eq!(
            as_role("kt_aud2", "SELECT * FROM kms_audit_log_check()"),
            None
        );
        assert_eq!(
            as_role("kt_adm2", "SELECT * FROM kms_audit_log_check()"),
            None
        );
        assert_eq!(
            as_role("kt_usr2", "SELECT * FROM kms_audit_log_check()").as_deref(),
            Some("42501")
        );
        assert_eq!(
            as_role("kt_pln2", "SELECT * FROM kms_audit_log_check()").as_deref(),
            Some("42501")
        );
    }

    /// A keyring made before rows carried MACs (rows and keyring without
    /// MACs, an unkeyed audit chain) works as it is, adopts MACs at the
    /// next act (audited), and cannot be made to adopt them again.
    #[pg_test]
    fn unkeyed_keyring_adopts_macs_once() {
        setup_key("old");
        setup_key("old2");
        run("SELECT kms_rotate_key('old')");
        run("CREATE TEMP TABLE t AS SELECT kms_encrypt('v', 'old') AS v");
        // Make it look like a 0.1.0 keyring.
        run("ALTER TABLE kms.audit_log DISABLE TRIGGER USER");
        run("DELETE FROM kms.audit_log");
        run("DELETE FROM kms.audit_head");
        run("UPDATE kms.keys SET row_mac = NULL, generation = 0");
        run("UPDATE kms.key_versions SET row_mac = NULL");
        run("UPDATE kms.keyring SET integrity_since = NULL, row_mac = NULL");
        run(
            r#"INSERT INTO kms.audit_log (id, at, actor, operation, key_name, version, reason, prev_hash, hash)
               SELECT 1, t, 'dba', 'create_key', 'old', 1, NULL, z, kms.audit_row_hash(z, 1, t, 'dba', 'create_key', 'old', 1, NULL)
                 FROM (SELECT now() AS t, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea AS z) s"#,
        );
        run("ALTER TABLE kms.audit_log ENABLE TRIGGER USER");
        drop_key_cache_expect_adoption();
        assert_eq!(
            one::<String>("SELECT kms_decrypt(v) FROM t").as_deref(),
            Some("v")
        );
        assert_eq!(
            one::<String>("SELECT string_agg(operation, ',' ORDER BY id) FROM kms_audit_log")
                .as_deref(),
            Some("create_key,adopt_integrity,create_key")
        );
        assert_eq!(one::<bool>("SELECT kms_verify_audit_log()"), Some(true));
        assert_eq!(
            one::<bool>(
                "SELECT integrity_since IS NOT NULL AND row_mac IS NOT NULL FROM kms.keyring"
            ),
            Some(true)
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM kms.key_versions WHERE row_mac IS NULL"),
            Some(0)
        );
        // NULLing MACs again (with the keyring's) does not re-bless an edit.
        run("UPDATE kms.keys SET primary_version = 1, row_mac = NULL WHERE key_name = 'old'");
        run("UPDATE kms.key_versions SET row_mac = NULL");
        run("UPDATE kms.keyring SET integrity_since = NULL, row_mac = NULL");
        assert_altered("SELECT kms_rotate_key('old2')", "the kms.keyring row");
        assert_altered("SELECT kms_encrypt('x', 'old2')", "the kms.keyring row");
    }

    /// Any act adopts MACs; a cache-busting create is one.
    fn drop_key_cache_expect_adoption() {
        drop_key_cache();
    }

    /// Adoption refuses to bless a swapped wrapped key.
    #[pg_test]
    fn unkeyed_keyring_with_swapped_material_is_not_blessed() {
        setup_key("sw");
        run("SELECT kms_rotate_key('sw')");
        run("ALTER TABLE kms.audit_log DISABLE TRIGGER USER");
        run("DELETE FROM kms.audit_log");
        run("DELETE FROM kms.audit_head");
        run("UPDATE kms.keys SET row_mac = NULL, generation = 0");
        run("UPDATE kms.key_versions SET row_mac = NULL");
        run("UPDATE kms.keyring SET integrity_since = NULL, row_mac = NULL");
        run(
            "UPDATE kms.key_versions v SET wrapped_key = o.wrapped_key FROM kms.key_versions o
              WHERE v.key_id = o.key_id AND v.version + o.version = 3",
        );
        assert_sqlstate("SELECT kms_create_key('sw2')", "XX001");
        assert_eq!(
            one::<bool>("SELECT integrity_since IS NULL FROM kms.keyring"),
            Some(true)
        );
    }

    #[pg_test]
    fn audit_log_check_names_edited_key_rows() {
        setup_key("c1");
        run("SELECT kms_rotate_key('c1')");
        assert_eq!(
            one::<bool>("SELECT ok FROM kms_audit_log_check()"),
            Some(true)
        );
        run("UPDATE kms.keys SET primary_version = 1 WHERE key_name = 'c1'");
        assert_eq!(
            one::<String>("SELECT ok || ':' || coalesce(first_bad_id::text, '-') || ':' || problem FROM kms_audit_log_check()").as_deref(),
            Some("false:-:catalog row altered: the kms.keys row of key \"c1\": Its MAC does not verify under the master key.")
        );
        assert_eq!(one::<bool>("SELECT kms_verify_audit_log()"), Some(false));
    }

    /// Table code on kms.* (a trigger or rule of someone else's) could change
    /// key rows between an act's check and its re-MAC: acts refuse to run.
    #[pg_test]
    fn acts_refuse_foreign_triggers_and_rules_on_the_catalog() {
        setup_key("tg");
        run("CREATE FUNCTION pg_temp.noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$");
        run("CREATE TRIGGER sneaky BEFORE UPDATE ON kms.key_versions FOR EACH ROW EXECUTE FUNCTION pg_temp.noop()");
        let e = error_of("SELECT kms_rotate_key('tg')").unwrap();
        assert!(
            e.starts_with("XX001 catalog row altered: kms.key_versions trigger sneaky"),
            "{e}"
        );
        run("DROP TRIGGER sneaky ON kms.key_versions");
        run("CREATE RULE sneaky AS ON INSERT TO kms.audit_head DO ALSO NOTIFY x");
        let e = error_of("SELECT kms_rotate_key('tg')").unwrap();
        assert!(
            e.starts_with("XX001 catalog row altered: kms.audit_head rule sneaky"),
            "{e}"
        );
        run("DROP RULE sneaky ON kms.audit_head");
        assert_eq!(one::<i32>("SELECT kms_rotate_key('tg')"), Some(2));
    }
}
