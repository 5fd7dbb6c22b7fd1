//! Real client applications against a real cluster: psycopg 3 (text and
//! binary protocol, COPY), SQLAlchemy 2, Django 5, asyncpg, node-postgres,
//! Sequelize 6 and JDBC, each a program under `pgrx_tests/clients/` that prints
//! one `ok:` line per check and `<client>: all N checks ok` at the end.
//! Their packages are installed, pinned, by `scripts/clients.sh` (a venv and
//! an npm folder under `target/clients/`, stamped: fast once done; Debian's
//! PgJDBC); when that fails (no registry), the tests fail saying so.
//!
//! Each program runs once, in two styles: explicit pg_kms functions on
//! tables of `clients/schema.sql`, and plain ORM models / SQL on the
//! decrypted views of the protected tables of `clients/schema_view.sql`.
//! The programs connect as `app` (only a `kms_user`) over the cluster's
//! socket (JDBC: loopback TCP). The server logs every statement without parameters and without
//! pg_kms's redaction, so a client that put plaintext into a statement's
//! text (instead of a bind parameter) would be seen: after each program the
//! new part of the log must hold none of the test's plaintexts (all of them
//! contain `@example.` or `+1 555 `). Only counts are printed, never a line.
//!
//! The recipes in `docs/clients.md` are the programs' own code: each quoted
//! block must equal the region of its file between `recipe: NAME` and `end
//! recipe` (`docs_recipes_are_the_tested_code`).

use pg_kms_integration::{repo_root, Cluster};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The server settings of the clients' cluster: every statement logged,
/// parameters not, no redaction (so plaintext in a statement's text shows).
const LOGGING: &[&str] = &[
    // PgJDBC has no Unix sockets: loopback TCP too (trust, as initdb made it).
    "listen_addresses = '127.0.0.1'",
    "log_statement = 'all'",
    "log_parameter_max_length = 0",
    "log_parameter_max_length_on_error = 0",
    "pg_kms.redact_statement_logs = off",
];

/// Marks of the test's plaintexts (emails and phone numbers).
const PLAINTEXT_MARKS: &[&str] = &["@example.", "+1 555 "];

fn clients_src() -> PathBuf {
    repo_root().join("pgrx_tests").join("clients")
}

fn clients_dir() -> PathBuf {
    std::env::var_os("PG_KMS_CLIENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target").join("clients"))
}

/// Runs `scripts/clients.sh` (installs or checks the pinned packages);
/// panics with its output when it fails.
fn install_clients() {
    let t = Instant::now();
    let out = Command::new("bash")
        .arg(repo_root().join("scripts").join("clients.sh"))
        .env("PG_KMS_CLIENTS_DIR", clients_dir())
        .output()
        .expect("cannot run bash scripts/clients.sh");
    assert!(
        out.status.success(),
        "scripts/clients.sh could not install the pinned client packages \
         (python3 -m venv + pip, npm ci: the package registries must be reachable):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ready = stdout.lines().last().unwrap_or("");
    println!("{ready} ({:.1}s)", t.elapsed().as_secs_f64());
}

/// The cluster with pg_kms, the key, the role `app` and the tables of
/// `pgrx_tests/clients/schema.sql`.
fn start(name: &str) -> Cluster {
    let c = Cluster::start(name, LOGGING);
    c.psql_file("postgres", &clients_src().join("schema.sql"));
    c
}

/// One client program: `python` or `node`, its file.
struct Program {
    lang: &'static str,
    file: &'static str,
}

/// Every program; each runs once, with the styles asked for.
const PROGRAMS: &[Program] = &[
    Program {
        lang: "python",
        file: "psycopg_app.py",
    },
    Program {
        lang: "python",
        file: "sqlalchemy_app.py",
    },
    Program {
        lang: "python",
        file: "django_app.py",
    },
    Program {
        lang: "python",
        file: "asyncpg_app.py",
    },
    Program {
        lang: "node",
        file: "nodepg_app.js",
    },
    Program {
        lang: "node",
        file: "sequelize_app.js",
    },
    Program {
        lang: "java",
        file: "JdbcApp.java",
    },
];

impl Program {
    /// The styles of `styles` this program has (asyncpg: explicit only).
    fn styles<'a>(&self, styles: &[&'a str]) -> Vec<&'a str> {
        styles
            .iter()
            .copied()
            .filter(|s| *s == "explicit" || self.file != "asyncpg_app.py")
            .collect()
    }

    /// Marks of values this program's client is known to write into the
    /// statement text (docs/clients.md says so): they must reach the log,
    /// so the limitation stays documented truthfully.
    fn inlined(&self, styles: &[&str]) -> &'static [&'static str] {
        if self.file == "sequelize_app.js" && styles.contains(&"view") {
            &["@inline.test"]
        } else {
            &[]
        }
    }

    fn command(&self, c: &Cluster, styles: &[&str]) -> Command {
        let dir = clients_src().join(self.lang);
        let mut cmd = match self.lang {
            "python" => {
                let mut cmd = Command::new(clients_dir().join("venv").join("bin").join("python"));
                cmd.env("PYTHONDONTWRITEBYTECODE", "1");
                cmd
            }
            "node" => {
                let mut cmd = Command::new("node");
                cmd.env("NODE_PATH", clients_dir().join("node").join("node_modules"));
                cmd
            }
            // Java 17 runs a single source file; PgJDBC from Debian.
            "java" => {
                let mut cmd = Command::new("java");
                cmd.args(["-cp", "/usr/share/java/postgresql.jar"]);
                cmd
            }
            other => panic!("no runner for {other}"),
        };
        cmd.current_dir(&dir)
            .arg(dir.join(self.file))
            .args(styles)
            .env("PGHOST", &c.dir)
            .env("PGPORT", c.port.to_string())
            .env("PGUSER", "app")
            .env("PGDATABASE", "postgres")
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .env_remove("PGOPTIONS");
        cmd
    }
}

