//! The keyed, chained audit log: every lifecycle act appends a row whose
//! chain hash commits to every earlier row and whose MAC is keyed by the
//! master key, so the log cannot be rewritten without it. Also the
//! verification behind `kms_verify_audit_log()` and
//! `kms_audit_log_check()`.

use super::integrity::*;
use crate::crypto::integrity::{self, AuditRow};
use crate::crypto::{IntegrityKeys, Kek};
use crate::errors::{KmsError, KmsResult};
use crate::keys::{self, Which};
use crate::pg::datum::RawText;
use crate::pg::spi;
use pgrx::prelude::*;

/// Appends an audit row for an act that changes no key-state row (grants,
/// secrets). Caller is the catalog owner.
pub(crate) fn audit(
    operation: &str,
    key_name: Option<&str>,
    version: Option<i32>,
    reason: Option<RawText>,
) -> KmsResult<()> {
    let act = begin_act()?;
    append(
        &act.keys, &act.fp, operation, key_name, version, reason, None,
    )
    .map(|_| ())
}

/// What an act needs from the master key configured now: the KEK and the
/// integrity keys, with the keyring committed to that key (and, for a
/// keyring made before rows carried MACs, the MACs adopted).
pub(crate) struct Act {
    pub(crate) kek: Kek,
    pub(crate) keys: IntegrityKeys,
    pub(crate) fp: [u8; 32],
}

pub(crate) fn begin_act() -> KmsResult<Act> {
    let mk = keys::load_master_key(Which::Current)?;
    let kr = commit_keyring(&mk)?;
    let act = Act {
        kek: mk.kek(),
        keys: mk.integrity_keys(),
        fp: mk.fingerprint(),
    };
    match kr.since_us {
        Some(since) => {
            if !kr.mac.as_deref().is_some_and(|m| {
                act.keys
                    .row
                    .verify(&integrity::keyring_row(&kr.fp, since), m)
            }) {
                return Err(altered("the kms.keyring row".into(), WHY_MAC));
            }
        }
        None => adopt(&act)?,
    }
    Ok(act)
}

