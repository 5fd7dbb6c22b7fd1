//! The per-value SQL API: encrypt, decrypt, rewrap, header readers.
//!
//! These are not SECURITY DEFINER: once a key is cached they do no SPI, no
//! catalog read and no system call. A cache miss reads the catalog under a
//! temporary switch to the catalog owner (see `catalog::as_catalog_owner`).

use crate::core::text::is_valid_utf8_text;
use crate::crypto::envelope::{
    Envelope, Header, DET_OVERHEAD, FLAG_BYTES, FLAG_DETERMINISTIC, OVERHEAD,
};
use crate::crypto::{open_into, seal_into, AuthError};
use crate::errors::{KmsError, KmsResult, OrRaise};
use crate::keys::access::Op;
use crate::keys::{self, Privilege};
use crate::pg::datum::{EncryptedText, OutBytea, OutText, RawText};
use crate::pg::encoding::{db_encoding, text_to_utf8, Utf8, PG_SQL_ASCII, PG_UTF8};
use pgrx::callconv::{BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable, TypeOrigin,
};
use pgrx::prelude::*;
use zeroize::Zeroizing;

/// The context as UTF-8 bytes: contexts are sealed (and blind-indexed) as
/// UTF-8 like text, so a value sealed in a LATIN1 database with context
/// 'café' still opens after a restore into a UTF-8 one. Borrows when no
/// conversion is needed (no context, ASCII, or a UTF-8 database).
#[inline]
fn ctx_bytes(context: &Option<RawText>) -> Utf8<'_> {
    match context {
        Some(c) if !c.bytes().is_empty() => text_to_utf8(c.bytes()),
        _ => Utf8::Borrowed(&[]),
    }
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

/// How a use is counted in the access audit: as what it is (an encryption
/// or a decryption), or as another operation (`Instead(op, for_user)`: a
/// rewrap, a secret read for the user calling; `op` None: not at all,
/// the sealing half of a rewrap). Each value is counted once.
#[derive(Clone, Copy)]
enum Counted {
    AsIs,
    Instead(Option<Op>, Option<pg_sys::Oid>),
}

/// Seals `plaintext` under the primary version of `key_name`.
#[inline(always)]
fn seal_value(
    plaintext: &[u8],
    key_name: &[u8],
    context: &[u8],
    flags: u8,
) -> KmsResult<EncryptedText> {
    keys::with_primary(key_name, |v| {
        seal_with(v, plaintext, context, flags, Counted::AsIs)
    })
}

#[inline(always)]
fn seal_with(
    v: &keys::CachedVersion,
    plaintext: &[u8],
    context: &[u8],
    flags: u8,
    how: Counted,
) -> KmsResult<EncryptedText> {
    v.check(Privilege::Encrypt)?;
    let header = Header {
        flags,
        key_id: v.key_id,
        key_version: v.number,
    };
    if flags & FLAG_DETERMINISTIC != 0 {
        // AES-SIV under the version's SIV key: no nonce, same input, same value.
        let (out, buf) = EncryptedText::alloc(plaintext.len() + DET_OVERHEAD);
        v.det.seal_into(header, context, plaintext, buf);
        count_seal(v, how);
        return Ok(out);
    }
    let nonce = keys::nonce()?;
    let (out, buf) = EncryptedText::alloc(plaintext.len() + OVERHEAD);
    seal_into(v.data_key(), header, &nonce, context, plaintext, buf);
    count_seal(v, how);
    Ok(out)
}

#[inline]
fn count_seal(v: &keys::CachedVersion, how: Counted) {
    match how {
        Counted::AsIs => v.count_encryption(),
        Counted::Instead(op, user) => v.count_as(false, op, user),
    }
}

/// Opens `env` (the envelope of `value`) into `out`, which must be
/// `env.ciphertext.len()` bytes; returns its header and the plaintext's
/// length, which is shorter than `out` only for a deterministic value
/// sealed by pg_kms 0.1.0 (AES-GCM, read after the AES-SIV reading failed).
#[inline]
fn open_value(
    value: &EncryptedText,
    env: &Envelope<'_>,
    context: &[u8],
    out: &mut [u8],
    how: Counted,
) -> KmsResult<(Header, usize)> {
    keys::with_version(env.header.key_id, env.header.key_version, |v| {
        v.check(Privilege::Decrypt)?;
        let len = if !env.header.is_deterministic() {
            open_into(v.data_key(), env, context, out).map(|_| out.len())
        } else if v.det.open_into(env, context, out).is_ok() {
            Ok(out.len())
        } else {
            match Envelope::parse_v010_deterministic(value.bytes()) {
                Some(old) => {
                    let n = old.ciphertext.len();
                    open_into(v.data_key(), &old, context, &mut out[..n]).map(|_| n)
                }
                None => Err(AuthError),
            }
        }
        .map_err(|_| KmsError::AuthFailed)?;
        match how {
            Counted::AsIs => v.count_decryption(),
            Counted::Instead(op, user) => v.count_as(true, op, user),
        }
        Ok((env.header, len))
    })
}

