//! The trust boundary on real clusters: code attached to a user table
//! (triggers, CHECK constraints, index expressions, generated columns,
//! row-level security policies) runs as that table's owner when the
//! background worker or a usage count touches the table, as the caller
//! for `kms_reencrypt_now`, and never as pg_kms's catalog owner, so nobody
//! becomes superuser or reads the master key file through pg_kms.

use pg_kms_integration::{message, pairs, poll, sqlstate, Cluster};
use postgres::Client;
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(120);

/// A table `public.seen` that probes write to, readable by everyone.
const SEEN: &str = "CREATE TABLE public.seen (tag text, usr text, sup boolean, escalated boolean, read_key boolean);
                    GRANT INSERT, SELECT ON public.seen TO PUBLIC;";

/// SQL creating, in schema `schema`, `probe(tag)`: records who runs it and
/// tries to make `role` superuser and to read the master key file; plus
/// immutable wrappers for index expressions and generated columns.
fn probes(schema: &str, role: &str, key_file: &str) -> String {
    format!(
        r#"
        CREATE FUNCTION {schema}.probe(tag text) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $f$
        DECLARE esc boolean := false; rk boolean := false;
        BEGIN
            BEGIN EXECUTE 'ALTER ROLE {role} SUPERUSER'; esc := true; EXCEPTION WHEN OTHERS THEN NULL; END;
            BEGIN PERFORM pg_catalog.pg_read_file('{key_file}'); rk := true; EXCEPTION WHEN OTHERS THEN NULL; END;
            INSERT INTO public.seen VALUES (tag, current_user,
                (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user), esc, rk);
            RETURN true;
        END $f$;
        -- Table code that changes a setting: a search_path that would make
        -- what runs next use these operators (they try the same things).
        CREATE FUNCTION {schema}.sp() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $f$
        BEGIN PERFORM pg_catalog.set_config('search_path', '{schema}, pg_catalog, public', false); RETURN true; END $f$;
        CREATE FUNCTION {schema}.eq_oid(a oid, b oid) RETURNS boolean LANGUAGE plpgsql AS $f$
        BEGIN PERFORM {schema}.probe('operator'); RETURN a OPERATOR(pg_catalog.=) b; END $f$;
        CREATE OPERATOR {schema}.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = {schema}.eq_oid);
        CREATE FUNCTION {schema}.eq_int(a int, b int) RETURNS boolean LANGUAGE plpgsql AS $f$
        BEGIN PERFORM {schema}.probe('operator'); RETURN a OPERATOR(pg_catalog.=) b; END $f$;
        CREATE OPERATOR {schema}.= (LEFTARG = int, RIGHTARG = int, FUNCTION = {schema}.eq_int);
        CREATE FUNCTION {schema}.eq_text(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $f$
        BEGIN PERFORM {schema}.probe('operator'); RETURN a OPERATOR(pg_catalog.=) b; END $f$;
        CREATE OPERATOR {schema}.= (LEFTARG = text, RIGHTARG = text, FUNCTION = {schema}.eq_text);
        CREATE FUNCTION {schema}.probe_i(v encrypted_text) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $f$
        BEGIN PERFORM {schema}.probe('index'); RETURN 1; END $f$;
        CREATE FUNCTION {schema}.probe_g(v encrypted_text) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $f$
        BEGIN PERFORM {schema}.probe('generated'); RETURN 1; END $f$;
        CREATE FUNCTION {schema}.trig() RETURNS trigger LANGUAGE plpgsql AS $f$
        BEGIN PERFORM {schema}.probe(TG_ARGV[0]); IF TG_LEVEL = 'ROW' THEN RETURN NEW; END IF; RETURN NULL; END $f$;
        "#
    )
}

