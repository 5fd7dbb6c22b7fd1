//! Logical replication and one keyring across clusters (issue 14, section 4).
//!
//! Two clusters on this machine with the same master key: the publisher
//! (`wal_level = logical`) publishes a table with `encrypted_text` columns;
//! the subscriber replicates it into two databases, one subscription in
//! text mode and one with `binary = true`. Values arrive byte-identical.
//! The subscriber gets the keyring with `kms_keyring_export()` /
//! `kms_keyring_import()` and follows rotations, rewraps and destructions;
//! values under a version it does not have yet fail with a clear error and
//! decrypt after the next import; its worker leaves replicated tables alone.
//!
//! Run: `cargo test -p pg_kms_integration --test replication -- --nocapture`
//! (after `cargo pgrx install`, under the lock).

use pg_kms_integration::*;
use postgres::Client;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn one<T: for<'a> postgres::types::FromSql<'a>>(db: &mut Client, sql: &str) -> T {
    db.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// A digest of the table as raw envelopes (`encrypted_text::bytea`).
const DIGEST: &str = "SELECT count(*)::text || ':' || coalesce(md5(string_agg(id || '=' || coalesce(encode(name::bytea, 'hex'), 'NULL')
                                || '/' || coalesce(encode(tag::bytea, 'hex'), 'NULL'), ',' ORDER BY id)), '')
                        FROM people";

fn digest(db: &mut Client) -> String {
    one::<String>(db, DIGEST)
}

/// Waits until the subscriber's table equals the publisher's, byte for byte
/// (the publisher's digest is taken again at each poll: its worker may still
/// be rewrapping after a rotation).
fn wait_replicated(publ: &mut Client, sub: &mut Client, what: &str) {
    poll(what, T, || (digest(sub) == digest(publ)).then_some(()));
}

/// Exports the publisher's keyring and imports it into `sub`; returns the
/// import's summary.
fn sync_keyring(publ: &mut Client, sub: &mut Client) -> String {
    let doc = one::<String>(publ, "SELECT kms_keyring_export()::text");
    assert!(doc.contains("\"mac\""), "an export document");
    sub.query_one("SELECT kms_keyring_import($1::text::jsonb)::text", &[&doc])
        .unwrap_or_else(|e| panic!("import: {}", message(Err::<(), _>(e))))
        .get(0)
}

/// Rows whose value decrypts to what was sealed.
fn decrypting(db: &mut Client) -> i64 {
    one::<i64>(
        db,
        "SELECT count(*) FROM people WHERE kms_decrypt(name) = 'name-' || id",
    )
}

fn versions(db: &mut Client) -> String {
    one::<String>(
        db,
        "SELECT coalesce(string_agg(v::text || 'x' || n, ',' ORDER BY v), '')
           FROM (SELECT kms_key_version(name) v, count(*) n FROM people GROUP BY 1) s",
    )
}