/// `line`, unless it holds a test value (a driver's error may quote its
/// parameters): never print one.
fn withheld(line: &str) -> &str {
    if PLAINTEXT_MARKS
        .iter()
        .chain(["@inline.test"].iter())
        .any(|m| line.contains(m))
    {
        "<line holding a test value withheld>"
    } else {
        line
    }
}

/// Lines of `log` holding one of `marks`.
fn lines_with(log: &str, marks: &[&str]) -> usize {
    log.lines()
        .filter(|l| marks.iter().any(|m| l.contains(m)))
        .count()
}

/// Runs each program once against `c` with `styles`; returns the failures
/// (program and why), after printing what ran.
fn run_all(c: &Cluster, styles: &[&str]) -> Vec<String> {
    let mut failures = Vec::new();
    for p in PROGRAMS {
        let styles = p.styles(styles);
        let log_before = c.server_log().len();
        let t = Instant::now();
        let out = p
            .command(c, &styles)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} {}: {e}", p.lang, p.file));
        let secs = t.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let checks = stdout.lines().filter(|l| l.starts_with("ok: ")).count();
        let summary = stdout
            .lines()
            .rev()
            .find(|l| l.contains(": all ") && l.ends_with(" checks ok"))
            .map(str::to_string);
        println!(
            "== {} {} {}: {} ({checks} checks, {secs:.1}s)",
            p.lang,
            p.file,
            styles.join(" "),
            summary.as_deref().unwrap_or("FAILED")
        );
        for l in stdout.lines() {
            println!("   {}", withheld(l));
        }
        if !out.status.success() || summary.is_none() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(15).collect();
            for l in tail.iter().rev() {
                println!("   stderr: {}", withheld(l));
            }
            failures.push(format!("{} {} ({})", p.lang, p.file, out.status));
            continue;
        }
        let log = c.server_log();
        let new = log.get(log_before..).unwrap_or("");
        let leaked = lines_with(new, PLAINTEXT_MARKS);
        println!("   server log: {leaked} lines with a plaintext in a statement's text");
        if leaked > 0 {
            failures.push(format!(
                "{} {}: {leaked} server log lines hold a plaintext (sent in the statement text, not as a bind parameter)",
                p.lang, p.file
            ));
        }
        let inlined = p.inlined(&styles);
        if !inlined.is_empty() {
            let n = lines_with(new, inlined);
            println!("   server log: {n} lines with values the client is documented to inline");
            if n == 0 {
                failures.push(format!(
                    "{} {}: the values docs/clients.md says this client inlines were not in the log: update the docs",
                    p.lang, p.file
                ));
            }
        }
    }
    failures
}

