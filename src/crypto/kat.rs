//! Known-answer tests pinning pg_kms's v1 stored byte formats, and the
//! Wycheproof AES-256-GCM vectors. Everything below is a contract with data
//! already stored in databases: a change to any of these bytes makes stored
//! values unreadable, so it fails a test here. This comment is also the
//! format specification.
//!
//! The expected values were computed independently of this crate, with
//! Python's `cryptography` 48.0, `hmac`, `hashlib` and `base64` (AESGCM,
//! AESSIV, HKDF), from the fixed inputs below, and then checked against the
//! current code. The inputs are fake test bytes, never real keys:
//!
//! ```text
//! master key   00 01 .. 1f          (text form: 64 hex digits "000102..1f")
//! data key     20 21 .. 3f          (version 5 of key id 0x11223344)
//! index root   40 41 .. 5f          (the key's blind-index root)
//! nonces       60 .. 6b (envelope), 70 .. 7b (data-key wrap), 80 .. 8b (root wrap)
//! plaintext    "alice@example.com"  context "tenant-1"
//! ```
//!
//! Integers are big endian throughout. `HKDF(ikm, info, L)` is HKDF-SHA256
//! with salt "pg_kms" (RFC 5869), L = 32 unless said otherwise.
//!
//! **Master-key derivations** (`kdf`, `master`, `integrity`): each a 32-byte
//! `HKDF(master key, info)`.
//!
//! ```text
//! fingerprint (stored in kms.keyring)   info "pg_kms v1 master-key fingerprint"
//! KEK (AES-256-GCM key, never stored)   info "pg_kms v1 key-encryption key"
//! audit-chain MAC key                   info "pg_kms v1 audit chain"
//! catalog-row MAC key                   info "pg_kms v1 catalog row"
//! ```
//!
//! **Wrapped data key** (`kms.key_versions.wrapped_key`) and **wrapped
//! index root** (`kms.keys.index_key`), 60 bytes, AES-256-GCM under the KEK:
//!
//! ```text
//! offset  size  field
//!      0    12  nonce (random)
//!     12    32  encrypted key
//!     44    16  GCM tag
//! aad (26 bytes): label (18) || key id (4) || version (4)
//!   data key:   label "pg_kms v1 data key", version = the key version
//!   index root: label "pg_kms v1 idx root", version = 0
//! ```
//!
//! **Randomized envelope** (`encrypted_text` / `kms_encrypt`), AES-256-GCM
//! under the data key, associated data = header (10 bytes) || context:
//!
//! ```text
//! offset  size  field
//!      0     1  format version = 0x01
//!      1     1  flags: 0x01 bytea payload, 0x02 deterministic (clear here),
//!               0x04 sealed with a non-empty context; other bits must be 0
//!      2     4  key id (never 0)
//!      6     4  key version (1 ..= 2^31-1)
//!     10    12  nonce
//!     22     n  ciphertext (n = plaintext length)
//!   22+n    16  GCM tag
//! ```
//!
//! **Deterministic envelope** (`kms_encrypt_deterministic`), AES-256-SIV
//! (RFC 5297, CMAC-based S2V) with one associated-data component, header
//! (10 bytes) || context, under the SIV key
//! `HKDF(data key, "pg_kms v1 deterministic AES-SIV key", L = 64)`:
//!
//! ```text
//! offset  size  field
//!      0    10  header as above, flag 0x02 set
//!     10    16  synthetic IV (S2V tag)
//!     26     n  ciphertext
//! ```
//!
//! **Text form** (the `encrypted_text` output/input function, outside this
//! module): `"kms:"` followed by standard base64 (RFC 4648 alphabet, with
//! `=` padding) of the envelope bytes. Pinned here only as a constant; the
//! code that produces it is not in the crypto core.
//!
//! **Blind index** (`kms_blind_index`): index key = `HKDF(index root,
//! "pg_kms v1 blind index")`; value = the first `bits / 8` bytes of
//! `HMAC-SHA256(index key, u64(len context) || context || plaintext)`.
//!
//! **Catalog and audit MACs** (`integrity`): a canonical encoding of typed
//! fields (`i` + i64, `b` + u32 length + bytes, `n` for NULL), starting with
//! a label field. An audit row's hash is `SHA-256(prev hash || canonical
//! row)` and its MAC `HMAC-SHA256(audit key, hash)`; catalog rows are
//! MAC'd as `HMAC-SHA256(row key, canonical row)`:
//!
//! ```text
//! audit row:     b"pg_kms v1 audit row" i(id) i(at, µs since 1970) b(actor)
//!                b(operation) b?(key name) i?(version) b?(reason) b?(detail)
//!                b(master-key fingerprint) [b(role)]
//! keyring row:   b"pg_kms v1 keyring row" b(fingerprint) i(integrity since, µs)
//! key row:       b"pg_kms v1 key row" i(key id) b(name) i(primary version)
//!                i?(destroyed at, µs) b?(wrapped index root) i(generation)
//! version row:   b"pg_kms v1 key version row" i(key id) i(version) b(state)
//!                b?(wrapped data key) i(generation)
//! destroyed:     b"pg_kms v1 destroyed material" i(key id) i(version) b(wrapped)
//! (? = may be NULL, encoded as n; [role] = current_user at the act, present
//! only in rows that record it: a row without it encodes as before)
//! ```

