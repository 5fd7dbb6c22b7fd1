//! The `encrypted_text` type: its text and binary I/O functions, its casts
//! to and from bytea, and (in `sql/`) its operators and operator classes.
//! Input (and the cast from bytea) only parses and validates: it never
//! encrypts, so pg_dump/pg_restore and COPY can never double-encrypt.

use crate::crypto::envelope::Envelope;
use crate::crypto::text::{parse_text_form, to_text_form};
use crate::errors::{KmsError, OrRaise};
use crate::pg::datum::{EncryptedText, OutBytea};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::{CStr, CString};

extension_sql!(
    "CREATE TYPE encrypted_text;",
    name = "encrypted_text_shell",
    creates = [Type(EncryptedText)],
);

#[pg_extern(immutable, strict, parallel_safe)]
fn encrypted_text_in(input: &CStr) -> EncryptedText {
    let bytes = parse_text_form(input.to_bytes())
        .map_err(KmsError::from)
        .or_raise();
    EncryptedText::from_bytes(&bytes)
}

#[pg_extern(immutable, strict, parallel_safe)]
fn encrypted_text_out(value: EncryptedText) -> CString {
    CString::new(to_text_form(value.bytes())).expect("base64 has no NUL")
}

#[pg_extern(immutable, strict, parallel_safe)]
fn encrypted_text_recv(mut buf: pgrx::datum::Internal) -> EncryptedText {
    // SAFETY: a type's receive function is called (strict, so never with
    // NULL) with `internal` pointing to the StringInfo of the message being
    // read, which the caller owns and keeps alive for this call.
    let si = unsafe { buf.get_mut::<pg_sys::StringInfoData>() }.expect("receive buffer");
    let start = si.cursor as usize;
    let end = si.len as usize;
    // SAFETY: a StringInfo keeps 0 <= cursor <= len and `data` holds `len`
    // initialised bytes; the slice covers the unread part, which is not
    // modified while `bytes` lives (cursor is moved only after the copy).
    let bytes =
        unsafe { std::slice::from_raw_parts((si.data as *const u8).add(start), end - start) };
    Envelope::parse(bytes).map_err(KmsError::from).or_raise();
    let v = EncryptedText::from_bytes(bytes);
    si.cursor = si.len;
    v
}

#[pg_extern(immutable, strict, parallel_safe)]
fn encrypted_text_send(value: EncryptedText) -> OutBytea {
    let b = value.bytes();
    let (out, buf) = OutBytea::alloc(b.len());
    buf.copy_from_slice(b);
    out
}

extension_sql!(
    r#"
CREATE TYPE encrypted_text (
    INPUT = encrypted_text_in,
    OUTPUT = encrypted_text_out,
    RECEIVE = encrypted_text_recv,
    SEND = encrypted_text_send,
    INTERNALLENGTH = VARIABLE,
    ALIGNMENT = int4,
    STORAGE = external,
    CATEGORY = 'U'
);
COMMENT ON TYPE encrypted_text IS 'AES-256-GCM envelope (format, key id, key version, nonce, ciphertext, tag) produced by kms_encrypt(), or AES-256-SIV (header, synthetic IV, ciphertext) from kms_encrypt_deterministic(); text form kms:<base64>';
CREATE CAST (encrypted_text AS bytea) WITHOUT FUNCTION;
"#,
    name = "encrypted_text_type",
    requires = [
        "encrypted_text_shell",
        encrypted_text_in,
        encrypted_text_out,
        encrypted_text_recv,
        encrypted_text_send
    ],
);

/// The function of the explicit cast `bytea::encrypted_text`, for clients
/// that send the raw envelope as bytea (binary protocol): validates it as
/// `encrypted_text_recv` does (22P02 otherwise) and never encrypts.
#[pg_extern(immutable, strict, parallel_safe)]
fn encrypted_text_from_bytea(raw: &[u8]) -> EncryptedText {
    Envelope::parse(raw).map_err(KmsError::from).or_raise();
    EncryptedText::from_bytes(raw)
}

extension_sql!(
    "CREATE CAST (bytea AS encrypted_text) WITH FUNCTION encrypted_text_from_bytea(bytea);\n",
    name = "encrypted_text_from_bytea_cast",
    requires = ["encrypted_text_type", encrypted_text_from_bytea],
);

