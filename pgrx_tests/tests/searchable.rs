//! Searchable and multi-tenant features on real clusters: blind-index
//! lookups by index scan, deterministic UNIQUE columns, per-key grants
//! across sessions and logins, tenant erasure, secret expiry, a bounded key
//! cache, and statement-log redaction in a real server log.

use pg_kms_integration::{pairs, poll, sqlstate, Cluster};
use postgres::Client;
use std::time::Duration;

fn setup(name: &str, extra: &[&str]) -> (Cluster, Client) {
    let c = Cluster::start(name, extra);
    let mut db = c.connect();
    db.batch_execute("CREATE EXTENSION pg_kms; SELECT kms_create_key('pii');")
        .unwrap();
    (c, db)
}

#[test]
fn blind_index_lookup_is_an_index_scan_on_1m_rows() {
    let (_c, mut db) = setup("s_bidx", &[]);
    db.batch_execute(
        "CREATE TABLE people (id int PRIMARY KEY, email encrypted_text NOT NULL, email_bidx bytea NOT NULL);
         INSERT INTO people
         SELECT g, kms_encrypt('user' || g || '@example.com', 'pii'), kms_blind_index('user' || g || '@example.com', 'pii', bits => 64)
           FROM generate_series(1, 1000000) g;
         CREATE INDEX people_email_bidx ON people (email_bidx);
         ANALYZE people;",
    )
    .unwrap();
    let q = "SELECT id FROM people WHERE email_bidx = kms_blind_index($1, 'pii', bits => 64) AND kms_decrypt(email) = $1";
    let plan: Vec<String> = db
        .query(&format!("EXPLAIN {q}"), &[&"user777777@example.com"])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    println!("blind-index lookup on 1M rows:\n{plan}");
    assert!(
        plan.contains("Index Scan using people_email_bidx"),
        "{plan}"
    );
    let id: i32 = db
        .query_one(q, &[&"user777777@example.com"])
        .unwrap()
        .get(0);
    assert_eq!(id, 777777);
    // A miss finds nothing; rotation does not change the index.
    assert!(db.query_opt(q, &[&"nobody@example.com"]).unwrap().is_none());
    db.batch_execute("SELECT kms_rotate_key('pii')").unwrap();
    let id: i32 = db.query_one(q, &[&"user123@example.com"]).unwrap().get(0);
    assert_eq!(id, 123);
}

