//! Crypto hygiene on real clusters: contexts sealed as UTF-8 across a
//! LATIN1 -> UTF-8 dump/restore, and no copy of the master key left in a
//! backend's memory after use (scanned through /proc/<pid>/mem, which the
//! tests can read as root). Each test prints only counts, never key bytes.

use hkdf::Hkdf;
use pg_kms_integration::{poll, Cluster};
use postgres::Client;
use sha2::Sha256;
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

fn dump(c: &Cluster, db: &str, out: &std::path::Path) {
    c.pg_dump(db, &["-Fp", "-f", out.to_str().unwrap()]);
}

fn restore(c: &Cluster, db: &str, file: &std::path::Path) {
    c.psql_file(db, file);
}

fn one_bool(db: &mut Client, sql: &str) -> bool {
    db.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// A value sealed (randomized and deterministic) and a blind index computed
/// in a LATIN1 database with the context 'café' still decrypt and match
/// after a dump restored into a UTF-8 database of another cluster that has
/// the same master key: contexts are sealed as UTF-8, like text.
#[test]
fn latin1_context_survives_dump_into_utf8() {
    let src = Cluster::start("cy_l1_src", &[]);
    src.connect()
        .batch_execute(
            "CREATE DATABASE shop ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        )
        .unwrap();
    let mut shop = src.connect_as("postgres", "shop");
    assert_eq!(
        shop.query_one("SHOW server_encoding", &[])
            .unwrap()
            .get::<_, String>(0),
        "LATIN1"
    );
    shop.batch_execute(
        "CREATE EXTENSION pg_kms; SELECT kms_create_key('pii');
         CREATE TABLE t (id int PRIMARY KEY, v encrypted_text, d encrypted_text UNIQUE, b bytea);
         INSERT INTO t VALUES
           (1, kms_encrypt('crème brûlée', 'pii', 'café'), kms_encrypt_deterministic('crème', 'pii', 'café'),
               kms_blind_index('crème', 'pii', 'café')),
           (2, kms_encrypt('plain', 'pii', 'ascii ctx'), kms_encrypt_deterministic('plain', 'pii'),
               kms_blind_index('plain', 'pii'));",
    )
    .unwrap();
    let checks = [
        "SELECT kms_decrypt(v, 'café') = 'crème brûlée' FROM t WHERE id = 1",
        "SELECT kms_decrypt(d, 'café') = 'crème' FROM t WHERE id = 1",
        "SELECT d = kms_encrypt_deterministic('crème', 'pii', 'café') FROM t WHERE id = 1",
        "SELECT b = kms_blind_index('crème', 'pii', 'café') FROM t WHERE id = 1",
        "SELECT kms_decrypt(v, 'ascii ctx') = 'plain' FROM t WHERE id = 2",
        "SELECT kms_decrypt(d) = 'plain' AND d = kms_encrypt_deterministic('plain', 'pii') FROM t WHERE id = 2",
        "SELECT b = kms_blind_index('plain', 'pii') FROM t WHERE id = 2",
        "SELECT count(*) = 1 FROM t WHERE b = kms_blind_index('crème', 'pii', 'café')",
    ];
    for q in checks {
        assert!(one_bool(&mut shop, q), "in the LATIN1 source: {q}");
    }
    // The wrong context (and the LATIN1-looking mojibake of the UTF-8 one) fails.
    let r = shop.query_one("SELECT kms_decrypt(v, 'cafe') FROM t WHERE id = 1", &[]);
    assert!(r.is_err());
    let file = src.dir.join("shop_latin1.sql");
    dump(&src, "shop", &file);

    let dst = Cluster::start("cy_l1_dst", &[]);
    dst.write_key(&src.read_key(), 0o600);
    dst.connect().batch_execute("CREATE DATABASE shop").unwrap();
    restore(&dst, "shop", &file);
    let mut r = dst.connect_as("postgres", "shop");
    assert_eq!(
        r.query_one("SHOW server_encoding", &[])
            .unwrap()
            .get::<_, String>(0),
        "UTF8"
    );
    let mut ok = 0;
    for q in checks {
        assert!(one_bool(&mut r, q), "after restore into UTF-8: {q}");
        ok += 1;
    }
    // The UTF-8 bytes of the context are what was sealed: the context
    // given as bytes c3 a9 opens it, whatever encoding the session uses.
    assert!(one_bool(&mut r, "SELECT kms_decrypt(v, convert_from('\\x636166c3a9', 'UTF8')) = 'crème brûlée' FROM t WHERE id = 1"));
    println!(
        "LATIN1 -> UTF-8 dump/restore: {ok}/{} checks with context 'café' pass on both sides",
        checks.len()
    );
}

/// Readable mappings of a process: (start, end, permissions, name).
fn mappings(pid: i32) -> Vec<(u64, u64, String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?.to_string();
            let name = f.nth(3).unwrap_or("[anon]").to_string();
            let (a, b) = range.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
                perms,
                name,
            ))
        })
        .collect()
}

