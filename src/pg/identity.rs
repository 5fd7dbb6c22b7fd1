//! Identity switches: the only places where pg_kms changes the current
//! user (audited here, and nowhere else: a grep for SetUserIdAndSecContext
//! finds this file only).
//!
//! * [`as_role`], through `catalog::as_catalog_owner`: statements on `kms.*` only (key cache misses,
//!   lifecycle acts, progress bookkeeping). No user-defined code may run
//!   inside it: nothing here ever touches a user table.
//! * [`as_table_owner`]: every statement the worker (or a destroy guard or a
//!   usage count) runs on a user table, as that table's owner under
//!   `SECURITY_RESTRICTED_OPERATION`, as PostgreSQL itself does for VACUUM,
//!   ANALYZE, REINDEX and REFRESH MATERIALIZED VIEW (CVE-2022-1552): the
//!   table's triggers, constraints, index expressions, defaults and policies
//!   run with no more rights than their owner's, and cannot SET ROLE, create
//!   temporary objects or PREPARE.
//!
//! Both pin `search_path` to `pg_catalog, pg_temp` for their duration.

use crate::errors::KmsResult;
use pgrx::pg_sys;

/// Runs `f` as `role` with `search_path` pinned to `pg_catalog, pg_temp`,
/// as `SECURITY DEFINER` would, but only for the duration of `f`. Only
/// `catalog::as_catalog_owner` calls it (statements on `kms.*` only).
pub(crate) fn as_role<R>(role: pg_sys::Oid, f: impl FnOnce() -> KmsResult<R>) -> KmsResult<R> {
    let _scope = IdentityScope::enter(role, false);
    f()
}

/// Runs `f` as `owner` (a user table's owner) under
/// `SECURITY_RESTRICTED_OPERATION`, with `search_path` pinned. Nested
/// inside [`as_catalog_owner`](crate::catalog::as_catalog_owner), it still drops to the table owner: user
/// code never runs as the catalog owner.
pub fn as_table_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> KmsResult<R>) -> KmsResult<R> {
    let _scope = IdentityScope::enter(owner, true);
    f()
}

/// Runs `f` as the current user with `search_path` pinned to
/// `pg_catalog, pg_temp` (no identity change): what pg_kms analyses must
/// resolve names as it will be evaluated.
pub fn with_pinned_search_path<R>(f: impl FnOnce() -> R) -> R {
    let _scope = IdentityScope::enter(current_user(), false);
    f()
}

/// The user pg_kms acts for: the current user outside any switch above.
pub fn current_user() -> pg_sys::Oid {
    // SAFETY: reads a backend global; valid in any transaction.
    unsafe { pg_sys::GetUserId() }
}

thread_local! {
    /// The current user when the outermost switch above was entered (None
    /// outside any): the role an act is audited under (`kms.audit_log.role`).
    static ACTING: std::cell::Cell<Option<pg_sys::Oid>> = const { std::cell::Cell::new(None) };
}

/// The role pg_kms acts for (SQL `current_user` of the caller), also inside
/// a switch to the catalog or a table owner.
pub fn acting_user() -> pg_sys::Oid {
    ACTING.get().unwrap_or_else(current_user)
}

struct IdentityScope {
    saved_user: pg_sys::Oid,
    saved_sec: i32,
    nest_level: i32,
    saved_acting: Option<pg_sys::Oid>,
}

impl IdentityScope {
    fn enter(user: pg_sys::Oid, restricted: bool) -> IdentityScope {
        let mut flags = pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32;
        if restricted {
            flags |= pg_sys::SECURITY_RESTRICTED_OPERATION as i32;
        }
        // SAFETY: the identity and a GUC nest level are saved first and put
        // back in Drop (or by the (sub)transaction abort on error, as for
        // SECURITY DEFINER functions); the option name and value are
        // NUL-terminated literals.
        unsafe {
            let mut saved_user = pg_sys::InvalidOid;
            let mut saved_sec = 0i32;
            pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_sec);
            pg_sys::SetUserIdAndSecContext(user, saved_sec | flags);
            let nest_level = pg_sys::NewGUCNestLevel();
            pg_sys::set_config_option(
                c"search_path".as_ptr(),
                c"pg_catalog, pg_temp".as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
            // Inside a table owner's scope, whatever acts is the owner's own
            // table code (a policy, an index expression, a trigger calling
            // a pg_kms function): its acts are the owner's, never recorded
            // under the caller who made pg_kms touch the table.
            let acting = if restricted {
                user
            } else {
                ACTING.get().unwrap_or(saved_user)
            };
            let saved_acting = ACTING.replace(Some(acting));
            IdentityScope {
                saved_user,
                saved_sec,
                nest_level,
                saved_acting,
            }
        }
    }
}

impl Drop for IdentityScope {
    fn drop(&mut self) {
        // A Rust value only: restored on unwinding too.
        ACTING.set(self.saved_acting);
        if std::thread::panicking() {
            // An ERROR is propagating: (sub)transaction abort restores the
            // user id and the GUC nest level, as for SECURITY DEFINER.
            return;
        }
        // SAFETY: restores exactly what `enter` saved, innermost first.
        // `false`: every setting changed inside the scope is rolled back,
        // not only search_path, as VACUUM and REINDEX do: table code run
        // as its owner could otherwise `set_config('search_path', ...)` and
        // have it apply to what pg_kms runs next with more privileges.
        unsafe {
            pg_sys::AtEOXact_GUC(false, self.nest_level);
            pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_sec);
        }
    }
}
