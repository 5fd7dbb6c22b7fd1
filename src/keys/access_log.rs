//! `kms.access_log`: the access audit's aggregates appended as a keyed
//! chain of its own (see [`crate::crypto::access`]), and its check
//! (`kms_access_log_check()`).

use super::access::Op;
use super::integrity::{hex_of, integrity_keys, read_keyring};
use crate::crypto::access::AccessRow;
use crate::errors::{KmsError, KmsResult};
use crate::pg::access_shmem::{self, AccessCount};
use crate::pg::spi;
use pgrx::prelude::*;
use std::collections::HashMap;

/// PostgreSQL timestamps count from 2000-01-01, the chain from 1970-01-01.
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// Appends this database's aggregates from shared memory to
/// `kms.access_log`, in the caller's transaction. Returns what was written:
/// the caller takes it off shared memory once the transaction committed
/// ([`access_shmem::subtract`]), so a failed append loses nothing.
pub fn append_counts() -> KmsResult<Vec<AccessCount>> {
    let mut counts = access_shmem::of_db(access_shmem::my_db());
    if counts.is_empty() {
        return Ok(counts);
    }
    // After DROP EXTENSION the keys counted are gone with the log: the
    // counts are dropped (returned as if written).
    if spi::read::<bool>(
        "SELECT pg_catalog.to_regclass('kms.access_log') IS NULL",
        &[],
    )? == Some(true)
    {
        return Ok(counts);
    }
    counts.sort_by_key(|c| {
        (
            c.key.key_id,
            c.key.version,
            c.key.op,
            c.key.session_user,
            c.key.current_user,
        )
    });
    crate::catalog::as_catalog_owner(|_| {
        let Some(kr) = read_keyring(false)? else {
            return Err(KmsError::BadArgument {
                message: "the keyring has no master key yet".into(),
                hint: "Create a key first (kms_create_key).",
            });
        };
        let keys = integrity_keys(&kr.fp)?;
        // Self-conflicting lock: appends are chained one after another.
        spi::exec("LOCK TABLE kms.access_log IN SHARE ROW EXCLUSIVE MODE", &[])?;
        let (mut id, mut prev) = last_row()?.unwrap_or((0, vec![0u8; 32]));
        let (now_us, roles, key_names) = context(&counts)?;
        let mut last_mac = Vec::new();
        for c in &counts {
            let Some(op) = Op::from_code(c.key.op) else {
                continue;
            };
            id += 1;
            let actor = roles.get(&c.key.session_user).cloned().flatten();
            let role = roles.get(&c.key.current_user).cloned().flatten();
            let key_name = key_names.get(&(c.key.key_id as i32)).cloned();
            let version = (op != Op::BlindIndex).then_some(c.key.version as i32);
            let count = c.count.min(i64::MAX as u64) as i64;
            let row = AccessRow {
                id,
                logged_at_us: now_us,
                session_user_oid: c.key.session_user,
                session_user: actor.as_deref(),
                current_user_oid: c.key.current_user,
                current_user: role.as_deref(),
                key_id: c.key.key_id as i32,
                key_name: key_name.as_deref().map(str::as_bytes),
                version,
                operation: op.name().as_bytes(),
                count,
                first_at_us: c.first_at + PG_EPOCH_US,
                last_at_us: c.last_at + PG_EPOCH_US,
                key_fp: &kr.fp,
            };
            let hash = row.chain_hash(&prev);
            let mac = keys.audit.hmac(&hash);
            spi::exec(
                "INSERT INTO kms.access_log (id, logged_at, actor_oid, actor, role_oid, role, key_id, key_name,
                                             version, operation, count, first_at, last_at, key_fp, prev_hash, hash, mac)
                 VALUES ($1, 'epoch'::timestamptz + $2 * interval '1 microsecond',
                         $3, (SELECT r.rolname::text FROM pg_catalog.pg_roles r WHERE r.oid = $3),
                         $4, (SELECT r.rolname::text FROM pg_catalog.pg_roles r WHERE r.oid = $4),
                         $5, $6, $7, $8, $9, 'epoch'::timestamptz + $10 * interval '1 microsecond',
                         'epoch'::timestamptz + $11 * interval '1 microsecond', $12, $13, $14, $15)",
                &[
                    id.into(),
                    now_us.into(),
                    pg_sys::Oid::from(c.key.session_user).into(),
                    pg_sys::Oid::from(c.key.current_user).into(),
                    (c.key.key_id as i32).into(),
                    key_name.clone().into(),
                    version.into(),
                    op.name().into(),
                    count.into(),
                    row.first_at_us.into(),
                    row.last_at_us.into(),
                    kr.fp.clone().into(),
                    prev.clone().into(),
                    hash.to_vec().into(),
                    mac.to_vec().into(),
                ],
            )?;
            prev = hash.to_vec();
            last_mac = mac.to_vec();
        }
        spi::exec(
            "INSERT INTO kms.access_head (singleton, last_id, last_hash, last_mac) VALUES (true, $1, $2, $3)
             ON CONFLICT (singleton) DO UPDATE SET last_id = excluded.last_id, last_hash = excluded.last_hash, last_mac = excluded.last_mac",
            &[id.into(), prev.clone().into(), last_mac.clone().into()],
        )?;
        let line = format!("pg_kms: access log head: id={id} mac={}", hex_of(&last_mac));
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, move || {
            pgrx::log!("{line}")
        });
        Ok(())
    })?;
    Ok(counts)
}