#![cfg(test)]

use super::aead::{self, DataKey};
use super::derive::{MacKey, INFO_BLIND_INDEX};
use super::envelope::{
    Envelope, Header, DET_OVERHEAD, FLAG_BYTES, FLAG_CONTEXT, FLAG_DETERMINISTIC, FORMAT_V1,
    HEADER_LEN, NONCE_LEN, OVERHEAD, SIV_LEN, TAG_LEN,
};
use super::integrity::{self, AuditRow, IntegrityKeys, INFO_AUDIT, INFO_ROW};
use super::kdf::{hkdf32, Kek, WrapError, HKDF_SALT, INFO_FINGERPRINT, INFO_KEK, WRAPPED_LEN};
use super::master::MasterKey;
use super::siv::{SivKey, INFO_SIV};
use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Nonce, Tag};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

// ---- Fixed, obviously fake inputs -------------------------------------

/// `first, first + 1, ..` (the fake test bytes of the table above).
const fn seq<const N: usize>(first: u8) -> [u8; N] {
    let mut a = [0u8; N];
    let mut i = 0;
    while i < N {
        a[i] = first + i as u8;
        i += 1;
    }
    a
}

const MASTER_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const MASTER: [u8; 32] = seq(0x00);
const DATA_KEY: [u8; 32] = seq(0x20);
const INDEX_ROOT: [u8; 32] = seq(0x40);
const NONCE: [u8; 12] = seq(0x60);
const WRAP_NONCE: [u8; 12] = seq(0x70);
const ROOT_NONCE: [u8; 12] = seq(0x80);
const PREV_HASH: [u8; 32] = seq(0x90);
const KEY_ID: u32 = 0x1122_3344;
const VERSION: u32 = 5;
const PT: &[u8] = b"alice@example.com";
const CTX: &[u8] = b"tenant-1";

// ---- Expected outputs (hex), computed once, independently --------------

const KA_FINGERPRINT: &str = "6879158fd8ffe31f756cc189956e059eb394e11e07a281387e3dd793725d3b55";
const KA_KEK: &str = "0eb6798af5d4e7271bf20dac7a3034972c159ea8d0ccedd3ca155778a9a01ad5";
const KA_WRAPPED_DK: &str = "707172737475767778797a7b8e16dac972330b5383b368211fa11ec50a83ff38791e4aada52437eadf7d677d0685d4da73e654d3ef7bf11dfdb134fd";
const KA_WRAPPED_ROOT: &str = "808182838485868788898a8b39b0da6cec7d9c9541759a1336202c751b273c2c2059e95a815433b7b5af5e095c09cdea3262edbb51780b7386eb98aa";
/// Randomized, text, no context (flags 0x00).
const KA_GCM_TEXT: &str = "01001122334400000005606162636465666768696a6b83f8c4c896901e2d982917d0706410161fa2776f04e5f3a90eaac129d28a9c9c43";
/// Randomized, bytea, with context (flags 0x05).
const KA_GCM_BYTEA_CTX: &str = "01051122334400000005606162636465666768696a6b83f8c4c896901e2d982917d0706410161f046ee668cb7dffed2d0204e82a81062a";
/// Randomized, empty plaintext (the shortest envelope, 38 bytes).
const KA_GCM_EMPTY: &str =
    "01001122334400000005606162636465666768696a6b6db8595d0ac4827112d5f5915c30a77e";
