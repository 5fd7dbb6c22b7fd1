//! Shared memory of the access audit (only with
//! `shared_preload_libraries = 'pg_kms'`): a bounded table of use counts
//! per (database, session user, current user, key id, version, operation)
//! with the first and last time, behind one LWLock.
//!
//! Backends hand their transaction's counts over at its end (one short
//! exclusive lock per transaction that used keys, never per row); each
//! database's worker copies its entries out, appends them to
//! `kms.access_log`, and only after that commits subtracts what it wrote.
//! A server crash or restart empties the table: at most the counts of
//! the last harvest interval are lost.

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

pub const ACCESS_SLOTS: usize = 8192;
/// Inserts stop at this many used slots (linear probing stays short).
const MAX_USED: usize = ACCESS_SLOTS * 7 / 8;

/// What one aggregate counts. `op` 0 marks an empty slot (operations are
/// numbered from 1).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Debug)]
pub struct AccessKey {
    pub db: u32,
    pub session_user: u32,
    pub current_user: u32,
    pub key_id: u32,
    pub version: u32,
    pub op: u32,
}

/// One aggregate: how many uses, and the first and last time (PostgreSQL
/// timestamps: microseconds since 2000-01-01 UTC).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct AccessCount {
    pub key: AccessKey,
    pub count: u64,
    pub first_at: i64,
    pub last_at: i64,
}

#[repr(C)]
pub struct AccessTable {
    slots: [AccessCount; ACCESS_SLOTS],
    used: usize,
    /// Hand-overs that found the table full (their counts stayed in the
    /// backend for the next transaction end).
    deferred: u64,
    /// Aggregates lost: a backend exited with counts it could not hand over.
    dropped: u64,
}

impl Default for AccessTable {
    fn default() -> Self {
        AccessTable {
            slots: [AccessCount::default(); ACCESS_SLOTS],
            used: 0,
            deferred: 0,
            dropped: 0,
        }
    }
}

// SAFETY: AccessTable is repr(C), made of plain integers (no pointers, no
// Drop); it is only reached through the PgLwLock below, so every access is
// serialised by the LWLock.
unsafe impl PGRXSharedMemory for AccessTable {}

// SAFETY: the LWLock tranche and shared-memory name "pg_kms access audit" is
// used by no other allocation.
static ACCESS: PgLwLock<AccessTable> = unsafe { PgLwLock::new(c"pg_kms access audit") };

/// Called from `shmem::init` (only while preloading).
pub fn init() {
    pg_shmem_init!(ACCESS);
}

fn home(k: &AccessKey) -> usize {
    let a = (k.db as u64) << 32 | k.session_user as u64;
    let b = (k.current_user as u64) << 32 | k.key_id as u64;
    let c = (k.version as u64) << 8 | k.op as u64;
    let h = a
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(17)
        .wrapping_add(b)
        .wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        .rotate_left(23)
        .wrapping_add(c)
        .wrapping_mul(0x1656_67B1_9E37_79F9);
    (h >> 32) as usize % ACCESS_SLOTS
}

impl AccessTable {
    /// The slot holding `k`, or the empty slot where it would go.
    fn probe(&self, k: &AccessKey) -> Result<usize, Option<usize>> {
        let mut i = home(k);
        for _ in 0..ACCESS_SLOTS {
            let s = &self.slots[i];
            if s.key.op == 0 {
                return Err(Some(i));
            }
            if s.key == *k {
                return Ok(i);
            }
            i = (i + 1) % ACCESS_SLOTS;
        }
        Err(None)
    }

    /// Adds one aggregate; false when the table is full.
    pub fn add(&mut self, c: &AccessCount) -> bool {
        match self.probe(&c.key) {
            Ok(i) => {
                let s = &mut self.slots[i];
                s.count = s.count.saturating_add(c.count);
                s.first_at = s.first_at.min(c.first_at);
                s.last_at = s.last_at.max(c.last_at);
                true
            }
            Err(Some(i)) if self.used < MAX_USED => {
                self.slots[i] = *c;
                self.used += 1;
                true
            }
            Err(_) => false,
        }
    }

    /// Counts a hand-over that found the table full.
    pub fn note_deferred(&mut self) {
        self.deferred += 1;
    }

    /// Empties slot `i` (linear probing with backward-shift deletion: the
    /// entries after it that would no longer be found move back).
    fn remove_at(&mut self, mut i: usize) {
        self.used -= 1;
        loop {
            self.slots[i] = AccessCount::default();
            let mut j = i;
            loop {
                j = (j + 1) % ACCESS_SLOTS;
                if self.slots[j].key.op == 0 {
                    return;
                }
                let h = home(&self.slots[j].key);
                // Whether j's home lies cyclically in (i, j]: it stays.
                let stays = if i <= j {
                    i < h && h <= j
                } else {
                    i < h || h <= j
                };
                if !stays {
                    self.slots[i] = self.slots[j];
                    i = j;
                    break;
                }
            }
        }
    }