/// (id, hash) of the chain's last row.
fn last_row() -> KmsResult<Option<(i64, Vec<u8>)>> {
    super::audit::id_and_hash("SELECT id, hash FROM kms.access_log ORDER BY id DESC LIMIT 1")
}

type Context = (i64, HashMap<u32, Option<Vec<u8>>>, HashMap<i32, String>);

/// The time of this append (microseconds since 1970), the names of the
/// roles counted as UTF-8 bytes (None: dropped; a name need not be ASCII
/// nor the database UTF-8), and the key names.
fn context(counts: &[AccessCount]) -> KmsResult<Context> {
    let mut oids: Vec<u32> = counts
        .iter()
        .flat_map(|c| [c.key.session_user, c.key.current_user])
        .collect();
    oids.sort_unstable();
    oids.dedup();
    Spi::connect(|c| -> Result<Context, pgrx::spi::Error> {
        let now = c
            .select(
                "SELECT (EXTRACT(epoch FROM pg_catalog.now()) * 1000000)::int8",
                Some(1),
                &[],
            )?
            .first()
            .get_one::<i64>()?
            .unwrap_or(0);
        let mut roles = HashMap::new();
        for oid in oids {
            let name = c
                .select(
                    "SELECT pg_catalog.convert_to(rolname::text, 'UTF8') FROM pg_catalog.pg_roles WHERE oid = $1",
                    Some(1),
                    &[pg_sys::Oid::from(oid).into()],
                )?
                .next()
                .map(|r| r.get::<Vec<u8>>(1))
                .transpose()?
                .flatten();
            roles.insert(oid, name);
        }
        let mut keys = HashMap::new();
        for r in c.select("SELECT key_id, key_name FROM kms.keys", None, &[])? {
            if let (Some(id), Some(name)) = (r.get::<i32>(1)?, r.get::<String>(2)?) {
                keys.insert(id, name);
            }
        }
        Ok((now, roles, keys))
    })
    .map_err(KmsError::spi)
}

/// The result of [`check_access_log`].
pub struct AccessCheck {
    pub rows: i64,
    pub first_bad: Option<i64>,
    pub problem: Option<String>,
    pub head_id: Option<i64>,
    pub head_mac: Option<String>,
}

struct Stored {
    id: i64,
    fp: Vec<u8>,
    prev: Vec<u8>,
    hash: Vec<u8>,
    mac: Vec<u8>,
    content: Vec<u8>,
}

/// Checks the whole access chain: ids dense from 1, each prev_hash the
/// hash before it, each hash that of the row's content, every row MAC'd
/// under the master key configured now verified (rows of an earlier
/// master key come first and are covered by the chain), and the head.
/// Caller is the catalog owner.
pub fn check_access_log() -> KmsResult<AccessCheck> {
    let kr = read_keyring(false)?;
    let current = match &kr {
        Some(k) => Some((k.fp.clone(), integrity_keys(&k.fp)?)),
        None => None,
    };
    let rows = read_rows()?;
    let mut out = AccessCheck {
        rows: rows.len() as i64,
        first_bad: None,
        problem: None,
        head_id: rows.last().map(|r| r.id),
        head_mac: rows.last().map(|r| hex_of(&r.mac)),
    };
    let mut bad = |id: i64, why: &str| {
        out.first_bad = Some(id);
        out.problem = Some(format!("row {id}: {why}"));
    };
    let mut prev = vec![0u8; 32];
    let mut seen_current = false;
    for (i, r) in rows.iter().enumerate() {
        let expect = i as i64 + 1;
        if r.id != expect {
            bad(expect, &format!("missing (the next row is {})", r.id));
            return Ok(out);
        }
        if r.prev != prev {
            bad(r.id, "prev_hash is not the hash of the row before it: rows were removed, inserted or reordered");
            return Ok(out);
        }
        if r.content != r.hash {
            bad(r.id, "hash does not match the row's content");
            return Ok(out);
        }
        match &current {
            Some((fp, keys)) if *fp == r.fp => {
                if !keys.audit.verify(&r.hash, &r.mac) {
                    bad(r.id, "its MAC does not verify under the master key: the row was altered or forged");
                    return Ok(out);
                }
                seen_current = true;
            }
            _ if seen_current => {
                bad(
                    r.id,
                    "MAC'd under another master key after rows MAC'd under the current one",
                );
                return Ok(out);
            }
            _ => {}
        }
        prev.clone_from(&r.hash);
    }
    if let Some(r) = rows.last() {
        if !seen_current {
            bad(
                r.id,
                "the newest row is not MAC'd under the current master key",
            );
            return Ok(out);
        }
    }
    let n = rows.len() as i64;
    let head = super::audit::id_and_hash("SELECT last_id, last_hash FROM kms.access_head")?;
    match head {
        Some((hid, hhash)) if hid != n || hhash != prev => bad(
            if hid > n { n + 1 } else { hid },
            &format!("kms.access_head names row {hid} but the log ends at row {n}"),
        ),
        None if n > 0 => bad(1, "kms.access_head is missing"),
        _ => {}
    }
    Ok(out)
}

