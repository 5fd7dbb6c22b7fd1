//! Protected columns: column policies (`kms_protect_column`), the objects
//! pg_kms keeps on a protected table (the decrypted view and its INSTEAD OF
//! trigger, the conversion trigger and shadow column of a plaintext column
//! being encrypted online, the blind-index column), and the DDL guard.
//!
//! Trust boundary: the policy rows live in `kms.protected_columns`, read
//! and written as the catalog owner; every statement on the user's table
//! (DDL included) runs as the table's owner under
//! `SECURITY_RESTRICTED_OPERATION` (`identity::as_table_owner`), so the
//! objects pg_kms makes belong to the table owner and nothing of the table
//! runs with more rights than its owner's. The generated functions are
//! `SECURITY INVOKER` with a pinned `search_path`: whoever writes through
//! the view encrypts as themselves (and needs the key's `encrypt` grant).
//!
//! * [`context`]: checking and rendering context expressions;
//! * [`sqlgen`]: the SQL text of the view and triggers;
//! * [`guard`]: the event trigger's checks;
//! * this file: policies, protect, unprotect, regenerate.

pub mod context;
pub mod convert;
pub mod guard;
pub mod sqlgen;

use crate::errors::{quote_ident, KmsError, KmsResult, ProtectCode};
use crate::keys::Privilege;
use crate::pg::{identity, spi};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;

/// A column of a user table, as the catalog has it now.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    /// `format_type()` of its type (e.g. `character varying(64)`).
    pub type_sql: String,
    pub typid: pg_sys::Oid,
    /// A generated (stored) column.
    pub generated: bool,
    /// `a` (GENERATED ALWAYS AS IDENTITY), `d` (BY DEFAULT), or none.
    pub identity: Option<char>,
    /// Its default (`pg_get_expr`), or for an identity column
    /// `nextval` of its sequence.
    pub default: Option<String>,
    /// An identity column's sequence (qualified, quoted).
    pub identity_sequence: Option<String>,
}

/// A user table, as the catalog has it now.
#[derive(Debug, Clone)]
pub struct Table {
    pub relid: pg_sys::Oid,
    pub schema: String,
    pub name: String,
    /// `"schema"."name"`
    pub qualified: String,
    pub owner: pg_sys::Oid,
    pub relkind: String,
    pub persistence: String,
    pub columns: Vec<Column>,
    /// Primary key columns, in key order.
    pub pk: Vec<String>,
    /// Whether every primary key column's type is built in (its `=` is in
    /// pg_catalog, where the generated SQL resolves it).
    pub pk_builtin: bool,
}

impl Table {
    /// None: no such relation.
    pub fn read(relid: pg_sys::Oid) -> KmsResult<Option<Table>> {
        identity::with_pinned_search_path(|| Self::read_pinned(relid))
    }

