//! Catalog integrity: MACs on the key-state rows, bound to the audit
//! chain.
//!
//! Keys derived from the master key (src/crypto/integrity.rs):
//! * the audit-chain key MACs each audit row's chain hash, which commits to
//!   every earlier row;
//! * the catalog-row key MACs kms.keyring, kms.keys and kms.key_versions.
//!   A key's rows are bound to its generation: the id of the audit row of
//!   its latest change (or of the latest keyring-wide act), so a saved row
//!   put back is older than the trail and refused.
//!
//! Checked on every cold load of a key ([`super::load`]) and by every act on
//! the rows it reads; never on the per-row path.

use super::audit::{append, read_audit, Act};
use crate::crypto::integrity;
use crate::crypto::{IntegrityKeys, MasterKey};
use crate::errors::{KmsError, KmsResult};
use crate::keys::{self, Which};
use crate::pg::datum::RawText;
use crate::pg::spi;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::rc::Rc;

pub(crate) const WHY_MAC: &str = "Its MAC does not verify under the master key.";
pub(crate) const WHY_STALE: &str = "It is older than the key's latest change recorded in the audit chain: a saved row was put back.";
pub(crate) const WHY_CUT: &str =
    "It is newer than the audit chain: the audit rows recording its latest change were removed.";
pub(crate) const WHY_TRAIL: &str =
    "The audit row that records the key's latest change does not verify under the master key.";

/// Acts that change a key's rows: the latest one is the key's generation.
pub(crate) const KEY_OPS: &str =
    "'create_key', 'rotate_key', 'set_primary', 'disable_key_version', 'enable_key_version', 'destroy_key_version', 'destroy_key', 'import_key'";

pub(crate) const KEY_ROW_SQL: &str =
    "SELECT key_id, key_name, primary_version, (EXTRACT(epoch FROM destroyed_at) * 1000000)::int8,
        index_key, generation, row_mac FROM kms.keys";
pub(crate) const VERSION_ROW_SQL: &str =
    "SELECT version, state, wrapped_key, row_mac FROM kms.key_versions";
pub(crate) const AUDIT_SQL: &str = "SELECT id, prev_hash, hash, mac, key_fp, (EXTRACT(epoch FROM at) * 1000000)::int8,
        pg_catalog.convert_to(actor, 'UTF8'), pg_catalog.convert_to(operation, 'UTF8'),
        pg_catalog.convert_to(key_name, 'UTF8'), version, pg_catalog.convert_to(reason, 'UTF8'),
        pg_catalog.convert_to(detail, 'UTF8'),
        CASE WHEN mac IS NULL THEN kms.audit_row_hash(prev_hash, id, at, actor, operation, key_name, version, reason) END,
        pg_catalog.convert_to(role, 'UTF8')
   FROM kms.audit_log";

pub(crate) fn altered(what: String, why: &'static str) -> KmsError {
    KmsError::CatalogAltered { what, why }
}

pub(crate) fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) type Row<'a> = pgrx::spi::SpiHeapTupleData<'a>;

/// A `kms.keys` row as its MAC covers it.
pub(crate) struct KeyCheck<'a> {
    pub key_id: i32,
    pub name: &'a str,
    pub primary: i32,
    pub destroyed_us: Option<i64>,
    pub index_key: Option<&'a [u8]>,
    pub generation: i64,
    pub mac: Option<&'a [u8]>,
}

/// A `kms.key_versions` row as its MAC covers it.
pub(crate) struct VersionCheck<'a> {
    pub version: i32,
    pub state: &'a str,
    pub wrapped: Option<&'a [u8]>,
    pub mac: Option<&'a [u8]>,
}

pub(crate) struct KeyRowData {
    pub(crate) key_id: i32,
    pub(crate) name: String,
    pub(crate) primary: i32,
    pub(crate) destroyed_us: Option<i64>,
    pub(crate) index_key: Option<Vec<u8>>,
    pub(crate) generation: i64,
    pub(crate) mac: Option<Vec<u8>>,
}

