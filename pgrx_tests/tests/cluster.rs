//! Real-cluster tests: several sessions, restarts, real login roles, large
//! values. Run by `scripts/test.sh` after `cargo pgrx install`.

use pg_kms_integration::{message, poll, random_key_hex, sqlstate, Cluster};
use postgres::fallible_iterator::FallibleIterator;
use std::time::Duration;

fn setup(name: &str) -> (Cluster, postgres::Client) {
    let c = Cluster::start(name, &[]);
    let mut db = c.connect();
    db.batch_execute("CREATE EXTENSION pg_kms").unwrap();
    (c, db)
}

#[test]
fn two_sessions_see_rotation_disable_and_destroy() {
    let (c, mut a) = setup("sessions");
    let mut b = c.connect();
    a.execute("SELECT kms_create_key('pii')", &[]).unwrap();
    // B warms its cache on version 1.
    let v1: String = b
        .query_one("SELECT kms_encrypt('old', 'pii')::text", &[])
        .unwrap()
        .get(0);
    let ver: i32 = b
        .query_one("SELECT kms_key_version(kms_encrypt('x', 'pii'))", &[])
        .unwrap()
        .get(0);
    assert_eq!(ver, 1);
    // A rotates: B's very next call uses version 2.
    a.execute("SELECT kms_rotate_key('pii', 'test')", &[])
        .unwrap();
    let ver: i32 = b
        .query_one("SELECT kms_key_version(kms_encrypt('x', 'pii'))", &[])
        .unwrap()
        .get(0);
    assert_eq!(ver, 2);
    let got: String = b
        .query_one("SELECT kms_decrypt($1::text::encrypted_text)", &[&v1])
        .unwrap()
        .get(0);
    assert_eq!(got, "old");
    // A disables version 1: B can no longer decrypt it.
    a.execute("SELECT kms_disable_key_version('pii', 1)", &[])
        .unwrap();
    assert_eq!(
        sqlstate(b.query_one("SELECT kms_decrypt($1::text::encrypted_text)", &[&v1])),
        "55000"
    );
    a.execute("SELECT kms_enable_key_version('pii', 1)", &[])
        .unwrap();
    let got: String = b
        .query_one("SELECT kms_decrypt($1::text::encrypted_text)", &[&v1])
        .unwrap()
        .get(0);
    assert_eq!(got, "old");
    // Rollback to version 1 is seen too.
    a.execute("SELECT kms_set_primary('pii', 1)", &[]).unwrap();
    let ver: i32 = b
        .query_one("SELECT kms_key_version(kms_encrypt('x', 'pii'))", &[])
        .unwrap()
        .get(0);
    assert_eq!(ver, 1);
    // Destroy version 2 in A; B cannot use values sealed under it.
    let v2: String = a
        .query_one("SELECT kms_rewrap(kms_encrypt('y', 'pii'))::text", &[])
        .unwrap()
        .get(0);
    a.execute("SELECT kms_rotate_key('pii')", &[]).unwrap();
    let v3: String = b
        .query_one("SELECT kms_encrypt('z', 'pii')::text", &[])
        .unwrap()
        .get(0);
    a.execute("SELECT kms_destroy_key_version('pii', 1, 'retired')", &[])
        .unwrap();
    assert_eq!(
        sqlstate(b.query_one("SELECT kms_decrypt($1::text::encrypted_text)", &[&v1])),
        "55000"
    );
    let _ = v2;
    let got: String = b
        .query_one("SELECT kms_decrypt($1::text::encrypted_text)", &[&v3])
        .unwrap()
        .get(0);
    assert_eq!(got, "z");
}

#[test]
fn wrong_master_key_after_restart_then_recovery() {
    let (c, mut db) = setup("wrongkey");
    db.batch_execute(
        "SELECT kms_create_key('pii');
         CREATE TABLE people (id int PRIMARY KEY, email encrypted_text);
         INSERT INTO people SELECT g, kms_encrypt('user' || g || '@example.com', 'pii') FROM generate_series(1, 100) g;",
    )
    .unwrap();
    drop(db);
    let good = c.read_key();

    c.write_key(&random_key_hex(), 0o600);
    c.restart();
    let mut db = c.connect();
    let r = db.query("SELECT kms_decrypt(email) FROM people", &[]);
    let msg = message(db.query("SELECT kms_decrypt(email) FROM people", &[]));
    assert_eq!(sqlstate(r), "55000");
    assert!(msg.contains("does not match this keyring"), "{msg}");
    assert_eq!(
        sqlstate(db.query("SELECT kms_create_key('other')", &[])),
        "55000"
    );
    let health: serde_like::Json = serde_like::Json(
        db.query_one("SELECT kms_health()::text", &[])
            .unwrap()
            .get(0),
    );
    assert!(
        health.0.contains("\"matches_keyring\": false"),
        "{}",
        health.0
    );

    // A group-readable key file is refused with a chmod hint.
    c.write_key(&good, 0o640);
    db = c.connect();
    let msg = message(db.query("SELECT kms_decrypt(email) FROM people", &[]));
    assert!(msg.contains("chmod 600"), "{msg}");

    // Put the right key back: nothing was lost.
    c.write_key(&good, 0o600);
    c.restart();
    let mut db = c.connect();
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM people WHERE kms_decrypt(email) = 'user' || id || '@example.com'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 100);
    assert!(
        !c.server_log().contains(&good),
        "the master key must never reach the server log"
    );
}