/// Appends one audit row to the keyed chain under `keys` (the master key
/// whose fingerprint is `fp`), updates kms.audit_head, queues NOTIFY
/// kms_events, and at commit writes the new head to the server log (row
/// id and MAC: no secret). Returns the row's id.
pub(crate) fn append(
    keys: &IntegrityKeys,
    fp: &[u8; 32],
    operation: &str,
    key_name: Option<&str>,
    version: Option<i32>,
    reason: Option<RawText>,
    detail: Option<&str>,
) -> KmsResult<i64> {
    // Self-conflicting lock: concurrent acts are chained one after another.
    spi::exec("LOCK TABLE kms.audit_log IN SHARE ROW EXCLUSIVE MODE", &[])?;
    let last = id_and_hash("SELECT id, hash FROM kms.audit_log ORDER BY id DESC LIMIT 1")?;
    let (id, prev) = match last {
        Some((id, hash)) => (id + 1, hash),
        None => (1, vec![0u8; 32]),
    };
    type Now = (
        Option<TimestampWithTimeZone>,
        i64,
        Vec<u8>,
        Option<Vec<u8>>,
        String,
        Option<Vec<u8>>,
    );
    // actor: session_user; role: current_user of the caller (the role whose
    // privileges the act used, e.g. after SET ROLE or in a SECURITY DEFINER
    // function), not the catalog owner pg_kms switched to.
    let acting = crate::pg::identity::acting_user();
    let (at, at_us, actor, reason_utf8, db, role) = Spi::connect(|c| -> Result<Now, pgrx::spi::Error> {
        let t = c.select(
            "SELECT t, (EXTRACT(epoch FROM t) * 1000000)::int8, pg_catalog.convert_to(session_user::text, 'UTF8'),
                    pg_catalog.convert_to($1, 'UTF8'), pg_catalog.quote_ident(pg_catalog.current_database()),
                    (SELECT pg_catalog.convert_to(r.rolname::text, 'UTF8') FROM pg_catalog.pg_roles r WHERE r.oid = $2)
               FROM (SELECT pg_catalog.clock_timestamp() AS t) s",
            Some(1),
            &[reason.into(), acting.into()],
        )?;
        let r = t.first();
        Ok((
            r.get::<TimestampWithTimeZone>(1)?,
            r.get::<i64>(2)?.unwrap_or(0),
            r.get::<Vec<u8>>(3)?.unwrap_or_default(),
            r.get::<Vec<u8>>(4)?,
            r.get::<String>(5)?.unwrap_or_default(),
            // As bytes: a role name need not be ASCII, nor the database UTF-8.
            r.get::<Vec<u8>>(6)?,
        ))
    })
    .map_err(KmsError::spi)?;
    let row = AuditRow {
        id,
        at_us,
        actor: &actor,
        operation: operation.as_bytes(),
        key_name: key_name.map(str::as_bytes),
        version,
        reason: reason_utf8.as_deref(),
        detail: detail.map(str::as_bytes),
        key_fp: fp,
        role: role.as_deref(),
    };
    let hash = row.chain_hash(&prev);
    let mac = keys.audit.hmac(&hash);
    spi::exec(
        "INSERT INTO kms.audit_log (id, at, actor, operation, key_name, version, reason, prev_hash, hash, detail, key_fp, mac, role)
         VALUES ($1, $2, session_user, $3, $4, $5, $6, $7, $8, $9, $10, $11,
                 (SELECT r.rolname::text FROM pg_catalog.pg_roles r WHERE r.oid = $12))",
        &[
            id.into(),
            at.into(),
            operation.into(),
            key_name.into(),
            version.into(),
            reason.into(),
            prev.into(),
            hash.to_vec().into(),
            detail.into(),
            fp.to_vec().into(),
            mac.to_vec().into(),
            acting.into(),
        ],
    )?;
    spi::exec(
        "INSERT INTO kms.audit_head (singleton, last_id, last_hash, last_mac) VALUES (true, $1, $2, $3)
         ON CONFLICT (singleton) DO UPDATE SET last_id = excluded.last_id, last_hash = excluded.last_hash, last_mac = excluded.last_mac",
        &[id.into(), hash.to_vec().into(), mac.to_vec().into()],
    )?;
    // Anyone in the database may LISTEN: the reason of a secrets-store act
    // names the secret, which kms_secret_get hides from who may not read
    // it, so it stays in the audit log only. A long reason is cut to 500
    // characters (a payload is at most 8000 bytes; the row keeps it whole).
    let notify_reason = if operation.starts_with("secret_") {
        None
    } else {
        reason
    };
    spi::exec(
        "SELECT pg_catalog.pg_notify('kms_events', pg_catalog.jsonb_build_object(
                'operation', $1::text, 'key_name', $2::text, 'version', $3::integer,
                'reason', CASE WHEN pg_catalog.char_length($4::text) > 500
                               THEN pg_catalog.left($4::text, 500) || '...' ELSE $4::text END,
                'actor', session_user::text,
                'role', (SELECT r.rolname::text FROM pg_catalog.pg_roles r WHERE r.oid = $5),
                'id', $6::int8)::text)",
        &[
            operation.into(),
            key_name.into(),
            version.into(),
            notify_reason.into(),
            acting.into(),
            id.into(),
        ],
    )?;
    let line = format!(
        "pg_kms: audit chain head of database {db}: id={id} mac={}",
        hex_of(&mac)
    );
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || {
        pgrx::log!("{line}")
    });
    Ok(id)
}

/// One audit row as stored (text fields as UTF-8 bytes).
pub(crate) struct AuditRecord {
    pub(crate) id: i64,
    pub(crate) prev: Vec<u8>,
    pub(crate) hash: Vec<u8>,
    pub(crate) mac: Option<Vec<u8>>,
    pub(crate) key_fp: Option<Vec<u8>>,
    pub(crate) at_us: i64,
    pub(crate) actor: Vec<u8>,
    pub(crate) operation: Vec<u8>,
    pub(crate) key_name: Option<Vec<u8>>,
    pub(crate) version: Option<i32>,
    pub(crate) reason: Option<Vec<u8>>,
    pub(crate) detail: Option<Vec<u8>>,
    /// kms.audit_row_hash of an unkeyed row (made before the chain was keyed).
    pub(crate) legacy_hash: Option<Vec<u8>>,
    /// current_user at the act (NULL in rows made before it was recorded).
    pub(crate) role: Option<Vec<u8>>,
}

impl AuditRecord {
    fn read(r: &Row<'_>) -> Result<AuditRecord, pgrx::spi::Error> {
        Ok(AuditRecord {
            id: r.get::<i64>(1)?.unwrap_or(0),
            prev: r.get::<Vec<u8>>(2)?.unwrap_or_default(),
            hash: r.get::<Vec<u8>>(3)?.unwrap_or_default(),
            mac: r.get::<Vec<u8>>(4)?,
            key_fp: r.get::<Vec<u8>>(5)?,
            at_us: r.get::<i64>(6)?.unwrap_or(0),
            actor: r.get::<Vec<u8>>(7)?.unwrap_or_default(),
            operation: r.get::<Vec<u8>>(8)?.unwrap_or_default(),
            key_name: r.get::<Vec<u8>>(9)?,
            version: r.get::<i32>(10)?,
            reason: r.get::<Vec<u8>>(11)?,
            detail: r.get::<Vec<u8>>(12)?,
            legacy_hash: r.get::<Vec<u8>>(13)?,
            role: r.get::<Vec<u8>>(14)?,
        })
    }

