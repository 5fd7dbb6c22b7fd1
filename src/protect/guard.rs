//! The DDL guard (event triggers `kms_protect_ddl_end` and
//! `kms_protect_sql_drop`): refuses DDL that would strand protected
//! values, and rebuilds a decrypted view when its table gained or lost an
//! unprotected column. pg_kms's own DDL ([`super::internal_ddl`]) and
//! extension scripts are let through.

use super::{policies_of, regenerate, Policy, PolicyState, Table};
use crate::errors::{KmsError, KmsResult, ProtectCode};
use pgrx::pg_sys;
use pgrx::prelude::*;

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

/// The tables the current DDL command touched (by the event's own lists).
fn touched(event: Event) -> KmsResult<Vec<pg_sys::Oid>> {
    let q = match event {
        Event::DdlCommandEnd => {
            "SELECT DISTINCT d.objid FROM pg_catalog.pg_event_trigger_ddl_commands() d
              WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                AND d.object_type OPERATOR(pg_catalog.=) ANY ('{table,\"table column\"}'::text[])"
        }
        Event::SqlDrop => {
            "SELECT DISTINCT CASE WHEN d.object_type OPERATOR(pg_catalog.=) 'trigger'
                                  THEN pg_catalog.to_regclass(pg_catalog.quote_ident(d.address_names[1])
                                         OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(d.address_names[2]))::pg_catalog.oid
                                  ELSE d.objid END
               FROM pg_catalog.pg_event_trigger_dropped_objects() d
              WHERE d.object_type OPERATOR(pg_catalog.=) ANY ('{table,\"table column\",trigger}'::text[])"
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

/// The body of the event trigger function.
pub fn fire(event: Event) -> KmsResult<()> {
    // SAFETY: a plain read of a backend global (set while an extension
    // script runs).
    if super::internal_ddl() || unsafe { pg_sys::creating_extension } {
        return Ok(());
    }
    let relids = crate::pg::identity::with_pinned_search_path(|| touched(event))?;
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
            let enabled = crate::pg::spi::read::<String>(
                "SELECT t.tgenabled::pg_catalog.text FROM pg_catalog.pg_trigger t
                  WHERE t.tgrelid OPERATOR(pg_catalog.=) $1 AND t.tgname OPERATOR(pg_catalog.=) $2",
                &[t.relid.into(), super::sqlgen::CONVERT_TRIGGER.into()],
            )?;
            if enabled.as_deref() != Some("A") {
                return Err(refused(
                    event,
                    format!(
                        "column \"{}\" of table {} is being encrypted online: pg_kms's trigger {} must stay, enabled ALWAYS",
                        p.attname,
                        t.qualified,
                        super::sqlgen::CONVERT_TRIGGER
                    ),
                ));
            }
        }
    }
    Ok(())
}
