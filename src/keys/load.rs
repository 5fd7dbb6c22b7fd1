//! A key-cache miss: the key's rows read as the catalog owner, their MACs
//! checked, the data keys unwrapped under the master key's KEK, and the
//! key inserted into the cache (unless an invalidation came meanwhile).

use super::cache::{current_kek, CACHE};
use super::grants::{Grants, Privilege};
use super::integrity::{verify_key_rows, KeyCheck, VersionCheck};
use super::version::{CachedKey, CachedVersion, State, VersionInfo, NAME_MAX};
use crate::catalog::{self, rows, rows::VersionRow};
use crate::crypto::derive::INFO_BLIND_INDEX;
use crate::crypto::{DataKey, MacKey, SivKey};
use crate::errors::{KmsError, KmsResult};
use pgrx::pg_sys;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

pub(super) enum Lookup<'a> {
    Name(&'a str),
    Id(u32),
}

/// Checks the MACs of a key's rows as loaded (cold path only): a row
/// edited behind pg_kms's back is refused with XX001.
fn verify_loaded(rows: &[VersionRow]) -> KmsResult<()> {
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

/// The grants of a key (caller is the catalog owner): see
/// [`crate::catalog::rows::key_grant_rows`] for when a grant applies.
fn load_grants(key_id: i32) -> KmsResult<Grants> {
    let rows = crate::catalog::rows::key_grant_rows(key_id)?;
    Ok(Grants {
        restricted: !rows.is_empty(),
        list: rows
            .into_iter()
            .filter_map(|(p, role)| Some((Privilege::parse(&p)?, role?)))
            .collect(),
        decisions: RefCell::new(HashMap::new()),
    })
}

/// A usable version with its key schedules, built in a frame of its own
/// (never inlined) so that the stack copies the build leaves (round keys,
/// H, the struct before its move into the box) lie below `load`'s frame,
/// where `load` wipes them.
#[inline(never)]
fn new_version(
    key: &CachedKey,
    version: u32,
    raw: &zeroize::Zeroizing<[u8; 32]>,
    name_len: usize,
    name: [u8; NAME_MAX],
) -> Box<CachedVersion> {
    let stat = crate::pg::shmem::stat_slot(key.id, version);
    Box::new(CachedVersion {
        key: DataKey::new(raw),
        key_id: key.id,
        number: version,
        seen: Cell::new((pg_sys::InvalidOid, 0)),
        pending_enc: Cell::new(0),
        pending_dec: Cell::new(0),
        enc_budget: Cell::new(0),
        has_grants: key.has_grants(),
        // Counted whenever preloaded: the access audit does not
        // depend on a usage-counter slot being free.
        counted: crate::pg::preloaded(),
        dirty: Cell::new(false),
        name_len: name_len as u8,
        name,
        stat,
        unaudited_enc: Cell::new(0),
        unaudited_dec: Cell::new(0),
        grants: key.grants.clone(),
        det: SivKey::derive(raw.as_ref()),
    })
}

pub(super) fn load(lookup: Lookup<'_>) -> KmsResult<Rc<CachedKey>> {
    let gen_before = catalog::generation();
    let (rows, stored_fp, grants) = catalog::as_catalog_owner(|_| {
        let rows = match lookup {
            Lookup::Name(n) => rows::key_version_rows_by_name(n)?,
            Lookup::Id(id) => rows::key_version_rows_by_id(id as i32)?,
        };
        verify_loaded(&rows)?;
        let grants = match rows.first() {
            Some(r) => load_grants(r.key_id)?,
            None => Grants {
                list: Vec::new(),
                restricted: false,
                decisions: RefCell::new(HashMap::new()),
            },
        };
        Ok((rows, rows::stored_fingerprint(false)?, grants))
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
                Some(new_version(&key, r.version as u32, &raw, name_len, name))
            }
            _ => None,
        };
        let slot = (r.version as usize).saturating_sub(1);
        if key.versions.len() <= slot {
            key.versions.resize_with(slot + 1, || None);
        }
        key.versions[slot] = Some(VersionInfo { state, usable });
    }
    // The key schedules were built, and moved into their boxes, in frames
    // below this one (new_version and what it calls): wipe what they left.
    crate::crypto::secure::wipe_stack();
    let key = Rc::new(key);
    if catalog::generation() == gen_before {
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
