//! What the cache holds: a key ([`CachedKey`]) and its usable versions
//! ([`CachedVersion`], laid out for the per-row path), and the states a
//! version goes through.

use super::cache::version_slot;
use super::grants::Grants;
use crate::crypto::{prefetch_line, DataKey, MacKey, SivKey};
use crate::errors::{KmsError, KmsResult};
use pgrx::pg_sys;
use std::cell::Cell;
use std::rc::Rc;

pub use crate::core::states::State;

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
/// The hot indexes of the cache point straight at it (see [`with_version`](super::with_version),
/// [`with_primary`](super::with_primary)).
#[repr(C, align(64))]
pub struct CachedVersion {
    pub(super) key: DataKey,
    // In the GHASH key's line (see `hot_fields_share_the_ghash_line`).
    pub key_id: u32,
    pub number: u32,
    /// Last grant decision: (user, bits). See [`CachedVersion::check`].
    pub(super) seen: Cell<(pg_sys::Oid, u8)>,
    /// Counts not yet added to `stat` (see [`CachedVersion::count_encryption`]).
    pub(super) pending_enc: Cell<u32>,
    pub(super) pending_dec: Cell<u32>,
    /// Encryptions that may still be counted locally before the next flush
    /// (fewer when the nonce-budget warning level is near).
    pub(super) enc_budget: Cell<u32>,
    /// Whether the key has grants (else any kms_user may use it).
    pub(super) has_grants: bool,
    /// Whether uses are counted (the library is preloaded).
    pub(super) counted: bool,
    /// Listed for the end-of-transaction flush.
    pub(super) dirty: Cell<bool>,
    pub(super) name_len: u8,
    // Next line.
    pub(super) name: [u8; NAME_MAX],
    // Slow paths only.
    /// Shared-memory counters (None without preload).
    pub(super) stat: Option<&'static crate::pg::shmem::StatSlot>,
    /// Of the pending counts, those that were a rewrap or a secret read
    /// (counted as that in the access audit, not as a decryption or an
    /// encryption; see [`CachedVersion::count_as`]).
    pub(super) unaudited_enc: Cell<u32>,
    pub(super) unaudited_dec: Cell<u32>,
    pub(super) grants: Rc<Grants>,
    /// AES-SIV key for deterministic encryption under this version.
    pub det: SivKey,
}

/// A version as the catalog lists it; `usable` is None once it is disabled
/// or destroyed.
pub(super) struct VersionInfo {
    pub(super) state: State,
    pub(super) usable: Option<Box<CachedVersion>>,
}

pub(super) use crate::crypto::names::KEY_NAME_MAX as NAME_MAX;

pub struct CachedKey {
    pub id: u32,
    pub name: String,
    pub primary: u32,
    /// Indexed by version - 1 (versions are dense from 1).
    pub(super) versions: Vec<Option<VersionInfo>>,
    /// Blind-index key of the key name (None once the key is destroyed).
    pub index: Option<MacKey>,
    pub(super) grants: Rc<Grants>,
}

impl CachedVersion {
    #[inline]
    pub fn data_key(&self) -> &DataKey {
        &self.key
    }

    /// This version's key in the hot index (and the dirty list).
    #[inline]
    pub(super) fn slot(&self) -> u64 {
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
    pub(super) fn prefetch(v: *const CachedVersion, with_name: bool) {
        let base = v as *const u8;
        // The schedule's GHASH line also holds the per-row fields.
        DataKey::prefetch_schedule(base.wrapping_add(std::mem::offset_of!(CachedVersion, key)));
        if with_name {
            prefetch_line(base.wrapping_add(std::mem::offset_of!(CachedVersion, name)));
        }
    }
}

impl CachedKey {
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
                state: v.state,
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

    /// The versions that may open values (active and decrypt-only), in
    /// version order; disabled and destroyed ones are not among them.
    pub fn usable_versions(&self) -> impl Iterator<Item = &CachedVersion> {
        self.versions
            .iter()
            .flatten()
            .filter_map(|v| v.usable.as_deref())
    }
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
