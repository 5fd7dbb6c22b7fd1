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
#[pg_extern(volatile, parallel_safe)]
fn kms_encrypt_deterministic(
    plaintext: Option<RawText>,
    key_name: Option<RawText>,
    context: default!(Option<RawText>, "NULL"),
) -> Option<EncryptedText> {
    crate::values::encrypt_deterministic(plaintext, key_name, context)
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
}