    fn read_pinned(relid: pg_sys::Oid) -> KmsResult<Option<Table>> {
        Spi::connect(|c| -> Result<Option<Table>, pgrx::spi::Error> {
            let t = c.select(
                "SELECT c.relname::text, n.nspname::text, c.relowner, c.relkind::text, c.relpersistence::text
                   FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = $1",
                Some(1),
                &[relid.into()],
            )?;
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            let name = r.get::<String>(1)?.unwrap_or_default();
            let schema = r.get::<String>(2)?.unwrap_or_default();
            let mut table = Table {
                relid,
                qualified: format!("{}.{}", quote_ident(&schema), quote_ident(&name)),
                name,
                schema,
                owner: r.get::<pg_sys::Oid>(3)?.unwrap_or(pg_sys::InvalidOid),
                relkind: r.get::<String>(4)?.unwrap_or_default(),
                persistence: r.get::<String>(5)?.unwrap_or_default(),
                columns: Vec::new(),
                pk: Vec::new(),
                pk_builtin: true,
            };
            for r in c.select(
                "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), a.atttypid,
                        a.attgenerated::text, a.attidentity::text,
                        CASE WHEN a.attidentity <> '' THEN
                               'nextval(' || pg_catalog.quote_literal(pg_catalog.pg_get_serial_sequence($2, a.attname)) || '::pg_catalog.regclass)'
                             WHEN a.attgenerated = '' THEN pg_catalog.pg_get_expr(d.adbin, d.adrelid) END,
                        CASE WHEN a.attidentity <> '' THEN pg_catalog.pg_get_serial_sequence($2, a.attname) END
                   FROM pg_catalog.pg_attribute a
                   LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                  WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attnum",
                None,
                &[relid.into(), table.qualified.as_str().into()],
            )? {
                let identity = r.get::<String>(5)?.unwrap_or_default();
                table.columns.push(Column {
                    name: r.get::<String>(1)?.unwrap_or_default(),
                    type_sql: r.get::<String>(2)?.unwrap_or_default(),
                    typid: r.get::<pg_sys::Oid>(3)?.unwrap_or(pg_sys::InvalidOid),
                    generated: !r.get::<String>(4)?.unwrap_or_default().is_empty(),
                    identity: identity.chars().next(),
                    default: r.get::<String>(6)?,
                    identity_sequence: r.get::<String>(7)?,
                });
            }
            for r in c.select(
                "SELECT a.attname::text, a.atttypid < 16384
                   FROM pg_catalog.pg_index i
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                  WHERE i.indrelid = $1 AND i.indisprimary
                  ORDER BY pg_catalog.array_position(i.indkey::int2[], a.attnum)",
                None,
                &[relid.into()],
            )? {
                table.pk.push(r.get::<String>(1)?.unwrap_or_default());
                table.pk_builtin &= r.get::<bool>(2)?.unwrap_or(false);
            }
            Ok(Some(table))
        })
        .map_err(KmsError::spi)
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// The state of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyState {
    /// A plaintext column being encrypted online into `shadow`.
    Converting,
    /// The column holds `encrypted_text` sealed by the policy.
    Protected,
}

/// One row of `kms.protected_columns`.
#[derive(Debug, Clone)]
pub struct Policy {
    pub relid: pg_sys::Oid,
    pub attname: String,
    pub relname: String,
    pub relnamespace: String,
    pub key_id: i32,
    pub key_name: String,
    /// Deparsed, bare column names (None: no context).
    pub context: Option<String>,
    pub context_columns: Vec<String>,
    pub deterministic: bool,
    pub blind_index_bits: Option<i32>,
    pub blind_index_column: Option<String>,
    /// The plaintext type (`text`, `character varying(n)`, `bytea`), or
    /// None for a column that was `encrypted_text` when protected.
    pub source_type: Option<String>,
    pub shadow_column: Option<String>,
    pub view_name: String,
    pub state: PolicyState,
}

impl Policy {
    /// Values are bytea (sealed with kms_encrypt_bytea).
    pub fn is_bytea(&self) -> bool {
        self.source_type.as_deref() == Some("bytea")
    }

    /// The column holding (or, while converting, receiving) ciphertext.
    pub fn cipher_column(&self) -> &str {
        self.shadow_column.as_deref().unwrap_or(&self.attname)
    }

