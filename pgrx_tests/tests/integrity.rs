//! Integrity on real clusters: destroyed keys stay destroyed (also under the
//! worker's scheduled rotation), the keyed audit chain and its head in the
//! server log, key-state rows edited or put back from a saved copy, and the
//! crypto-shredding procedure (rotate the master key, retire the old one).

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use pg_kms_integration::{as_postgres, message, poll, random_key_hex, sqlstate, Cluster};
use postgres::Client;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

fn hkdf32(ikm: &[u8], info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    hkdf::Hkdf::<Sha256>::new(Some(b"pg_kms"), ikm)
        .expand(info, &mut out)
        .unwrap();
    out
}

/// Unwraps a stored wrapped data key under the master key `master_hex`,
/// independently of pg_kms (documented hierarchy).
fn unwrap_with(master_hex: &str, key_id: i32, version: i32, wrapped: &[u8]) -> Option<[u8; 32]> {
    let kek = hkdf32(
        &hex::decode(master_hex).unwrap(),
        b"pg_kms v1 key-encryption key",
    );
    let mut aad = b"pg_kms v1 data key".to_vec();
    aad.extend_from_slice(&(key_id as u32).to_be_bytes());
    aad.extend_from_slice(&(version as u32).to_be_bytes());
    let mut dk = [0u8; 32];
    dk.copy_from_slice(&wrapped[12..44]);
    Aes256Gcm::new((&kek).into())
        .decrypt_in_place_detached(
            Nonce::from_slice(&wrapped[..12]),
            &aad,
            &mut dk,
            Tag::from_slice(&wrapped[44..]),
        )
        .ok()
        .map(|_| dk)
}

/// The last "pg_kms: audit chain head" line of `db` in the server log: (id, mac).
fn logged_head(c: &Cluster, db: &str) -> Option<(i64, String)> {
    let prefix = format!("pg_kms: audit chain head of database {db}: id=");
    c.server_log()
        .lines()
        .filter_map(|l| l.split_once(&prefix).map(|(_, rest)| rest.to_string()))
        .next_back()
        .map(|rest| {
            let (id, mac) = rest.split_once(" mac=").unwrap();
            (id.parse().unwrap(), mac.trim().to_string())
        })
}

