//! Datum wrappers that avoid copies on the hot path, and the
//! `encrypted_text` type with its text and binary I/O.
//!
//! * [`EncryptedText`]: a detoasted `encrypted_text` varlena (argument) or a
//!   freshly palloc'd one (result).
//! * [`RawText`]: a `text` argument as raw bytes in the database encoding
//!   (no UTF-8 check, no copy).
//! * [`OutText`] / [`OutBytea`]: results built in place in palloc'd memory.

use crate::crypto::envelope::Envelope;
use crate::crypto::text::{parse_text_form, to_text_form};
use crate::errors::{KmsError, OrRaise};
use pgrx::callconv::{Arg, ArgAbi, BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::nullable::Nullable;
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable, TypeOrigin,
};
use pgrx::prelude::*;
use pgrx::{FromDatum, IntoDatum};
use std::ffi::{CStr, CString};

/// Bytes of a (detoasted, possibly short-header) varlena.
///
/// # Safety
///
/// `v` points to a valid, non-null, not-TOASTed (inline, uncompressed;
/// 1- or 4-byte header) varlena that stays allocated, in its memory
/// context, and unmodified for all of `'a`.
#[inline]
unsafe fn varlena_bytes<'a>(v: *const pg_sys::varlena) -> &'a [u8] {
    pgrx::varlena::varlena_to_byte_slice(v)
}

/// A palloc'd varlena with `len` payload bytes in CurrentMemoryContext.
#[inline]
fn alloc_varlena(len: usize) -> (*mut pg_sys::varlena, &'static mut [u8]) {
    // SAFETY: called only in a backend during a function call or a
    // transaction (SQL functions, the worker's `xact`), where a valid
    // CurrentMemoryContext exists; palloc either returns `total` writable,
    // MAXALIGNed bytes or raises an ERROR (never NULL; lengths over
    // MaxAllocSize are refused there, before the i32 cast could wrap). The
    // 4-byte header is written and the slice covers exactly the `len`
    // payload bytes after it. The memory lives until that context is reset
    // (end of the current call, tuple or transaction), not really 'static:
    // callers fill the slice and return the varlena without keeping the
    // slice. The payload bytes are uninitialised until the caller fills them.
    unsafe {
        let total = len + pg_sys::VARHDRSZ;
        let ptr = pg_sys::palloc(total) as *mut pg_sys::varlena;
        pgrx::varlena::set_varsize_4b(ptr, total as i32);
        let data = (ptr as *mut u8).add(pg_sys::VARHDRSZ);
        (ptr, std::slice::from_raw_parts_mut(data, len))
    }
}

macro_rules! simple_arg {
    ($ty:ident) => {
        // SAFETY: `$ty` implements FromDatum for exactly the SQL type its
        // SqlTranslatable mapping declares, so unbox_arg_using_from_datum
        // reads the argument Datum as the type Postgres passes; a NULL is
        // never turned into a value (panic, or Nullable::Null).
        unsafe impl<'fcx> ArgAbi<'fcx> for $ty {
            unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
                let index = arg.index();
                arg.unbox_arg_using_from_datum()
                    .unwrap_or_else(|| panic!("argument {index} must not be null"))
            }
            unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
                arg.unbox_arg_using_from_datum().into()
            }
        }
    };
}
macro_rules! varlena_arg {
    ($ty:ident) => {
        impl FromDatum for $ty {
            unsafe fn from_polymorphic_datum(
                datum: pg_sys::Datum,
                is_null: bool,
                _: pg_sys::Oid,
            ) -> Option<Self> {
                if is_null || datum.is_null() {
                    None
                } else {
                    Some($ty(pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr())))
                }
            }
        }

        simple_arg!($ty);

        impl $ty {
            /// The payload, valid for the duration of the current call.
            #[inline]
            pub fn bytes(&self) -> &[u8] {
                // SAFETY: self.0 comes from pg_detoast_datum_packed in
                // from_polymorphic_datum (an inline varlena: the argument
                // itself or a copy in the call's memory context) or from
                // alloc_varlena (palloc'd, header set); the field is private,
                // so no other pointer gets in. Both stay valid and unchanged
                // until the memory context current when the value was made
                // is reset (end of the call, or of the worker's
                // transaction), and no value is kept longer than that.
                unsafe { varlena_bytes(self.0) }
            }
        }
    };
}

macro_rules! varlena_ret {
    ($ty:ident) => {
        // SAFETY: self.0 is a complete varlena palloc'd by alloc_varlena in
        // the memory context current during the call (the one Postgres
        // expects pass-by-reference results in) and is of the SQL type the
        // SqlTranslatable mapping of `$ty` declares as the return type.
        unsafe impl BoxRet for $ty {
            unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
                fcinfo.return_raw_datum(pg_sys::Datum::from(self.0))
            }
        }

        impl $ty {
            /// A new value with `len` uninitialised payload bytes to fill.
            #[inline]
            pub fn alloc(len: usize) -> ($ty, &'static mut [u8]) {
                let (ptr, buf) = alloc_varlena(len);
                ($ty(ptr), buf)
            }
        }
    };
}