#[test]
fn logical_replication_with_one_keyring() {
    let preload = [
        "shared_preload_libraries = 'pg_kms'",
        "pg_kms.reencrypt_naptime = '1s'",
        "max_worker_processes = 24",
        "max_logical_replication_workers = 8",
    ];
    // The publisher rewraps on demand (kms_reencrypt_now) in this test, so
    // that what the subscriber's worker does can be told apart.
    let mut pub_conf = vec!["wal_level = logical", "pg_kms.reencrypt_enabled = off"];
    pub_conf.extend(preload);
    let publisher = Cluster::start("repl_pub", &pub_conf);
    let subscriber = Cluster::start("repl_sub", &preload);
    // Same master key on both (a fresh random one, from the publisher).
    subscriber.write_key(&publisher.read_key(), 0o600);

    let mut p = publisher.connect();
    p.batch_execute(
        "CREATE EXTENSION pg_kms;
         SELECT kms_create_key('pii');
         CREATE TABLE people (id int PRIMARY KEY, name encrypted_text, tag encrypted_text);
         INSERT INTO people SELECT i, kms_encrypt('name-' || i, 'pii'),
                CASE WHEN i % 3 = 0 THEN NULL ELSE kms_encrypt_deterministic('tag-' || (i % 5), 'pii') END
           FROM generate_series(1, 40) i;
         CREATE PUBLICATION pub FOR TABLE people;",
    )
    .unwrap();

    let mut setup = subscriber.connect();
    for db in ["sub_text", "sub_bin"] {
        setup
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .unwrap();
    }
    let publisher_conn = publisher.conninfo("postgres", "postgres");
    let mut subs = Vec::new();
    for (db, binary) in [("sub_text", false), ("sub_bin", true)] {
        let mut s = subscriber.connect_as("postgres", db);
        // The type must exist on the subscriber: the same extension.
        s.batch_execute(
            "CREATE EXTENSION pg_kms;
             CREATE TABLE people (id int PRIMARY KEY, name encrypted_text, tag encrypted_text);",
        )
        .unwrap();
        // Not in a transaction block (it creates the slot on the publisher).
        s.batch_execute(&format!(
            "CREATE SUBSCRIPTION s_{db} CONNECTION '{publisher_conn}' PUBLICATION pub WITH (binary = {binary})"
        ))
        .unwrap();
        subs.push((db, s));
    }
    // Initial copy, then changes streamed after it.
    for (db, s) in subs.iter_mut() {
        wait_replicated(&mut p, s, &format!("initial copy into {db}"));
    }
    p.batch_execute(
        "INSERT INTO people SELECT i, kms_encrypt('name-' || i, 'pii'), kms_encrypt_deterministic('tag-' || (i % 5), 'pii')
           FROM generate_series(41, 60) i;
         UPDATE people SET name = kms_encrypt('name-' || id, 'pii') WHERE id % 10 = 1;
         INSERT INTO people VALUES (61, kms_encrypt('name-61', 'pii'), NULL);",
    )
    .unwrap();
    for (db, s) in subs.iter_mut() {
        wait_replicated(&mut p, s, &format!("streamed changes into {db}"));
        println!("{db}: {} rows byte-identical to the publisher's", digest(s));
    }

    // Before the keyring: the values are there, the key is not.
    let (_, s0) = &mut subs[0];
    let e = s0.query_one("SELECT kms_decrypt(name) FROM people WHERE id = 1", &[]);
    let m = message(s0.query_one("SELECT kms_decrypt(name) FROM people WHERE id = 1", &[]));
    assert_eq!(sqlstate(e), "42704", "{m}");
    assert!(m.contains("kms_keyring_import"), "hint names the sync: {m}");
    println!("before the keyring: 42704 with hint to import it");

    // The keyring, imported into both subscriber databases.
    for (db, s) in subs.iter_mut() {
        let summary = sync_keyring(&mut p, s);
        assert!(summary.contains("\"created\": [\"pii\"]"), "{summary}");
        assert_eq!(decrypting(s), 61, "{db}");
        assert_eq!(
            one::<i64>(
                s,
                "SELECT count(*) FROM people p WHERE tag IS NOT NULL
                   AND kms_decrypt(tag) = 'tag-' || (p.id % 5)"
            ),
            one::<i64>(&mut p, "SELECT count(*) FROM people WHERE tag IS NOT NULL"),
        );
        // Same keyring: the blind index and deterministic values agree.
        assert_eq!(
            one::<String>(s, "SELECT encode(kms_blind_index('x', 'pii'), 'hex')"),
            one::<String>(&mut p, "SELECT encode(kms_blind_index('x', 'pii'), 'hex')"),
        );
        // Idempotent: the same keyring again changes nothing.
        let again = sync_keyring(&mut p, s);
        assert!(again.contains("\"unchanged\": 1"), "{again}");
    }

    // A local table on the subscriber (not replicated), made after the
    // replicated one: the worker visits it later in each pass.
    let (_, s0) = &mut subs[0];
    s0.batch_execute(
        "CREATE TABLE local_notes (id int PRIMARY KEY, v encrypted_text);
         INSERT INTO local_notes SELECT i, kms_encrypt('local-' || i, 'pii') FROM generate_series(1, 10) i;",
    )
    .unwrap();

    // Rotation on the publisher; values under version 2 arrive before the keyring.
    assert_eq!(one::<i32>(&mut p, "SELECT kms_rotate_key('pii')"), 2);
    p.batch_execute(
        "INSERT INTO people SELECT i, kms_encrypt('name-' || i, 'pii'), NULL FROM generate_series(62, 70) i;",
    )
    .unwrap();
    for (db, s) in subs.iter_mut() {
        wait_replicated(&mut p, s, &format!("version-2 rows into {db}"));
        let r = s.query_one("SELECT kms_decrypt(name) FROM people WHERE id = 62", &[]);
        let m = message(s.query_one("SELECT kms_decrypt(name) FROM people WHERE id = 62", &[]));
        assert_eq!(sqlstate(r), "39000", "{db}: {m}");
        assert!(
            m.contains("names version 2") && m.contains("kms_keyring_import"),
            "{db}: {m}"
        );
        // Version-1 rows still decrypt.
        assert_eq!(
            one::<i64>(
                s,
                "SELECT count(*) FROM people WHERE id <= 61 AND kms_decrypt(name) = 'name-' || id"
            ),
            61
        );
    }
    println!("version-2 rows before the keyring: 39000 with hint to import it");
    for (db, s) in subs.iter_mut() {
        let summary = sync_keyring(&mut p, s);
        assert!(summary.contains("\"updated\": [\"pii\"]"), "{summary}");
        assert_eq!(decrypting(s), 70, "{db} after the import");
    }
    println!("after the import: 70/70 decrypt in both subscriber databases");

    // The subscriber's worker rewraps its local table to version 2, and
    // leaves the replicated one to the publisher.
    let (_, s0) = &mut subs[0];
    poll("the subscriber's worker rewraps local_notes", T, || {
        (one::<i64>(
            s0,
            "SELECT count(*) FROM local_notes WHERE kms_key_version(v) = 2",
        ) == 10)
            .then_some(())
    });
    assert_eq!(
        one::<i64>(
            s0,
            "SELECT count(*) FROM local_notes WHERE kms_decrypt(v) = 'local-' || id"
        ),
        10
    );
    assert_eq!(
        digest(s0),
        digest(&mut p),
        "the subscriber rewrapped nothing replicated"
    );
    assert_eq!(versions(s0), "1x61,2x9");
    assert_eq!(
        one::<i64>(
            s0,
            "SELECT count(*) FROM kms_reencryption_progress WHERE table_name = 'people'::regclass
               AND (rows_pending > 0 OR rows_rewrapped > 0)"
        ),
        0,
        // (it may have seen the table, empty, before the subscription existed)
        "the worker did not count or rewrap the subscription target"
    );
    println!("subscriber worker: local table rewrapped (10/10), replicated table untouched");

    // The publisher rewraps; the rewrapped rows replicate.
    let n = one::<i64>(&mut p, "SELECT kms_reencrypt_now('people', 'name')");
    assert_eq!(n, 61);
    let tags = one::<i64>(&mut p, "SELECT kms_reencrypt_now('people', 'tag')");
    assert!(tags > 0);
    for (db, s) in subs.iter_mut() {
        wait_replicated(&mut p, s, &format!("rewrapped rows into {db}"));
        assert_eq!(versions(s), "2x70", "{db}");
        assert_eq!(decrypting(s), 70, "{db}");
    }
    println!("publisher rewrapped 61 rows; subscribers byte-identical, 70/70 decrypt");

    // Audit chains verify on both sides.
    for (db, s) in subs.iter_mut() {
        let (ok, problem): (bool, Option<String>) = {
            let r = s
                .query_one("SELECT ok, problem FROM kms_audit_log_check()", &[])
                .unwrap();
            (r.get(0), r.get(1))
        };
        assert!(ok, "{db}: {problem:?}");
        assert_eq!(
            one::<i64>(
                s,
                "SELECT count(*) FROM kms_audit_log WHERE operation IN ('import_key', 'import_keyring')"
            ),
            5,
            "{db}: 3 imports, 2 of them changing the key, audited"
        );
    }
    assert!(one::<bool>(&mut p, "SELECT ok FROM kms_audit_log_check()"));
    assert_eq!(
        one::<i64>(
            &mut p,
            "SELECT count(*) FROM kms_audit_log WHERE operation = 'export_keyring'"
        ),
        6
    );

    // Destruction on the publisher: version 1 (no row uses it any more),
    // then the whole key (tenant erasure). Each propagates at the next import.
    p.batch_execute("SELECT kms_destroy_key_version('pii', 1)")
        .unwrap();
    for (_, s) in subs.iter_mut() {
        sync_keyring(&mut p, s);
        assert_eq!(
            one::<String>(
                s,
                "SELECT string_agg(version || ':' || state, ',' ORDER BY version) FROM kms_keys WHERE key_name = 'pii'"
            ),
            "1:destroyed,2:active"
        );
    }
    p.batch_execute("SELECT kms_destroy_key('pii', 'tenant erased')")
        .unwrap();
    assert_eq!(
        sqlstate(p.query_one("SELECT kms_decrypt(name) FROM people WHERE id = 1", &[])),
        "55000"
    );
    let (_, s0) = &mut subs[0];
    // Until the next import the subscriber still holds the key.
    assert_eq!(decrypting(s0), 70);
    for (db, s) in subs.iter_mut() {
        let summary = sync_keyring(&mut p, s);
        assert!(summary.contains("\"updated\": [\"pii\"]"), "{summary}");
        assert_eq!(
            sqlstate(s.query_one("SELECT kms_decrypt(name) FROM people WHERE id = 1", &[])),
            "55000",
            "{db}: erased on the subscriber too"
        );
        assert_eq!(
            one::<String>(
                s,
                "SELECT string_agg(version || ':' || state, ',' ORDER BY version) || ' ' || (key_destroyed_at IS NOT NULL)
                   FROM kms_keys WHERE key_name = 'pii' GROUP BY key_destroyed_at"
            ),
            "1:destroyed,2:destroyed true",
            "{db}"
        );
        assert!(
            one::<bool>(s, "SELECT ok FROM kms_audit_log_check()"),
            "{db}"
        );
        // The import's audit row carries the erased material's MACs.
        assert!(
            one::<bool>(
                s,
                "SELECT detail::jsonb ? 'erased' FROM kms_audit_log WHERE operation = 'import_key' ORDER BY id DESC LIMIT 1"
            ),
            "{db}"
        );
    }
    println!("destroy_key on the publisher: values fail (55000) on both after the next import");

    // Collisions: a key made on the subscriber under a name the publisher
    // then uses is refused, and so is a key changed on the subscriber.
    let (_, s1) = &mut subs[1];
    s1.batch_execute("SELECT kms_create_key('tenant_x')")
        .unwrap();
    p.batch_execute("SELECT kms_create_key('tenant_x')")
        .unwrap();
    let doc = one::<String>(&mut p, "SELECT kms_keyring_export()::text");
    let r = s1.query_one("SELECT kms_keyring_import($1::text::jsonb)", &[&doc]);
    assert_eq!(sqlstate(r), "42710");
    let (_, s0) = &mut subs[0];
    sync_keyring(&mut p, s0);
    s0.batch_execute("SELECT kms_rotate_key('tenant_x')")
        .unwrap();
    p.batch_execute("SELECT kms_rotate_key('tenant_x')")
        .unwrap();
    let doc = one::<String>(&mut p, "SELECT kms_keyring_export()::text");
    let r = s0.query_one("SELECT kms_keyring_import($1::text::jsonb)", &[&doc]);
    let m = message(s0.query_one("SELECT kms_keyring_import($1::text::jsonb)", &[&doc]));
    assert_eq!(sqlstate(r), "55000", "{m}");
    assert!(m.contains("changed here"), "{m}");
    println!(
        "collisions refused: 42710 (same name, other key), 55000 (key changed on the subscriber)"
    );
}

