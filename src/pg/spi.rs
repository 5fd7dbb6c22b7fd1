//! The SPI helpers: every statement pg_kms runs goes through these (or
//! through `Spi::connect` in a module that reads typed rows). They run as
//! the current user: callers switch identity first where needed (see
//! [`crate::pg::identity`]).

use crate::errors::{KmsError, KmsResult};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

/// The first column of the first row of `q` (None: no row). `write` runs
/// it read-write (it may lock or modify, and takes a transaction id);
/// otherwise read-only, which also works on a standby and in parallel
/// workers.
pub fn first<T: FromDatum + IntoDatum>(
    q: &str,
    args: &[DatumWithOid<'_>],
    write: bool,
) -> KmsResult<Option<T>> {
    let first = |t: pgrx::spi::SpiTupleTable<'_>| {
        if t.is_empty() {
            Ok(None)
        } else {
            t.first().get_one::<T>()
        }
    };
    if write {
        Spi::connect_mut(|c| first(c.update(q, Some(1), args)?))
    } else {
        Spi::connect(|c| first(c.select(q, Some(1), args)?))
    }
    .map_err(KmsError::spi)
}

/// Runs `q` read-write, discarding any rows.
pub fn exec(q: &str, args: &[DatumWithOid<'_>]) -> KmsResult<()> {
    Spi::connect_mut(|c| c.update(q, None, args).map(|_| ())).map_err(KmsError::spi)
}

/// [`first`], read-write.
pub fn one<T: FromDatum + IntoDatum>(q: &str, args: &[DatumWithOid<'_>]) -> KmsResult<Option<T>> {
    first(q, args, true)
}

/// [`first`], read-only (no transaction id: works on a standby and in
/// parallel workers).
pub fn read<T: FromDatum + IntoDatum>(q: &str, args: &[DatumWithOid<'_>]) -> KmsResult<Option<T>> {
    first(q, args, false)
}