/// An `encrypted_text` value.
pub struct EncryptedText(*mut pg_sys::varlena);
varlena_arg!(EncryptedText);
varlena_ret!(EncryptedText);

impl IntoDatum for EncryptedText {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(pg_sys::Datum::from(self.0))
    }
    fn type_oid() -> pg_sys::Oid {
        crate::keyring::encrypted_text_oid().or_raise()
    }
}

impl EncryptedText {
    pub fn from_bytes(b: &[u8]) -> EncryptedText {
        let (v, buf) = EncryptedText::alloc(b.len());
        buf.copy_from_slice(b);
        v
    }

    pub fn envelope(&self) -> Envelope<'_> {
        Envelope::parse(self.bytes())
            .map_err(KmsError::from)
            .or_raise()
    }
}

// SAFETY: encrypted_text is a variable-length (varlena, by-reference) type
// created by this extension; EncryptedText is read and returned as a
// pointer to such a varlena (varlena_arg!/varlena_ret!), so SQL and Rust
// agree on the representation.
unsafe impl SqlTranslatable for EncryptedText {
    const TYPE_IDENT: &'static str = "pg_kms::types::EncryptedText";
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::ThisExtension;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> =
        Ok(SqlMappingRef::literal("encrypted_text"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> =
        Ok(ReturnsRef::One(SqlMappingRef::literal("encrypted_text")));
}

/// A `text` argument seen as raw bytes in the database encoding (no UTF-8
/// check, no copy), so any database encoding works.
#[derive(Clone, Copy)]
pub struct RawText(*mut pg_sys::varlena);
varlena_arg!(RawText);
pgrx::impl_sql_translatable!(RawText, arg_only = "text");

impl RawText {
    /// A new text datum holding `s` (ASCII callers: valid in every encoding).
    pub fn from_ascii(s: &str) -> RawText {
        let (ptr, buf) = alloc_varlena(s.len());
        buf.copy_from_slice(s.as_bytes());
        RawText(ptr)
    }
}

/// Passed on unchanged (e.g. as an SPI argument of type text).
impl IntoDatum for RawText {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(pg_sys::Datum::from(self.0))
    }
    fn type_oid() -> pg_sys::Oid {
        pg_sys::TEXTOID
    }
}

/// A `regclass` argument.
pub struct RegClass(pub pg_sys::Oid);
impl FromDatum for RegClass {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        (!is_null).then(|| RegClass(pg_sys::Oid::from(datum.value() as u32)))
    }
}
pgrx::impl_sql_translatable!(RegClass, arg_only = "regclass");

/// A `regrole` argument.
pub struct RegRole(pub pg_sys::Oid);
impl FromDatum for RegRole {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        (!is_null).then(|| RegRole(pg_sys::Oid::from(datum.value() as u32)))
    }
}
pgrx::impl_sql_translatable!(RegRole, arg_only = "regrole");

/// A `name` argument.
pub struct SqlName(pub String);
impl FromDatum for SqlName {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        (!is_null && !datum.is_null()).then(|| {
            SqlName(
                CStr::from_ptr(datum.cast_mut_ptr::<std::ffi::c_char>())
                    .to_string_lossy()
                    .into_owned(),
            )
        })
    }
}
pgrx::impl_sql_translatable!(SqlName, arg_only = "name");

simple_arg!(RegClass);
simple_arg!(SqlName);
simple_arg!(RegRole);

/// A `text` result built in place.
pub struct OutText(*mut pg_sys::varlena);
varlena_ret!(OutText);
// SAFETY: text is a varlena type and OutText is only ever returned, as a
// pointer to a palloc'd varlena (not valid as an argument).
unsafe impl SqlTranslatable for OutText {
    const TYPE_IDENT: &'static str = "pg_kms::types::OutText";
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> =
        Err(ArgumentError::NotValidAsArgument("OutText"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> =
        Ok(ReturnsRef::One(SqlMappingRef::literal("text")));
}

/// A `bytea` result built in place.
pub struct OutBytea(*mut pg_sys::varlena);
varlena_ret!(OutBytea);
// SAFETY: bytea is a varlena type and OutBytea is only ever returned, as a
// pointer to a palloc'd varlena (not valid as an argument).
unsafe impl SqlTranslatable for OutBytea {
    const TYPE_IDENT: &'static str = "pg_kms::types::OutBytea";
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> =
        Err(ArgumentError::NotValidAsArgument("OutBytea"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> =
        Ok(ReturnsRef::One(SqlMappingRef::literal("bytea")));
}

// ---------------------------------------------------------------------------
// encrypted_text I/O. Input only parses and validates: it never encrypts,
// so pg_dump/pg_restore and COPY can never double-encrypt.

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
