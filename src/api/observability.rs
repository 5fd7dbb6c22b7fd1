//! What auditors and operators read: the audit log checks, the health
//! report and the usage counters.

use pgrx::prelude::*;

#[pg_extern(stable, parallel_restricted)]
fn kms_verify_audit_log() -> bool {
    crate::lifecycle::verify_audit_log()
}

/// The whole audit chain checked under the master key configured now:
/// `ok`, the number of rows, the first row that fails and why, and the
/// chain's head (compare it with the last "pg_kms: audit chain head" line
/// of the server log).
// The result's shape must be spelled out in the signature (pgrx reads the
// column names from it).
#[allow(clippy::type_complexity)]
#[pg_extern(stable, parallel_restricted)]
fn kms_audit_log_check() -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(rows_checked, i64),
        name!(first_bad_id, Option<i64>),
        name!(problem, Option<String>),
        name!(head_id, Option<i64>),
        name!(head_mac, Option<String>),
    ),
> {
    let c = crate::lifecycle::audit_log_check();
    TableIterator::once((
        c.problem.is_none(),
        c.rows,
        c.first_bad,
        c.problem,
        c.head_id,
        c.head_mac,
    ))
}

/// The access log's chain checked under the master key configured now
/// (kms.access_log: who used which key; see `kms_access_log`).
#[allow(clippy::type_complexity)]
#[pg_extern(stable, parallel_restricted)]
fn kms_access_log_check() -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(rows_checked, i64),
        name!(first_bad_id, Option<i64>),
        name!(problem, Option<String>),
        name!(head_id, Option<i64>),
        name!(head_mac, Option<String>),
    ),
> {
    use crate::errors::OrRaise;
    let c = crate::catalog::as_catalog_owner(|_| crate::keys::access_log::check_access_log())
        .or_raise();
    TableIterator::once((
        c.problem.is_none(),
        c.rows,
        c.first_bad,
        c.problem,
        c.head_id,
        c.head_mac,
    ))
}

/// Configuration and keyring health, without any key material.
#[pg_extern(volatile, parallel_safe)]
fn kms_health() -> pgrx::JsonB {
    crate::lifecycle::health()
}

/// Encryptions and decryptions per key version of this database since
/// server start (shared memory; empty without shared_preload_libraries).
/// Counters only; read through the `kms_stats` view.
#[pg_extern(volatile, parallel_restricted)]
fn kms_stats_counters() -> TableIterator<
    'static,
    (
        name!(key_id, i32),
        name!(version, i32),
        name!(encryptions, i64),
        name!(decryptions, i64),
    ),
> {
    TableIterator::new(crate::keys::usage::counters_of_this_db())
}

/// What needs attention now, one row per warning; read through the
/// `kms_warnings` view (the same list is `kms_health()->'warnings'`).
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_restricted)]
fn kms_warnings_list() -> TableIterator<
    'static,
    (
        name!(severity, String),
        name!(kind, String),
        name!(key_name, Option<String>),
        name!(version, Option<i32>),
        name!(table_name, Option<String>),
        name!(column_name, Option<String>),
        name!(message, String),
        name!(hint, Option<String>),
    ),