/// Every row in id order, with the hash its content gives.
fn read_rows() -> KmsResult<Vec<Stored>> {
    Spi::connect(|c| -> Result<Vec<Stored>, pgrx::spi::Error> {
        let t = c.select(
            "SELECT id, (EXTRACT(epoch FROM logged_at) * 1000000)::int8, actor_oid, pg_catalog.convert_to(actor, 'UTF8'),
                    role_oid, pg_catalog.convert_to(role, 'UTF8'), key_id, pg_catalog.convert_to(key_name, 'UTF8'),
                    version, operation, count, (EXTRACT(epoch FROM first_at) * 1000000)::int8,
                    (EXTRACT(epoch FROM last_at) * 1000000)::int8, key_fp, prev_hash, hash, mac
               FROM kms.access_log ORDER BY id",
            None,
            &[],
        )?;
        let mut out = Vec::new();
        for r in t {
            let actor = r.get::<Vec<u8>>(4)?;
            let role = r.get::<Vec<u8>>(6)?;
            let key_name = r.get::<Vec<u8>>(8)?;
            let op = r.get::<String>(10)?.unwrap_or_default();
            let fp = r.get::<Vec<u8>>(14)?.unwrap_or_default();
            let prev = r.get::<Vec<u8>>(15)?.unwrap_or_default();
            let row = AccessRow {
                id: r.get::<i64>(1)?.unwrap_or(0),
                logged_at_us: r.get::<i64>(2)?.unwrap_or(0),
                session_user_oid: r.get::<pg_sys::Oid>(3)?.map(|o| o.to_u32()).unwrap_or(0),
                session_user: actor.as_deref(),
                current_user_oid: r.get::<pg_sys::Oid>(5)?.map(|o| o.to_u32()).unwrap_or(0),
                current_user: role.as_deref(),
                key_id: r.get::<i32>(7)?.unwrap_or(0),
                key_name: key_name.as_deref(),
                version: r.get::<i32>(9)?,
                operation: op.as_bytes(),
                count: r.get::<i64>(11)?.unwrap_or(0),
                first_at_us: r.get::<i64>(12)?.unwrap_or(0),
                last_at_us: r.get::<i64>(13)?.unwrap_or(0),
                key_fp: &fp,
            };
            let content = row.chain_hash(&prev).to_vec();
            out.push(Stored {
                id: row.id,
                hash: r.get::<Vec<u8>>(16)?.unwrap_or_default(),
                mac: r.get::<Vec<u8>>(17)?.unwrap_or_default(),
                fp,
                prev,
                content,
            });
        }
        Ok(out)
    })
    .map_err(KmsError::spi)
}

/// The `access_audit` object of `kms_health()`: whether uses are counted,
/// whether they can reach the log at all (without preload they cannot),
/// what waits in shared memory, and aggregates deferred or lost.
/// Caller is the catalog owner.
pub fn health_status() -> KmsResult<serde_json::Value> {
    let preloaded = crate::pg::preloaded();
    let last = spi::read::<pgrx::datum::TimestampWithTimeZone>(
        "SELECT logged_at FROM kms.access_log ORDER BY id DESC LIMIT 1",
        &[],
    )?
    .map(|t| t.to_string());
    let shared = access_shmem::status();
    Ok(serde_json::json!({
        "enabled": super::access::enabled() && preloaded,
        "setting": super::access::enabled(),
        "preloaded": preloaded,
        "reason": (!preloaded).then_some(
            "pg_kms is not in shared_preload_libraries: key uses are not counted (the counts cannot reach shared memory and the worker)"
        ),
        "interval_ms": crate::pg::guc::ACCESS_AUDIT_INTERVAL_MS.get(),
        "last_logged_at": last,
        "pending_aggregates": shared.map(|s| s.0),
        "capacity": shared.map(|s| s.1),
        "handovers_deferred": shared.map(|s| s.2),
        "entries_dropped": shared.map(|s| s.3),
    }))
}