/// Opens `env` (the envelope of `value`) into a zeroized-on-drop
/// temporary (cold paths).
fn open_to_vec(
    value: &EncryptedText,
    env: &Envelope<'_>,
    context: &[u8],
    how: Counted,
) -> KmsResult<Zeroizing<Vec<u8>>> {
    let mut tmp = Zeroizing::new(vec![0u8; env.ciphertext.len()]);
    let (_, len) = open_value(value, env, context, &mut tmp, how)?;
    tmp.truncate(len);
    Ok(tmp)
}

/// Seals text given in the database encoding (sealed as UTF-8).
pub fn seal_text(plaintext: &[u8], key_name: &[u8], context: &[u8]) -> KmsResult<EncryptedText> {
    seal_text_with_flags(plaintext, key_name, context, 0)
}

#[inline]
fn seal_text_with_flags(
    plaintext: &[u8],
    key_name: &[u8],
    context: &[u8],
    flags: u8,
) -> KmsResult<EncryptedText> {
    seal_value(&text_to_utf8(plaintext), key_name, context, flags)
}

/// The SQL-facing text sealers: NULL plaintext gives NULL.
#[inline]
fn encrypt_text_arg(
    plaintext: Option<RawText>,
    key_name: Option<RawText>,
    context: Option<RawText>,
    flags: u8,
) -> Option<EncryptedText> {
    let pt = plaintext?;
    let name = require_key_name(&key_name);
    Some(seal_text_with_flags(pt.bytes(), name, &ctx_bytes(&context), flags).or_raise())
}

/// The body of SQL `kms_encrypt()`.
pub fn encrypt(
    plaintext: Option<RawText>,
    key_name: Option<RawText>,
    context: Option<RawText>,
) -> Option<EncryptedText> {
    encrypt_text_arg(plaintext, key_name, context, 0)
}

/// The body of SQL `kms_encrypt_deterministic()`.
pub fn encrypt_deterministic(
    plaintext: Option<RawText>,
    key_name: Option<RawText>,
    context: Option<RawText>,
) -> Option<EncryptedText> {
    encrypt_text_arg(plaintext, key_name, context, FLAG_DETERMINISTIC)
}

/// The body of SQL `kms_deterministic_candidates()`: the deterministic
/// value of `plaintext` under every usable version of the key (active and
/// decrypt-only; not disabled or destroyed ones), the primary first, then
/// newest first, so that `col = ANY(...)` also finds values that were not
/// yet rewrapped after a rotation. The privilege is that of
/// `kms_encrypt_deterministic` (`encrypt`): the caller could compute the
/// primary's value anyway, and the others only let it find rows it could
/// find before the rotation. Deterministic values sealed by pg_kms 0.1.0
/// (AES-GCM) are never among them: they match once rewrapped.
///
/// Warm, this reads no catalog: the versions come from the cached key
/// (`keys::key_by_name` loads it on a miss only).
pub fn deterministic_candidates(
    plaintext: Option<RawText>,
    key_name: Option<RawText>,
    context: Option<RawText>,
) -> Option<EncryptedTextArray> {
    let pt = plaintext?;
    let name = require_key_name(&key_name);
    let r = (|| -> KmsResult<Vec<EncryptedText>> {
        let key = keys::key_by_name(name)?;
        // The permission error comes before any state error, as in encrypt.
        key.check(Privilege::Encrypt)?;
        let primary = key.primary_version()?;
        let mut others: Vec<&keys::CachedVersion> = key
            .usable_versions()
            .filter(|v| v.number != primary.number)
            .collect();
        others.sort_unstable_by_key(|v| std::cmp::Reverse(v.number));
        let plain = text_to_utf8(pt.bytes());
        let ctx = ctx_bytes(&context);
        std::iter::once(primary)
            .chain(others)
            .map(|v| seal_with(v, &plain, &ctx, FLAG_DETERMINISTIC, Counted::AsIs))
            .collect()
    })();
    Some(EncryptedTextArray(r.or_raise()))
}

/// An `encrypted_text[]` result. Built without a catalog query per call
/// (pgrx's `Vec<EncryptedText>` would look the element type up with SPI
/// for every element): the element type is that of the function's declared
/// result, from the syscache.
pub struct EncryptedTextArray(Vec<EncryptedText>);