/// `HKDF(data key, "pg_kms v1 deterministic AES-SIV key", 64)`.
const KA_SIV_KEY: &str = "e62cd4f23bba040e83d2094f70683df392002c8729a2097e85cffa1d7532c0e01fe24eaeb8526c8617018c79de46caa622ac4d5fc5572f6822aab5ecde4909de";
/// Deterministic, text, with context (flags 0x06).
const KA_SIV_TEXT_CTX: &str =
    "0106112233440000000528694f15cc9aa34adff1a7ab5207781d65fd9507987d03f910be67f8519157dd8d";
/// Deterministic, bytea, no context (flags 0x03).
const KA_SIV_BYTEA: &str =
    "010311223344000000058727da9c828d751cb49d58f7bc061eed73bba9c7dd4e6eed309caa47cd42e8a664";
/// Deterministic, empty plaintext (26 bytes).
const KA_SIV_EMPTY: &str = "01021122334400000005c17c6e74adca9cb53a3a28c45c5040c0";
/// The text form of [`KA_GCM_TEXT`].
const KA_TEXT_FORM: &str =
    "kms:AQARIjNEAAAABWBhYmNkZWZnaGlqa4P4xMiWkB4tmCkX0HBkEBYfondvBOXzqQ6qwSnSipycQw==";
const KA_INDEX_KEY: &str = "2a2eafa4f9649528906b9d7114eaf98d756c2a30e8d00f22138b7ace248aa2f8";
const KA_BLIND_INDEX_CTX: &str = "a8f2ca5ec07d1dfe7ab0001d1c2c1ef49f8509439403d34c604370f082726f68";
const KA_BLIND_INDEX: &str = "44ed59be6309e6384417d5499ca26137cc7050285b2aa9667965f3f554d68963";
const KA_AUDIT_KEY: &str = "1ec77515f20f7a4c1dd5704f141d76b0dd0d4585221757d9a870db691cfa9e5f";
const KA_ROW_KEY: &str = "08f94fb087c825c80bfd62ae909b1992b9264f7ce732abf2bad6c4bfb0d00e9a";
const KA_AUDIT_CANON: &str = "620000001370675f6b6d7320763120617564697420726f776900000000000000076900060a24182022406200000005616c696365620000000a6372656174655f6b657962000000037069696900000000000000016e62000000077b2261223a317d62000000206879158fd8ffe31f756cc189956e059eb394e11e07a281387e3dd793725d3b55";
const KA_AUDIT_HASH: &str = "c2080bb26d1b3685c99bb492c59c3f9e33bae652c88ad995c2ded9cca1d2e5aa";
const KA_AUDIT_MAC: &str = "7b33ef2a2968281f132c017640d93b51aa7f65d30bf35cc7703f934203352fd9";
/// [`KA_AUDIT_CANON`] with `role` "sec_admin" appended (Python: canon +
/// b'b' + len.to_bytes(4, 'big') + b'sec_admin'; hash and MAC as above).
const KA_AUDIT_ROLE_CANON: &str = "620000001370675f6b6d7320763120617564697420726f776900000000000000076900060a24182022406200000005616c696365620000000a6372656174655f6b657962000000037069696900000000000000016e62000000077b2261223a317d62000000206879158fd8ffe31f756cc189956e059eb394e11e07a281387e3dd793725d3b5562000000097365635f61646d696e";
const KA_AUDIT_ROLE_HASH: &str = "4ae7f33633e7c3907bda571c688690c241f0d86c7417a61372adf11677ed9dac";
const KA_AUDIT_ROLE_MAC: &str = "c445d2f88cb34febcdc795be831accef628cdcb8c88a236baa9ed50682a22c68";
const KA_KEYRING_ROW_MAC: &str = "a74e97be7fc18d52eef2114c56cb4f41d9d69ba3b806d1ccfd64a1988c757d2a";
const KA_KEY_ROW_MAC: &str = "1e3840cf7e1dd2254b59732dd0050f155cfd4db73123fc61601c96b843a54333";
const KA_VERSION_ROW_MAC: &str = "37af29c0b18620b68aacc9a5f62fde3a211eed32bf9a87233e033a32258bf6e6";
const KA_DESTROYED_MAC: &str = "370323068d61d823ec53cf7fc41d0805ad4ac0e4661fbad2106227d122d02ff4";

