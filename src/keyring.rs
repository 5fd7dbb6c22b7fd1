//! The keyring: catalog access under the catalog owner's identity, master
//! key loading and commitment check, and the per-backend data-key cache.
//!
//! Cache invalidation: every lifecycle act queues a relcache invalidation of
//! `kms.keys`. PostgreSQL delivers it to every backend at its next
//! transaction start (and to the acting backend at the end of the command,
//! or at abort), where [`relcache_callback`] bumps a generation counter.
//! The hot path compares that counter and, once warm, does no SPI, no
//! catalog read and no system call.

use crate::core::hash::{hash_u64, name_hash, FastHash};
use crate::core::hotindex::HotIndex;
use crate::crypto::derive::INFO_BLIND_INDEX;
use crate::crypto::{prefetch_line, DataKey, Kek, MacKey, MasterKey, NonceSource, SivKey};
use crate::errors::{KmsError, KmsResult};
use crate::pg::guc;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

static INVAL_GEN: AtomicU64 = AtomicU64::new(1);
static KEYS_RELID: AtomicU32 = AtomicU32::new(0);

pub fn init() {
    // SAFETY: called once from _PG_init, in the single thread of the
    // process loading the library: reading the Postgres global is a plain
    // read, and the callbacks registered are `extern "C-unwind"` functions
    // with the signatures the inval.c API expects, guarded by #[pg_guard],
    // that live as long as the process (the library is never unloaded).
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), pg_sys::Datum::from(0usize));
        // Role membership or attribute changes can change per-key grant
        // decisions: drop the cache when they happen.
        for cache in [
            pg_sys::SysCacheIdentifier::AUTHMEMROLEMEM,
            pg_sys::SysCacheIdentifier::AUTHOID,
        ] {
            pg_sys::CacheRegisterSyscacheCallback(
                cache as i32,
                Some(syscache_callback),
                pg_sys::Datum::from(0usize),
            );
        }
    }
}

/// # Safety
///
/// Called only by Postgres' invalidation processing (registered in
/// [`init`]); it touches no argument and no Postgres state.
#[pg_guard]
unsafe extern "C-unwind" fn syscache_callback(_arg: pg_sys::Datum, _cacheid: i32, _hash: u32) {
    INVAL_GEN.fetch_add(1, Ordering::Relaxed);
}

/// Runs inside invalidation processing: no allocation, no catalog access.
///
/// # Safety
///
/// Called only by Postgres' invalidation processing (registered in
/// [`init`]); it reads only the relid passed by value.
#[pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let keys = KEYS_RELID.load(Ordering::Relaxed);
    if relid == pg_sys::InvalidOid || (keys != 0 && relid.to_u32() == keys) {
        INVAL_GEN.fetch_add(1, Ordering::Relaxed);
    }
}

/// Tells every backend (this one at end of command) to drop its key cache.
pub fn invalidate_all_backends(cat: &Catalog) {
    // SAFETY: called inside a transaction (a lifecycle act, with the
    // catalog looked up); CacheInvalidateRelcacheByRelid only queues an
    // invalidation message for that oid (it raises an ERROR, never UB, if
    // the relation is gone).
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(cat.keys_relid) };
}

// ---------------------------------------------------------------------------
// Catalog identity

#[derive(Clone, Copy)]
pub struct Catalog {
    pub owner: pg_sys::Oid,
    pub keys_relid: pg_sys::Oid,
}

fn lookup_catalog() -> KmsResult<Catalog> {
    // pg_extension and pg_class are readable by every role: no switch needed.
    // Read-only SPI (`select`): this also runs in parallel workers, which
    // must not assign a transaction id.
    let row = Spi::connect(|c| {
        c.select(
            "SELECT e.extowner, c.oid
           FROM pg_catalog.pg_extension e,
                pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
          WHERE e.extname OPERATOR(pg_catalog.=) 'pg_kms'
            AND n.nspname OPERATOR(pg_catalog.=) 'kms'
            AND c.relname OPERATOR(pg_catalog.=) 'keys'",
            Some(1),
            &[],
        )?
        .first()
        .get_two::<pg_sys::Oid, pg_sys::Oid>()
    });
    match row {
        Ok((Some(owner), Some(keys_relid))) => Ok(Catalog { owner, keys_relid }),
        Ok(_) => Err(KmsError::NotInstalled),
        Err(pgrx::spi::Error::InvalidPosition) => Err(KmsError::NotInstalled),
        Err(e) => Err(KmsError::Spi(e.to_string())),
    }
}