    /// Takes `c.count` uses off `c.key` (written to the log); the entry
    /// goes once nothing is left, else it keeps the uses counted since
    /// (from `c.last_at` on).
    pub fn subtract(&mut self, c: &AccessCount) {
        if let Ok(i) = self.probe(&c.key) {
            let s = &mut self.slots[i];
            if s.count <= c.count {
                self.remove_at(i);
            } else {
                s.count -= c.count;
                s.first_at = s.first_at.max(c.last_at);
            }
        }
    }

    pub fn of_db(&self, db: u32) -> Vec<AccessCount> {
        self.slots
            .iter()
            .filter(|s| s.key.op != 0 && s.key.db == db)
            .copied()
            .collect()
    }
}

/// Runs `f` on the table under its exclusive lock (the transaction-end
/// hand-over adds its counts in place, with no copy); None without
/// preload.
pub fn with_table<R>(f: impl FnOnce(&mut AccessTable) -> R) -> Option<R> {
    if !crate::pg::preloaded() {
        return None;
    }
    Some(f(&mut ACCESS.exclusive()))
}

/// Hands `counts` over; returns those that did not fit (the table is
/// full), which the caller keeps for its next transaction end. One
/// exclusive lock. Without preload, nothing is taken.
pub fn hand_over(counts: Vec<AccessCount>) -> Vec<AccessCount> {
    if !crate::pg::preloaded() {
        return counts;
    }
    let mut t = ACCESS.exclusive();
    let left: Vec<AccessCount> = counts.into_iter().filter(|c| !t.add(c)).collect();
    if !left.is_empty() {
        t.note_deferred();
    }
    left
}

/// Records aggregates lost (a backend exited with counts it could not hand over).
pub fn count_dropped(n: u64) {
    if crate::pg::preloaded() && n > 0 {
        let mut t = ACCESS.exclusive();
        t.dropped = t.dropped.saturating_add(n);
    }
}

/// The aggregates of database `db` (a copy; nothing is removed).
pub fn of_db(db: u32) -> Vec<AccessCount> {
    if !crate::pg::preloaded() {
        return Vec::new();
    }
    ACCESS.share().of_db(db)
}

/// Takes off what was written to the log (after that transaction committed).
pub fn subtract(written: &[AccessCount]) {
    if !crate::pg::preloaded() || written.is_empty() {
        return;
    }
    let mut t = ACCESS.exclusive();
    for c in written {
        t.subtract(c);
    }
}

/// (slots used, slots in all, hand-overs deferred, aggregates dropped).
pub fn status() -> Option<(u64, u64, u64, u64)> {
    if !crate::pg::preloaded() {
        return None;
    }
    let t = ACCESS.share();
    Some((t.used as u64, ACCESS_SLOTS as u64, t.deferred, t.dropped))
}

/// This backend's database.
pub fn my_db() -> u32 {
    // SAFETY: a plain read of a backend global, set once when the backend
    // connects to its database, in the backend's only thread.
    unsafe { pg_sys::MyDatabaseId.to_u32() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> AccessKey {
        AccessKey {
            db: 1,
            session_user: 10,
            current_user: 10 + n % 3,
            key_id: n,
            version: 1,
            op: 1 + n % 5,
        }
    }

    fn count(n: u32, c: u64) -> AccessCount {
        AccessCount {
            key: key(n),
            count: c,
            first_at: n as i64,
            last_at: n as i64 + 10,
        }
    }

    /// Adds, merges and removes keep every other entry findable (the
    /// backward shift of linear probing), with the table nearly full.
    #[test]
    fn add_merge_subtract_keep_entries_findable() {
        let mut t: Box<AccessTable> = Box::default();
        let n = MAX_USED as u32;
        for i in 0..n {
            assert!(t.add(&count(i, 2)), "slot for {i}");
        }
        assert!(!t.add(&count(n, 1)), "full");
        assert!(t.add(&count(5, 1)), "merge into an existing entry");
        assert_eq!(t.slots[t.probe(&key(5)).unwrap()].count, 3);
        // Remove every third entry, half of another third.
        for i in 0..n {
            match i % 3 {
                0 => t.subtract(&count(i, 2)),
                1 => t.subtract(&count(i, 1)),
                _ => {}
            }
        }
        for i in 0..n {
            let base = if i == 5 { 3 } else { 2 };
            let want = match i % 3 {
                0 => base - 2,
                1 => base - 1,
                _ => base,
            };
            let want = (want > 0).then_some(want);
            let got = t.probe(&key(i)).ok().map(|s| t.slots[s].count);
            assert_eq!(got, want, "entry {i}");
        }
        assert_eq!(t.used, t.slots.iter().filter(|s| s.key.op != 0).count());
        assert_eq!(t.of_db(1).len(), t.used);
        assert!(t.of_db(2).is_empty());
    }
}
