//! The keyring as this backend sees it: a cache of keys and their usable
//! versions (unwrapped once, then no SPI, no catalog read and no system
//! call per row), per-key grants, usage counters, and the master key.
//!
//! * [`cache`]: the cache, its hot indexes and the per-row entry points
//!   [`with_primary`] (encrypt) and [`with_version`] (decrypt);
//! * [`load`]: a cache miss (rows read as the catalog owner, MACs checked,
//!   data keys unwrapped);
//! * [`version`]: the cached key and version, laid out for the per-row path;
//! * [`grants`], [`usage`]: per-key grants and usage counters;
//! * [`master`]: master-key sources and the keyring's commitment to one;
//! * [`integrity`], [`audit`]: the MACs on key-state rows and the keyed,
//!   chained audit log they are bound to.

pub mod access;
pub mod access_log;
pub mod audit;
pub mod cache;
pub mod grants;
pub mod integrity;
pub mod load;
pub mod master;
pub mod usage;
pub mod version;

pub use cache::{
    key_by_id, key_by_name, nonce, random_bytes, validate_current_master_key, with_primary,
    with_version,
};
pub use grants::Privilege;
pub use master::{check_commitment, describe_source, load_master_key, master_key_source, Which};
pub use version::{CachedVersion, State};

/// Ties the cache to catalog invalidations (from `_PG_init`).
pub fn init() {
    crate::catalog::on_new_generation(cache::sync_now);
}
