//! The background re-encryption worker on real clusters started with
//! `shared_preload_libraries = 'pg_kms'`. Waiting is polling with deadlines.

use pg_kms_integration::{pairs, poll, sqlstate, Cluster};
use postgres::Client;
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

const CONVERGE: Duration = Duration::from_secs(180);

fn preloaded(name: &str, extra: &[&str]) -> (Cluster, Client) {
    let mut conf = vec![
        "shared_preload_libraries = 'pg_kms'",
        "pg_kms.reencrypt_naptime = '200ms'",
    ];
    conf.extend_from_slice(extra);
    let c = Cluster::start(name, &conf);
    let mut db = c.connect();
    db.batch_execute("CREATE EXTENSION pg_kms; SELECT kms_create_key('pii');")
        .unwrap();
    (c, db)
}

/// md5 over every plaintext of the three test columns, in id order.
fn plaintext_hash(db: &mut Client) -> String {
    db.query_one(
        "SELECT md5(string_agg(kms_decrypt(a) || '|' || kms_decrypt(b), ',' ORDER BY id)) ||
                (SELECT md5(string_agg(kms_decrypt(c), ',' ORDER BY id)) FROM t2)
           FROM t1",
        &[],
    )
    .unwrap()
    .get(0)
}

fn make_tables(db: &mut Client, rows: i32) {
    db.batch_execute(&format!(
        "CREATE TABLE t1 (id int PRIMARY KEY, a encrypted_text, b encrypted_text, note text);
         CREATE TABLE t2 (id int PRIMARY KEY, c encrypted_text);
         INSERT INTO t1 SELECT g, kms_encrypt('user' || g || '@example.com', 'pii'),
                               kms_encrypt(lpad(g::text, 9, '0'), 'pii'), 'n' FROM generate_series(1, {half}) g;
         INSERT INTO t2 SELECT g, kms_encrypt(repeat('address ' || g, 10), 'pii') FROM generate_series(1, {half}) g;",
        half = rows / 2
    ))
    .unwrap();
}

/// Rows still sealed under a non-primary version, over the three columns.
fn old_rows(db: &mut Client) -> i64 {
    db.query_one(
        "SELECT (SELECT count(*) FROM t1 WHERE kms_key_version(a) <> 2 OR kms_key_version(b) <> 2)
              + (SELECT count(*) FROM t2 WHERE kms_key_version(c) <> 2)",
        &[],
    )
    .unwrap()
    .get(0)
}

fn wait_converged(c: &Cluster, what: &str) {
    poll(what, CONVERGE, || {
        let mut db = c.connect();
        let pending: i64 = db
            .query_one(
                "SELECT coalesce(sum(rows_pending), -1)::bigint FROM kms_reencryption_progress",
                &[],
            )
            .ok()?
            .get(0);
        (pending == 0 && old_rows(&mut db) == 0).then_some(())
    });
}

/// The pid of this database's worker; asserts there is never more than one.
fn worker_pid(db: &mut Client) -> Option<i32> {
    let rows = db
        .query("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_kms worker' AND datname = current_database()", &[])
        .ok()?;
    assert!(rows.len() <= 1, "{} workers serve one database", rows.len());
    rows.first().map(|r| r.get(0))
}

