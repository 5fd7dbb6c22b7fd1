//! The per-value SQL API: encrypt, decrypt, rewrap, blind index, header
//! readers (`kms_user`). Not SECURITY DEFINER: once a key is cached these
//! do no SPI, no catalog read and no system call (see `crate::values`).

use crate::pg::datum::{EncryptedText, OutBytea, OutText, RawText};
use pgrx::prelude::*;

#[pg_extern(volatile, parallel_safe)]
fn kms_encrypt(
    plaintext: Option<RawText>,
    key_name: Option<RawText>,
    context: default!(Option<RawText>, "NULL"),
) -> Option<EncryptedText> {
    crate::values::encrypt(plaintext, key_name, context)
}

/// Same plaintext, context and key version give the identical value
/// (AES-256-SIV, RFC 5297, under a per-version key), so equality, UNIQUE,
/// joins and GROUP BY work on the column. Leaks equality by design.
/// Stable (one key version per statement), so that
/// `WHERE col = kms_encrypt_deterministic($1, 'k')` is an index scan.
#[pg_extern(stable, parallel_safe)]
fn kms_encrypt_deterministic(
    plaintext: Option<RawText>,
    key_name: Option<RawText>,
    context: default!(Option<RawText>, "NULL"),
) -> Option<EncryptedText> {
    crate::values::encrypt_deterministic(plaintext, key_name, context)
}

/// The deterministic value of the plaintext under every usable version of
/// the key, primary first: `col = ANY(kms_deterministic_candidates($1, 'k'))`
/// finds values not yet rewrapped after a rotation, with an index scan.
#[pg_extern(stable, parallel_safe)]
fn kms_deterministic_candidates(
    plaintext: Option<RawText>,
    key_name: Option<RawText>,
    context: default!(Option<RawText>, "NULL"),
) -> Option<crate::values::EncryptedTextArray> {
    crate::values::deterministic_candidates(plaintext, key_name, context)
}

/// HMAC-SHA256 of the plaintext under the key name's index key, truncated
/// to `bits`: equality search without decrypting. Independent of key
/// versions, so rotation never changes it.
#[pg_extern(stable, parallel_safe)]
fn kms_blind_index(
    plaintext: Option<RawText>,
    key_name: Option<RawText>,
    context: default!(Option<RawText>, "NULL"),
    bits: default!(i32, 256),
) -> Option<OutBytea> {
    crate::values::blind_index(plaintext, key_name, context, bits)
}

#[pg_extern(volatile, parallel_safe)]
fn kms_encrypt_bytea(
    plaintext: Option<&[u8]>,
    key_name: Option<RawText>,
    context: default!(Option<RawText>, "NULL"),
) -> Option<EncryptedText> {
    crate::values::encrypt_bytea(plaintext, key_name, context)
}

#[pg_extern(stable, parallel_safe)]
fn kms_decrypt(
    value: Option<EncryptedText>,
    context: default!(Option<RawText>, "NULL"),
) -> Option<OutText> {
    crate::values::decrypt(value, context)
}

#[pg_extern(stable, parallel_safe)]
fn kms_decrypt_bytea(
    value: Option<EncryptedText>,
    context: default!(Option<RawText>, "NULL"),
) -> Option<OutBytea> {
    crate::values::decrypt_bytea(value, context)
}

/// Re-seals under the key's current primary version without returning the
/// plaintext. A value already under the primary is returned unchanged.
#[pg_extern(volatile, parallel_safe)]
fn kms_rewrap(
    value: Option<EncryptedText>,
    context: default!(Option<RawText>, "NULL"),
) -> Option<EncryptedText> {
    crate::values::rewrap_sql(value, context)
}

#[pg_extern(stable, strict, parallel_safe)]
fn kms_key_name(value: EncryptedText) -> String {
    crate::values::key_name_of(value)
}

