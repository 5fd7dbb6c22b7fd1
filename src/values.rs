//! The per-value SQL API: encrypt, decrypt, rewrap, header readers.
//!
//! These are not SECURITY DEFINER: once a key is cached they do no SPI, no
//! catalog read and no system call. A cache miss reads the catalog under a
//! temporary switch to the catalog owner (see `keyring::as_catalog_owner`).

use crate::crypto::envelope::{Header, FLAG_BYTES, OVERHEAD};
use crate::crypto::{open_into, seal_into};
use crate::errors::{KmsError, KmsResult, OrRaise};
use crate::keyring;
use crate::types::{EncryptedText, OutBytea, OutText, RawText};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::borrow::Cow;
use zeroize::Zeroizing;

#[inline]
fn ctx_bytes(context: &Option<RawText>) -> &[u8] {
    context.as_ref().map(|c| c.bytes()).unwrap_or(&[])
}

fn require_key_name(key_name: &Option<RawText>) -> &[u8] {
    match key_name {
        Some(k) => k.bytes(),
        None => KmsError::BadArgument {
            message: "key name must not be NULL".into(),
            hint: "Pass the name of a key created with kms_create_key().",
        }
        .raise(),
    }
}

#[inline]
fn db_encoding() -> i32 {
    unsafe { pg_sys::GetDatabaseEncoding() }
}

const PG_UTF8: i32 = pg_sys::pg_enc::PG_UTF8 as i32;
const PG_SQL_ASCII: i32 = pg_sys::pg_enc::PG_SQL_ASCII as i32;

/// Text is sealed as UTF-8 so values survive a dump into a database with
/// another encoding; in a UTF-8 (or SQL_ASCII) database this borrows.
fn text_to_utf8(bytes: &[u8]) -> Cow<'_, [u8]> {
    let enc = db_encoding();
    if enc == PG_UTF8 || enc == PG_SQL_ASCII || bytes.is_ascii() {
        return Cow::Borrowed(bytes);
    }
    unsafe {
        let p = pg_sys::pg_server_to_any(bytes.as_ptr() as *const _, bytes.len() as i32, PG_UTF8);
        if p as *const u8 == bytes.as_ptr() {
            Cow::Borrowed(bytes)
        } else {
            Cow::Owned(std::ffi::CStr::from_ptr(p).to_bytes().to_vec())
        }
    }
}

/// Seals `plaintext` under the primary version of `key_name`.
#[inline]
fn seal_value(plaintext: &[u8], key_name: &[u8], context: &[u8], flags: u8) -> KmsResult<EncryptedText> {
    seal_with(&*keyring::key_by_name(key_name)?, plaintext, context, flags)
}

#[inline]
fn seal_with(key: &keyring::CachedKey, plaintext: &[u8], context: &[u8], flags: u8) -> KmsResult<EncryptedText> {
    let v = key.primary_version()?;
    let nonce = keyring::nonce()?;
    let header = Header { flags, key_id: key.id, key_version: key.primary };
    let (out, buf) = EncryptedText::alloc(plaintext.len() + OVERHEAD);
    seal_into(v.data_key(), header, &nonce, context, plaintext, buf);
    v.count_encryption(&key.name);
    Ok(out)
}

/// Opens `value` into `out`, which must be `plaintext_len(value)` bytes.
#[inline]
fn open_value(value: &EncryptedText, context: &[u8], out: &mut [u8]) -> KmsResult<Header> {
    let env = value.envelope();
    let key = keyring::key_by_id(env.header.key_id)?;
    let v = key.usable(env.header.key_version)?;
    open_into(v.data_key(), &env, context, out).map_err(|_| KmsError::AuthFailed)?;
    v.count_decryption();
    Ok(env.header)
}

#[inline]
fn plaintext_len(value: &EncryptedText) -> usize {
    value.envelope().ciphertext.len()
}

/// Opens into a zeroized-on-drop temporary (cold paths).
fn open_to_vec(value: &EncryptedText, context: &[u8]) -> KmsResult<Zeroizing<Vec<u8>>> {
    let mut tmp = Zeroizing::new(vec![0u8; plaintext_len(value)]);
    open_value(value, context, &mut tmp)?;
    Ok(tmp)
}