impl KeyRowData {
    pub(crate) fn read(r: &Row<'_>) -> Result<KeyRowData, pgrx::spi::Error> {
        Ok(KeyRowData {
            key_id: r.get::<i32>(1)?.unwrap_or(0),
            name: r.get::<String>(2)?.unwrap_or_default(),
            primary: r.get::<i32>(3)?.unwrap_or(0),
            destroyed_us: r.get::<i64>(4)?,
            index_key: r.get::<Vec<u8>>(5)?,
            generation: r.get::<i64>(6)?.unwrap_or(0),
            mac: r.get::<Vec<u8>>(7)?,
        })
    }

    pub(crate) fn check(&self) -> KeyCheck<'_> {
        KeyCheck {
            key_id: self.key_id,
            name: &self.name,
            primary: self.primary,
            destroyed_us: self.destroyed_us,
            index_key: self.index_key.as_deref(),
            generation: self.generation,
            mac: self.mac.as_deref(),
        }
    }
}

pub(crate) struct VersionRowData {
    pub(crate) version: i32,
    pub(crate) state: String,
    pub(crate) wrapped: Option<Vec<u8>>,
    pub(crate) mac: Option<Vec<u8>>,
}

impl VersionRowData {
    pub(crate) fn read(r: &Row<'_>) -> Result<VersionRowData, pgrx::spi::Error> {
        Ok(VersionRowData {
            version: r.get::<i32>(1)?.unwrap_or(0),
            state: r.get::<String>(2)?.unwrap_or_default(),
            wrapped: r.get::<Vec<u8>>(3)?,
            mac: r.get::<Vec<u8>>(4)?,
        })
    }

    pub(crate) fn check(&self) -> VersionCheck<'_> {
        VersionCheck {
            version: self.version,
            state: &self.state,
            wrapped: self.wrapped.as_deref(),
            mac: self.mac.as_deref(),
        }
    }
}

/// A key's row and its versions' rows: read-write (it sees what the act
/// just changed) or read-only (kms_audit_log_check, a stable function).
pub(crate) fn key_rows(key_id: i32, write: bool) -> KmsResult<(KeyRowData, Vec<VersionRowData>)> {
    type Rows = Option<(KeyRowData, Vec<VersionRowData>)>;
    let (key_q, versions_q) = (
        format!("{KEY_ROW_SQL} WHERE key_id = $1"),
        format!("{VERSION_ROW_SQL} WHERE key_id = $1 ORDER BY version"),
    );
    let versions =
        |t: pgrx::spi::SpiTupleTable<'_>| -> Result<Vec<VersionRowData>, pgrx::spi::Error> {
            t.map(|r| VersionRowData::read(&r)).collect()
        };
    let args = [key_id.into()];
    if write {
        Spi::connect_mut(|c| -> Result<Rows, pgrx::spi::Error> {
            let Some(r) = c.update(&key_q, Some(1), &args)?.next() else {
                return Ok(None);
            };
            let key = KeyRowData::read(&r)?;
            Ok(Some((key, versions(c.update(&versions_q, None, &args)?)?)))
        })
    } else {
        Spi::connect(|c| -> Result<Rows, pgrx::spi::Error> {
            let Some(r) = c.select(&key_q, Some(1), &args)?.next() else {
                return Ok(None);
            };
            let key = KeyRowData::read(&r)?;
            Ok(Some((key, versions(c.select(&versions_q, None, &args)?)?)))
        })
    }
    .map_err(KmsError::spi)?
    .ok_or(KmsError::UnknownKeyId(key_id as u32))
}

pub(crate) fn key_mac(k: &KeyCheck<'_>) -> Vec<u8> {
    integrity::key_row(
        k.key_id,
        k.name.as_bytes(),
        k.primary,
        k.destroyed_us,
        k.index_key,
        k.generation,
    )
}