// ---- Helpers -------------------------------------------------------------

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).expect("valid hex constant")
}

/// Asserts `got == hex(expected)`. On a mismatch it names the value and the
/// first differing offset (which field changed, per the tables above)
/// rather than printing the bytes.
#[track_caller]
fn check(what: &str, got: &[u8], expected: &str) {
    let want = h(expected);
    if got != want.as_slice() {
        let at = got
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: format changed (length {} vs pinned {}, first difference at offset {at})",
            got.len(),
            want.len()
        );
    }
}

fn header(flags: u8) -> Header {
    Header {
        flags,
        key_id: KEY_ID,
        key_version: VERSION,
    }
}

fn master() -> MasterKey {
    MasterKey::from_hex_text(MASTER_HEX.as_bytes()).expect("valid master key text")
}

fn data_key() -> Zeroizing<[u8; 32]> {
    Zeroizing::new(DATA_KEY)
}

fn open_gcm(key: &DataKey, sealed: &[u8], context: &[u8]) -> Option<Vec<u8>> {
    aead::open(key, sealed, context).ok().map(|p| p.to_vec())
}

fn seal_siv(key: &SivKey, flags: u8, context: &[u8], pt: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; pt.len() + DET_OVERHEAD];
    key.seal_into(header(flags), context, pt, &mut out);
    out
}

fn open_siv(key: &SivKey, sealed: &[u8], context: &[u8]) -> Option<Vec<u8>> {
    let env = Envelope::parse(sealed).ok()?;
    let mut out = vec![0u8; env.ciphertext.len()];
    key.open_into(&env, context, &mut out).ok()?;
    Some(out)
}

// ---- Known answers -------------------------------------------------------

/// The layout constants the tables above describe.
#[test]
fn layout_constants() {
    assert_eq!(FORMAT_V1, 1);
    assert_eq!((HEADER_LEN, NONCE_LEN, TAG_LEN, SIV_LEN), (10, 12, 16, 16));
    assert_eq!((OVERHEAD, DET_OVERHEAD, WRAPPED_LEN), (38, 26, 60));
    assert_eq!((FLAG_BYTES, FLAG_DETERMINISTIC, FLAG_CONTEXT), (1, 2, 4));
    assert_eq!(HKDF_SALT, b"pg_kms");
    assert_eq!(INFO_FINGERPRINT, b"pg_kms v1 master-key fingerprint");
    assert_eq!(INFO_KEK, b"pg_kms v1 key-encryption key");
    assert_eq!(INFO_AUDIT, b"pg_kms v1 audit chain");
    assert_eq!(INFO_ROW, b"pg_kms v1 catalog row");
    assert_eq!(INFO_BLIND_INDEX, b"pg_kms v1 blind index");
    assert_eq!(INFO_SIV, b"pg_kms v1 deterministic AES-SIV key");
    check(
        "header",
        &header(FLAG_BYTES).encode(),
        "01011122334400000005",
    );
}

/// The master key's text form, fingerprint and KEK.
#[test]
fn master_key_derivations() {
    let mk = master();
    check("fingerprint", &mk.fingerprint(), KA_FINGERPRINT);
    check(
        "fingerprint (HKDF)",
        hkdf32(HKDF_SALT, &MASTER, INFO_FINGERPRINT).as_ref(),
        KA_FINGERPRINT,
    );
    check("KEK", hkdf32(HKDF_SALT, &MASTER, INFO_KEK).as_ref(), KA_KEK);
    // The text form accepts upper case and surrounding whitespace.
    let upper = format!("\n  {}\t\n", MASTER_HEX.to_ascii_uppercase());
    let mk2 = MasterKey::from_hex_text(upper.as_bytes()).expect("valid master key text");
    assert_eq!(mk2.fingerprint(), mk.fingerprint());
}