#[pg_extern(volatile, parallel_safe)]
fn kms_encrypt(
    plaintext: Option<RawText>,
    key_name: Option<RawText>,
    context: default!(Option<RawText>, "NULL"),
) -> Option<EncryptedText> {
    let pt = plaintext?;
    let name = require_key_name(&key_name);
    let utf8 = text_to_utf8(pt.bytes());
    Some(seal_value(&utf8, name, ctx_bytes(&context), 0).or_raise())
}

#[pg_extern(volatile, parallel_safe)]
fn kms_encrypt_bytea(
    plaintext: Option<&[u8]>,
    key_name: Option<RawText>,
    context: default!(Option<RawText>, "NULL"),
) -> Option<EncryptedText> {
    let pt = plaintext?;
    let name = require_key_name(&key_name);
    Some(seal_value(pt, name, ctx_bytes(&context), FLAG_BYTES).or_raise())
}

#[pg_extern(stable, parallel_safe)]
fn kms_decrypt(value: Option<EncryptedText>, context: default!(Option<RawText>, "NULL")) -> Option<OutText> {
    let value = value?;
    let ctx = ctx_bytes(&context);
    let enc = db_encoding();
    let is_text = !value.envelope().header.is_bytes();
    if is_text && enc != PG_UTF8 && enc != PG_SQL_ASCII {
        // Sealed as UTF-8: decrypt aside, then convert to the database encoding.
        let tmp = open_to_vec(&value, ctx).or_raise();
        let conv = unsafe { pg_sys::pg_any_to_server(tmp.as_ptr() as *const _, tmp.len() as i32, PG_UTF8) };
        let conv = unsafe { std::ffi::CStr::from_ptr(conv) }.to_bytes();
        let (out, buf) = OutText::alloc(conv.len());
        buf.copy_from_slice(conv);
        return Some(out);
    }
    let (out, buf) = OutText::alloc(plaintext_len(&value));
    open_value(&value, ctx, buf).or_raise();
    // Never hand back bytes that are not valid text in this database.
    let verify_enc = if is_text { PG_UTF8 } else { enc };
    if enc != PG_SQL_ASCII
        && !unsafe { pg_sys::pg_verify_mbstr(verify_enc, buf.as_ptr() as *const _, buf.len() as i32, true) }
    {
        buf.iter_mut().for_each(|b| *b = 0);
        KmsError::NotText.raise();
    }
    Some(out)
}

#[pg_extern(stable, parallel_safe)]
fn kms_decrypt_bytea(value: Option<EncryptedText>, context: default!(Option<RawText>, "NULL")) -> Option<OutBytea> {
    let value = value?;
    let (out, buf) = OutBytea::alloc(plaintext_len(&value));
    open_value(&value, ctx_bytes(&context), buf).or_raise();
    Some(out)
}

/// Re-seals under the key's current primary version. A value already
/// under the primary is returned unchanged (not opened).
pub fn rewrap(value: EncryptedText, context: &[u8]) -> KmsResult<EncryptedText> {
    let header = value.envelope().header;
    let key = keyring::key_by_id(header.key_id)?;
    if header.key_version == key.primary {
        return Ok(value);
    }
    let plaintext = open_to_vec(&value, context)?;
    seal_with(&key, &plaintext, context, header.flags)
}

/// Re-seals under the key's current primary version without returning the
/// plaintext. A value already under the primary is returned unchanged.
#[pg_extern(volatile, parallel_safe)]
fn kms_rewrap(value: Option<EncryptedText>, context: default!(Option<RawText>, "NULL")) -> Option<EncryptedText> {
    Some(rewrap(value?, ctx_bytes(&context)).or_raise())
}

#[pg_extern(stable, strict, parallel_safe)]
fn kms_key_name(value: EncryptedText) -> String {
    let header = value.envelope().header;
    keyring::key_by_id(header.key_id).or_raise().name.clone()
}

#[pg_extern(immutable, strict, parallel_safe)]
fn kms_key_version(value: EncryptedText) -> i32 {
    value.envelope().header.key_version as i32
}