pub(crate) fn version_mac(k: &KeyCheck<'_>, v: &VersionCheck<'_>) -> Vec<u8> {
    integrity::version_row(
        k.key_id,
        v.version,
        v.state.as_bytes(),
        v.wrapped,
        k.generation,
    )
}

/// Sets a key's generation and re-MACs its row and its versions' rows.
pub(crate) fn reseal_key(keys: &IntegrityKeys, key_id: i32, generation: i64) -> KmsResult<()> {
    spi::exec(
        "UPDATE kms.keys SET generation = $2 WHERE key_id = $1",
        &[key_id.into(), generation.into()],
    )?;
    let (key, versions) = key_rows(key_id, true)?;
    let k = key.check();
    spi::exec(
        "UPDATE kms.keys SET row_mac = $2 WHERE key_id = $1",
        &[key_id.into(), keys.row.hmac(&key_mac(&k)).to_vec().into()],
    )?;
    for v in &versions {
        let mac = keys.row.hmac(&version_mac(&k, &v.check()));
        spi::exec(
            "UPDATE kms.key_versions SET row_mac = $3 WHERE key_id = $1 AND version = $2",
            &[key_id.into(), v.version.into(), mac.to_vec().into()],
        )?;
    }
    Ok(())
}

pub(crate) fn all_key_ids() -> KmsResult<Vec<i32>> {
    Spi::connect(|c| -> Result<Vec<i32>, pgrx::spi::Error> {
        let mut out = Vec::new();
        for r in c.select("SELECT key_id FROM kms.keys ORDER BY 1", None, &[])? {
            out.push(r.get::<i32>(1)?.unwrap_or(0));
        }
        Ok(out)
    })
    .map_err(KmsError::spi)
}

pub(crate) fn reseal_all(keys: &IntegrityKeys, generation: i64) -> KmsResult<()> {
    for id in all_key_ids()? {
        reseal_key(keys, id, generation)?;
    }
    Ok(())
}

/// Checks every key's rows under `keys` (before a master-key rotation
/// re-MACs them under the new key).
pub(crate) fn verify_all_keys(keys: &IntegrityKeys, fp: &[u8]) -> KmsResult<()> {
    for id in all_key_ids()? {
        let (key, versions) = key_rows(id, false)?;
        let vs: Vec<VersionCheck<'_>> = versions.iter().map(VersionRowData::check).collect();
        verify_with(keys, fp, &key.check(), &vs)?;
    }
    Ok(())
}

/// The keyring row: fingerprint, MACs on since (microseconds), its MAC.
pub(crate) struct KeyringRow {
    pub(crate) fp: Vec<u8>,
    pub(crate) since_us: Option<i64>,
    pub(crate) mac: Option<Vec<u8>>,
}

pub(crate) fn read_keyring(lock: bool) -> KmsResult<Option<KeyringRow>> {
    let q = format!(
        "SELECT master_key_fingerprint, (EXTRACT(epoch FROM integrity_since) * 1000000)::int8, row_mac FROM kms.keyring{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let first =
        |mut t: pgrx::spi::SpiTupleTable<'_>| -> Result<Option<KeyringRow>, pgrx::spi::Error> {
            let Some(r) = t.next() else { return Ok(None) };
            Ok(Some(KeyringRow {
                fp: r.get::<Vec<u8>>(1)?.unwrap_or_default(),
                since_us: r.get::<i64>(2)?,
                mac: r.get::<Vec<u8>>(3)?,
            }))
        };
    if lock {
        Spi::connect_mut(|c| first(c.update(&q, Some(1), &[])?))
    } else {
        Spi::connect(|c| first(c.select(&q, Some(1), &[])?))
    }
    .map_err(KmsError::spi)
}