    /// Every column name this policy needs to stay as it is.
    pub fn columns_in_use(&self) -> Vec<&str> {
        let mut v = vec![self.attname.as_str()];
        v.extend(self.shadow_column.as_deref());
        v.extend(self.blind_index_column.as_deref());
        v.extend(self.context_columns.iter().map(String::as_str));
        v
    }
}

const POLICY_SQL: &str =
    "SELECT p.relid::oid, p.attname::text, p.relname::text, p.relnamespace::text, p.key_id,
        k.key_name, p.context, p.context_columns::text[], p.deterministic, p.blind_index_bits,
        p.blind_index_column::text, p.source_type, p.shadow_column::text, p.view_name::text, p.state
   FROM kms.protected_columns p JOIN kms.keys k ON k.key_id = p.key_id";

fn read_policies(filter: &str, args: &[pgrx::datum::DatumWithOid<'_>]) -> KmsResult<Vec<Policy>> {
    let q = format!("{POLICY_SQL} {filter} ORDER BY p.relid::oid, p.attname");
    crate::catalog::as_catalog_owner(|_| {
        Spi::connect(|c| -> Result<Vec<Policy>, pgrx::spi::Error> {
            let mut out = Vec::new();
            for r in c.select(&q, None, args)? {
                out.push(Policy {
                    relid: r.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid),
                    attname: r.get::<String>(2)?.unwrap_or_default(),
                    relname: r.get::<String>(3)?.unwrap_or_default(),
                    relnamespace: r.get::<String>(4)?.unwrap_or_default(),
                    key_id: r.get::<i32>(5)?.unwrap_or(0),
                    key_name: r.get::<String>(6)?.unwrap_or_default(),
                    context: r.get::<String>(7)?,
                    context_columns: r.get::<Vec<String>>(8)?.unwrap_or_default(),
                    deterministic: r.get::<bool>(9)?.unwrap_or(false),
                    blind_index_bits: r.get::<i32>(10)?,
                    blind_index_column: r.get::<String>(11)?,
                    source_type: r.get::<String>(12)?,
                    shadow_column: r.get::<String>(13)?,
                    view_name: r.get::<String>(14)?.unwrap_or_default(),
                    state: if r.get::<String>(15)?.as_deref() == Some("converting") {
                        PolicyState::Converting
                    } else {
                        PolicyState::Protected
                    },
                });
            }
            Ok(out)
        })
        .map_err(KmsError::spi)
    })
}

/// The policies of one table.
pub fn policies_of(relid: pg_sys::Oid) -> KmsResult<Vec<Policy>> {
    read_policies("WHERE p.relid::oid = $1", &[relid.into()])
}

/// Whether `schema.view` is the decrypted view of a protected table.
pub fn view_is_kept(schema: &str, view: &str) -> KmsResult<bool> {
    crate::catalog::as_catalog_owner(|_| {
        spi::read::<bool>(
            "SELECT EXISTS (SELECT 1 FROM kms.protected_columns WHERE relnamespace = $1 AND view_name = $2)",
            &[schema.into(), view.into()],
        )
    })
    .map(|b| b == Some(true))
}

/// Every policy of this database (the worker's list).
pub fn all_policies() -> KmsResult<Vec<Policy>> {
    read_policies("", &[])
}

thread_local! {
    /// Depth of pg_kms's own DDL on user tables: the DDL guard lets it
    /// through.
    static INTERNAL_DDL: Cell<u32> = const { Cell::new(0) };
}

/// Whether pg_kms itself is running the current DDL.
pub fn internal_ddl() -> bool {
    INTERNAL_DDL.get() > 0
}

struct InternalDdl;

impl InternalDdl {
    fn enter() -> InternalDdl {
        INTERNAL_DDL.set(INTERNAL_DDL.get() + 1);
        InternalDdl
    }
}

impl Drop for InternalDdl {
    fn drop(&mut self) {
        INTERNAL_DDL.set(INTERNAL_DDL.get().saturating_sub(1));
    }
}

/// Runs `stmts` on the user's table as its owner under
/// `SECURITY_RESTRICTED_OPERATION`, let through by the DDL guard.
pub fn run_as_owner(table: &Table, stmts: &[String]) -> KmsResult<()> {
    let _internal = InternalDdl::enter();
    identity::as_table_owner(table.owner, || {
        // No "does not exist, skipping" notices for pg_kms's own IF EXISTS
        // (the scope rolls the setting back).
        spi::exec(
            "SELECT pg_catalog.set_config('client_min_messages', 'warning', true)",
            &[],
        )?;
        for s in stmts {
            spi::exec(s, &[])?;
        }
        Ok(())
    })
}

fn refuse(code: ProtectCode, message: String, hint: &str) -> KmsError {
    KmsError::Protect {
        code,
        message,
        hint: hint.into(),
    }
}

const MAX_NAME: usize = 63;

fn check_name_len(name: &str, what: &str) -> KmsResult<()> {
    if name.len() > MAX_NAME {
        return Err(refuse(
            ProtectCode::Unsupported,
            format!("the {what} name \"{name}\" would be longer than 63 bytes"),
            "Rename the table or column to something shorter, or pass view_name.",
        ));
    }
    Ok(())
}

/// The schema of the extension's functions, quoted.
pub fn extension_schema() -> KmsResult<String> {
    spi::read::<String>(
        "SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
           JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace
          WHERE e.extname OPERATOR(pg_catalog.=) 'pg_kms'",
        &[],
    )?
    .ok_or(KmsError::NotInstalled)
}

/// Whether the current user owns `table` (is a member of its owner role,
/// as PostgreSQL's own ownership checks count it).
fn caller_owns(table: &Table) -> KmsResult<bool> {
    // SAFETY: has_privs_of_role reads role membership from the catalog
    // caches; valid inside a transaction with any two role oids.
    Ok(unsafe { pg_sys::has_privs_of_role(identity::current_user(), table.owner) })
}

fn table_arg(relid: pg_sys::Oid) -> KmsResult<Table> {
    let t = Table::read(relid)?.ok_or_else(|| {
        refuse(
            ProtectCode::Prerequisite,
            "relation does not exist".into(),
            "Pass an existing table.",
        )
    })?;
    if t.relkind != "r" {
        return Err(refuse(
            ProtectCode::Unsupported,
            format!(
                "\"{}\" is not an ordinary table (partitioned tables, views and foreign tables cannot be protected)",
                t.qualified
            ),
            "Protect the columns of an ordinary table.",
        ));
    }
    if t.persistence == "t" {
        return Err(refuse(
            ProtectCode::Unsupported,
            format!("\"{}\" is a temporary table", t.qualified),
            "Protect the columns of a permanent or unlogged table.",
        ));
    }
    if !caller_owns(&t)? {
        return Err(refuse(
            ProtectCode::NotOwner,
            format!("must be owner of table {}", t.qualified),
            "Only the table's owner (who must also be a member of kms_admin) can protect or unprotect its columns.",
        ));
    }
    Ok(t)
}

/// What `kms_protect_column` was asked.
pub struct Request<'a> {
    pub relid: pg_sys::Oid,
    pub column: &'a str,
    pub key_name: &'a [u8],
    pub context: Option<&'a str>,
    pub deterministic: bool,
    pub blind_index_bits: Option<i32>,
    pub view_name: Option<&'a str>,
}