// Comparison and hash functions, operators and operator classes (btree and
// hash: equality of deterministic values, UNIQUE constraints, joins).
extension_sql_file!(
    "../../sql/encrypted_text.sql",
    name = "encrypted_text_ops",
    requires = ["encrypted_text_type"]
);

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::api::test_support::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn malformed_literals_give_22p02() {
        let env = "AQAAAAABAAAAAQ"; // header only (10 bytes), no nonce/tag
        for lit in [
            "".to_string(),
            "hello".into(),
            "kms:".into(),
            "kms:!!!!".into(),
            "KMS:AAAA".into(),
            format!("kms:{env}=="),
            "kms:AgAAAAABAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(), // format version 2
            "kms:AQAAAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(), // key id 0
            "kms:AQAAAAABAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(), // version 0
            "kms:AYAAAAABAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(), // unknown flags
        ] {
            assert_sqlstate(&format!("SELECT '{lit}'::encrypted_text"), "22P02");
        }
        // A literal into a column is parsed, never encrypted.
        run("CREATE TEMP TABLE people (email encrypted_text)");
        assert_sqlstate("INSERT INTO people VALUES ('alice@example.com')", "22P02");
        // No implicit cast to or from text.
        assert_sqlstate("INSERT INTO people SELECT 'x'::text", "42804");
        assert_sqlstate("SELECT length(email) FROM people", "42883");
        // A valid literal round-trips through text unchanged.
        setup_key("pii");
        assert_eq!(
            one::<bool>("SELECT v::text::encrypted_text::text = v::text FROM (SELECT kms_encrypt('a','pii') v) s"),
            Some(true)
        );
    }

    /// `bytea::encrypted_text` (for binary-protocol clients) accepts a real
    /// envelope and validates like the type's input (22P02 otherwise); it is
    /// explicit only, so plaintext bytes are never stored by accident.
    #[pg_test]
    fn cast_from_bytea_validates() {
        setup_key("pii");
        for v in [
            "kms_encrypt('a', 'pii')",
            "kms_encrypt_deterministic('a', 'pii')",
            "kms_encrypt('a', 'pii', 'ctx')",
        ] {
            assert_eq!(
                one::<bool>(&format!(
                    "SELECT v::bytea::encrypted_text = v AND v::bytea::encrypted_text::text = v::text FROM (SELECT {v} v) s"
                )),
                Some(true),
                "{v}"
            );
        }
        assert_eq!(
            one::<String>(
                "SELECT kms_decrypt(kms_encrypt('hello', 'pii', 'c')::bytea::encrypted_text, 'c')"
            )
            .as_deref(),
            Some("hello")
        );
        assert_eq!(
            one::<bool>("SELECT NULL::bytea::encrypted_text IS NULL"),
            Some(true)
        );
        // The same structural checks as the text form and binary receive.
        for lit in [
            "",
            "AQAAAAABAAAAAQ==",
            "AgAAAAABAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "AQAAAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "AQAAAAABAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "AYAAAAABAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_sqlstate(
                &format!("SELECT decode('{lit}', 'base64')::encrypted_text"),
                "22P02",
            );
        }
        assert_sqlstate(
            "SELECT convert_to('alice@example.com', 'UTF8')::encrypted_text",
            "22P02",
        );
        assert_sqlstate(
            "SELECT encrypted_text_from_bytea('\\x0102'::bytea)",
            "22P02",
        );
        // Explicit only: bytea is not stored into an encrypted_text column
        // without the cast.
        run("CREATE TEMP TABLE people (email encrypted_text)");
        assert_sqlstate(
            "INSERT INTO people SELECT kms_encrypt('a', 'pii')::bytea",
            "42804",
        );
        run("INSERT INTO people SELECT kms_encrypt('a', 'pii')::bytea::encrypted_text");
        assert_eq!(
            one::<String>("SELECT kms_decrypt(email) FROM people").as_deref(),
            Some("a")
        );
        assert_eq!(
            one::<String>(
                "SELECT castcontext::text || castmethod::text FROM pg_cast
                  WHERE castsource = 'bytea'::regtype AND casttarget = 'encrypted_text'::regtype"
            )
            .as_deref(),
            Some("ef")
        );
    }
}
