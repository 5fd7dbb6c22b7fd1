//! Audit detail on a real cluster (issue 16, section 6): the audit log records
//! both the session user (`actor`) and the current user (`role`) of each act,
//! `NOTIFY kms_events` carries the reason, actor and role, and every read of
//! a secret is its own audited act. Run after `cargo pgrx install`.

use pg_kms_integration::{poll, sqlstate, Cluster};
use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;
use std::time::Duration;

/// Reads the notifications `listener` has received until `want` of them
/// have arrived (in order), as JSON text.
fn notifications(listener: &mut Client, seen: &mut Vec<String>, want: usize) {
    poll("kms_events notifications", Duration::from_secs(10), || {
        listener.batch_execute("SELECT 1").ok()?; // let the connection read pending messages
        let mut n = listener.notifications();
        let mut it = n.iter();
        while let Ok(Some(m)) = it.next() {
            assert_eq!(m.channel(), "kms_events");
            seen.push(m.payload().to_string());
        }
        (seen.len() >= want).then_some(())
    });
}

/// The fields of a kms_events payload, parsed by the server:
/// operation|key_name|version|reason|actor|role (NULL as "-").
fn fields(db: &mut Client, payload: &str) -> String {
    db.query_one(
        "SELECT concat_ws('|', p->>'operation', coalesce(p->>'key_name', '-'), coalesce(p->>'version', '-'),
                          coalesce(p->>'reason', '-'), p->>'actor', p->>'role')
           FROM (SELECT $1::text::jsonb AS p) s",
        &[&payload],
    )
    .unwrap()
    .get(0)
}

#[test]
fn set_role_is_recorded_and_notified() {
    let c = Cluster::start("ad_role", &[]);
    let mut db = c.connect();
    db.batch_execute(
        "CREATE EXTENSION pg_kms;
         CREATE ROLE sec_admin NOLOGIN IN ROLE kms_admin;
         CREATE ROLE alice LOGIN NOINHERIT;
         GRANT sec_admin TO alice;
         SELECT kms_create_key('pii');",
    )
    .unwrap();
    let mut listener = c.connect();
    listener.batch_execute("LISTEN kms_events").unwrap();

    // postgres, after SET ROLE sec_admin.
    db.batch_execute(
        "SET ROLE sec_admin;
         SELECT kms_rotate_key('pii', 'suspected leak');
         RESET ROLE;",
    )
    .unwrap();
    // A login role acting through the role it was granted.
    let mut alice = c.connect_as("alice", "postgres");
    assert_eq!(
        sqlstate(alice.query_one("SELECT kms_rotate_key('pii')", &[])),
        "42501",
        "alice alone is no kms_admin"
    );
    alice
        .batch_execute("SET ROLE sec_admin; SELECT kms_disable_key_version('pii', 1, 'retired');")
        .unwrap();

    let rows: Vec<String> = db
        .query(
            "SELECT concat_ws('|', operation, actor, role, coalesce(reason, '-')) FROM kms_audit_log ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        rows,
        [
            "create_key|postgres|postgres|-",
            "rotate_key|postgres|sec_admin|suspected leak",
            "disable_key_version|alice|sec_admin|retired",
        ]
    );

    let mut seen = Vec::new();
    notifications(&mut listener, &mut seen, 2);
    let got: Vec<String> = seen.iter().map(|p| fields(&mut db, p)).collect();
    assert_eq!(
        got,
        [
            "rotate_key|pii|2|suspected leak|postgres|sec_admin",
            "disable_key_version|pii|1|retired|alice|sec_admin",
        ]
    );
    let ok: bool = db
        .query_one("SELECT ok FROM kms_audit_log_check()", &[])
        .unwrap()
        .get(0);
    assert!(ok);
    println!("audit detail: SET ROLE sec_admin recorded as actor=postgres role=sec_admin, alice's act as actor=alice role=sec_admin; kms_events payloads carry reason, actor and role");
}

