//! Online encryption of plaintext columns (kms_protect_column on a text,
//! varchar or bytea column) on real clusters with the background worker:
//! the backfill under concurrent writes, progress, kill -9 mid-backfill,
//! and the swap. Waiting is polling with deadlines. No plaintext is ever
//! printed: comparisons are counts of mismatching rows.

use pg_kms_integration::{poll, Cluster};
use postgres::Client;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CONVERGE: Duration = Duration::from_secs(300);

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

/// `people` with `rows` rows (every 50th email, ssn and photo NULL) and
/// `expected`, a plain copy of its plaintext.
fn make_people(db: &mut Client, rows: i64) {
    db.batch_execute(&format!(
        "CREATE TABLE people (id bigserial PRIMARY KEY, email text, ssn varchar(11), photo bytea, note text);
         INSERT INTO people (email, ssn, photo, note)
              SELECT CASE WHEN g % 50 <> 0 THEN 'user' || g || '@example.com' END,
                     CASE WHEN g % 50 <> 0 THEN lpad(g::text, 11, '0') END,
                     CASE WHEN g % 50 <> 0 THEN decode(md5(g::text), 'hex') END,
                     'n' FROM generate_series(1, {rows}) g;
         CREATE TABLE expected AS SELECT id, email, ssn, photo FROM people;
         ALTER TABLE expected ADD PRIMARY KEY (id);"
    ))
    .unwrap();
}

/// Rows whose decrypted values (through the view) differ from `expected`.
fn mismatches(db: &mut Client, view: &str) -> i64 {
    db.query_one(
        &format!(
            "SELECT count(*) FROM {view} v FULL JOIN expected e USING (id)
              WHERE v.id IS NULL OR e.id IS NULL OR v.email IS DISTINCT FROM e.email
                 OR v.ssn IS DISTINCT FROM e.ssn OR v.photo IS DISTINCT FROM e.photo"
        ),
        &[],
    )
    .unwrap()
    .get(0)
}

fn states(db: &mut Client) -> Vec<(String, String)> {
    db.query(
        "SELECT column_name::text, state FROM kms_protected_columns ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn all_protected(c: &Cluster, n: usize) -> bool {
    let mut db = c.connect();
    let s = states(&mut db);
    s.len() == n && s.iter().all(|(_, st)| st == "protected")
}

/// A writer on another connection: updates and inserts through the
/// decrypted view, and records the same change in `expected` in the same
/// transaction (so a write that fails, e.g. while the swap rebuilds the
/// view, is rolled back on both sides). Returns the number of committed
/// writes.
fn writer(c: &Cluster, stop: Arc<AtomicBool>, max_id: i64) -> std::thread::JoinHandle<u64> {
    let conninfo = c.conninfo("postgres", "postgres");
    std::thread::spawn(move || {
        let mut db = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
        let mut n: u64 = 0;
        let mut i: i64 = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let id = (i * 7919) % max_id + 1;
            let email = format!("changed{i}@example.org");
            let ssn = format!("{:011}", i * 13);
            let r = (|| -> Result<(), postgres::Error> {
                let mut tx = db.transaction()?;
                if i % 3 == 0 {
                    let row = tx.query_one(
                        "INSERT INTO people_decrypted (email, ssn, photo, note)
                         VALUES ($1, $2::text::varchar(11), decode(md5($1), 'hex'), 'w') RETURNING id",
                        &[&email, &ssn],
                    )?;
                    let new_id: i64 = row.get(0);
                    tx.execute(
                        "INSERT INTO expected VALUES ($1, $2, $3::text::varchar(11), decode(md5($2), 'hex'))",
                        &[&new_id, &email, &ssn],
                    )?;
                } else {
                    tx.execute(
                        "UPDATE people_decrypted SET email = $2, ssn = $3::text::varchar(11) WHERE id = $1",
                        &[&id, &email, &ssn],
                    )?;
                    tx.execute(
                        "UPDATE expected SET email = $2, ssn = $3::text::varchar(11) WHERE id = $1",
                        &[&id, &email, &ssn],
                    )?;
                }
                tx.commit()
            })();
            if r.is_ok() {
                n += 1;
            }
        }
        n
    })
}

