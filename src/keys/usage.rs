//! Usage counters (`kms_stats`, the nonce-budget warning): counts gather
//! in the cached version and reach shared memory every [`FLUSH_EVERY`]
//! values and at the end of the transaction, before it commits.

use super::cache::CACHE;
use super::version::CachedVersion;
use crate::core::hash::hash_u64;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};

impl CachedVersion {
    /// Counts one encryption. Counts gather in the version and reach the
    /// shared counters every `FLUSH_EVERY` values and at the end of the
    /// transaction (before it commits), not with an atomic add on a shared
    /// cache line per row. The flush warns once when the version reaches
    /// the nonce-budget warning level (AES-GCM with random nonces: at most
    /// 2^32 encryptions per key); the local budget shrinks near that level
    /// so the warning comes at the exact count.
    #[inline]
    pub fn count_encryption(&self) {
        self.count(&self.pending_enc, self.enc_budget.get());
    }

    #[inline]
    pub fn count_decryption(&self) {
        self.count(&self.pending_dec, FLUSH_EVERY);
    }

    /// Adds one to `pending` (a counter of this version), flushing all
    /// counts once it reaches `flush_at`. Without preload nothing is counted.
    #[inline(always)]
    fn count(&self, pending: &Cell<u32>, flush_at: u32) {
        if !self.counted {
            return;
        }
        super::access::sync_roles();
        let n = pending.get() + 1;
        pending.set(n);
        mark_dirty(self);
        if n >= flush_at {
            self.flush_counts();
        }
    }

    pub(super) fn flush_counts(&self) {
        let (e, d) = (
            self.pending_enc.replace(0) as u64,
            self.pending_dec.replace(0) as u64,
        );
        super::access::add_pending(
            self.key_id,
            self.number,
            e.saturating_sub(self.unaudited_enc.replace(0) as u64),
            d.saturating_sub(self.unaudited_dec.replace(0) as u64),
        );
        // All usage-counter slots taken: the access audit still counts.
        let Some(s) = self.stat else {
            self.enc_budget.set(FLUSH_EVERY);
            return;
        };
        if d > 0 {
            s.decryptions.fetch_add(d, Ordering::Relaxed);
        }
        let level = crate::pg::guc::NONCE_WARNING_ENCRYPTIONS.get().max(1) as u64;
        let total = if e > 0 {
            s.encryptions.fetch_add(e, Ordering::Relaxed) + e
        } else {
            s.encryptions.load(Ordering::Relaxed)
        };
        if e > 0 && total >= level && total - e < level {
            pgrx::warning!(
                "pg_kms: version {} of key \"{}\" has sealed {total} values since server start; rotate it before 2^32 encryptions (AES-GCM random-nonce limit)",
                self.number,
                self.key_name()
            );
        }
        self.enc_budget.set(if total < level {
            (level - total).min(FLUSH_EVERY as u64) as u32
        } else {
            FLUSH_EVERY
        });
    }
}

impl Drop for CachedVersion {
    fn drop(&mut self) {
        // Only with counts pending: a process that exits drops its cache
        // after a standalone backend (postgres --single) has detached
        // shared memory, which flush_counts would read.
        if self.pending_enc.get() > 0 || self.pending_dec.get() > 0 {
            self.flush_counts();
        }
    }
}

/// Local counts reach shared memory at least this often.
const FLUSH_EVERY: u32 = 1024;

thread_local! {
    /// Versions (by hot-map slot) with local counts to flush at the end of
    /// the transaction. A version dropped before then flushes itself.
    static DIRTY: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}
static XACT_HOOKED: AtomicBool = AtomicBool::new(false);
/// Whether the next transaction end has counts to flush or hand over (a
/// plain process global, read by the unguarded transaction callback).
static PENDING: AtomicBool = AtomicBool::new(false);

#[inline]
fn mark_dirty(v: &CachedVersion) {
    if !v.dirty.replace(true) {
        list_dirty(v);
    }
}

fn list_dirty(v: &CachedVersion) {
    ensure_xact_hook();
    DIRTY.with(|d| d.borrow_mut().push(v.slot()));
}

/// Registers the end-of-transaction flush (once per backend) and marks
/// this transaction's end as having counts to flush or hand over.
pub(super) fn ensure_xact_hook() {
    PENDING.store(true, Ordering::Relaxed);
    if !XACT_HOOKED.swap(true, Ordering::Relaxed) {
        // SAFETY: registered once per backend (XACT_HOOKED), from its only
        // thread; flush_at_xact_end has the XactCallback signature, cannot
        // panic (its work is in the #[pg_guard]ed flush_guarded), lives as
        // long as the process and ignores its (null) argument.
        unsafe { pg_sys::RegisterXactCallback(Some(flush_at_xact_end), std::ptr::null_mut()) };
    }
}

