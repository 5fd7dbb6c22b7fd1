//! Context expressions of protected columns: checked by PostgreSQL's own
//! parse analysis, stored as PostgreSQL deparses them, and rendered for
//! each place that evaluates them (the decrypted view, the triggers, the
//! worker) with a row alias.
//!
//! An expression is accepted when it is one expression over the table's
//! own ordinary columns (no system column, no whole-row reference, no
//! subquery, aggregate, window function or set-returning function),
//! immutable (the same row gives the same text in every session), of type
//! `text` or `varchar`. It is analysed with
//! `search_path = pg_catalog, pg_temp`, as it is evaluated everywhere:
//! functions of other schemas must be schema-qualified. What is stored and
//! embedded in generated SQL is PostgreSQL's deparsed form, never the text
//! as given (no comment or stray parenthesis can leak into generated SQL).

use crate::errors::{KmsError, KmsResult, ProtectCode};
use crate::pg::subxact;
use pgrx::pg_sys;
use pgrx::PgList;
use std::ffi::{CStr, CString};

/// A checked context expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analyzed {
    /// Deparsed, with columns prefixed by the alias asked for (or bare).
    pub text: String,
    /// The columns it reads, in attribute order.
    pub columns: Vec<String>,
}

fn bad(message: String) -> KmsError {
    KmsError::Protect {
        code: ProtectCode::BadContext,
        message,
        hint: "A context is one immutable SQL expression of type text over the row's own columns, e.g. 'id::text' or 'tenant_id::text || '':'' || id::text'; it may not read other tables or protected columns, and functions outside pg_catalog must be schema-qualified.".into(),
    }
}

/// Analyses `expr` over table `relid` (`table`: its qualified, quoted
/// name; `relname`: its bare name, the alias bare column references
/// resolve against). `alias`: print every column reference with this
/// prefix (`new`, `old`, `kms_t`), or None for bare names.
pub fn analyze(
    relid: pg_sys::Oid,
    table: &str,
    relname: &str,
    expr: &str,
    alias: Option<&str>,
) -> KmsResult<Analyzed> {
    if expr.trim().is_empty() {
        return Err(bad("the context expression is empty".into()));
    }
    let sql = format!(
        "SELECT ({expr}) FROM ONLY {table} AS {}",
        crate::errors::quote_ident(relname)
    );
    let Ok(csql) = CString::new(sql) else {
        return Err(bad("the context expression contains a NUL byte".into()));
    };
    let alias_c = CString::new(alias.unwrap_or(relname)).map_err(|_| bad("bad alias".into()))?;
    let prefix = alias.is_some();
    let r = crate::pg::identity::with_pinned_search_path(|| {
        subxact::catch(move || analyze_in_server(relid, &csql, &alias_c, prefix))
    });
    match r {
        Ok(inner) => inner,
        Err(e) => Err(bad(format!(
            "invalid context expression: {} (SQLSTATE {})",
            e.message, e.sqlstate
        ))),
    }
}