pub fn catalog() -> KmsResult<Catalog> {
    let cached = CACHE.with(|c| {
        let mut c = c.borrow_mut();
        c.sync();
        c.catalog
    });
    if let Some(cat) = cached {
        return Ok(cat);
    }
    let cat = lookup_catalog()?;
    KEYS_RELID.store(cat.keys_relid.to_u32(), Ordering::Relaxed);
    CACHE.with(|c| c.borrow_mut().catalog = Some(cat));
    Ok(cat)
}

/// Switches to the catalog owner's identity with `search_path` pinned to
/// `pg_catalog, pg_temp`, as `SECURITY DEFINER` would, but only for the
/// duration of `f` (a key-cache miss or a lifecycle act). On error the
/// transaction abort restores both, as it does for SECURITY DEFINER.
pub fn as_catalog_owner<R>(f: impl FnOnce(&Catalog) -> KmsResult<R>) -> KmsResult<R> {
    let cat = catalog()?;
    crate::pg::identity::as_role(cat.owner, || f(&cat))
}

// ---------------------------------------------------------------------------
// Master key

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Which {
    Current,
    Previous,
}

/// Where the master key comes from, as configured now: (setting name, value).
pub fn master_key_source(which: Which) -> Option<(&'static str, bool, String)> {
    let (file, cmd, fname, cname) = match which {
        Which::Current => (
            &guc::MASTER_KEY_FILE,
            &guc::MASTER_KEY_COMMAND,
            "pg_kms.master_key_file",
            "pg_kms.master_key_command",
        ),
        Which::Previous => (
            &guc::PREVIOUS_MASTER_KEY_FILE,
            &guc::PREVIOUS_MASTER_KEY_COMMAND,
            "pg_kms.previous_master_key_file",
            "pg_kms.previous_master_key_command",
        ),
    };
    if let Some(path) = guc::get(file) {
        return Some((fname, true, path));
    }
    guc::get(cmd).map(|c| (cname, false, c))
}

/// Reads the master key from its configured source (file wins over command).
pub fn load_master_key(which: Which) -> KmsResult<MasterKey> {
    let (setting, is_file, value) = master_key_source(which).ok_or(KmsError::MasterKeyMissing {
        previous: which == Which::Previous,
    })?;
    let r = if is_file {
        MasterKey::from_file(std::path::Path::new(&value))
    } else {
        let ms = guc::MASTER_KEY_COMMAND_TIMEOUT_MS.get().max(1) as u64;
        MasterKey::from_command(&value, Duration::from_millis(ms))
    };
    r.map_err(|cause| KmsError::MasterKeyInvalid { setting, cause })
}

/// The keyring's stored master-key fingerprint (caller is catalog owner).
pub fn stored_fingerprint(lock: bool) -> KmsResult<Option<Vec<u8>>> {
    if lock {
        crate::pg::spi::first(
            "SELECT master_key_fingerprint FROM kms.keyring FOR UPDATE",
            &[],
            true,
        )
    } else {
        crate::pg::spi::first("SELECT master_key_fingerprint FROM kms.keyring", &[], false)
    }
}