#[pg_extern(immutable, strict, parallel_safe)]
fn kms_key_version(value: EncryptedText) -> i32 {
    crate::values::key_version_of(value)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::api::test_support::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn encrypt_decrypt_round_trips() {
        setup_key("pii");
        for s in ["alice@example.com", "", "Ünïcödé ✓ 𝄞 🙂", "tab\tnew\nline"] {
            let got = Spi::get_one_with_args::<String>(
                "SELECT kms_decrypt(kms_encrypt($1, 'pii'))",
                &[s.into()],
            )
            .unwrap();
            assert_eq!(got.as_deref(), Some(s));
        }
        assert_eq!(
            one::<bool>("SELECT kms_encrypt(NULL, 'pii') IS NULL"),
            Some(true)
        );
        assert_eq!(one::<bool>("SELECT kms_decrypt(NULL) IS NULL"), Some(true));
        assert_eq!(
            one::<bool>("SELECT kms_encrypt('a', 'pii')::text <> kms_encrypt('a', 'pii')::text"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT kms_encrypt('a', 'pii')::text LIKE 'kms:%'"),
            Some(true)
        );
        let big = one::<bool>(
            "SELECT kms_decrypt(kms_encrypt(repeat('xyz', 400000), 'pii')) = repeat('xyz', 400000)",
        );
        assert_eq!(big, Some(true));
    }

    #[pg_test]
    fn bytea_round_trip() {
        setup_key("pii");
        assert_eq!(
            one::<bool>("SELECT kms_decrypt_bytea(kms_encrypt_bytea('\\x00ff00'::bytea, 'pii')) = '\\x00ff00'::bytea"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT kms_encrypt_bytea(NULL, 'pii') IS NULL"),
            Some(true)
        );
        // bytea sealed with context needs it back.
        assert_eq!(
            one::<bool>(
                "SELECT kms_decrypt_bytea(kms_encrypt_bytea('\\x01', 'pii', 'c'), 'c') = '\\x01'"
            ),
            Some(true)
        );
        // Text sealed as text can be read back as its UTF-8 bytes.
        assert_eq!(
            one::<bool>(
                "SELECT kms_decrypt_bytea(kms_encrypt('hé', 'pii')) = convert_to('hé', 'UTF8')"
            ),
            Some(true)
        );
        // Invalid UTF-8 sealed as bytea cannot come back as text.
        assert_sqlstate(
            "SELECT kms_decrypt(kms_encrypt_bytea('\\xff'::bytea, 'pii'))",
            "22021",
        );
        assert_eq!(
            one::<String>("SELECT kms_decrypt(kms_encrypt_bytea(convert_to('ok', 'UTF8'), 'pii'))")
                .as_deref(),
            Some("ok")
        );
    }

    #[pg_test]
    fn context_is_bound() {
        setup_key("pii");
        assert_eq!(
            one::<String>("SELECT kms_decrypt(kms_encrypt('v', 'pii', 'user:1'), 'user:1')")
                .as_deref(),
            Some("v")
        );
        assert_sqlstate(
            "SELECT kms_decrypt(kms_encrypt('v', 'pii', 'user:1'), 'user:2')",
            "39000",
        );
        assert_sqlstate(
            "SELECT kms_decrypt(kms_encrypt('v', 'pii', 'user:1'))",
            "39000",
        );
        assert_sqlstate(
            "SELECT kms_decrypt(kms_encrypt('v', 'pii'), 'user:1')",
            "39000",
        );
        // NULL context and empty context are the same.
        assert_eq!(
            one::<String>("SELECT kms_decrypt(kms_encrypt('v', 'pii', NULL), '')").as_deref(),
            Some("v")
        );
    }

    #[pg_test]
    fn overhead_is_at_most_40_bytes() {
        setup_key("k");
        let o = one::<i32>("SELECT pg_column_size(kms_encrypt(repeat('x',100),'k')) - pg_column_size(repeat('x',100))").unwrap();
        assert!(o <= 40, "overhead {o}");
        assert_eq!(
            one::<i32>("SELECT length(kms_encrypt('abc','k')::bytea)"),
            Some(3 + 38)
        );
    }

    #[pg_test]
    fn tampering_fails_with_39000() {
        setup_key("pii");
        run("CREATE TEMP TABLE t AS SELECT kms_encrypt('secret', 'pii')::bytea AS b");
        let n = one::<i32>("SELECT length(b) FROM t").unwrap();
        // Flip one bit in each byte after the header (nonce, ciphertext, tag).
        for i in 10..n {
            let sql = format!(
                "SELECT kms_decrypt(('kms:' || encode(set_byte(b, {i}, get_byte(b, {i}) # 1), 'base64'))::encrypted_text) FROM t"
            );
            assert_sqlstate(&sql, "39000");
        }
    }

    #[pg_test]
    fn header_readers() {
        setup_key("pii.v1:x-y_z");
        assert_eq!(
            one::<String>("SELECT kms_key_name(kms_encrypt('a', 'pii.v1:x-y_z'))").as_deref(),
            Some("pii.v1:x-y_z")
        );
        assert_eq!(
            one::<i32>("SELECT kms_key_version(kms_encrypt('a', 'pii.v1:x-y_z'))"),
            Some(1)
        );
        assert_eq!(
            one::<bool>("SELECT kms_key_version(NULL) IS NULL"),
            Some(true)
        );
    }

    #[pg_test]
    fn deterministic_encryption_and_operators() {
        setup_key("pii");
        assert_eq!(one::<bool>("SELECT kms_encrypt_deterministic('123-45-6789', 'pii') = kms_encrypt_deterministic('123-45-6789', 'pii')"), Some(true));
        assert_eq!(one::<bool>("SELECT kms_encrypt_deterministic('a', 'pii') <> kms_encrypt_deterministic('b', 'pii')"), Some(true));
        assert_eq!(one::<bool>("SELECT kms_encrypt_deterministic('a', 'pii', 'c1') <> kms_encrypt_deterministic('a', 'pii', 'c2')"), Some(true));
        assert_eq!(
            one::<bool>("SELECT kms_encrypt('a', 'pii') <> kms_encrypt('a', 'pii')"),
            Some(true)
        );
        assert_eq!(
            one::<String>("SELECT kms_decrypt(kms_encrypt_deterministic('héllo', 'pii'))")
                .as_deref(),
            Some("héllo")
        );
        run("CREATE TEMP TABLE people (id int, ssn encrypted_text UNIQUE)");
        run("INSERT INTO people VALUES (1, kms_encrypt_deterministic('111', 'pii')), (2, kms_encrypt_deterministic('222', 'pii'))");
        assert_sqlstate(
            "INSERT INTO people VALUES (3, kms_encrypt_deterministic('111', 'pii'))",
            "23505",
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM (SELECT ssn FROM people UNION ALL SELECT kms_encrypt_deterministic('111','pii')) s GROUP BY ssn ORDER BY 1 DESC LIMIT 1"), Some(2));
        assert_eq!(
            one::<i32>("SELECT id FROM people WHERE ssn = kms_encrypt_deterministic('222', 'pii')"),
            Some(2)
        );
        // Rewrap keeps a deterministic value deterministic (under the new version).
        run("SELECT kms_rotate_key('pii')");
        assert_eq!(one::<bool>("SELECT kms_rewrap(ssn) = kms_encrypt_deterministic('111', 'pii') FROM people WHERE id = 1"), Some(true));
        assert_eq!(
            one::<bool>(
                "SELECT ssn <> kms_encrypt_deterministic('111', 'pii') FROM people WHERE id = 1"
            ),
            Some(true)
        );
    }

    #[pg_test]
    fn blind_index() {
        setup_key("pii");
        let a = one::<Vec<u8>>("SELECT kms_blind_index('alice@example.com', 'pii')").unwrap();
        assert_eq!(a.len(), 32);
        assert_eq!(
            one::<Vec<u8>>("SELECT kms_blind_index('alice@example.com', 'pii', bits => 64)")
                .unwrap(),
            a[..8].to_vec()
        );
        assert_ne!(
            one::<Vec<u8>>("SELECT kms_blind_index('alice@example.com', 'pii', 'ctx')").unwrap(),
            a
        );
        assert_ne!(
            one::<Vec<u8>>("SELECT kms_blind_index('bob@example.com', 'pii')").unwrap(),
            a
        );
        assert_eq!(
            one::<bool>("SELECT kms_blind_index(NULL, 'pii') IS NULL"),
            Some(true)
        );
        for bad in [0, 8, 12, 264] {
            assert_sqlstate(
                &format!("SELECT kms_blind_index('x', 'pii', bits => {bad})"),
                "22023",
            );
        }
        assert_sqlstate("SELECT kms_blind_index('x', 'nope')", "42704");
        // Rotation never changes it; another key name gives another index.
        run("SELECT kms_rotate_key('pii')");
        assert_eq!(
            one::<Vec<u8>>("SELECT kms_blind_index('alice@example.com', 'pii')").unwrap(),
            a
        );
        setup_key("other");
        assert_ne!(
            one::<Vec<u8>>("SELECT kms_blind_index('alice@example.com', 'other')").unwrap(),
            a
        );
        // Master-key rotation keeps it too.
        let old_cmd = one::<String>("SELECT current_setting('pg_kms.master_key_command')").unwrap();
        run(&format!(
            "SET pg_kms.previous_master_key_command = '{old_cmd}'"
        ));
        run(&format!(
            "SET pg_kms.master_key_command = 'echo {}'",
            random_hex()
        ));
        run("SELECT kms_rotate_master_key()");
        assert_eq!(
            one::<Vec<u8>>("SELECT kms_blind_index('alice@example.com', 'pii')").unwrap(),
            a
        );
        // Destroying the key makes it unusable.
        run("SELECT kms_destroy_key('pii', 'tenant erased')");
        assert_sqlstate(
            "SELECT kms_blind_index('alice@example.com', 'pii')",
            "55000",
        );
    }

    /// Deterministic values are AES-256-SIV envelopes: 26 bytes of overhead
    /// (header, synthetic IV) against 38 for AES-GCM, flag bit 1 (and bit 2
    /// with a context), bound to their context and tamper-evident.
    #[pg_test]
    fn deterministic_values_are_aes_siv() {
        setup_key("pii");
        let raw = |v: &str| format!("decode(substr(({v})::text, 5), 'base64')");
        assert_eq!(
            one::<i32>(&format!(
                "SELECT length({})",
                raw("kms_encrypt_deterministic('abc', 'pii')")
            )),
            Some(3 + 26)
        );
        assert_eq!(
            one::<i32>(&format!(
                "SELECT length({})",
                raw("kms_encrypt('abc', 'pii')")
            )),
            Some(3 + 38)
        );
        assert_eq!(
            one::<i32>(&format!(
                "SELECT get_byte({}, 1)",
                raw("kms_encrypt_deterministic('abc', 'pii')")
            )),
            Some(2)
        );
        assert_eq!(
            one::<i32>(&format!(
                "SELECT get_byte({}, 1)",
                raw("kms_encrypt_deterministic('abc', 'pii', 'c')")
            )),
            Some(6)
        );
        assert_eq!(
            one::<String>("SELECT kms_decrypt(kms_encrypt_deterministic('', 'pii'))").as_deref(),
            Some("")
        );
        assert_eq!(
            one::<String>("SELECT kms_decrypt(kms_encrypt_deterministic('x', 'pii', 'c'), 'c')")
                .as_deref(),
            Some("x")
        );
        assert_eq!(
            one::<Vec<u8>>("SELECT kms_decrypt_bytea(kms_encrypt_deterministic('é', 'pii'))"),
            Some(vec![0xc3, 0xa9])
        );
        assert_sqlstate(
            "SELECT kms_decrypt(kms_encrypt_deterministic('x', 'pii', 'c'), 'd')",
            "39000",
        );
        assert_sqlstate(
            "SELECT kms_decrypt(kms_encrypt_deterministic('x', 'pii', 'c'))",
            "39000",
        );
        run("CREATE TEMP TABLE det_raw AS SELECT decode(substr(kms_encrypt_deterministic('secret', 'pii')::text, 5), 'base64') AS b");
        // Every byte after the header, flipped, fails to open (SIV and ciphertext).
        let flipped = "SELECT count(*) FROM det_raw, generate_series(10, length(b) - 1) i
                        WHERE pg_temp.error_of(format('SELECT kms_decrypt(%L::encrypted_text)',
                              'kms:' || encode(set_byte(b, i, get_byte(b, i) # 1), 'base64'))) LIKE '39000%'";
        error_of("SELECT 1");
        assert_eq!(one::<i64>(flipped), Some(22));
        // Clearing the deterministic flag makes it parse as AES-GCM: too short
        // here (22P02), and never opened with the wrong primitive.
        assert_sqlstate(
            "SELECT ('kms:' || encode(set_byte(b, 1, 0), 'base64'))::encrypted_text FROM det_raw",
            "22P02",
        );
    }
    /// The lines of `EXPLAIN (COSTS OFF) <sql>`, one string.
    fn plan(sql: &str) -> String {
        Spi::connect(|c| {
            let rows = c.select(&format!("EXPLAIN (COSTS OFF) {sql}"), None, &[])?;
            let mut out = String::new();
            for r in rows {
                out.push_str(&r.get::<String>(1)?.unwrap_or_default());
                out.push('\n');
            }
            Ok::<_, pgrx::spi::SpiError>(out)
        })
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Calls of `func` in this transaction so far (track_functions = all).
    fn calls(func: &str) -> i64 {
        one::<i64>(&format!(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_xact_user_functions WHERE funcname = '{func}'"
        ))
        .unwrap()
    }

    /// A table of `n` deterministic values under 'pii' with a UNIQUE index
    /// (people_ssn_key), analyzed.
    fn people(n: i32) {
        run("CREATE TEMP TABLE people (id int PRIMARY KEY, ssn encrypted_text UNIQUE)");
        run(&format!(
            "INSERT INTO people SELECT g, kms_encrypt_deterministic(lpad(g::text, 9, '0'), 'pii') FROM generate_series(1, {n}) g"
        ));
        run("ANALYZE people");
    }

    /// kms_encrypt_deterministic is STABLE: an equality lookup (a literal,
    /// and a prepared statement's generic plan, as ORMs send it) is an
    /// index scan on the UNIQUE index, and the function runs once per
    /// lookup, not once per row.
    #[pg_test]
    fn deterministic_lookup_is_an_index_scan() {
        setup_key("pii");
        people(5000);
        assert_eq!(
            one::<String>(
                "SELECT provolatile::text FROM pg_proc WHERE proname = 'kms_encrypt_deterministic'"
            )
            .as_deref(),
            Some("s")
        );
        let p =
            plan("SELECT id FROM people WHERE ssn = kms_encrypt_deterministic('000000042', 'pii')");
        assert!(
            p.contains("Index Scan using people_ssn_key") && !p.contains("Seq Scan"),
            "{p}"
        );
        run("PREPARE by_ssn(text) AS SELECT id FROM people WHERE ssn = kms_encrypt_deterministic($1, 'pii')");
        run("SET LOCAL plan_cache_mode = force_generic_plan");
        let p = plan("EXECUTE by_ssn('000000042')");
        assert!(
            p.contains("Index Scan using people_ssn_key") && !p.contains("Seq Scan"),
            "{p}"
        );
        run("SET LOCAL track_functions = 'all'");
        let before = calls("kms_encrypt_deterministic");
        assert_eq!(
            one::<i32>(
                "SELECT id FROM people WHERE ssn = kms_encrypt_deterministic('000000042', 'pii')"
            ),
            Some(42)
        );
        let per_lookup = calls("kms_encrypt_deterministic") - before;
        assert!(
            (1..=2).contains(&per_lookup),
            "{per_lookup} calls for one lookup"
        );
        run("DEALLOCATE by_ssn");
    }

    /// `col = ANY(kms_deterministic_candidates(...))`: one value per usable
    /// version, primary first, newest next; finds values not yet rewrapped
    /// after a rotation (which `= kms_encrypt_deterministic` does not), with
    /// an index scan; disabled and destroyed versions are left out.
    #[pg_test]
    fn deterministic_candidates_survive_rotation() {
        setup_key("pii");
        people(3000);
        let by_candidates =
            "SELECT id FROM people WHERE ssn = ANY(kms_deterministic_candidates('000000042', 'pii'))";
        let by_primary =
            "SELECT count(*) FROM people WHERE ssn = kms_encrypt_deterministic('000000042', 'pii')";
        let versions = "SELECT array_agg(kms_key_version(c) ORDER BY n)::text
                          FROM unnest(kms_deterministic_candidates('x', 'pii')) WITH ORDINALITY u(c, n)";
        assert_eq!(one::<String>(versions).as_deref(), Some("{1}"));
        assert_eq!(one::<i32>(by_candidates), Some(42));
        // After a rotation the stored value is still under version 1.
        run("SELECT kms_rotate_key('pii')");
        run("SELECT kms_rotate_key('pii')");
        assert_eq!(one::<String>(versions).as_deref(), Some("{3,2,1}"));
        assert_eq!(one::<i64>(by_primary), Some(0));
        assert_eq!(one::<i32>(by_candidates), Some(42));
        let p = plan(by_candidates);
        assert!(
            p.contains("people_ssn_key") && p.contains("ANY") && !p.contains("Seq Scan"),
            "{p}"
        );
        run("SET LOCAL track_functions = 'all'");
        let before = calls("kms_deterministic_candidates");
        assert_eq!(one::<i32>(by_candidates), Some(42));
        let per_lookup = calls("kms_deterministic_candidates") - before;
        assert!(
            (1..=2).contains(&per_lookup),
            "{per_lookup} calls for one lookup"
        );
        // Each candidate is the deterministic value under its version and
        // opens to the plaintext; the primary's equals kms_encrypt_deterministic.
        assert_eq!(
            one::<bool>(
                "SELECT bool_and(kms_decrypt(c, 'ctx') = 'x') AND count(*) = 3
                   FROM unnest(kms_deterministic_candidates('x', 'pii', 'ctx')) c"
            ),
            Some(true)
        );
        assert_eq!(
            one::<bool>(
                "SELECT (kms_deterministic_candidates('x', 'pii', 'ctx'))[1] = kms_encrypt_deterministic('x', 'pii', 'ctx')"
            ),
            Some(true)
        );
        // Once rewrapped, the primary's value finds it too.
        run("UPDATE people SET ssn = kms_rewrap(ssn) WHERE id = 42");
        assert_eq!(one::<i64>(by_primary), Some(1));
        assert_eq!(one::<i32>(by_candidates), Some(42));
        // The primary comes first even when it is not the newest version.
        run("SELECT kms_set_primary('pii', 2)");
        assert_eq!(one::<String>(versions).as_deref(), Some("{2,3,1}"));
        // Disabled and destroyed versions are left out.
        run("SELECT kms_disable_key_version('pii', 1)");
        assert_eq!(one::<String>(versions).as_deref(), Some("{2,3}"));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM people WHERE ssn = ANY(kms_deterministic_candidates('000000041', 'pii'))"),
            Some(0)
        );
        run("SELECT kms_destroy_key_version('pii', 3, force => true)");
        assert_eq!(one::<String>(versions).as_deref(), Some("{2}"));
        run("SELECT kms_enable_key_version('pii', 1)");
        assert_eq!(one::<String>(versions).as_deref(), Some("{2,1}"));
    }

    #[pg_test]
    fn deterministic_candidates_bad_input() {
        setup_key("pii");
        assert_eq!(
            one::<bool>("SELECT kms_deterministic_candidates(NULL, 'pii') IS NULL"),
            Some(true)
        );
        assert_sqlstate("SELECT kms_deterministic_candidates('x', NULL)", "22023");
        assert_sqlstate("SELECT kms_deterministic_candidates('x', 'nope')", "42704");
        assert_sqlstate(
            "SELECT kms_deterministic_candidates('x', 'bad name!')",
            "22023",
        );
        // The privilege of kms_encrypt_deterministic: encrypt on the key.
        run("CREATE ROLE kv_reader IN ROLE kms_user");
        run("CREATE ROLE kv_writer IN ROLE kms_user");
        assert_eq!(
            as_role(
                "kv_reader",
                "SELECT kms_deterministic_candidates('x', 'pii')"
            ),
            None
        );
        run("SELECT kms_grant_key('pii', 'kv_reader', 'decrypt')");
        run("SELECT kms_grant_key('pii', 'kv_writer', 'encrypt')");
        for sql in [
            "SELECT kms_deterministic_candidates('x', 'pii')",
            "SELECT kms_encrypt_deterministic('x', 'pii')",
        ] {
            assert_eq!(as_role("kv_reader", sql).as_deref(), Some("42501"), "{sql}");
            assert_eq!(as_role("kv_writer", sql), None, "{sql}");
        }
        run("CREATE ROLE kv_nobody");
        assert_eq!(
            as_role(
                "kv_nobody",
                "SELECT kms_deterministic_candidates('x', 'pii')"
            )
            .as_deref(),
            Some("42501")
        );
        // A destroyed key gives no candidates.
        run("SELECT kms_destroy_key('pii', 'gone')");
        assert_sqlstate("SELECT kms_deterministic_candidates('x', 'pii')", "55000");
    }

    /// The README's INSERT recipe with parameters whose types the client
    /// leaves to the server (node-postgres, asyncpg): PREPARE without types
    /// deduces them as such a Parse does. `$1` used as a bigint and as
    /// `$1::text` is 42P08; `$1::bigint` and `$1::bigint::text` work.
    #[pg_test]
    fn readme_insert_recipe_with_untyped_parameters() {
        setup_key("pii");
        run("CREATE TEMP TABLE customers (id bigint PRIMARY KEY, email encrypted_text NOT NULL, phone encrypted_text)");
        assert_sqlstate(
            "PREPARE old_recipe AS INSERT INTO customers (id, email, phone)
             VALUES ($1, kms_encrypt($2, 'pii', $1::text), kms_encrypt($3, 'pii', $1::text))",
            "42P08",
        );
        run("PREPARE new_recipe AS INSERT INTO customers (id, email, phone)
             VALUES ($1::bigint, kms_encrypt($2, 'pii', $1::bigint::text), kms_encrypt($3, 'pii', $1::bigint::text))");
        run("PREPARE read_recipe AS SELECT kms_decrypt(email, id::text) || '/' || coalesce(kms_decrypt(phone, id::text), '-')
               FROM customers WHERE id = $1");
        run("EXECUTE new_recipe('7', 'a@example.com', NULL)");
        run("EXECUTE new_recipe(8, 'b@example.com', '555')");
        assert_eq!(
            one::<String>("EXECUTE read_recipe(7)").as_deref(),
            Some("a@example.com/-")
        );
        assert_eq!(
            one::<String>("EXECUTE read_recipe('8')").as_deref(),
            Some("b@example.com/555")
        );
        run("DEALLOCATE new_recipe");
        run("DEALLOCATE read_recipe");
    }

    /// The text check kms_decrypt does in Rust gives the server's answer
    /// (`pg_verify_mbstr(PG_UTF8, .., noError)`) for every 1- and 2-byte
    /// string, every 3-byte string with a multi-byte lead, and 200,000
    /// pseudo-random strings of 3 to 40 bytes biased to the edges.
    #[pg_test]
    fn rust_text_check_matches_the_server() {
        use crate::core::text::is_valid_utf8_text;
        let server = |b: &[u8]| {
            // SAFETY: reads exactly b.len() bytes of `b`; with noError it
            // returns false for invalid text instead of raising an ERROR.
            unsafe {
                pgrx::pg_sys::pg_verify_mbstr(
                    pgrx::pg_sys::pg_enc::PG_UTF8 as i32,
                    b.as_ptr() as *const _,
                    b.len() as i32,
                    true,
                )
            }
        };
        let check = |b: &[u8]| assert_eq!(is_valid_utf8_text(b), server(b), "{b:x?}");
        for a in 0..=255u8 {
            check(&[a]);
            for b in 0..=255u8 {
                check(&[a, b]);
            }
        }
        for a in 0xc0..=0xffu8 {
            for b in 0..=255u8 {
                for c in [
                    0x00, 0x41, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xff,
                ] {
                    check(&[a, b, c]);
                }
            }
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let edges = [
            0x00, 0x01, 0x41, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc2, 0xdf, 0xe0, 0xed,
            0xef, 0xf0, 0xf4, 0xf5, 0xff,
        ];
        for _ in 0..200_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = 3 + (x >> 59) as usize % 38;
            let v: Vec<u8> = (0..len)
                .map(|i| {
                    let r = x.rotate_left(7 * i as u32);
                    if r & 3 == 0 {
                        edges[(r >> 8) as usize % edges.len()]
                    } else if r & 3 == 1 {
                        0x80 | (r >> 16) as u8 & 0x3f
                    } else {
                        (r >> 24) as u8 & 0x7f | 0x20
                    }
                })
                .collect();
            check(&v);
        }
    }
}
