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
    crate::values::key_name(value)
}

#[pg_extern(immutable, strict, parallel_safe)]
fn kms_key_version(value: EncryptedText) -> i32 {
    crate::values::key_version(value)
}