/// The wrapped data key and wrapped index root, both ways, through the KEK
/// derived from the master key.
#[test]
fn wrapped_keys() {
    let kek = master().kek();
    let wrapped = kek.wrap(KEY_ID, VERSION, &data_key(), &WRAP_NONCE);
    check("wrapped data key", &wrapped, KA_WRAPPED_DK);
    let root = Zeroizing::new(INDEX_ROOT);
    let wrapped_root = kek.wrap_index_root(KEY_ID, &root, &ROOT_NONCE);
    check("wrapped index root", &wrapped_root, KA_WRAPPED_ROOT);

    let dk = kek
        .unwrap_raw(KEY_ID, VERSION, &h(KA_WRAPPED_DK))
        .expect("pinned wrapped key opens");
    assert!(*dk == DATA_KEY, "unwrapped data key");
    let r = kek
        .unwrap_index_root(KEY_ID, &h(KA_WRAPPED_ROOT))
        .expect("pinned wrapped root opens");
    assert!(*r == INDEX_ROOT, "unwrapped index root");

    // The same through a KEK built from the pinned KEK bytes.
    let mut kek_bytes = Zeroizing::new([0u8; 32]);
    kek_bytes.copy_from_slice(&h(KA_KEK));
    let kek2 = Kek::from_bytes(&kek_bytes);
    check(
        "wrapped data key (pinned KEK)",
        &kek2.wrap(KEY_ID, VERSION, &data_key(), &WRAP_NONCE),
        KA_WRAPPED_DK,
    );
    // Bound to key id, version and purpose.
    let w = h(KA_WRAPPED_DK);
    assert_eq!(
        kek.unwrap_raw(KEY_ID, VERSION + 1, &w),
        Err(WrapError::Auth)
    );
    assert_eq!(
        kek.unwrap_raw(KEY_ID + 1, VERSION, &w),
        Err(WrapError::Auth)
    );
    assert_eq!(kek.unwrap_index_root(KEY_ID, &w), Err(WrapError::Auth));
}

/// Randomized (AES-256-GCM) envelopes: seal with the fixed nonce gives the
/// pinned bytes, and the pinned bytes open (only) with their context.
#[test]
fn randomized_envelopes() {
    let dk = DataKey::new(&data_key());
    let cases: [(u8, &[u8], &[u8], &str); 3] = [
        (0, b"", PT, KA_GCM_TEXT),
        (FLAG_BYTES, CTX, PT, KA_GCM_BYTEA_CTX),
        (0, b"", b"", KA_GCM_EMPTY),
    ];
    for (flags, ctx, pt, expected) in cases {
        check(
            "randomized envelope",
            &aead::seal(&dk, header(flags), &NONCE, ctx, pt),
            expected,
        );
        let env_bytes = h(expected);
        assert_eq!(open_gcm(&dk, &env_bytes, ctx).as_deref(), Some(pt));
        assert_eq!(open_gcm(&dk, &env_bytes, b"other"), None);
        let env = Envelope::parse(&env_bytes).expect("pinned envelope parses");
        assert_eq!(env.header.key_id, KEY_ID);
        assert_eq!(env.header.key_version, VERSION);
        assert_eq!(env.header.is_bytes(), flags & FLAG_BYTES != 0);
        assert_eq!(env.header.has_context(), !ctx.is_empty());
        assert!(!env.header.is_deterministic());
        assert_eq!(env.nonce, NONCE);
        assert_eq!(env_bytes.len(), pt.len() + OVERHEAD);
    }
    // The context flag is the sealer's: a caller's stray flag is cleared.
    check(
        "randomized envelope",
        &aead::seal(&dk, header(FLAG_CONTEXT), &NONCE, b"", PT),
        KA_GCM_TEXT,
    );
}

/// The envelope can be rebuilt from the specification with the bare
/// AES-256-GCM primitive (associated data = header || context).
#[test]
fn randomized_envelope_from_spec() {
    let cipher = aes_gcm::Aes256Gcm::new(&DATA_KEY.into());
    let hdr = header(FLAG_BYTES | FLAG_CONTEXT).encode();
    let mut body = PT.to_vec();
    let tag = cipher
        .encrypt_in_place_detached(
            Nonce::from_slice(&NONCE),
            &[&hdr[..], CTX].concat(),
            &mut body,
        )
        .expect("encrypts");
    let env = [&hdr[..], &NONCE, &body, &tag].concat();
    check("randomized envelope (spec)", &env, KA_GCM_BYTEA_CTX);
}

