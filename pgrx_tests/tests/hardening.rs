//! Hardening: bad input, tampering, hostile roles, secrets in logs,
//! dump/restore, COPY, broken master-key sources, DROP EXTENSION.
//! Each test prints a one-line summary with counts.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use base64::Engine;
use pg_kms_integration::{message, pairs, poll, random_key_hex, sqlstate, Cluster};
use postgres::Client;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn setup(name: &str, extra: &[&str]) -> (Cluster, Client) {
    let c = Cluster::start(name, extra);
    let mut db = c.connect();
    db.batch_execute("CREATE EXTENSION pg_kms; SELECT kms_create_key('pii');")
        .unwrap();
    (c, db)
}

/// SQLSTATE counts of `kms_decrypt` over every single-bit flip of `value`.
fn flip_every_bit(
    db: &mut Client,
    value_sql: &str,
    context: &str,
) -> (usize, BTreeMap<String, usize>) {
    db.batch_execute(&format!(
        "CREATE TEMP TABLE IF NOT EXISTS flips (bit int, state text);
         TRUNCATE flips;
         DO $$
         DECLARE b bytea := ({value_sql})::bytea; st text;
         BEGIN
           FOR i IN 0 .. length(b) * 8 - 1 LOOP
             BEGIN
               PERFORM kms_decrypt(('kms:' || translate(encode(set_bit(b, i, 1 - get_bit(b, i)), 'base64'), E'\\n', ''))::encrypted_text, {ctx});
               st := 'decrypted';
             EXCEPTION WHEN OTHERS THEN st := SQLSTATE;
             END;
             INSERT INTO flips VALUES (i, st);
           END LOOP;
         END $$;",
        ctx = if context.is_empty() { "NULL".to_string() } else { format!("'{context}'") }
    ))
    .unwrap();
    let mut by_state = BTreeMap::new();
    let mut total = 0;
    for r in db
        .query("SELECT state, count(*) FROM flips GROUP BY 1", &[])
        .unwrap()
    {
        let n: i64 = r.get(1);
        by_state.insert(r.get::<_, String>(0), n as usize);
        total += n as usize;
    }
    (total, by_state)
}

