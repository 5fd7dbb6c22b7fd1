//! The per-backend key cache: keys by name and id, two hot indexes from a
//! hash straight to a usable version (the per-row paths), the KEK of the
//! master key last used, and the nonce buffer. Dropped (and so zeroized)
//! whenever the catalog's invalidation generation moves.

use super::grants::Privilege;
use super::load::{load, Lookup};
use super::master::{check_commitment, load_master_key, master_key_source, Which};
use super::version::{CachedKey, CachedVersion};
use crate::core::hash::{hash_u64, name_hash, FastHash};
use crate::core::hotindex::HotIndex;
use crate::crypto::{Kek, NonceSource};
use crate::errors::{KmsError, KmsResult};
use pgrx::pg_sys;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ptr::NonNull;
use std::rc::Rc;

pub(super) struct Cache {
    pub(super) gen: u64,
    pub(super) by_name: HashMap<Box<[u8]>, Rc<CachedKey>, FastHash>,
    pub(super) by_id: HashMap<u32, Rc<CachedKey>, FastHash>,
    /// Hot indexes, one word from the hash to the key schedule:
    /// hash(version << 32 | key id) -> usable version, and
    /// hash(key name) -> primary version; the version itself confirms the
    /// match (ids, or the name). The addresses are of versions owned by the
    /// keys in `by_id`; an entry is removed before (or with) its key, and
    /// the hot paths read through them only while holding a shared borrow
    /// of the cache.
    pub(super) hot_versions: HotIndex<CachedVersion>,
    pub(super) hot_primaries: HotIndex<CachedVersion>,
    /// (source description, fingerprint, KEK) of the master key last used.
    pub(super) kek: Option<(String, [u8; 32], Rc<Kek>)>,
}

#[inline]
pub(super) fn version_slot(key_id: u32, version: u32) -> u64 {
    (version as u64) << 32 | key_id as u64
}

impl Cache {
    #[inline]
    pub(super) fn sync(&mut self) {
        let g = crate::catalog::generation();
        if g != self.gen {
            // Dropping the entries zeroizes their key schedules.
            self.hot_versions.clear();
            self.hot_primaries.clear();
            self.by_name.clear();
            self.by_id.clear();
            self.kek = None;
            self.gen = g;
        }
    }

    pub(super) fn insert(&mut self, key: &Rc<CachedKey>) {
        if let Some(old) = self.by_id.get(&key.id).cloned() {
            self.remove(&old);
        }
        for v in key.usable_versions() {
            self.hot_versions
                .insert(hash_u64(v.slot()), NonNull::from(v));
        }
        if let Ok(p) = key.primary_version() {
            self.hot_primaries
                .insert(name_hash(key.name.as_bytes()), NonNull::from(p));
        }
        self.by_name.insert(key.name.as_bytes().into(), key.clone());
        self.by_id.insert(key.id, key.clone());
    }

    pub(super) fn remove(&mut self, key: &CachedKey) {
        for v in key.usable_versions() {
            self.hot_versions
                .remove(hash_u64(v.slot()), NonNull::from(v));
        }
        if let Ok(p) = key.primary_version() {
            self.hot_primaries
                .remove(name_hash(key.name.as_bytes()), NonNull::from(p));
        }
        self.by_name.remove(key.name.as_bytes());
        self.by_id.remove(&key.id);
    }
}

thread_local! {
    pub(super) static CACHE: RefCell<Cache> = RefCell::new(Cache {
        gen: 0,
        by_name: HashMap::default(),
        by_id: HashMap::default(),
        hot_versions: HotIndex::default(),
        hot_primaries: HotIndex::default(),
        kek: None,
    });
    static NONCES: RefCell<NonceSource> = RefCell::new(NonceSource::new());
}

/// 12 fresh random bytes without a system call (buffered per backend).
#[inline]
pub fn nonce() -> KmsResult<[u8; 12]> {
    // SAFETY: MyProcPid is set at process start and only read here, in
    // the backend's only thread.
    let pid = unsafe { pg_sys::MyProcPid };
    NONCES
        .with(|n| n.borrow_mut().nonce(pid))
        .map_err(|_| KmsError::Random)
}

pub fn random_bytes(out: &mut [u8]) -> KmsResult<()> {
    getrandom::getrandom(out).map_err(|_| KmsError::Random)
}

#[inline]
pub fn key_by_name(name: &[u8]) -> KmsResult<Rc<CachedKey>> {
    let hit = CACHE.with(|c| {
        let mut c = c.borrow_mut();
        c.sync();
        c.by_name.get(name).cloned()
    });
    match hit {
        Some(k) => Ok(k),
        None => load(Lookup::Name(crate::crypto::names::key_name(name)?)),
    }
}

#[inline]
pub fn key_by_id(id: u32) -> KmsResult<Rc<CachedKey>> {
    let hit = CACHE.with(|c| {
        let mut c = c.borrow_mut();
        c.sync();
        c.by_id.get(&id).cloned()
    });
    match hit {
        Some(k) => Ok(k),
        None => load(Lookup::Id(id)),
    }
}

/// Which hot index a warm lookup probes.
#[derive(Clone, Copy)]
enum Hot {
    /// hash(version << 32 | key id) -> usable version (decrypt).
    Versions,
    /// hash(key name) -> primary version (encrypt).
    Primaries,
}

