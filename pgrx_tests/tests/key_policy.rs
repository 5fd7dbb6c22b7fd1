//! Key lifecycle that runs itself (issue 16 sections 2-4), on real
//! clusters started with `shared_preload_libraries = 'pg_kms'`: the worker
//! disables old versions no row references any more (`retire_after`),
//! destroys disabled ones (`destroy_after`), never a version a row still
//! needs, retires the version an emergency rotation replaced as soon as it
//! has rewrapped every row, and `kms_warnings` / `kms_health()` report due
//! and overdue rotations and a paused worker, and clear. Waiting is polling
//! with deadlines.

use pg_kms_integration::{pairs, poll, slow_insert_from_before, Cluster};
use postgres::Client;
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(120);

fn preloaded(name: &str) -> (Cluster, Client) {
    let c = Cluster::start(
        name,
        &[
            "shared_preload_libraries = 'pg_kms'",
            "pg_kms.reencrypt_naptime = '200ms'",
            "pg_kms.reencrypt_max_rows_per_second = 0",
        ],
    );
    let mut db = c.connect();
    db.batch_execute("CREATE EXTENSION pg_kms;").unwrap();
    (c, db)
}

/// "version:state" of every version of `key`, in order.
fn states(db: &mut Client, key: &str) -> String {
    db.query_one(
        "SELECT string_agg(version || ':' || state, ',' ORDER BY version) FROM kms_keys WHERE key_name = $1",
        &[&key],
    )
    .unwrap()
    .get(0)
}