#[test]
fn secret_reads_are_audited_one_by_one() {
    let c = Cluster::start("ad_secrets", &[]);
    let mut db = c.connect();
    db.batch_execute(
        "CREATE EXTENSION pg_kms;
         CREATE ROLE app LOGIN IN ROLE kms_user;
         SELECT kms_create_key('app-secrets');
         SELECT kms_grant_key('app-secrets', 'app', 'decrypt');
         SELECT kms_secret_set('svc/token', 'tok-one-7f3a', key_name => 'app-secrets', ttl => interval '1 day', tags => '{\"owner\": \"svc\"}');
         SELECT kms_rotate_key('app-secrets');
         SELECT kms_secret_set('svc/token', 'tok-two-9c1e', key_name => 'app-secrets');",
    )
    .unwrap();
    let mut listener = c.connect();
    listener.batch_execute("LISTEN kms_events").unwrap();

    // The second version kept the first one's ttl and tags.
    let (ttl, owner): (String, String) = {
        let r = db
            .query_one(
                "SELECT (expires_at - created_at)::text, tags->>'owner' FROM kms.secrets WHERE name = 'svc/token' AND version = 2",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((ttl.as_str(), owner.as_str()), ("1 day", "svc"));

    // Three reads by the application: the newest twice, the old one by number.
    let mut app = c.connect_as("app", "postgres");
    for (sql, want) in [
        ("SELECT kms_secret_get('svc/token')", "tok-two-9c1e"),
        ("SELECT kms_secret_get('svc/token', 1)", "tok-one-7f3a"),
        ("SELECT kms_secret_get('svc/token')", "tok-two-9c1e"),
    ] {
        let v: String = app.query_one(sql, &[]).unwrap().get(0);
        assert_eq!(v, want);
    }
    // Read-only: refused, since the read could not be audited.
    app.batch_execute("BEGIN READ ONLY").unwrap();
    assert_eq!(
        sqlstate(app.query_one("SELECT kms_secret_get('svc/token')", &[])),
        "25006"
    );
    app.batch_execute("ROLLBACK").unwrap();
    let rows: Vec<String> = db
        .query(
            "SELECT concat_ws('|', actor, role, key_name, version, reason, detail::jsonb->>'secret_version', detail::jsonb->>'explicit_version')
               FROM kms_audit_log WHERE operation = 'secret_read' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        rows,
        [
            "app|app|app-secrets|2|secret svc/token version 2|2|false",
            "app|app|app-secrets|1|secret svc/token version 1 (asked for by number; the newest is 2)|1|true",
            "app|app|app-secrets|2|secret svc/token version 2|2|false",
        ]
    );
    // Notified too, without the secret's name (anyone may LISTEN) or value.
    let mut seen = Vec::new();
    notifications(&mut listener, &mut seen, 3);
    for p in &seen {
        assert!(!p.contains("svc/token") && !p.contains("tok-"), "{p}");
        assert_eq!(fields(&mut db, p).split('|').next(), Some("secret_read"));
    }
    assert_eq!(
        fields(&mut db, &seen[1]),
        "secret_read|app-secrets|1|-|app|app"
    );
    // No value anywhere in the log.
    let leaks: i64 = db
        .query_one(
            "SELECT count(*) FROM kms.audit_log a WHERE a::text LIKE '%tok-%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(leaks, 0);
    // Purging expired versions is an audited act of kms_admin.
    db.batch_execute(
        "UPDATE kms.secrets SET expires_at = now() - interval '1 second' WHERE name = 'svc/token' AND version = 1",
    )
    .unwrap();
    assert_eq!(
        sqlstate(app.query_one("SELECT kms_secret_purge_expired()", &[])),
        "42501"
    );
    let n: i64 = db
        .query_one("SELECT kms_secret_purge_expired()", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let purge: String = db
        .query_one(
            "SELECT actor || '|' || detail FROM kms_audit_log WHERE operation = 'secret_purge_expired'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(purge, r#"postgres|[{"secret":"svc/token","version":1}]"#);
    let ok: bool = db
        .query_one("SELECT ok FROM kms_audit_log_check()", &[])
        .unwrap()
        .get(0);
    assert!(ok);
    println!("secret reads: 3 reads by app -> 3 secret_read audit rows (actor, role, key version, secret version, explicit or not), notified without name or value; read-only read refused (25006); purge audited");
}

#[test]
fn worker_log_lines_name_the_database() {
    let c = Cluster::start(
        "ad_worker",
        &[
            "shared_preload_libraries = 'pg_kms'",
            "pg_kms.reencrypt_naptime = '200ms'",
        ],
    );
    let mut db = c.connect();
    db.batch_execute("CREATE EXTENSION pg_kms").unwrap();
    db.batch_execute("CREATE DATABASE \"KmsDb\"").unwrap();
    let mut other = c.connect_as("postgres", "KmsDb");
    other.batch_execute("CREATE EXTENSION pg_kms").unwrap();
    poll("both workers' start lines", Duration::from_secs(30), || {
        let log = c.server_log();
        (log.contains("pg_kms worker started for database postgres")
            && log.contains("pg_kms worker started for database \"KmsDb\""))
        .then_some(())
    });
    let log = c.server_log();
    assert!(
        !log.lines()
            .any(|l| l.contains("pg_kms worker") && l.contains("for database 1")),
        "a worker line names a database by oid"
    );
    println!("worker log lines: \"pg_kms worker started for database postgres\" and for \"KmsDb\", no oid");
}
