//! One keyring across clusters: `kms_keyring_export()` and
//! `kms_keyring_import(doc)`.
//!
//! The export is a jsonb document of the keyring's wrapped material (every
//! key's id, name, primary version, destroyed flag, wrapped blind-index
//! root, and every version's state and wrapped data key; never a plaintext
//! key, never grants or schedules), MAC'd under a key derived from the
//! master key ([`crate::crypto::export`]). Exporting is an act of its own
//! (audited as `export_keyring`; the document names the audit row's id, so
//! documents of one source are ordered).
//!
//! The import applies a document in one transaction, as a lifecycle act:
//! it refuses a document made under another master key (55000), an
//! altered one (XX001), an older one than the last imported from the same
//! source (55000), a key id or name that names another key here (42710),
//! and a key whose copy here was changed locally (55000: a version the
//! source does not have, different wrapped material, a destroyed version
//! or key the document would revive). Otherwise it creates the missing keys
//! and versions, applies state changes (rotation, set primary, disable,
//! enable, destroy of a version or a whole key: erasure propagates, with
//! the erased material's MACs as receipts), records one `import_key` row
//! per changed key (re-MACing its rows under that generation) and one
//! `import_keyring` row, and invalidates every backend's key cache
//! (through [`lifecycle`]). Importing the same document again changes
//! nothing (it is audited again). Keys of this keyring that the document
//! does not name are left alone. Wrapped copies that differ in bytes but
//! open under this KEK to the same key (both sides ran
//! `kms_rotate_master_key`, each with its own nonces) are the same key: the
//! source's bytes are adopted. The source schedules rotations: an imported
//! key's `rotation_period` is cleared here, so this worker never rotates it.

use super::*;
use crate::crypto::export::{Export, ExportedKey, ExportedVersion, FORMAT};
use crate::crypto::integrity;
use crate::crypto::kdf::WRAPPED_LEN;
use crate::keys::audit::{append, begin_act, Act};
use crate::keys::integrity::{hex_of, key_rows, verify_all_keys};
use crate::pg::spi;
use serde_json::{json, Map, Value};

/// The body of SQL `kms_keyring_export()`.
pub fn keyring_export() -> pgrx::JsonB {
    pgrx::JsonB(lifecycle(export))
}

/// The body of SQL `kms_keyring_import()`.
pub fn keyring_import(doc: pgrx::JsonB) -> pgrx::JsonB {
    pgrx::JsonB(lifecycle(|| import(&doc.0)))
}

/// `<system identifier>/<database>` of this database.
fn source_here() -> KmsResult<String> {
    Ok(spi::one::<String>(
        "SELECT (SELECT system_identifier FROM pg_catalog.pg_control_system())::pg_catalog.text
                || '/' || pg_catalog.current_database()",
        &[],
    )?
    .unwrap_or_default())
}

fn export() -> KmsResult<Value> {
    let act = begin_act()?;
    // Never export rows altered behind pg_kms's back.
    verify_all_keys(&act.keys, &act.fp)?;
    let mut keys = Vec::new();
    for id in crate::keys::integrity::all_key_ids()? {
        let (k, versions) = key_rows(id, false)?;
        keys.push(ExportedKey {
            key_id: k.key_id,
            name: k.name,
            primary: k.primary,
            destroyed: k.destroyed_us.is_some(),
            index_key: k.index_key,
            versions: versions
                .into_iter()
                .map(|v| ExportedVersion {
                    version: v.version,
                    state: v.state,
                    wrapped: v.wrapped,
                })
                .collect(),
        });
    }
    let source = source_here()?;
    let head_id = append(
        &act.keys,
        &act.fp,
        "export_keyring",
        None,
        None,
        None,
        Some(&json!({ "keys": keys.len() }).to_string()),
    )?;
    let e = Export {
        fingerprint: act.fp.to_vec(),
        source,
        head_id,
        keys,
    };
    let mac = act.keys.export.hmac(&e.canonical());
    Ok(to_json(&e, &mac))
}

fn opt_hex(b: &Option<Vec<u8>>) -> Value {
    b.as_deref()
        .map_or(Value::Null, |b| Value::String(hex_of(b)))
}