/// The keyring travels with the data: the publisher writes each export
/// into a published table in the same transaction as the key change, and
/// an `ENABLE ALWAYS` trigger on the subscriber imports it. Logical
/// replication applies transactions in commit order, so the keyring
/// reaches the subscriber before any value sealed under a new version:
/// no query there ever sees a value it cannot open (checked at every poll).
#[test]
fn keyring_feed_orders_the_keyring_before_the_values() {
    let preload = [
        "shared_preload_libraries = 'pg_kms'",
        "pg_kms.reencrypt_naptime = '1s'",
        "max_worker_processes = 24",
    ];
    let mut pub_conf = vec!["wal_level = logical"];
    pub_conf.extend(preload);
    let publisher = Cluster::start("feed_pub", &pub_conf);
    let subscriber = Cluster::start("feed_sub", &preload);
    subscriber.write_key(&publisher.read_key(), 0o600);

    let mut p = publisher.connect();
    p.batch_execute(
        "CREATE EXTENSION pg_kms;
         SELECT kms_create_key('pii');
         CREATE TABLE people (id int PRIMARY KEY, name encrypted_text, tag encrypted_text);
         CREATE TABLE keyring_feed (id bigserial PRIMARY KEY, doc jsonb NOT NULL);
         INSERT INTO keyring_feed (doc) SELECT kms_keyring_export();
         INSERT INTO people SELECT i, kms_encrypt('name-' || i, 'pii'), NULL FROM generate_series(1, 5) i;
         CREATE PUBLICATION pub FOR TABLE keyring_feed, people;",
    )
    .unwrap();
    let mut s = subscriber.connect();
    s.batch_execute(
        "CREATE EXTENSION pg_kms;
         CREATE TABLE people (id int PRIMARY KEY, name encrypted_text, tag encrypted_text);
         CREATE TABLE keyring_feed (id bigint PRIMARY KEY, doc jsonb NOT NULL);
         -- Apply workers run with an empty search_path: pin it.
         CREATE FUNCTION apply_keyring_feed() RETURNS trigger LANGUAGE plpgsql
             SET search_path = public, pg_catalog AS $$
         BEGIN PERFORM kms_keyring_import(NEW.doc); RETURN NEW; END $$;
         CREATE TRIGGER keyring_feed AFTER INSERT ON keyring_feed
             FOR EACH ROW EXECUTE FUNCTION apply_keyring_feed();
         ALTER TABLE keyring_feed ENABLE ALWAYS TRIGGER keyring_feed;",
    )
    .unwrap();
    s.batch_execute(&format!(
        "CREATE SUBSCRIPTION s CONNECTION '{}' PUBLICATION pub",
        publisher.conninfo("postgres", "postgres")
    ))
    .unwrap();
    wait_replicated(&mut p, &mut s, "initial copy");
    // Until every table is ready, a table's sync worker may apply its own
    // changes out of step with the others.
    poll("the subscription's tables are ready", T, || {
        one::<bool>(
            &mut s,
            "SELECT bool_and(srsubstate = 'r') FROM pg_subscription_rel",
        )
        .then_some(())
    });
    poll("the initial keyring", T, || {
        (one::<i64>(&mut s, "SELECT count(*) FROM kms_keys") == 1).then_some(())
    });
    assert_eq!(decrypting(&mut s), 5);

    // Each round: rotate and publish the keyring in one transaction, then
    // seal new rows under the new version. At every poll on the
    // subscriber, every row it can see decrypts.
    let mut observed = 0;
    for round in 2..=6 {
        p.batch_execute(
            "BEGIN;
             SELECT kms_rotate_key('pii');
             INSERT INTO keyring_feed (doc) SELECT kms_keyring_export();
             COMMIT;",
        )
        .unwrap();
        p.batch_execute(&format!(
            "INSERT INTO people SELECT i, kms_encrypt('name-' || i, 'pii'), NULL
               FROM generate_series({}, {}) i",
            round * 10,
            round * 10 + 9
        ))
        .unwrap();
        poll(&format!("round {round}"), T, || {
            // One statement, one snapshot: the rows counted are the rows
            // decrypted. An error here (a value under a version the keyring
            // lacks) would fail the test.
            let r = s
                .query_one(
                    "SELECT count(*), count(*) FILTER (WHERE kms_decrypt(name) = 'name-' || id) FROM people",
                    &[],
                )
                .unwrap();
            let (n, ok): (i64, i64) = (r.get(0), r.get(1));
            assert_eq!(ok, n, "round {round}: every visible row decrypts");
            observed += 1;
            // Against the publisher now: its worker rewraps the older rows
            // after the rotation, which replicates too.
            (digest(&mut s) == digest(&mut p)).then_some(())
        });
        assert_eq!(
            one::<i32>(&mut s, "SELECT max(kms_key_version(name)) FROM people"),
            round
        );
    }
    println!("keyring feed: 5 rotations, {observed} observations on the subscriber, every visible row decrypted");

    // Erasure through the feed.
    p.batch_execute(
        "BEGIN;
         SELECT kms_destroy_key('pii', 'tenant erased');
         INSERT INTO keyring_feed (doc) SELECT kms_keyring_export();
         COMMIT;",
    )
    .unwrap();
    poll("the destruction reaches the subscriber", T, || {
        (sqlstate(s.query_one("SELECT kms_decrypt(name) FROM people WHERE id = 1", &[])) == "55000")
            .then_some(())
    });
    let r = s
        .query_one("SELECT ok, problem FROM kms_audit_log_check()", &[])
        .unwrap();
    let problem: Option<String> = r.get(1);
    assert!(r.get::<_, bool>(0), "{problem:?}");
    assert_eq!(
        one::<i64>(
            &mut s,
            "SELECT count(*) FROM kms_audit_log WHERE operation = 'import_keyring'"
        ),
        7
    );
    println!(
        "keyring feed: destroy_key propagated (55000 on the subscriber), audit chain verifies"
    );
}