/// Deterministic (AES-256-SIV) envelopes, both ways, with the SIV key
/// derived from the data key.
#[test]
fn deterministic_envelopes() {
    let sk = SivKey::derive(&DATA_KEY);
    let cases: [(u8, &[u8], &[u8], &str); 3] = [
        (0, CTX, PT, KA_SIV_TEXT_CTX),
        (FLAG_BYTES, b"", PT, KA_SIV_BYTEA),
        (0, b"", b"", KA_SIV_EMPTY),
    ];
    for (flags, ctx, pt, expected) in cases {
        check(
            "deterministic envelope",
            &seal_siv(&sk, flags, ctx, pt),
            expected,
        );
        let env_bytes = h(expected);
        assert_eq!(open_siv(&sk, &env_bytes, ctx).as_deref(), Some(pt));
        assert_eq!(open_siv(&sk, &env_bytes, b"other"), None);
        let env = Envelope::parse(&env_bytes).expect("pinned envelope parses");
        assert!(env.header.is_deterministic());
        assert_eq!(env.header.is_bytes(), flags & FLAG_BYTES != 0);
        assert_eq!(env.header.has_context(), !ctx.is_empty());
        assert_eq!(
            (env.header.key_id, env.header.key_version),
            (KEY_ID, VERSION)
        );
        assert_eq!(env_bytes.len(), pt.len() + DET_OVERHEAD);
    }
    // The SIV key derivation, and the envelope rebuilt from the
    // specification with the bare AES-SIV primitive.
    let mut siv_key = [0u8; 64];
    hkdf::Hkdf::<Sha256>::new(Some(HKDF_SALT), &DATA_KEY)
        .expand(INFO_SIV, &mut siv_key)
        .expect("64 bytes");
    check("SIV key", &siv_key, KA_SIV_KEY);
    let mut bare = aes_siv::siv::Aes256Siv::new(GenericArray::from_slice(&siv_key));
    let hdr = header(FLAG_DETERMINISTIC | FLAG_CONTEXT).encode();
    let mut body = PT.to_vec();
    let tag = bare
        .encrypt_in_place_detached([[&hdr[..], CTX].concat()], &mut body)
        .expect("encrypts");
    let env = [&hdr[..], &tag, &body].concat();
    check("deterministic envelope (spec)", &env, KA_SIV_TEXT_CTX);
}

/// The whole chain: master key → KEK → pinned wrapped data key → data key
/// and SIV key → pinned envelopes open.
#[test]
fn master_key_opens_pinned_envelopes() {
    let dk = master()
        .kek()
        .unwrap_raw(KEY_ID, VERSION, &h(KA_WRAPPED_DK))
        .expect("pinned wrapped key opens");
    let gcm = DataKey::new(&dk);
    assert_eq!(
        open_gcm(&gcm, &h(KA_GCM_BYTEA_CTX), CTX).as_deref(),
        Some(PT)
    );
    let siv = SivKey::derive(dk.as_ref());
    assert_eq!(
        open_siv(&siv, &h(KA_SIV_TEXT_CTX), CTX).as_deref(),
        Some(PT)
    );
}

/// The `kms:` text form of a pinned envelope, through the code that
/// prints and parses it (`crate::crypto::text`).
#[test]
fn text_form() {
    use crate::crypto::text::{parse_text_form, to_text_form};
    assert_eq!(to_text_form(&h(KA_GCM_TEXT)), KA_TEXT_FORM);
    let decoded = parse_text_form(KA_TEXT_FORM.as_bytes()).expect("parses");
    check("text form", &decoded, KA_GCM_TEXT);
}

/// The blind-index key and values, derived from the unwrapped index root.
#[test]
fn blind_index() {
    let root = master()
        .kek()
        .unwrap_index_root(KEY_ID, &h(KA_WRAPPED_ROOT))
        .expect("pinned wrapped root opens");
    check(
        "index key",
        hkdf32(HKDF_SALT, root.as_ref(), INFO_BLIND_INDEX).as_ref(),
        KA_INDEX_KEY,
    );
    let key = MacKey::derive(root.as_ref(), INFO_BLIND_INDEX);
    let bi = |ctx: &[u8], bits| key.blind_index(ctx, PT, bits).expect("valid bits");
    check("blind index", &bi(CTX, 256), KA_BLIND_INDEX_CTX);
    check("blind index", &bi(b"", 256), KA_BLIND_INDEX);
    check("blind index", &bi(CTX, 64), &KA_BLIND_INDEX_CTX[..16]);
    check("blind index", &bi(CTX, 16), &KA_BLIND_INDEX_CTX[..4]);
    // MacKey::derive is HMAC under exactly the pinned index key.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&h(KA_INDEX_KEY)).expect("any length");
    m.update(b"probe");
    assert!(
        key.hmac(b"probe") == *m.finalize().into_bytes(),
        "index key"
    );
}