/// MACs the keyring row (fingerprint, integrity_since) under `keys`.
pub(crate) fn seal_keyring(keys: &IntegrityKeys) -> KmsResult<()> {
    let kr = read_keyring(true)?.ok_or_else(|| KmsError::Spi("kms.keyring has no row".into()))?;
    let since = kr
        .since_us
        .ok_or_else(|| KmsError::Spi("kms.keyring.integrity_since is NULL".into()))?;
    let mac = keys.row.hmac(&integrity::keyring_row(&kr.fp, since));
    spi::exec(
        "UPDATE kms.keyring SET row_mac = $1",
        &[mac.to_vec().into()],
    )
}

/// Commits the keyring to `mk` on first use (rows MAC'd from the start),
/// locks its row and checks the commitment.
pub(crate) fn commit_keyring(mk: &MasterKey) -> KmsResult<KeyringRow> {
    let fresh = spi::one::<bool>(
        "INSERT INTO kms.keyring (singleton, master_key_fingerprint, integrity_since)
         VALUES (true, $1, pg_catalog.now()) ON CONFLICT DO NOTHING RETURNING true",
        &[mk.fingerprint().to_vec().into()],
    )?;
    if fresh.is_some() {
        seal_keyring(&mk.integrity_keys())?;
    }
    let kr = read_keyring(true)?.ok_or_else(|| KmsError::Spi("kms.keyring has no row".into()))?;
    keys::check_commitment(mk, Some(&kr.fp), Which::Current)?;
    Ok(kr)
}

/// A keyring whose row says it carries no MACs is accepted only while the
/// audit chain has no keyed row: otherwise its row was edited (or removed)
/// to get altered rows accepted or re-blessed.
pub(crate) fn refuse_unkeyed_with_keyed_chain() -> KmsResult<()> {
    if spi::read::<bool>(
        "SELECT EXISTS (SELECT 1 FROM kms.audit_log WHERE mac IS NOT NULL)",
        &[],
    )? == Some(true)
    {
        return Err(altered(
            "the kms.keyring row".into(),
            "It says key-state rows carry no MACs (or is missing), but the audit chain has keyed rows.",
        ));
    }
    Ok(())
}

/// A keyring made before rows carried MACs adopts them: every wrapped key
/// and index root must open under the KEK (their AAD binds key id and
/// version, so a swapped or edited one is refused, not blessed), then every
/// row is MAC'd and the adoption is audited in the keyed chain.
pub(crate) fn adopt(act: &Act) -> KmsResult<()> {
    refuse_unkeyed_with_keyed_chain()?;
    let material = crate::catalog::rows::all_wrapped_material()?;
    for crate::catalog::rows::WrappedRow {
        key_id,
        key_name: name,
        version,
        wrapped,
    } in &material
    {
        let opened = if *version == 0 {
            act.kek.unwrap_index_root(*key_id as u32, wrapped)
        } else {
            act.kek.unwrap_raw(*key_id as u32, *version as u32, wrapped)
        };
        opened.map_err(|_| KmsError::CatalogCorrupt {
            key: name.clone(),
            version: *version,
        })?;
    }
    // A key destroyed before destroyed_at existed: every version destroyed, no index root.
    spi::exec(
        "UPDATE kms.keys k SET destroyed_at = pg_catalog.now()
          WHERE destroyed_at IS NULL AND index_key IS NULL
            AND NOT EXISTS (SELECT 1 FROM kms.key_versions v WHERE v.key_id = k.key_id AND v.state <> 'destroyed')",
        &[],
    )?;
    spi::exec(
        "UPDATE kms.keyring SET integrity_since = pg_catalog.now()",
        &[],
    )?;
    seal_keyring(&act.keys)?;
    let keys = all_key_ids()?.len();
    let reason = RawText::from_ascii(&format!(
        "rows of {keys} keys MAC'd (keyring made before MACs)"
    ));
    let id = append(
        &act.keys,
        &act.fp,
        "adopt_integrity",
        None,
        None,
        Some(reason),
        None,
    )?;
    reseal_all(&act.keys, id)
}

/// (key source, fingerprint, keys) of a master key.
type KeysOfSource = (String, Vec<u8>, Rc<IntegrityKeys>);