#[test]
fn every_bit_flip_is_rejected() {
    let (_c, mut db) = setup("h_flips", &[]);
    db.batch_execute("SELECT kms_rotate_key('pii')").unwrap();
    let (total, states) = flip_every_bit(
        &mut db,
        "kms_encrypt('alice@example.com', 'pii', 'user:1')",
        "user:1",
    );
    let rejected = total - states.get("decrypted").copied().unwrap_or(0);
    // Per field of the envelope: how each flip was rejected.
    let per_field: Vec<(String, i64, String)> = db
        .query(
            "SELECT field, count(*), string_agg(state || ' ' || n, ', ' ORDER BY state)
               FROM (SELECT field, state, count(*) OVER (PARTITION BY field, state) AS n,
                            row_number() OVER (PARTITION BY field, state) AS rn
                       FROM (SELECT CASE WHEN bit < 8 THEN '1 format' WHEN bit < 16 THEN '2 flags'
                                         WHEN bit < 48 THEN '3 key id' WHEN bit < 80 THEN '4 version'
                                         WHEN bit < 176 THEN '5 nonce'
                                         WHEN bit < (SELECT max(bit) - 127 FROM flips) THEN '6 ciphertext'
                                         ELSE '7 tag' END AS field, state FROM flips) f) g
              GROUP BY field ORDER BY field",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get::<_, i64>(1), r.get(2)))
        .collect();
    let mut field_counts = Vec::new();
    for (field, n, how) in &per_field {
        let how = how
            .split(", ")
            .filter(|p| !p.is_empty())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(", ");
        field_counts.push(format!("{} {n}/{n} ({how})", &field[2..]));
    }
    println!("bit flips rejected: {rejected}/{total} {states:?}");
    println!("  by field: {}", field_counts.join("; "));
    assert_eq!(rejected, total, "a flipped value decrypted");
    // Every flip in the nonce, ciphertext and tag, and in the defined flag
    // bits, is an authentication failure (39000).
    let auth: i64 = db
        .query_one("SELECT count(*) FROM flips WHERE (bit >= 80 OR (bit / 8 = 1 AND bit % 8 IN (0, 1, 2))) AND state <> '39000'", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        auth, 0,
        "nonce, ciphertext, tag and flag flips must all give 39000"
    );
    // The rest of the header is rejected before any decryption: an unknown
    // format, flag or impossible version is malformed (22P02); an altered
    // key id names a key this keyring does not have (42704); an altered
    // version of a known key is an authentication failure (39000).
    let other: Vec<(i32, String)> = pairs(
        &mut db,
        "SELECT bit, state FROM flips WHERE state NOT IN ('39000', '22P02', '42704') ORDER BY bit",
    );
    assert!(other.is_empty(), "unexpected outcomes: {other:?}");
}

#[test]
fn swapped_ciphertexts_and_foreign_values_fail() {
    let (_c, mut db) = setup("h_swap", &[]);
    db.batch_execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, ssn encrypted_text);
         INSERT INTO accounts SELECT g, kms_encrypt('ssn-' || g, 'pii', 'account:' || g) FROM generate_series(1, 100) g;
         -- An attacker with UPDATE swaps neighbouring ciphertexts.
         UPDATE accounts a SET ssn = b.ssn FROM accounts b WHERE b.id = CASE WHEN a.id % 2 = 1 THEN a.id + 1 ELSE a.id - 1 END;",
    )
    .unwrap();
    let mut failed = 0;
    for id in 1..=100i32 {
        let r = db.query_one(
            "SELECT kms_decrypt(ssn, 'account:' || id) FROM accounts WHERE id = $1",
            &[&id],
        );
        assert_eq!(sqlstate(r), "39000");
        failed += 1;
    }
    println!("swapped ciphertexts rejected: {failed}/100");

    // A value naming a key id this keyring does not have.
    let v: String = db
        .query_one("SELECT kms_encrypt('x', 'pii')::text", &[])
        .unwrap()
        .get(0);
    let mut b = base64::engine::general_purpose::STANDARD
        .decode(&v[4..])
        .unwrap();
    b[2..6].copy_from_slice(&0x7ABC_DEF0u32.to_be_bytes());
    let foreign = format!(
        "kms:{}",
        base64::engine::general_purpose::STANDARD.encode(&b)
    );
    let r = db.query_one("SELECT kms_decrypt($1::text::encrypted_text)", &[&foreign]);
    let msg = message(db.query_one("SELECT kms_decrypt($1::text::encrypted_text)", &[&foreign]));
    assert_eq!(sqlstate(r), "42704");
    assert!(msg.contains("not in this database's keyring"), "{msg}");
    println!(
        "foreign key id: 42704 \"{}\"",
        msg.split(" | ").next().unwrap()
    );
}