/// The warm path shared by [`with_primary`] and [`with_version`]: finds the
/// version under `hash` in a hot index that `is` the one sought, starting
/// to load its cache lines as soon as its address is known, and runs `f` on
/// it. Leaves `f` in place (returns None) when the caller must take its
/// cold path.
#[inline]
fn run_hot<F, R>(
    hot: Hot,
    hash: u64,
    is: impl Fn(&CachedVersion) -> bool,
    f: &mut Option<F>,
) -> Option<KmsResult<R>>
where
    F: FnOnce(&CachedVersion) -> KmsResult<R>,
{
    CACHE.with(|c| {
        c.borrow_mut().sync();
        let c = c.borrow();
        let index = match hot {
            Hot::Versions => &c.hot_versions,
            Hot::Primaries => &c.hot_primaries,
        };
        // Why the reads below are sound: every indexed version is a
        // Box<CachedVersion> of a key in
        // `c.by_id` (an Rc<CachedKey>, never mutated, so the address is
        // stable); Cache::insert/remove keep the indexes in step with
        // `by_id` and sync clears both. `c.by_id` cannot change while `c` is
        // borrowed (f cannot reach the cache mutably: the RefCell would
        // panic rather than free it).
        let p = index.find(hash, |p| {
            CachedVersion::prefetch(p.as_ptr(), matches!(hot, Hot::Primaries));
            // SAFETY: the address is in `index` (see the comment above); the
            // reference is used only during `is`, while `c` is borrowed.
            is(unsafe { p.as_ref() })
        })?;
        // SAFETY: as above (an address from `index`, `c` still borrowed);
        // `f` gets the reference for a higher-ranked
        // lifetime, so it cannot keep it past the borrow of `c`.
        Some((f.take().expect("runs once"))(unsafe { p.as_ref() }))
    })
}

/// Runs `f` on the primary version of the key named `name` (the per-row
/// encrypt path). Warm, this is one probe of a small index and one pointer.
#[inline]
pub fn with_primary<R>(
    name: &[u8],
    f: impl FnOnce(&CachedVersion) -> KmsResult<R>,
) -> KmsResult<R> {
    let mut f = Some(f);
    if let Some(r) = run_hot(
        Hot::Primaries,
        name_hash(name),
        |v| v.key_name_bytes() == name,
        &mut f,
    ) {
        return r;
    }
    // Cold: the permission error comes before any state error.
    let key = key_by_name(name)?;
    key.check(Privilege::Encrypt)?;
    (f.take().expect("runs once"))(key.primary_version()?)
}

/// Runs `f` on version `version` of key `id`, if usable (the per-row
/// decrypt path).
#[inline]
pub fn with_version<R>(
    id: u32,
    version: u32,
    f: impl FnOnce(&CachedVersion) -> KmsResult<R>,
) -> KmsResult<R> {
    let mut f = Some(f);
    let slot = version_slot(id, version);
    if let Some(r) = run_hot(Hot::Versions, hash_u64(slot), |v| v.slot() == slot, &mut f) {
        return r;
    }
    let key = key_by_id(id)?;
    key.check(Privilege::Decrypt)?;
    (f.take().expect("runs once"))(key.usable(version)?)
}

/// The KEK of the configured master key, checked against the keyring's
/// fingerprint; cached per backend until the next invalidation.
pub(super) fn current_kek(stored_fp: Option<&[u8]>) -> KmsResult<Rc<Kek>> {
    let source = master_key_source(Which::Current).map(|(s, _, v)| format!("{s}={v}"));
    let cached = CACHE.with(|c| {
        let c = c.borrow();
        match (&c.kek, &source) {
            (Some((src, fp, kek)), Some(now)) if src == now => Some((*fp, kek.clone())),
            _ => None,
        }
    });
    if let Some((fp, kek)) = cached {
        if stored_fp.is_some_and(|s| s != fp.as_slice()) {
            return Err(KmsError::MasterKeyMismatch { previous: false });
        }
        return Ok(kek);
    }
    let mk = load_master_key(Which::Current)?;
    check_commitment(&mk, stored_fp, Which::Current)?;
    let kek = Rc::new(mk.kek());
    let fp = mk.fingerprint();
    if let Some(src) = source {
        CACHE.with(|c| c.borrow_mut().kek = Some((src, fp, kek.clone())));
    }
    Ok(kek)
}

/// Checks the master key configured now against the keyring's stored
/// fingerprint, for `kms_health()`: reuses this backend's validated KEK
/// while the configured source is unchanged, so that repeated calls do not
/// run `pg_kms.master_key_command` again; otherwise reads the key once and
/// keeps its KEK, as a key load would.
pub fn validate_current_master_key(stored_fp: Option<&[u8]>) -> KmsResult<()> {
    CACHE.with(|c| c.borrow_mut().sync());
    current_kek(stored_fp).map(|_| ())
}

/// Drops what the cache holds if the catalog's generation moved (called by
/// `catalog::catalog()`; a no-op while the cache is in use).
pub(super) fn sync_now() {
    CACHE.with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            c.sync();
        }
    });
}