thread_local! {
    /// The master key last used to check rows.
    static INTEGRITY_KEYS: RefCell<Option<KeysOfSource>> = const { RefCell::new(None) };
}

/// The integrity keys of the master key configured now, which must match
/// the keyring's fingerprint `stored_fp`; cached per backend.
pub(crate) fn integrity_keys(stored_fp: &[u8]) -> KmsResult<Rc<IntegrityKeys>> {
    let source = keys::master_key_source(Which::Current).map(|(s, _, v)| format!("{s}={v}"));
    let hit = INTEGRITY_KEYS.with(|c| match (&*c.borrow(), &source) {
        (Some((src, fp, keys)), Some(now)) if src == now && fp.as_slice() == stored_fp => {
            Some(keys.clone())
        }
        _ => None,
    });
    if let Some(keys) = hit {
        return Ok(keys);
    }
    let mk = keys::load_master_key(Which::Current)?;
    keys::check_commitment(&mk, Some(stored_fp), Which::Current)?;
    let keys = Rc::new(mk.integrity_keys());
    if let Some(src) = source {
        INTEGRITY_KEYS.with(|c| *c.borrow_mut() = Some((src, stored_fp.to_vec(), keys.clone())));
    }
    Ok(keys)
}

/// Checks a key's rows as read (keys::load, cold path; and every act
/// through lock_key): their MACs, that they are the key's latest state in
/// the audit chain, and that the audit row recording it is authentic.
/// XX001 "catalog row altered" otherwise. Caller is the catalog owner;
/// read-only (works in parallel workers and on a standby).
pub(crate) fn verify_key_rows(key: &KeyCheck<'_>, versions: &[VersionCheck<'_>]) -> KmsResult<()> {
    match read_keyring(false)? {
        Some(KeyringRow {
            fp,
            since_us: Some(since),
            mac,
        }) => {
            let keys = integrity_keys(&fp)?;
            if !mac
                .as_deref()
                .is_some_and(|m| keys.row.verify(&integrity::keyring_row(&fp, since), m))
            {
                return Err(altered("the kms.keyring row".into(), WHY_MAC));
            }
            verify_with(&keys, &fp, key, versions)
        }
        _ => refuse_unkeyed_with_keyed_chain(),
    }
}

pub(crate) fn verify_with(
    keys: &IntegrityKeys,
    fp: &[u8],
    key: &KeyCheck<'_>,
    versions: &[VersionCheck<'_>],
) -> KmsResult<()> {
    let whose = || format!("the kms.keys row of key \"{}\"", key.name);
    if !key.mac.is_some_and(|m| keys.row.verify(&key_mac(key), m)) {
        return Err(altered(whose(), WHY_MAC));
    }
    for v in versions {
        if !v
            .mac
            .is_some_and(|m| keys.row.verify(&version_mac(key, v), m))
        {
            return Err(altered(
                format!(
                    "the kms.key_versions row of version {} of key \"{}\"",
                    v.version, key.name
                ),
                WHY_MAC,
            ));
        }
    }
    let latest = spi::read::<i64>(
        &format!(
            "SELECT GREATEST((SELECT max(id) FROM kms.audit_log WHERE key_name = $1 AND operation IN ({KEY_OPS})),
                             (SELECT max(id) FROM kms.audit_log WHERE operation IN ('rotate_master_key', 'adopt_integrity')))"
        ),
        &[key.name.into()],
    )?;
    match latest {
        Some(l) if l == key.generation => {}
        Some(l) if l > key.generation => return Err(altered(whose(), WHY_STALE)),
        _ => return Err(altered(whose(), WHY_CUT)),
    }
    let authentic = read_audit(Some(key.generation))?.first().is_some_and(|r| {
        r.key_fp.as_deref() == Some(fp)
            && r.content_ok()
            && r.mac
                .as_deref()
                .is_some_and(|m| keys.audit.verify(&r.hash, m))
    });
    if !authentic {
        return Err(altered(whose(), WHY_TRAIL));
    }
    Ok(())
}