> {
    TableIterator::new(crate::lifecycle::warnings().into_iter().map(|w| {
        (
            w.severity.to_string(),
            w.kind.to_string(),
            w.key_name,
            w.version,
            w.table_name,
            w.column_name,
            w.message,
            w.hint,
        )
    }))
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::api::test_support::*;
    use pgrx::prelude::*;

    /// The access log within one transaction (the counts themselves reach
    /// the log only across transactions, through shared memory and the
    /// worker: pgrx_tests/tests/access_audit.rs): its check, its
    /// append-only trigger, and kms_health's account of it.
    #[pg_test]
    fn access_log_check_and_append_only() {
        setup_key("pii");
        run("SELECT kms_decrypt(kms_encrypt('x', 'pii'))");
        assert_eq!(
            one::<String>("SELECT ok || ':' || rows_checked || ':' || coalesce(first_bad_id::text, '-') FROM kms_access_log_check()").as_deref(),
            Some("true:0:-")
        );
        assert_eq!(
            one::<bool>("SELECT (h->>'enabled')::bool = (h->>'preloaded')::bool AND (h->>'preloaded')::bool = (kms_health()->>'preloaded')::bool
                           FROM (SELECT kms_health()->'access_audit' AS h) s"),
            Some(true)
        );
        if one::<bool>("SELECT (kms_health()->>'preloaded')::bool") == Some(false) {
            assert!(
                one::<String>("SELECT kms_health()->'access_audit'->>'reason'")
                    .unwrap()
                    .contains("shared_preload_libraries")
            );
        }
        // A row written behind pg_kms's back does not chain.
        run(
            r"INSERT INTO kms.access_log VALUES (1, now(), 10, 'postgres', 10, 'postgres', 1, 'pii', 1,
                 'decrypt', 5, now(), now(), '\x00', '\x00', '\x00', '\x00')",
        );
        assert_eq!(
            one::<String>("SELECT ok || ':' || first_bad_id FROM kms_access_log_check()")
                .as_deref(),
            Some("false:1")
        );
        for q in [
            "UPDATE kms.access_log SET count = 6",
            "DELETE FROM kms.access_log",
            "TRUNCATE kms.access_log",
        ] {
            let e = error_of(q).unwrap_or_default();
            assert!(
                e.starts_with("42501 the pg_kms access log is append-only"),
                "{q}: {e}"
            );
        }
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

    /// `actor` is session_user, `role` current_user (after SET ROLE, in a
    /// SECURITY DEFINER function), and the chain covers `role`.
    #[pg_test]
    fn audit_records_current_user() {
        setup_key("ra");
        run("CREATE ROLE kt_sec_admin IN ROLE kms_admin");
        run("SET LOCAL ROLE kt_sec_admin");
        run("SELECT kms_rotate_key('ra', 'as sec admin')");
        run("RESET ROLE");
        run("CREATE ROLE kt_definer IN ROLE kms_admin");
        run("CREATE ROLE kt_caller");
        run("CREATE FUNCTION public.kt_rotate_ra() RETURNS int LANGUAGE sql SECURITY DEFINER AS $$ SELECT kms_rotate_key('ra', 'definer') $$");
        run("ALTER FUNCTION public.kt_rotate_ra() OWNER TO kt_definer");
        run("SET LOCAL ROLE kt_caller");
        run("SELECT public.kt_rotate_ra()");
        run("RESET ROLE");
        let me = one::<String>("SELECT session_user::text").unwrap();
        assert_eq!(
            one::<String>("SELECT string_agg(operation || ':' || actor || ':' || role, ',' ORDER BY id) FROM kms_audit_log").as_deref(),
            Some(format!("create_key:{me}:{me},rotate_key:{me}:kt_sec_admin,rotate_key:{me}:kt_definer").as_str())
        );
        assert_eq!(
            one::<bool>("SELECT ok FROM kms_audit_log_check()"),
            Some(true)
        );
        // Editing or removing the role of a row breaks its hash.
        run("ALTER TABLE kms.audit_log DISABLE TRIGGER USER");
        run("UPDATE kms.audit_log SET role = 'someone_else' WHERE id = 2");
        assert_eq!(
            one::<String>("SELECT first_bad_id || ' ' || problem FROM kms_audit_log_check()")
                .as_deref(),
            Some("2 row 2: hash does not match the row's content")
        );
        run("UPDATE kms.audit_log SET role = NULL WHERE id = 2");
        assert_eq!(
            one::<i64>("SELECT first_bad_id FROM kms_audit_log_check()"),
            Some(2)
        );
        run("UPDATE kms.audit_log SET role = 'kt_sec_admin' WHERE id = 2");
        assert_eq!(one::<bool>("SELECT kms_verify_audit_log()"), Some(true));
        run("ALTER TABLE kms.audit_log ENABLE TRIGGER USER");
        // A reason longer than a NOTIFY payload may be: the act still works,
        // the row keeps the whole reason (the payload a cut one).
        run("SELECT kms_rotate_key('ra', repeat('long reason ', 2000))");
        assert_eq!(
            one::<i32>("SELECT length(reason) FROM kms_audit_log ORDER BY id DESC LIMIT 1"),
            Some(24000)
        );
    }

    /// kms_audit_log_check() names the first bad row and why, for each way
    /// of tampering with the chain that leaves the catalog rows alone.
    #[pg_test]
    fn audit_log_check_names_each_tamper_kind() {
        setup_key("tk");
        for _ in 0..4 {
            run("SELECT kms_rotate_key('tk', 'r')");
        }
        run("CREATE TEMP TABLE saved_log AS SELECT * FROM kms.audit_log");
        run("CREATE TEMP TABLE saved_head AS SELECT * FROM kms.audit_head");
        run("CREATE TEMP TABLE saved_keyring AS SELECT * FROM kms.keyring");
        run("ALTER TABLE kms.audit_log DISABLE TRIGGER USER");
        let restore = || {
            run("DELETE FROM kms.audit_log");
            run("INSERT INTO kms.audit_log SELECT * FROM saved_log");
            run("DELETE FROM kms.audit_head");
            run("INSERT INTO kms.audit_head SELECT * FROM saved_head");
            run("DELETE FROM kms.keyring");
            run("INSERT INTO kms.keyring SELECT * FROM saved_keyring");
            assert_eq!(
                one::<bool>("SELECT ok FROM kms_audit_log_check()"),
                Some(true)
            );
        };
        let check = || {
            one::<String>("SELECT ok || ' ' || coalesce(first_bad_id::text, '-') || ' ' || problem FROM kms_audit_log_check()")
                .unwrap_or_default()
        };
        restore();
        for (tamper, expect) in [
            (
                "UPDATE kms.audit_log SET reason = 'other' WHERE id = 3",
                "false 3 row 3: hash does not match the row's content",
            ),
            (
                "UPDATE kms.audit_log SET role = 'intruder' WHERE id = 4",
                "false 4 row 4: hash does not match the row's content",
            ),
            (
                "DELETE FROM kms.audit_log WHERE id = 2",
                "false 2 row 2: missing (the next row is 3)",
            ),
            (
                "UPDATE kms.audit_log SET id = -id WHERE id IN (2, 3); UPDATE kms.audit_log SET id = CASE id WHEN -2 THEN 3 ELSE 2 END WHERE id < 0",
                "false 2 row 2: prev_hash is not the hash of the row before it: rows were removed, inserted or reordered",
            ),
            (
                "UPDATE kms.audit_log SET mac = NULL WHERE id = 3",
                "false 3 row 3: an unkeyed row after keyed rows",
            ),
            (
                "UPDATE kms.audit_log SET key_fp = NULL WHERE id = 3",
                "false 3 row 3: a keyed row without the fingerprint of its master key",
            ),
            (
                "UPDATE kms.audit_log SET mac = sha256(mac) WHERE id = 3",
                "false 3 row 3: its MAC does not verify under the master key: the row was altered or forged",
            ),
            (
                "DELETE FROM kms.audit_log WHERE id = 5",
                "false 5 row 5: kms.audit_head names row 5 but the log ends at row 4",
            ),
            (
                "UPDATE kms.keyring SET integrity_since = NULL, row_mac = NULL",
                "false 5 row 5: the chain is keyed but the kms.keyring row says rows carry no MACs: the keyring row was edited",
            ),
            (
                "DELETE FROM kms.audit_log; DELETE FROM kms.audit_head",
                "false 1 row 1: the audit log is empty although the keyring's rows carry MACs: rows were removed",
            ),
        ] {
            run(tamper);
            assert_eq!(check(), expect, "{tamper}");
            restore();
        }
    }

    /// Rows made before the chain was keyed (0.1.0) have no role: one there
    /// was added. A secret read is an act: on such a keyring it adopts MACs
    /// first, as any act does.
    #[pg_test]
    fn unkeyed_rows_carry_no_role_and_a_secret_read_adopts() {
        setup_key("u1");
        run("SELECT kms_secret_set('u/s', 'uval', key_name => 'u1')");
        // Make it look like a 0.1.0 keyring with one unkeyed audit row.
        make_keyring_unkeyed(Some("u1"));
        assert_eq!(
            one::<bool>("SELECT ok FROM kms_audit_log_check()"),
            Some(true)
        );
        run("UPDATE kms.audit_log SET role = 'someone' WHERE id = 1");
        assert_eq!(
            one::<String>("SELECT first_bad_id || ' ' || problem FROM kms_audit_log_check()").as_deref(),
            Some("1 row 1: an unkeyed row records a role (rows made before the chain was keyed have none)")
        );
        assert_eq!(one::<bool>("SELECT kms_verify_audit_log()"), Some(false));
        run("UPDATE kms.audit_log SET role = NULL WHERE id = 1");
        run("ALTER TABLE kms.audit_log ENABLE TRIGGER USER");
        assert_eq!(
            one::<String>("SELECT kms_secret_get('u/s')").as_deref(),
            Some("uval")
        );
        let me = one::<String>("SELECT session_user::text").unwrap();
        assert_eq!(
            one::<String>("SELECT string_agg(operation || ':' || coalesce(role, '-'), ',' ORDER BY id) FROM kms_audit_log").as_deref(),
            Some(format!("create_key:-,adopt_integrity:{me},secret_read:{me}").as_str())
        );
        assert_eq!(
            one::<bool>("SELECT ok FROM kms_audit_log_check()"),
            Some(true)
        );
    }
}
