//! Runs the pg_regress golden-file suite in `pgrx_tests/regress/` against a
//! throwaway cluster configured with a freshly generated master key: one
//! file per feature (`sql/NAME.sql`, `expected/NAME.out`), run in the order
//! of `schedule` on one database, each file continuing the state the files
//! before it left.
//!
//! The server is the one `PG_KMS_PG` / `PG_KMS_PG_CONFIG` choose (default
//! Debian's 15), pg_regress that server's PGXS one.

use pg_kms_integration::{pg_regress, repo_root, Cluster, PG_BIN};
use std::process::Command;

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
    let pg_regress = pg_regress();
    let status = Command::new(&pg_regress)
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
        .unwrap_or_else(|e| {
            panic!(
                "{} (Debian: postgresql-server-dev-15; others: scripts/pg_servers.sh): {e}",
                pg_regress.display()
            )
        });
    if !status.success() {
        let diffs = std::fs::read_to_string(out.join("regression.diffs")).unwrap_or_default();
        panic!("pg_regress failed:\n{diffs}");
    }
}