fn to_json(e: &Export, mac: &[u8]) -> Value {
    let keys: Vec<Value> = e
        .keys
        .iter()
        .map(|k| {
            json!({
                "key_id": k.key_id,
                "key_name": k.name,
                "primary_version": k.primary,
                "destroyed": k.destroyed,
                "index_key": opt_hex(&k.index_key),
                "versions": k.versions.iter().map(|v| json!({
                    "version": v.version,
                    "state": v.state,
                    "wrapped_key": opt_hex(&v.wrapped),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "format": FORMAT,
        "master_key_fingerprint": hex_of(&e.fingerprint),
        "source": e.source,
        "head_id": e.head_id,
        "keys": keys,
        "mac": hex_of(mac),
    })
}

fn bad(why: impl Into<String>) -> KmsError {
    KmsError::ExportMalformed(why.into())
}

fn unhex(s: &str, what: &str) -> KmsResult<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return Err(bad(format!("{what} is not hex")));
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    b.chunks(2)
        .map(|p| Some(nib(p[0])? << 4 | nib(p[1])?))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| bad(format!("{what} is not lower-case hex")))
}

fn field<'a>(o: &'a Map<String, Value>, name: &str) -> KmsResult<&'a Value> {
    o.get(name)
        .ok_or_else(|| bad(format!("field \"{name}\" is missing")))
}

fn int_field(o: &Map<String, Value>, name: &str) -> KmsResult<i64> {
    field(o, name)?
        .as_i64()
        .ok_or_else(|| bad(format!("field \"{name}\" is not an integer")))
}

fn i32_field(o: &Map<String, Value>, name: &str) -> KmsResult<i32> {
    i32::try_from(int_field(o, name)?)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| bad(format!("field \"{name}\" is out of range")))
}

fn str_field<'a>(o: &'a Map<String, Value>, name: &str) -> KmsResult<&'a str> {
    field(o, name)?
        .as_str()
        .ok_or_else(|| bad(format!("field \"{name}\" is not a string")))
}

fn opt_wrapped(o: &Map<String, Value>, name: &str) -> KmsResult<Option<Vec<u8>>> {
    match field(o, name)? {
        Value::Null => Ok(None),
        Value::String(s) => {
            let b = unhex(s, name)?;
            if b.len() != WRAPPED_LEN {
                return Err(bad(format!("field \"{name}\" has the wrong length")));
            }
            Ok(Some(b))
        }
        _ => Err(bad(format!("field \"{name}\" is not a string or null"))),
    }
}

/// The document as a typed value and its MAC (structure only: nothing is
/// trusted before the MAC is checked).
fn parse(doc: &Value) -> KmsResult<(Export, Vec<u8>)> {
    let o = doc.as_object().ok_or_else(|| bad("not a JSON object"))?;
    if str_field(o, "format")? != FORMAT {
        return Err(bad(format!("its format is not \"{FORMAT}\"")));
    }
    let mut keys = Vec::new();
    for k in field(o, "keys")?
        .as_array()
        .ok_or_else(|| bad("field \"keys\" is not an array"))?
    {
        let k = k.as_object().ok_or_else(|| bad("a key is not an object"))?;
        let name = str_field(k, "key_name")?.to_string();
        crate::crypto::names::key_name(name.as_bytes()).map_err(|_| bad("invalid key name"))?;
        let mut versions = Vec::new();
        for v in field(k, "versions")?
            .as_array()
            .ok_or_else(|| bad("field \"versions\" is not an array"))?
        {
            let v = v
                .as_object()
                .ok_or_else(|| bad("a version is not an object"))?;
            let state = str_field(v, "state")?.to_string();
            if !["active", "decrypt_only", "disabled", "destroyed"].contains(&state.as_str()) {
                return Err(bad("unknown version state"));
            }
            let wrapped = opt_wrapped(v, "wrapped_key")?;
            if (state == "destroyed") != wrapped.is_none() {
                return Err(bad(
                    "a version's wrapped key must be null exactly when it is destroyed",
                ));
            }
            versions.push(ExportedVersion {
                version: i32_field(v, "version")?,
                state,
                wrapped,
            });
        }
        keys.push(ExportedKey {
            key_id: i32_field(k, "key_id")?,
            name,
            primary: i32_field(k, "primary_version")?,
            destroyed: field(k, "destroyed")?
                .as_bool()
                .ok_or_else(|| bad("field \"destroyed\" is not a boolean"))?,
            index_key: opt_wrapped(k, "index_key")?,
            versions,
        });
    }
    let e = Export {
        fingerprint: unhex(
            str_field(o, "master_key_fingerprint")?,
            "master_key_fingerprint",
        )?,
        source: str_field(o, "source")?.to_string(),
        head_id: int_field(o, "head_id")?,
        keys,
    };
    let mac = unhex(str_field(o, "mac")?, "mac")?;
    Ok((e, mac))
}