/// The body of SQL `kms_protect_column()`: the decrypted view's
/// qualified name.
pub fn protect_column_sql(req: Request<'_>) -> String {
    use crate::errors::OrRaise;
    // Every name pg_kms resolves (types, operators, functions) resolves in
    // pg_catalog, whatever the caller's search_path.
    identity::with_pinned_search_path(|| protect_column(req)).or_raise()
}

/// The body of SQL `kms_unprotect_column()`.
pub fn unprotect_column_sql(relid: pg_sys::Oid, column: &str) {
    use crate::errors::OrRaise;
    identity::with_pinned_search_path(|| unprotect_column(relid, column)).or_raise()
}

/// Protects a column; returns the decrypted view's qualified name.
pub fn protect_column(req: Request<'_>) -> KmsResult<String> {
    let t = table_arg(req.relid)?;
    let key_name = crate::crypto::names::key_name(req.key_name)?.to_string();
    let policies = policies_of(t.relid)?;
    let col = t.column(req.column).ok_or_else(|| {
        refuse(
            ProtectCode::UndefinedColumn,
            format!(
                "column \"{}\" of table {} does not exist",
                req.column, t.qualified
            ),
            "Pass one of the table's columns.",
        )
    })?;
    if policies.iter().any(|p| p.attname == col.name) {
        return Err(refuse(
            ProtectCode::Duplicate,
            format!(
                "column \"{}\" of table {} is protected already",
                col.name, t.qualified
            ),
            "See the kms_protected_columns view; kms_unprotect_column() removes a policy.",
        ));
    }
    if let Some(p) = policies
        .iter()
        .find(|p| p.columns_in_use().contains(&col.name.as_str()))
    {
        return Err(refuse(
            ProtectCode::InUse,
            format!(
                "column \"{}\" of table {} is used by the policy of column \"{}\"",
                col.name, t.qualified, p.attname
            ),
            "A blind-index or shadow column, or a column a context reads, cannot be protected itself.",
        ));
    }
    if col.generated || t.pk.contains(&col.name) {
        return Err(refuse(
            ProtectCode::Unsupported,
            format!(
                "column \"{}\" is a generated or primary key column",
                col.name
            ),
            "Protect ordinary columns: the decrypted view finds rows by the primary key.",
        ));
    }
    let inherits = spi::read::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i WHERE i.inhrelid = $1 OR i.inhparent = $1)",
        &[t.relid.into()],
    )?;
    if inherits == Some(true) {
        return Err(refuse(
            ProtectCode::Unsupported,
            format!("table {} takes part in inheritance", t.qualified),
            "Protect the columns of a table without inheritance parents or children: their rows would not be protected.",
        ));
    }
    if t.pk.is_empty() {
        return Err(refuse(
            ProtectCode::Prerequisite,
            format!("table {} has no primary key", t.qualified),
            "Add a primary key: the decrypted view's triggers update and delete rows by it.",
        ));
    }
    if !t.pk_builtin {
        return Err(refuse(
            ProtectCode::Unsupported,
            format!(
                "the primary key of table {} has a column of a type that is not built in",
                t.qualified
            ),
            "Protected tables need a primary key of built-in types (integer, bigint, uuid, text, ...).",
        ));
    }
    let et = crate::pg::datum::encrypted_text_oid()?;
    let source_type = if col.typid == et {
        None
    } else if col.typid == pg_sys::TEXTOID
        || col.typid == pg_sys::VARCHAROID
        || col.typid == pg_sys::BYTEAOID
    {
        Some(col.type_sql.clone())
    } else {
        return Err(refuse(
            ProtectCode::WrongType,
            format!(
                "column \"{}\" is of type {}",
                col.name, col.type_sql
            ),
            "Columns of type encrypted_text are protected as they are; text, varchar and bytea columns are encrypted online.",
        ));
    };
    let bytea = source_type.as_deref() == Some("bytea");
    if bytea && (req.deterministic || req.blind_index_bits.is_some()) {
        return Err(refuse(
            ProtectCode::Unsupported,
            "deterministic encryption and blind indexes are for text columns".into(),
            "Protect a bytea column without deterministic or blind_index_bits.",
        ));
    }
    if let Some(bits) = req.blind_index_bits {
        if !(16..=256).contains(&bits) || bits % 8 != 0 {
            return Err(KmsError::BadArgument {
                message: format!("invalid blind index size {bits}"),
                hint: "bits must be a multiple of 8 from 16 to 256; fewer bits leak less through collisions.",
            });
        }
    }
    // The caller must be allowed to encrypt with the key (grants), and the
    // key must exist and not be destroyed.
    let key = crate::keys::key_by_name(key_name.as_bytes())?;
    key.check(Privilege::Encrypt)?;
    if key.index.is_none() {
        return Err(KmsError::KeyDestroyed {
            key: key_name.clone(),
            action: "protect a column",
        });
    }
    // The context: columns other policies (and this one) need are off limits.
    let mut forbidden: Vec<String> = vec![col.name.clone()];
    for p in &policies {
        forbidden.push(p.attname.clone());
        forbidden.extend(p.shadow_column.clone());
        forbidden.extend(p.blind_index_column.clone());
    }
    let shadow = source_type
        .as_ref()
        .map(|_| format!("{}_kms_new", col.name));
    let bidx = req.blind_index_bits.map(|_| format!("{}_bidx", col.name));
    forbidden.extend(shadow.clone());
    forbidden.extend(bidx.clone());
    let context = match req.context {
        Some(expr) => {
            let a = context::analyze(t.relid, &t.qualified, &t.name, expr, None)?;
            if let Some(c) = a.columns.iter().find(|c| forbidden.contains(c)) {
                return Err(refuse(
                    ProtectCode::BadContext,
                    format!("the context expression reads column \"{c}\", which is protected or kept by pg_kms"),
                    "A context may read only the row's unprotected columns (e.g. its id).",
                ));
            }
            Some(a)
        }
        None => None,
    };
    for n in shadow.iter().chain(bidx.iter()) {
        check_name_len(n, "column")?;
        if t.column(n).is_some() {
            return Err(refuse(
                ProtectCode::DuplicateColumn,
                format!("table {} already has a column \"{n}\"", t.qualified),
                "pg_kms adds this column for the policy: rename or drop the existing one first.",
            ));
        }
    }
    let view_name = match (req.view_name, policies.first()) {
        (Some(v), _) => v.to_string(),
        (None, Some(p)) => p.view_name.clone(),
        (None, None) => format!("{}_decrypted", t.name),
    };
    if source_type.is_some() {
        let ours = policies.first().map(|p| p.view_name.as_str());
        refuse_dependents(&t, &col.name, ours)?;
    }
    check_name_len(&view_name, "view")?;
    check_name_len(&sqlgen::write_function_name(&view_name), "function")?;
    check_name_len(&sqlgen::convert_function_name(&t.name), "function")?;
    let old_view = policies
        .first()
        .map(|p| p.view_name.clone())
        .filter(|v| *v != view_name);
    refuse_taken_view(
        &t,
        &view_name,
        policies.first().map(|p| p.view_name.as_str()),
    )?;

    // The policy (as the catalog owner), audited.
    let state = if source_type.is_some() {
        "converting"
    } else {
        "protected"
    };
    let detail = serde_json::json!({
        "table": t.qualified,
        "column": col.name,
        "context": context.as_ref().map(|a| a.text.clone()),
        "deterministic": req.deterministic,
        "blind_index_bits": req.blind_index_bits,
        "view": view_name,
        "state": state,
    })
    .to_string();
    let ctx_text = context.as_ref().map(|a| a.text.clone());
    let ctx_cols = context.map(|a| a.columns).unwrap_or_default();
    let key_id = key.id as i32;
    let who = crate::errors::role_display(identity::current_user());
    crate::lifecycle::protect_act(|| {
        spi::exec(
            "UPDATE kms.protected_columns SET view_name = $2 WHERE relid::oid = $1",
            &[t.relid.into(), view_name.as_str().into()],
        )?;
        spi::exec(
            "INSERT INTO kms.protected_columns
                  (relid, attname, relname, relnamespace, key_id, context, context_columns, deterministic,
                   blind_index_bits, blind_index_column, source_type, shadow_column, view_name, state,
                   protected_by, started_at)
             VALUES ($1::pg_catalog.oid::pg_catalog.regclass, $2, $3, $4, $5, $6, $7::name[], $8, $9, $10, $11, $12, $13, $14, $15,
                     CASE WHEN $14 = 'converting' THEN pg_catalog.now() END)",
            &[
                t.relid.into(),
                col.name.as_str().into(),
                t.name.as_str().into(),
                t.schema.as_str().into(),
                key_id.into(),
                ctx_text.clone().into(),
                ctx_cols.clone().into(),
                req.deterministic.into(),
                req.blind_index_bits.into(),
                bidx.clone().into(),
                source_type.clone().into(),
                shadow.clone().into(),
                view_name.as_str().into(),
                state.into(),
                who.as_str().into(),
            ],
        )?;
        Ok(("protect_column", key_name.clone(), detail.clone()))
    })?;

    // The table's new columns, as its owner.
    let mut stmts = Vec::new();
    if let Some(s) = &shadow {
        stmts.push(format!(
            "ALTER TABLE {} ADD COLUMN {} {}.encrypted_text",
            t.qualified,
            quote_ident(s),
            extension_schema()?
        ));
    }
    if let Some(b) = &bidx {
        stmts.push(format!(
            "ALTER TABLE {} ADD COLUMN {} pg_catalog.bytea",
            t.qualified,
            quote_ident(b)
        ));
        stmts.push(format!(
            "CREATE INDEX ON {} ({})",
            t.qualified,
            quote_ident(b)
        ));
        if source_type.is_none() {
            // An encrypted column's blind index is computed on write; rows
            // written before have none (the README says how to fill it).
        }
    }
    run_as_owner(&t, &stmts)?;
    regenerate(t.relid, old_view.as_deref(), true)?;
    // What the DDL guard checks holds from the start (e.g. no BEFORE
    // trigger of the table fires after the conversion trigger).
    guard::check(
        guard::Event::DdlCommandEnd,
        Table::read(t.relid)?.as_ref(),
        &policies_of(t.relid)?,
    )?;
    Ok(format!(
        "{}.{}",
        quote_ident(&t.schema),
        quote_ident(&view_name)
    ))
}

