//! The access audit (issue 16 point 1) on real clusters started with
//! `shared_preload_libraries = 'pg_kms'`: every use of a key is counted
//! per (session user, current user, key, version, operation) and appended
//! by the worker to `kms.access_log`, exactly, across sessions, `SET ROLE`
//! and `SECURITY DEFINER` functions; a crash loses at most the counts of
//! the last interval. Waiting is polling with deadlines.

use pg_kms_integration::{poll, sqlstate, Cluster};
use postgres::Client;
use std::collections::BTreeMap;
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(120);

/// (actor, role, key, version, operation) -> uses.
type Counts = BTreeMap<(String, String, String, Option<i32>, String), i64>;

fn logged(db: &mut Client, actors: &[&str]) -> Counts {
    let actors: Vec<String> = actors.iter().map(|a| a.to_string()).collect();
    db.query(
        "SELECT actor, role, key_name, version, operation, sum(count)::int8
           FROM kms_access_log WHERE actor = ANY($1)
          GROUP BY 1, 2, 3, 4, 5",
        &[&actors],
    )
    .unwrap()
    .iter()
    .map(|r| ((r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)), r.get(5)))
    .collect()
}

/// (actor, role, key, version, operation, uses).
type Row<'a> = (&'a str, &'a str, &'a str, Option<i32>, &'a str, i64);

fn expect(rows: &[Row<'_>]) -> Counts {
    rows.iter()
        .map(|&(a, r, k, v, op, n)| ((a.into(), r.into(), k.into(), v, op.into()), n))
        .collect()
}

/// Waits until the log shows exactly `want` for `actors`, then checks that
/// it stays so for a few more intervals (nothing counted twice).
fn wait_for(c: &Cluster, actors: &[&str], want: &Counts) {
    let mut last = Counts::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        poll("the access log to show the uses", CONVERGE, || {
            last = logged(&mut c.connect(), actors);
            (last == *want).then_some(())
        })
    }));
    assert!(r.is_ok(), "access log {last:#?}\nwanted {want:#?}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(&logged(&mut c.connect(), actors), want, "counted twice");
}

fn preloaded(name: &str, interval: &str) -> Cluster {
    Cluster::start(
        name,
        &[
            "shared_preload_libraries = 'pg_kms'",
            "pg_kms.reencrypt_naptime = '200ms'",
            // The worker must not rewrap what the sessions rewrap.
            "pg_kms.reencrypt_enabled = off",
            &format!("pg_kms.access_audit_interval = '{interval}'"),
        ],
    )
}