// SAFETY: the SQL type is encrypted_text[] (the mapping of
// Vec<EncryptedText>), which is what box_into returns.
unsafe impl SqlTranslatable for EncryptedTextArray {
    const TYPE_IDENT: &'static str = <EncryptedText as SqlTranslatable>::TYPE_IDENT;
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::ThisExtension;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> =
        Err(ArgumentError::NotValidAsArgument("EncryptedTextArray"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> =
        <Vec<EncryptedText> as SqlTranslatable>::RETURN_SQL;
}

// SAFETY: the datum returned is a complete one-dimensional array of the
// function's declared result type (encrypted_text[], see SqlTranslatable),
// palloc'd by construct_array in the memory context current during the
// call, where Postgres expects pass-by-reference results.
unsafe impl BoxRet for EncryptedTextArray {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        let mut elems: Vec<pg_sys::Datum> = self
            .0
            .into_iter()
            .map(|v| v.into_datum().expect("a value"))
            .collect();
        // SAFETY: called by pgrx's wrapper with the live FunctionCallInfo of
        // this call, whose flinfo is set by fmgr. get_func_rettype,
        // get_element_type and get_typlenbyvalalign are syscache lookups
        // (they raise an ERROR on a missing entry); construct_array reads
        // `elems.len()` datums, each a complete encrypted_text varlena
        // palloc'd in this call's memory context, and copies them.
        let array = unsafe {
            let raw = fcinfo.as_mut_ptr();
            let result_type = pg_sys::get_func_rettype((*(*raw).flinfo).fn_oid);
            let elem_type = pg_sys::get_element_type(result_type);
            assert!(elem_type != pg_sys::InvalidOid, "returns an array");
            let (mut len, mut byval, mut align) = (0i16, false, 0 as std::ffi::c_char);
            pg_sys::get_typlenbyvalalign(elem_type, &mut len, &mut byval, &mut align);
            pg_sys::construct_array(
                elems.as_mut_ptr(),
                elems.len() as i32,
                elem_type,
                len as i32,
                byval,
                align,
            )
        };
        // SAFETY: `array` is the palloc'd array built above.
        unsafe { fcinfo.return_raw_datum(pg_sys::Datum::from(array)) }
    }
}

/// The body of SQL `kms_blind_index()`.
pub fn blind_index(
    plaintext: Option<RawText>,
    key_name: Option<RawText>,
    context: Option<RawText>,
    bits: default!(i32, 256),
) -> Option<OutBytea> {
    let pt = plaintext?;
    let name = require_key_name(&key_name);
    let r = (|| -> KmsResult<OutBytea> {
        if !(16..=256).contains(&bits) || bits % 8 != 0 {
            return Err(KmsError::BadArgument {
                message: format!("invalid blind index size {bits}"),
                hint: "bits must be a multiple of 8 from 16 to 256; fewer bits leak less through collisions.",
            });
        }
        let key = keys::key_by_name(name)?;
        key.check(Privilege::Encrypt)?;
        // The index root is erased only by kms_destroy_key(): the key is destroyed.
        let Some(index) = key.index.as_ref() else {
            return Err(KmsError::KeyDestroyed {
                key: key.name.clone(),
                action: "compute a blind index",
            });
        };
        let mac = index
            .blind_index(&ctx_bytes(&context), &text_to_utf8(pt.bytes()), bits as u32)
            .expect("bits checked");
        // The index key is the key's, not a version's: version 0.
        keys::access::record(key.id, 0, Op::BlindIndex);
        let (out, buf) = OutBytea::alloc(mac.len());
        buf.copy_from_slice(&mac);
        Ok(out)
    })();
    Some(r.or_raise())
}

/// The body of SQL `kms_encrypt_bytea()`.
pub fn encrypt_bytea(
    plaintext: Option<&[u8]>,
    key_name: Option<RawText>,
    context: Option<RawText>,
) -> Option<EncryptedText> {
    let pt = plaintext?;
    let name = require_key_name(&key_name);
    Some(seal_value(pt, name, &ctx_bytes(&context), FLAG_BYTES).or_raise())
}

/// The body of SQL `kms_decrypt()`.
pub fn decrypt(value: Option<EncryptedText>, context: Option<RawText>) -> Option<OutText> {
    Some(decrypt_text(&value?, &ctx_bytes(&context)).or_raise())
}

/// Opens a value as text in the database encoding.
pub fn decrypt_text(value: &EncryptedText, ctx: &[u8]) -> KmsResult<OutText> {
    decrypt_text_counted(value, ctx, Counted::AsIs)
}

/// Opens a secret's value (sealed without context) for `caller`: counted
/// in the access audit as a `secret_read` by the caller, not as a
/// decryption by the catalog owner that reads it.
pub fn decrypt_secret_text(value: &EncryptedText, caller: pg_sys::Oid) -> KmsResult<OutText> {
    decrypt_text_counted(
        value,
        &[],
        Counted::Instead(Some(Op::SecretRead), Some(caller)),
    )
}

fn decrypt_text_counted(value: &EncryptedText, ctx: &[u8], how: Counted) -> KmsResult<OutText> {
    let enc = db_encoding();
    let env = value.envelope();
    let is_text = !env.header.is_bytes();
    if is_text && enc != PG_UTF8 && enc != PG_SQL_ASCII {
        // Sealed as UTF-8: decrypt aside, then convert to the database encoding.
        let tmp = open_to_vec(value, &env, ctx, how)?;
        if tmp.is_empty() {
            return Ok(OutText::alloc(0).0);
        }
        // SAFETY: pg_any_to_server reads `tmp.len()` (> 0) bytes from `tmp`
        // and returns either `tmp.as_ptr()` itself (no conversion needed:
        // detected below, never read as a C string) or a new NUL-terminated
        // string palloc'd in CurrentMemoryContext; invalid input raises an
        // ERROR (through pgrx's FFI guard).
        let conv = unsafe {
            pg_sys::pg_any_to_server(tmp.as_ptr() as *const _, tmp.len() as i32, PG_UTF8)
        };
        if conv as *const u8 == tmp.as_ptr() {
            let (out, buf) = OutText::alloc(tmp.len());
            buf.copy_from_slice(&tmp);
            return Ok(out);
        }
        // SAFETY: `conv` is the NUL-terminated palloc'd conversion result
        // (not `tmp`, checked above), alive in CurrentMemoryContext; text
        // holds no NUL, so its length is the whole value. It is copied,
        // wiped (it holds plaintext) and freed at once.
        unsafe {
            let len = std::ffi::CStr::from_ptr(conv).to_bytes().len();
            let (out, buf) = OutText::alloc(len);
            buf.copy_from_slice(std::slice::from_raw_parts(conv as *const u8, len));
            std::ptr::write_bytes(conv, 0, len);
            pg_sys::pfree(conv as *mut std::ffi::c_void);
            return Ok(out);
        }
    }
    let (mut out, buf) = OutText::alloc(env.ciphertext.len());
    let (_, len) = open_value(value, &env, ctx, buf, how)?;
    out.truncate(len);
    let buf = &mut buf[..len];
    // Never hand back bytes that are not valid text in this database (text
    // is sealed as UTF-8: checked in Rust, the same rule as the server's).
    let valid = if enc == PG_SQL_ASCII {
        // SQL_ASCII takes any byte but NUL (pg_ascii_verifystr).
        !buf.contains(&0)
    } else if is_text || enc == PG_UTF8 {
        is_valid_utf8_text(buf)
    } else {
        // SAFETY: pg_verify_mbstr reads exactly buf.len() bytes of `buf`,
        // which open_value has just filled; with noError = true it reports
        // invalid text by returning false instead of raising an ERROR.
        unsafe { pg_sys::pg_verify_mbstr(enc, buf.as_ptr() as *const _, buf.len() as i32, true) }
    };
    if !valid {
        buf.iter_mut().for_each(|b| *b = 0);
        return Err(KmsError::NotText);
    }
    Ok(out)
}

/// The body of SQL `kms_decrypt_bytea()`.
pub fn decrypt_bytea(value: Option<EncryptedText>, context: Option<RawText>) -> Option<OutBytea> {
    let value = value?;
    let env = value.envelope();
    let (mut out, buf) = OutBytea::alloc(env.ciphertext.len());
    let (_, len) = open_value(&value, &env, &ctx_bytes(&context), buf, Counted::AsIs).or_raise();
    out.truncate(len);
    Some(out)
}

/// Re-seals under the key's current primary version. A value already
/// under the primary is returned unchanged (not opened).
pub fn rewrap(value: EncryptedText, context: &[u8]) -> KmsResult<EncryptedText> {
    let env = value.envelope();
    let header = env.header;
    let key = keys::key_by_id(header.key_id)?;
    if header.key_version == key.primary {
        return Ok(value);
    }
    // Counted once, as a rewrap of the version it was sealed under.
    let plaintext = open_to_vec(
        &value,
        &env,
        context,
        Counted::Instead(Some(Op::Rewrap), None),
    )?;
    key.check(Privilege::Encrypt)?;
    seal_with(
        key.primary_version()?,
        &plaintext,
        context,
        header.flags,
        Counted::Instead(None, None),
    )
}

/// The body of SQL `kms_rewrap()`.
pub fn rewrap_sql(value: Option<EncryptedText>, context: Option<RawText>) -> Option<EncryptedText> {
    Some(rewrap(value?, &ctx_bytes(&context)).or_raise())
}

/// The body of SQL `kms_key_name()`.
pub fn key_name_of(value: EncryptedText) -> String {
    let header = value.envelope().header;
    keys::key_by_id(header.key_id).or_raise().name.clone()
}

/// The body of SQL `kms_key_version()`.
pub fn key_version_of(value: EncryptedText) -> i32 {
    value.envelope().header.key_version as i32
}
