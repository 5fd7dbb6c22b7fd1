//! Helpers shared by the `#[pg_test]`s of every API file (each runs in a
//! transaction that is rolled back), and the test cluster's settings.

#![allow(dead_code)] // each helper is used by some of the test modules

use pgrx::prelude::*;
use std::sync::OnceLock;

/// The test cluster gets a master key generated now (never stored in the
/// repository), supplied through `pg_kms.master_key_command`.
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

pub fn run(sql: &str) {
    Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
}

pub fn one<T: FromDatum + IntoDatum>(sql: &str) -> Option<T> {
    Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// "SQLSTATE message" of the error `sql` raises, or None.
pub fn error_of(sql: &str) -> Option<String> {
    if one::<bool>("SELECT to_regprocedure('pg_temp.error_of(text)') IS NOT NULL") != Some(true) {
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
pub fn assert_sqlstate(sql: &str, code: &str) {
    match error_of(sql) {
        Some(e) => assert!(e.starts_with(code), "{sql}: expected {code}, got {e}"),
        None => panic!("{sql}: expected {code}, got success"),
    }
}

/// The SQLSTATE `sql` raises when run as `role` (None: it succeeded).
pub fn as_role(role: &str, sql: &str) -> Option<String> {
    run(&format!("SET LOCAL ROLE {role}"));
    let e = error_of(sql);
    run("RESET ROLE");
    e.map(|e| e[..5].to_string())
}

pub fn setup_key(name: &str) {
    assert_eq!(
        one::<i32>(&format!("SELECT kms_create_key('{name}')")),
        Some(1)
    );
}

/// "SQLSTATE|message|hint" of the error `sql` raises as `role` (None: it succeeded).
pub fn full_error_as(role: &str, sql: &str) -> Option<String> {
    if one::<bool>("SELECT to_regprocedure('pg_temp.error_full(text)') IS NOT NULL") != Some(true) {
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
    let e =
        Spi::get_one_with_args::<String>("SELECT pg_temp.error_full($1)", &[sql.into()]).unwrap();
    run("RESET ROLE");
    e
}

/// "SQLSTATE message | hint" of the error `sql` raises, or None.
pub fn error_with_hint(sql: &str) -> Option<String> {
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
pub fn drop_key_cache() {
    run("SELECT kms_create_key('cache_buster_' || md5(random()::text))");
}

#[track_caller]
pub fn assert_altered(sql: &str, what: &str) {
    let e = error_of(sql).unwrap_or_else(|| panic!("{sql}: expected XX001, got success"));
    assert!(
        e.starts_with("XX001 catalog row altered: ") && e.contains(what),
        "{sql}: expected XX001 naming {what}, got {e}"
    );
}

pub fn drop_key_cache_expect_altered() {
    assert_altered(
        "SELECT kms_create_key('cache_buster_x')",
        "the kms.keyring row",
    );
}

/// Any act adopts MACs; a cache-busting create is one.
pub fn drop_key_cache_expect_adoption() {
    drop_key_cache();
}

/// Makes the keyring look like one from 0.1.0 (before rows carried MACs):
/// no audit rows, no row MACs, generation 0, a keyring without
/// `integrity_since`; with `created_key`, one unkeyed `create_key` row of
/// that key (hashed by `kms.audit_row_hash`). Leaves the append-only
/// triggers of `kms.audit_log` disabled: the caller enables them again.
pub fn make_keyring_unkeyed(created_key: Option<&str>) {
    run("ALTER TABLE kms.audit_log DISABLE TRIGGER USER");
    run("DELETE FROM kms.audit_log");
    run("DELETE FROM kms.audit_head");
    run("UPDATE kms.keys SET row_mac = NULL, generation = 0");
    run("UPDATE kms.key_versions SET row_mac = NULL");
    run("UPDATE kms.keyring SET integrity_since = NULL, row_mac = NULL");
    if let Some(k) = created_key {
        run(&format!(
            r#"INSERT INTO kms.audit_log (id, at, actor, operation, key_name, version, reason, prev_hash, hash)
               SELECT 1, t, 'dba', 'create_key', '{k}', 1, NULL, z, kms.audit_row_hash(z, 1, t, 'dba', 'create_key', '{k}', 1, NULL)
                 FROM (SELECT now() AS t, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea AS z) s"#
        ));
    }
}
