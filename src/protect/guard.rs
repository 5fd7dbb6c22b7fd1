//! The DDL guard (event triggers `kms_protect_ddl_end` and
//! `kms_protect_sql_drop`): refuses DDL that would strand protected
//! values, and rebuilds a decrypted view when its table gained or lost an
//! unprotected column. pg_kms's own DDL ([`super::internal_ddl`]) and
//! extension scripts are let through.

use super::{policies_of, regenerate, Policy, PolicyState, Table};
use crate::errors::{KmsError, KmsResult, ProtectCode};
use pgrx::pg_sys;
use pgrx::prelude::*;

thread_local! {
    /// The current DDL command creates a trigger (see `fire_pinned`).
    static CREATING_TRIGGER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Which event fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    DdlCommandEnd,
    SqlDrop,
}

const HINT: &str = "Protected columns, their blind-index and shadow columns and the columns their context reads cannot be dropped, renamed or retyped, nor their table dropped, renamed or moved, while the policy exists: run kms_unprotect_column() first (see the kms_protected_columns view).";

fn refused(event: Event, message: String) -> KmsError {
    KmsError::Protect {
        code: if event == Event::SqlDrop {
            ProtectCode::Dropped
        } else {
            ProtectCode::InUse
        },
        message,
        hint: HINT.into(),
    }
}

/// The tables the current DDL command touched (by the event's own lists):
/// tables and their columns, the tables of triggers, the tables of a
/// schema (ALTER SCHEMA ... RENAME), and the parents of those tables
/// (CREATE TABLE ... INHERITS, ALTER TABLE ... INHERIT).
fn touched(event: Event) -> KmsResult<Vec<pg_sys::Oid>> {
    let q = match event {
        Event::DdlCommandEnd => {
            "WITH d AS (SELECT * FROM pg_catalog.pg_event_trigger_ddl_commands()),
                  r AS (SELECT d.objid AS x FROM d
                         WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                           AND d.object_type = ANY ('{table,\"table column\"}'::pg_catalog.text[])
                        UNION SELECT t.tgrelid FROM d JOIN pg_catalog.pg_trigger t ON t.oid = d.objid
                         WHERE d.classid = 'pg_catalog.pg_trigger'::pg_catalog.regclass
                        UNION SELECT c.oid FROM d JOIN pg_catalog.pg_class c ON c.relnamespace = d.objid
                         WHERE d.classid = 'pg_catalog.pg_namespace'::pg_catalog.regclass
                           AND c.relkind = 'r')
             SELECT x FROM r
             UNION SELECT i.inhparent FROM pg_catalog.pg_inherits i WHERE i.inhrelid IN (SELECT x FROM r)"
        }
        Event::SqlDrop => {
            "SELECT DISTINCT CASE WHEN d.object_type = 'trigger'
                                  THEN pg_catalog.to_regclass(pg_catalog.quote_ident(d.address_names[1])
                                         || '.' || pg_catalog.quote_ident(d.address_names[2]))::pg_catalog.oid
                                  ELSE d.objid END
               FROM pg_catalog.pg_event_trigger_dropped_objects() d
              WHERE d.object_type = ANY ('{table,\"table column\",trigger}'::pg_catalog.text[])"
        }
    };
    Spi::connect(|c| -> Result<Vec<pg_sys::Oid>, pgrx::spi::Error> {
        let mut out = Vec::new();
        for r in c.select(q, None, &[])? {
            if let Some(o) = r.get::<pg_sys::Oid>(1)? {
                out.push(o);
            }
        }
        Ok(out)
    })
    .map_err(KmsError::spi)
}

/// Decrypted views dropped by the current command without a column or
/// the table they show: (schema, view) of each.
fn dropped_views() -> KmsResult<Vec<(String, String)>> {
    Spi::connect(|c| -> Result<Vec<(String, String)>, pgrx::spi::Error> {
        let mut out = Vec::new();
        for r in c.select(
            "SELECT d.address_names[1], d.address_names[2]
               FROM pg_catalog.pg_event_trigger_dropped_objects() d
              WHERE d.object_type = 'view'
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger_dropped_objects() x
                                 WHERE x.object_type = ANY ('{table,\"table column\"}'::pg_catalog.text[]))",
            None,
            &[],
        )? {
            out.push((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<String>(2)?.unwrap_or_default(),
            ));
        }
        Ok(out)
    })
    .map_err(KmsError::spi)
}

/// The body of the event trigger function.
pub fn fire(event: Event) -> KmsResult<()> {
    crate::pg::identity::with_pinned_search_path(|| fire_pinned(event))
}