#[test]
fn converts_text_varchar_and_bytea_online_under_concurrent_writes() {
    let (c, mut db) = preloaded(
        "p_convert",
        &[
            "pg_kms.reencrypt_max_rows_per_second = 40000",
            "pg_kms.reencrypt_batch_size = 1000",
        ],
    );
    const ROWS: i64 = 100_000;
    make_people(&mut db, ROWS);
    let types_before: Vec<(String, String)> = db
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = 'people'::regclass AND attname IN ('email', 'ssn', 'photo') ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    db.batch_execute(
        "SELECT kms_protect_column('people', 'email', 'pii', deterministic => true);
         SELECT kms_protect_column('people', 'ssn', 'pii', context => 'id::text', blind_index_bits => 64);
         SELECT kms_protect_column('people', 'photo', 'pii');",
    )
    .unwrap();
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(&c, stop.clone(), ROWS);

    // (c) progress: rows_done, rows_left and an ETA while converting.
    poll(
        "progress with rows_done, rows_left and eta",
        CONVERGE,
        || {
            let r = db
                .query(
                    "SELECT rows_done, rows_left FROM kms_protected_columns
                  WHERE state = 'converting' AND rows_done > 0 AND rows_left > 0
                    AND eta IS NOT NULL AND started_at IS NOT NULL AND last_batch_at IS NOT NULL",
                    &[],
                )
                .unwrap();
            r.first().map(|r| {
                let (done, left): (i64, i64) = (r.get(0), r.get(1));
                assert!(done + left <= ROWS * 2, "rows_left {left} rows_done {done}");
            })
        },
    );
    // The decrypted view shows the plaintext while converting.
    poll(
        "the view to match the plaintext mid-conversion",
        CONVERGE,
        || {
            let mut db = c.connect();
            let m = db
            .query_one(
                "SELECT count(*) FROM people_decrypted v JOIN expected e USING (id)
                  WHERE v.id <= 1000 AND (v.email IS DISTINCT FROM e.email OR v.ssn IS DISTINCT FROM e.ssn)",
                &[],
            )
            .ok()?;
            (m.get::<_, i64>(0) == 0).then_some(())
        },
    );

    poll("the three columns to be protected", CONVERGE, || {
        all_protected(&c, 3).then_some(())
    });
    let secs = t0.elapsed().as_secs_f64();
    // A few more writes after the swap, through the rebuilt view.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let writes = w.join().unwrap();
    println!("converted 3 columns of {ROWS} rows in {secs:.1} s with {writes} concurrent writes");
    assert!(writes > 100, "only {writes} concurrent writes");

    let mut db = c.connect();
    assert_eq!(mismatches(&mut db, "people_decrypted"), 0, "values differ");
    // Every row's ciphertext is there, and was sealed as the policy says.
    let r = db
        .query_one(
            "SELECT count(*) FILTER (WHERE e.email IS NOT NULL AND p.email IS DISTINCT FROM kms_encrypt_deterministic(e.email, 'pii')),
                    count(*) FILTER (WHERE (e.ssn IS NULL) <> (p.ssn_bidx IS NULL)
                                        OR p.ssn_bidx IS DISTINCT FROM kms_blind_index(e.ssn, 'pii', NULL, 64)),
                    count(*) FILTER (WHERE e.ssn IS NOT NULL AND kms_decrypt(p.ssn, p.id::text) IS DISTINCT FROM e.ssn),
                    count(*) FILTER (WHERE e.photo IS NOT NULL AND kms_decrypt_bytea(p.photo) IS DISTINCT FROM e.photo),
                    count(*) FILTER (WHERE (e.photo IS NULL) <> (p.photo IS NULL))
               FROM people p JOIN expected e USING (id)",
            &[],
        )
        .unwrap();
    for i in 0..5 {
        assert_eq!(r.get::<_, i64>(i), 0, "check {i} failed");
    }
    // The context binds: another row's context does not open a value.
    assert!(db
        .query_one(
            "SELECT kms_decrypt(ssn, (id + 1)::text) FROM people WHERE ssn IS NOT NULL LIMIT 1",
            &[]
        )
        .is_err());
    // Types: encrypted_text in the table, the source types in the view.
    let table_types: Vec<String> = db
        .query(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = 'people'::regclass AND attname IN ('email', 'ssn', 'photo') ORDER BY attname",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(table_types, vec!["encrypted_text"; 3]);
    let view_types: Vec<(String, String)> = db
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
              WHERE attrelid = 'people_decrypted'::regclass AND attname IN ('email', 'ssn', 'photo') ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(view_types, types_before);
    let leftovers: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM pg_attribute WHERE attrelid = 'people'::regclass
                        AND attname::text LIKE '%kms_new' AND NOT attisdropped)
                  + (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'people'::regclass AND tgname = 'zzzz_kms_convert')
                  + (SELECT count(*) FROM pg_proc WHERE proname = 'people_kms_convert')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(leftovers, 0, "shadow column, trigger or function left");
    let (done, errors): (i64, i64) = {
        let r = db
            .query_one(
                "SELECT sum(rows_done)::bigint, count(*) FILTER (WHERE last_error IS NOT NULL OR finished_at IS NULL)
                   FROM kms_protected_columns",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(done > 0, "the worker sealed no row");
    assert_eq!(errors, 0, "a conversion recorded an error or no finish");
    // Writes through the view after the swap encrypt.
    db.batch_execute(
        "INSERT INTO people_decrypted (email, ssn, photo) VALUES ('late@example.com', '00000000042', '\\x01');",
    )
    .unwrap();
    let ok: bool = db
        .query_one(
            "SELECT kms_decrypt(ssn, id::text) = '00000000042' AND kms_decrypt(email) = 'late@example.com'
               FROM people WHERE id = (SELECT max(id) FROM people)",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(ok);
    // The swap's lock hold time, as the worker logged it.
    let log = c.server_log();
    let held: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split("the swap held its lock for ").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect();
    println!("swap lock hold times (ms): {held:?}");
    assert_eq!(held.len(), 3);
    assert!(held.iter().all(|&ms| ms < 1000), "{held:?}");
}

#[test]
fn conversion_resumes_after_kill_9_of_the_worker() {
    let (c, mut db) = preloaded(
        "p_kill",
        &[
            "pg_kms.reencrypt_max_rows_per_second = 20000",
            "pg_kms.reencrypt_batch_size = 1000",
        ],
    );
    const ROWS: i64 = 150_000;
    make_people(&mut db, ROWS);
    let non_null: i64 = db
        .query_one("SELECT count(*) FROM people WHERE email IS NOT NULL", &[])
        .unwrap()
        .get(0);
    db.execute("SELECT kms_protect_column('people', 'email', 'pii')", &[])
        .unwrap();
    let progress = |db: &mut Client| -> (i64, Option<String>, String) {
        let r = db
            .query_one(
                "SELECT p.rows_done, p.resume_at, p.state FROM kms.protected_columns p",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    let before_kill = poll("the backfill to be under way", CONVERGE, || {
        let (done, resume, state) = progress(&mut db);
        assert_eq!(state, "converting", "finished before the kill");
        (done >= 20_000).then_some((done, resume))
    });
    let pid: i32 = db
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_kms worker' AND datname = current_database()",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success());
    drop(db);
    // The postmaster restarts every backend; the worker comes back and
    // resumes from resume_at (rows_done never goes back below what was
    // committed, except for the last asynchronous commits).
    let mut seen_after = None;
    let conninfo = c.conninfo("postgres", "postgres");
    poll("the conversion to finish after kill -9", CONVERGE, || {
        // Connections fail while the postmaster restarts.
        let mut db = postgres::Client::connect(&conninfo, postgres::NoTls).ok()?;
        let r = db
            .query_one(
                "SELECT p.rows_done, p.state FROM kms.protected_columns p",
                &[],
            )
            .ok()?;
        let (done, state): (i64, String) = (r.get(0), r.get(1));
        if state == "converting" && done > before_kill.0 {
            seen_after.get_or_insert(done);
        }
        (state == "protected").then_some(())
    });
    let mut db = c.connect();
    let (done, resume, _) = progress(&mut db);
    println!(
        "rows_done {} before kill -9 (resume_at set: {}), {done} at the end, growth seen mid-way: {seen_after:?}",
        before_kill.0,
        before_kill.1.is_some()
    );
    assert!(before_kill.1.is_some(), "no resume_at recorded");
    assert_eq!(resume, None);
    // Each row sealed once: the restarted pass did not start over.
    assert_eq!(done, non_null, "rows_done");
    assert_eq!(mismatches(&mut db, "people_decrypted"), 0, "values differ");
    let plain_left: i64 = db
        .query_one(
            "SELECT count(*) FROM people WHERE email IS NULL AND id % 50 <> 0",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(plain_left, 0);
}

#[test]
fn row_with_null_context_is_sealed_without_one() {
    let (c, mut db) = preloaded("p_nullctx", &["pg_kms.reencrypt_max_rows_per_second = 0"]);
    db.batch_execute(
        "CREATE TABLE acct (id int PRIMARY KEY, tenant text, secret text);
         INSERT INTO acct SELECT g, CASE WHEN g <> 777 THEN 't' || (g % 7) END, 'secret-' || g
           FROM generate_series(1, 3000) g;
         SELECT kms_protect_column('acct', 'secret', 'pii', context => 'tenant');",
    )
    .unwrap();
    poll("the swap", CONVERGE, || {
        let mut db = c.connect();
        let state: String = db
            .query_one("SELECT state FROM kms_protected_columns", &[])
            .unwrap()
            .get(0);
        (state == "protected").then_some(())
    });
    // Every row reads back through the view; the row whose context is NULL
    // was sealed without one (as kms_encrypt and the view's trigger do),
    // the others with their tenant.
    let r = db
        .query_one(
            "SELECT count(*) FILTER (WHERE d.secret IS DISTINCT FROM 'secret-' || d.id),
                    (SELECT kms_decrypt(secret) FROM acct WHERE id = 777),
                    (SELECT count(*) FROM acct WHERE id <> 777 AND kms_decrypt(secret, tenant) = 'secret-' || id),
                    (SELECT last_error FROM kms_protected_columns)
               FROM acct_decrypted d",
            &[],
        )
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 0);
    assert_eq!(r.get::<_, Option<String>>(1).as_deref(), Some("secret-777"));
    assert_eq!(r.get::<_, i64>(2), 2999);
    assert_eq!(r.get::<_, Option<String>>(3), None);
}
