//! The `kms.*` catalog: whose it is (the catalog owner, the identity
//! statements on `kms.*` run under), when it changed (invalidation), and
//! typed reads of its rows ([`rows`]), and the re-encryption progress
//! bookkeeping ([`progress`]).
//!
//! Cache invalidation: every lifecycle act queues a relcache invalidation of
//! `kms.keys`. PostgreSQL delivers it to every backend at its next
//! transaction start (and to the acting backend at the end of the command,
//! or at abort), where the callback here bumps a generation counter
//! ([`generation`]). The key cache compares that counter and, once warm,
//! does no SPI, no catalog read and no system call.

pub mod progress;
pub mod rows;

use crate::errors::{KmsError, KmsResult};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

static INVAL_GEN: AtomicU64 = AtomicU64::new(1);
static KEYS_RELID: AtomicU32 = AtomicU32::new(0);

/// Registers the invalidation callbacks (from `_PG_init`).
pub fn init() {
    // SAFETY: called once from _PG_init, in the single thread of the
    // process loading the library: reading the Postgres global is a plain
    // read, and the callbacks registered are `extern "C-unwind"` functions
    // with the signatures the inval.c API expects, guarded by #[pg_guard],
    // that live as long as the process (the library is never unloaded).
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), pg_sys::Datum::from(0usize));
        // Role membership or attribute changes can change per-key grant
        // decisions: drop the cache when they happen.
        for cache in [
            pg_sys::SysCacheIdentifier::AUTHMEMROLEMEM,
            pg_sys::SysCacheIdentifier::AUTHOID,
        ] {
            pg_sys::CacheRegisterSyscacheCallback(
                cache as i32,
                Some(syscache_callback),
                pg_sys::Datum::from(0usize),
            );
        }
    }
}

/// # Safety
///
/// Called only by Postgres' invalidation processing (registered in
/// [`init`]); it touches no argument and no Postgres state.
#[pg_guard]
unsafe extern "C-unwind" fn syscache_callback(_arg: pg_sys::Datum, _cacheid: i32, _hash: u32) {
    INVAL_GEN.fetch_add(1, Ordering::Relaxed);
}

/// Runs inside invalidation processing: no allocation, no catalog access.
///
/// # Safety
///
/// Called only by Postgres' invalidation processing (registered in
/// [`init`]); it reads only the relid passed by value.
#[pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let keys = KEYS_RELID.load(Ordering::Relaxed);
    if relid == pg_sys::InvalidOid || (keys != 0 && relid.to_u32() == keys) {
        INVAL_GEN.fetch_add(1, Ordering::Relaxed);
    }
}

/// Tells every backend (this one at end of command) to drop its key cache.
pub fn invalidate_all_backends(cat: &Catalog) {
    // SAFETY: called inside a transaction (a lifecycle act, with the
    // catalog looked up); CacheInvalidateRelcacheByRelid only queues an
    // invalidation message for that oid (it raises an ERROR, never UB, if
    // the relation is gone).
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(cat.keys_relid) };
}

/// Whose the catalog is, and the oid of `kms.keys` (whose relcache
/// invalidations signal a key change).
#[derive(Clone, Copy)]
pub struct Catalog {
    pub owner: pg_sys::Oid,
    pub keys_relid: pg_sys::Oid,
}

/// The version of this library, which must be the version of the
/// extension's SQL objects in the database.
pub const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

fn lookup_catalog() -> KmsResult<Catalog> {
    // pg_extension and pg_class are readable by every role: no switch needed.
    // Read-only SPI (`select`): this also runs in parallel workers, which
    // must not assign a transaction id.
    let row = Spi::connect(|c| {
        c.select(
            "SELECT e.extowner, c.oid, e.extversion
           FROM pg_catalog.pg_extension e,
                pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
          WHERE e.extname OPERATOR(pg_catalog.=) 'pg_kms'
            AND n.nspname OPERATOR(pg_catalog.=) 'kms'
            AND c.relname OPERATOR(pg_catalog.=) 'keys'",
            Some(1),
            &[],
        )?
        .first()
        .get_three::<pg_sys::Oid, pg_sys::Oid, String>()
    });
    match row {
        // The SQL objects are those of another version than this library's
        // (a new library installed, ALTER EXTENSION ... UPDATE not run yet):
        // refuse clearly instead of failing on a missing column.
        Ok((Some(_), Some(_), Some(v))) if v != LIBRARY_VERSION => {
            Err(KmsError::ExtensionVersion {
                installed: v,
                library: LIBRARY_VERSION,
            })
        }
        Ok((Some(owner), Some(keys_relid), _)) => Ok(Catalog { owner, keys_relid }),
        Ok(_) => Err(KmsError::NotInstalled),
        Err(pgrx::spi::Error::InvalidPosition) => Err(KmsError::NotInstalled),
        Err(e) => Err(KmsError::Spi(e.to_string())),
    }
}

/// The catalog's identity (looked up once per invalidation generation).
pub fn catalog() -> KmsResult<Catalog> {
    let gen = generation();
    if let (g, Some(cat)) = CATALOG.get() {
        if g == gen {
            return Ok(cat);
        }
    }
    if let Some(f) = ON_NEW_GENERATION.get() {
        f();
    }
    let cat = lookup_catalog()?;
    KEYS_RELID.store(cat.keys_relid.to_u32(), Ordering::Relaxed);
    CATALOG.set((gen, Some(cat)));
    Ok(cat)
}

/// Switches to the catalog owner's identity with `search_path` pinned to
/// `pg_catalog, pg_temp`, as `SECURITY DEFINER` would, but only for the
/// duration of `f` (a key-cache miss or a lifecycle act). On error the
/// transaction abort restores both, as it does for SECURITY DEFINER.
pub fn as_catalog_owner<R>(f: impl FnOnce(&Catalog) -> KmsResult<R>) -> KmsResult<R> {
    let cat = catalog()?;
    crate::pg::identity::as_role(cat.owner, || f(&cat))
}

/// What to run when [`catalog`] finds that the generation moved: the key
/// cache drops (and so wipes) what it holds at the first catalog access
/// after an invalidation, not only at its next key lookup.
static ON_NEW_GENERATION: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Registers [`ON_NEW_GENERATION`] (once, from `_PG_init`).
pub fn on_new_generation(f: fn()) {
    let _ = ON_NEW_GENERATION.set(f);
}

/// The invalidation generation: it changes whenever `kms.keys` (any key's
/// state), role membership or a role changes, or a full reset happens.
#[inline]
pub fn generation() -> u64 {
    INVAL_GEN.load(Ordering::Relaxed)
}

thread_local! {
    /// The catalog identity, valid for one invalidation generation.
    static CATALOG: Cell<(u64, Option<Catalog>)> = const { Cell::new((0, None)) };
}