/// A plaintext column to convert must not be used by indexes,
/// constraints, views, rules, policies or generated columns: the swap
/// drops it.
fn refuse_dependents(t: &Table, column: &str, our_view: Option<&str>) -> KmsResult<()> {
    let ours = our_view.map(|v| format!("{}.{}", quote_ident(&t.schema), quote_ident(v)));
    let users = identity::with_pinned_search_path(|| {
        spi::read::<String>(
            "SELECT pg_catalog.string_agg(DISTINCT pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid), ', ')
               FROM pg_catalog.pg_depend d
               JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
              WHERE d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid = $1
                AND a.attname = $2 AND d.deptype IN ('n', 'a')
                AND NOT (d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = $1)
                -- pg_kms's own decrypted view (rebuilt at the swap)
                AND NOT (d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
                         AND (SELECT r.ev_class FROM pg_catalog.pg_rewrite r WHERE r.oid = d.objid)
                             = pg_catalog.to_regclass($3))",
            &[t.relid.into(), column.into(), ours.into()],
        )
    })?;
    match users {
        Some(u) => Err(refuse(
            ProtectCode::InUse,
            format!("column \"{column}\" is used by {u}"),
            "Drop those objects first (the conversion replaces the column); afterwards, a UNIQUE index on a deterministic column or an index on the blind-index column gives the same lookups.",
        )),
        None => Ok(()),
    }
}