/// What an import did.
#[derive(Default)]
struct Summary {
    created: Vec<String>,
    updated: Vec<String>,
    unchanged: usize,
}

fn import(doc: &Value) -> KmsResult<Value> {
    let (e, mac) = parse(doc)?;
    let act = begin_act()?;
    if e.fingerprint.as_slice() != act.fp.as_slice() {
        return Err(KmsError::ExportOtherMasterKey);
    }
    if !act.keys.export.verify(&e.canonical(), &mac) {
        return Err(KmsError::ExportAltered);
    }
    // Documents of one source apply in order: never an older one over a
    // newer one (it would revive what the newer one destroyed).
    let last = spi::one::<i64>(
        "SELECT max(CASE WHEN operation = 'import_keyring' AND detail IS NOT NULL
                         THEN (detail::jsonb ->> 'head_id')::int8 END)
           FROM kms.audit_log
          WHERE operation = 'import_keyring' AND key_fp IS NOT NULL
            AND (CASE WHEN operation = 'import_keyring' AND detail IS NOT NULL
                      THEN detail::jsonb ->> 'source' END) = $1",
        &[e.source.as_str().into()],
    )?;
    if let Some(last) = last.filter(|l| *l > e.head_id) {
        return Err(KmsError::ExportStale {
            what: format!(
                "it was exported at audit row {} of {}, and this keyring already imported the export of row {last}",
                e.head_id, e.source
            ),
        });
    }
    let mut s = Summary::default();
    for k in &e.keys {
        match apply_key(&act, k, &e)? {
            Applied::Created => s.created.push(k.name.clone()),
            Applied::Updated => s.updated.push(k.name.clone()),
            Applied::Unchanged => s.unchanged += 1,
        }
    }
    let detail = json!({
        "source": e.source,
        "head_id": e.head_id,
        "created": s.created,
        "updated": s.updated,
        "unchanged": s.unchanged,
    });
    append(
        &act.keys,
        &act.fp,
        "import_keyring",
        None,
        None,
        None,
        Some(&detail.to_string()),
    )?;
    Ok(detail)
}

enum Applied {
    Created,
    Updated,
    Unchanged,
}

/// Checks that wrapped material opens under this KEK (it is MAC'd by a
/// holder of the master key, but a version is never inserted unchecked).
fn check_material(act: &Act, k: &ExportedKey) -> KmsResult<()> {
    if let Some(root) = &k.index_key {
        act.kek
            .unwrap_index_root(k.key_id as u32, root)
            .map_err(|_| KmsError::CatalogCorrupt {
                key: k.name.clone(),
                version: 0,
            })?;
    }
    for v in &k.versions {
        if let Some(w) = &v.wrapped {
            act.kek
                .unwrap_raw(k.key_id as u32, v.version as u32, w)
                .map_err(|_| KmsError::CatalogCorrupt {
                    key: k.name.clone(),
                    version: v.version,
                })?;
        }
    }
    if !k.versions.iter().any(|v| v.version == k.primary) {
        return Err(bad(format!(
            "key \"{}\" has no row for its primary version",
            k.name
        )));
    }
    Ok(())
}