fn fire_pinned(event: Event) -> KmsResult<()> {
    // SAFETY: a plain read of a backend global (set while an extension
    // script runs).
    if super::internal_ddl() || unsafe { pg_sys::creating_extension } {
        return Ok(());
    }
    if event == Event::SqlDrop {
        for (schema, view) in dropped_views()? {
            let kept = match super::view_is_kept(&schema, &view) {
                Ok(k) => k,
                Err(KmsError::NotInstalled) | Err(KmsError::ExtensionVersion { .. }) => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            };
            if kept {
                return Err(refused(
                    event,
                    format!("view {schema}.{view} is the decrypted view pg_kms keeps for protected columns"),
                ));
            }
        }
    }
    // pg_restore creates the conversion trigger (enabled ORIGIN), then
    // enables it ALWAYS in a later statement.
    let creating_trigger = event == Event::DdlCommandEnd
        && crate::pg::spi::read::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger_ddl_commands() d
                             WHERE d.command_tag = 'CREATE TRIGGER')",
            &[],
        )? == Some(true);
    CREATING_TRIGGER.set(creating_trigger);
    let relids = touched(event)?;
    for relid in relids {
        let policies = match policies_of(relid) {
            Ok(p) => p,
            // No catalog to read (not installed here, or this library is
            // newer than the SQL): nothing pg_kms could check.
            Err(KmsError::NotInstalled) | Err(KmsError::ExtensionVersion { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        if policies.is_empty() {
            continue;
        }
        let table = Table::read(relid)?;
        check(event, table.as_ref(), &policies)?;
        if event == Event::DdlCommandEnd {
            // An added or dropped unprotected column: the view follows.
            regenerate(relid, None, false)?;
        }
    }
    Ok(())
}

/// Whether `table` still has everything its policies need.
pub fn check(event: Event, table: Option<&Table>, policies: &[Policy]) -> KmsResult<()> {
    let first = &policies[0];
    let Some(t) = table else {
        return Err(refused(
            event,
            format!(
                "table {}.{} has protected columns",
                first.relnamespace, first.relname
            ),
        ));
    };
    let et = crate::pg::datum::encrypted_text_oid()?;
    let inherits = crate::pg::spi::read::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i WHERE i.inhrelid = $1 OR i.inhparent = $1)",
        &[t.relid.into()],
    )?;
    if inherits == Some(true) {
        return Err(refused(
            event,
            format!(
                "table {} has protected columns: it cannot take part in inheritance (the rows of other tables would not be protected)",
                t.qualified
            ),
        ));
    }
    for p in policies {
        if t.name != p.relname || t.schema != p.relnamespace {
            return Err(refused(
                event,
                format!(
                    "table {}.{} has protected columns: it cannot be renamed or moved",
                    p.relnamespace, p.relname
                ),
            ));
        }
        for name in p.columns_in_use() {
            let Some(c) = t.column(name) else {
                return Err(refused(
                    event,
                    format!(
                        "column \"{name}\" of table {} is needed by the policy of protected column \"{}\"",
                        t.qualified, p.attname
                    ),
                ));
            };
            let type_ok = if name == p.attname {
                match p.state {
                    PolicyState::Protected => c.typid == et,
                    PolicyState::Converting => Some(&c.type_sql) == p.source_type.as_ref(),
                }
            } else if Some(name) == p.shadow_column.as_deref() {
                c.typid == et
            } else if Some(name) == p.blind_index_column.as_deref() {
                c.typid == pg_sys::BYTEAOID
            } else {
                true
            };
            if !type_ok {
                return Err(refused(
                    event,
                    format!(
                        "column \"{name}\" of table {} is needed by the policy of protected column \"{}\": its type cannot change",
                        t.qualified, p.attname
                    ),
                ));
            }
        }
        if p.state == PolicyState::Converting {
            check_convert_trigger(event, t, p)?;
        }
    }
    Ok(())
}

/// While converting, pg_kms's trigger must stay, enabled ALWAYS, under its
/// name, and fire after every other BEFORE row trigger that could change
/// the row. At DDL end a missing trigger is accepted (pg_restore creates
/// it after the table's constraints); dropping it is caught at sql_drop.
fn check_convert_trigger(event: Event, t: &Table, p: &Policy) -> KmsResult<()> {
    let name = super::sqlgen::CONVERT_TRIGGER;
    let function = format!(
        "{}.{}()",
        crate::errors::quote_ident(&t.schema),
        crate::errors::quote_ident(&super::sqlgen::convert_function_name(&t.name))
    );
    let (state, renamed, later) = Spi::connect(|c| {
        c.select(
            "SELECT (SELECT tg.tgenabled::pg_catalog.text FROM pg_catalog.pg_trigger tg
                      WHERE tg.tgrelid = $1 AND tg.tgname = $2),
                    EXISTS (SELECT 1 FROM pg_catalog.pg_trigger tg
                             WHERE tg.tgrelid = $1 AND tg.tgname <> $2
                               AND tg.tgfoid = pg_catalog.to_regprocedure($3)),
                    (SELECT pg_catalog.string_agg(tg.tgname::pg_catalog.text, ', ') FROM pg_catalog.pg_trigger tg
                      WHERE tg.tgrelid = $1 AND NOT tg.tgisinternal AND tg.tgname > $2
                        AND (tg.tgtype::int & 3) = 3 AND (tg.tgtype::int & 20) <> 0)",
            Some(1),
            &[t.relid.into(), name.into(), function.as_str().into()],
        )?
        .first()
        .get_three::<String, bool, String>()
    })
    .map_err(KmsError::spi)?;
    let problem = if renamed == Some(true) {
        Some(format!("pg_kms's trigger {name} must keep its name"))
    } else if let Some(later) = later {
        Some(format!(
            "BEFORE row triggers fire in name order and {later} would fire after pg_kms's {name}: rename it to sort before it"
        ))
    } else {
        let creating = CREATING_TRIGGER.get() && event == Event::DdlCommandEnd;
        match (state.as_deref(), event) {
            (Some("A"), _) | (None, Event::DdlCommandEnd) => None,
            (Some("O"), Event::DdlCommandEnd) if creating => None,
            _ => Some(format!("pg_kms's trigger {name} must stay, enabled ALWAYS")),
        }
    };
    match problem {
        Some(why) => Err(refused(
            event,
            format!(
                "column \"{}\" of table {} is being encrypted online: {why}",
                p.attname, t.qualified
            ),
        )),
        None => Ok(()),
    }
}
