//! The SQL text of what pg_kms keeps on a protected table: the decrypted
//! view (`security_invoker`), its INSTEAD OF trigger function, and the
//! conversion trigger of columns being encrypted online.
//!
//! Everything generated is schema-qualified (operators as
//! `OPERATOR(pg_catalog.=)`); the functions are `SECURITY INVOKER`, and
//! context expressions are embedded only in PostgreSQL's deparsed form
//! (see [`super::context`]).

use super::{context, Policy, PolicyState, Table};
use crate::errors::{quote_ident, KmsResult};
use pgrx::pg_sys;
use pgrx::prelude::*;

/// The INSTEAD OF trigger function of a decrypted view.
pub fn write_function_name(view: &str) -> String {
    format!("{view}_kms_write")
}

/// The conversion trigger function of a table.
pub fn convert_function_name(table: &str) -> String {
    format!("{table}_kms_convert")
}

/// The conversion trigger's name: it sorts after ordinary trigger names,
/// so it fires after the table's other BEFORE triggers changed the row.
pub const CONVERT_TRIGGER: &str = "zzzz_kms_convert";
/// The decrypted view's INSTEAD OF trigger.
pub const VIEW_TRIGGER: &str = "kms_write";

/// A policy with its context rendered for each row alias.
struct Rendered<'a> {
    p: &'a Policy,
    /// Over the view's `kms_t`, NEW and OLD (None: no context).
    on_table: Option<String>,
    on_new: Option<String>,
    on_old: Option<String>,
}

pub struct Gen<'a> {
    t: &'a Table,
    ps: Vec<Rendered<'a>>,
    ext: &'a str,
}

fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl<'a> Gen<'a> {
    pub fn new(t: &'a Table, policies: &'a [Policy], ext: &'a str) -> KmsResult<Gen<'a>> {
        let mut ps = Vec::new();
        for p in policies {
            let render = |alias: &str| -> KmsResult<Option<String>> {
                p.context
                    .as_deref()
                    .map(|c| {
                        context::analyze(t.relid, &t.qualified, &t.name, c, Some(alias))
                            .map(|a| a.text)
                    })
                    .transpose()
            };
            ps.push(Rendered {
                p,
                on_table: render("kms_t")?,
                on_new: render("new")?,
                on_old: render("old")?,
            });
        }
        Ok(Gen { t, ps, ext })
    }

    fn view_name(&self) -> Option<&str> {
        self.ps.first().map(|r| r.p.view_name.as_str())
    }

    fn qualified_in_schema(&self, name: &str) -> String {
        format!("{}.{}", quote_ident(&self.t.schema), quote_ident(name))
    }

    fn protected(&self, col: &str) -> Option<&Rendered<'a>> {
        self.ps
            .iter()
            .find(|r| r.p.attname == col && r.p.state == PolicyState::Protected)
    }

    fn converting(&self) -> impl Iterator<Item = &Rendered<'a>> {
        self.ps
            .iter()
            .filter(|r| r.p.state == PolicyState::Converting)
    }

    fn is_shadow(&self, col: &str) -> bool {
        self.ps
            .iter()
            .any(|r| r.p.shadow_column.as_deref() == Some(col))
    }

    /// The blind-index column's policy, if `col` is one.
    fn bidx_of(&self, col: &str) -> Option<&Rendered<'a>> {
        self.ps
            .iter()
            .find(|r| r.p.blind_index_column.as_deref() == Some(col))
    }

    /// The view's columns, in table order (shadow columns hidden).
    fn view_columns(&self) -> Vec<&super::Column> {
        self.t
            .columns
            .iter()
            .filter(|c| !self.is_shadow(&c.name))
            .collect()
    }

    /// Whether the view exists with exactly the expected column names.
    pub fn view_is_current(&self) -> KmsResult<bool> {
        let Some(v) = self.view_name() else {
            return Ok(false);
        };
        let expected: Vec<String> = self.view_columns().iter().map(|c| c.name.clone()).collect();
        let actual = crate::pg::spi::read::<Vec<String>>(
            "SELECT pg_catalog.array_agg(a.attname::pg_catalog.text ORDER BY a.attnum)
               FROM pg_catalog.pg_attribute a
              WHERE a.attrelid OPERATOR(pg_catalog.=) pg_catalog.to_regclass($1)
                AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped",
            &[self.qualified_in_schema(v).as_str().into()],
        )?;
        Ok(actual == Some(expected))
    }

    /// `ALTER ... OWNER TO` statements for the view and the trigger
    /// functions pg_kms made for the table that belong to another role
    /// than the table's owner now.
    pub fn give_to_table_owner(&self) -> KmsResult<Vec<String>> {
        let new = crate::errors::role_display(self.t.owner);
        let mut out = Vec::new();
        let mut check = |q: &str, name: String, kind: &str| -> KmsResult<()> {
            if let Some(owner) = crate::pg::spi::read::<pg_sys::Oid>(q, &[name.as_str().into()])? {
                if owner != self.t.owner {
                    out.push(format!("ALTER {kind} {name} OWNER TO {new}"));
                }
            }
            Ok(())
        };
        const VIEW: &str =
            "SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = pg_catalog.to_regclass($1)";
        const FUNCTION: &str =
            "SELECT p.proowner FROM pg_catalog.pg_proc p WHERE p.oid = pg_catalog.to_regprocedure($1)";
        if let Some(v) = self.view_name() {
            check(VIEW, self.qualified_in_schema(v), "VIEW")?;
            check(
                FUNCTION,
                format!("{}()", self.qualified_in_schema(&write_function_name(v))),
                "FUNCTION",
            )?;
        }
        check(
            FUNCTION,
            format!(
                "{}()",
                self.qualified_in_schema(&convert_function_name(&self.t.name))
            ),
            "FUNCTION",
        )?;
        Ok(out)
    }

    fn decrypt_expr(&self, r: &Rendered<'_>) -> String {
        let c = format!("kms_t.{}", quote_ident(&r.p.attname));
        let ctx = r.on_table.as_deref().unwrap_or("NULL");
        let f = if r.p.is_bytea() {
            "kms_decrypt_bytea"
        } else {
            "kms_decrypt"
        };
        let e = format!("{}.{f}({c}, {ctx})", self.ext);
        match r.p.source_type.as_deref() {
            Some(t) if t != "text" && t != "bytea" => format!("({e})::{t}"),
            _ => e,
        }
    }

    /// The ciphertext of the plaintext in `row`.`col`, with the context
    /// computed from that row.
    fn encrypt_expr(&self, r: &Rendered<'_>, row: &str, ctx: Option<&str>) -> String {
        let v = format!("{row}.{}", quote_ident(&r.p.attname));
        let ctx = ctx.unwrap_or("NULL");
        let key = lit(&r.p.key_name);
        if r.p.is_bytea() {
            format!("{}.kms_encrypt_bytea({v}, {key}, {ctx})", self.ext)
        } else if r.p.deterministic {
            format!(
                "{}.kms_encrypt_deterministic({v}::pg_catalog.text, {key}, {ctx})",
                self.ext
            )
        } else {
            format!(
                "{}.kms_encrypt({v}::pg_catalog.text, {key}, {ctx})",
                self.ext
            )
        }
    }

    fn bidx_expr(&self, r: &Rendered<'_>, row: &str) -> String {
        format!(
            "{}.kms_blind_index({row}.{}::pg_catalog.text, {}, NULL, {})",
            self.ext,
            quote_ident(&r.p.attname),
            lit(&r.p.key_name),
            r.p.blind_index_bits.unwrap_or(256)
        )
    }

    /// Plaintext and context unchanged between OLD and NEW.
    fn unchanged(&self, r: &Rendered<'_>) -> String {
        let c = quote_ident(&r.p.attname);
        let mut s = same(&format!("new.{c}"), &format!("old.{c}"));
        if let (Some(n), Some(o)) = (&r.on_new, &r.on_old) {
            s.push_str(&format!(" AND {}", same(n, o)));
        }
        s
    }

    fn view_sql(&self, view: &str) -> Vec<String> {
        let qv = self.qualified_in_schema(view);
        let cols: Vec<String> = self
            .view_columns()
            .iter()
            .map(|c| match self.protected(&c.name) {
                Some(r) => format!("{} AS {}", self.decrypt_expr(r), quote_ident(&c.name)),
                None => format!("kms_t.{}", quote_ident(&c.name)),
            })
            .collect();
        let mut out = vec![
            format!("DROP VIEW IF EXISTS {qv}"),
            format!(
                "CREATE VIEW {qv} WITH (security_invoker = true) AS SELECT {} FROM {} AS kms_t",
                cols.join(", "),
                self.t.qualified
            ),
            format!(
                "COMMENT ON VIEW {qv} IS {}",
                lit(&format!(
                    "Decrypted view of {} kept by pg_kms (kms_protect_column); rebuilt by pg_kms, do not edit.",
                    self.t.qualified
                ))
            ),
        ];
        for c in self.view_columns() {
            if self.protected(&c.name).is_some() || self.bidx_of(&c.name).is_some() {
                continue;
            }
            if let Some(d) = &c.default {
                out.push(format!(
                    "ALTER VIEW {qv} ALTER COLUMN {} SET DEFAULT {d}",
                    quote_ident(&c.name)
                ));
            }
        }
        out
    }

    /// The view gets the table's grants of SELECT, INSERT, UPDATE, DELETE.
    /// An identity column's default on the view calls `nextval()` of its
    /// sequence, which needs USAGE (an INSERT into the table does not):
    /// INSERT grantees get it.
    fn grants_sql(&self, view: &str) -> KmsResult<Vec<String>> {
        let qv = self.qualified_in_schema(view);
        let sequences: Vec<&str> = self
            .t
            .columns
            .iter()
            .filter_map(|c| c.identity_sequence.as_deref())
            .collect();
        Spi::connect(|c| -> Result<Vec<String>, pgrx::spi::Error> {
            let mut out = Vec::new();
            for r in c.select(
                "SELECT CASE WHEN a.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'
                             ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END,
                        a.privilege_type, a.is_grantable
                   FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
                  WHERE c.oid OPERATOR(pg_catalog.=) $1 AND a.grantee OPERATOR(pg_catalog.<>) c.relowner
                    AND a.privilege_type OPERATOR(pg_catalog.=) ANY ('{SELECT,INSERT,UPDATE,DELETE}'::pg_catalog.text[])",
                None,
                &[self.t.relid.into()],
            )? {
                let who = r.get::<String>(1)?.unwrap_or_default();
                let what = r.get::<String>(2)?.unwrap_or_default();
                let with = if r.get::<bool>(3)?.unwrap_or(false) {
                    " WITH GRANT OPTION"
                } else {
                    ""
                };
                out.push(format!("GRANT {what} ON {qv} TO {who}{with}"));
                if what == "INSERT" {
                    for seq in &sequences {
                        out.push(format!("GRANT USAGE ON SEQUENCE {seq} TO {who}"));
                    }
                }
            }
            Ok(out)
        })
        .map_err(crate::errors::KmsError::spi)
    }

    fn write_function_sql(&self, view: &str) -> String {
        let t = &self.t;
        let mut ins_cols = Vec::new();
        let mut ins_vals = Vec::new();
        let mut sets = Vec::new();
        let mut ret = Vec::new();
        let mut overriding = false;
        for c in &t.columns {
            // RETURNING reads only what the table computes itself
            // (generated columns): NEW already holds the rest, and a writer
            // with INSERT but no SELECT can then write through the view.
            if c.generated || self.is_shadow(&c.name) {
                if c.generated {
                    ret.push(c.name.clone());
                }
                continue;
            }
            let q = quote_ident(&c.name);
            if let Some(r) = self.protected(&c.name) {
                ins_cols.push(q.clone());
                ins_vals.push(self.encrypt_expr(r, "new", r.on_new.as_deref()));
                sets.push(format!(
                    "{q} = CASE WHEN {} THEN kms_t.{q} ELSE {} END",
                    self.unchanged(r),
                    self.encrypt_expr(r, "new", r.on_new.as_deref())
                ));
                continue;
            }
            if let Some(r) = self.bidx_of(&c.name) {
                // While converting, the table's own trigger fills it.
                if r.p.state == PolicyState::Protected {
                    ins_cols.push(q.clone());
                    ins_vals.push(self.bidx_expr(r, "new"));
                    let pc = quote_ident(&r.p.attname);
                    sets.push(format!(
                        "{q} = CASE WHEN {} THEN kms_t.{q} ELSE {} END",
                        same(&format!("new.{pc}"), &format!("old.{pc}")),
                        self.bidx_expr(r, "new")
                    ));
                }
                continue;
            }
            ins_cols.push(q.clone());
            ins_vals.push(format!("new.{q}"));
            if c.identity == Some('a') {
                overriding = true;
            } else {
                sets.push(format!("{q} = new.{q}"));
            }
        }
        let returning = if ret.is_empty() {
            String::new()
        } else {
            format!(
                " RETURNING {} INTO {}",
                ret.iter()
                    .map(|c| format!("kms_t.{}", quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(", "),
                ret.iter()
                    .map(|c| format!("new.{}", quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let pk =
            t.pk.iter()
                .map(|c| {
                    let q = quote_ident(c);
                    format!("kms_t.{q} OPERATOR(pg_catalog.=) old.{q}")
                })
                .collect::<Vec<_>>()
                .join(" AND ");
        let body = format!(
            "BEGIN
    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
        INSERT INTO {tq} AS kms_t ({cols}){ov} VALUES ({vals}){returning};
        RETURN new;
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
        UPDATE {tq} AS kms_t SET {sets} WHERE {pk}{returning};
        IF NOT FOUND THEN RETURN NULL; END IF;
        RETURN new;
    END IF;
    DELETE FROM {tq} AS kms_t WHERE {pk};
    IF NOT FOUND THEN RETURN NULL; END IF;
    RETURN old;
END",
            tq = t.qualified,
            cols = ins_cols.join(", "),
            ov = if overriding {
                " OVERRIDING SYSTEM VALUE"
            } else {
                ""
            },
            vals = ins_vals.join(", "),
            sets = sets.join(", "),
        );
        function_sql(&self.qualified_in_schema(&write_function_name(view)), &body)
    }

    fn convert_function_sql(&self) -> String {
        let mut body = String::from("BEGIN\n");
        for r in self.converting() {
            let s = quote_ident(r.p.shadow_column.as_deref().unwrap_or_default());
            let c = quote_ident(&r.p.attname);
            let mut assign = format!(
                "new.{s} := {};",
                self.encrypt_expr(r, "new", r.on_new.as_deref())
            );
            if let Some(b) = &r.p.blind_index_column {
                assign.push_str(&format!(
                    " new.{} := {};",
                    quote_ident(b),
                    self.bidx_expr(r, "new")
                ));
            }
            let mut changed = format!(
                "new.{s} IS NULL OR NOT {}",
                same(&format!("new.{c}"), &format!("old.{c}"))
            );
            if let (Some(n), Some(o)) = (&r.on_new, &r.on_old) {
                changed.push_str(&format!(" OR NOT {}", same(n, o)));
            }
            body.push_str(&format!(
                "    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN\n        {assign}\n    ELSIF {changed} THEN\n        {assign}\n    END IF;\n"
            ));
        }
        body.push_str("    RETURN new;\nEND");
        function_sql(
            &self.qualified_in_schema(&convert_function_name(&self.t.name)),
            &body,
        )
    }

    /// Every statement that brings the table's pg_kms objects in step with
    /// its policies (run as the table's owner).
    pub fn statements(&self) -> KmsResult<Vec<String>> {
        let t = &self.t;
        let mut out = Vec::new();
        let convert_fn = self.qualified_in_schema(&convert_function_name(&t.name));
        if self.converting().next().is_some() {
            out.push(self.convert_function_sql());
            out.push(format!(
                "CREATE OR REPLACE TRIGGER {CONVERT_TRIGGER} BEFORE INSERT OR UPDATE ON {} FOR EACH ROW EXECUTE FUNCTION {convert_fn}()",
                t.qualified
            ));
            out.push(format!(
                "ALTER TABLE {} ENABLE ALWAYS TRIGGER {CONVERT_TRIGGER}",
                t.qualified
            ));
        } else {
            out.push(format!(
                "DROP TRIGGER IF EXISTS {CONVERT_TRIGGER} ON {}",
                t.qualified
            ));
            out.push(format!("DROP FUNCTION IF EXISTS {convert_fn}()"));
        }
        let Some(view) = self.view_name() else {
            return Ok(out);
        };
        out.extend(self.view_sql(view));
        out.extend(self.grants_sql(view)?);
        out.push(self.write_function_sql(view));
        out.push(format!(
            "CREATE TRIGGER {VIEW_TRIGGER} INSTEAD OF INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION {}()",
            self.qualified_in_schema(view),
            self.qualified_in_schema(&write_function_name(view))
        ));
        Ok(out)
    }
}

/// `a` and `b` are equal or both NULL (never NULL itself), with
/// pg_catalog's `=` whatever the search_path.
fn same(a: &str, b: &str) -> String {
    format!("COALESCE(({a}) OPERATOR(pg_catalog.=) ({b}), ({a}) IS NULL AND ({b}) IS NULL)")
}

/// A plpgsql trigger function, SECURITY INVOKER; the dollar-quote tag is
/// one that does not occur in the body. No `SET search_path` (it costs a
/// settings save and restore per row, a third of a view write): every
/// name in the body is schema-qualified or resolves in pg_catalog first
/// (the context is deparsed with only pg_catalog on the path), and it runs
/// as the writer, whose own search_path can only mislead the writer.
fn function_sql(name: &str, body: &str) -> String {
    let mut tag = String::from("$kms$");
    let mut n = 0;
    while body.contains(&tag) {
        n += 1;
        tag = format!("$kms{n}$");
    }
    format!(
        "CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql SECURITY INVOKER
    AS {tag}
{body}
{tag}"
    )
}
