//! Key management in SQL: create, rotate, set the primary version,
//! disable, enable and destroy versions and keys, per-key grants, and
//! master-key rotation (`kms_admin`). The acts themselves are in
//! `crate::lifecycle`.

use crate::pg::datum::{RawText, RegRole};
use pgrx::datum::Interval;
use pgrx::prelude::*;

#[pg_extern(volatile, parallel_unsafe)]
fn kms_create_key(key_name: RawText, rotation_period: default!(Option<Interval>, "NULL")) -> i32 {
    crate::lifecycle::create_key_sql(key_name, rotation_period)
}

/// Adds a new primary version. `emergency => true` (a suspected
/// compromise): the version replaced is also marked to be disabled by the
/// worker as soon as no row references it (audited, reason `emergency`),
/// and the worker rewraps the key's rows at once.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_rotate_key(
    key_name: RawText,
    reason: default!(Option<RawText>, "NULL"),
    emergency: default!(bool, false),
) -> i32 {
    crate::lifecycle::rotate_key_sql(key_name, reason, emergency)
}

/// Changes a key's policy after creation: its rotation period, how long a
/// decrypt_only version may stay before the worker disables it once no row
/// references it (`retire_after`), how long a disabled version may stay
/// before the worker destroys it once no row references it
/// (`destroy_after`), and its metadata (a JSON object). NULL leaves a field
/// as it is; `clear` names fields to reset (`metadata` to `{}`). Audited
/// (`alter_key`) with the old and new values.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_alter_key(
    key_name: RawText,
    rotation_period: default!(Option<Interval>, "NULL"),
    retire_after: default!(Option<Interval>, "NULL"),
    destroy_after: default!(Option<Interval>, "NULL"),
    metadata: default!(Option<pgrx::JsonB>, "NULL"),
    clear: default!(Option<Vec<Option<String>>>, "NULL"),
) {
    crate::lifecycle::alter_key_sql(
        key_name,
        crate::lifecycle::policy::Alter {
            rotation_period,
            retire_after,
            destroy_after,
            metadata: metadata.map(|j| j.0),
            clear: clear.unwrap_or_default(),
        },
    )
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_set_primary(key_name: RawText, version: i32) {
    crate::lifecycle::set_primary(key_name, version)
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_disable_key_version(
    key_name: RawText,
    version: i32,
    reason: default!(Option<RawText>, "NULL"),
) {
    crate::lifecycle::disable_key_version(key_name, version, reason)
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_enable_key_version(key_name: RawText, version: i32) {
    crate::lifecycle::enable_key_version(key_name, version)
}

/// Erases the wrapped material of a version (see the README, "Crypto-shredding
/// and backups"). Its destruction receipt is the audit row's `detail`
/// (view kms_destruction_receipts).
#[pg_extern(volatile, parallel_unsafe)]
fn kms_destroy_key_version(
    key_name: RawText,
    version: i32,
    reason: default!(Option<RawText>, "NULL"),
    force: default!(bool, false),
) {
    crate::lifecycle::destroy_key_version(key_name, version, reason, force)
}

/// Destroys every version of a key at once (erasing a tenant): all its
/// values become undecryptable (55000), its blind index unusable, and the
/// key refuses every further act. Audited, with its destruction receipt.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_destroy_key(key_name: RawText, reason: default!(Option<RawText>, "NULL")) {
    crate::lifecycle::destroy_key(key_name, reason)
}

/// Grants `privilege` ('encrypt' or 'decrypt') on a key. A key with no
/// grants is usable by every kms_user; once it has grants, only grantees
/// (and members of them) may use it for that privilege.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_grant_key(key_name: RawText, grantee: RegRole, privilege: RawText) {
    crate::lifecycle::grant_key(key_name, grantee, privilege)
}

#[pg_extern(volatile, parallel_unsafe)]
fn kms_revoke_key(key_name: RawText, grantee: RegRole, privilege: RawText) {
    crate::lifecycle::revoke_key(key_name, grantee, privilege)
}

/// After a dump of another cluster was restored here: binds each grant
/// that came from that cluster to the role of the same name in this one
/// (grants whose name has no role here stay unbound). One audit row per
/// grant bound (operation `rebind_key_grant`). Grants made in this cluster
/// are never rebound, so a role dropped and recreated under the same name
/// does not get its predecessor's grants; grant them again instead.
/// Returns the number of grants bound.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_rebind_key_grants() -> i64 {
    crate::lifecycle::rebind_key_grants()
}