/// The integrity keys, an audit row (canonical form, chain hash, MAC) and
/// the MACs of each kind of catalog row.
#[test]
fn integrity_macs() {
    let fp = master().fingerprint();
    let keys: IntegrityKeys = master().integrity_keys();
    check(
        "audit key",
        hkdf32(HKDF_SALT, &MASTER, INFO_AUDIT).as_ref(),
        KA_AUDIT_KEY,
    );
    check(
        "row key",
        hkdf32(HKDF_SALT, &MASTER, INFO_ROW).as_ref(),
        KA_ROW_KEY,
    );
    let row = AuditRow {
        id: 7,
        at_us: 1_700_000_000_123_456,
        actor: b"alice",
        operation: b"create_key",
        key_name: Some(b"pii"),
        version: Some(1),
        reason: None,
        detail: Some(br#"{"a":1}"#),
        key_fp: &fp,
        role: None,
    };
    check("audit canonical row", &row.canonical(), KA_AUDIT_CANON);
    let hash = row.chain_hash(&PREV_HASH);
    check("audit hash", &hash, KA_AUDIT_HASH);
    check("audit MAC", &keys.audit.hmac(&hash), KA_AUDIT_MAC);
    assert!(keys.audit.verify(&hash, &h(KA_AUDIT_MAC)));
    assert!(!keys.row.verify(&hash, &h(KA_AUDIT_MAC)));
    // The same row recording current_user: one more field at the end, so
    // the row without it (above) keeps its encoding, hash and MAC.
    let with_role = AuditRow {
        role: Some(b"sec_admin"),
        ..row.clone()
    };
    check(
        "audit canonical row with role",
        &with_role.canonical(),
        KA_AUDIT_ROLE_CANON,
    );
    assert_eq!(
        with_role.canonical()[..row.canonical().len()],
        row.canonical()[..]
    );
    let role_hash = with_role.chain_hash(&PREV_HASH);
    check("audit hash with role", &role_hash, KA_AUDIT_ROLE_HASH);
    check(
        "audit MAC with role",
        &keys.audit.hmac(&role_hash),
        KA_AUDIT_ROLE_MAC,
    );

    let row_mac = |msg: Vec<u8>| keys.row.hmac(&msg);
    let id = KEY_ID as i32;
    let ver = VERSION as i32;
    check(
        "keyring row MAC",
        &row_mac(integrity::keyring_row(&fp, 1_700_000_000_000_000)),
        KA_KEYRING_ROW_MAC,
    );
    check(
        "key row MAC",
        &row_mac(integrity::key_row(
            id,
            b"pii",
            ver,
            None,
            Some(&h(KA_WRAPPED_ROOT)),
            7,
        )),
        KA_KEY_ROW_MAC,
    );
    check(
        "version row MAC",
        &row_mac(integrity::version_row(
            id,
            ver,
            b"active",
            Some(&h(KA_WRAPPED_DK)),
            7,
        )),
        KA_VERSION_ROW_MAC,
    );
    check(
        "destruction receipt MAC",
        &row_mac(integrity::destroyed_material(id, ver, &h(KA_WRAPPED_DK))),
        KA_DESTROYED_MAC,
    );
    // IntegrityKeys::from_master is what MasterKey::integrity_keys uses.
    let direct = IntegrityKeys::from_master(&MASTER);
    assert!(direct.audit.hmac(&hash) == keys.audit.hmac(&hash));
    assert!(direct.row.hmac(&hash) == keys.row.hmac(&hash));
}

// ---- Wycheproof ----------------------------------------------------------

/// Seals and opens one vector with `cipher`; returns (seal gave exactly
/// `ct_tag`, `ct_tag` opened to `pt`).
fn run_gcm<C: AeadInPlace>(cipher: &C, v: &[&[u8]; 6]) -> (bool, bool) {
    let [_, nonce, aad, pt, ct_tag, _] = *v;
    let nonce = Nonce::from_slice(nonce);
    let mut buf = pt.to_vec();
    let tag = cipher
        .encrypt_in_place_detached(nonce, aad, &mut buf)
        .expect("encrypts");
    let sealed = [&buf[..], &tag].concat() == ct_tag;
    let (ct, tag) = ct_tag.split_at(ct_tag.len() - TAG_LEN);
    let mut buf = ct.to_vec();
    let opened = cipher
        .decrypt_in_place_detached(nonce, aad, &mut buf, Tag::from_slice(tag))
        .is_ok();
    assert!(!opened || buf == pt, "opened to the wrong plaintext");
    (sealed, opened)
}

/// Project Wycheproof's AES-GCM vectors for 256-bit keys (testdata/README.md),
/// through the AES-256-GCM that seals envelopes ([`DataKey`]) and the one
/// that wraps data keys (`aes_gcm::Aes256Gcm`, the KEK's). pg_kms uses only
/// 96-bit nonces and 128-bit tags; vectors with other sizes are skipped,
/// and counted. Valid vectors must seal to exactly the expected bytes and
/// open; invalid ones must not open.
#[test]
fn wycheproof_aes256_gcm() {
    use blobby::Blob6Iterator;
    let data = include_bytes!("testdata/wycheproof-aes256-gcm.blb");
    let (mut valid, mut invalid, mut skipped) = (0, 0, 0);
    for row in Blob6Iterator::new(data).expect("blobby header") {
        let v = row.expect("blobby record");
        let [key, nonce, _, pt, ct_tag, status] = v;
        assert_eq!(key.len(), 32, "only AES-256 vectors are in the file");
        if nonce.len() != NONCE_LEN || ct_tag.len() != pt.len() + TAG_LEN {
            skipped += 1;
            continue;
        }
        let pass = match status {
            [1] => true,
            [0] => false,
            _ => panic!("unexpected status for a 96-bit nonce vector"),
        };
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(key);
        let dk = DataKey::new(&k);
        assert_eq!(run_gcm(dk.cipher(), &v), (pass, pass));
        let kek_cipher = aes_gcm::Aes256Gcm::new(k.as_ref().into());
        assert_eq!(run_gcm(&kek_cipher, &v), (pass, pass));
        if pass {
            valid += 1;
        } else {
            invalid += 1;
        }
    }
    assert_eq!(
        (valid, invalid, skipped),
        (39, 27, 39),
        "every vector of the file was run or skipped as expected"
    );
}

// ---- The crypto core stays pure ----------------------------------------

/// No file under src/crypto/ (found at test time, so new files are covered)
/// uses the PostgreSQL binding crate or any crate module outside
/// `crate::crypto` (which could pull it in). Comment lines are ignored.
#[test]
fn crypto_core_is_pure() {
    // The two pure folders: each may use only itself within the crate.
    for (folder, allowed, at_least) in [
        ("src/crypto", concat!("crate", "::crypto"), 10),
        ("src/core", concat!("crate", "::core"), 4),
    ] {
        let bad = impure_lines(folder, allowed, at_least);
        assert!(bad.is_empty(), "{folder} must stay pure: {bad:?}");
    }
}

/// Lines of the `.rs` files under `folder` (recursively) that mention pgrx,
/// pg_sys, or a `crate::` path other than `allowed`; comments are skipped.
fn impure_lines(folder: &str, allowed: &str, at_least: usize) -> Vec<String> {
    let forbidden = [concat!("pg", "rx"), concat!("pg", "_sys")];
    let krate = concat!("crate", "::");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(folder);
    let mut files = Vec::new();
    let mut todo = vec![dir];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("readable source folder") {
            let p = e.expect("directory entry").path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    assert!(files.len() >= at_least, "found the sources of {folder}");
    let mut bad = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("readable source");
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            let outside = code
                .match_indices(krate)
                .any(|(i, _)| !code[i..].starts_with(allowed));
            if outside || forbidden.iter().any(|w| code.contains(w)) {
                bad.push(format!("{}:{}", f.display(), n + 1));
            }
        }
    }
    bad
}
