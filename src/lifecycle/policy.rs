//! Key policy after creation and what the worker does with it.
//!
//! * `kms_alter_key` ([`alter_key_sql`]): rotation period, `retire_after`,
//!   `destroy_after` and metadata of a key, audited (`alter_key`) with the
//!   old and new values. These columns are not covered by the key row's MAC
//!   (neither is `rotation_period`): they only schedule acts that a
//!   kms_admin may run by hand anyway, each act is audited, and the worker's
//!   retire and destroy never touch a version that a row references.
//! * The worker's policy pass ([`due`], then [`apply`] for each candidate,
//!   each in its own transaction): a `decrypt_only` version past its key's
//!   `retire_after` (from `state_changed_at`) or marked
//!   `retire_when_unreferenced` by an emergency rotation is disabled, a
//!   `disabled` version past `destroy_after` is destroyed, each only when
//!   an exact count in the same transaction finds no row sealed under it
//!   (every encrypted column scanned as its table's owner under
//!   `SECURITY_RESTRICTED_OPERATION`, as `kms_key_usage` and the destroy
//!   guard do). Audited with reason `policy` or `emergency`.
//! * A candidate still referenced is not scanned again every naptime: only
//!   once the re-encryption progress changed (a pass rewrapped rows or
//!   finished) or after [`RECHECK`].

use super::*;
use crate::pg::identity;
use pgrx::datum::Interval;
use serde_json::json;
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The longest a still-referenced candidate waits for its next exact count
/// when the re-encryption progress does not change.
pub const RECHECK: Duration = Duration::from_secs(600);

/// The fields `clear` may name.
const FIELDS: [&str; 4] = [
    "rotation_period",
    "retire_after",
    "destroy_after",
    "metadata",
];

/// The arguments of `kms_alter_key` after the key name.
pub struct Alter {
    pub rotation_period: Option<Interval>,
    pub retire_after: Option<Interval>,
    pub destroy_after: Option<Interval>,
    pub metadata: Option<serde_json::Value>,
    pub clear: Vec<Option<String>>,
}

const POLICY_SQL: &str = "SELECT pg_catalog.jsonb_build_object(
        'rotation_period', rotation_period::pg_catalog.text,
        'retire_after', retire_after::pg_catalog.text,
        'destroy_after', destroy_after::pg_catalog.text,
        'metadata', metadata)
   FROM kms.keys WHERE key_id = $1";

fn bad(message: String, hint: &'static str) -> KmsError {
    KmsError::BadArgument { message, hint }
}

/// Checks that `v` is positive (or, with `zero_ok`, not negative).
fn check_interval(field: &str, v: Option<Interval>, zero_ok: bool) -> KmsResult<()> {
    let Some(v) = v else { return Ok(()) };
    let q = if zero_ok {
        "SELECT $1 >= interval '0'"
    } else {
        "SELECT $1 > interval '0'"
    };
    if spi::read::<bool>(q, &[v.into()])?.unwrap_or(false) {
        return Ok(());
    }
    Err(if zero_ok {
        bad(
            format!("{field} must not be a negative interval"),
            "For example '30 days'; pass clear => ARRAY['<field>'] to remove it.",
        )
    } else {
        bad(
            format!("{field} must be a positive interval"),
            "For example '90 days'; pass clear => ARRAY['rotation_period'] for no scheduled rotation.",
        )
    })
}