#[test]
fn no_master_key_configured() {
    let c = Cluster::start("nokey", &[]);
    c.append_conf("pg_kms.master_key_file = ''\n");
    c.restart();
    let mut db = c.connect();
    db.batch_execute("CREATE EXTENSION pg_kms").unwrap();
    let r = db.query("SELECT kms_create_key('pii')", &[]);
    let msg = message(db.query("SELECT kms_create_key('pii')", &[]));
    assert_eq!(sqlstate(r), "55000");
    assert!(
        msg.contains("not configured") && msg.contains("pg_kms.master_key_file"),
        "{msg}"
    );
}

#[test]
fn privileges_of_the_three_roles_and_a_plain_role() {
    let (c, mut db) = setup("roles");
    db.batch_execute(
        "SELECT kms_create_key('pii');
         CREATE ROLE app LOGIN IN ROLE kms_user;
         CREATE ROLE dba LOGIN IN ROLE kms_admin;
         CREATE ROLE audit LOGIN IN ROLE kms_auditor;
         CREATE ROLE plain LOGIN;
         CREATE TABLE t (v encrypted_text);
         INSERT INTO t SELECT kms_encrypt('secret', 'pii');
         GRANT SELECT, INSERT ON t TO PUBLIC;",
    )
    .unwrap();
    let cases: &[(&str, &str, &str)] = &[
        // (role, statement, expected SQLSTATE)
        ("app", "SELECT kms_decrypt(v) FROM t", "ok"),
        ("app", "INSERT INTO t SELECT kms_encrypt('x', 'pii')", "ok"),
        (
            "app",
            "SELECT kms_rewrap(v), kms_key_name(v), kms_key_version(v) FROM t",
            "ok",
        ),
        ("app", "SELECT kms_create_key('k1')", "42501"),
        ("app", "SELECT * FROM kms_keys", "42501"),
        ("app", "SELECT * FROM kms.key_versions", "42501"),
        ("dba", "SELECT kms_create_key('k2')", "ok"),
        ("dba", "SELECT kms_rotate_key('pii')", "ok"),
        ("dba", "SELECT * FROM kms_keys", "ok"),
        ("dba", "SELECT * FROM kms_audit_log", "ok"),
        ("dba", "SELECT kms_decrypt(v) FROM t", "42501"),
        ("dba", "SELECT * FROM kms.key_versions", "42501"),
        ("audit", "SELECT * FROM kms_keys", "ok"),
        ("audit", "SELECT * FROM kms_audit_log", "ok"),
        ("audit", "SELECT kms_health(), kms_verify_audit_log()", "ok"),
        ("audit", "SELECT kms_decrypt(v) FROM t", "42501"),
        ("audit", "SELECT kms_rotate_key('pii')", "42501"),
        ("plain", "SELECT kms_encrypt('x', 'pii')", "42501"),
        ("plain", "SELECT kms_decrypt(v) FROM t", "42501"),
        ("plain", "SELECT kms_create_key('k3')", "42501"),
        ("plain", "SELECT * FROM kms_keys", "42501"),
        ("plain", "SELECT kms_health()", "42501"),
        ("plain", "SELECT * FROM kms.keys", "42501"),
    ];
    for (role, sql, want) in cases {
        let mut conn = c.connect_as(role, "postgres");
        let got = sqlstate(conn.batch_execute(sql));
        assert_eq!(&got, want, "{role}: {sql}");
    }
    // The audit log names the login role that acted.
    let actors: String = db
        .query_one(
            "SELECT string_agg(DISTINCT actor, ',' ORDER BY actor) FROM kms_audit_log",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(actors, "dba,postgres");
}

#[test]
fn round_trips_empty_multibyte_and_megabytes() {
    let (_c, mut db) = setup("values");
    db.batch_execute(
        "SELECT kms_create_key('pii'); CREATE TABLE t (id int, v encrypted_text, b encrypted_text)",
    )
    .unwrap();
    let big: String = "0123456789abcdef".repeat(5 * 65536 / 16 * 16); // 5 MiB
    let mut blob = vec![0u8; 3 << 20];
    getrandom::getrandom(&mut blob).unwrap();
    let values: Vec<String> = vec![
        "".into(),
        "é".into(),
        "日本語テキスト".into(),
        "emoji 🙂🚀 and 𝄞".into(),
        "a\u{0001}b".into(),
        big.clone(),
    ];
    for (i, v) in values.iter().enumerate() {
        db.execute(
            "INSERT INTO t VALUES ($1, kms_encrypt($2, 'pii', 'row:' || $1::int::text), kms_encrypt_bytea($3, 'pii'))",
            &[&(i as i32), v, &blob],
        )
        .unwrap();
    }
    for (i, v) in values.iter().enumerate() {
        let row = db
            .query_one(
                "SELECT kms_decrypt(v, 'row:' || id), kms_decrypt_bytea(b) FROM t WHERE id = $1",
                &[&(i as i32)],
            )
            .unwrap();
        let got: String = row.get(0);
        let got_b: Vec<u8> = row.get(1);
        assert_eq!(&got, v, "value {i}");
        assert!(got_b == blob, "bytea value {i}");
    }
    // Stored out of line without compression (ciphertext does not compress):
    // exactly the plaintext plus the 38-byte envelope.
    let size: i32 = db
        .query_one("SELECT pg_column_size(v) FROM t WHERE id = 5", &[])
        .unwrap()
        .get(0);
    assert_eq!(size as usize, big.len() + 38);
}

#[test]
fn lifecycle_notifies_kms_events() {
    let (c, mut db) = setup("notify");
    let mut listener = c.connect();
    listener.batch_execute("LISTEN kms_events").unwrap();
    db.batch_execute("SELECT kms_create_key('pii'); SELECT kms_rotate_key('pii', 'r')")
        .unwrap();
    let mut seen = Vec::new();
    poll("two notifications", Duration::from_secs(10), || {
        listener.batch_execute("SELECT 1").ok()?; // let the connection read pending messages
        let mut n = listener.notifications();
        let mut it = n.iter();
        while let Ok(Some(m)) = it.next() {
            seen.push(m.payload().to_string());
        }
        (seen.len() >= 2).then_some(())
    });
    assert!(
        seen[0].contains("\"operation\": \"create_key\"") && seen[0].contains("\"version\": 1"),
        "{}",
        seen[0]
    );
    assert!(
        seen[1].contains("\"operation\": \"rotate_key\"")
            && seen[1].contains("\"key_name\": \"pii\""),
        "{}",
        seen[1]
    );
}

mod serde_like {
    pub struct Json(pub String);
}

#[test]
fn copy_text_and_binary_round_trip_ciphertext_unchanged() {
    use std::io::{Read, Write};
    let (_c, mut db) = setup("copy");
    db.batch_execute(
        "SELECT kms_create_key('pii');
         CREATE TABLE src (id int, v encrypted_text);
         INSERT INTO src SELECT g, kms_encrypt('value ' || g, 'pii', g::text) FROM generate_series(1, 50) g;
         CREATE TABLE dst_text (LIKE src); CREATE TABLE dst_bin (LIKE src);",
    )
    .unwrap();
    for (format, dst) in [("text", "dst_text"), ("binary", "dst_bin")] {
        let mut data = Vec::new();
        db.copy_out(&format!("COPY src TO STDOUT (FORMAT {format})"))
            .unwrap()
            .read_to_end(&mut data)
            .unwrap();
        let mut w = db
            .copy_in(&format!("COPY {dst} FROM STDIN (FORMAT {format})"))
            .unwrap();
        w.write_all(&data).unwrap();
        w.finish().unwrap();
        let same: i64 = db
            .query_one(&format!("SELECT count(*) FROM src JOIN {dst} d USING (id) WHERE src.v::bytea = d.v::bytea"), &[])
            .unwrap()
            .get(0);
        assert_eq!(same, 50, "{format} COPY changed ciphertext");
        let ok: i64 = db
            .query_one(
                &format!(
                    "SELECT count(*) FROM {dst} WHERE kms_decrypt(v, id::text) = 'value ' || id"
                ),
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(ok, 50);
    }
    // Binary receive validates structure like text input does: a truncated
    // envelope sent in binary format is rejected with 22P02.
    let mut w = db
        .copy_in("COPY dst_bin (v) FROM STDIN (FORMAT binary)")
        .unwrap();
    let mut buf = Vec::new();
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&0i32.to_be_bytes());
    buf.extend_from_slice(&0i32.to_be_bytes());
    buf.extend_from_slice(&1i16.to_be_bytes());
    buf.extend_from_slice(&5i32.to_be_bytes());
    buf.extend_from_slice(&[1, 0, 0, 0, 1]);
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    w.write_all(&buf).unwrap();
    assert_eq!(sqlstate(w.finish()), "22P02");
}