/// Whether two wrapped copies hold the same key: the same bytes, or both
/// open under this KEK to the same key (each side re-wrapped it with its
/// own nonce in a master-key rotation).
fn same_material(act: &Act, key_id: i32, version: i32, a: &[u8], b: &[u8]) -> KmsResult<bool> {
    if a == b {
        return Ok(true);
    }
    let open = |w: &[u8]| {
        if version == 0 {
            act.kek.unwrap_index_root(key_id as u32, w)
        } else {
            act.kek.unwrap_raw(key_id as u32, version as u32, w)
        }
    };
    match (open(a), open(b)) {
        // Constant time: compare every byte.
        (Ok(x), Ok(y)) => Ok(x.iter().zip(y.iter()).fold(0u8, |d, (p, q)| d | (p ^ q)) == 0),
        _ => Ok(false),
    }
}

fn material_mac(act: &Act, key_id: i32, version: i32, wrapped: &[u8]) -> String {
    hex_of(
        &act.keys
            .row
            .hmac(&integrity::destroyed_material(key_id, version, wrapped)),
    )
}

fn apply_key(act: &Act, k: &ExportedKey, e: &Export) -> KmsResult<Applied> {
    check_material(act, k)?;
    let by_name = spi::one::<i32>(
        "SELECT key_id FROM kms.keys WHERE key_name = $1 FOR UPDATE",
        &[k.name.as_str().into()],
    )?;
    let by_id = spi::one::<String>(
        "SELECT key_name FROM kms.keys WHERE key_id = $1 FOR UPDATE",
        &[k.key_id.into()],
    )?;
    let reason = RawText::from_ascii("keyring import");
    match (by_name, by_id) {
        (Some(id), _) if id != k.key_id => Err(KmsError::KeyCollision {
            name: k.name.clone(),
            why: format!(
                "a different key of that name exists here (key id {id}, the export's is {})",
                k.key_id
            ),
        }),
        (None, Some(other)) => Err(KmsError::KeyCollision {
            name: k.name.clone(),
            why: format!("its key id {} names key \"{other}\" here", k.key_id),
        }),
        (None, None) => {
            spi::exec(
                "INSERT INTO kms.keys (key_id, key_name, primary_version, index_key, destroyed_at)
                 VALUES ($1, $2, $3, $4, CASE WHEN $5 THEN pg_catalog.now() END)",
                &[
                    k.key_id.into(),
                    k.name.as_str().into(),
                    k.primary.into(),
                    k.index_key.clone().into(),
                    k.destroyed.into(),
                ],
            )?;
            for v in &k.versions {
                insert_version(k.key_id, v)?;
            }
            let row = KeyRow {
                id: k.key_id,
                name: k.name.clone(),
                primary: k.primary,
                destroyed: k.destroyed,
            };
            let detail = json!({ "import": e.source, "head_id": e.head_id, "created": true,
                                 "versions": k.versions.len(), "destroyed": k.destroyed });
            record(
                act,
                "import_key",
                &row,
                Some(k.primary),
                Some(reason),
                Some(&detail.to_string()),
            )?;
            Ok(Applied::Created)
        }
        (Some(_), _) => update_key(act, k, e, reason),
    }
}