fn refuse_taken_view(t: &Table, view: &str, ours: Option<&str>) -> KmsResult<()> {
    if Some(view) == ours {
        return Ok(());
    }
    let taken = spi::read::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
          WHERE n.nspname OPERATOR(pg_catalog.=) $1 AND c.relname OPERATOR(pg_catalog.=) $2)",
        &[t.schema.as_str().into(), view.into()],
    )?;
    if taken == Some(true) {
        return Err(refuse(
            ProtectCode::DuplicateView,
            format!(
                "relation \"{view}\" already exists in schema \"{}\"",
                t.schema
            ),
            "Pass view_name => '<another name>' for the decrypted view.",
        ));
    }
    Ok(())
}

/// The body of SQL `kms_unprotect_column()`.
pub fn unprotect_column(relid: pg_sys::Oid, column: &str) -> KmsResult<()> {
    let t = table_arg(relid)?;
    let policies = policies_of(t.relid)?;
    let p = policies
        .iter()
        .find(|p| p.attname == column)
        .ok_or_else(|| {
            refuse(
                ProtectCode::NotProtected,
                format!(
                    "column \"{column}\" of table {} is not protected",
                    t.qualified
                ),
                "See the kms_protected_columns view.",
            )
        })?
        .clone();
    if p.state == PolicyState::Protected && p.context.is_some() {
        let held = identity::as_table_owner(t.owner, || {
            // Rows hidden by row-level security count too: with it off, a
            // policy that applies makes the query fail instead of hiding
            // rows (the scope rolls the setting back).
            spi::exec(
                "SELECT pg_catalog.set_config('row_security', 'off', true)",
                &[],
            )?;
            spi::read::<bool>(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM ONLY {} kms_t WHERE kms_t.{} IS NOT NULL)",
                    t.qualified,
                    quote_ident(&p.attname)
                ),
                &[],
            )
        })?;
        if held == Some(true) {
            return Err(refuse(
                ProtectCode::InUse,
                format!(
                    "column \"{column}\" holds values sealed with the policy's context; without the policy they could not be decrypted through pg_kms's view or re-encrypted"
                ),
                "Keep the policy, or first copy the plaintext elsewhere through the decrypted view and set the column to NULL.",
            ));
        }
    }
    let detail = serde_json::json!({
        "table": t.qualified,
        "column": p.attname,
        "state": if p.state == PolicyState::Converting { "converting (cancelled)" } else { "protected" },
    })
    .to_string();
    crate::lifecycle::protect_act(|| {
        spi::exec(
            "DELETE FROM kms.protected_columns WHERE relid::oid = $1 AND attname = $2",
            &[t.relid.into(), p.attname.as_str().into()],
        )?;
        Ok(("unprotect_column", p.key_name.clone(), detail.clone()))
    })?;
    // A cancelled conversion: the plaintext column is untouched; the
    // shadow and blind-index columns pg_kms added go.
    // The last policy of the table: its view goes too.
    let last = (policies.len() == 1).then_some(p.view_name.as_str());
    if p.state == PolicyState::Converting {
        // The view (it shows the blind-index column) goes first, then the
        // columns pg_kms added; the view and trigger are rebuilt after.
        let mut stmts = vec![format!(
            "DROP VIEW IF EXISTS {}.{}",
            quote_ident(&t.schema),
            quote_ident(&p.view_name)
        )];
        for c in p.shadow_column.iter().chain(p.blind_index_column.iter()) {
            stmts.push(format!(
                "ALTER TABLE {} DROP COLUMN IF EXISTS {}",
                t.qualified,
                quote_ident(c)
            ));
        }
        run_as_owner(&t, &stmts)?;
    }
    regenerate(t.relid, last, true)
}

