//! One keyring across clusters (`kms_admin`): `kms_keyring_export()` gives
//! a MAC'd document of the keyring's wrapped material, and
//! `kms_keyring_import(doc)` applies it in another database with the same
//! master key (a logical-replication subscriber, a blue/green twin, every
//! node of a sharded cluster). The logic is in `crate::lifecycle::sync`.

use pgrx::prelude::*;

/// The keyring as a jsonb document: every key's id, name, primary
/// version, destroyed flag, wrapped blind-index root, and each version's
/// state and wrapped data key (never a plaintext key; no grants, no
/// schedules), with the master key's fingerprint, the source
/// (`<system identifier>/<database>`), the id of the audit row recording
/// the export (`head_id`) and a MAC keyed by the master key. Audited
/// (`export_keyring`).
#[pg_extern(volatile, parallel_unsafe)]
fn kms_keyring_export() -> pgrx::JsonB {
    crate::lifecycle::keyring_export()
}

/// Applies a document of `kms_keyring_export()` in one transaction:
/// creates missing keys and versions, applies rotations, state changes and
/// destructions, audits each changed key (`import_key`) and the import
/// (`import_keyring`), and invalidates every backend's key cache. Refuses
/// another master key (55000), an altered document (XX001), an older
/// document than one already imported from the same source (55000), key
/// id or name collisions (42710) and keys changed here (55000). Returns a
/// summary: `{"source", "head_id", "created": [...], "updated": [...],
/// "unchanged": n}`.
#[pg_extern(volatile, parallel_unsafe)]
fn kms_keyring_import(doc: pgrx::JsonB) -> pgrx::JsonB {
    crate::lifecycle::keyring_import(doc)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::api::test_support::*;
    use pgrx::prelude::*;

    fn export_into(table: &str) {
        run(&format!(
            "CREATE TEMP TABLE {table} AS SELECT kms_keyring_export() AS doc"
        ));
    }

    #[pg_test]
    fn sync_export_holds_wrapped_material_only() {
        setup_key("sync_a");
        run("SELECT kms_rotate_key('sync_a')");
        export_into("d");
        let k = "(SELECT k FROM d, jsonb_array_elements(doc->'keys') k WHERE k->>'key_name' = 'sync_a')";
        let k0 = format!("(SELECT {k} AS k0) s");
        // Exactly what the catalog stores, wrapped.
        assert_eq!(
            one::<bool>(&format!(
                "SELECT bool_and(decode(v->>'wrapped_key', 'hex') = kv.wrapped_key AND v->>'state' = kv.state)
                   FROM {k0}, jsonb_array_elements(k0->'versions') v
                   JOIN kms.key_versions kv ON kv.version = (v->>'version')::int
                  WHERE kv.key_id = (k0->>'key_id')::int"
            )),
            Some(true)
        );
        assert_eq!(
            one::<i32>(&format!("SELECT ({k}->>'primary_version')::int")),
            Some(2)
        );
        assert_eq!(
            one::<String>(
                "SELECT string_agg(key, ',' ORDER BY key) FROM d, jsonb_object_keys(doc) key"
            )
            .as_deref(),
            Some("format,head_id,keys,mac,master_key_fingerprint,source")
        );
        assert_eq!(
            one::<bool>(
                "SELECT (doc->>'head_id')::int8 = (SELECT max(id) FROM kms.audit_log WHERE operation = 'export_keyring') FROM d"
            ),
            Some(true)
        );
        assert_eq!(one::<bool>("SELECT kms_verify_audit_log()"), Some(true));
    }

    #[pg_test]
    fn sync_import_is_idempotent_and_audited() {
        setup_key("sync_b");
        export_into("d");
        let before = one::<i64>("SELECT count(*) FROM kms.audit_log").unwrap();
        let r = one::<pgrx::JsonB>("SELECT kms_keyring_import(doc) FROM d")
            .unwrap()
            .0;
        assert_eq!(r["created"], serde_json::json!([]));
        assert_eq!(r["updated"], serde_json::json!([]));
        let again = one::<pgrx::JsonB>("SELECT kms_keyring_import(doc) FROM d")
            .unwrap()
            .0;
        assert_eq!(again["unchanged"], r["unchanged"]);
        // One import_keyring row each, no key changed.
        assert_eq!(
            one::<i64>("SELECT count(*) FROM kms.audit_log").unwrap(),
            before + 2
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM kms.audit_log WHERE operation = 'import_key'"),
            Some(0)
        );
        assert_eq!(one::<bool>("SELECT kms_verify_audit_log()"), Some(true));
        assert_eq!(
            one::<String>("SELECT kms_decrypt(kms_encrypt('x', 'sync_b'))").as_deref(),
            Some("x")
        );
    }

    #[pg_test]
    fn sync_import_refuses_altered_other_key_and_malformed() {
        setup_key("sync_c");
        run("SELECT kms_rotate_key('sync_c')");
        export_into("d");
        // Any edit breaks the MAC.
        let e = error_of(
            "SELECT kms_keyring_import(jsonb_set(doc, '{keys,0,primary_version}', '1')) FROM d",
        )
        .unwrap();
        assert!(
            e.starts_with("XX001 keyring export does not authenticate"),
            "{e}"
        );
        assert_sqlstate(
            "SELECT kms_keyring_import(jsonb_set(doc, '{head_id}', '999999')) FROM d",
            "XX001",
        );
        // Another master key's fingerprint: refused before the MAC.
        assert_sqlstate(
            "SELECT kms_keyring_import(jsonb_set(doc, '{master_key_fingerprint}', to_jsonb(repeat('00', 32)))) FROM d",
            "55000",
        );
        for bad in [
            "'{}'",
            "'[]'",
            "jsonb_set(doc, '{format}', '\"v2\"')",
            "jsonb_set(doc, '{mac}', '\"zz\"')",
            "doc - 'keys'",
        ] {
            assert_sqlstate(
                &format!("SELECT kms_keyring_import(({bad})::jsonb) FROM d"),
                "22023",
            );
        }
        assert_eq!(one::<bool>("SELECT kms_verify_audit_log()"), Some(true));
    }

    #[pg_test]
    fn sync_import_never_goes_backwards() {
        setup_key("sync_d");
        run("SELECT kms_rotate_key('sync_d')");
        export_into("old");
        // A version made here after the export: the export lacks it.
        run("SELECT kms_rotate_key('sync_d')");
        let e = error_with_hint("SELECT kms_keyring_import(doc) FROM old").unwrap();
        assert!(
            e.starts_with("55000") && e.contains("version 3 exists here but not in the export"),
            "{e}"
        );
        // Destroyed here: an older export would revive it.
        run("SELECT kms_destroy_key('sync_d')");
        let e = error_of("SELECT kms_keyring_import(doc) FROM old").unwrap();
        assert!(e.starts_with("55000 keyring export is older"), "{e}");
        // A newer export applies; then the older one is refused by order.
        export_into("new");
        run("SELECT kms_keyring_import(doc) FROM new");
        let e = error_of("SELECT kms_keyring_import(doc) FROM old").unwrap();
        assert!(e.starts_with("55000 keyring export is older"), "{e}");
        assert_eq!(one::<bool>("SELECT kms_verify_audit_log()"), Some(true));
        assert_eq!(
            one::<bool>("SELECT ok FROM kms_audit_log_check()"),
            Some(true)
        );
    }

    #[pg_test]
    fn sync_only_for_kms_admin() {
        for role in ["kms_user", "kms_auditor"] {
            assert_eq!(
                as_role(role, "SELECT kms_keyring_export()").as_deref(),
                Some("42501")
            );
            assert_eq!(
                as_role(role, "SELECT kms_keyring_import('{}')").as_deref(),
                Some("42501")
            );
        }
    }
}
