//! Shared memory (only with `shared_preload_libraries = 'pg_kms'`):
//!
//! * per (database, key id, version) counters of encryptions and
//!   decryptions since server start, updated lock-free on the hot path
//!   (one relaxed atomic add per value; no catalog write);
//! * the latches of the per-database re-encryption workers, so that a
//!   committed rotation wakes them at once.

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};

pub const STAT_SLOTS: usize = 8192;
pub const WORKER_SLOTS: usize = 128;

const EMPTY: u32 = 0;
const CLAIMING: u32 = 1;
const READY: u32 = 2;

#[repr(C)]
pub struct StatSlot {
    state: AtomicU32,
    db: AtomicU32,
    key_id: AtomicU32,
    version: AtomicU32,
    pub encryptions: AtomicU64,
    pub decryptions: AtomicU64,
}

#[repr(C)]
pub struct WorkerSlot {
    db: AtomicU32,
    pid: AtomicI32,
    latch: AtomicUsize,
}

#[repr(C)]
pub struct KmsShared {
    stats: [StatSlot; STAT_SLOTS],
    workers: [WorkerSlot; WORKER_SLOTS],
}

// SAFETY: KmsShared is repr(C) and made only of atomics (no pointers to
// process-local memory, nothing to drop), so every process may read and
// write it concurrently through a shared reference. The one address kept,
// WorkerSlot::latch, is of a PGPROC latch in the main shared memory
// segment, which all processes map at the same address.
unsafe impl PGRXSharedMemory for KmsShared {}

impl Default for KmsShared {
    fn default() -> Self {
        KmsShared {
            stats: std::array::from_fn(|_| StatSlot {
                state: AtomicU32::new(EMPTY),
                db: AtomicU32::new(0),
                key_id: AtomicU32::new(0),
                version: AtomicU32::new(0),
                encryptions: AtomicU64::new(0),
                decryptions: AtomicU64::new(0),
            }),
            workers: std::array::from_fn(|_| WorkerSlot {
                db: AtomicU32::new(0),
                pid: AtomicI32::new(0),
                latch: AtomicUsize::new(0),
            }),
        }
    }
}

// SAFETY: the ShmemInitStruct name "pg_kms shared state" is used by no other
// allocation (it carries the extension's name, and this is its only one).
static SHARED: PgAtomic<KmsShared> = unsafe { PgAtomic::new(c"pg_kms shared state") };

/// Called from `_PG_init` only while preloading.
pub fn init() {
    pg_shmem_init!(SHARED);
    crate::pg::access_shmem::init();
}

fn shared() -> Option<&'static KmsShared> {
    if crate::pg::preloaded() {
        Some(SHARED.get())
    } else {
        None
    }
}

fn my_db() -> u32 {
    // SAFETY: a plain read of a backend global, set once when the backend
    // connects to its database, in the backend's only thread.
    unsafe { pg_sys::MyDatabaseId.to_u32() }
}

/// The counter slot of (this database, key id, version), created on first
/// use. None without preload or when all slots are taken.
pub fn stat_slot(key_id: u32, version: u32) -> Option<&'static StatSlot> {
    let sh = shared()?;
    let db = my_db();
    let h = (db as usize).wrapping_mul(0x9E37_79B9)
        ^ (key_id as usize).wrapping_mul(31)
        ^ version as usize;
    for i in 0..STAT_SLOTS {
        let s = &sh.stats[(h + i) % STAT_SLOTS];
        loop {
            match s.state.load(Ordering::Acquire) {
                READY => {
                    if s.db.load(Ordering::Relaxed) == db
                        && s.key_id.load(Ordering::Relaxed) == key_id
                        && s.version.load(Ordering::Relaxed) == version
                    {
                        return Some(s);
                    }
                    break;
                }
                CLAIMING => std::hint::spin_loop(),
                _ => {
                    if s.state
                        .compare_exchange(EMPTY, CLAIMING, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        s.db.store(db, Ordering::Relaxed);
                        s.key_id.store(key_id, Ordering::Relaxed);
                        s.version.store(version, Ordering::Relaxed);
                        s.state.store(READY, Ordering::Release);
                        return Some(s);
                    }
                }
            }
        }
    }
    None
}