/// The body of SQL `kms_alter_key()`.
pub fn alter_key_sql(key_name: RawText, a: Alter) {
    lifecycle(|| {
        let name = name_arg(&key_name)?;
        let mut clear = Vec::new();
        for f in &a.clear {
            match f.as_deref() {
                Some(f) if FIELDS.contains(&f) => clear.push(f),
                other => {
                    return Err(bad(
                        format!(
                            "kms_alter_key cannot clear {}",
                            other.map_or("NULL".into(), |f| format!("\"{f}\""))
                        ),
                        "clear names fields to reset: rotation_period, retire_after, destroy_after, metadata.",
                    ))
                }
            }
        }
        let given = [
            ("rotation_period", a.rotation_period.is_some()),
            ("retire_after", a.retire_after.is_some()),
            ("destroy_after", a.destroy_after.is_some()),
            ("metadata", a.metadata.is_some()),
        ];
        if let Some((f, _)) = given.iter().find(|(f, set)| *set && clear.contains(f)) {
            return Err(bad(
                format!("{f} is both given and cleared"),
                "Give a field a new value or name it in clear, not both.",
            ));
        }
        check_interval("rotation_period", a.rotation_period, false)?;
        check_interval("retire_after", a.retire_after, true)?;
        check_interval("destroy_after", a.destroy_after, true)?;
        if let Some(m) = &a.metadata {
            if !m.is_object() {
                return Err(bad(
                    "metadata must be a JSON object".into(),
                    "For example '{\"owner\": \"billing\", \"purpose\": \"card numbers\"}'.",
                ));
            }
        }
        let act = begin_act()?;
        let key = lock_key(name)?;
        refuse_destroyed(&key, "alter it")?;
        let old = spi::one::<pgrx::JsonB>(POLICY_SQL, &[key.id.into()])?.map(|j| j.0);
        let is = |f: &str| clear.contains(&f);
        spi::exec(
            "UPDATE kms.keys SET
                 rotation_period = CASE WHEN $2 THEN NULL ELSE coalesce($3, rotation_period) END,
                 retire_after = CASE WHEN $4 THEN NULL ELSE coalesce($5, retire_after) END,
                 destroy_after = CASE WHEN $6 THEN NULL ELSE coalesce($7, destroy_after) END,
                 metadata = CASE WHEN $8 THEN '{}'::jsonb ELSE coalesce($9, metadata) END
              WHERE key_id = $1",
            &[
                key.id.into(),
                is("rotation_period").into(),
                a.rotation_period.into(),
                is("retire_after").into(),
                a.retire_after.into(),
                is("destroy_after").into(),
                a.destroy_after.into(),
                is("metadata").into(),
                a.metadata.map(pgrx::JsonB).into(),
            ],
        )?;
        let new = spi::one::<pgrx::JsonB>(POLICY_SQL, &[key.id.into()])?.map(|j| j.0);
        if old == new {
            return Ok(()); // nothing changed, nothing to audit
        }
        // Not a change of the key's MAC'd rows: its generation stays.
        append(
            &act.keys,
            &act.fp,
            "alter_key",
            Some(&key.name),
            None,
            None,
            Some(&json!({ "old": old, "new": new }).to_string()),
        )?;
        Ok(())
    })
}

/// What the worker may do to a version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Disable a decrypt_only version past `retire_after`.
    Retire,
    /// Disable a decrypt_only version marked by an emergency rotation.
    Emergency,
    /// Destroy a disabled version past `destroy_after`.
    Destroy,
}

impl Action {
    fn reason(self) -> &'static str {
        match self {
            Action::Retire | Action::Destroy => "policy",
            Action::Emergency => "emergency",
        }
    }
}

/// A version the policy would act on if no row references it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub key_name: String,
    pub key_id: i32,
    pub version: i32,
    pub action: Action,
}

/// (key id, version, action): what the rate limit remembers.
type Slot = (i32, i32, Action);

impl Candidate {
    fn slot(&self) -> Slot {
        (self.key_id, self.version, self.action)
    }
}

/// The condition of each action over `k` (kms.keys) and `v`
/// (kms.key_versions), checked again under lock before acting.
const DUE: &str = "k.destroyed_at IS NULL AND v.version <> k.primary_version AND (
      CASE $1
        WHEN 'emergency' THEN v.state = 'decrypt_only' AND v.retire_when_unreferenced
        WHEN 'retire' THEN v.state = 'decrypt_only' AND NOT v.retire_when_unreferenced
             AND k.retire_after IS NOT NULL AND v.state_changed_at + k.retire_after <= pg_catalog.now()
        WHEN 'destroy' THEN v.state = 'disabled'
             AND k.destroy_after IS NOT NULL AND v.state_changed_at + k.destroy_after <= pg_catalog.now()
      END)";

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Retire => "retire",
        Action::Emergency => "emergency",
        Action::Destroy => "destroy",
    }
}

thread_local! {
    /// Per candidate: when it was last found referenced, and the progress
    /// signature then (the worker is one process with one thread).
    static CHECKED: RefCell<HashMap<Slot, (Instant, String)>> = RefCell::new(HashMap::new());
    /// Per key, the first count of this policy pass (cleared by [`due`]):
    /// one scan per key and pass, however many of its versions are due.
    /// Only the count before the act uses it; the act counts again.
    static PASS_COUNTS: RefCell<HashMap<i32, Usage>> = RefCell::new(HashMap::new());
}

/// Rows per version of a key, and the columns that could not be counted.
type Usage = (std::collections::BTreeMap<i32, i64>, Vec<String>);

/// A signature of the re-encryption progress: it changes when a pass
/// rewraps rows or finishes, or a recount finds other pending or
/// context-bound rows.
fn progress_signature() -> KmsResult<String> {
    Ok(spi::read::<String>(
        "SELECT coalesce(pg_catalog.string_agg(relid::pg_catalog.text || ':' || attname || ':' || rows_rewrapped
                 || ':' || coalesce(rows_pending::pg_catalog.text, '') || ':' || coalesce(rows_needing_context::pg_catalog.text, '')
                 || ':' || coalesce(finished_at::pg_catalog.text, ''),
                 ',' ORDER BY relid, attname), '')
           FROM kms.reencryption_progress",
        &[],
    )?
    .unwrap_or_default())
}

