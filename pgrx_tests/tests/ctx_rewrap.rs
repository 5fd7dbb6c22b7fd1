//! Context-bound values of protected columns are re-encrypted by the
//! background worker (issue 15 point 3), on real clusters started with
//! `shared_preload_libraries = 'pg_kms'`: the worker computes each row's
//! context from the column's policy, in the statement it runs as the
//! table's owner under `SECURITY_RESTRICTED_OPERATION`, so a context
//! function gains nothing. Waiting is polling with deadlines.

use pg_kms_integration::{pairs, poll, Cluster};
use postgres::Client;
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(180);

fn preloaded(name: &str) -> (Cluster, Client) {
    let c = Cluster::start(
        name,
        &[
            "shared_preload_libraries = 'pg_kms'",
            "pg_kms.reencrypt_naptime = '200ms'",
            "pg_kms.reencrypt_max_rows_per_second = 0",
        ],
    );
    let mut db = c.connect();
    db.batch_execute("CREATE EXTENSION pg_kms; SELECT kms_create_key('pii');")
        .unwrap();
    (c, db)
}

/// (rows_rewrapped, rows_pending, rows_needing_context, finished, last_error)
/// of `tbl.col` in kms_reencryption_progress.
fn progress(
    db: &mut Client,
    tbl: &str,
    col: &str,
) -> Option<(i64, i64, i64, bool, Option<String>)> {
    let r = db
        .query_opt(
            "SELECT rows_rewrapped, rows_pending, rows_needing_context, finished_at IS NOT NULL, last_error
               FROM kms_reencryption_progress WHERE table_name = $1::text::regclass AND column_name = $2",
            &[&tbl, &col],
        )
        .ok()??;
    Some((r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
}

#[test]
fn worker_rewraps_context_bound_values_of_protected_columns() {
    let (c, mut db) = preloaded("cr_worker");
    const N: i64 = 20_000;
    db.batch_execute(&format!(
        "SELECT kms_create_key('aux');
         CREATE TABLE people (id bigserial PRIMARY KEY, name text, email encrypted_text, note encrypted_text);
         SELECT kms_protect_column('people', 'email', 'pii', context => 'id::text', blind_index_bits => 16);
         INSERT INTO people_decrypted (name, email)
              SELECT 'n' || g, 'user' || g || '@example.com' FROM generate_series(1, {N}) g;
         -- A column without a policy, sealed with a context: left to the application.
         UPDATE people SET note = kms_encrypt('note ' || id, 'aux', 'n' || id);"
    ))
    .unwrap();
    let sealed: i64 = db
        .query_one(
            "SELECT count(*) FROM people WHERE kms_decrypt(email, id::text) = 'user' || id || '@example.com'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        sealed, N,
        "values sealed with the row's id through the view"
    );
    db.batch_execute("SELECT kms_rotate_key('pii'); SELECT kms_rotate_key('aux');")
        .unwrap();
    poll(
        "the worker to rewrap the protected column",
        CONVERGE,
        || {
            let mut db = c.connect();
            let usage: Vec<(i32, i64)> =
                pairs(&mut db, "SELECT version, rows FROM kms_key_usage('pii')");
            let p = progress(&mut db, "people", "email")?;
            (usage == vec![(1, 0), (2, N)] && p.1 == 0 && p.2 == 0 && p.3).then_some(())
        },
    );
    let p = progress(&mut db, "people", "email").unwrap();
    assert_eq!(p, (N, 0, 0, true, None), "progress of people.email");
    // Still readable through the view (its context), and by blind index.
    let ok: i64 = db
        .query_one(
            "SELECT count(*) FROM people_decrypted WHERE email = 'user' || id || '@example.com'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(ok, N);
    let found: i64 = db
        .query_one(
            "SELECT id FROM people_decrypted
              WHERE email_bidx = kms_blind_index('user77@example.com', 'pii', NULL, 16)
                AND email = 'user77@example.com'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(found, 77);
    // The column without a policy: counted, not rewrapped, as before.
    let p = poll("the worker to count people.note", CONVERGE, || {
        progress(&mut db, "people", "note").filter(|p| p.2 == N)
    });
    assert_eq!((p.0, p.1, p.2), (0, 0, N), "progress of people.note");
    let usage: Vec<(i32, i64)> = pairs(&mut db, "SELECT version, rows FROM kms_key_usage('aux')");
    assert_eq!(usage, vec![(1, N), (2, 0)]);
    // A later write through the view and a new rotation: rewrapped again.
    db.batch_execute(
        "INSERT INTO people_decrypted (name, email) VALUES ('late', 'late@example.com');
         SELECT kms_rotate_key('pii');",
    )
    .unwrap();
    poll(
        "the worker to rewrap after a second rotation",
        CONVERGE,
        || {
            let mut db = c.connect();
            let usage: Vec<(i32, i64)> =
                pairs(&mut db, "SELECT version, rows FROM kms_key_usage('pii')");
            (usage == vec![(1, 0), (2, 0), (3, N + 1)]).then_some(())
        },
    );
    let late: String = db
        .query_one(
            "SELECT email FROM people_decrypted WHERE name = 'late'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(late, "late@example.com");
}

/// A table `public.seen` that probes write to, readable by everyone.
const SEEN: &str = "CREATE TABLE public.seen (tag text, usr text, sup boolean, escalated boolean, read_key boolean);
                    GRANT INSERT, SELECT ON public.seen TO PUBLIC;";

#[test]
fn a_context_function_runs_as_the_table_owner_and_gains_nothing() {
    let (c, mut db) = preloaded("cr_trust");
    let key_file = c.key_file().display().to_string();
    db.batch_execute(&format!(
        "{SEEN}
         -- The table owner protects its own column: kms_admin and kms_user, nothing more.
         CREATE ROLE owner1 LOGIN IN ROLE kms_admin, kms_user; CREATE SCHEMA o AUTHORIZATION owner1;"
    ))
    .unwrap();
    let mut own = c.connect_as("owner1", "postgres");
    // The context calls an IMMUTABLE (so it claims) function of the owner's that calls a
    // volatile probe: it tries to make owner1 superuser, to read the master
    // key file, and to leave a search_path behind for what runs next (an
    // operator in its schema would then record it), and records who ran it.
    own.batch_execute(&format!(
        r#"
        CREATE FUNCTION o.probe(tag text) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $f$
        DECLARE esc boolean := false; rk boolean := false;
        BEGIN
            BEGIN EXECUTE 'ALTER ROLE owner1 SUPERUSER'; esc := true; EXCEPTION WHEN OTHERS THEN NULL; END;
            BEGIN PERFORM pg_catalog.pg_read_file('{key_file}'); rk := true; EXCEPTION WHEN OTHERS THEN NULL; END;
            PERFORM pg_catalog.set_config('search_path', 'o, pg_catalog, public', false);
            INSERT INTO public.seen VALUES (tag, current_user,
                (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user), esc, rk);
            RETURN true;
        END $f$;
        CREATE FUNCTION o.ctx_of(i bigint) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $f$
        BEGIN PERFORM o.probe('ctx'); RETURN 'c' || i; END $f$;
        CREATE FUNCTION o.eq_bytea(a bytea, b bytea) RETURNS boolean LANGUAGE plpgsql AS $f$
        BEGIN PERFORM o.probe('operator'); RETURN a OPERATOR(pg_catalog.=) b; END $f$;
        CREATE OPERATOR o.= (LEFTARG = bytea, RIGHTARG = bytea, FUNCTION = o.eq_bytea);
        CREATE TABLE o.t (id bigint PRIMARY KEY, v encrypted_text);
        SELECT kms_protect_column('o.t', 'v', 'pii', context => 'o.ctx_of(id)');
        INSERT INTO o.t_decrypted (id, v) SELECT g, 'v' || g FROM generate_series(1, 50) g;
        "#
    ))
    .unwrap();
    let sealed: i64 = own
        .query_one(
            "SELECT count(*) FROM o.t WHERE kms_decrypt(v, 'c' || id) = 'v' || id",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(sealed, 50);
    db.batch_execute("TRUNCATE public.seen; SELECT kms_rotate_key('pii');")
        .unwrap();
    poll("the worker to rewrap o.t", CONVERGE, || {
        let mut db = c.connect();
        let usage: Vec<(i32, i64)> =
            pairs(&mut db, "SELECT version, rows FROM kms_key_usage('pii')");
        let p = progress(&mut db, "o.t", "v")?;
        (usage == vec![(1, 0), (2, 50)] && p.1 == 0 && p.2 == 0).then_some(())
    });
    let got: Vec<(String, String)> = pairs(
        &mut db,
        "SELECT DISTINCT tag, usr FROM public.seen ORDER BY 1, 2",
    );
    println!("worker: the context ran as {got:?}");
    assert_eq!(
        got,
        vec![("ctx".to_string(), "owner1".to_string())],
        "the context ran as the table owner only, and no operator of its schema ran"
    );
    let bad: i64 = db
        .query_one(
            "SELECT count(*) FROM public.seen WHERE sup OR escalated OR read_key OR usr = 'postgres'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(bad, 0, "a probe ran with privileges");
    let supers: Vec<(String, bool)> = pairs(
        &mut db,
        "SELECT rolname::text, rolsuper FROM pg_roles WHERE rolsuper ORDER BY 1",
    );
    assert_eq!(supers, vec![("postgres".to_string(), true)]);
    let p = progress(&mut db, "o.t", "v").unwrap();
    assert_eq!((p.0, p.4), (50, None));
    // Still readable by the owner through the view.
    let ok: i64 = own
        .query_one(
            "SELECT count(*) FROM o.t_decrypted WHERE v = 'v' || id",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(ok, 50);
}
