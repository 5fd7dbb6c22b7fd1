//! Per-key grants: once a key has grants, only their grantees (and members
//! of them) may use it for that privilege. Decisions are remembered per
//! (user, privilege), and for the last user in the version itself, so the
//! per-row check reads only the line the cipher reads anyway.

use super::version::{CachedKey, CachedVersion};
use crate::errors::{KmsError, KmsResult};
use pgrx::pg_sys;
use std::cell::RefCell;
use std::collections::HashMap;

pub use crate::core::states::Privilege;

/// (known, allowed) bits of a cached decision on `p`.
fn bits(p: Privilege) -> (u8, u8) {
    match p {
        Privilege::Encrypt => (1, 2),
        Privilege::Decrypt => (4, 8),
    }
}

/// Per-key grants (privilege, grantee role), shared by a key and its
/// versions. Not `restricted` (no grant rows at all): any kms_user.
pub(super) struct Grants {
    /// The grants that apply: those whose role still exists under the oid
    /// and the name it was granted to (see [`crate::catalog::rows::key_grant_rows`]).
    pub(super) list: Vec<(Privilege, pg_sys::Oid)>,
    /// Whether the key has any grant row, applicable or not: a key whose
    /// only grantee was dropped stays closed, it does not open to every
    /// kms_user.
    pub(super) restricted: bool,
    /// Decisions for (user, privilege), so the check stays off the hot path.
    pub(super) decisions: RefCell<HashMap<(pg_sys::Oid, Privilege), bool>>,
}

impl Grants {
    pub(super) fn allowed(&self, user: pg_sys::Oid, p: Privilege) -> bool {
        if let Some(a) = self.decisions.borrow().get(&(user, p)) {
            return *a;
        }
        // SAFETY: plain catalog (syscache) lookups on role oids, inside the
        // transaction running the caller's statement. A superuser passes
        // even when no grant of the key applies any more (all stale).
        let a = unsafe { pg_sys::superuser_arg(user) }
            || self
                .list
                .iter()
                .any(|(gp, role)| *gp == p && unsafe { pg_sys::has_privs_of_role(user, *role) });
        self.decisions.borrow_mut().insert((user, p), a);
        a
    }
}

fn not_allowed(p: Privilege, name: &str, user: pg_sys::Oid) -> KmsError {
    KmsError::KeyNotAllowed {
        role: crate::errors::role_display(user),
        privilege: p,
        key: name.to_string(),
    }
}

impl CachedVersion {
    /// Per-key grants, decided once per (user, privilege) and remembered in
    /// the version itself for the last user, so the per-row check reads
    /// only the line the cipher reads anyway.
    #[inline(always)]
    pub fn check(&self, p: Privilege) -> KmsResult<()> {
        if !self.has_grants {
            return Ok(());
        }
        self.check_granted(p)
    }

    /// [`Self::check`] for a key that has grants (out of line: the per-row
    /// path of a key without grants is the one test above).
    #[inline(never)]
    fn check_granted(&self, p: Privilege) -> KmsResult<()> {
        let user = crate::pg::fast::current_user();
        let (known, allowed) = bits(p);
        let (seen_user, mut bits) = self.seen.get();
        if seen_user != user {
            bits = 0;
        }
        if bits & known == 0 {
            bits |= known
                | if self.grants.allowed(user, p) {
                    allowed
                } else {
                    0
                };
            self.seen.set((user, bits));
        }
        if bits & allowed != 0 {
            Ok(())
        } else {
            Err(not_allowed(p, self.key_name(), user))
        }
    }
}

impl CachedKey {
    /// Per-key grants: once a key has grants, only their grantees (and
    /// members of them) may use it for that privilege.
    #[inline]
    pub fn check(&self, p: Privilege) -> KmsResult<()> {
        if !self.grants.restricted {
            return Ok(());
        }
        self.check_user(crate::pg::fast::current_user(), p)
    }

    pub fn check_user(&self, user: pg_sys::Oid, p: Privilege) -> KmsResult<()> {
        if self.grants.allowed(user, p) {
            Ok(())
        } else {
            Err(not_allowed(p, &self.name, user))
        }
    }

    pub fn has_grants(&self) -> bool {
        self.grants.restricted
    }
}
