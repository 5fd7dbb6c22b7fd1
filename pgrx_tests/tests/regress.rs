//! Runs the pg_regress golden-file suite in `pgrx_tests/regress/` against a
//! throwaway cluster configured with a freshly generated master key: one
//! file per feature (`sql/NAME.sql`, `expected/NAME.out`), run in the order
//! of `schedule` on one database, each file continuing the state the files
//! before it left.

use pg_kms_integration::{repo_root, Cluster, PG_BIN};
use std::process::Command;

const PG_REGRESS: &str = "/usr/lib/postgresql/15/lib/pgxs/src/test/regress/pg_regress";

#[test]
fn pg_regress_suite() {
    let c = Cluster::start("regress", &[]);
    let mut db = c.connect();
    db.batch_execute("DROP DATABASE IF EXISTS pg_kms_regress")
        .unwrap();
    db.batch_execute("CREATE DATABASE pg_kms_regress").unwrap();
    let dir = repo_root().join("pgrx_tests/regress");
    let out = c.dir.join("regress_out");
    std::fs::create_dir_all(&out).unwrap();
    // Every file of sql/ is in the schedule, once, and nothing else is: a
    // new golden file cannot be left out silently.
    let schedule = dir.join("schedule");
    let mut scheduled: Vec<String> = std::fs::read_to_string(&schedule)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("test:"))
        .flat_map(|l| l.split_whitespace().map(String::from))
        .collect();
    let mut files: Vec<String> = std::fs::read_dir(dir.join("sql"))
        .unwrap()
        .filter_map(|e| e.ok()?.path().file_stem()?.to_str().map(String::from))
        .collect();
    scheduled.sort();
    files.sort();
    assert_eq!(
        scheduled, files,
        "regress/schedule must list every file of regress/sql once"
    );
    let status = Command::new(PG_REGRESS)
        .arg("--use-existing")
        .arg(format!("--host={}", c.dir.display()))
        .arg(format!("--port={}", c.port))
        .arg("--user=postgres")
        .arg("--dbname=pg_kms_regress")
        .arg(format!("--bindir={PG_BIN}"))
        .arg(format!("--inputdir={}", dir.display()))
        .arg(format!("--outputdir={}", out.display()))
        .arg(format!("--schedule={}", schedule.display()))
        .status()
        .expect("pg_regress (package postgresql-server-dev-15)");
    if !status.success() {
        let diffs = std::fs::read_to_string(out.join("regression.diffs")).unwrap_or_default();
        panic!("pg_regress failed:\n{diffs}");
    }
}