/// Re-wraps every data key under the master key configured now, reading
/// the old one from `pg_kms.previous_master_key_*`. Returns the number of
/// versions re-wrapped (0 if the keyring already uses the current key).
///
/// The key-state rows are first checked under the old key (so that a row
/// edited behind pg_kms's back is refused, not blessed), then re-MAC'd
/// under the new one; the rotation's audit row is the first row MAC'd
/// under the new key, and its hash commits to every earlier row.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_rotate_master_key() -> i64 {
    crate::lifecycle::rotate_master_key()
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::api::test_support::*;
    use pgrx::prelude::*;

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
        make_keyring_unkeyed(Some("old"));
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

    /// Adoption refuses to bless a swapped wrapped key.
    #[pg_test]
    fn unkeyed_keyring_with_swapped_material_is_not_blessed() {
        setup_key("sw");
        run("SELECT kms_rotate_key('sw')");
        make_keyring_unkeyed(None);
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

    /// kms_alter_key changes and clears a key's policy and metadata, audited
    /// with the old and new values; the key rows' MACs and generation are
    /// untouched (the chain and the key still verify and load).
    #[pg_test]
    fn alter_key_is_audited_with_old_and_new_values() {
        setup_key("ak");
        run("CREATE TEMP TABLE t AS SELECT kms_encrypt('secret', 'ak') AS v");
        run(
            r#"SELECT kms_alter_key('ak', rotation_period => '30 days', retire_after => '7 days',
                                    destroy_after => '90 days', metadata => '{"owner": "billing"}')"#,
        );
        assert_eq!(
            one::<String>("SELECT rotation_period || '/' || retire_after || '/' || destroy_after || '/' || (metadata->>'owner') FROM kms_keys WHERE key_name = 'ak'").as_deref(),
            Some("30 days/7 days/90 days/billing")
        );
        assert_eq!(
            one::<bool>("SELECT next_rotation_at = created_at + interval '30 days' FROM kms_keys WHERE key_name = 'ak'"),
            Some(true)
        );
        let d = one::<pgrx::JsonB>("SELECT detail::jsonb FROM kms_audit_log WHERE operation = 'alter_key' ORDER BY id DESC LIMIT 1").unwrap().0;
        assert_eq!(
            d,
            serde_json::json!({
                "old": {"rotation_period": null, "retire_after": null, "destroy_after": null, "metadata": {}},
                "new": {"rotation_period": "30 days", "retire_after": "7 days", "destroy_after": "90 days", "metadata": {"owner": "billing"}},
            })
        );
        assert_eq!(
            one::<bool>("SELECT key_name = 'ak' AND version IS NULL AND actor = session_user::text FROM kms_audit_log WHERE operation = 'alter_key'"),
            Some(true)
        );
        // Only what is given changes; clear resets fields.
        run("SELECT kms_alter_key('ak', retire_after => '1 day', clear => ARRAY['rotation_period', 'metadata'])");
        assert_eq!(
            one::<String>("SELECT coalesce(rotation_period::text, '-') || '/' || retire_after || '/' || destroy_after || '/' || metadata::text || '/' || coalesce(next_rotation_at::text, '-') FROM kms_keys WHERE key_name = 'ak'").as_deref(),
            Some("-/1 day/90 days/{}/-")
        );
        let d = one::<pgrx::JsonB>("SELECT detail::jsonb FROM kms_audit_log WHERE operation = 'alter_key' ORDER BY id DESC LIMIT 1").unwrap().0;
        assert_eq!(d["old"]["rotation_period"], serde_json::json!("30 days"));
        assert_eq!(d["new"]["rotation_period"], serde_json::Value::Null);
        assert_eq!(d["new"]["metadata"], serde_json::json!({}));
        // Nothing changed: nothing audited.
        let n = one::<i64>("SELECT count(*) FROM kms_audit_log");
        run("SELECT kms_alter_key('ak', retire_after => '1 day')");
        run("SELECT kms_alter_key('ak')");
        assert_eq!(one::<i64>("SELECT count(*) FROM kms_audit_log"), n);
        assert_eq!(
            one::<i64>("SELECT count(*) FROM kms_audit_log WHERE operation = 'alter_key'"),
            Some(2)
        );
        // The chain, the key rows and the key itself still verify.
        assert_eq!(
            one::<bool>("SELECT ok FROM kms_audit_log_check()"),
            Some(true)
        );
        drop_key_cache();
        assert_eq!(
            one::<String>("SELECT kms_decrypt(v) FROM t").as_deref(),
            Some("secret")
        );
        assert_eq!(one::<i32>("SELECT kms_rotate_key('ak')"), Some(2));
        assert_eq!(
            one::<bool>("SELECT ok FROM kms_audit_log_check()"),
            Some(true)
        );
    }

    #[pg_test]
    fn alter_key_argument_errors() {
        setup_key("ae");
        for (sql, code) in [
            ("SELECT kms_alter_key('ae', clear => ARRAY['primary_version'])", "22023"),
            ("SELECT kms_alter_key('ae', clear => ARRAY[NULL::text])", "22023"),
            ("SELECT kms_alter_key('ae', retire_after => '-1 day')", "22023"),
            ("SELECT kms_alter_key('ae', destroy_after => '-1 second')", "22023"),
            ("SELECT kms_alter_key('ae', rotation_period => '0')", "22023"),
            ("SELECT kms_alter_key('ae', rotation_period => '-5 days')", "22023"),
            ("SELECT kms_alter_key('ae', metadata => '[1, 2]')", "22023"),
            ("SELECT kms_alter_key('ae', retire_after => '1 day', clear => ARRAY['retire_after'])", "22023"),
            ("SELECT kms_alter_key('nope', retire_after => '1 day')", "42704"),
            ("SELECT kms_alter_key('bad name', retire_after => '1 day')", "22023"),
        ] {
            assert_sqlstate(sql, code);
        }
        let e = error_with_hint("SELECT kms_alter_key('ae', clear => ARRAY['primary_version'])")
            .unwrap();
        assert!(
            e.contains("cannot clear \"primary_version\"") && e.contains("| clear names fields to reset: rotation_period, retire_after, destroy_after, metadata."),
            "{e}"
        );
        // retire_after and destroy_after may be zero (act once unreferenced).
        run("SELECT kms_alter_key('ae', retire_after => '0', destroy_after => '0')");
        // Nothing was audited by the failures.
        assert_eq!(
            one::<i64>("SELECT count(*) FROM kms_audit_log WHERE operation = 'alter_key'"),
            Some(1)
        );
        run("SELECT kms_destroy_key('ae')");
        assert_sqlstate(
            "SELECT kms_alter_key('ae', retire_after => '1 day')",
            "55000",
        );
        // kms_admin only.
        run("CREATE ROLE ak_user IN ROLE kms_user");
        run("CREATE ROLE ak_aud IN ROLE kms_auditor");
        setup_key("ae2");
        for r in ["ak_user", "ak_aud"] {
            assert_eq!(
                as_role(r, "SELECT kms_alter_key('ae2', retire_after => '1 day')").as_deref(),
                Some("42501")
            );
        }
    }

    /// An emergency rotation marks the version it replaced; the policy
    /// disables it once no row references it (reason 'emergency') and
    /// clears the mark. retire_after and destroy_after do the same for old
    /// versions (reason 'policy'), never for a referenced one.
    #[pg_test]
    fn policy_retires_and_destroys_only_unreferenced_versions() {
        use crate::lifecycle::policy::{apply, due, Action, Outcome};
        setup_key("em");
        run("CREATE TABLE em_t AS SELECT kms_encrypt('a' || g, 'em') AS v FROM generate_series(1, 3) g");
        assert_eq!(
            one::<i32>("SELECT kms_rotate_key('em', 'suspected compromise', emergency => true)"),
            Some(2)
        );
        assert_eq!(
            one::<String>("SELECT string_agg(version || ':' || state || ':' || retire_when_unreferenced, ',' ORDER BY version) FROM kms.key_versions").as_deref(),
            Some("1:decrypt_only:true,2:active:false")
        );
        let d = one::<pgrx::JsonB>(
            "SELECT detail::jsonb FROM kms_audit_log WHERE operation = 'rotate_key'",
        )
        .unwrap()
        .0;
        assert_eq!(
            d,
            serde_json::json!({"emergency": true, "retire_when_unreferenced": 1})
        );
        assert_eq!(crate::lifecycle::policy::emergency_keys().len(), 1);
        let cands = due().unwrap();
        assert_eq!(cands.len(), 1);
        assert_eq!((cands[0].version, cands[0].action), (1, Action::Emergency));
        assert_eq!(apply(&cands[0]), Outcome::Referenced(3));
        // Still referenced, progress unchanged: not counted again at once.
        assert!(due().unwrap().is_empty());
        run("UPDATE em_t SET v = kms_rewrap(v)");
        // A new policy pass (the worker calls due() first: it forgets the
        // pass's counts).
        assert!(
            due().unwrap().is_empty(),
            "rate-limited: progress unchanged"
        );
        assert_eq!(apply(&cands[0]), Outcome::Done);
        assert_eq!(
            one::<String>("SELECT state || ':' || retire_when_unreferenced FROM kms.key_versions WHERE version = 1").as_deref(),
            Some("disabled:false")
        );
        assert_eq!(
            one::<String>("SELECT operation || ':' || version || ':' || reason || ':' || (detail::jsonb->>'policy') FROM kms_audit_log ORDER BY id DESC LIMIT 1").as_deref(),
            Some("disable_key_version:1:emergency:emergency")
        );
        assert!(crate::lifecycle::policy::emergency_keys().is_empty());
        assert!(due().unwrap().is_empty());
        // retire_after: a decrypt_only version, old enough, unreferenced.
        run("SELECT kms_rotate_key('em')");
        run("INSERT INTO em_t SELECT kms_encrypt('b', 'em')");
        run("SELECT kms_rotate_key('em')");
        run("SELECT kms_alter_key('em', retire_after => '1 hour')");
        assert!(due().unwrap().is_empty(), "version 2 is not old enough yet");
        run("UPDATE kms.key_versions SET state_changed_at = now() - interval '2 hours' WHERE version IN (2, 3)");
        let c = due().unwrap();
        assert_eq!(
            c.iter().map(|c| (c.version, c.action)).collect::<Vec<_>>(),
            vec![(2, Action::Retire), (3, Action::Retire)]
        );
        // Version 2 seals the three rows rewrapped above, version 3 the
        // newest.
        assert_eq!(apply(&c[0]), Outcome::Referenced(3));
        assert_eq!(apply(&c[1]), Outcome::Referenced(1));
        run("UPDATE em_t SET v = kms_rewrap(v) WHERE kms_key_version(v) = 3");
        let _ = due();
        assert_eq!(apply(&c[1]), Outcome::Done);
        assert_eq!(
            one::<String>("SELECT string_agg(version || ':' || state, ',' ORDER BY version) FROM kms_keys WHERE key_name = 'em'").as_deref(),
            Some("1:disabled,2:decrypt_only,3:disabled,4:active")
        );
        assert_eq!(
            one::<String>("SELECT reason || ':' || (detail::jsonb->>'policy') || ':' || (detail::jsonb->>'retire_after') FROM kms_audit_log ORDER BY id DESC LIMIT 1").as_deref(),
            Some("policy:retire_after:01:00:00")
        );
        // destroy_after: disabled versions, never a referenced one.
        run("SELECT kms_alter_key('em', destroy_after => '0')");
        let c = due().unwrap();
        assert_eq!(
            c.iter().map(|c| (c.version, c.action)).collect::<Vec<_>>(),
            vec![(1, Action::Destroy), (3, Action::Destroy)]
        );
        for c in &c {
            assert_eq!(apply(c), Outcome::Done);
        }
        assert_eq!(
            one::<String>("SELECT string_agg(version || ':' || state, ',' ORDER BY version) FROM kms_keys WHERE key_name = 'em'").as_deref(),
            Some("1:destroyed,2:decrypt_only,3:destroyed,4:active")
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM kms_destruction_receipts WHERE reason = 'policy'"),
            Some(2)
        );
        // Version 2 is still referenced: disabling it by hand leaves it to
        // destroy_after, which never destroys it while rows need it.
        run("SELECT kms_disable_key_version('em', 2)");
        let c = due().unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(apply(&c[0]), Outcome::Referenced(3));
        assert_eq!(
            one::<String>("SELECT state FROM kms_keys WHERE key_name = 'em' AND version = 2")
                .as_deref(),
            Some("disabled")
        );
        assert_eq!(
            one::<bool>("SELECT ok FROM kms_audit_log_check()"),
            Some(true)
        );
    }

    #[pg_test]
    fn warnings_for_rotations_due_and_overdue() {
        run("SET pg_kms.rotation_warning = '7d'");
        assert_eq!(
            one::<i32>("SELECT kms_create_key('w_due', '5 days')"),
            Some(1)
        );
        assert_eq!(
            one::<i32>("SELECT kms_create_key('w_later', '30 days')"),
            Some(1)
        );
        assert_eq!(
            one::<i32>("SELECT kms_create_key('w_over', '1 day')"),
            Some(1)
        );
        setup_key("w_none");
        run("UPDATE kms.key_versions v SET created_at = now() - interval '2 days' FROM kms.keys k WHERE k.key_id = v.key_id AND k.key_name = 'w_over'");
        assert_eq!(
            one::<String>("SELECT string_agg(severity || ':' || kind || ':' || key_name || ':' || version, ',' ORDER BY key_name) FROM kms_warnings WHERE kind LIKE 'rotation%'").as_deref(),
            Some("notice:rotation_due:w_due:1,warning:rotation_overdue:w_over:1")
        );
        assert!(
            one::<String>("SELECT message FROM kms_warnings WHERE kind = 'rotation_overdue'")
                .unwrap()
                .contains("key \"w_over\" is overdue")
        );
        let h = one::<pgrx::JsonB>("SELECT kms_health()->'warnings'")
            .unwrap()
            .0;
        assert_eq!(
            h.as_array()
                .unwrap()
                .iter()
                .filter(|w| w["kind"].as_str().unwrap().starts_with("rotation"))
                .count(),
            2
        );
        // A shorter threshold, a longer period: the notice goes away.
        run("SET pg_kms.rotation_warning = '1d'");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM kms_warnings WHERE kind = 'rotation_due'"),
            Some(0)
        );
        run("SET pg_kms.rotation_warning = '7d'");
        run("SELECT kms_alter_key('w_due', rotation_period => '60 days')");
        run("SELECT kms_rotate_key('w_over')");
        // Rotated: no longer overdue, but a 1-day period is always due
        // within a 7-day threshold.
        assert_eq!(
            one::<String>("SELECT string_agg(kind || ':' || key_name || ':' || version, ',') FROM kms_warnings WHERE kind LIKE 'rotation%'").as_deref(),
            Some("rotation_due:w_over:2")
        );
        run("SELECT kms_alter_key('w_over', clear => ARRAY['rotation_period'])");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM kms_warnings WHERE kind LIKE 'rotation%'"),
            Some(0)
        );
        // Destroyed keys are not counted in kms_health().
        run("SELECT kms_destroy_key('w_none')");
        assert_eq!(one::<i64>("SELECT (kms_health()->>'keys')::int8"), Some(3));
        assert_eq!(
            one::<i64>("SELECT (kms_health()->>'destroyed_keys')::int8"),
            Some(1)
        );
        run("CREATE ROLE w_user IN ROLE kms_user");
        assert_eq!(
            as_role("w_user", "SELECT * FROM kms_warnings").as_deref(),
            Some("42501")
        );
    }
}