/// VmFlags of the mapping that starts at `start`, from /proc/<pid>/smaps.
fn vm_flags(pid: i32, start: u64) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let head = format!("{start:x}-");
    smaps
        .lines()
        .skip_while(|l| !l.starts_with(&head))
        .find(|l| l.starts_with("VmFlags:"))
        .map(|l| l.split_whitespace().skip(1).map(String::from).collect())
        .unwrap_or_default()
}

/// Where `needles` occur in the readable memory of `pid`: for each needle,
/// the start addresses of the mappings holding a hit (one per hit).
fn scan(pid: i32, needles: &[&[u8]]) -> (Vec<Vec<u64>>, u64) {
    let mut mem =
        std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/<pid>/mem (needs root)");
    let mut hits = vec![Vec::new(); needles.len()];
    let mut scanned = 0u64;
    let mut first = [false; 256];
    needles.iter().for_each(|n| first[n[0] as usize] = true);
    for (start, end, perms, name) in mappings(pid) {
        if !perms.starts_with('r') || name.starts_with("[vvar") || name == "[vsyscall]" {
            continue;
        }
        let mut buf = vec![0u8; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        scanned += buf.len() as u64;
        // One pass; only positions whose byte starts some needle are compared.
        for (i, b) in buf.iter().enumerate() {
            if first[*b as usize] {
                for (k, n) in needles.iter().enumerate() {
                    if buf[i..].starts_with(n) {
                        hits[k].push(start);
                    }
                }
            }
        }
    }
    (hits, scanned)
}

fn hkdf32(ikm: &[u8], info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(Some(b"pg_kms"), ikm)
        .expand(info, &mut out)
        .unwrap();
    out
}

/// The needles for one master key: raw bytes, lower- and upper-case hex.
fn key_needles(hex_key: &str) -> [Vec<u8>; 3] {
    [
        hex::decode(hex_key).unwrap(),
        hex_key.to_lowercase().into_bytes(),
        hex_key.to_uppercase().into_bytes(),
    ]
}

/// After a backend has used the master key (creating and rotating keys,
/// encrypting, decrypting, deterministic and blind-index calls, the health
/// check) loaded from a file, then from a command, then in a master-key
/// rotation (old key from `previous_master_key_file`, new one from the
/// file), no copy of any of these master keys, raw or as hex text, is left
/// anywhere in the backend's memory. The KEK is necessarily there (it is
/// cached); it must be only in mappings marked `dd` (excluded from core
/// dumps). Finding it also shows the scan works.
#[test]
fn master_key_is_not_left_in_backend_memory() {
    let c = Cluster::start("cy_mem", &[]);
    let first_key = c.read_key();
    let mut admin = c.connect();
    admin
        .batch_execute(
            "CREATE EXTENSION pg_kms; SELECT kms_create_key('pii');
             CREATE TABLE t AS SELECT g AS id, kms_encrypt('value ' || g, 'pii') AS v FROM generate_series(1, 200) g;",
        )
        .unwrap();
    let work = |phase: &str| {
        format!(
            "SELECT kms_rotate_key('pii', 'scan');
             SELECT kms_create_key('other_{phase}');
             SELECT count(kms_decrypt(v)) FROM t;
             SELECT kms_decrypt(kms_encrypt('x', 'pii', 'ctx'), 'ctx');
             SELECT kms_decrypt(kms_encrypt_deterministic('y', 'other_{phase}'));
             SELECT kms_blind_index('z', 'pii');
             SELECT kms_health();"
        )
    };
    // One statement per call: ALTER SYSTEM cannot run in a transaction block.
    let set = |db: &mut Client, name: &str, value: &str| {
        db.batch_execute(&format!("ALTER SYSTEM SET {name} = '{value}'"))
            .unwrap();
        db.batch_execute("SELECT pg_reload_conf()").unwrap();
    };
    let mut keys = vec![first_key.clone()];
    let mut phases = 0;
    for phase in ["file", "command", "rotation"] {
        let (setting, expect) = match phase {
            "file" => ("pg_kms.master_key_file", c.key_file().display().to_string()),
            "command" => {
                set(&mut admin, "pg_kms.master_key_file", "");
                let cmd = format!("cat {}", c.key_file().display());
                set(&mut admin, "pg_kms.master_key_command", &cmd);
                ("pg_kms.master_key_command", cmd)
            }
            _ => {
                // The current key becomes the previous one, read from its own file.
                let prev = c.dir.join("keys").join("previous.key");
                std::fs::copy(c.key_file(), &prev).unwrap();
                // (As root the server's user must own it; otherwise it already does.)
                let _ = std::process::Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&prev)
                    .status();
                let new_key = pg_kms_integration::random_key_hex();
                c.write_key(&new_key, 0o600);
                keys.push(new_key);
                set(&mut admin, "pg_kms.master_key_command", "");
                set(
                    &mut admin,
                    "pg_kms.master_key_file",
                    &c.key_file().display().to_string(),
                );
                let prev = prev.display().to_string();
                set(&mut admin, "pg_kms.previous_master_key_file", &prev);
                ("pg_kms.previous_master_key_file", prev)
            }
        };
        // A new backend that sees the settings of this phase.
        let mut db = poll(
            "a backend with the new settings",
            Duration::from_secs(30),
            || {
                let mut db = c.connect();
                let now: String = db
                    .query_one(&format!("SHOW {setting}"), &[])
                    .unwrap()
                    .get(0);
                (now == expect).then_some(db)
            },
        );
        if phase == "rotation" {
            let n: i64 = db
                .query_one("SELECT kms_rotate_master_key()", &[])
                .unwrap()
                .get(0);
            assert!(n > 0, "versions re-wrapped");
        }
        db.batch_execute(&work(phase)).unwrap();
        let pid: i32 = db.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        let current = keys.last().unwrap();
        let kek = hkdf32(
            &hex::decode(current).unwrap(),
            b"pg_kms v1 key-encryption key",
        );
        let mut needles: Vec<Vec<u8>> = keys.iter().flat_map(|k| key_needles(k)).collect();
        needles.push(kek.to_vec());
        let refs: Vec<&[u8]> = needles.iter().map(|n| n.as_slice()).collect();
        let (hits, scanned) = scan(pid, &refs);
        let kek_hits = hits.last().unwrap();
        let key_hits: Vec<usize> = hits[..hits.len() - 1].iter().map(|h| h.len()).collect();
        let kek_regions: Vec<Vec<String>> = kek_hits.iter().map(|&s| vm_flags(pid, s)).collect();
        let all_dd = kek_regions.iter().all(|f| f.iter().any(|x| x == "dd"));
        let locked = kek_regions
            .iter()
            .filter(|f| f.iter().any(|x| x == "lo"))
            .count();
        println!(
            "master key from {phase}: scanned {} MiB of backend memory; hits of {} master key(s) as (raw, hex, HEX): {key_hits:?}; \
             KEK {} hits, all in dd (no-dump) mappings: {all_dd}, {locked} of them mlocked",
            scanned >> 20,
            keys.len(),
            kek_hits.len()
        );
        assert!(
            key_hits.iter().all(|n| *n == 0),
            "master key found in backend memory"
        );
        assert!(!kek_hits.is_empty(), "the scan should find the cached KEK");
        assert!(all_dd, "KEK outside a MADV_DONTDUMP mapping");
        phases += 1;
    }
    assert_eq!(phases, 3);
}