fn check(
    db: &mut Client,
) -> (
    bool,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
) {
    let r = db
        .query_one(
            "SELECT ok, first_bad_id, problem, head_id, head_mac FROM kms_audit_log_check()",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

#[test]
fn destroyed_key_is_never_rotated_again() {
    let c = Cluster::start(
        "i_destroyed",
        &[
            "shared_preload_libraries = 'pg_kms'",
            "pg_kms.reencrypt_naptime = '200ms'",
        ],
    );
    let mut db = c.connect();
    db.batch_execute(
        "CREATE EXTENSION pg_kms;
         SELECT kms_create_key('live', interval '1 second');
         SELECT kms_create_key('dead', interval '1 second');
         SELECT kms_destroy_key('dead', 'tenant left');",
    )
    .unwrap();
    // The worker is rotating: the live key gets a scheduled rotation ...
    poll(
        "a scheduled rotation of the live key",
        Duration::from_secs(30),
        || {
            let n: i64 = db
                .query_one("SELECT count(*) FROM kms_keys WHERE key_name = 'live'", &[])
                .ok()?
                .get(0);
            (n >= 2).then_some(())
        },
    );
    // ... while the destroyed one, overdue the whole time, never is (absence
    // over ~3 s: at least ten worker passes at a 200 ms naptime).
    let until = Instant::now() + Duration::from_secs(3);
    let mut polls = 0;
    while Instant::now() < until {
        let (versions, live): (i64, i64) = {
            let r = db
                .query_one(
                    "SELECT count(*) FILTER (WHERE key_name = 'dead'), count(*) FILTER (WHERE key_name = 'dead' AND state <> 'destroyed') FROM kms_keys",
                    &[],
                )
                .unwrap();
            (r.get(0), r.get(1))
        };
        assert_eq!(
            (versions, live),
            (1, 0),
            "the destroyed key got a new version"
        );
        polls += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let rotations: i64 = db
        .query_one("SELECT count(*) FROM kms_audit_log WHERE key_name = 'dead' AND operation = 'rotate_key'", &[])
        .unwrap()
        .get(0);
    assert_eq!(rotations, 0);
    let live: i64 = db
        .query_one("SELECT count(*) FROM kms_keys WHERE key_name = 'live'", &[])
        .unwrap()
        .get(0);
    assert!(
        live >= 3,
        "the worker kept rotating the live key meanwhile ({live} versions)"
    );
    // Manual acts: 55000 with a hint, naming the key as destroyed.
    for sql in [
        "SELECT kms_rotate_key('dead')",
        "SELECT kms_set_primary('dead', 1)",
        "SELECT kms_enable_key_version('dead', 1)",
        "SELECT kms_blind_index('x', 'dead')",
    ] {
        let r = db.query_one(sql, &[]);
        let m = message(db.query_one(sql, &[]));
        assert_eq!(sqlstate(r), "55000", "{sql}");
        assert!(
            m.contains("key \"dead\" is destroyed")
                && m.contains("A destroyed key stays destroyed"),
            "{sql}: {m}"
        );
    }
    let r = db.query_one("SELECT kms_encrypt('x', 'dead')", &[]);
    let m = message(db.query_one("SELECT kms_encrypt('x', 'dead')", &[]));
    assert_eq!(sqlstate(r), "55000");
    assert!(m.contains("destroyed"), "{m}");
    assert_eq!(
        sqlstate(db.query_one("SELECT kms_create_key('dead')", &[])),
        "42710"
    );
    let ok: bool = db
        .query_one("SELECT kms_verify_audit_log()", &[])
        .unwrap()
        .get(0);
    assert!(ok);
    println!(
        "destroyed key: 0 rotations over {polls} polls in 3 s while the live key got {} versions",
        live
    );
}

/// The canonical audit-row encoding of src/crypto/integrity.rs, written
/// again here so that the test can forge a correctly re-hashed chain.
fn canon_audit(row: &postgres::Row, reason: Option<&[u8]>) -> Vec<u8> {
    fn b(out: &mut Vec<u8>, v: Option<&[u8]>) {
        match v {
            Some(x) => {
                out.push(b'b');
                out.extend_from_slice(&(x.len() as u32).to_be_bytes());
                out.extend_from_slice(x);
            }
            None => out.push(b'n'),
        }
    }
    fn i(out: &mut Vec<u8>, v: Option<i64>) {
        match v {
            Some(x) => {
                out.push(b'i');
                out.extend_from_slice(&x.to_be_bytes());
            }
            None => out.push(b'n'),
        }
    }
    let mut out = Vec::new();
    b(&mut out, Some(b"pg_kms v1 audit row"));
    i(&mut out, Some(row.get::<_, i64>("id")));
    i(&mut out, Some(row.get::<_, i64>("at_us")));
    b(&mut out, Some(row.get::<_, String>("actor").as_bytes()));
    b(&mut out, Some(row.get::<_, String>("operation").as_bytes()));
    b(
        &mut out,
        row.get::<_, Option<String>>("key_name")
            .as_deref()
            .map(str::as_bytes),
    );
    i(
        &mut out,
        row.get::<_, Option<i32>>("version").map(i64::from),
    );
    b(&mut out, reason);
    b(
        &mut out,
        row.get::<_, Option<String>>("detail")
            .as_deref()
            .map(str::as_bytes),
    );
    b(&mut out, Some(&row.get::<_, Vec<u8>>("key_fp")));
    // current_user at the act: a last field, only in rows that record it.
    if let Some(role) = row.get::<_, Option<String>>("role") {
        b(&mut out, Some(role.as_bytes()));
    }
    out
}

#[test]
fn audit_chain_head_is_logged_and_forgeries_are_caught() {
    let c = Cluster::start("i_chain", &[]);
    let mut db = c.connect();
    db.batch_execute("CREATE DATABASE other").unwrap();
    let mut other = c.connect_as("postgres", "other");
    for d in [&mut db, &mut other] {
        d.batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pg_kms; SELECT kms_create_key('pii'); SELECT kms_rotate_key('pii', 'why');
             SELECT kms_rotate_key('pii'); SELECT kms_disable_key_version('pii', 1, 'r');",
        )
        .unwrap();
    }
    // Two acts that change no key row (rows 5 and 6).
    db.batch_execute("CREATE ROLE app; SELECT kms_grant_key('pii', 'app', 'decrypt'); SELECT kms_revoke_key('pii', 'app', 'decrypt');")
        .unwrap();
    // At every append the head leaves the database: the last logged line is the head.
    let (ok, _, _, head_id, head_mac) = check(&mut db);
    assert!(ok);
    assert_eq!(
        logged_head(&c, "postgres"),
        Some((head_id.unwrap(), head_mac.clone().unwrap()))
    );
    assert_eq!(head_id, Some(6));
    // The log line holds no key material: not the master key, no wrapped or data key.
    let log = c.server_log();
    let master = c.read_key();
    let mut secrets = vec![master.clone(), master.to_uppercase()];
    for r in db.query("SELECT key_id, version, wrapped_key FROM kms.key_versions WHERE wrapped_key IS NOT NULL", &[]).unwrap() {
        let wrapped: Vec<u8> = r.get(2);
        let dk = unwrap_with(&master, r.get(0), r.get(1), &wrapped).expect("unwraps under the master key");
        secrets.push(hex::encode(wrapped));
        secrets.push(hex::encode(dk));
    }
    for line in log.lines().filter(|l| l.contains("audit chain head")) {
        assert!(
            !secrets.iter().any(|s| line.contains(s.as_str())),
            "key material in {line}"
        );
        let mac = line.rsplit_once(" mac=").unwrap().1.trim();
        assert!(
            mac.len() == 64 && mac.bytes().all(|b| b.is_ascii_hexdigit()),
            "{line}"
        );
    }
    assert!(
        !secrets.iter().any(|s| log.contains(s.as_str())),
        "key material in the server log"
    );

    // Truncating the tail and resetting the head leaves a chain that checks
    // out by itself; the logged head shows it (the README's procedure).
    let cut = |db: &mut Client, keep: i64| {
        db.batch_execute(&format!(
            "BEGIN; ALTER TABLE kms.audit_log DISABLE TRIGGER USER;
             DELETE FROM kms.audit_log WHERE id > {keep};
             UPDATE kms.audit_head SET last_id = {keep}, last_hash = a.hash, last_mac = a.mac FROM kms.audit_log a WHERE a.id = {keep};"
        ))
        .unwrap();
    };
    cut(&mut db, 4);
    let (ok, _, _, head_id, head_mac) = check(&mut db);
    assert!(ok, "a cut chain is consistent in itself");
    let logged = logged_head(&c, "postgres").unwrap();
    assert_eq!(logged.0, 6);
    assert_ne!(Some(logged.0), head_id, "the logged head shows the cut");
    assert_ne!(Some(logged.1), head_mac);
    db.batch_execute("ROLLBACK").unwrap();
    // Cutting rows that changed a key is caught by the check itself: the
    // key's rows are newer than the chain.
    cut(&mut db, 2);
    let (ok, bad, why, _, _) = check(&mut db);
    assert!(!ok && bad.is_none(), "{why:?}");
    assert!(
        why.as_deref()
            .unwrap_or("")
            .contains("kms.keys row of key \"pii\": It is newer than the audit chain"),
        "{why:?}"
    );
    db.batch_execute("ROLLBACK").unwrap();

    // Forge row 2 of the other database and recompute every hash with
    // SHA-256 exactly as pg_kms chains them: only the MACs are missing.
    other
        .batch_execute("ALTER TABLE kms.audit_log DISABLE TRIGGER USER")
        .unwrap();
    let rows = other
        .query(
            "SELECT id, (EXTRACT(epoch FROM at) * 1000000)::int8 AS at_us, actor, operation, key_name, version, reason, detail, key_fp, prev_hash, role
               FROM kms.audit_log ORDER BY id",
            &[],
        )
        .unwrap();
    let mut prev: Vec<u8> = rows[0].get("prev_hash");
    for r in &rows {
        let id: i64 = r.get("id");
        let reason: Option<String> = if id == 2 {
            Some("forged".into())
        } else {
            r.get("reason")
        };
        let mut h = Sha256::new();
        h.update(&prev);
        h.update(canon_audit(r, reason.as_deref().map(str::as_bytes)));
        let hash = h.finalize().to_vec();
        if id >= 2 {
            other
                .execute(
                    "UPDATE kms.audit_log SET reason = $2, prev_hash = $3, hash = $4 WHERE id = $1",
                    &[&id, &reason, &prev, &hash],
                )
                .unwrap();
        }
        prev = hash;
    }
    other
        .execute("UPDATE kms.audit_head SET last_hash = $1", &[&prev])
        .unwrap();
    let (ok, bad, why, _, _) = check(&mut other);
    assert!(!ok);
    assert_eq!(bad, Some(2), "{why:?}");
    assert!(
        why.as_deref().unwrap_or("").contains("MAC does not verify"),
        "{why:?}"
    );
    let ok: bool = other
        .query_one("SELECT kms_verify_audit_log()", &[])
        .unwrap()
        .get(0);
    assert!(!ok);
    println!("audit chain: head logged at each append without key material; cut tail shown by the log; re-hashed forgery caught at row 2");
}

fn copy_key_file(c: &Cluster, to: &str) -> String {
    let dst = c.dir.join("keys").join(to);
    let o = as_postgres(
        "cp",
        &[c.key_file().to_str().unwrap(), dst.to_str().unwrap()],
    );
    assert!(o.status.success());
    assert!(as_postgres("chmod", &["600", dst.to_str().unwrap()])
        .status
        .success());
    dst.display().to_string()
}

fn reload_until(db: &mut Client, setting: &str, value: &str) {
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    poll("the configuration reload", Duration::from_secs(10), || {
        let v: String = db
            .query_one(&format!("SELECT current_setting('{setting}')"), &[])
            .ok()?
            .get(0);
        (v == value).then_some(())
    });
}

/// Section "Crypto-shredding and backups" of the README, step by step.
#[test]
fn crypto_shredding_with_master_key_rotation() {
    let c = Cluster::start("i_shred", &[]);
    let mut db = c.connect();
    db.batch_execute("CREATE DATABASE shop").unwrap();
    let mut shop = c.connect_as("postgres", "shop");
    shop.batch_execute(
        "CREATE EXTENSION pg_kms; SELECT kms_create_key('pii');
         CREATE TABLE t (id int PRIMARY KEY, v encrypted_text);
         INSERT INTO t SELECT g, kms_encrypt('secret ' || g, 'pii') FROM generate_series(1, 20) g;
         SELECT kms_rotate_key('pii');",
    )
    .unwrap();
    // A backup taken while version 1 is alive.
    let dump = c.dir.join("before.dump");
    c.pg_dump("shop", &["-Fc", "-f", dump.to_str().unwrap()]);
    let saved = shop
        .query_one(
            "SELECT v.key_id, v.state, v.wrapped_key, v.row_mac FROM kms.key_versions v JOIN kms.keys k USING (key_id)
              WHERE key_name = 'pii' AND version = 1",
            &[],
        )
        .unwrap();
    let (key_id, wrapped): (i32, Vec<u8>) = (saved.get(0), saved.get(2));
    // Shred version 1.
    shop.batch_execute("SELECT kms_destroy_key_version('pii', 1, 'shred', force => true)")
        .unwrap();
    let receipt: String = shop
        .query_one(
            "SELECT receipt->>'material_mac' FROM kms_destruction_receipts WHERE version = 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(receipt.len(), 64);
    assert_eq!(
        sqlstate(shop.query_one("SELECT kms_decrypt(v) FROM t WHERE id = 1", &[])),
        "55000"
    );
    // Putting the saved row back (MAC and all) is refused, and the audit
    // check names the destruction it undoes.
    let after = shop
        .query_one(
            "SELECT state, row_mac FROM kms.key_versions WHERE key_id = $1 AND version = 1",
            &[&key_id],
        )
        .unwrap();
    let (after_state, after_mac): (String, Vec<u8>) = (after.get(0), after.get(1));
    shop.execute(
        "UPDATE kms.key_versions SET state = $2, wrapped_key = $3, row_mac = $4 WHERE key_id = $1 AND version = 1",
        &[&key_id, &saved.get::<_, String>(1), &wrapped, &saved.get::<_, Vec<u8>>(3)],
    )
    .unwrap();
    let mut fresh = c.connect_as("postgres", "shop");
    let r = fresh.query_one("SELECT kms_decrypt(v) FROM t WHERE id = 1", &[]);
    let m = message(fresh.query_one("SELECT kms_decrypt(v) FROM t WHERE id = 1", &[]));
    assert_eq!(sqlstate(r), "XX001", "{m}");
    assert!(m.contains("catalog row altered"), "{m}");
    let (ok, bad, why, _, _) = check(&mut shop);
    let destroy_id: i64 = shop
        .query_one(
            "SELECT audit_id FROM kms_destruction_receipts WHERE version = 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!ok && bad == Some(destroy_id), "{why:?}");
    shop.execute(
        "UPDATE kms.key_versions SET state = $2, wrapped_key = NULL, row_mac = $3 WHERE key_id = $1 AND version = 1",
        &[&key_id, &after_state, &after_mac],
    )
    .unwrap();
    assert!(check(&mut shop).0);

    // Rotate the master key, then retire the old one.
    let old_hex = c.read_key();
    let old_path = copy_key_file(&c, "old.key");
    let new_hex = random_key_hex();
    c.write_key(&new_hex, 0o600);
    c.append_conf(&format!("pg_kms.previous_master_key_file = '{old_path}'\n"));
    reload_until(&mut shop, "pg_kms.previous_master_key_file", &old_path);
    let n: i64 = shop
        .query_one("SELECT kms_rotate_master_key()", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "only the live version 2 is re-wrapped");
    c.append_conf("pg_kms.previous_master_key_file = ''\n");
    reload_until(&mut shop, "pg_kms.previous_master_key_file", "");
    assert!(as_postgres("rm", &["-f", &old_path]).status.success());
    // The chain goes on under the new key, and verifies with it alone.
    let ok: bool = shop
        .query_one("SELECT kms_verify_audit_log()", &[])
        .unwrap()
        .get(0);
    assert!(ok);
    let again: String = shop
        .query_one("SELECT kms_decrypt(kms_encrypt('new', 'pii'))", &[])
        .unwrap()
        .get(0);
    assert_eq!(again, "new");

    // The old backup's wrapped version 1 opens only under the retired key.
    assert!(
        unwrap_with(&old_hex, key_id, 1, &wrapped).is_some(),
        "the retired key is what a backup needs"
    );
    assert!(unwrap_with(&new_hex, key_id, 1, &wrapped).is_none());
    // Restoring that backup with the master key configured now gets nothing.
    db.batch_execute("CREATE DATABASE restored").unwrap();
    c.client("pg_restore", "restored", &[dump.to_str().unwrap()]);
    let mut restored = c.connect_as("postgres", "restored");
    let r = restored.query_one("SELECT kms_decrypt(v) FROM t WHERE id = 1", &[]);
    let m = message(restored.query_one("SELECT kms_decrypt(v) FROM t WHERE id = 1", &[]));
    assert_eq!(sqlstate(r), "55000");
    assert!(m.contains("master key does not match this keyring"), "{m}");
    // And the saved row put into the live keyring fails as before.
    shop.execute(
        "UPDATE kms.key_versions SET state = 'decrypt_only', wrapped_key = $2, row_mac = $3 WHERE key_id = $1 AND version = 1",
        &[&key_id, &wrapped, &saved.get::<_, Vec<u8>>(3)],
    )
    .unwrap();
    let mut fresh = c.connect_as("postgres", "shop");
    assert_eq!(
        sqlstate(fresh.query_one("SELECT kms_decrypt(v) FROM t WHERE id = 1", &[])),
        "XX001"
    );
    println!("crypto-shredding: saved row refused (XX001), old backup needs the retired master key (55000 without it)");
}