    /// Whether the stored hash is SHA-256(prev_hash || canonical row).
    pub(crate) fn content_ok(&self) -> bool {
        let row = AuditRow {
            id: self.id,
            at_us: self.at_us,
            actor: &self.actor,
            operation: &self.operation,
            key_name: self.key_name.as_deref(),
            version: self.version,
            reason: self.reason.as_deref(),
            detail: self.detail.as_deref(),
            key_fp: self.key_fp.as_deref().unwrap_or(&[]),
            role: self.role.as_deref(),
        };
        row.chain_hash(&self.prev).as_slice() == self.hash.as_slice()
    }
}

/// Audit rows in id order (or the one with id `only`). Read-only.
pub(crate) fn read_audit(only: Option<i64>) -> KmsResult<Vec<AuditRecord>> {
    Spi::connect(|c| -> Result<Vec<AuditRecord>, pgrx::spi::Error> {
        let t = match only {
            Some(id) => c.select(&format!("{AUDIT_SQL} WHERE id = $1"), None, &[id.into()])?,
            None => c.select(&format!("{AUDIT_SQL} ORDER BY id"), None, &[])?,
        };
        let mut out = Vec::new();
        for r in t {
            out.push(AuditRecord::read(&r)?);
        }
        Ok(out)
    })
    .map_err(KmsError::spi)
}

pub(crate) struct AuditCheck {
    pub(crate) rows: i64,
    pub(crate) first_bad: Option<i64>,
    pub(crate) problem: Option<String>,
    pub(crate) head_id: Option<i64>,
    pub(crate) head_mac: Option<String>,
}

/// The whole chain checked under the master key configured now. Caller is
/// the catalog owner.
pub(crate) fn check_audit_log() -> KmsResult<AuditCheck> {
    let kr = read_keyring(false)?;
    let current = match &kr {
        Some(k) => Some((k.fp.clone(), integrity_keys(&k.fp)?)),
        None => None,
    };
    let recs = read_audit(None)?;
    let last = recs.last();
    let mut out = AuditCheck {
        rows: recs.len() as i64,
        first_bad: None,
        problem: None,
        head_id: last.map(|r| r.id),
        head_mac: last.and_then(|r| r.mac.as_deref().map(hex_of)),
    };
    if let Some((id, why)) = find_problem(
        kr.as_ref(),
        current.as_ref().map(|(fp, k)| (fp.as_slice(), &**k)),
        &recs,
    )? {
        out.first_bad = id;
        out.problem = Some(why);
    }
    Ok(out)
}