#[test]
fn worker_converges_on_200k_rows_and_nothing_changes() {
    let (c, mut db) = preloaded("w_converge", &["pg_kms.reencrypt_max_rows_per_second = 0"]);
    make_tables(&mut db, 200_000);
    db.batch_execute(
        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.note := 'touched'; RETURN NEW; END $$;
         CREATE TRIGGER touch BEFORE UPDATE ON t1 FOR EACH ROW EXECUTE FUNCTION touch();",
    )
    .unwrap();
    let before = plaintext_hash(&mut db);
    let t = Instant::now();
    db.execute("SELECT kms_rotate_key('pii')", &[]).unwrap();
    wait_converged(&c, "the worker to rewrap 300k values");
    let secs = t.elapsed().as_secs_f64();
    println!("worker rewrapped 300000 values (200000 rows, 3 columns) in {secs:.1} s");
    assert_eq!(plaintext_hash(&mut db), before, "plaintext changed");
    let usage: Vec<(i32, i64)> = pairs(&mut db, "SELECT version, rows FROM kms_key_usage('pii')");
    assert_eq!(usage, vec![(1, 0), (2, 300_000)]);
    let done: i64 = db
        .query_one(
            "SELECT count(*) FROM kms_reencryption_progress
              WHERE finished_at IS NOT NULL AND last_error IS NULL AND table_name::text IN ('t1', 't2')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(done, 3);
    // Now safe to destroy, without force.
    db.execute("SELECT kms_destroy_key_version('pii', 1)", &[])
        .unwrap();
    // Done: the worker now sleeps instead of spinning (CPU over 3 s < 10%).
    let pid = worker_pid(&mut db).expect("worker");
    let cpu = |pid: i32| -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
    };
    let (c0, t0) = (cpu(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let busy = (cpu(pid) - c0) / t0.elapsed().as_secs_f64();
    println!("idle worker CPU: {:.1}%", busy * 100.0);
    assert!(busy < 0.10, "an idle worker uses {:.0}% CPU", busy * 100.0);
    // Rewrapping is not a logical change: no application trigger fired.
    let notes: i64 = db
        .query_one("SELECT count(*) FROM t1 WHERE note <> 'n'", &[])
        .unwrap()
        .get(0);
    assert_eq!(notes, 0);
}

#[test]
fn concurrent_application_updates_always_win() {
    let (c, mut db) = preloaded(
        "w_concurrent",
        &[
            "pg_kms.reencrypt_max_rows_per_second = 20000",
            "pg_kms.reencrypt_batch_size = 500",
        ],
    );
    make_tables(&mut db, 60_000);
    db.execute("SELECT kms_rotate_key('pii')", &[]).unwrap();
    let mut app = c.connect();
    let mut expected: HashMap<i32, String> = HashMap::new();
    let mut n = 0u64;
    let deadline = Instant::now() + CONVERGE;
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    loop {
        // Random rows (xorshift), updated by "the application" while the worker runs.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let id = (seed % 30_000) as i32 + 1;
        n += 1;
        let v = format!("updated-{n}");
        app.execute(
            "UPDATE t1 SET a = kms_encrypt($2, 'pii') WHERE id = $1",
            &[&id, &v],
        )
        .unwrap();
        expected.insert(id, v);
        if n.is_multiple_of(200) {
            let pending: i64 = app
                .query_one(
                    "SELECT coalesce(sum(rows_pending), -1)::bigint FROM kms_reencryption_progress",
                    &[],
                )
                .unwrap()
                .get(0);
            if pending == 0 && old_rows(&mut app) == 0 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no convergence");
    }
    println!("{n} application updates ran during re-encryption");
    assert!(n >= 200);
    for (id, v) in &expected {
        let got: String = db
            .query_one("SELECT kms_decrypt(a) FROM t1 WHERE id = $1", &[id])
            .unwrap()
            .get(0);
        assert_eq!(&got, v, "row {id}: an application update was lost");
    }
    let untouched: i64 = db
        .query_one(
            "SELECT count(*) FROM t1 WHERE NOT (id = ANY($1)) AND kms_decrypt(a) <> 'user' || id || '@example.com'",
            &[&expected.keys().copied().collect::<Vec<i32>>()],
        )
        .unwrap()
        .get(0);
    assert_eq!(untouched, 0);
}

#[test]
fn worker_survives_kill_9_and_immediate_shutdown() {
    let (c, mut db) = preloaded(
        "w_crash",
        &[
            "pg_kms.reencrypt_max_rows_per_second = 30000",
            "pg_kms.reencrypt_batch_size = 1000",
        ],
    );
    make_tables(&mut db, 200_000);
    let before = plaintext_hash(&mut db);
    db.execute("SELECT kms_rotate_key('pii')", &[]).unwrap();
    // Mid-run: some rows done, many left.
    let pid = poll("the worker to make progress", CONVERGE, || {
        let done: i64 = db
            .query_one(
                "SELECT coalesce(sum(rows_rewrapped), 0)::bigint FROM kms_reencryption_progress",
                &[],
            )
            .ok()?
            .get(0);
        (done >= 20_000).then(|| worker_pid(&mut db)).flatten()
    });
    assert!(Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success());
    drop(db);
    // The postmaster treats it as a crash and restarts; the worker comes back.
    wait_converged(&c, "convergence after kill -9 of the worker");
    let mut db = c.connect();
    assert_eq!(
        plaintext_hash(&mut db),
        before,
        "kill -9: plaintext changed"
    );

    // Again, with an immediate shutdown of the whole server mid-run.
    db.execute("SELECT kms_rotate_key('pii')", &[]).unwrap();
    poll("progress on version 3", CONVERGE, || {
        let n: i64 = db
            .query_one("SELECT count(*) FROM t2 WHERE kms_key_version(c) = 3", &[])
            .ok()?
            .get(0);
        (n >= 10_000).then_some(())
    });
    drop(db);
    c.restart_immediate();
    poll("convergence after immediate shutdown", CONVERGE, || {
        let mut db = c.connect();
        let old: i64 = db
            .query_one(
                "SELECT (SELECT count(*) FROM t1 WHERE kms_key_version(a) <> 3 OR kms_key_version(b) <> 3)
                      + (SELECT count(*) FROM t2 WHERE kms_key_version(c) <> 3)",
                &[],
            )
            .ok()?
            .get(0);
        (old == 0).then_some(())
    });
    let mut db = c.connect();
    assert_eq!(
        plaintext_hash(&mut db),
        before,
        "immediate shutdown: plaintext changed"
    );
}

fn set_conf(db: &mut Client, name: &str, value: &str) {
    db.batch_execute(&format!("ALTER SYSTEM SET {name} = {value}"))
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
}

fn rewrapped(db: &mut Client) -> i64 {
    db.query_one(
        "SELECT coalesce(sum(rows_rewrapped), 0)::bigint FROM kms_reencryption_progress",
        &[],
    )
    .unwrap()
    .get(0)
}

/// Rows per second over a window of `secs` (a measurement, not a wait).
fn measure_rate(db: &mut Client, secs: f64) -> f64 {
    let (n0, t0) = (rewrapped(db), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (n1, t1) = (rewrapped(db), Instant::now());
    (n1 - n0) as f64 / (t1 - t0).as_secs_f64()
}

#[test]
fn throttle_sighup_and_pause() {
    let (c, mut db) = preloaded(
        "w_throttle",
        &[
            "pg_kms.reencrypt_max_rows_per_second = 2000",
            "pg_kms.reencrypt_batch_size = 1000",
        ],
    );
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v encrypted_text);
         INSERT INTO t SELECT g, kms_encrypt('v' || g, 'pii') FROM generate_series(1, 200000) g;
         SELECT kms_rotate_key('pii');",
    )
    .unwrap();
    poll("the worker to start", CONVERGE, || {
        (rewrapped(&mut db) > 0).then_some(())
    });
    let r = measure_rate(&mut db, 5.0);
    println!("throttle 2000 rows/s: measured {r:.0} rows/s");
    assert!(
        (1600.0..=2400.0).contains(&r),
        "2000 rows/s throttle not honoured within 20%: {r:.0}"
    );

    set_conf(&mut db, "pg_kms.reencrypt_max_rows_per_second", "6000");
    poll("the new rate to apply", Duration::from_secs(30), || {
        (measure_rate(&mut db, 1.0) > 4000.0).then_some(())
    });
    let r = measure_rate(&mut db, 5.0);
    println!("after SIGHUP, throttle 6000 rows/s: measured {r:.0} rows/s");
    assert!(
        (4800.0..=7200.0).contains(&r),
        "6000 rows/s throttle not honoured within 20%: {r:.0}"
    );

    set_conf(&mut db, "pg_kms.reencrypt_enabled", "off");
    poll("the worker to pause", Duration::from_secs(30), || {
        (measure_rate(&mut db, 1.0) == 0.0).then_some(())
    });
    assert_eq!(
        measure_rate(&mut db, 2.0),
        0.0,
        "paused worker still working"
    );
    // The process is alive but does nothing: kms_health() says so (issue 16).
    let status: String = db
        .query_one(
            "SELECT (kms_health()->'worker'->>'running') || '|' || (kms_health()->'worker'->>'reason')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(status, "false|paused: pg_kms.reencrypt_enabled = off");

    set_conf(&mut db, "pg_kms.reencrypt_enabled", "on");
    poll("the worker to resume", Duration::from_secs(30), || {
        (measure_rate(&mut db, 1.0) > 0.0).then_some(())
    });
    drop(c);
}

#[test]
fn standby_decrypts_and_worker_only_runs_after_promotion() {
    let (primary, mut db) = preloaded("w_primary", &["pg_kms.reencrypt_max_rows_per_second = 0"]);
    make_tables(&mut db, 20_000);
    let before = plaintext_hash(&mut db);
    let standby = primary.standby("w_standby");
    let mut sdb = standby.connect();
    poll("the standby to replay the data", CONVERGE, || {
        let n: i64 = sdb.query_one("SELECT count(*) FROM t2", &[]).ok()?.get(0);
        (n == 10_000).then_some(())
    });
    assert_eq!(
        plaintext_hash(&mut sdb),
        before,
        "standby decrypts the same rows"
    );
    assert_eq!(worker_pid(&mut sdb), None, "no worker on a standby");
    let reason: String = sdb
        .query_one("SELECT kms_health()->'worker'->>'reason'", &[])
        .unwrap()
        .get(0);
    assert!(reason.contains("standby"), "{reason}");
    assert_eq!(
        sqlstate(sdb.batch_execute("SELECT kms_rotate_key('pii')")),
        "25006"
    );

    // The primary rotates and rewraps; the standby follows and still decrypts.
    db.execute("SELECT kms_rotate_key('pii')", &[]).unwrap();
    wait_converged(&primary, "primary convergence");
    poll("the standby to replay the rewrap", CONVERGE, || {
        (old_rows(&mut sdb) == 0).then_some(())
    });
    assert_eq!(plaintext_hash(&mut sdb), before);

    // After promotion, the worker starts there.
    standby.promote();
    let mut sdb = standby.connect();
    poll("a worker on the promoted standby", CONVERGE, || {
        worker_pid(&mut sdb)
    });
    sdb.execute("SELECT kms_rotate_key('pii')", &[]).unwrap();
    poll("the promoted server to rewrap", CONVERGE, || {
        let n: i64 = sdb
            .query_one("SELECT count(*) FROM t2 WHERE kms_key_version(c) <> 3", &[])
            .ok()?
            .get(0);
        (n == 0).then_some(())
    });
    assert_eq!(plaintext_hash(&mut sdb), before);
}

#[test]
fn scheduled_rotation_destroy_guard_sigterm_and_new_databases() {
    let (c, mut db) = preloaded("w_sched", &["pg_kms.reencrypt_max_rows_per_second = 0"]);
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v encrypted_text);
         INSERT INTO t SELECT g, kms_encrypt('v' || g, 'pii') FROM generate_series(1, 1000) g;",
    )
    .unwrap();
    set_conf(&mut db, "pg_kms.reencrypt_enabled", "off");
    // Wait until the worker has seen the pause (no progress rows move).
    poll("the pause to apply", Duration::from_secs(30), || {
        let off: String = db
            .query_one("SELECT current_setting('pg_kms.reencrypt_enabled')", &[])
            .ok()?
            .get(0);
        (off == "off").then_some(())
    });
    db.execute("SELECT kms_rotate_key('pii')", &[]).unwrap();
    let msg = db
        .execute("SELECT kms_destroy_key_version('pii', 1)", &[])
        .unwrap_err();
    let dbe = msg.as_db_error().unwrap();
    assert_eq!(dbe.code().code(), "55000");
    assert!(
        dbe.message()
            .contains("1000 rows in this database still reference it"),
        "{}",
        dbe.message()
    );

    set_conf(&mut db, "pg_kms.reencrypt_enabled", "on");
    poll("the worker to rewrap", CONVERGE, || {
        let n: i64 = db
            .query_one("SELECT count(*) FROM t WHERE kms_key_version(v) = 1", &[])
            .ok()?
            .get(0);
        (n == 0).then_some(())
    });
    db.execute("SELECT kms_destroy_key_version('pii', 1, 'retired')", &[])
        .unwrap();

    // force => true destroys even with rows left (crypto-shredding on purpose).
    set_conf(&mut db, "pg_kms.reencrypt_enabled", "off");
    db.batch_execute(
        "SELECT kms_create_key('tenant'); INSERT INTO t VALUES (5000, kms_encrypt('x', 'tenant'));
         SELECT kms_rotate_key('tenant');",
    )
    .unwrap();
    let forced = db.execute(
        "SELECT kms_destroy_key_version('tenant', 1, 'erase', force => true)",
        &[],
    );
    // The worker may have rewrapped the row already; either way destroy succeeds with force.
    assert!(forced.is_ok(), "{forced:?}");
    set_conf(&mut db, "pg_kms.reencrypt_enabled", "on");

    // Scheduled rotation: a 1 second period is rotated by the worker.
    db.execute("SELECT kms_create_key('sched', interval '1 second')", &[])
        .unwrap();
    poll("a scheduled rotation", CONVERGE, || {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM kms_audit_log WHERE key_name = 'sched' AND operation = 'rotate_key' AND reason = 'scheduled'",
                &[],
            )
            .ok()?
            .get(0);
        (n >= 1).then_some(())
    });
    let v: i32 = db
        .query_one(
            "SELECT max(version) FROM kms_keys WHERE key_name = 'sched'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(v >= 2);

    // SIGTERM ends the worker promptly; the launcher starts a new one.
    let pid = poll("a worker", CONVERGE, || worker_pid(&mut db));
    db.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    poll("a new worker", CONVERGE, || {
        worker_pid(&mut db).filter(|p| *p != pid)
    });

    // A database created later, with the extension installed later, gets a worker.
    db.batch_execute("CREATE DATABASE later").unwrap();
    let mut later = c.connect_as("postgres", "later");
    later.batch_execute("CREATE EXTENSION pg_kms").unwrap();
    poll("a worker in the new database", CONVERGE, || {
        worker_pid(&mut later)
    });
}

#[test]
fn committed_rotation_wakes_the_worker_and_nonce_budget_is_watched() {
    // A one-hour naptime: only the latch set at commit can wake the worker.
    let c = Cluster::start(
        "w_wake",
        &[
            "shared_preload_libraries = 'pg_kms'",
            "pg_kms.reencrypt_naptime = '1h'",
            "pg_kms.nonce_warning_encryptions = 100",
        ],
    );
    let mut db = c.connect();
    db.batch_execute(
        "CREATE EXTENSION pg_kms; SELECT kms_create_key('pii');
         CREATE TABLE t (id int PRIMARY KEY, v encrypted_text);
         INSERT INTO t SELECT g, kms_encrypt('v' || g, 'pii') FROM generate_series(1, 150) g;
         CREATE TABLE events (id int, region text, payload encrypted_text) PARTITION BY LIST (region);
         CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
         CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');",
    )
    .unwrap();
    // The worker has started and gone to sleep for an hour.
    poll("the worker to start", CONVERGE, || worker_pid(&mut db));
    poll("the worker's first pass", CONVERGE, || {
        let n: i64 = db
            .query_one("SELECT count(*) FROM kms_reencryption_progress WHERE finished_at IS NOT NULL AND table_name = 't'::regclass", &[])
            .ok()?
            .get(0);
        (n == 1).then_some(())
    });
    // Rows of a partitioned table (added after the worker's first pass,
    // without the key's 150 encryptions counting towards them).
    db.batch_execute("INSERT INTO events SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, kms_encrypt_bytea('\\x01', 'pii') FROM generate_series(1, 20) g").unwrap();
    let t = Instant::now();
    db.execute("SELECT kms_rotate_key('pii')", &[]).unwrap();
    poll(
        "the worker to wake and rewrap",
        Duration::from_secs(60),
        || {
            let n: i64 = db
            .query_one("SELECT (SELECT count(*) FROM t WHERE kms_key_version(v) = 1) + (SELECT count(*) FROM events WHERE kms_key_version(payload) = 1)", &[])
            .ok()?
            .get(0);
            (n == 0).then_some(())
        },
    );
    println!(
        "woken and done {:.2} s after the rotation committed (naptime 1h)",
        t.elapsed().as_secs_f64()
    );

    // 150 encryptions under version 1 passed the warning level of 100.
    let stats: (i64, i64) = {
        let r = db
            .query_one(
                "SELECT encryptions, decryptions FROM kms_stats WHERE version = 1",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        stats,
        (170, 170),
        "170 sealed (150 + 20 partitioned), 170 opened by the rewrap"
    );
    // Version 1 is no longer active (rotated): its nonce budget no longer
    // matters, so kms_health() and kms_warnings do not list it (issue 16).
    let listed: bool = db
        .query_one(
            "SELECT coalesce(bool_or(w->>'version' = '1'), false)
                 OR EXISTS (SELECT 1 FROM kms_warnings WHERE kind = 'nonce_budget' AND version = 1)
               FROM jsonb_array_elements(kms_health()->'nonce_warnings') w",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        !listed,
        "rotated version 1 is not listed in kms_health()->'nonce_warnings'"
    );
    assert!(
        c.server_log()
            .contains("has sealed 100 values since server start"),
        "no nonce WARNING in the log"
    );
}

#[test]
fn a_row_that_cannot_be_rewrapped_does_not_stall_the_table() {
    let (c, mut db) = preloaded(
        "w_poison",
        &[
            "pg_kms.reencrypt_max_rows_per_second = 0",
            "pg_kms.reencrypt_batch_size = 50",
        ],
    );
    db.batch_execute(
        "CREATE TABLE citizens (id int PRIMARY KEY, ssn encrypted_text UNIQUE);
         INSERT INTO citizens SELECT g, kms_encrypt_deterministic(lpad(g::text, 9, '0'), 'pii') FROM generate_series(1, 500) g;",
    )
    .unwrap();
    set_conf(&mut db, "pg_kms.reencrypt_enabled", "off");
    poll("the pause to apply", Duration::from_secs(30), || {
        let v: String = db
            .query_one("SELECT current_setting('pg_kms.reencrypt_enabled')", &[])
            .ok()?
            .get(0);
        (v == "off").then_some(())
    });
    // After the rotation, a duplicate of row 7 arrives under the new version:
    // rewrapping row 7 would violate UNIQUE.
    db.batch_execute(
        "SELECT kms_rotate_key('pii');
         INSERT INTO citizens VALUES (1000, kms_encrypt_deterministic('000000007', 'pii'));",
    )
    .unwrap();
    set_conf(&mut db, "pg_kms.reencrypt_enabled", "on");
    poll("every other row rewrapped", CONVERGE, || {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM citizens WHERE kms_key_version(ssn) = 1",
                &[],
            )
            .ok()?
            .get(0);
        (n == 1).then_some(())
    });
    let err: Option<String> = db
        .query_one("SELECT last_error FROM kms_reencryption_progress WHERE table_name = 'citizens'::regclass", &[])
        .unwrap()
        .get(0);
    let err = err.unwrap_or_default();
    println!("poison row: 499/500 rewrapped; last_error: {err}");
    assert!(
        err.contains("could not be re-encrypted") && err.contains("duplicate key"),
        "{err}"
    );
    drop(c);
}
