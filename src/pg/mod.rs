//! PostgreSQL glue with no knowledge of keys: SPI helpers, the identity
//! switches, datum wrappers, encoding conversion, settings, shared memory,
//! and what differs between PostgreSQL majors (`version`). Everything
//! above (catalog, keys, logic, API) reaches the server through here or
//! through pgrx directly for typed row reads.

pub mod access_shmem;
pub mod activity;
pub mod datum;
pub mod encoding;
pub mod fast;
pub mod guc;
pub mod identity;
pub mod shmem;
pub mod spi;
pub mod subxact;
pub mod version;

use pgrx::pg_sys;
use std::sync::atomic::{AtomicBool, Ordering};

static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Records whether the library is being loaded by
/// `shared_preload_libraries` (called once from `_PG_init`).
pub fn init() {
    // SAFETY: called once from _PG_init, in the single thread of the
    // process loading the library: a plain read of a Postgres global.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    PRELOADED.store(preloading, Ordering::Relaxed);
}

/// Whether the library was loaded by `shared_preload_libraries` (shared
/// memory and the background worker exist only then).
pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Whether this server runs in binary-upgrade mode (started by pg_upgrade
/// with `-b`).
pub fn binary_upgrade() -> bool {
    // SAFETY: a plain read of a postmaster global set while parsing the
    // command line, before shared_preload_libraries are loaded, and
    // inherited by every child process; read in the process's only thread.
    unsafe { pg_sys::IsBinaryUpgrade }
}
