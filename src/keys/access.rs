//! The access audit in the backend: every use of a key version is counted
//! per (session user, current user, key, version, operation).
//!
//! * Encryptions and decryptions are the version's own usage counters
//!   ([`CachedVersion::count_encryption`]): no extra work per row but
//!   the check that the role pair they belong to ([`sync_roles`]: two
//!   reads of backend globals through `GetSessionUserId`/`GetUserId`) is
//!   still the current one. When it is not (rare: `SET ROLE`, a
//!   `SECURITY DEFINER` function), the pending counts are first moved to
//!   this backend's map under the pair they belong to.
//! * Blind indexes, rewraps and secret reads (colder paths) are added to
//!   the map directly ([`record`]); a rewrap or secret read is counted as
//!   that operation only, not also as the decryption and encryption it
//!   does ([`CachedVersion::count_as`]).
//! * At transaction end (the usage counters' callback) the map goes to
//!   shared memory in one short lock ([`hand_over`]); what does not fit
//!   stays here for the next transaction end.
//!
//! Without `shared_preload_libraries` nothing is counted (the counts
//! could not reach the worker). With `pg_kms.access_audit = off` nothing
//! is counted either.

use super::version::CachedVersion;
use crate::core::hash::FastHash;
use crate::pg::access_shmem::{self, AccessCount, AccessKey};
use crate::pg::guc::ACCESS_AUDIT;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// What a use of a key did (stored by name in `kms.access_log`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum Op {
    Encrypt = 1,
    Decrypt = 2,
    BlindIndex = 3,
    Rewrap = 4,
    SecretRead = 5,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::BlindIndex => "blind_index",
            Op::Rewrap => "rewrap",
            Op::SecretRead => "secret_read",
        }
    }

    pub fn from_code(code: u32) -> Option<Op> {
        Some(match code {
            1 => Op::Encrypt,
            2 => Op::Decrypt,
            3 => Op::BlindIndex,
            4 => Op::Rewrap,
            5 => Op::SecretRead,
            _ => return None,
        })
    }
}

/// (session user, current user, key id, version, op).
type LocalKey = (u32, u32, u32, u32, u32);

thread_local! {
    /// The role pair (session user, current user) the versions' pending
    /// counts belong to.
    static PAIR: Cell<(u32, u32)> = const { Cell::new((0, 0)) };
    /// Counts not yet handed to shared memory: (count, first use).
    static LOCAL: RefCell<HashMap<LocalKey, (u64, i64), FastHash>> =
        RefCell::new(HashMap::default());
    static EXIT_HOOKED: Cell<bool> = const { Cell::new(false) };
}

/// Whether uses are counted now (`pg_kms.access_audit`). A plain read of
/// the setting's variable (no thread check: the per-row path).
#[inline]
pub fn enabled() -> bool {
    // SAFETY: the GUC machinery writes this bool only from this backend's
    // only thread (SET, config reload), never while this read runs.
    unsafe { *ACCESS_AUDIT.as_ptr() }
}

#[inline]
fn roles_now() -> (u32, u32) {
    use crate::pg::fast;
    (fast::session_user().to_u32(), fast::current_user().to_u32())
}

/// Makes the role pair of the pending counts the current one, moving the
/// counts of the previous pair to the map first (called before a count).
#[inline]
pub(super) fn sync_roles() {
    if !enabled() {
        return;
    }
    let now = roles_now();
    if PAIR.with(|p| p.get()) != now {
        switch_roles(now);
    }
}

#[cold]
#[inline(never)]
fn switch_roles(now: (u32, u32)) {
    super::usage::flush_dirty_versions();
    PAIR.with(|p| p.set(now));
}

fn add(pair: (u32, u32), key_id: u32, version: u32, op: Op, n: u64) {
    if n == 0 {
        return;
    }
    super::usage::ensure_xact_hook();
    // try_with: a version dropped while the process exits (thread-local
    // destructors) has nothing pending, but must not panic if it had.
    let _ = LOCAL.try_with(|l| {
        let mut l = l.borrow_mut();
        let e = l
            .entry((pair.0, pair.1, key_id, version, op as u32))
            .or_insert_with(|| (0, crate::pg::fast::statement_start()));
        e.0 = e.0.saturating_add(n);
    });
}