/// SQL making `schema.tbl` (an encrypted column `v`) hostile in every way:
/// statement and row triggers enabled ALWAYS (they fire even with
/// session_replication_role = replica), a CHECK constraint, an index
/// expression, a generated column and a forced RLS policy, all probes.
fn hostile_table(schema: &str, tbl: &str) -> String {
    format!(
        r#"
        CREATE TABLE {schema}.{tbl} (id int PRIMARY KEY, v encrypted_text,
            g int GENERATED ALWAYS AS ({schema}.probe_g(v)) STORED,
            CHECK ({schema}.probe('check')));
        CREATE INDEX ON {schema}.{tbl} ({schema}.probe_i(v));
        CREATE TRIGGER s BEFORE UPDATE ON {schema}.{tbl} FOR EACH STATEMENT EXECUTE FUNCTION {schema}.trig('trigger_stmt');
        CREATE TRIGGER r BEFORE UPDATE ON {schema}.{tbl} FOR EACH ROW EXECUTE FUNCTION {schema}.trig('trigger_row');
        ALTER TABLE {schema}.{tbl} ENABLE ALWAYS TRIGGER s, ENABLE ALWAYS TRIGGER r;
        ALTER TABLE {schema}.{tbl} ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
        CREATE POLICY p ON {schema}.{tbl} USING ({schema}.probe('rls') AND {schema}.sp()) WITH CHECK ({schema}.probe('rls_check'));
        "#
    )
}

/// (tag, user) pairs seen, sorted and deduplicated.
fn seen(db: &mut Client) -> Vec<(String, String)> {
    pairs(
        db,
        "SELECT DISTINCT tag, usr FROM public.seen ORDER BY 1, 2",
    )
}

/// Nobody ran a probe as a superuser, escalated, or read the key file;
/// no role but the bootstrap superuser is superuser.
fn assert_nothing_gained(db: &mut Client, what: &str) {
    let bad: i64 = db
        .query_one("SELECT count(*) FROM public.seen WHERE sup OR escalated OR read_key OR usr = 'postgres'", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        bad,
        0,
        "{what}: a probe ran with privileges: {:?}",
        seen(db)
    );
    let supers: Vec<(String, bool)> = pairs(
        db,
        "SELECT rolname::text, rolsuper FROM pg_roles WHERE rolsuper ORDER BY 1",
    );
    assert_eq!(
        supers,
        vec![("postgres".to_string(), true)],
        "{what}: superusers"
    );
}

/// A 38-byte envelope whose header names `version` of key `pii`, with a
/// zero nonce and tag: passes the type's input check, opens under no key.
fn forged_literal(db: &mut Client, version: i32) -> String {
    db.query_one(
        "SELECT 'kms:' || encode('\\x0100'::bytea || int4send(key_id) || int4send($1) || decode(repeat('00', 28), 'hex'), 'base64')
           FROM kms.keys WHERE key_name = 'pii'",
        &[&version],
    )
    .unwrap()
    .get(0)
}

#[test]
fn worker_runs_table_code_as_its_owner_and_nobody_gains_superuser() {
    let c = Cluster::start(
        "t_worker",
        &[
            "shared_preload_libraries = 'pg_kms'",
            "pg_kms.reencrypt_naptime = '200ms'",
            "pg_kms.reencrypt_max_rows_per_second = 0",
        ],
    );
    let key_file = c.key_file().display().to_string();
    let mut db = c.connect();
    db.batch_execute(&format!(
        "CREATE EXTENSION pg_kms; SELECT kms_create_key('pii');
         {SEEN}
         -- mallory: no pg_kms grant at all, only CREATE on a schema of her own.
         CREATE ROLE mallory LOGIN; CREATE SCHEMA m AUTHORIZATION mallory;
         -- insider: a kms_user who owns a table of real values.
         CREATE ROLE insider LOGIN IN ROLE kms_user; CREATE SCHEMA i AUTHORIZATION insider;"
    ))
    .unwrap();
    let forged = forged_literal(&mut db, 1);
    let mut m = c.connect_as("mallory", "postgres");
    m.batch_execute(&probes("m", "mallory", &key_file)).unwrap();
    m.batch_execute(&hostile_table("m", "t")).unwrap();
    m.batch_execute(&format!("INSERT INTO m.t (id, v) VALUES (1, '{forged}')"))
        .unwrap();
    let mut ins = c.connect_as("insider", "postgres");
    ins.batch_execute(&probes("i", "insider", &key_file))
        .unwrap();
    ins.batch_execute(&hostile_table("i", "t")).unwrap();
    ins.batch_execute("INSERT INTO i.t (id, v) SELECT g, kms_encrypt('value ' || g, 'pii') FROM generate_series(1, 50) g")
        .unwrap();
    db.batch_execute("TRUNCATE public.seen; SELECT kms_rotate_key('pii');")
        .unwrap();

    // The worker rewraps the insider's rows (as the insider) and records
    // the forged value as a row it cannot open (read as mallory).
    poll("the worker to rewrap i.t", CONVERGE, || {
        let left: i64 = db
            .query_one(
                "SELECT count(*) FROM i.t WHERE kms_key_version(v) <> 2",
                &[],
            )
            .ok()?
            .get(0);
        (left == 0).then_some(())
    });
    let err: String = poll("the forged row to be reported", CONVERGE, || {
        db.query_one(
            "SELECT last_error FROM kms_reencryption_progress WHERE table_name = 'm.t'::regclass AND last_error IS NOT NULL",
            &[],
        )
        .ok()
        .map(|r| r.get(0))
    });
    assert!(
        err.starts_with("row (0, 1) could not be re-encrypted: decryption failed"),
        "{err}"
    );
    poll("mallory's policy to have run", CONVERGE, || {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM public.seen WHERE usr = 'mallory'",
                &[],
            )
            .ok()?
            .get(0);
        (n > 0).then_some(())
    });
    let got = seen(&mut db);
    println!("worker: table code ran as {:?}", got);
    assert_nothing_gained(&mut db, "worker");
    for tag in [
        "check",
        "generated",
        "index",
        "rls",
        "rls_check",
        "trigger_row",
        "trigger_stmt",
    ] {
        assert!(
            got.contains(&(tag.to_string(), "insider".to_string())),
            "{tag} did not run as the insider: {got:?}"
        );
    }
    assert!(
        got.contains(&("rls".to_string(), "mallory".to_string())),
        "{got:?}"
    );
    // Nothing of mallory's ran as anyone else, and no UPDATE ran on her table.
    assert!(
        got.iter()
            .all(|(t, u)| u == "insider" || (u == "mallory" && t == "rls")),
        "{got:?}"
    );
    let plain: i64 = db
        .query_one(
            "SELECT count(*) FROM i.t WHERE kms_decrypt(v) = 'value ' || id",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(plain, 50);
}