/// The transaction callback. Not `#[pg_guard]`ed itself: it only
/// compares the event (nothing here can panic or raise an ERROR), so the
/// guard's cost is paid once per transaction, by [`flush_guarded`], and
/// not for every other event (COMMIT, PRE_COMMIT of transactions that
/// used no key, ...).
///
/// # Safety
///
/// Called only by Postgres at transaction events (registered in
/// `ensure_xact_hook`), in the backend's only thread; `arg` is never read.
unsafe extern "C-unwind" fn flush_at_xact_end(
    event: pg_sys::XactEvent::Type,
    arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    if PENDING.load(Ordering::Relaxed)
        && matches!(
            event,
            XACT_EVENT_PRE_COMMIT
                | XACT_EVENT_PARALLEL_PRE_COMMIT
                | XACT_EVENT_PRE_PREPARE
                | XACT_EVENT_ABORT
                | XACT_EVENT_PARALLEL_ABORT
        )
    {
        // SAFETY: same caller, same thread, same argument (never read).
        unsafe { flush_guarded(event, arg) }
    }
}

/// Flushes the versions' counts and hands the access counts over; what
/// cannot go now (cache borrowed, shared table full) marks the next
/// transaction end as pending again.
///
/// # Safety
///
/// Called only by `flush_at_xact_end`, in the backend's only thread;
/// `_arg` is never read.
#[pg_guard]
unsafe extern "C-unwind" fn flush_guarded(
    _event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    // Taken out while flushing (a flush may raise the nonce-budget WARNING,
    // and nothing that runs then must find the list borrowed), and put back
    // empty, keeping its allocation for the next transaction.
    let mut slots = DIRTY.with(|d| std::mem::take(&mut *d.borrow_mut()));
    let mut left = false;
    if !slots.is_empty() && !flush_slots(&slots, true) {
        left = true;
    } else {
        slots.clear();
    }
    DIRTY.with(|d| {
        let mut d = d.borrow_mut();
        // Anything listed meanwhile stays listed.
        slots.append(&mut d);
        *d = slots;
    });
    // The access counts of this transaction (the versions' pending counts
    // were just added to them) go to shared memory in one short lock.
    let all_handed_over = super::access::hand_over();
    PENDING.store(left || !all_handed_over, Ordering::Relaxed);
}

/// Flushes the counts of the versions listed dirty, which stay listed
/// (the access audit's role pair changes: the pending counts belong to
/// the previous one).
pub(super) fn flush_dirty_versions() {
    let slots = DIRTY.with(|d| d.borrow().clone());
    if !slots.is_empty() {
        flush_slots(&slots, false);
    }
}

/// Flushes the counts of the cached versions in `slots` (`done`: they are
/// no longer listed dirty). False when the cache is borrowed mutably (the
/// caller keeps them listed).
fn flush_slots(slots: &[u64], done: bool) -> bool {
    CACHE.with(|c| match c.try_borrow() {
        Ok(c) => {
            for slot in slots {
                // Hot pointers are to versions of cached keys.
                if let Some(p) = c
                    .hot_versions
                    // SAFETY: every address in hot_versions is of a boxed
                    // CachedVersion owned by a key in `c.by_id` (Cache::insert
                    // and Cache::remove keep them in step; sync clears both);
                    // `c` is a shared borrow of the cache, so no entry can be
                    // removed or dropped while it is held.
                    .find(hash_u64(*slot), |p| unsafe { p.as_ref() }.slot() == *slot)
                {
                    // SAFETY: as just above; `v` is used only while `c` is
                    // borrowed.
                    let v = unsafe { p.as_ref() };
                    if done {
                        v.dirty.set(false);
                    }
                    v.flush_counts();
                }
            }
            true
        }
        Err(_) => false,
    })
}

/// The usage counters of this database since server start: (key id,
/// version, encryptions, decryptions).
pub fn counters_of_this_db() -> Vec<(i32, i32, i64, i64)> {
    crate::pg::shmem::stats_of_this_db()
        .into_iter()
        .map(|(k, v, e, d)| (k as i32, v as i32, e as i64, d as i64))
        .collect()
}