fn analyze_in_server(
    relid: pg_sys::Oid,
    sql: &CStr,
    alias: &CStr,
    prefix: bool,
) -> KmsResult<Analyzed> {
    // SAFETY: runs inside a (sub)transaction; every pointer comes from the
    // parser and analyzer, which palloc them in the current memory context
    // and raise an ERROR (caught by the caller's subtransaction) on bad
    // input; lists are read within their lengths.
    unsafe {
        let raw = PgList::<pg_sys::RawStmt>::from_pg(pg_sys::pg_parse_query(sql.as_ptr()));
        if raw.len() != 1 {
            return Err(bad("the context must be one expression".into()));
        }
        let stmt = raw.get_ptr(0).expect("one statement");
        let query = pg_sys::parse_analyze_fixedparams(
            stmt,
            sql.as_ptr(),
            std::ptr::null(),
            0,
            std::ptr::null_mut(),
        );
        let q = &*query;
        let tl = PgList::<pg_sys::TargetEntry>::from_pg(q.targetList);
        let rt = PgList::<pg_sys::RangeTblEntry>::from_pg(q.rtable);
        let plain = q.commandType == pg_sys::CmdType::CMD_SELECT
            && q.setOperations.is_null()
            && q.cteList.is_null()
            && (q.jointree.is_null() || (*q.jointree).quals.is_null())
            && q.groupClause.is_null()
            && q.havingQual.is_null()
            && q.sortClause.is_null()
            && q.distinctClause.is_null()
            && q.limitCount.is_null()
            && q.limitOffset.is_null()
            && q.rowMarks.is_null()
            && q.windowClause.is_null()
            && tl.len() == 1
            && rt.len() == 1;
        if !plain {
            return Err(bad(
                "the context must be a single expression over the table's columns".into(),
            ));
        }
        // The one relation is the table itself (a `) FROM other --` would
        // otherwise have the checks judge another relation's columns).
        let rte = rt.get_ptr(0).expect("one relation");
        if (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION || (*rte).relid != relid || (*rte).inh {
            return Err(bad(
                "the context must be a single expression over the table's columns".into(),
            ));
        }
        if q.hasSubLinks || q.hasAggs || q.hasWindowFuncs || q.hasTargetSRFs {
            return Err(bad(
                "the context may not use subqueries, aggregates, window or set-returning functions"
                    .into(),
            ));
        }
        let tle = tl.get_ptr(0).expect("one target");
        let node = (*tle).expr as *mut pg_sys::Node;
        let ty = pg_sys::exprType(node);
        if ty != pg_sys::TEXTOID && ty != pg_sys::VARCHAROID {
            let tname = CStr::from_ptr(pg_sys::format_type_be(ty)).to_string_lossy();
            return Err(bad(format!(
                "the context expression is of type {tname}, not text (cast it, e.g. id::text)"
            )));
        }
        // Not volatile is not enough: a stable expression (a timestamptz or
        // date cast to text, `text || integer`) follows settings such as
        // TimeZone or DateStyle, so another session (or the worker) would
        // compute another context and fail to open the value.
        if pg_sys::contain_mutable_functions(node) {
            return Err(bad(
                "the context expression is not immutable: it must give the same text for the same row in every session, whatever its settings (cast each column to text explicitly, e.g. tenant_id::text || ':' || id::text)"
                    .into(),
            ));
        }
        // A function of a temporary schema would be stored as pg_temp_N
        // and vanish (or change owner) with the session.
        let mut temp = false;
        pg_sys::check_functions_in_node(
            node,
            Some(function_in_temp_schema),
            (&mut temp as *mut bool).cast(),
        );
        if temp {
            return Err(bad(
                "the context calls a function of a temporary schema".into()
            ));
        }
        let mut attrs: *mut pg_sys::Bitmapset = std::ptr::null_mut();
        pg_sys::pull_varattnos(node, 1, &mut attrs);
        let mut columns = Vec::new();
        let mut m = -1;
        loop {
            m = pg_sys::bms_next_member(attrs, m);
            if m < 0 {
                break;
            }
            let attnum = m + pg_sys::FirstLowInvalidHeapAttributeNumber;
            if attnum <= 0 {
                return Err(bad(
                    "the context may not read system columns (ctid changes when a row is updated) or the whole row"
                        .into(),
                ));
            }
            let name = pg_sys::get_attname(relid, attnum as i16, false);
            columns.push(CStr::from_ptr(name).to_string_lossy().into_owned());
        }
        let dp = pg_sys::deparse_context_for(alias.as_ptr(), relid);
        let text = pg_sys::deparse_expression(node, dp, prefix, false);
        Ok(Analyzed {
            text: CStr::from_ptr(text).to_string_lossy().into_owned(),
            columns,
        })
    }
}

/// `check_functions_in_node` callback: records (in `*ctx`, a bool) whether
/// a function lives in a temporary schema. Never stops the walk early.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn function_in_temp_schema(
    func: pg_sys::Oid,
    ctx: *mut std::ffi::c_void,
) -> bool {
    // SAFETY: `ctx` is the &mut bool passed by `analyze_in_server`, alive
    // for the walk; get_func_namespace and isAnyTempNamespace read the
    // syscache for an existing function's oid.
    unsafe {
        if pg_sys::isAnyTempNamespace(pg_sys::get_func_namespace(func)) {
            *(ctx as *mut bool) = true;
        }
    }
    false
}
