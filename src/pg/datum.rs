//! Datum wrappers that avoid copies on the hot path (the `encrypted_text`
//! type's SQL functions are in `crate::api::encrypted_text`).
//!
//! * [`EncryptedText`]: a detoasted `encrypted_text` varlena (argument) or a
//!   freshly palloc'd one (result).
//! * [`RawText`]: a `text` argument as raw bytes in the database encoding
//!   (no UTF-8 check, no copy).
//! * [`OutText`] / [`OutBytea`]: results built in place in palloc'd memory.

use crate::crypto::envelope::Envelope;
use crate::errors::{KmsError, KmsResult, OrRaise};
use pgrx::callconv::{Arg, ArgAbi, BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::nullable::Nullable;
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable, TypeOrigin,
};
use pgrx::prelude::*;
use pgrx::{FromDatum, IntoDatum};
use std::ffi::CStr;

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

/// `pg_detoast_datum_packed`: an out-of-line or compressed value is
/// fetched and expanded (a guarded call into the server); an inline one
/// (1- or 4-byte header), the usual case for short values, is returned as
/// it is without a call, as pg_detoast_datum_packed itself would.
///
/// # Safety
///
/// `v` points to a valid, non-null varlena datum.
#[inline]
unsafe fn detoast_packed(v: *mut pg_sys::varlena) -> *mut pg_sys::varlena {
    // SAFETY: the caller passes a valid varlena, whose first header byte
    // these two read.
    let extended = unsafe { pgrx::varlena::varatt_is_1b_e(v) || pgrx::varlena::varatt_is_4b_c(v) };
    if extended {
        // SAFETY: as above; an ERROR (e.g. a missing TOAST chunk) is raised
        // through pgrx's guard.
        unsafe { pg_sys::pg_detoast_datum_packed(v) }
    } else {
        v
    }
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
        // Unguarded first (see crate::pg::fast); the guarded palloc only
        // when that fails, to raise its ERROR.
        let ptr = match super::fast::try_palloc(total) {
            Some(p) => p as *mut pg_sys::varlena,
            None => pg_sys::palloc(total) as *mut pg_sys::varlena,
        };
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
            #[inline(always)]
            unsafe fn from_polymorphic_datum(
                datum: pg_sys::Datum,
                is_null: bool,
                _: pg_sys::Oid,
            ) -> Option<Self> {
                if is_null || datum.is_null() {
                    None
                } else {
                    Some($ty(detoast_packed(datum.cast_mut_ptr())))
                }
            }
        }

        simple_arg!($ty);

        impl $ty {
            /// The payload, valid for the duration of the current call.
            #[inline]
            pub fn bytes(&self) -> &[u8] {
                // SAFETY: self.0 comes from detoast_packed in
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

            /// Shortens the value to its first `len` payload bytes (at most
            /// the length it was allocated with).
            #[inline]
            #[allow(dead_code)] // not every type made by this macro is shortened
            pub fn truncate(&mut self, len: usize) {
                // SAFETY: self.0 is the varlena alloc_varlena made (4-byte
                // header, payload filled by the caller); the new size is not
                // larger than the allocation (checked), so only the header
                // changes and no byte past the allocation is exposed.
                unsafe {
                    let old = pgrx::varlena::varsize_any_exhdr(self.0);
                    assert!(len <= old, "truncate: {len} > {old}");
                    pgrx::varlena::set_varsize_4b(self.0, (len + pg_sys::VARHDRSZ) as i32);
                }
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
        encrypted_text_oid().or_raise()
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
    const TYPE_IDENT: &'static str = "pg_kms::pg::datum::EncryptedText";
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
    const TYPE_IDENT: &'static str = "pg_kms::pg::datum::OutText";
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
    const TYPE_IDENT: &'static str = "pg_kms::pg::datum::OutBytea";
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> =
        Err(ArgumentError::NotValidAsArgument("OutBytea"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> =
        Ok(ReturnsRef::One(SqlMappingRef::literal("bytea")));
}

/// The oid of type encrypted_text (found through the extension, not the
/// search_path).
pub fn encrypted_text_oid() -> KmsResult<pg_sys::Oid> {
    Spi::connect(|c| {
        c.select(
            "SELECT t.oid FROM pg_catalog.pg_type t
               JOIN pg_catalog.pg_depend d ON d.objid OPERATOR(pg_catalog.=) t.oid
                AND d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_type'::pg_catalog.regclass
                AND d.deptype OPERATOR(pg_catalog.=) 'e'
               JOIN pg_catalog.pg_extension e ON e.oid OPERATOR(pg_catalog.=) d.refobjid
              WHERE e.extname OPERATOR(pg_catalog.=) 'pg_kms' AND t.typname OPERATOR(pg_catalog.=) 'encrypted_text'",
            Some(1),
            &[],
        )?
        .first()
        .get_one::<pg_sys::Oid>()
    })
    .map_err(KmsError::spi)?
    .ok_or(KmsError::NotInstalled)
}