/// "operation:version:reason" of the audit rows of `key`, in order.
fn audit(db: &mut Client, key: &str) -> Vec<String> {
    db.query(
        "SELECT operation || ':' || coalesce(version::text, '-') || ':' || coalesce(reason, '-')
           FROM kms_audit_log WHERE key_name = $1 ORDER BY id",
        &[&key],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// "running|reason|number of warnings" of kms_health().
fn health(db: &mut Client) -> String {
    db.query_one(
        "SELECT h->'worker'->>'running' || '|' || coalesce(h->'worker'->>'reason', '-') || '|'
                || jsonb_array_length(h->'warnings')
           FROM kms_health() h",
        &[],
    )
    .unwrap()
    .get(0)
}

fn audit_ok(db: &mut Client) {
    let ok: bool = db
        .query_one("SELECT ok FROM kms_audit_log_check()", &[])
        .unwrap()
        .get(0);
    assert!(ok, "the audit chain and the key rows verify");
}

/// retire_after and destroy_after: the worker disables, then destroys, a
/// version no row references; a version that a row still needs (sealed
/// with a context only the application knows, so the worker cannot rewrap
/// it) is never touched.
#[test]
fn worker_retires_and_destroys_only_unreferenced_versions() {
    let (c, mut db) = preloaded("kp_retire");
    db.batch_execute(
        "SELECT kms_create_key('pol');
         CREATE TABLE t (id int PRIMARY KEY, v encrypted_text, note encrypted_text);
         INSERT INTO t SELECT g, kms_encrypt('v' || g, 'pol') FROM generate_series(1, 50) g;
         -- One value only the application can rewrap: version 1 stays referenced.
         UPDATE t SET note = kms_encrypt('note', 'pol', 'ctx-1') WHERE id = 1;
         SELECT kms_rotate_key('pol');
         INSERT INTO t SELECT g, kms_encrypt('v' || g, 'pol') FROM generate_series(51, 100) g;
         SELECT kms_rotate_key('pol');",
    )
    .unwrap();
    poll("the worker to rewrap t.v", CONVERGE, || {
        let usage: Vec<(i32, i64)> = pairs(
            &mut c.connect(),
            "SELECT version, rows FROM kms_key_usage('pol') ORDER BY 1",
        );
        (usage == vec![(1, 1), (2, 0), (3, 100)]).then_some(())
    });
    assert_eq!(
        states(&mut db, "pol"),
        "1:decrypt_only,2:decrypt_only,3:active"
    );
    db.batch_execute("SELECT kms_alter_key('pol', retire_after => '0', destroy_after => '0')")
        .unwrap();
    poll(
        "the worker to retire and destroy version 2",
        CONVERGE,
        || (states(&mut c.connect(), "pol") == "1:decrypt_only,2:destroyed,3:active").then_some(()),
    );
    // Give the worker a few more passes: version 1 stays as it is.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        states(&mut db, "pol"),
        "1:decrypt_only,2:destroyed,3:active"
    );
    let note: String = db
        .query_one("SELECT kms_decrypt(note, 'ctx-1') FROM t WHERE id = 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(note, "note");
    let a = audit(&mut db, "pol");
    assert_eq!(
        a[a.len() - 3..],
        [
            "alter_key:-:-",
            "disable_key_version:2:policy",
            "destroy_key_version:2:policy"
        ]
    );
    assert!(
        !a.iter()
            .any(|r| r.starts_with("disable_key_version:1")
                || r.starts_with("destroy_key_version:1")),
        "{a:?}"
    );
    let receipts: i64 = db
        .query_one(
            "SELECT count(*) FROM kms_destruction_receipts WHERE key_name = 'pol' AND version = 2 AND reason = 'policy'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(receipts, 1);
    audit_ok(&mut db);
    // The application rewraps its row: version 1 goes too.
    db.batch_execute("UPDATE t SET note = kms_rewrap(note, 'ctx-1') WHERE id = 1")
        .unwrap();
    poll(
        "the worker to retire and destroy version 1",
        CONVERGE,
        || (states(&mut c.connect(), "pol") == "1:destroyed,2:destroyed,3:active").then_some(()),
    );
    assert!(c
        .server_log()
        .contains("pg_kms: destroyed version 1 of key \"pol\" (reason policy"));
    audit_ok(&mut db);
}

/// Emergency rotation after a suspected compromise: the old version is
/// disabled as soon as the worker has rewrapped every row, audited with
/// reason 'emergency'; every value still decrypts under the new version.
#[test]
fn emergency_rotation_after_a_suspected_compromise() {
    let (c, mut db) = preloaded("kp_emergency");
    db.batch_execute(
        "SELECT kms_create_key('pii');
         CREATE TABLE people (id int PRIMARY KEY, email encrypted_text);
         INSERT INTO people SELECT g, kms_encrypt('user' || g || '@example.com', 'pii') FROM generate_series(1, 5000) g;
         CREATE TABLE cards (id int PRIMARY KEY, pan encrypted_text);
         INSERT INTO cards SELECT g, kms_encrypt('4111' || g, 'pii') FROM generate_series(1, 500) g;",
    )
    .unwrap();
    let v: i32 = db
        .query_one(
            "SELECT kms_rotate_key('pii', 'suspected compromise', emergency => true)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(v, 2);
    let marked: bool = db
        .query_one(
            "SELECT retire_when_unreferenced FROM kms.key_versions WHERE version = 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(marked);
    poll("the worker to disable version 1", CONVERGE, || {
        (states(&mut c.connect(), "pii") == "1:disabled,2:active").then_some(())
    });
    let usage: Vec<(i32, i64)> = pairs(
        &mut db,
        "SELECT version, rows FROM kms_key_usage('pii') ORDER BY 1",
    );
    assert_eq!(usage, vec![(1, 0), (2, 5500)]);
    let ok: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM people WHERE kms_decrypt(email) = 'user' || id || '@example.com')
                  + (SELECT count(*) FROM cards WHERE kms_decrypt(pan) = '4111' || id)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(ok, 5500);
    assert_eq!(
        audit(&mut db, "pii")[1..],
        [
            "rotate_key:2:suspected compromise",
            "disable_key_version:1:emergency"
        ]
    );
    let (detail, marked): (String, bool) = {
        let r = db
            .query_one(
                "SELECT (SELECT detail FROM kms_audit_log WHERE operation = 'rotate_key'),
                        (SELECT retire_when_unreferenced FROM kms.key_versions WHERE version = 1)",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(detail.contains("\"emergency\":true"), "{detail}");
    assert!(!marked, "the mark is cleared once the version is disabled");
    audit_ok(&mut db);
}

/// A key with a maximum lifetime: each version is primary for at most the
/// rotation period, then retired as soon as its rows are rewrapped, then
/// destroyed; the data stays readable throughout.
#[test]
fn key_with_a_maximum_lifetime() {
    let (c, mut db) = preloaded("kp_lifetime");
    db.batch_execute(
        "SELECT kms_create_key('life');
         CREATE TABLE t (id int PRIMARY KEY, v encrypted_text);
         INSERT INTO t SELECT g, kms_encrypt('v' || g, 'life') FROM generate_series(1, 200) g;
         SELECT kms_alter_key('life', rotation_period => '2 seconds', retire_after => '0', destroy_after => '0',
                              metadata => '{\"owner\": \"payments\", \"max_lifetime\": \"2s + rewrap\"}');",
    )
    .unwrap();
    poll("versions 1 and 2 destroyed by the worker", CONVERGE, || {
        let s = states(&mut c.connect(), "life");
        s.starts_with("1:destroyed,2:destroyed,").then_some(())
    });
    let ok: i64 = db
        .query_one(
            "SELECT count(*) FROM t WHERE kms_decrypt(v) = 'v' || id",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(ok, 200);
    let a = audit(&mut db, "life");
    for expected in [
        "rotate_key:2:scheduled",
        "disable_key_version:1:policy",
        "destroy_key_version:1:policy",
        "rotate_key:3:scheduled",
        "disable_key_version:2:policy",
        "destroy_key_version:2:policy",
    ] {
        assert!(a.iter().any(|r| r == expected), "{expected} in {a:?}");
    }
    let owner: String = db
        .query_one(
            "SELECT DISTINCT metadata->>'owner' FROM kms_keys WHERE key_name = 'life'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(owner, "payments");
    // Stop the schedule: the key stays as it is.
    db.batch_execute("SELECT kms_alter_key('life', clear => ARRAY['rotation_period'])")
        .unwrap();
    audit_ok(&mut db);
}

/// Scheduled rotation with a warning threshold: the warning appears when
/// the rotation is due within pg_kms.rotation_warning, an overdue rotation
/// and a paused worker are reported (kms_warnings and kms_health()), and
/// everything clears once the worker runs again and rotates the key.
#[test]
fn scheduled_rotation_warnings_appear_and_clear() {
    let (c, mut db) = preloaded("kp_warnings");
    db.batch_execute(
        "SELECT kms_create_key('sched', '1 day');
         SELECT kms_create_key('calm', '90 days');",
    )
    .unwrap();
    let kinds = |db: &mut Client| -> Vec<String> {
        db.query(
            "SELECT kind || ':' || coalesce(key_name, '-') FROM kms_warnings ORDER BY kind, key_name",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    // The default threshold (7 days) covers a 1-day period.
    assert_eq!(kinds(&mut db), ["rotation_due:sched"]);
    c.append_conf("pg_kms.rotation_warning = '1h'\n");
    c.reload_and_wait("pg_kms.rotation_warning", "1h");
    assert!(kinds(&mut c.connect()).is_empty());
    // Pause the worker; the rotation becomes overdue.
    c.append_conf("pg_kms.reencrypt_enabled = off\n");
    c.reload_and_wait("pg_kms.reencrypt_enabled", "off");
    let mut db = c.connect();
    db.batch_execute(
        "UPDATE kms.key_versions v SET created_at = now() - interval '25 hours'
           FROM kms.keys k WHERE k.key_id = v.key_id AND k.key_name = 'sched'",
    )
    .unwrap();
    // The worker may have been mid-loop when paused: give it its naptime.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        kinds(&mut db),
        ["rotation_overdue:sched", "worker_paused:-"]
    );
    assert_eq!(
        health(&mut db),
        "false|paused: pg_kms.reencrypt_enabled = off|2"
    );
    assert_eq!(states(&mut db, "sched"), "1:active");
    // Resume: the worker rotates the key and the warnings clear.
    c.append_conf("pg_kms.reencrypt_enabled = on\n");
    c.reload_and_wait("pg_kms.reencrypt_enabled", "on");
    poll("the worker to rotate 'sched'", CONVERGE, || {
        (states(&mut c.connect(), "sched") == "1:decrypt_only,2:active").then_some(())
    });
    let mut db = c.connect();
    assert!(kinds(&mut db).is_empty(), "{:?}", kinds(&mut db));
    assert_eq!(health(&mut db), "true|-|0");
    assert_eq!(
        audit(&mut db, "sched").last().map(String::as_str),
        Some("rotate_key:2:scheduled")
    );
}

/// A worker that makes no progress while rows are pending is reported
/// (after max(60 s, 6 x naptime) without a batch), and the warning clears
/// once a batch is recorded.
#[test]
fn stalled_worker_is_reported() {
    let (c, mut db) = preloaded("kp_stall");
    // A progress row the worker never updates (the column is not
    // encrypted_text, so no pass runs on it): pending rows, no batch for
    // five minutes.
    db.batch_execute(
        "CREATE TABLE stuck (a text);
         INSERT INTO kms.reencryption_progress (relid, attname, rows_pending, started_at)
              VALUES ('stuck'::regclass, 'a', 10, now() - interval '5 minutes');",
    )
    .unwrap();
    let stalled = |db: &mut Client| -> Vec<(String, String)> {
        pairs(
            db,
            "SELECT table_name || '.' || column_name, message FROM kms_warnings WHERE kind = 'worker_stalled'",
        )
    };
    let w = stalled(&mut db);
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w[0].0, "public.stuck.a");
    assert!(w[0].1.contains("while 10 rows are pending"), "{}", w[0].1);
    poll("kms_health() to list the stall", CONVERGE, || {
        (health(&mut c.connect()) == "true|-|1").then_some(())
    });
    db.batch_execute(
        "UPDATE kms.reencryption_progress SET last_batch_at = now() WHERE relid = 'stuck'::regclass",
    )
    .unwrap();
    assert!(stalled(&mut db).is_empty());
}

/// A statement that began before an emergency rotation keeps sealing under
/// the version it replaced (its key cache is refreshed only at its next
/// statement) and commits after the worker has rewrapped everything else:
/// the worker waits for it before retiring the version, so no row is left
/// under a disabled version.
#[test]
fn retirement_waits_for_transactions_older_than_the_rotation() {
    let (c, mut db) = preloaded("kp_old_xact");
    db.batch_execute(
        "SELECT kms_create_key('em');
         CREATE TABLE t (id int PRIMARY KEY, v encrypted_text);
         INSERT INTO t SELECT g, kms_encrypt('v' || g, 'em') FROM generate_series(1, 50) g;",
    )
    .unwrap();
    let app = slow_insert_from_before(&c, "t", "em", 1000..=1029, 0.1);
    db.batch_execute("SELECT kms_rotate_key('em', 'suspected compromise', emergency => true)")
        .unwrap();
    // While the statement runs, version 1 stays decrypt_only although every
    // committed row has been rewrapped.
    poll("the committed rows rewrapped", CONVERGE, || {
        let n: i64 = db
            .query_one("SELECT count(*) FROM t WHERE kms_key_version(v) = 1", &[])
            .ok()?
            .get(0);
        (n == 0).then_some(())
    });
    let during = states(&mut db, "em");
    app.join().unwrap();
    assert_eq!(
        during, "1:decrypt_only,2:active",
        "retired under a running statement"
    );
    poll(
        "version 1 retired once nothing references it",
        CONVERGE,
        || {
            let n: i64 = db
                .query_one("SELECT count(*) FROM t WHERE kms_key_version(v) = 1", &[])
                .ok()?
                .get(0);
            (n == 0 && states(&mut db, "em") == "1:disabled,2:active").then_some(())
        },
    );
    let readable: i64 = db
        .query_one(
            "SELECT count(*) FROM t WHERE kms_decrypt(v) IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(readable, 80, "every row readable after the retirement");
    drop(c);
}

/// Rows that row-level security forced on a table hides from its owner
/// (who does not bypass it) cannot be counted by the owner's scan: the
/// version they use is neither retired by the worker nor destroyed by a
/// superuser's kms_destroy_key_version.
#[test]
fn forced_row_level_security_does_not_hide_rows_from_the_guard() {
    let (c, mut db) = preloaded("kp_rls");
    db.batch_execute(
        "SELECT kms_create_key('rl');
         CREATE ROLE tenant_owner;
         CREATE TABLE tt (id int PRIMARY KEY, tenant text, v encrypted_text);
         INSERT INTO tt SELECT g, 't' || (g % 2), kms_encrypt('v' || g, 'rl') FROM generate_series(1, 20) g;
         ALTER TABLE tt OWNER TO tenant_owner;
         ALTER TABLE tt ENABLE ROW LEVEL SECURITY;
         ALTER TABLE tt FORCE ROW LEVEL SECURITY;
         CREATE POLICY only_t0 ON tt USING (tenant = 't0');
         ALTER TABLE tt OWNER TO tenant_owner;
         SELECT kms_rotate_key('rl');
         SELECT kms_alter_key('rl', retire_after => '0', destroy_after => '0');",
    )
    .unwrap();
    let err = db
        .batch_execute("SELECT kms_destroy_key_version('rl', 1)")
        .err()
        .and_then(|e| {
            e.as_db_error()
                .map(|d| format!("{} {}", d.code().code(), d.message()))
        });
    println!("destroy: {err:?}");
    assert!(
        err.as_deref()
            .is_some_and(|e| e.starts_with("42501 cannot verify")),
        "the destroy guard counted past RLS: {err:?}"
    );
    // The worker's passes never retire version 1 (rows hidden from the
    // owner's rewrap stay under it).
    poll("a worker pass", CONVERGE, || {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM kms_reencryption_progress WHERE table_name = 'tt'::regclass AND finished_at IS NOT NULL",
                &[],
            )
            .ok()?
            .get(0);
        (n == 1).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(states(&mut db, "rl"), "1:decrypt_only,2:active");
    let hidden: i64 = db
        .query_one("SELECT count(*) FROM tt WHERE kms_key_version(v) = 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        hidden, 10,
        "the rows hidden from the owner are still under version 1"
    );
    drop(c);
}