/// (key id, version, encryptions, decryptions) of this database.
pub fn stats_of_this_db() -> Vec<(u32, u32, u64, u64)> {
    let Some(sh) = shared() else {
        return Vec::new();
    };
    let db = my_db();
    sh.stats
        .iter()
        .filter(|s| s.state.load(Ordering::Acquire) == READY && s.db.load(Ordering::Relaxed) == db)
        .map(|s| {
            (
                s.key_id.load(Ordering::Relaxed),
                s.version.load(Ordering::Relaxed),
                s.encryptions.load(Ordering::Relaxed),
                s.decryptions.load(Ordering::Relaxed),
            )
        })
        .collect()
}

/// A worker announces its latch for its database. Err(pid) when a live
/// worker (pid) already serves this database. Ok(None) when all slots are
/// taken (the worker then runs without being woken early).
pub fn register_worker(db: u32) -> Result<Option<usize>, i32> {
    let Some(sh) = shared() else { return Ok(None) };
    forget_dead_workers();
    // SAFETY: a plain read of a backend global set at process start.
    let pid = unsafe { pg_sys::MyProcPid };
    for w in &sh.workers {
        let other = w.pid.load(Ordering::Acquire);
        if other != 0 && other != pid && w.db.load(Ordering::Acquire) == db {
            return Err(other);
        }
    }
    for (i, w) in sh.workers.iter().enumerate() {
        if w.pid
            .compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            w.latch
                // SAFETY: a plain read of a backend global. Only background
                // workers register, and InitProcess has pointed their MyLatch
                // at their PGPROC's shared latch before their main function
                // runs: the address others may SetLatch stays in shared memory.
                .store(unsafe { pg_sys::MyLatch } as usize, Ordering::Release);
            w.db.store(db, Ordering::Release);
            return Ok(Some(i));
        }
    }
    Ok(None)
}

pub fn unregister_worker(slot: usize) {
    if let Some(sh) = shared() {
        let w = &sh.workers[slot];
        w.db.store(0, Ordering::Release);
        w.latch.store(0, Ordering::Release);
        w.pid.store(0, Ordering::Release);
    }
}

/// Clears slots of workers that died without unregistering (crash).
pub fn forget_dead_workers() {
    if let Some(sh) = shared() {
        for w in &sh.workers {
            let pid = w.pid.load(Ordering::Acquire);
            // SAFETY: kill with signal 0 sends nothing (it only checks that the
            // process exists); `pid` is nonzero and, as only MyProcPid values
            // are stored, positive: it never names a process group.
            if pid != 0 && unsafe { libc::kill(pid, 0) } != 0 {
                w.db.store(0, Ordering::Release);
                w.latch.store(0, Ordering::Release);
                let _ = w
                    .pid
                    .compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Acquire);
            }
        }
    }
}

/// Wakes the workers of this database (after a committed rotation).
pub fn wake_workers_of_this_db() {
    let Some(sh) = shared() else { return };
    let db = my_db();
    // SAFETY: a plain read of a backend global set at process start.
    let me = unsafe { pg_sys::MyProcPid };
    for w in &sh.workers {
        let pid = w.pid.load(Ordering::Acquire);
        // A worker never wakes itself (its own scheduled rotations).
        if pid != 0 && pid != me && w.db.load(Ordering::Acquire) == db {
            let latch = w.latch.load(Ordering::Acquire);
            if latch != 0 {
                // SAFETY: `latch` was stored by register_worker from a worker's
                // MyLatch, its PGPROC's latch in shared memory: it stays
                // mapped and initialised for the life of the server even if
                // the worker has exited (PGPROCs are never freed). SetLatch
                // on a latch now owned by another process, or by none, only
                // wakes that process or does nothing.
                unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
            }
        }
    }
}
