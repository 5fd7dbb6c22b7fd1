//! pg_kms: envelope encryption with versioned, rotatable keys inside PostgreSQL.
//!
//! * [`crypto`] is the pure-Rust cryptographic core (no pgrx).
//! * The other modules are thin pgrx glue: settings, the `encrypted_text`
//!   type, the keyring (catalog access and the per-backend key cache), the
//!   SQL API, the key lifecycle and the error type.

use pgrx::prelude::*;

pub mod crypto;
mod errors;
mod grants_tests;
mod guc;
mod hotindex;
mod keyring;
mod lifecycle;
mod redact;
mod reencrypt;
mod secrets;
mod shmem;
mod types;
mod values;
mod worker;

pg_module_magic!();

// sql/: roles first, grants last; the rest in dependency order (secrets
// after audit and the operators only to keep the install order, and so the
// config-dump list, of before the split).
extension_sql_file!("../sql/roles.sql", name = "roles", bootstrap);
extension_sql_file!("../sql/catalog.sql", name = "catalog");
extension_sql_file!("../sql/audit.sql", name = "audit", requires = ["catalog"]);
extension_sql_file!(
    "../sql/encrypted_text.sql",
    name = "encrypted_text_ops",
    requires = ["encrypted_text_type"]
);
extension_sql_file!(
    "../sql/secrets.sql",
    name = "secrets",
    requires = ["catalog", "audit", "encrypted_text_ops"]
);
extension_sql_file!(
    "../sql/views.sql",
    name = "views",
    requires = ["catalog", "audit", "secrets", kms_stats_counters]
);
extension_sql_file!("../sql/grants.sql", name = "grants", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::init();
    keyring::init();
    redact::init();
    if keyring::preloaded() {
        shmem::init();
        worker::register_launcher();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        crate::tests::postgresql_conf_options()
    }
}