pub(crate) fn find_problem(
    kr: Option<&KeyringRow>,
    current: Option<(&[u8], &IntegrityKeys)>,
    recs: &[AuditRecord],
) -> KmsResult<Option<(Option<i64>, String)>> {
    let bad = |id: i64, why: &str| Ok(Some((Some(id), format!("row {id}: {why}"))));
    let mut prev = vec![0u8; 32];
    let mut last_fp: Option<&[u8]> = None;
    let mut seen_current = false;
    for (i, r) in recs.iter().enumerate() {
        let expect = i as i64 + 1;
        if r.id != expect {
            return bad(expect, &format!("missing (the next row is {})", r.id));
        }
        if r.prev != prev {
            return bad(r.id, "prev_hash is not the hash of the row before it: rows were removed, inserted or reordered");
        }
        let op = r.operation.as_slice();
        match (&r.mac, &r.key_fp) {
            (None, _) => {
                if last_fp.is_some() {
                    return bad(r.id, "an unkeyed row after keyed rows");
                }
                if r.legacy_hash.as_deref() != Some(r.hash.as_slice()) {
                    return bad(r.id, "hash does not match the row's content");
                }
                if r.role.is_some() {
                    // Unkeyed rows predate the column: a role there was added.
                    return bad(r.id, "an unkeyed row records a role (rows made before the chain was keyed have none)");
                }
            }
            (Some(mac), Some(fp)) => {
                if !r.content_ok() {
                    return bad(r.id, "hash does not match the row's content");
                }
                match last_fp {
                    None if r.id != 1 && op != b"adopt_integrity" && op != b"rotate_master_key" => {
                        return bad(
                            r.id,
                            "the first keyed row after unkeyed rows is not an adoption of MACs",
                        );
                    }
                    Some(l) if l != fp.as_slice() && op != b"rotate_master_key" => {
                        return bad(
                            r.id,
                            "the master key changes at a row that is not a master-key rotation",
                        );
                    }
                    _ => {}
                }
                match current {
                    Some((cfp, keys)) if cfp == fp.as_slice() => {
                        if !keys.audit.verify(&r.hash, mac) {
                            return bad(r.id, "its MAC does not verify under the master key: the row was altered or forged");
                        }
                        seen_current = true;
                    }
                    _ if seen_current => {
                        return bad(
                            r.id,
                            "MAC'd under another master key after rows MAC'd under the current one",
                        );
                    }
                    _ => {}
                }
                last_fp = Some(fp);
            }
            (Some(_), None) => {
                return bad(
                    r.id,
                    "a keyed row without the fingerprint of its master key",
                )
            }
        }
        prev.clone_from(&r.hash);
    }
    let keyed_keyring = kr.is_some_and(|k| k.since_us.is_some());
    match recs.last() {
        Some(r) if last_fp.is_some() && !seen_current => {
            return bad(
                r.id,
                "the newest row is not MAC'd under the current master key",
            );
        }
        Some(r) if keyed_keyring && r.mac.is_none() => {
            return bad(
                r.id,
                "the keyring's rows carry MACs but the newest audit row is unkeyed",
            );
        }
        Some(r) if !keyed_keyring && last_fp.is_some() => {
            return bad(r.id, "the chain is keyed but the kms.keyring row says rows carry no MACs: the keyring row was edited");
        }
        None if keyed_keyring => {
            return bad(
                1,
                "the audit log is empty although the keyring's rows carry MACs: rows were removed",
            );
        }
        _ => {}
    }
    let n = recs.len() as i64;
    let head = id_and_hash("SELECT last_id, last_hash FROM kms.audit_head")?;
    if let Some((hid, hhash)) = head {
        if hid != n || hhash != prev {
            return bad(
                if hid > n { n + 1 } else { hid },
                &format!("kms.audit_head names row {hid} but the log ends at row {n}"),
            );
        }
    }
    // Destroyed material must stay destroyed.
    let revived = Spi::connect(|c| -> Result<Option<(i64, String)>, pgrx::spi::Error> {
        let Some(r) = c
            .select(
                "SELECT a.id, a.key_name || coalesce(' version ' || a.version, '')
                   FROM kms.audit_log a JOIN kms.keys k ON k.key_name = a.key_name
                  WHERE (a.operation = 'destroy_key_version'
                         AND EXISTS (SELECT 1 FROM kms.key_versions v
                                      WHERE v.key_id = k.key_id AND v.version = a.version AND v.state <> 'destroyed'))
                     OR (a.operation = 'destroy_key'
                         AND (k.destroyed_at IS NULL OR k.index_key IS NOT NULL
                              OR EXISTS (SELECT 1 FROM kms.key_versions v WHERE v.key_id = k.key_id AND v.state <> 'destroyed')))
                  ORDER BY a.id LIMIT 1",
                None,
                &[],
            )?
            .next()
        else {
            return Ok(None);
        };
        Ok(Some((r.get::<i64>(1)?.unwrap_or(0), r.get::<String>(2)?.unwrap_or_default())))
    })
    .map_err(KmsError::spi)?;
    if let Some((id, what)) = revived {
        return bad(id, &format!("records the destruction of {what}, but the catalog holds it again: a saved row was put back"));
    }
    // Key-state rows, as a load would check them (no audit row to name).
    if let (true, Some((fp, keys))) = (keyed_keyring, current) {
        for id in all_key_ids()? {
            let (key, versions) = key_rows(id, false)?;
            let vs: Vec<VersionCheck<'_>> = versions.iter().map(VersionRowData::check).collect();
            match verify_with(keys, fp, &key.check(), &vs) {
                Ok(()) => {}
                Err(KmsError::CatalogAltered { what, why }) => {
                    return Ok(Some((None, format!("catalog row altered: {what}: {why}"))))
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(None)
}

/// (id, hash) of the first row of `q` (the chain's last row, or its
/// recorded head), read-only.
pub(crate) fn id_and_hash(q: &str) -> KmsResult<Option<(i64, Vec<u8>)>> {
    Spi::connect(|c| -> Result<Option<(i64, Vec<u8>)>, pgrx::spi::Error> {
        let Some(r) = c.select(q, Some(1), &[])?.next() else {
            return Ok(None);
        };
        Ok(Some((
            r.get::<i64>(1)?.unwrap_or(0),
            r.get::<Vec<u8>>(2)?.unwrap_or_default(),
        )))
    })
    .map_err(KmsError::spi)
}