/// Installs the clients, starts one cluster (`schema.sql`, then
/// `schema_view.sql`), and runs every program once with both styles:
/// - explicit functions: kms_encrypt/kms_decrypt/kms_blind_index called by
///   the client (a custom type, a placeholder, a bound statement);
/// - the view: each ORM's model mapped to `<table>_decrypted`, with no
///   pg_kms code for create, read, update, delete and bulk insert, ids from
///   the identity read back, the row's id as context.
#[test]
fn real_clients_both_styles() {
    install_clients();
    let c = start("clients");
    c.psql_file("postgres", &clients_src().join("schema_view.sql"));
    let t = Instant::now();
    let failures = run_all(&c, &["explicit", "view"]);
    println!("clients: {:.1}s", t.elapsed().as_secs_f64());
    log_check_can_fail(&c);
    assert!(failures.is_empty(), "client programs failed: {failures:#?}");
}

/// The control of the log check: a plaintext sent as a literal is seen.
fn log_check_can_fail(c: &Cluster) {
    let before = c.server_log().len();
    c.connect()
        .batch_execute("SELECT 'control@example.invalid' AS literal")
        .unwrap();
    let log = c.server_log();
    let seen = lines_with(log.get(before..).unwrap_or(""), PLAINTEXT_MARKS);
    assert!(
        seen >= 1,
        "the server log check does not see a literal plaintext: it proves nothing"
    );
}

/// A `recipe: NAME` region of a program file, without its marker lines.
fn recipe_in(file: &Path, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        let t = line.trim_start_matches(['#', '/', ' ']);
        if inside {
            if t == "end recipe" {
                return Some(out.join("\n"));
            }
            out.push(line);
        } else if t == format!("recipe: {name}") {
            inside = true;
        }
    }
    None
}

/// Every `recipe: NAME` marker of the program files, as (file, NAME).
fn recipes_in_programs() -> Vec<(PathBuf, String)> {
    let mut all = Vec::new();
    for lang in ["python", "node", "java"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(clients_src().join(lang))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "py" || e == "js" || e == "java")
            })
            .collect();
        files.sort();
        for f in files {
            for line in std::fs::read_to_string(&f).unwrap().lines() {
                let t = line.trim_start_matches(['#', '/', ' ']);
                if let Some(name) = t.strip_prefix("recipe: ") {
                    all.push((f.clone(), name.to_string()));
                }
            }
        }
    }
    all
}

/// docs/clients.md quotes the programs: a line `<!-- recipe: FILE NAME -->`
/// (FILE relative to pgrx_tests/clients) followed by a fenced block equal
/// to that recipe; and every recipe of the programs is quoted.
#[test]
fn docs_recipes_are_the_tested_code() {
    let doc_path = repo_root().join("docs").join("clients.md");
    let doc = std::fs::read_to_string(&doc_path).expect("docs/clients.md");
    let lines: Vec<&str> = doc.lines().collect();
    let mut quoted = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(spec) = lines[i]
            .strip_prefix("<!-- recipe: ")
            .and_then(|s| s.strip_suffix(" -->"))
        else {
            i += 1;
            continue;
        };
        let (file, name) = spec.split_once(' ').expect("<!-- recipe: FILE NAME -->");
        assert!(
            lines.get(i + 1).is_some_and(|l| l.starts_with("```")),
            "docs/clients.md line {}: a fenced block must follow the recipe marker",
            i + 1
        );
        let end = (i + 2..lines.len())
            .find(|&j| lines[j].starts_with("```"))
            .expect("unterminated block");
        let block = lines[i + 2..end].join("\n");
        let path = clients_src().join(file);
        let want = recipe_in(&path, name)
            .unwrap_or_else(|| panic!("no recipe {name:?} in pgrx_tests/clients/{file}"));
        assert_eq!(
            block, want,
            "docs/clients.md's recipe {name:?} differs from pgrx_tests/clients/{file}"
        );
        quoted.push((path, name.to_string()));
        i = end + 1;
    }
    for (file, name) in recipes_in_programs() {
        assert!(
            quoted.contains(&(file.clone(), name.clone())),
            "recipe {name:?} of {} is not quoted in docs/clients.md",
            file.display()
        );
    }
    println!(
        "docs/clients.md: {} recipes equal the tested code",
        quoted.len()
    );
}
