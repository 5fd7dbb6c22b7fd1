//! Privileges on real clusters: per-key grants die with their role and
//! survive a dump restored into another cluster (after an explicit,
//! audited rebind); kms_health() does not run the master-key command on
//! every call. Each test prints a one-line summary.

use pg_kms_integration::{message, poll, sqlstate, Cluster};
use postgres::Client;
use std::time::Duration;

const KEY_HINT_DECRYPT: &str =
    "Key \"k\" has per-key grants (see the kms_key_grants view); a kms_admin can allow this with kms_grant_key('k', <role>, 'decrypt').";

fn decrypt_state(db: &mut Client) -> String {
    sqlstate(db.query_one("SELECT kms_decrypt(v) FROM t", &[]))
}

fn statuses(db: &mut Client) -> Vec<String> {
    db.query(
        "SELECT grantee || ' ' || privilege || ': ' || status FROM kms_key_grants ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[test]
fn a_dropped_roles_key_grants_do_not_pass_to_a_new_role_of_the_same_name() {
    let c = Cluster::start("p_droprole", &[]);
    let mut db = c.connect();
    db.batch_execute(
        "CREATE EXTENSION pg_kms; SELECT kms_create_key('k');
         CREATE ROLE app LOGIN IN ROLE kms_user; CREATE ROLE other LOGIN IN ROLE kms_user;
         CREATE TABLE t AS SELECT kms_encrypt('hello', 'k') AS v; GRANT SELECT ON t TO kms_user;
         SELECT kms_grant_key('k', 'app', 'decrypt');",
    )
    .unwrap();
    let mut app = c.connect_as("app", "postgres");
    assert_eq!(decrypt_state(&mut app), "ok");
    drop(app);
    let mut other = c.connect_as("other", "postgres");
    assert_eq!(decrypt_state(&mut other), "42501");

    // DROP ROLE is not blocked by the grant.
    db.batch_execute("DROP ROLE app").unwrap();
    db.batch_execute("CREATE ROLE app LOGIN IN ROLE kms_user")
        .unwrap();
    let mut app = c.connect_as("app", "postgres");
    let r = app.query_one("SELECT kms_decrypt(v) FROM t", &[]);
    let msg = message(app.query_one("SELECT kms_decrypt(v) FROM t", &[]));
    assert_eq!(sqlstate(r), "42501");
    assert_eq!(
        msg,
        format!("permission denied for role app to decrypt with key \"k\" |  | {KEY_HINT_DECRYPT}")
    );
    // The key stays closed to every other kms_user as well (in a session
    // that had cached the decision before the drop, too).
    assert_eq!(decrypt_state(&mut other), "42501");
    assert_eq!(
        statuses(&mut db),
        vec!["app decrypt: stale: role dropped".to_string()]
    );
    // Rebinding concerns only grants restored from another cluster.
    assert_eq!(
        db.query_one("SELECT kms_rebind_key_grants()", &[])
            .unwrap()
            .get::<_, i64>(0),
        0
    );
    assert_eq!(decrypt_state(&mut app), "42501");
    // Granting again binds the grant to the new role.
    db.batch_execute("SELECT kms_grant_key('k', 'app', 'decrypt')")
        .unwrap();
    assert_eq!(decrypt_state(&mut app), "ok");
    println!("DROP ROLE + CREATE ROLE of a grantee: not blocked; new role of the same name: 42501 until granted again; other kms_user: 42501");
}

fn dump(c: &Cluster, db: &str, out: &std::path::Path) {
    c.pg_dump(db, &["-Fc", "-f", out.to_str().unwrap()]);
}

fn restore(c: &Cluster, db: &str, file: &std::path::Path) {
    c.connect()
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .unwrap();
    c.client(
        "pg_restore",
        db,
        &["--exit-on-error", file.to_str().unwrap()],
    );
}

fn role_oid(db: &mut Client, role: &str) -> u32 {
    db.query_one("SELECT oid FROM pg_roles WHERE rolname = $1", &[&role])
        .unwrap()
        .get(0)
}

#[test]
fn key_grants_restored_into_another_cluster_bind_by_name_after_an_audited_rebind() {
    let src = Cluster::start("p_grants_src", &[]);
    src.connect().batch_execute("CREATE DATABASE shop").unwrap();
    let mut s = src.connect_as("postgres", "shop");
    s.batch_execute(
        "CREATE EXTENSION pg_kms; SELECT kms_create_key('k');
         CREATE ROLE app LOGIN IN ROLE kms_user; CREATE ROLE other LOGIN IN ROLE kms_user;
         CREATE TABLE t AS SELECT kms_encrypt('hello', 'k') AS v; GRANT SELECT ON t TO kms_user;
         SELECT kms_grant_key('k', 'app', 'decrypt'); SELECT kms_grant_key('k', 'app', 'encrypt');",
    )
    .unwrap();
    assert_eq!(decrypt_state(&mut src.connect_as("app", "shop")), "ok");
    let src_app_oid = role_oid(&mut s, "app");
    let file = src.dir.join("shop.dump");
    dump(&src, "shop", &file);

    // Another cluster, same master key, the same role names under other oids.
    let dst = Cluster::start("p_grants_dst", &[]);
    dst.write_key(&src.read_key(), 0o600);
    dst.connect()
        .batch_execute(
            "CREATE ROLE filler1; CREATE ROLE filler2; CREATE ROLE kms_user NOLOGIN;
             CREATE ROLE app LOGIN IN ROLE kms_user; CREATE ROLE other LOGIN IN ROLE kms_user;",
        )
        .unwrap();
    restore(&dst, "shop", &file);
    let mut d = dst.connect_as("postgres", "shop");
    assert_ne!(
        role_oid(&mut d, "app"),
        src_app_oid,
        "the test needs different oids"
    );
    // Restored grants do not apply before the rebind (fail closed).
    let mut app = dst.connect_as("app", "shop");
    assert_eq!(decrypt_state(&mut app), "42501");
    let unbound = "unbound: restored from another cluster, see kms_rebind_key_grants()";
    assert_eq!(
        statuses(&mut d),
        vec![
            format!("app decrypt: {unbound}"),
            format!("app encrypt: {unbound}")
        ]
    );

    let n: i64 = d
        .query_one("SELECT kms_rebind_key_grants()", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let audited: Vec<String> = d
        .query("SELECT key_name || ': ' || reason FROM kms_audit_log WHERE operation = 'rebind_key_grant' ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        audited,
        vec![
            "k: decrypt to role app (restored from another cluster, bound by name)".to_string(),
            "k: encrypt to role app (restored from another cluster, bound by name)".to_string(),
        ]
    );
    assert!(d
        .query_one("SELECT kms_verify_audit_log()", &[])
        .unwrap()
        .get::<_, bool>(0));
    assert_eq!(
        statuses(&mut d),
        vec![
            "app decrypt: valid".to_string(),
            "app encrypt: valid".to_string()
        ]
    );
    let mut app = dst.connect_as("app", "shop");
    assert_eq!(decrypt_state(&mut app), "ok");
    assert_eq!(
        sqlstate(app.query_one("SELECT kms_encrypt('x', 'k')", &[])),
        "ok"
    );
    assert_eq!(decrypt_state(&mut dst.connect_as("other", "shop")), "42501");
    assert_eq!(
        d.query_one("SELECT kms_rebind_key_grants()", &[])
            .unwrap()
            .get::<_, i64>(0),
        0
    );
    drop(app);

    // Once bound here, a role dropped and recreated here does not inherit.
    d.batch_execute("DROP ROLE app; CREATE ROLE app LOGIN IN ROLE kms_user")
        .unwrap();
    assert_eq!(decrypt_state(&mut dst.connect_as("app", "shop")), "42501");
    assert_eq!(
        d.query_one("SELECT kms_rebind_key_grants()", &[])
            .unwrap()
            .get::<_, i64>(0),
        0
    );
    println!("dump restored into another cluster (other role oids): 42501 before kms_rebind_key_grants(), 2 grants bound by name and audited, grantee decrypts, other kms_user 42501, recreated role 42501");
}

fn runs(counter: &std::path::Path) -> usize {
    std::fs::read_to_string(counter)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn kms_health_runs_the_master_key_command_once_per_source() {
    let c = Cluster::start("p_health", &[]);
    let script = c.dir.join("keycmd.sh");
    let counter = c.dir.join("keycmd.count");
    // Counts its runs, then prints the cluster's key (generated at start).
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho run >> '{}'\ncat '{}'\n",
            counter.display(),
            c.key_file().display()
        ),
    )
    .unwrap();
    let _ = std::process::Command::new("chown")
        .arg("postgres:postgres")
        .arg(&script)
        .output();
    let set_command = |arg: &str| {
        let cmd = format!("/bin/sh {} {arg}", script.display());
        c.append_conf(&format!(
            "pg_kms.master_key_file = ''\npg_kms.master_key_command = '{cmd}'\n"
        ));
        let mut db = c.connect();
        db.batch_execute("SELECT pg_reload_conf()").unwrap();
        poll("the reload", Duration::from_secs(30), || {
            let now: String = c
                .connect()
                .query_one("SELECT current_setting('pg_kms.master_key_command')", &[])
                .unwrap()
                .get(0);
            (now == cmd).then_some(())
        });
    };
    set_command("a");
    let mut db = c.connect();
    db.batch_execute("CREATE EXTENSION pg_kms; SELECT kms_create_key('k'); CREATE ROLE aud LOGIN IN ROLE kms_auditor;").unwrap();
    assert!(runs(&counter) >= 1, "the command supplies the key");

    let before = runs(&counter);
    let mut aud = c.connect_as("aud", "postgres");
    const N: usize = 25;
    for _ in 0..N {
        let ok: bool = aud
            .query_one(
                "SELECT (kms_health()->'master_key'->>'matches_keyring')::boolean",
                &[],
            )
            .unwrap()
            .get(0);
        assert!(ok);
    }
    let first = runs(&counter) - before;
    assert_eq!(
        first, 1,
        "{N} kms_health() calls in one session ran the command {first} times"
    );

    // A reload that changes the source: the next call runs it again, once.
    let before = runs(&counter);
    set_command("b");
    poll(
        "kms_health() to read the new source",
        Duration::from_secs(30),
        || {
            aud.query_one("SELECT kms_health()", &[]).unwrap();
            (runs(&counter) > before).then_some(())
        },
    );
    for _ in 0..N {
        let ok: bool = aud
            .query_one(
                "SELECT (kms_health()->'master_key'->>'matches_keyring')::boolean",
                &[],
            )
            .unwrap()
            .get(0);
        assert!(ok);
    }
    let second = runs(&counter) - before;
    assert_eq!(
        second, 1,
        "after the reload, kms_health() ran the command {second} times"
    );
    println!("kms_health(): {N} calls ran the key command {first} time(s); after a reload changing the source, {N}+ calls ran it {second} time(s)");
}