#[test]
fn reencrypt_now_runs_as_its_caller() {
    let c = Cluster::start("t_now", &[]);
    let key_file = c.key_file().display().to_string();
    let mut db = c.connect();
    db.batch_execute(&format!(
        "CREATE EXTENSION pg_kms; SELECT kms_create_key('pii');
         {SEEN}
         CREATE ROLE adm LOGIN IN ROLE kms_admin, kms_user; CREATE SCHEMA a AUTHORIZATION adm;"
    ))
    .unwrap();
    let mut adm = c.connect_as("adm", "postgres");
    adm.batch_execute(&probes("a", "adm", &key_file)).unwrap();
    adm.batch_execute(&hostile_table("a", "t")).unwrap();
    // Ordinary (ORIGIN) statement trigger too: kms_reencrypt_now runs in the
    // caller's session, where those fire.
    adm.batch_execute("CREATE TRIGGER o BEFORE UPDATE ON a.t FOR EACH STATEMENT EXECUTE FUNCTION a.trig('trigger_origin')")
        .unwrap();
    // Nothing to rewrap: no statement runs on the table at all.
    let n: i64 = adm
        .query_one("SELECT kms_reencrypt_now('a.t', 'v')", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    adm.batch_execute("INSERT INTO a.t (id, v) SELECT g, kms_encrypt('v' || g, 'pii') FROM generate_series(1, 10) g")
        .unwrap();
    db.batch_execute("TRUNCATE public.seen; SELECT kms_rotate_key('pii');")
        .unwrap();
    let n: i64 = adm
        .query_one("SELECT kms_reencrypt_now('a.t', 'v')", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 10);
    let got = seen(&mut db);
    println!("kms_reencrypt_now: table code ran as {:?}", got);
    assert_nothing_gained(&mut db, "kms_reencrypt_now");
    for tag in [
        "check",
        "index",
        "rls",
        "trigger_origin",
        "trigger_row",
        "trigger_stmt",
    ] {
        assert!(
            got.contains(&(tag.to_string(), "adm".to_string())),
            "{tag} did not run as the caller: {got:?}"
        );
    }
    assert!(got.iter().all(|(_, u)| u == "adm"), "{got:?}");
    // The caller needs UPDATE on the column: a kms_admin without it is refused.
    db.batch_execute("CREATE ROLE adm2 LOGIN IN ROLE kms_admin; GRANT USAGE ON SCHEMA a TO adm2; GRANT SELECT ON a.t TO adm2;")
        .unwrap();
    let mut adm2 = c.connect_as("adm2", "postgres");
    let r = adm2.query_one("SELECT kms_reencrypt_now('a.t', 'v')", &[]);
    let msg = message(adm2.query_one("SELECT kms_reencrypt_now('a.t', 'v')", &[]));
    assert_eq!(sqlstate(r), "42501");
    assert!(
        msg.contains("permission denied for role adm2 to re-encrypt column v of table a.t"),
        "{msg}"
    );
}

#[test]
fn key_usage_and_destroy_guard_count_only_what_the_caller_may_read() {
    let c = Cluster::start("t_usage", &[]);
    let key_file = c.key_file().display().to_string();
    let mut db = c.connect();
    db.batch_execute(&format!(
        "CREATE EXTENSION pg_kms; SELECT kms_create_key('pii');
         {SEEN}
         CREATE ROLE adm LOGIN IN ROLE kms_admin;
         CREATE ROLE owner LOGIN IN ROLE kms_user; CREATE SCHEMA o AUTHORIZATION owner;
         CREATE SCHEMA o2 AUTHORIZATION owner;
         GRANT USAGE ON SCHEMA o TO adm;"
    ))
    .unwrap();
    let mut own = c.connect_as("owner", "postgres");
    own.batch_execute(&probes("o", "owner", &key_file)).unwrap();
    own.batch_execute(&hostile_table("o", "shared")).unwrap();
    own.batch_execute(
        "CREATE DOMAIN o.email AS encrypted_text;
         CREATE TABLE o.plain (id int, v encrypted_text);
         CREATE TABLE o.dom (id int, v o.email);
         CREATE TABLE o.private (id int, v encrypted_text);
         CREATE TABLE o2.t (id int, v encrypted_text);
         INSERT INTO o.shared (id, v) SELECT g, kms_encrypt('s' || g, 'pii') FROM generate_series(1, 7) g;
         INSERT INTO o.plain SELECT g, kms_encrypt('p' || g, 'pii') FROM generate_series(1, 5) g;
         INSERT INTO o.dom SELECT g, kms_encrypt('d' || g, 'pii') FROM generate_series(1, 4) g;
         INSERT INTO o.private SELECT g, kms_encrypt('x' || g, 'pii') FROM generate_series(1, 3) g;
         INSERT INTO o2.t SELECT g, kms_encrypt('y' || g, 'pii') FROM generate_series(1, 2) g;
         -- adm may SELECT these, but row-level security (forced) applies to
         -- adm on o.shared, and adm has no USAGE on schema o2.
         GRANT SELECT ON o.shared, o.plain, o.dom, o2.t TO adm;",
    )
    .unwrap();
    db.batch_execute("TRUNCATE public.seen; SELECT kms_rotate_key('pii');")
        .unwrap();
    let mut adm = c.connect_as("adm", "postgres");
    // adm counts only what it may read in full (o.plain, o.dom: a domain
    // over encrypted_text), each scanned as its owner.
    let usage: Vec<(i32, i64)> = pairs(&mut adm, "SELECT version, rows FROM kms_key_usage('pii')");
    assert_eq!(usage, vec![(1, 9), (2, 0)]);
    assert_eq!(seen(&mut db), vec![], "adm's count ran table code");
    // The table code's set_config() did not stay in adm's session.
    let sp: String = adm
        .query_one("SELECT current_setting('search_path')", &[])
        .unwrap()
        .get(0);
    assert_eq!(sp, "\"$user\", public");
    // A superuser counts every table except o.shared: row-level security
    // forced on it hides rows from its owner's scan (the owner does not
    // bypass it), so its 7 rows cannot be counted and it is reported as
    // skipped, its table code not even run.
    let all: Vec<(i32, i64)> = pairs(&mut db, "SELECT version, rows FROM kms_key_usage('pii')");
    assert_eq!(all, vec![(1, 14), (2, 0)]);
    let got = seen(&mut db);
    println!("kms_key_usage: table code ran as {:?}", got);
    assert_eq!(got, vec![]);
    assert_nothing_gained(&mut db, "kms_key_usage");
    // The destroy guard: rows adm can see block it (55000); once they are
    // rewrapped, columns adm cannot read in full make the check impossible
    // (42501, naming them), and so does an array of encrypted_text.
    let r = adm.batch_execute("SELECT kms_destroy_key_version('pii', 1)");
    assert_eq!(sqlstate(r), "55000");
    own.batch_execute("UPDATE o.plain SET v = kms_rewrap(v)")
        .unwrap();
    let n: i64 = db
        .query_one("SELECT kms_reencrypt_now('o.dom', 'v')", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 4, "the domain column is rewrapped");
    own.batch_execute("CREATE TABLE o.arr (v encrypted_text[]); INSERT INTO o.arr VALUES (ARRAY[kms_encrypt('a', 'pii')]);")
        .unwrap();
    let msg = message(adm.batch_execute("SELECT kms_destroy_key_version('pii', 1)"));
    assert_eq!(
        sqlstate(adm.batch_execute("SELECT kms_destroy_key_version('pii', 1)")),
        "42501"
    );
    for name in ["o.shared.v", "o.private.v", "o2.t.v", "o.arr.v"] {
        assert!(
            msg.contains(name) && msg.contains("force => true"),
            "{name}: {msg}"
        );
    }
    // A superuser's guard sees the private rows (55000); force shreds.
    assert_eq!(
        sqlstate(db.batch_execute("SELECT kms_destroy_key_version('pii', 1)")),
        "55000"
    );
    adm.batch_execute("SELECT kms_destroy_key_version('pii', 1, 'tenant erased', force => true)")
        .unwrap();
    assert_nothing_gained(&mut db, "destroy guard");
}

#[test]
fn table_code_that_sleeps_or_locks_does_not_stall_the_worker() {
    let c = Cluster::start(
        "t_stall",
        &[
            "shared_preload_libraries = 'pg_kms'",
            "pg_kms.reencrypt_naptime = '200ms'",
            "pg_kms.reencrypt_max_rows_per_second = 0",
            "pg_kms.reencrypt_statement_timeout = '8s'",
        ],
    );
    let mut db = c.connect();
    db.batch_execute(
        "CREATE EXTENSION pg_kms; SELECT kms_create_key('pii');
         CREATE ROLE sloth LOGIN IN ROLE kms_user; CREATE SCHEMA s AUTHORIZATION sloth;",
    )
    .unwrap();
    let mut sloth = c.connect_as("sloth", "postgres");
    // Created first, so the worker meets them first in every pass.
    sloth
        .batch_execute(
            "CREATE TABLE s.sleepy (id int, v encrypted_text);
             CREATE TABLE s.locked (id int, v encrypted_text);
             CREATE TABLE s.fine (id int, v encrypted_text);
             INSERT INTO s.sleepy SELECT g, kms_encrypt('a' || g, 'pii') FROM generate_series(1, 3) g;
             INSERT INTO s.locked SELECT g, kms_encrypt('b' || g, 'pii') FROM generate_series(1, 3) g;
             INSERT INTO s.fine SELECT g, kms_encrypt('c' || g, 'pii') FROM generate_series(1, 100) g;
             ALTER TABLE s.sleepy ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
             CREATE POLICY p ON s.sleepy USING (pg_sleep(3600) IS NOT NULL);",
        )
        .unwrap();
    // The owner holds an exclusive lock on s.locked for the whole test.
    let mut holder = c.connect_as("sloth", "postgres");
    holder
        .batch_execute("BEGIN; LOCK TABLE s.locked IN ACCESS EXCLUSIVE MODE;")
        .unwrap();
    db.batch_execute("SELECT kms_rotate_key('pii')").unwrap();
    poll(
        "s.fine to be rewrapped past the sleeping and the locked table",
        Duration::from_secs(90),
        || {
            let left: i64 = db
                .query_one(
                    "SELECT count(*) FROM s.fine WHERE kms_key_version(v) <> 2",
                    &[],
                )
                .ok()?
                .get(0);
            (left == 0).then_some(())
        },
    );
    let errors: Vec<(String, String)> = poll(
        "both stalls to be named",
        Duration::from_secs(60),
        || {
            let e: Vec<(String, String)> = pairs(
            &mut db,
            "SELECT table_name::text, last_error FROM kms_reencryption_progress
              WHERE last_error IS NOT NULL AND table_name::text IN ('s.sleepy', 's.locked') ORDER BY 1",
        );
            (e.len() == 2).then_some(e)
        },
    );
    println!("stalls named: {errors:?}");
    assert!(errors[0].1.contains("lock timeout"), "{errors:?}");
    assert!(errors[1].1.contains("statement timeout"), "{errors:?}");
    holder.batch_execute("ROLLBACK").unwrap();
}
