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
#[cfg(test)]
mod layers;
mod lifecycle;
mod pg;
mod protect;
mod reencrypt;
mod secrets;
mod values;
mod worker;

pg_module_magic!();

// sql/: roles first, grants last; the rest in dependency order (secrets
// after audit and the operators only to keep the install order, and so the
// config-dump list, of before the split). The operators and operator
// classes of encrypted_text (sql/encrypted_text.sql) are included by the
// type's own module, src/api/encrypted_text.rs.
extension_sql_file!("../sql/roles.sql", name = "roles", bootstrap);
extension_sql_file!("../sql/catalog.sql", name = "catalog");
extension_sql_file!("../sql/audit.sql", name = "audit", requires = ["catalog"]);
extension_sql_file!(
    "../sql/secrets.sql",
    name = "secrets",
    requires = ["catalog", "audit", "encrypted_text_ops"]
);
extension_sql_file!(
    "../sql/views.sql",
    name = "views",
    requires = [
        "catalog",
        "audit",
        "secrets",
        kms_stats_counters,
        kms_warnings_list
    ]
);
extension_sql_file!(
    "../sql/protect.sql",
    name = "protect",
    requires = ["catalog", "views"]
);
// The access audit's log (issue 16), after every other table so that the
// config-dump list of a fresh install is that of an upgraded database.
extension_sql_file!(
    "../sql/access.sql",
    name = "access",
    requires = ["catalog", "protect"]
);
extension_sql_file!("../sql/grants.sql", name = "grants", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // Before anything could run an AES instruction.
    if !crypto::cpu_supports_this_build() {
        use crate::errors::OrRaise;
        Err::<(), _>(errors::KmsError::CpuUnsupported).or_raise();
    }
    pg::init();
    pg::guc::init();
    catalog::init();
    keys::init();
    hooks::init();
    if crate::pg::preloaded() {
        pg::shmem::init();
        // No background process while pg_upgrade runs a server in
        // binary-upgrade mode: it would hold the `postgres` database that
        // pg_upgrade drops and recreates, and write to tables being moved.
        if !pg::binary_upgrade() {
            worker::register_launcher();
        }
    }
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        crate::api::test_support::postgresql_conf_options()
    }
}
