//! pg_kms: envelope encryption with versioned, rotatable keys inside PostgreSQL.
//!
//! * [`crypto`] is the pure-Rust cryptographic core (no pgrx).
//! * The other modules are thin pgrx glue: settings, the `encrypted_text`
//!   type, the keyring (catalog access and the per-backend key cache), the
//!   SQL API, the key lifecycle and the error type.

use pgrx::prelude::*;

mod api;
mod catalog;
pub mod core;
pub mod crypto;
mod errors;
mod hooks;
mod keys;
mod lifecycle;
mod pg;
mod reencrypt;
mod secrets;
mod values;
mod worker;

pg_module_magic!();

// Catalog (schema kms, tables, audit chain, roles, views) first; grants last.
extension_sql_file!("../sql/catalog.sql", name = "catalog", bootstrap);
extension_sql_file!("../sql/grants.sql", name = "grants", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    pg::init();
    pg::guc::init();
    catalog::init();
    hooks::init();
    if crate::pg::preloaded() {
        pg::shmem::init();
        worker::register_launcher();
    }
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        crate::api::test_support::postgresql_conf_options()
    }
}