/// Adds a version's pending encryptions and decryptions (its usage
/// counters' flush) under the pair they belong to.
pub(super) fn add_pending(key_id: u32, version: u32, enc: u64, dec: u64) {
    if !enabled() {
        return;
    }
    let pair = PAIR.with(|p| p.get());
    add(pair, key_id, version, Op::Encrypt, enc);
    add(pair, key_id, version, Op::Decrypt, dec);
}

/// Counts one use done outside the version's usage counters (a blind
/// index: `version` 0, the index key is per key), as the current roles.
pub fn record(key_id: u32, version: u32, op: Op) {
    if !enabled() || !crate::pg::preloaded() {
        return;
    }
    add(roles_now(), key_id, version, op, 1);
}

/// Counts one use as the session user and `current_user` (a secret read
/// is done as the catalog owner for the caller).
fn record_for(current_user: u32, key_id: u32, version: u32, op: Op) {
    let (session, _) = roles_now();
    add((session, current_user), key_id, version, op, 1);
}

impl CachedVersion {
    /// Counts the decryption (`decrypt`) or encryption just done on this
    /// version as a use of kind `op` instead (a rewrap, a secret read, or
    /// nothing for the sealing half of a rewrap: `op` None), for the
    /// caller `for_user` (None: the current user). Cold paths only.
    #[inline(never)]
    pub fn count_as(&self, decrypt: bool, op: Option<Op>, for_user: Option<pg_sys::Oid>) {
        if self.counted && enabled() {
            sync_roles();
            let c = if decrypt {
                &self.unaudited_dec
            } else {
                &self.unaudited_enc
            };
            c.set(c.get() + 1);
            if let Some(op) = op {
                match for_user {
                    Some(u) => record_for(u.to_u32(), self.key_id, self.number, op),
                    None => add(roles_now(), self.key_id, self.number, op, 1),
                }
            }
        }
        if decrypt {
            self.count_decryption()
        } else {
            self.count_encryption()
        }
    }
}

/// One of this backend's counts as a shared aggregate of database `db`,
/// last used at `last` (the statement handing it over).
fn aggregate(db: u32, last: i64, key: &LocalKey, val: &(u64, i64)) -> AccessCount {
    let &(session_user, current_user, key_id, version, op) = key;
    let &(count, first_at) = val;
    AccessCount {
        key: AccessKey {
            db,
            session_user,
            current_user,
            key_id,
            version,
            op,
        },
        count,
        first_at,
        last_at: last.max(first_at),
    }
}

/// This backend's counts, taken out of the map.
fn drain_counts() -> Vec<AccessCount> {
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        if l.is_empty() {
            return Vec::new();
        }
        let db = access_shmem::my_db();
        let last = crate::pg::fast::statement_start();
        l.drain()
            .map(|(key, val)| aggregate(db, last, &key, &val))
            .collect()
    })
}

/// Hands this backend's counts to shared memory (at transaction end,
/// after the versions' pending counts were added), in place: what fits
/// leaves the map, what does not (the table is full) stays for the next
/// transaction end. False when some stayed.
pub(super) fn hand_over() -> bool {
    let all_fit = LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        if l.is_empty() {
            return true;
        }
        let db = access_shmem::my_db();
        let last = crate::pg::fast::statement_start();
        access_shmem::with_table(|t| {
            l.retain(|key, val| !t.add(&aggregate(db, last, key, val)));
            if !l.is_empty() {
                t.note_deferred();
            }
            l.is_empty()
        })
        .unwrap_or(false)
    });
    if all_fit {
        return true;
    }
    if !EXIT_HOOKED.with(|h| h.replace(true)) {
        // SAFETY: registered once per backend (EXIT_HOOKED), from its only
        // thread; count_lost_at_exit has the pg_on_exit_callback signature,
        // is #[pg_guard]ed and ignores its argument.
        unsafe { pg_sys::before_shmem_exit(Some(count_lost_at_exit), pg_sys::Datum::from(0)) };
    }
    false
}

/// # Safety
///
/// Called only by Postgres at backend exit, before shared memory is
/// detached, in the backend's only thread.
#[pg_guard]
unsafe extern "C-unwind" fn count_lost_at_exit(_code: i32, _arg: pg_sys::Datum) {
    // One last try; what still does not fit is lost, and counted.
    let left = access_shmem::hand_over(drain_counts());
    access_shmem::count_dropped(left.len() as u64);
}