/// Checks a master key against the stored fingerprint (none stored: ok).
pub fn check_commitment(mk: &MasterKey, stored: Option<&[u8]>, which: Which) -> KmsResult<()> {
    match stored {
        Some(fp) if fp != mk.fingerprint().as_slice() => Err(KmsError::MasterKeyMismatch {
            previous: which == Which::Previous,
        }),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// Key cache

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum State {
    Active,
    DecryptOnly,
    Disabled,
    Destroyed,
}

impl State {
    pub fn parse(s: &str) -> State {
        match s {
            "active" => State::Active,
            "decrypt_only" => State::DecryptOnly,
            "disabled" => State::Disabled,
            _ => State::Destroyed,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Active => "active",
            State::DecryptOnly => "decrypt_only",
            State::Disabled => "disabled",
            State::Destroyed => "destroyed",
        }
    }
}

/// One usable (active or decrypt-only) version of a key, in one allocation
/// laid out for the per-row path. With thousands of tenant keys in turn,
/// what one row costs is the cache lines of key state it touches that are
/// no longer in the CPU cache, so their number is kept small: a decrypt
/// reads five lines, an encrypt six.
/// - lines 0-3: the AES round keys (the start of the AES-GCM state; the
///   software fallback's schedule after them is never read on CPUs with
///   AES-NI);
/// - the line holding the GHASH key, at the end of the AES-GCM state, also
///   holds everything the lookup, the grant check and the usage counters
///   read (no reference count: the hot indexes hold plain addresses);
/// - the next line: the key name (compared by the encrypt path);
/// - then what only a slow path reads.
///
/// The hot indexes of the cache point straight at it (see [`with_version`],
/// [`with_primary`]).
#[repr(C, align(64))]
pub struct CachedVersion {
    key: DataKey,
    // In the GHASH key's line (see `hot_fields_share_the_ghash_line`).
    pub key_id: u32,
    pub number: u32,
    /// Last grant decision: (user, bits). See [`CachedVersion::check`].
    seen: Cell<(pg_sys::Oid, u8)>,
    /// Counts not yet added to `stat` (see [`CachedVersion::count_encryption`]).
    pending_enc: Cell<u32>,
    pending_dec: Cell<u32>,
    /// Encryptions that may still be counted locally before the next flush
    /// (fewer when the nonce-budget warning level is near).
    enc_budget: Cell<u32>,
    /// Whether the key has grants (else any kms_user may use it).
    has_grants: bool,
    /// Whether uses are counted (`stat` is set: the library is preloaded).
    counted: bool,
    /// Listed for the end-of-transaction flush.
    dirty: Cell<bool>,
    name_len: u8,
    // Next line.
    name: [u8; NAME_MAX],
    // Slow paths only.
    /// Shared-memory counters (None without preload).
    stat: Option<&'static crate::pg::shmem::StatSlot>,
    grants: Rc<Grants>,
    /// AES-SIV key for deterministic encryption under this version.
    pub det: SivKey,
}

/// A version as the catalog lists it; `usable` is None once it is disabled
/// or destroyed.
struct VersionInfo {
    state: State,
    usable: Option<Box<CachedVersion>>,
}

use crate::crypto::names::KEY_NAME_MAX as NAME_MAX;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Privilege {
    Encrypt,
    Decrypt,
}

impl Privilege {
    pub fn parse(s: &str) -> Option<Privilege> {
        match s {
            "encrypt" => Some(Privilege::Encrypt),
            "decrypt" => Some(Privilege::Decrypt),
            _ => None,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Privilege::Encrypt => "encrypt",
            Privilege::Decrypt => "decrypt",
        }
    }
    /// (known, allowed) bits of a cached decision.
    fn bits(&self) -> (u8, u8) {
        match self {
            Privilege::Encrypt => (1, 2),
            Privilege::Decrypt => (4, 8),
        }
    }
}

/// Per-key grants (privilege, grantee role), shared by a key and its
/// versions. Not `restricted` (no grant rows at all): any kms_user.
struct Grants {
    /// The grants that apply: those whose role still exists under the oid
    /// and the name it was granted to (see [`load_grants`]).
    list: Vec<(Privilege, pg_sys::Oid)>,
    /// Whether the key has any grant row, applicable or not: a key whose
    /// only grantee was dropped stays closed, it does not open to every
    /// kms_user.
    restricted: bool,
    /// Decisions for (user, privilege), so the check stays off the hot path.
    decisions: RefCell<HashMap<(pg_sys::Oid, Privilege), bool>>,
}

impl Grants {
    fn allowed(&self, user: pg_sys::Oid, p: Privilege) -> bool {
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
        privilege: p.as_str(),
        key: name.to_string(),
    }
}

pub struct CachedKey {
    pub id: u32,
    pub name: String,
    pub primary: u32,
    /// Indexed by version - 1 (versions are dense from 1).
    versions: Vec<Option<VersionInfo>>,
    /// Blind-index key of the key name (None once the key is destroyed).
    pub index: Option<MacKey>,
    grants: Rc<Grants>,
}

impl CachedVersion {
    #[inline]
    pub fn data_key(&self) -> &DataKey {
        &self.key
    }

    /// This version's key in the hot index (and the dirty list).
    #[inline]
    fn slot(&self) -> u64 {
        version_slot(self.key_id, self.number)
    }

    #[inline]
    pub fn key_name_bytes(&self) -> &[u8] {
        &self.name[..self.name_len as usize]
    }

    pub fn key_name(&self) -> &str {
        std::str::from_utf8(self.key_name_bytes()).unwrap_or("?")
    }

    /// Starts loading the lines a seal or open of this version reads (and
    /// the name's line too, `with_name`) into the CPU cache, from the
    /// address alone (nothing is read), so that with thousands of
    /// interleaved keys these misses overlap each other.
    #[inline]
    fn prefetch(v: *const CachedVersion, with_name: bool) {
        let base = v as *const u8;
        // The schedule's GHASH line also holds the per-row fields.
        DataKey::prefetch_schedule(base.wrapping_add(std::mem::offset_of!(CachedVersion, key)));
        if with_name {
            prefetch_line(base.wrapping_add(std::mem::offset_of!(CachedVersion, name)));
        }
    }

    /// Per-key grants, decided once per (user, privilege) and remembered in
    /// the version itself for the last user, so the per-row check reads
    /// only the line the cipher reads anyway.
    #[inline]
    pub fn check(&self, p: Privilege) -> KmsResult<()> {
        if !self.has_grants {
            return Ok(());
        }
        // SAFETY: GetUserId reads the backend's current user id, set once the
        // backend is connected (always, when SQL runs); it has no other
        // precondition.
        let user = unsafe { pg_sys::GetUserId() };
        let (known, allowed) = p.bits();
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
    #[inline]
    fn count(&self, pending: &Cell<u32>, flush_at: u32) {
        if !self.counted {
            return;
        }
        let n = pending.get() + 1;
        pending.set(n);
        mark_dirty(self);
        if n >= flush_at {
            self.flush_counts();
        }
    }

    fn flush_counts(&self) {
        let Some(s) = self.stat else { return };
        let (e, d) = (
            self.pending_enc.replace(0) as u64,
            self.pending_dec.replace(0) as u64,
        );
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
        self.flush_counts();
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

#[inline]
fn mark_dirty(v: &CachedVersion) {
    if !v.dirty.replace(true) {
        list_dirty(v);
    }
}

fn list_dirty(v: &CachedVersion) {
    if !XACT_HOOKED.swap(true, Ordering::Relaxed) {
        // SAFETY: registered once per backend (XACT_HOOKED), from its only
        // thread; flush_at_xact_end has the XactCallback signature, is
        // #[pg_guard]ed, lives as long as the process and ignores its
        // (null) argument.
        unsafe { pg_sys::RegisterXactCallback(Some(flush_at_xact_end), std::ptr::null_mut()) };
    }
    DIRTY.with(|d| d.borrow_mut().push(v.slot()));
}

/// # Safety
///
/// Called only by Postgres at transaction events (registered in
/// `list_dirty`), in the backend's only thread; `_arg` is never read.
#[pg_guard]
unsafe extern "C-unwind" fn flush_at_xact_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    if !matches!(
        event,
        XACT_EVENT_PRE_COMMIT
            | XACT_EVENT_PARALLEL_PRE_COMMIT
            | XACT_EVENT_PRE_PREPARE
            | XACT_EVENT_ABORT
            | XACT_EVENT_PARALLEL_ABORT
    ) {
        return;
    }
    let slots = DIRTY.with(|d| std::mem::take(&mut *d.borrow_mut()));
    if slots.is_empty() {
        return;
    }
    CACHE.with(|c| match c.try_borrow() {
        Ok(c) => {
            for slot in &slots {
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
                    v.dirty.set(false);
                    v.flush_counts();
                }
            }
        }
        Err(_) => DIRTY.with(|d| d.borrow_mut().extend(slots)),
    });
}

impl CachedKey {
    /// Per-key grants: once a key has grants, only their grantees (and
    /// members of them) may use it for that privilege.
    #[inline]
    pub fn check(&self, p: Privilege) -> KmsResult<()> {
        if !self.grants.restricted {
            return Ok(());
        }
        // SAFETY: GetUserId reads the backend's current user id, set once the
        // backend is connected (always, when SQL runs).
        self.check_user(unsafe { pg_sys::GetUserId() }, p)
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

    /// `version`, if its state allows decryption.
    pub fn usable(&self, version: u32) -> KmsResult<&CachedVersion> {
        match self
            .versions
            .get((version as usize).wrapping_sub(1))
            .and_then(|v| v.as_ref())
        {
            Some(VersionInfo {
                usable: Some(v), ..
            }) => Ok(v),
            Some(v) => Err(KmsError::VersionState {
                key: self.name.clone(),
                version: version as i32,
                state: v.state.as_str().into(),
                action: "use it",
            }),
            None => Err(KmsError::UnknownVersion {
                key: self.name.clone(),
                version: version as i32,
            }),
        }
    }

    pub fn primary_version(&self) -> KmsResult<&CachedVersion> {
        self.usable(self.primary)
    }

    fn usable_versions(&self) -> impl Iterator<Item = &CachedVersion> {
        self.versions
            .iter()
            .flatten()
            .filter_map(|v| v.usable.as_deref())
    }
}

struct Cache {
    gen: u64,
    catalog: Option<Catalog>,
    by_name: HashMap<Box<[u8]>, Rc<CachedKey>, FastHash>,
    by_id: HashMap<u32, Rc<CachedKey>, FastHash>,
    /// Hot indexes, one word from the hash to the key schedule:
    /// hash(version << 32 | key id) -> usable version, and
    /// hash(key name) -> primary version; the version itself confirms the
    /// match (ids, or the name). The addresses are of versions owned by the
    /// keys in `by_id`; an entry is removed before (or with) its key, and
    /// the hot paths read through them only while holding a shared borrow
    /// of the cache.
    hot_versions: HotIndex<CachedVersion>,
    hot_primaries: HotIndex<CachedVersion>,
    /// (source description, fingerprint, KEK) of the master key last used.
    kek: Option<(String, [u8; 32], Rc<Kek>)>,
}

#[inline]
fn version_slot(key_id: u32, version: u32) -> u64 {
    (version as u64) << 32 | key_id as u64
}

impl Cache {
    #[inline]
    fn sync(&mut self) {
        let g = INVAL_GEN.load(Ordering::Relaxed);
        if g != self.gen {
            // Dropping the entries zeroizes their key schedules.
            self.hot_versions.clear();
            self.hot_primaries.clear();
            self.by_name.clear();
            self.by_id.clear();
            self.kek = None;
            self.catalog = None;
            self.gen = g;
        }
    }

    fn insert(&mut self, key: &Rc<CachedKey>) {
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

    fn remove(&mut self, key: &CachedKey) {
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
    static CACHE: RefCell<Cache> = RefCell::new(Cache {
        gen: 0,
        catalog: None,
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

enum Lookup<'a> {
    Name(&'a str),
    Id(u32),
}

struct VersionRow {
    key_id: i32,
    name: String,
    primary: i32,
    version: i32,
    state: String,
    wrapped: Option<Vec<u8>>,
    index_root: Option<Vec<u8>>,
    // What the rows' MACs cover besides the above (checked on load).
    destroyed_us: Option<i64>,
    generation: i64,
    key_mac: Option<Vec<u8>>,
    version_mac: Option<Vec<u8>>,
}

const LOAD_SQL: &str = "SELECT k.key_id, k.key_name, k.primary_version, v.version, v.state, v.wrapped_key, k.index_key,
           (EXTRACT(epoch FROM k.destroyed_at) * 1000000)::int8, k.generation, k.row_mac, v.row_mac
      FROM kms.keys k JOIN kms.key_versions v ON v.key_id = k.key_id";

/// Checks the MACs of a key's rows as loaded (cold path only): a row
/// edited behind pg_kms's back is refused with XX001.
fn verify_loaded(rows: &[VersionRow]) -> KmsResult<()> {
    use crate::lifecycle::{verify_key_rows, KeyCheck, VersionCheck};
    let Some(f) = rows.first() else { return Ok(()) };
    let key = KeyCheck {
        key_id: f.key_id,
        name: &f.name,
        primary: f.primary,
        destroyed_us: f.destroyed_us,
        index_key: f.index_root.as_deref(),
        generation: f.generation,
        mac: f.key_mac.as_deref(),
    };
    let versions: Vec<VersionCheck<'_>> = rows
        .iter()
        .map(|r| VersionCheck {
            version: r.version,
            state: &r.state,
            wrapped: r.wrapped.as_deref(),
            mac: r.version_mac.as_deref(),
        })
        .collect();
    verify_key_rows(&key, &versions)
}

/// The grants of a key (caller is the catalog owner). A grant applies only
/// while the role with the oid it was given to exists and still has the
/// name it was given to: a role dropped and recreated under the same name
/// has a new oid and does not inherit it, a renamed role loses it. Grants
/// restored from another cluster's dump apply only once
/// `kms_rebind_key_grants()` has bound them to this cluster's roles (or if
/// the oid happens to name the same role name here). Every row, applicable
/// or not, keeps the key restricted.
fn load_grants(key_id: i32) -> KmsResult<Grants> {
    Spi::connect(|c| -> Result<Grants, pgrx::spi::Error> {
        let mut list = Vec::new();
        let mut restricted = false;
        for r in c.select(
            "SELECT g.privilege, r.oid FROM kms.key_grants g
               LEFT JOIN pg_catalog.pg_roles r
                 ON r.oid OPERATOR(pg_catalog.=) g.grantee_oid
                AND r.rolname::pg_catalog.text OPERATOR(pg_catalog.=) g.grantee
              WHERE g.key_id OPERATOR(pg_catalog.=) $1",
            None,
            &[key_id.into()],
        )? {
            restricted = true;
            let p = r.get::<String>(1)?.unwrap_or_default();
            if let (Some(p), Some(role)) = (Privilege::parse(&p), r.get::<pg_sys::Oid>(2)?) {
                list.push((p, role));
            }
        }
        Ok(Grants {
            list,
            restricted,
            decisions: RefCell::new(HashMap::new()),
        })
    })
    .map_err(KmsError::spi)
}

fn load(lookup: Lookup<'_>) -> KmsResult<Rc<CachedKey>> {
    let gen_before = INVAL_GEN.load(Ordering::Relaxed);
    let (rows, stored_fp, grants) = as_catalog_owner(|_| {
        let rows = Spi::connect(|c| -> Result<Vec<VersionRow>, pgrx::spi::Error> {
            let table = match lookup {
                Lookup::Name(n) => c.select(
                    &format!("{LOAD_SQL} WHERE k.key_name = $1"),
                    None,
                    &[n.into()],
                )?,
                Lookup::Id(id) => c.select(
                    &format!("{LOAD_SQL} WHERE k.key_id = $1"),
                    None,
                    &[(id as i32).into()],
                )?,
            };
            let mut rows = Vec::new();
            for r in table {
                rows.push(VersionRow {
                    key_id: r.get::<i32>(1)?.unwrap_or(0),
                    name: r.get::<String>(2)?.unwrap_or_default(),
                    primary: r.get::<i32>(3)?.unwrap_or(0),
                    version: r.get::<i32>(4)?.unwrap_or(0),
                    state: r.get::<String>(5)?.unwrap_or_default(),
                    wrapped: r.get::<Vec<u8>>(6)?,
                    index_root: r.get::<Vec<u8>>(7)?,
                    destroyed_us: r.get::<i64>(8)?,
                    generation: r.get::<i64>(9)?.unwrap_or(0),
                    key_mac: r.get::<Vec<u8>>(10)?,
                    version_mac: r.get::<Vec<u8>>(11)?,
                });
            }
            Ok(rows)
        })
        .map_err(KmsError::spi)?;
        verify_loaded(&rows)?;
        let grants = match rows.first() {
            Some(r) => load_grants(r.key_id)?,
            None => Grants {
                list: Vec::new(),
                restricted: false,
                decisions: RefCell::new(HashMap::new()),
            },
        };
        Ok((rows, stored_fingerprint(false)?, grants))
    })?;
    let Some(first) = rows.first() else {
        return Err(match lookup {
            Lookup::Name(n) => KmsError::UnknownKey(n.to_string()),
            Lookup::Id(id) => KmsError::UnknownKeyId(id),
        });
    };
    let mut key = CachedKey {
        id: first.key_id as u32,
        name: first.name.clone(),
        primary: first.primary as u32,
        versions: Vec::new(),
        index: None,
        grants: Rc::new(grants),
    };
    let name_bytes = first.name.as_bytes();
    let mut name = [0u8; NAME_MAX];
    let name_len = name_bytes.len().min(NAME_MAX);
    name[..name_len].copy_from_slice(&name_bytes[..name_len]);
    let needs_kek = first.index_root.is_some()
        || rows.iter().any(|r| {
            r.wrapped.is_some()
                && matches!(State::parse(&r.state), State::Active | State::DecryptOnly)
        });
    let kek = if needs_kek {
        Some(current_kek(stored_fp.as_deref())?)
    } else {
        None
    };
    let corrupt = |version: i32| KmsError::CatalogCorrupt {
        key: first.name.clone(),
        version,
    };
    if let (Some(kek), Some(root)) = (&kek, &first.index_root) {
        let root = kek
            .unwrap_index_root(key.id, root)
            .map_err(|_| corrupt(0))?;
        key.index = Some(MacKey::derive(root.as_ref(), INFO_BLIND_INDEX));
    }
    for r in &rows {
        let state = State::parse(&r.state);
        let usable = match (&kek, &r.wrapped, state) {
            (Some(kek), Some(w), State::Active | State::DecryptOnly) => {
                let raw = kek
                    .unwrap_raw(key.id, r.version as u32, w)
                    .map_err(|_| corrupt(r.version))?;
                let stat = crate::pg::shmem::stat_slot(key.id, r.version as u32);
                Some(Box::new(CachedVersion {
                    key: DataKey::new(&raw),
                    key_id: key.id,
                    number: r.version as u32,
                    seen: Cell::new((pg_sys::InvalidOid, 0)),
                    pending_enc: Cell::new(0),
                    pending_dec: Cell::new(0),
                    enc_budget: Cell::new(0),
                    has_grants: key.has_grants(),
                    counted: stat.is_some(),
                    dirty: Cell::new(false),
                    name_len: name_len as u8,
                    name,
                    stat,
                    grants: key.grants.clone(),
                    det: SivKey::derive(raw.as_ref()),
                }))
            }
            _ => None,
        };
        let slot = (r.version as usize).saturating_sub(1);
        if key.versions.len() <= slot {
            key.versions.resize_with(slot + 1, || None);
        }
        key.versions[slot] = Some(VersionInfo { state, usable });
    }
    let key = Rc::new(key);
    if INVAL_GEN.load(Ordering::Relaxed) == gen_before {
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            c.sync();
            // Bounded: evict (and so zeroize) some other key when full.
            let limit = crate::pg::guc::KEY_CACHE_SIZE.get().max(1) as usize;
            while c.by_id.len() >= limit && !c.by_id.contains_key(&key.id) {
                let Some(old) = c.by_id.values().next().cloned() else {
                    break;
                };
                c.remove(&old);
            }
            c.insert(&key);
        });
    }
    Ok(key)
}

/// The KEK of the configured master key, checked against the keyring's
/// fingerprint; cached per backend until the next invalidation.
fn current_kek(stored_fp: Option<&[u8]>) -> KmsResult<Rc<Kek>> {
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

/// Names of the settings that hold the master key now, for `kms_health()`.
pub fn describe_source(which: Which) -> Option<(&'static str, bool)> {
    master_key_source(which).map(|(s, is_file, _)| (s, is_file))
}

#[cfg(test)]
mod layout_tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::mem::offset_of;

    fn lines(ranges: &[(usize, usize)]) -> BTreeSet<usize> {
        ranges
            .iter()
            .flat_map(|&(from, to)| from / 64..=(to - 1) / 64)
            .collect()
    }

    /// The per-row cache lines of a version (see [`CachedVersion`]): the
    /// fields the hot path reads share the GHASH key's line, so a decrypt
    /// reads five lines and an encrypt (which compares the name) six. Only
    /// speed depends on this, never results.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn hot_fields_share_the_ghash_line() {
        let key = offset_of!(CachedVersion, key);
        let schedule: Vec<(usize, usize)> = DataKey::HOT_RANGES
            .iter()
            .map(|&(a, b)| (key + a, key + b))
            .collect();
        let ghash_line = (key + DataKey::HOT_RANGES[1].0) / 64;
        let hot = (
            offset_of!(CachedVersion, key_id),
            offset_of!(CachedVersion, name_len) + 1,
        );
        assert_eq!(lines(&[hot]), BTreeSet::from([ghash_line]));
        let decrypt = lines(&[&schedule[..], &[hot]].concat());
        assert_eq!(decrypt.len(), 5, "decrypt lines {decrypt:?}");
        let name = offset_of!(CachedVersion, name);
        let encrypt = lines(&[&schedule[..], &[hot, (name, name + NAME_MAX)]].concat());
        assert_eq!(encrypt.len(), 6, "encrypt lines {encrypt:?}");
    }
}