#[test]
fn awkward_values_and_a_latin1_database() {
    let (c, mut db) = setup("h_values", &[]);
    let ten_mb = "x".repeat(10 << 20);
    let cases: Vec<(&str, Option<String>)> = vec![
        ("NULL", None),
        ("empty", Some(String::new())),
        (
            "control chars next to NUL",
            Some("a\u{1}\u{2}b\u{7f}".into()),
        ),
        ("4-byte UTF-8", Some("𝄞 🙂 🚀 𠜎".into())),
        ("10 MB", Some(ten_mb)),
    ];
    for (what, v) in &cases {
        let got: Option<String> = db
            .query_one("SELECT kms_decrypt(kms_encrypt($1, 'pii'))", &[v])
            .unwrap()
            .get(0);
        assert!(&got == v, "{what} did not round-trip");
    }
    println!(
        "awkward values round-tripped: {}/{}",
        cases.len(),
        cases.len()
    );

    db.batch_execute(
        "CREATE DATABASE l1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    )
    .unwrap();
    let mut l1 = c.connect_as("postgres", "l1");
    l1.batch_execute("CREATE EXTENSION pg_kms; SELECT kms_create_key('pii')")
        .unwrap();
    let got: String = l1
        .query_one("SELECT kms_decrypt(kms_encrypt('café crème', 'pii'))", &[])
        .unwrap()
        .get(0);
    assert_eq!(got, "café crème");
    // The empty text and pure-ASCII text (which the server passes through
    // unconverted) come back whole: no read of the unconverted buffer as a
    // C string.
    for v in ["", "plain ascii", "é"] {
        let got: String = l1
            .query_one("SELECT kms_decrypt(kms_encrypt($1, 'pii'))", &[&v])
            .unwrap()
            .get(0);
        assert_eq!(got, v);
    }
    // Text is sealed as UTF-8 whatever the database encoding.
    let utf8: bool = l1
        .query_one(
            "SELECT kms_decrypt_bytea(kms_encrypt('é', 'pii')) = '\\xc3a9'::bytea",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(utf8);
    // Non-ASCII reasons and bad key names are handled in any encoding.
    l1.batch_execute("SELECT kms_rotate_key('pii', 'rotation planifiée')")
        .unwrap();
    assert_eq!(
        sqlstate(l1.batch_execute("SELECT kms_create_key('clé')")),
        "22023"
    );
    // A UTF-8 value with no LATIN1 equivalent gives a clear conversion error.
    let r = l1.query_one(
        "SELECT kms_decrypt(kms_encrypt_bytea('\\xf09f9982'::bytea, 'pii'))",
        &[],
    );
    println!(
        "LATIN1 database: round trip ok; emoji sealed as bytea -> {}",
        sqlstate(r)
    );

    // SQL_ASCII takes any byte as text but NUL, as the server does.
    db.batch_execute(
        "CREATE DATABASE sa ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    )
    .unwrap();
    let mut sa = c.connect_as("postgres", "sa");
    sa.batch_execute("CREATE EXTENSION pg_kms; SELECT kms_create_key('pii')")
        .unwrap();
    let ok: bool = sa
        .query_one(
            "SELECT kms_decrypt(kms_encrypt('plain ascii', 'pii')) = 'plain ascii' \
               AND octet_length(kms_decrypt(kms_encrypt_bytea('\\x61ff62'::bytea, 'pii'))) = 3",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(ok);
    assert_eq!(
        sqlstate(sa.query_one(
            "SELECT kms_decrypt(kms_encrypt_bytea('\\x610062'::bytea, 'pii'))",
            &[],
        )),
        "22021"
    );
}

#[test]
fn search_path_hijack_runs_no_attacker_code() {
    let (c, mut db) = setup("h_hijack", &[]);
    db.batch_execute(
        "CREATE ROLE mallory LOGIN IN ROLE kms_user, kms_admin;
         CREATE SCHEMA evil AUTHORIZATION mallory;
         CREATE TABLE public.hits (who text, what text);
         GRANT INSERT, SELECT ON public.hits TO PUBLIC;
         CREATE TABLE public.victim (id int PRIMARY KEY, v encrypted_text);
         INSERT INTO victim SELECT g, kms_encrypt('v' || g, 'pii') FROM generate_series(1, 10) g;
         GRANT SELECT, UPDATE ON public.victim TO mallory;",
    )
    .unwrap();
    let mut m = c.connect_as("mallory", "postgres");
    // Functions and operators named like those pg_kms uses internally.
    m.batch_execute(
        r#"
        CREATE FUNCTION evil.trap(what text) RETURNS void LANGUAGE sql AS
          $$ INSERT INTO public.hits VALUES (current_user, what) $$;
        CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT evil.trap('now'); SELECT pg_catalog.now() $$;
        CREATE FUNCTION evil.sha256(bytea) RETURNS bytea LANGUAGE sql AS $$ SELECT evil.trap('sha256'); SELECT pg_catalog.sha256($1) $$;
        CREATE FUNCTION evil.pg_notify(text, text) RETURNS void LANGUAGE sql AS $$ SELECT evil.trap('pg_notify') $$;
        CREATE FUNCTION evil.count(anyelement) RETURNS bigint LANGUAGE sql AS $$ SELECT evil.trap('count'); SELECT 0::bigint $$;
        CREATE FUNCTION evil.has_column_privilege(oid, text, text) RETURNS boolean LANGUAGE sql AS $$ SELECT evil.trap('hcp'); SELECT true $$;
        CREATE FUNCTION evil.texteq(text, text) RETURNS boolean LANGUAGE sql AS $$ SELECT evil.trap('=text'); SELECT pg_catalog.texteq($1, $2) $$;
        CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.texteq);
        CREATE FUNCTION evil.int4eq(int, int) RETURNS boolean LANGUAGE sql AS $$ SELECT evil.trap('=int'); SELECT pg_catalog.int4eq($1, $2) $$;
        CREATE OPERATOR evil.= (LEFTARG = int, RIGHTARG = int, FUNCTION = evil.int4eq);
        CREATE FUNCTION evil.oideq(oid, oid) RETURNS boolean LANGUAGE sql AS $$ SELECT evil.trap('=oid'); SELECT pg_catalog.oideq($1, $2) $$;
        CREATE OPERATOR evil.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = evil.oideq);
        SET search_path = evil, public, pg_catalog;
        "#,
    )
    .unwrap();
    // Everything mallory may call, with a cache miss first (identity switch).
    db.batch_execute("SELECT kms_rotate_key('pii')").unwrap();
    for sql in [
        "SELECT kms_encrypt('a', 'pii')",
        "SELECT kms_decrypt(v) FROM public.victim",
        "SELECT kms_key_name(v) FROM public.victim",
        "SELECT kms_rewrap(v) FROM public.victim",
        "SELECT kms_create_key('m1')",
        "SELECT kms_rotate_key('m1', 'r')",
        "SELECT kms_set_primary('m1', 1)",
        "SELECT kms_disable_key_version('m1', 2)",
        "SELECT kms_enable_key_version('m1', 2)",
        "SELECT kms_destroy_key_version('m1', 2)",
        "SELECT * FROM kms_key_usage('pii')",
        "SELECT kms_reencrypt_now('public.victim', 'v')",
        "SELECT kms_health()",
        "SELECT kms_verify_audit_log()",
        "SELECT * FROM kms_keys",
        "SELECT * FROM kms_audit_log",
    ] {
        m.batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let hits: Vec<(String, String)> = pairs(&mut db, "SELECT who, what FROM public.hits");
    println!(
        "search_path hijack: {} attacker functions run by pg_kms (16 entry points tried)",
        hits.len()
    );
    assert!(hits.is_empty(), "pg_kms ran attacker code: {hits:?}");
}

/// Data keys re-derived independently from the master key and the catalog.
fn data_keys(master_hex: &str, db: &mut Client) -> Vec<[u8; 32]> {
    let mk = hex::decode(master_hex.trim()).unwrap();
    let mut kek = [0u8; 32];
    hkdf::Hkdf::<sha2::Sha256>::new(Some(b"pg_kms"), &mk)
        .expand(b"pg_kms v1 key-encryption key", &mut kek)
        .unwrap();
    let cipher = Aes256Gcm::new((&kek).into());
    let mut out = Vec::new();
    for r in db.query("SELECT key_id, version, wrapped_key FROM kms.key_versions WHERE wrapped_key IS NOT NULL", &[]).unwrap() {
        let (id, ver, w): (i32, i32, Vec<u8>) = (r.get(0), r.get(1), r.get(2));
        let mut aad = b"pg_kms v1 data key".to_vec();
        aad.extend_from_slice(&(id as u32).to_be_bytes());
        aad.extend_from_slice(&(ver as u32).to_be_bytes());
        let mut dk = [0u8; 32];
        dk.copy_from_slice(&w[12..44]);
        cipher
            .decrypt_in_place_detached(Nonce::from_slice(&w[..12]), &aad, &mut dk, Tag::from_slice(&w[44..]))
            .expect("the documented key hierarchy unwraps the catalog's data keys");
        out.push(dk);
    }
    out
}

#[test]
fn no_secret_reaches_the_log_or_a_non_superuser() {
    let (c, mut db) = setup(
        "h_log",
        &[
            "log_statement = 'all'",
            "log_min_messages = debug5",
            "log_min_error_statement = debug5",
            "log_parameter_max_length = 0",
            "log_parameter_max_length_on_error = 0",
        ],
    );
    let marker = format!("PLAINTEXT-{}", &random_key_hex()[..16]);
    let ctx = format!("CTX-{}", &random_key_hex()[..16]);
    db.batch_execute(
        "CREATE TABLE t (id int, v encrypted_text);
         CREATE ROLE app LOGIN IN ROLE kms_user; CREATE ROLE aud LOGIN IN ROLE kms_auditor;
         CREATE ROLE adm LOGIN IN ROLE kms_admin; CREATE ROLE nobody LOGIN;
         GRANT SELECT, INSERT ON t TO app, aud, adm, nobody;",
    )
    .unwrap();
    let mut app = c.connect_as("app", "postgres");
    // The whole API, plaintext only as bind parameters.
    for i in 0..20 {
        app.execute(
            "INSERT INTO t VALUES ($1, kms_encrypt($2, 'pii', $3))",
            &[&i, &format!("{marker}-{i}"), &ctx],
        )
        .unwrap();
    }
    let _ = app
        .query("SELECT kms_decrypt(v, $1) FROM t", &[&ctx])
        .unwrap();
    let _ = app.query("SELECT kms_decrypt(v, 'wrong') FROM t", &[]); // 39000 with log_min_error_statement
    let _ = app
        .query(
            "SELECT kms_decrypt_bytea(kms_encrypt_bytea($1, 'pii'))",
            &[&marker.as_bytes()],
        )
        .unwrap();
    db.batch_execute("SELECT kms_rotate_key('pii'); SELECT kms_create_key('other');")
        .unwrap();
    let _ = app
        .query("SELECT kms_rewrap(v, $1) FROM t", &[&ctx])
        .unwrap();
    db.batch_execute(
        "SELECT kms_health(), kms_verify_audit_log(); SELECT * FROM kms_key_usage('pii');",
    )
    .unwrap();
    // Master-key rotation.
    let old_key = c.read_key();
    let new_key = random_key_hex();
    let prev = c.dir.join("keys/previous.key");
    std::fs::write(&prev, format!("{old_key}\n")).unwrap();
    let _ = std::process::Command::new("chmod")
        .arg("600")
        .arg(&prev)
        .status();
    let _ = std::process::Command::new("chown")
        .arg("postgres:postgres")
        .arg(&prev)
        .status();
    c.write_key(&new_key, 0o600);
    c.append_conf(&format!(
        "pg_kms.previous_master_key_file = '{}'\n",
        prev.display()
    ));
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    let mut db = c.connect();
    let n: i64 = db
        .query_one("SELECT kms_rotate_master_key()", &[])
        .unwrap()
        .get(0);
    assert!(n >= 3);
    let dks = data_keys(&new_key, &mut db);
    let wrapped: Vec<Vec<u8>> = db
        .query(
            "SELECT wrapped_key FROM kms.key_versions WHERE wrapped_key IS NOT NULL",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let _ = app
        .query("SELECT kms_decrypt(v, $1) FROM t", &[&ctx])
        .unwrap();

    // What every role can see: views and functions it may call.
    let mut seen = String::new();
    for (role, queries) in [
        (
            "app",
            vec!["SELECT v::text, kms_key_name(v), kms_decrypt(v, '') FROM t"],
        ),
        (
            "aud",
            vec![
                "SELECT * FROM kms_keys",
                "SELECT * FROM kms_audit_log",
                "SELECT kms_health()::text",
                "SELECT * FROM kms_stats",
            ],
        ),
        (
            "adm",
            vec![
                "SELECT * FROM kms_keys",
                "SELECT * FROM kms_audit_log",
                "SELECT kms_health()::text",
                "SELECT * FROM kms_key_usage('pii')",
                "SELECT * FROM kms_reencryption_progress",
            ],
        ),
        (
            "nobody",
            vec![
                "SELECT * FROM kms.key_versions",
                "SELECT kms_decrypt(v) FROM t",
            ],
        ),
    ] {
        let mut conn = c.connect_as(role, "postgres");
        for q in queries {
            match conn.simple_query(q) {
                Ok(msgs) => {
                    for m in msgs {
                        if let postgres::SimpleQueryMessage::Row(r) = m {
                            for i in 0..r.len() {
                                seen.push_str(r.get(i).unwrap_or(""));
                                seen.push('\n');
                            }
                        }
                    }
                }
                Err(e) => {
                    seen.push_str(&e.to_string());
                    if let Some(d) = e.as_db_error() {
                        seen.push_str(d.detail().unwrap_or(""));
                        seen.push_str(d.hint().unwrap_or(""));
                    }
                }
            }
        }
    }
    let log = c.server_log();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut secrets: Vec<(String, String)> = vec![
        ("old master key".into(), old_key.clone()),
        ("new master key".into(), new_key.clone()),
        ("plaintext bind parameter".into(), marker.clone()),
        ("context bind parameter".into(), ctx.clone()),
    ];
    for (i, dk) in dks.iter().enumerate() {
        secrets.push((format!("data key {i} (hex)"), hex::encode(dk)));
        secrets.push((format!("data key {i} (base64)"), b64(dk)));
    }
    for (i, w) in wrapped.iter().enumerate() {
        secrets.push((format!("wrapped key {i} (hex)"), hex::encode(w)));
        secrets.push((format!("wrapped key {i} (base64)"), b64(w)));
    }
    let mut leaks = Vec::new();
    for (what, s) in &secrets {
        if log.to_lowercase().contains(&s.to_lowercase()) {
            leaks.push(format!("server log: {what}"));
        }
        if what != "plaintext bind parameter"
            && what != "context bind parameter"
            && seen.to_lowercase().contains(&s.to_lowercase())
        {
            leaks.push(format!("non-superuser output: {what}"));
        }
    }
    println!(
        "secret scan: {} leaks; {} secrets checked in {} log lines and {} bytes of non-superuser output",
        leaks.len(),
        secrets.len(),
        log.lines().count(),
        seen.len()
    );
    assert!(leaks.is_empty(), "{leaks:?}");
    assert!(log.lines().count() > 100, "debug5 logging was on");
}

fn dump(c: &Cluster, args: &[&str], out: &std::path::Path) {
    c.pg_dump("shop", &[args, &["-f", out.to_str().unwrap()]].concat());
}

fn restore(c: &Cluster, file: &std::path::Path, custom: bool) {
    let mut db = c.connect();
    db.batch_execute("CREATE DATABASE shop").unwrap();
    if custom {
        c.client("pg_restore", "shop", &[file.to_str().unwrap()]);
    } else {
        c.psql_file("shop", file);
    }
}

fn fingerprint(db: &mut Client) -> (String, i64) {
    let r = db
        .query_one(
            "SELECT md5(string_agg(v::text || coalesce(w::text, ''), ',' ORDER BY id)), count(*) FROM t",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

fn all_decrypt(db: &mut Client) -> i64 {
    db.query_one(
        "SELECT count(*) FROM t WHERE kms_decrypt(v) = 'value ' || id AND (w IS NULL OR kms_decrypt(w, 'row:' || id) = 'ctx ' || id)",
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn dump_and_restore_with_the_same_and_a_different_master_key() {
    let src = Cluster::start("h_dump_src", &[]);
    let mut db = src.connect();
    db.batch_execute("CREATE DATABASE shop").unwrap();
    let mut shop = src.connect_as("postgres", "shop");
    shop.batch_execute(
        "CREATE EXTENSION pg_kms; SELECT kms_create_key('pii');
         CREATE TABLE t (id int PRIMARY KEY, v encrypted_text, w encrypted_text);
         INSERT INTO t SELECT g, kms_encrypt('value ' || g, 'pii'), NULL FROM generate_series(1, 500) g;
         SELECT kms_rotate_key('pii', 'before dump');
         INSERT INTO t SELECT g, kms_encrypt('value ' || g, 'pii'), kms_encrypt('ctx ' || g, 'pii', 'row:' || g) FROM generate_series(501, 1000) g;
         SELECT kms_disable_key_version('pii', 1); SELECT kms_enable_key_version('pii', 1);",
    )
    .unwrap();
    let (fp, rows) = fingerprint(&mut shop);
    assert_eq!(all_decrypt(&mut shop), 1000);
    let plain = src.dir.join("shop.sql");
    let custom = src.dir.join("shop.dump");
    dump(&src, &["-Fp"], &plain);
    dump(&src, &["-Fc"], &custom);
    let key = src.read_key();

    for (kind, file, is_custom) in [("plain", &plain, false), ("custom", &custom, true)] {
        // Same master key: everything decrypts, nothing was encrypted twice.
        let dst = Cluster::start(&format!("h_dump_{kind}_same"), &[]);
        dst.write_key(&key, 0o600);
        restore(&dst, file, is_custom);
        let mut r = dst.connect_as("postgres", "shop");
        assert_eq!(
            fingerprint(&mut r),
            (fp.clone(), rows),
            "{kind}: ciphertext changed in dump/restore"
        );
        let ok = all_decrypt(&mut r);
        assert!(r
            .query_one("SELECT kms_verify_audit_log()", &[])
            .unwrap()
            .get::<_, bool>(0));
        println!("{kind} dump restored with the same master key: {ok}/{rows} values decrypt, ciphertext identical");
        assert_eq!(ok, rows);

        // Different master key: a clear 55000; after fixing it, nothing was lost.
        let other = Cluster::start(&format!("h_dump_{kind}_other"), &[]);
        restore(&other, file, is_custom);
        let mut r = other.connect_as("postgres", "shop");
        let e = r.query_one("SELECT kms_decrypt(v) FROM t LIMIT 1", &[]);
        let msg = message(r.query_one("SELECT kms_decrypt(v) FROM t LIMIT 1", &[]));
        assert_eq!(sqlstate(e), "55000");
        assert!(msg.contains("does not match this keyring"), "{msg}");
        other.write_key(&key, 0o600);
        let mut r = other.connect_as("postgres", "shop");
        let ok = all_decrypt(&mut r);
        println!("{kind} dump restored with another master key: 55000 \"{}\"; after fixing the key {ok}/{rows} decrypt", msg.split(" | ").next().unwrap());
        assert_eq!(ok, rows);
    }
}

#[test]
fn broken_master_key_sources_keep_the_server_up() {
    let c = Cluster::start("h_sources", &["pg_kms.master_key_command_timeout = 300"]);
    let mut db = c.connect();
    db.batch_execute("CREATE EXTENSION pg_kms; SELECT kms_create_key('pii');")
        .unwrap();
    db.batch_execute("CREATE DATABASE other").unwrap();
    let mut results = Vec::new();
    let mut check = |what: &str, conf: &str, expect_in_msg: &str| {
        c.append_conf(&format!("{conf}\n"));
        c.restart();
        let mut db = c.connect();
        let t = Instant::now();
        let r = db.query_one("SELECT kms_encrypt('x', 'pii')", &[]);
        let msg = message(db.query_one("SELECT kms_encrypt('x', 'pii')", &[]));
        assert_eq!(sqlstate(r), "55000", "{what}");
        assert!(msg.contains(expect_in_msg), "{what}: {msg}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what}: took {:?}",
            t.elapsed()
        );
        // The server and other databases are unaffected.
        let mut other = c.connect_as("postgres", "other");
        assert_eq!(
            other.query_one("SELECT 1", &[]).unwrap().get::<_, i32>(0),
            1
        );
        results.push(format!("{what}: 55000"));
    };
    let missing = c.dir.join("keys/missing.key");
    check(
        "missing file",
        &format!("pg_kms.master_key_file = '{}'", missing.display()),
        "cannot read file",
    );
    let key = c.read_key();
    c.write_key(&key, 0o644);
    check(
        "group/world-readable file",
        &format!("pg_kms.master_key_file = '{}'", c.key_file().display()),
        "chmod 600",
    );
    check(
        "command that fails",
        "pg_kms.master_key_file = ''\npg_kms.master_key_command = 'exit 7'",
        "status 7",
    );
    check(
        "command that hangs",
        "pg_kms.master_key_command = 'sleep 60'",
        "timed out after 300 ms",
    );
    check(
        "command printing garbage",
        "pg_kms.master_key_command = 'echo not-a-key'",
        "64 hexadecimal",
    );
    println!(
        "broken master-key sources: {}/5 gave 55000 and the server stayed up ({})",
        results.len(),
        results.join("; ")
    );
    poll(
        "server still accepting connections",
        Duration::from_secs(10),
        || c.connect().query_one("SELECT 1", &[]).ok(),
    );
}

#[test]
fn drop_extension_is_refused_while_encrypted_columns_exist() {
    let (_c, mut db) = setup("h_drop", &[]);
    db.batch_execute(
        "CREATE TABLE t (v encrypted_text); INSERT INTO t SELECT kms_encrypt('x', 'pii');",
    )
    .unwrap();
    assert_eq!(sqlstate(db.batch_execute("DROP EXTENSION pg_kms")), "2BP01");
    let n: i64 = db
        .query_one("SELECT count(*) FROM kms_keys", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "keyring intact after the refused DROP");
    // The update path exists (0.1.0 is the only released version so far).
    db.batch_execute("ALTER EXTENSION pg_kms UPDATE").unwrap();
    println!("DROP EXTENSION with encrypted columns: refused (2BP01), keyring intact");
}