fn update_key(act: &Act, k: &ExportedKey, e: &Export, reason: RawText) -> KmsResult<Applied> {
    // Locks the rows and checks their MACs (XX001 if altered here).
    let local = lock_key(&k.name)?;
    let (krow, versions) = key_rows(k.key_id, true)?;
    let diverged = |why: String| KmsError::KeyDiverged {
        key: k.name.clone(),
        why,
    };
    let stale = |what: String| KmsError::ExportStale { what };
    if local.destroyed && !k.destroyed {
        return Err(stale(format!(
            "key \"{}\" is destroyed here and not in the export",
            k.name
        )));
    }
    let mut changes = Vec::new();
    let mut receipts = Vec::new();
    if let (Some(here), Some(there)) = (&krow.index_key, &k.index_key) {
        if !same_material(act, k.key_id, 0, here, there)? {
            return Err(diverged("its blind-index root differs".into()));
        }
        if here != there {
            // The same root, wrapped again (a master-key rotation on both sides).
            spi::exec(
                "UPDATE kms.keys SET index_key = $2 WHERE key_id = $1",
                &[k.key_id.into(), there.clone().into()],
            )?;
            changes.push(json!({ "index_key": "rewrapped" }));
        }
    }
    let find = |n: i32| versions.iter().find(|v| v.version == n);
    for v in &versions {
        if !k.versions.iter().any(|x| x.version == v.version) {
            return Err(diverged(format!(
                "version {} exists here but not in the export",
                v.version
            )));
        }
    }
    for v in &k.versions {
        let Some(here) = find(v.version) else {
            insert_version(k.key_id, v)?;
            changes.push(json!({ "version": v.version, "added": v.state }));
            continue;
        };
        match (&here.wrapped, &v.wrapped) {
            (None, Some(_)) => {
                return Err(stale(format!(
                    "version {} of key \"{}\" is destroyed here and not in the export",
                    v.version, k.name
                )))
            }
            (Some(a), Some(b)) => {
                if !same_material(act, k.key_id, v.version, a, b)? {
                    return Err(diverged(format!(
                        "version {} has different key material here",
                        v.version
                    )));
                }
                if here.state == v.state && a == b {
                    continue;
                }
            }
            (Some(a), None) => receipts.push(json!({
                "version": v.version,
                "material_mac": material_mac(act, k.key_id, v.version, a),
            })),
            (None, None) => continue,
        }
        spi::exec(
            "UPDATE kms.key_versions SET state = $3, wrapped_key = $4,
                    state_changed_at = CASE WHEN state = $3 THEN state_changed_at ELSE pg_catalog.now() END
              WHERE key_id = $1 AND version = $2",
            &[
                k.key_id.into(),
                v.version.into(),
                v.state.as_str().into(),
                v.wrapped.clone().into(),
            ],
        )?;
        changes.push(if here.state == v.state {
            json!({ "version": v.version, "wrapped_key": "rewrapped" })
        } else {
            json!({ "version": v.version, "from": here.state, "to": v.state })
        });
    }
    if krow.primary != k.primary {
        spi::exec(
            "UPDATE kms.keys SET primary_version = $2 WHERE key_id = $1",
            &[k.key_id.into(), k.primary.into()],
        )?;
        changes.push(json!({ "primary_version": k.primary }));
    }
    if k.destroyed && !local.destroyed {
        if let Some(root) = &krow.index_key {
            receipts.push(
                json!({ "version": 0, "material_mac": material_mac(act, k.key_id, 0, root) }),
            );
        }
        spi::exec(
            "UPDATE kms.keys SET index_key = NULL, destroyed_at = pg_catalog.now() WHERE key_id = $1",
            &[k.key_id.into()],
        )?;
        changes.push(json!({ "destroyed": true }));
    }
    // The source schedules rotations of the keys it exports: a scheduled
    // rotation here would diverge from it. (An export imported where it
    // was made keeps its schedule.)
    if e.source != source_here()?
        && spi::one::<bool>(
        "UPDATE kms.keys SET rotation_period = NULL WHERE key_id = $1 AND rotation_period IS NOT NULL RETURNING true",
        &[k.key_id.into()],
        )?
        .is_some()
    {
        changes.push(json!({ "rotation_period": null }));
    }
    if changes.is_empty() {
        return Ok(Applied::Unchanged);
    }
    let mut detail = json!({ "import": e.source, "head_id": e.head_id, "changes": changes });
    if !receipts.is_empty() {
        detail["receipt"] = json!("pg_kms destruction");
        detail["key_id"] = json!(k.key_id);
        detail["erased"] = json!(receipts);
    }
    let row = KeyRow {
        id: k.key_id,
        name: k.name.clone(),
        primary: k.primary,
        destroyed: k.destroyed,
    };
    record(
        act,
        "import_key",
        &row,
        Some(k.primary),
        Some(reason),
        Some(&detail.to_string()),
    )?;
    Ok(Applied::Updated)
}

/// Inserts an imported version's row (its MACs are set by the act's
/// re-MAC of the key).
fn insert_version(key_id: i32, v: &ExportedVersion) -> KmsResult<()> {
    spi::exec(
        "INSERT INTO kms.key_versions (key_id, version, state, wrapped_key) VALUES ($1, $2, $3, $4)",
        &[
            key_id.into(),
            v.version.into(),
            v.state.as_str().into(),
            v.wrapped.clone().into(),
        ],
    )
}