#[test]
fn uses_are_counted_exactly_per_role_key_version_and_operation() {
    let c = preloaded("acc_counts", "200ms");
    let mut pg = c.connect();
    pg.batch_execute(
        "CREATE EXTENSION pg_kms;
         SELECT kms_create_key('pii'); SELECT kms_create_key('aux'); SELECT kms_create_key('sec');
         CREATE ROLE alice LOGIN IN ROLE kms_user;
         CREATE ROLE bob LOGIN IN ROLE kms_user;
         CREATE ROLE carol IN ROLE kms_user;
         CREATE ROLE eve LOGIN IN ROLE kms_auditor;
         GRANT bob TO alice;
         CREATE TABLE t (id int PRIMARY KEY, a encrypted_text, b encrypted_text, c encrypted_text);
         INSERT INTO t SELECT g, kms_encrypt('a' || g, 'pii'), kms_encrypt('b' || g, 'pii'), kms_encrypt('c' || g, 'aux')
           FROM generate_series(1, 10) g;
         GRANT SELECT ON t TO alice, bob;
         CREATE FUNCTION peek(x encrypted_text) RETURNS text SECURITY DEFINER
           LANGUAGE sql SET search_path = public, pg_temp AS 'SELECT kms_decrypt(x)';
         ALTER FUNCTION peek(encrypted_text) OWNER TO carol;
         SELECT kms_secret_set('api', 'token', 'sec');
         SELECT kms_grant_key('sec', 'bob', 'decrypt');",
    )
    .unwrap();

    let mut alice = c.connect_as("alice", "postgres");
    let three =
        "SELECT count(kms_decrypt(a)) + count(kms_decrypt(b)) + count(kms_decrypt(c)) FROM t";
    for _ in 0..3 {
        alice.batch_execute(three).unwrap();
    }
    // Rolled back: the values were still opened, and are counted.
    alice
        .batch_execute("BEGIN; SELECT count(kms_decrypt(a)) FROM t; ROLLBACK;")
        .unwrap();
    alice
        .batch_execute("SET ROLE bob; SELECT count(kms_decrypt(a)) FROM t; RESET ROLE;")
        .unwrap();
    // Both pairs in one transaction.
    alice
        .batch_execute(
            "BEGIN; SELECT count(kms_decrypt(a)) FROM t;
             SET LOCAL ROLE bob; SELECT count(kms_decrypt(a)) FROM t WHERE id <= 5; COMMIT;",
        )
        .unwrap();

    let mut bob = c.connect_as("bob", "postgres");
    // The role switches on every row: peek() runs as carol.
    bob.batch_execute("SELECT count(peek(a)) + count(kms_decrypt(b)) FROM t")
        .unwrap();
    for _ in 0..3 {
        bob.batch_execute("SELECT kms_blind_index('x', 'pii')")
            .unwrap();
    }
    bob.batch_execute("SELECT count(kms_encrypt('v' || g, 'aux')) FROM generate_series(1, 7) g")
        .unwrap();
    pg.batch_execute("SELECT kms_rotate_key('aux')").unwrap();
    // A rewrap is one use of the version it opens (not a decryption plus
    // an encryption).
    bob.batch_execute("SELECT count(kms_rewrap(c)) FROM t")
        .unwrap();
    for _ in 0..2 {
        bob.batch_execute("SELECT kms_secret_get('api')").unwrap();
    }

    let want = expect(&[
        (
            "alice",
            "alice",
            "pii",
            Some(1),
            "decrypt",
            3 * 20 + 10 + 10,
        ),
        ("alice", "alice", "aux", Some(1), "decrypt", 3 * 10),
        ("alice", "bob", "pii", Some(1), "decrypt", 10 + 5),
        ("bob", "carol", "pii", Some(1), "decrypt", 10),
        ("bob", "bob", "pii", Some(1), "decrypt", 10),
        ("bob", "bob", "pii", None, "blind_index", 3),
        ("bob", "bob", "aux", Some(1), "encrypt", 7),
        ("bob", "bob", "aux", Some(1), "rewrap", 10),
        ("bob", "bob", "sec", Some(1), "secret_read", 2),
    ]);
    wait_for(&c, &["alice", "bob"], &want);

    // The secret was read as the catalog owner for bob: no decryption of
    // 'sec' is logged for anyone, and the superuser's own uses are there.
    let mut pg = c.connect();
    let sec_decrypts: i64 = pg
        .query_one(
            "SELECT count(*) FROM kms_access_log WHERE key_name = 'sec' AND operation = 'decrypt'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(sec_decrypts, 0);
    let pg_encrypts: i64 = pg
        .query_one(
            "SELECT coalesce(sum(count), 0)::int8 FROM kms_access_log
              WHERE actor = 'postgres' AND role = 'postgres' AND key_name = 'pii' AND operation = 'encrypt'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(pg_encrypts, 20);
    // Chained and keyed; first_at <= last_at; oids next to names.
    let (ok, rows, problem): (bool, i64, Option<String>) = {
        let r = pg
            .query_one(
                "SELECT ok, rows_checked, problem FROM kms_access_log_check()",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert!(ok && rows > 0, "{problem:?}");
    let odd: i64 = pg
        .query_one(
            "SELECT count(*) FROM kms_access_log l
              WHERE l.first_at > l.last_at OR l.actor_oid <> l.actor::regrole::oid OR l.role_oid <> l.role::regrole::oid",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(odd, 0);
    // Append-only.
    assert_eq!(
        sqlstate(pg.batch_execute("UPDATE kms.access_log SET count = 1")),
        "42501"
    );
    assert_eq!(
        sqlstate(pg.batch_execute("DELETE FROM kms.access_log")),
        "42501"
    );
    // Readable by kms_auditor and kms_admin only.
    assert_eq!(
        sqlstate(alice.query("SELECT * FROM kms_access_log", &[])),
        "42501"
    );
    let mut eve = c.connect_as("eve", "postgres");
    assert!(!eve
        .query("SELECT * FROM kms_access_log", &[])
        .unwrap()
        .is_empty());
    assert!(eve
        .query_one("SELECT ok FROM kms_access_log_check()", &[])
        .unwrap()
        .get::<_, bool>(0));
    // Health.
    let r = pg
        .query_one(
            "SELECT (h->>'enabled')::bool, (h->>'preloaded')::bool, (h->>'entries_dropped')::int8, h::text
               FROM (SELECT kms_health() -> 'access_audit' AS h) s",
            &[],
        )
        .unwrap();
    let h: String = r.get(3);
    assert!(r.get::<_, bool>(0), "{h}");
    assert!(r.get::<_, bool>(1), "{h}");
    assert_eq!(r.get::<_, i64>(2), 0, "{h}");

    // A forged count is caught (the MAC is keyed by the master key). The
    // row forged is one of postgres's (the setup's), outside the counts
    // compared below: which row has which id depends on when the worker
    // appended.
    let forged: i64 = pg
        .query_one(
            "SELECT min(id) FROM kms.access_log WHERE actor = 'postgres'",
            &[],
        )
        .unwrap()
        .get(0);
    pg.batch_execute(&format!(
        "ALTER TABLE kms.access_log DISABLE TRIGGER USER;
         UPDATE kms.access_log SET count = count + 1 WHERE id = {forged};
         ALTER TABLE kms.access_log ENABLE TRIGGER USER;"
    ))
    .unwrap();
    let r = pg
        .query_one("SELECT ok, first_bad_id FROM kms_access_log_check()", &[])
        .unwrap();
    assert!(!r.get::<_, bool>(0));
    assert_eq!(r.get::<_, Option<i64>>(1), Some(forged));

    // Off: nothing more is counted.
    pg.batch_execute("ALTER SYSTEM SET pg_kms.access_audit = off")
        .unwrap();
    c.reload_and_wait("pg_kms.access_audit", "off");
    let mut alice = c.connect_as("alice", "postgres");
    alice.batch_execute(three).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(logged(&mut c.connect(), &["alice", "bob"]), want);
}

fn kill9(pid: i32) {
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// A crash (of a backend, then of the worker) empties shared memory: the
/// counts handed over since the last append are lost, nothing else; the
/// chain stays whole and logging goes on.
#[test]
fn a_crash_loses_at_most_the_last_interval() {
    let c = preloaded("acc_crash", "200ms");
    let mut pg = c.connect();
    pg.batch_execute(
        "CREATE EXTENSION pg_kms; SELECT kms_create_key('pii');
         CREATE ROLE alice LOGIN IN ROLE kms_user;
         CREATE TABLE t (id int PRIMARY KEY, a encrypted_text);
         INSERT INTO t SELECT g, kms_encrypt('a' || g, 'pii') FROM generate_series(1, 10) g;
         GRANT SELECT ON t TO alice;",
    )
    .unwrap();
    let decrypt = |n: i32| {
        c.connect_as("alice", "postgres")
            .batch_execute(&format!(
                "SELECT count(kms_decrypt(a)) FROM t WHERE id <= {n}"
            ))
            .unwrap();
    };
    let alice = |n: i64| expect(&[("alice", "alice", "pii", Some(1), "decrypt", n)]);
    decrypt(10);
    wait_for(&c, &["alice"], &alice(10));

    for victim in [
        "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND application_name = 'victim'",
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_kms worker'",
    ] {
        // A long interval: what is used now waits in shared memory.
        c.connect()
            .batch_execute("ALTER SYSTEM SET pg_kms.access_audit_interval = '1h'")
            .unwrap();
        c.reload_and_wait("pg_kms.access_audit_interval", "1h");
        // Let the worker take the new interval (its next loop).
        std::thread::sleep(Duration::from_millis(1000));
        let before = logged(&mut c.connect(), &["alice"]);
        decrypt(7);
        let mut victim_db = c.connect();
        victim_db
            .batch_execute("SET application_name = 'victim'")
            .unwrap();
        let pid = poll("the process to crash", CONVERGE, || {
            c.connect().query_opt(victim, &[]).ok()?.map(|r| r.get::<_, i32>(0))
        });
        kill9(pid);
        // The postmaster reinitialises shared memory; wait for it.
        poll("the server after the crash", CONVERGE, || {
            let mut db = postgres::Client::connect(&c.conninfo("postgres", "postgres"), postgres::NoTls).ok()?;
            db.query_one("SELECT 1", &[]).ok().map(|_| ())
        });
        c.connect()
            .batch_execute("ALTER SYSTEM SET pg_kms.access_audit_interval = '200ms'")
            .unwrap();
        c.reload_and_wait("pg_kms.access_audit_interval", "200ms");
        let kept = before.values().sum::<i64>();
        decrypt(5);
        // The 7 uses of the crashed interval are lost; the 5 after are not.
        wait_for(&c, &["alice"], &alice(kept + 5));
        let ok: bool = c
            .connect()
            .query_one("SELECT ok FROM kms_access_log_check()", &[])
            .unwrap()
            .get(0);
        assert!(ok, "the chain is whole after the crash");
    }
}
