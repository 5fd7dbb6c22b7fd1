//! Which transactions are running (`pg_stat_activity`,
//! `pg_prepared_xacts`): what the worker waits for before it trusts that
//! no row can still be sealed under a former primary version.

use crate::errors::KmsResult;

/// Whether no transaction of this database that began before `since_us`
/// (microseconds since the epoch) is still running, prepared ones
/// included: one that is could still seal rows under a former primary
/// (a statement keeps the keys it had cached when it began). The caller
/// must see every session's `xact_start`: the worker (a superuser) calls it.
pub fn no_transaction_older_than(since_us: i64) -> KmsResult<bool> {
    super::spi::first::<bool>(
        "SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                             WHERE a.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()
                               AND a.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()
                               AND a.backend_type OPERATOR(pg_catalog.=) ANY ('{client backend,parallel worker,background worker}')
                               AND a.xact_start OPERATOR(pg_catalog.<) pg_catalog.to_timestamp($1::float8 / 1000000))
            AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_prepared_xacts p
                             WHERE p.database OPERATOR(pg_catalog.=) pg_catalog.current_database())",
        &[since_us.into()],
        false,
    )
    .map(|b| b.unwrap_or(false))
}