/// The versions the policy may act on now (the worker calls this in a
/// transaction, then [`apply`] for each in its own): those never counted
/// by this process, and those found referenced before only once the
/// re-encryption progress changed or [`RECHECK`] passed.
pub fn due() -> KmsResult<Vec<Candidate>> {
    PASS_COUNTS.with(|p| p.borrow_mut().clear());
    let (all, sig) = catalog::as_catalog_owner(|_| {
        let mut all = Vec::new();
        for a in [Action::Emergency, Action::Retire, Action::Destroy] {
            let rows = Spi::connect(|c| -> Result<Vec<(String, i32, i32)>, pgrx::spi::Error> {
                let mut out = Vec::new();
                for r in c.select(
                    &format!(
                        "SELECT k.key_name, k.key_id, v.version FROM kms.keys k
                           JOIN kms.key_versions v ON v.key_id = k.key_id
                          WHERE {DUE} ORDER BY 1, 3"
                    ),
                    None,
                    &[action_name(a).into()],
                )? {
                    out.push((
                        r.get::<String>(1)?.unwrap_or_default(),
                        r.get::<i32>(2)?.unwrap_or(0),
                        r.get::<i32>(3)?.unwrap_or(0),
                    ));
                }
                Ok(out)
            })
            .map_err(KmsError::spi)?;
            all.extend(
                rows.into_iter()
                    .map(|(key_name, key_id, version)| Candidate {
                        key_name,
                        key_id,
                        version,
                        action: a,
                    }),
            );
        }
        Ok((all, progress_signature()?))
    })?;
    let now = Instant::now();
    Ok(CHECKED.with(|m| {
        let mut m = m.borrow_mut();
        m.retain(|k, _| all.iter().any(|c| c.slot() == *k));
        all.into_iter()
            .filter(|c| match m.get(&c.slot()) {
                None => true,
                Some((at, s)) => *s != sig || now.duration_since(*at) >= RECHECK,
            })
            .collect()
    }))
}

/// What [`apply`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Disabled or destroyed (audited).
    Done,
    /// `rows` rows still sealed under the version: left alone.
    Referenced(i64),
    /// Some encrypted values cannot be counted (arrays, composites,
    /// materialized views, foreign tables): left alone.
    Unverifiable(String),
    /// No longer due (changed meanwhile).
    NotDue,
}

/// Whether `c` is still due (reads kms.*: the caller is the catalog owner).
fn still_due(c: &Candidate) -> KmsResult<bool> {
    Ok(spi::one::<bool>(
        &format!(
            "SELECT true FROM kms.keys k JOIN kms.key_versions v ON v.key_id = k.key_id
              WHERE k.key_id = $2 AND v.version = $3 AND {DUE}"
        ),
        &[
            action_name(c.action).into(),
            c.key_id.into(),
            c.version.into(),
        ],
    )?
    .is_some())
}

/// The exact count of rows sealed under `c`'s version (every encrypted
/// column, each scanned as its table's owner under
/// `SECURITY_RESTRICTED_OPERATION`): None when none is.
/// `reuse`: the count of this pass may serve (the first count only).
fn referenced(c: &Candidate, caller: pg_sys::Oid, reuse: bool) -> KmsResult<Option<Outcome>> {
    let cached = reuse
        .then(|| PASS_COUNTS.with(|p| p.borrow().get(&c.key_id).cloned()))
        .flatten();
    let (counts, skipped) = match cached {
        Some(u) => u,
        None => {
            let u = crate::reencrypt::usage_by_version(c.key_id, caller)?;
            if reuse {
                PASS_COUNTS.with(|p| p.borrow_mut().insert(c.key_id, u.clone()));
            }
            u
        }
    };
    let rows = counts.get(&c.version).copied().unwrap_or(0);
    if rows > 0 {
        return Ok(Some(Outcome::Referenced(rows)));
    }
    if !skipped.is_empty() {
        return Ok(Some(Outcome::Unverifiable(
            crate::reencrypt::skipped_notice(&skipped),
        )));
    }
    Ok(None)
}