#[test]
fn deterministic_unique_column_and_hash_join() {
    let (_c, mut db) = setup("s_det", &[]);
    db.batch_execute(
        "CREATE TABLE citizens (id int PRIMARY KEY, ssn encrypted_text UNIQUE);
         INSERT INTO citizens SELECT g, kms_encrypt_deterministic(lpad(g::text, 9, '0'), 'pii') FROM generate_series(1, 10000) g;
         CREATE TABLE claims (claim int, ssn encrypted_text);
         INSERT INTO claims SELECT g, kms_encrypt_deterministic(lpad((g % 100 + 1)::text, 9, '0'), 'pii') FROM generate_series(1, 1000) g;
         ANALYZE citizens; ANALYZE claims;",
    )
    .unwrap();
    let r = db.execute(
        "INSERT INTO citizens VALUES (20000, kms_encrypt_deterministic('000000042', 'pii'))",
        &[],
    );
    assert_eq!(
        sqlstate(r),
        "23505",
        "duplicate deterministic value must violate UNIQUE"
    );
    let joined: i64 = db
        .query_one("SELECT count(*) FROM claims JOIN citizens USING (ssn)", &[])
        .unwrap()
        .get(0);
    assert_eq!(joined, 1000);
    let groups: i64 = db
        .query_one(
            "SELECT count(*) FROM (SELECT ssn FROM claims GROUP BY ssn) g",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(groups, 100);
    db.batch_execute("SET enable_mergejoin = off; SET enable_nestloop = off;")
        .unwrap();
    let plan: String = db
        .query(
            "EXPLAIN SELECT count(*) FROM claims JOIN citizens USING (ssn)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(plan.contains("Hash Join"), "{plan}");
    println!(
        "deterministic column: UNIQUE violation 23505, hash join of 1000 claims ok, 100 groups"
    );
}

#[test]
fn per_key_grants_across_logins_and_membership_changes() {
    let (c, mut db) = setup("s_grants", &[]);
    db.batch_execute(
        "SELECT kms_create_key('tenant-a');
         CREATE ROLE alice LOGIN IN ROLE kms_user; CREATE ROLE bob LOGIN IN ROLE kms_user;
         CREATE ROLE team_a NOLOGIN;
         CREATE TABLE t (v encrypted_text); GRANT SELECT, INSERT ON t TO PUBLIC;
         INSERT INTO t SELECT kms_encrypt('tenant a data', 'tenant-a');
         SELECT kms_grant_key('tenant-a', 'team_a', 'decrypt');
         SELECT kms_grant_key('tenant-a', 'team_a', 'encrypt');
         GRANT team_a TO alice;",
    )
    .unwrap();
    let mut alice = c.connect_as("alice", "postgres");
    let mut bob = c.connect_as("bob", "postgres");
    assert_eq!(
        sqlstate(alice.query_one("SELECT kms_decrypt(v) FROM t", &[])),
        "ok"
    );
    assert_eq!(
        sqlstate(bob.query_one("SELECT kms_decrypt(v) FROM t", &[])),
        "42501"
    );
    assert_eq!(
        sqlstate(bob.query_one("SELECT kms_encrypt('x', 'tenant-a')", &[])),
        "42501"
    );
    // 'pii' has no grants: still usable by every kms_user.
    assert_eq!(
        sqlstate(bob.query_one("SELECT kms_encrypt('x', 'pii')", &[])),
        "ok"
    );
    // A membership change in another session is honoured at bob's next call.
    db.batch_execute("GRANT team_a TO bob").unwrap();
    assert_eq!(
        sqlstate(bob.query_one("SELECT kms_decrypt(v) FROM t", &[])),
        "ok"
    );
    db.batch_execute("REVOKE team_a FROM bob").unwrap();
    assert_eq!(
        sqlstate(bob.query_one("SELECT kms_decrypt(v) FROM t", &[])),
        "42501"
    );
    // Revoking the grant is honoured in alice's session too.
    db.batch_execute("SELECT kms_revoke_key('tenant-a', 'team_a', 'decrypt')")
        .unwrap();
    assert_eq!(
        sqlstate(alice.query_one("SELECT kms_decrypt(v) FROM t", &[])),
        "42501"
    );
    assert_eq!(
        sqlstate(alice.query_one("SELECT kms_encrypt('y', 'tenant-a')", &[])),
        "ok"
    );
    let rows: Vec<(String, String)> = pairs(
        &mut db,
        "SELECT grantee, privilege FROM kms_key_grants WHERE key_name = 'tenant-a'",
    );
    assert_eq!(rows, vec![("team_a".to_string(), "encrypt".to_string())]);
    println!("per-key grants: grantee member allowed, non-member 42501, membership change and revoke honoured across sessions");
}

#[test]
fn tenant_erasure_with_a_small_key_cache() {
    // 100 tenants with a cache of 16 keys: eviction (with zeroization) and
    // reload must be invisible, and erasing one tenant touches no other.
    let (c, mut db) = setup("s_tenants", &["pg_kms.key_cache_size = 16"]);
    db.batch_execute(
        "SELECT kms_create_key('tenant-' || g) FROM generate_series(1, 100) g;
         CREATE TABLE docs (id int PRIMARY KEY, tenant int, body encrypted_text);
         INSERT INTO docs SELECT g, g % 100 + 1, kms_encrypt('doc ' || g, 'tenant-' || (g % 100 + 1)) FROM generate_series(1, 5000) g;",
    )
    .unwrap();
    let mut s = c.connect();
    let ok: i64 = s
        .query_one(
            "SELECT count(*) FROM docs WHERE kms_decrypt(body) = 'doc ' || id",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(ok, 5000);
    db.batch_execute("SELECT kms_destroy_key('tenant-7', 'customer asked to be forgotten')")
        .unwrap();
    assert_eq!(
        sqlstate(s.query("SELECT kms_decrypt(body) FROM docs WHERE tenant = 7", &[])),
        "55000"
    );
    let ok: i64 = s
        .query_one(
            "SELECT count(*) FROM docs WHERE tenant <> 7 AND kms_decrypt(body) = 'doc ' || id",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(ok, 4950);
    println!("tenant erasure: tenant 7's 50 rows now 55000, the other 4950 rows decrypt (key cache of 16 for 100 keys)");
}

#[test]
fn secrets_expire() {
    let (_c, mut db) = setup("s_secrets", &[]);
    db.batch_execute(
        "SELECT kms_secret_set('stripe/api-key', 'sk_live_abc', ttl => interval '1 second')",
    )
    .unwrap();
    let v: String = db
        .query_one("SELECT kms_secret_get('stripe/api-key')", &[])
        .unwrap()
        .get(0);
    assert_eq!(v, "sk_live_abc");
    poll("the secret to expire", Duration::from_secs(30), || {
        (sqlstate(db.query_one("SELECT kms_secret_get('stripe/api-key')", &[])) == "55000")
            .then_some(())
    });
    db.batch_execute("SELECT kms_secret_set('stripe/api-key', 'sk_live_def')")
        .unwrap();
    let v: String = db
        .query_one("SELECT kms_secret_get('stripe/api-key')", &[])
        .unwrap()
        .get(0);
    assert_eq!(v, "sk_live_def");
    println!("secret expiry: get works, then 55000 after the ttl, a new version works again");
}

#[test]
fn statement_logs_are_redacted() {
    let c = Cluster::start(
        "s_redact",
        &[
            "shared_preload_libraries = 'pg_kms'",
            "log_statement = 'all'",
            "log_min_error_statement = error",
        ],
    );
    let mut db = c.connect();
    db.batch_execute("CREATE EXTENSION pg_kms; SELECT kms_create_key('pii');")
        .unwrap();
    let secrets = [
        "REDACT-ME-encrypt-4711",
        "REDACT-ME-bidx-4712",
        "REDACT-ME-secret-4713",
        "REDACT-ME-error-4714",
    ];
    db.batch_execute(&format!("SELECT kms_encrypt('{}', 'pii')", secrets[0]))
        .unwrap();
    db.batch_execute(&format!("SELECT kms_blind_index('{}', 'pii')", secrets[1]))
        .unwrap();
    db.batch_execute(&format!(
        "SELECT kms_secret_set('svc/token', '{}')",
        secrets[2]
    ))
    .unwrap();
    // An error logged with its statement (log_min_error_statement).
    let _ = db.batch_execute(&format!(
        "SELECT kms_encrypt('{}', 'no-such-key')",
        secrets[3]
    ));
    // Off: the same literal does reach the log (so the test can fail).
    db.batch_execute("SET pg_kms.redact_statement_logs = off")
        .unwrap();
    db.batch_execute("SELECT kms_encrypt('VISIBLE-WHEN-OFF-4715', 'pii')")
        .unwrap();
    drop(db);
    let log = poll("the log lines", Duration::from_secs(10), || {
        let l = c.server_log();
        l.contains("VISIBLE-WHEN-OFF-4715").then_some(l)
    });
    let leaked: Vec<&str> = secrets
        .iter()
        .copied()
        .filter(|s| log.contains(s))
        .collect();
    let placeholders = log.matches("<redacted by pg_kms>").count();
    println!("log redaction: {} of {} literals leaked with redaction on; {placeholders} placeholders; off: literal visible", leaked.len(), secrets.len());
    assert!(leaked.is_empty(), "leaked: {leaked:?}");
    assert!(placeholders >= 4);
    assert!(
        log.contains("statement (literals redacted by pg_kms)"),
        "the failing statement is logged redacted"
    );
}