/// A master-key rotation on both clusters re-wraps each side's copies with
/// its own nonces: the next import recognizes the same keys (they open to
/// the same data keys) and adopts the source's bytes instead of refusing
/// them as diverged. Between the two rotations the import is refused
/// (55000), never applied under the wrong key.
#[test]
fn master_key_rotation_on_both_sides() {
    let publisher = Cluster::start("mk_pub", &["wal_level = logical"]);
    let subscriber = Cluster::start("mk_sub", &[]);
    let old = publisher.read_key();
    subscriber.write_key(&old, 0o600);
    let mut p = publisher.connect();
    let mut s = subscriber.connect();
    p.batch_execute(
        "CREATE EXTENSION pg_kms;
         SELECT kms_create_key('pii');
         SELECT kms_rotate_key('pii');
         CREATE TABLE people (id int PRIMARY KEY, name encrypted_text);
         INSERT INTO people SELECT i, kms_encrypt('name-' || i, 'pii') FROM generate_series(1, 5) i;",
    )
    .unwrap();
    s.batch_execute(
        "CREATE EXTENSION pg_kms;
         CREATE TABLE people (id int PRIMARY KEY, name encrypted_text);",
    )
    .unwrap();
    sync_keyring(&mut p, &mut s);
    // The values, copied as they are (any transport gives the same bytes).
    for r in p.query("SELECT id, name::text FROM people", &[]).unwrap() {
        let (id, v): (i32, String) = (r.get(0), r.get(1));
        s.execute(
            "INSERT INTO people VALUES ($1, $2::text::encrypted_text)",
            &[&id, &v],
        )
        .unwrap();
    }
    assert_eq!(decrypting(&mut s), 5);

    let new = random_key_hex();
    for c in [&publisher, &subscriber] {
        c.set_previous_key(&old);
        c.write_key(&new, 0o600);
        c.reload_and_wait(
            "pg_kms.previous_master_key_file",
            &c.dir
                .join("keys")
                .join("previous.key")
                .display()
                .to_string(),
        );
    }
    let mut p = publisher.connect();
    let mut s = subscriber.connect();
    assert_eq!(one::<i64>(&mut p, "SELECT kms_rotate_master_key()"), 2);
    // The subscriber has not rotated yet: refused, nothing applied.
    let doc = one::<String>(&mut p, "SELECT kms_keyring_export()::text");
    let r = s.query_one("SELECT kms_keyring_import($1::text::jsonb)", &[&doc]);
    assert_eq!(sqlstate(r), "55000");
    assert_eq!(one::<i64>(&mut s, "SELECT kms_rotate_master_key()"), 2);
    let summary = sync_keyring(&mut p, &mut s);
    assert!(summary.contains("\"updated\": [\"pii\"]"), "{summary}");
    let again = sync_keyring(&mut p, &mut s);
    assert!(again.contains("\"unchanged\": 1"), "{again}");
    assert_eq!(decrypting(&mut s), 5);
    assert!(one::<bool>(&mut s, "SELECT ok FROM kms_audit_log_check()"));
    // Both hold byte-identical wrapped material now.
    assert_eq!(
        one::<String>(&mut s, "SELECT md5((kms_keyring_export()->'keys')::text)"),
        one::<String>(&mut p, "SELECT md5((kms_keyring_export()->'keys')::text)"),
    );
    println!("master-key rotation on both sides: import refused in between (55000), then the same keys adopted, 5/5 decrypt");
}