/// Acts on one candidate, in the caller's transaction (the worker runs one
/// per candidate). A first count runs without the lifecycle locks (the
/// common case, a version still referenced, ends there); if it finds no
/// row, the act takes the locks, checks the candidate is still due, counts
/// again in the same transaction, and disables or destroys the version only
/// if still no row references it.
pub fn apply(c: &Candidate) -> Outcome {
    // The worker's own role (a superuser): every column is counted.
    let caller = identity::current_user();
    // A transaction older than the version's last change (when it stopped
    // being the primary, or was disabled) may still seal rows under it and
    // commit after the count: wait until none is left (tried again at the
    // next pass, not rate-limited).
    let since = catalog::as_catalog_owner(|_| {
        spi::first::<i64>(
            "SELECT (EXTRACT(epoch FROM state_changed_at) * 1000000)::pg_catalog.int8
               FROM kms.key_versions WHERE key_id = $1 AND version = $2",
            &[c.key_id.into(), c.version.into()],
            false,
        )
    });
    match since.map(|s| s.map(crate::pg::activity::no_transaction_older_than)) {
        Ok(Some(Ok(true))) => {}
        _ => return Outcome::NotDue,
    }
    let sig = catalog::as_catalog_owner(|_| progress_signature()).unwrap_or_default();
    // Counted now unless it is acted on (also if this transaction fails:
    // a failing candidate waits for the next progress change or RECHECK).
    CHECKED.with(|m| m.borrow_mut().insert(c.slot(), (Instant::now(), sig)));
    let pre = catalog::as_catalog_owner(|_| {
        if !still_due(c)? {
            return Ok(Some(Outcome::NotDue));
        }
        referenced(c, caller, true)
    })
    .or_raise();
    let outcome = match pre {
        Some(o) => o,
        None => {
            // The worker commits asynchronously; an act is durable before
            // its audit head reaches the server log.
            let _ = spi::exec("SET LOCAL synchronous_commit = on", &[]);
            act(c, caller)
        }
    };
    if matches!(outcome, Outcome::Done | Outcome::NotDue) {
        CHECKED.with(|m| m.borrow_mut().remove(&c.slot()));
    }
    let verb = if c.action == Action::Destroy {
        "destroyed"
    } else {
        "disabled"
    };
    match &outcome {
        Outcome::Done => log!(
            "pg_kms: {verb} version {} of key \"{}\" (reason {}: no row references it)",
            c.version,
            c.key_name,
            c.action.reason()
        ),
        Outcome::Unverifiable(why) => log!(
            "pg_kms: version {} of key \"{}\" is due to be {verb} but was left alone: {why}",
            c.version,
            c.key_name,
        ),
        _ => {}
    }
    outcome
}

/// The act itself, under the lifecycle locks.
fn act(c: &Candidate, caller: pg_sys::Oid) -> Outcome {
    lifecycle(|| {
        let act = begin_act()?;
        let key = lock_key(&c.key_name)?;
        if key.destroyed || key.id != c.key_id || !still_due(c)? {
            return Ok(Outcome::NotDue);
        }
        if let Some(o) = referenced(c, caller, false)? {
            return Ok(o);
        }
        let reason = Some(RawText::from_ascii(c.action.reason()));
        match c.action {
            Action::Retire | Action::Emergency => {
                set_state(&key, c.version, State::Disabled)?;
                // Enabled again by hand later, it is not retired again at once.
                spi::exec(
                    "UPDATE kms.key_versions SET retire_when_unreferenced = false
                      WHERE key_id = $1 AND version = $2",
                    &[key.id.into(), c.version.into()],
                )?;
                let detail = match c.action {
                    Action::Emergency => json!({ "policy": "emergency", "rows": 0 }),
                    _ => json!({
                        "policy": "retire_after",
                        "retire_after": spi::read::<String>(
                            "SELECT retire_after::pg_catalog.text FROM kms.keys WHERE key_id = $1",
                            &[key.id.into()],
                        )?,
                        "rows": 0,
                    }),
                };
                record(
                    &act,
                    "disable_key_version",
                    &key,
                    Some(c.version),
                    reason,
                    Some(&detail.to_string()),
                )?;
            }
            Action::Destroy => {
                destroy_version_row(&act, &c.key_name, &key, c.version, reason)?;
            }
        }
        Ok(Outcome::Done)
    })
}

/// Keys with a version marked by an emergency rotation that is still
/// decrypt_only: the worker rewraps their columns without its throttle.
/// Call inside a transaction; empty on any error.
pub fn emergency_keys() -> Vec<i32> {
    catalog::as_catalog_owner(|_| {
        Spi::connect(|c| -> Result<Vec<i32>, pgrx::spi::Error> {
            let mut out = Vec::new();
            for r in c.select(
                "SELECT DISTINCT v.key_id FROM kms.key_versions v JOIN kms.keys k ON k.key_id = v.key_id
                  WHERE v.retire_when_unreferenced AND v.state = 'decrypt_only' AND k.destroyed_at IS NULL
                  ORDER BY 1",
                None,
                &[],
            )? {
                out.push(r.get::<i32>(1)?.unwrap_or(0));
            }
            Ok(out)
        })
        .map_err(KmsError::spi)
    })
    .unwrap_or_default()
}