/// Rebuilds the decrypted view, its trigger and the conversion trigger of
/// `relid` from its policies (drops them when it has none left). `force`:
/// rebuild even if the view's columns are already those expected (the
/// DDL guard passes false: it only follows added or dropped columns).
pub fn regenerate(relid: pg_sys::Oid, old_view: Option<&str>, force: bool) -> KmsResult<()> {
    identity::with_pinned_search_path(|| regenerate_pinned(relid, old_view, force))
}

fn regenerate_pinned(relid: pg_sys::Oid, old_view: Option<&str>, force: bool) -> KmsResult<()> {
    let Some(t) = Table::read(relid)? else {
        return Ok(());
    };
    let policies = policies_of(relid)?;
    let ext = extension_schema()?;
    let gen = sqlgen::Gen::new(&t, &policies, &ext)?;
    // Objects pg_kms made for a former owner of the table (after ALTER
    // TABLE ... OWNER TO) go to the new owner, by the user who changed the
    // table's owner (who may: they owned it and are a member of the new
    // owner, or are a superuser); no user code runs in ALTER ... OWNER.
    // The former owner would otherwise keep the INSTEAD OF function every
    // writer runs.
    {
        let _internal = InternalDdl::enter();
        for stmt in gen.give_to_table_owner()? {
            spi::exec(&stmt, &[])?;
        }
    }
    if !force && !policies.is_empty() && gen.view_is_current()? {
        return Ok(());
    }
    let mut stmts = Vec::new();
    if let Some(v) = old_view {
        stmts.push(format!(
            "DROP VIEW IF EXISTS {}.{}",
            quote_ident(&t.schema),
            quote_ident(v)
        ));
        stmts.push(format!(
            "DROP FUNCTION IF EXISTS {}.{}()",
            quote_ident(&t.schema),
            quote_ident(&sqlgen::write_function_name(v))
        ));
    }
    stmts.extend(gen.statements()?);
    run_as_owner(&t, &stmts)
}
