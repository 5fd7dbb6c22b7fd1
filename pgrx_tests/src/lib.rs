//! Throwaway PostgreSQL clusters for pg_kms integration tests, on the
//! server chosen by `PG_KMS_PG_CONFIG` or `PG_KMS_PG` (default: Debian's 15;
//! see [`pg_bin`]).
//!
//! Each [`Cluster`] runs as the `postgres` OS user (via `runuser` when the
//! tests run as root) in its own directory, listening only on a private
//! Unix socket directory. The master key is generated at run time into a
//! mode-0600 file owned by `postgres`; it never appears in test output.
//! Waiting is always polling with a deadline, never a fixed sleep.

use postgres::{Client, NoTls};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// The bin directory of the server under test, as `format!("{PG_BIN}/initdb")`
/// (see [`pg_bin`]).
pub const PG_BIN: PgBin = PgBin;

/// Displays as [`pg_bin`]'s directory.
#[derive(Clone, Copy, Debug)]
pub struct PgBin;

impl std::fmt::Display for PgBin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(pg_bin().to_str().expect("UTF-8 bin directory"))
    }
}

/// Where the servers other than Debian's 15 are installed, one prefix per
/// major (`scripts/pg_servers.sh` builds them there).
pub const PG_PREFIX_ROOT: &str = "/opt/pg_kms";

/// The bin directory of PostgreSQL `major`: Debian's package for 15
/// (`/usr/lib/postgresql/15/bin`), `/opt/pg_kms/pgNN/bin` for the others
/// (`PG_KMS_PG_PREFIX_ROOT` overrides `/opt/pg_kms`).
pub fn pg_bin_of(major: u32) -> PathBuf {
    if major == 15 {
        PathBuf::from("/usr/lib/postgresql/15/bin")
    } else {
        let root = std::env::var("PG_KMS_PG_PREFIX_ROOT").unwrap_or_else(|_| PG_PREFIX_ROOT.into());
        PathBuf::from(format!("{root}/pg{major}/bin"))
    }
}

/// The server the tests run against: `PG_KMS_PG_CONFIG` (a `pg_config`
/// path) if set, else `PG_KMS_PG` (a major: 15, 16, 17, 18), else 15.
fn pg_config_path() -> PathBuf {
    if let Some(p) = std::env::var_os("PG_KMS_PG_CONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    pg_bin_of(pg_major()).join("pg_config")
}

/// The major under test (from `PG_KMS_PG_CONFIG`'s `--version` if set,
/// else `PG_KMS_PG`, else 15).
pub fn pg_major() -> u32 {
    static MAJOR: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MAJOR.get_or_init(|| {
        if std::env::var_os("PG_KMS_PG_CONFIG").is_some_and(|p| !p.is_empty()) {
            // "PostgreSQL 18.1 (Debian ...)" -> 18
            let v = pg_config("--version");
            return v
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("cannot read a major from pg_config --version: {v}"));
        }
        match std::env::var("PG_KMS_PG") {
            Ok(v) if !v.is_empty() => v.parse().unwrap_or_else(|_| {
                panic!("PG_KMS_PG must be a major version (15..18), not {v:?}")
            }),
            _ => 15,
        }
    })
}

/// One value of the `pg_config` of the server under test.
pub fn pg_config(arg: &str) -> String {
    let path = pg_config_path();
    let out = Command::new(&path)
        .arg(arg)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    assert!(out.status.success(), "{} {arg} failed", path.display());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The bin directory of the server under test.
pub fn pg_bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if std::env::var_os("PG_KMS_PG_CONFIG").is_some_and(|p| !p.is_empty()) {
            PathBuf::from(pg_config("--bindir"))
        } else {
            pg_bin_of(pg_major())
        }
    })
}

/// PGXS's pg_regress of the server under test.
pub fn pg_regress() -> PathBuf {
    // --pgxs is .../pgxs/src/makefiles/pgxs.mk
    let pgxs = PathBuf::from(pg_config("--pgxs"));
    pgxs.parent()
        .and_then(Path::parent)
        .map(|src| src.join("test/regress/pg_regress"))
        .unwrap_or_else(|| panic!("unexpected pg_config --pgxs: {}", pgxs.display()))
}
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// Runs a command as the postgres OS user.
pub fn as_postgres(program: &str, args: &[&str]) -> Output {
    let out = if is_root() {
        Command::new("runuser")
            .arg("-u")
            .arg("postgres")
            .arg("--")
            .arg(program)
            .args(args)
            .output()
    } else {
        Command::new(program).args(args).output()
    };
    out.unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn check(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn chown_postgres(path: &Path) {
    if is_root() {
        check(
            Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(path)
                .output()
                .unwrap(),
            "chown",
        );
    }
}

/// 64 random hex characters.
pub fn random_key_hex() -> String {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).expect("random");
    hex::encode(b)
}

/// `initdb` of `bin` into `data` as every test cluster is made (superuser
/// `postgres`, trust authentication, UTF8, C.UTF-8: pg_upgrade needs the
/// old and new clusters alike), plus `extra` options.
pub fn initdb(bin: &Path, data: &Path, extra: &[&str]) {
    let base = [
        "-D",
        data.to_str().unwrap(),
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--locale=C.UTF-8",
    ];
    check(
        as_postgres(
            bin.join("initdb").to_str().unwrap(),
            &[&base[..], extra].concat(),
        ),
        "initdb",
    );
}

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
}

impl Cluster {
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.join("keys").join("master.key")
    }

    /// initdb + start, with a fresh master key file and `extra` settings.
    pub fn start(name: &str, extra: &[&str]) -> Cluster {
        let port = 41000
            + (std::process::id() % 1000) as u16 * 16
            + NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!("/tmp/pgkms_it_{name}_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        chown_postgres(&dir);
        let c = Cluster { dir, port };
        c.write_key(&random_key_hex(), 0o600);
        initdb(pg_bin(), &c.data(), &[]);
        let mut conf = format!(
            "listen_addresses = ''\nport = {port}\nunix_socket_directories = '{}'\npg_kms.master_key_file = '{}'\n",
            c.dir.display(),
            c.key_file().display()
        );
        for line in extra {
            conf.push_str(line);
            conf.push('\n');
        }
        c.append_conf(&conf);
        c.pg_ctl_start();
        c
    }

    pub fn append_conf(&self, text: &str) {
        let path = self.data().join("postgresql.conf");
        let mut s = std::fs::read_to_string(&path).unwrap();
        s.push_str(text);
        std::fs::write(&path, s).unwrap();
        chown_postgres(&path);
    }

    /// Replaces the master key file's content (and mode).
    pub fn write_key(&self, hex: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.key_file();
        std::fs::write(&path, format!("{hex}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        chown_postgres(&path);
    }

    pub fn read_key(&self) -> String {
        std::fs::read_to_string(self.key_file())
            .unwrap()
            .trim()
            .to_string()
    }

    fn pg_ctl_start(&self) {
        let log = self.dir.join("server.log");
        check(
            as_postgres(
                &format!("{PG_BIN}/pg_ctl"),
                &[
                    "-D",
                    self.data().to_str().unwrap(),
                    "-l",
                    log.to_str().unwrap(),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            ),
            "pg_ctl start",
        );
    }

    pub fn stop(&self) {
        let _ = as_postgres(
            &format!("{PG_BIN}/pg_ctl"),
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    pub fn restart(&self) {
        self.stop();
        self.pg_ctl_start();
    }

    /// Crash-like stop (no checkpoint), then start: crash recovery runs.
    pub fn restart_immediate(&self) {
        let _ = as_postgres(
            &format!("{PG_BIN}/pg_ctl"),
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        self.pg_ctl_start();
    }

    /// A physical standby of this cluster made with pg_basebackup.
    pub fn standby(&self, name: &str) -> Cluster {
        let port = 41000
            + (std::process::id() % 1000) as u16 * 16
            + NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!("/tmp/pgkms_it_{name}_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        chown_postgres(&dir);
        let s = Cluster { dir, port };
        check(
            as_postgres(
                &format!("{PG_BIN}/pg_basebackup"),
                &[
                    "-h",
                    self.dir.to_str().unwrap(),
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-D",
                    s.data().to_str().unwrap(),
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                ],
            ),
            "pg_basebackup",
        );
        s.append_conf(&format!(
            "port = {}\nunix_socket_directories = '{}'\n",
            s.port,
            s.dir.display()
        ));
        s.pg_ctl_start();
        s
    }

    pub fn promote(&self) {
        check(
            as_postgres(
                &format!("{PG_BIN}/pg_ctl"),
                &["-D", self.data().to_str().unwrap(), "-w", "promote"],
            ),
            "promote",
        );
    }

    pub fn conninfo(&self, user: &str, db: &str) -> String {
        format!(
            "host={} port={} user={user} dbname={db}",
            self.dir.display(),
            self.port
        )
    }

    pub fn connect_as(&self, user: &str, db: &str) -> Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Client::connect(&self.conninfo(user, db), NoTls) {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("connect as {user}: {e}"),
            }
        }
    }

    pub fn connect(&self) -> Client {
        self.connect_as("postgres", "postgres")
    }

    /// Runs this server's client program `tool` (`pg_dump`, `pg_restore`,
    /// `psql`) on `db` with `args`, as the postgres OS user over this
    /// cluster's socket; panics with its stderr if it fails. Returns its
    /// standard output.
    pub fn client(&self, tool: &str, db: &str, args: &[&str]) -> Vec<u8> {
        let o = self.client_output(tool, db, args);
        assert!(
            o.status.success(),
            "{tool} {db}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    }

    /// [`Cluster::client`] that returns the program's output whether or not
    /// it succeeded (for tests that expect a failure).
    pub fn client_output(&self, tool: &str, db: &str, args: &[&str]) -> std::process::Output {
        let port = self.port.to_string();
        let conn = [
            "-h",
            self.dir.to_str().unwrap(),
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            db,
        ];
        as_postgres(&format!("{PG_BIN}/{tool}"), &[&conn[..], args].concat())
    }

    /// [`Cluster::client`] for `pg_dump`.
    pub fn pg_dump(&self, db: &str, args: &[&str]) -> Vec<u8> {
        self.client("pg_dump", db, args)
    }

    /// [`Cluster::client`] for `psql` running `file` (no psqlrc, quiet,
    /// stopping at the first error).
    pub fn psql_file(&self, db: &str, file: &Path) {
        self.client(
            "psql",
            db,
            &[
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-f",
                file.to_str().unwrap(),
            ],
        );
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres(
            &format!("{PG_BIN}/pg_ctl"),
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The SQLSTATE of a failed statement, or "ok".
pub fn sqlstate(r: Result<impl Sized, postgres::Error>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => e
            .code()
            .map(|c| c.code().to_string())
            .unwrap_or_else(|| format!("no sqlstate: {e}")),
    }
}

/// "message | detail | hint" of a failed statement ("" when it succeeded).
pub fn message(r: Result<impl Sized, postgres::Error>) -> String {
    match r {
        Ok(_) => String::new(),
        Err(e) => e
            .as_db_error()
            .map(|d| {
                format!(
                    "{} | {} | {}",
                    d.message(),
                    d.detail().unwrap_or(""),
                    d.hint().unwrap_or("")
                )
            })
            .unwrap_or_else(|| e.to_string()),
    }
}

/// The rows of a two-column query, as pairs.
pub fn pairs<A, B>(db: &mut Client, sql: &str) -> Vec<(A, B)>
where
    A: for<'a> postgres::types::FromSql<'a>,
    B: for<'a> postgres::types::FromSql<'a>,
{
    db.query(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Polls `f` until it returns Some or the deadline passes.
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The library of a released version of pg_kms, for upgrade tests: the
/// file named by `$PG_KMS_LIB_<version>` (dots as underscores, e.g.
/// `PG_KMS_LIB_0_1_0`) if set, else built once from the release's commit
/// (`git archive`, `cargo build --lib`) into `target/released/<version>/`
/// and reused from there. Building takes a few minutes the first time.
pub fn released_library(version: &str, commit: &str) -> PathBuf {
    let var = format!("PG_KMS_LIB_{}", version.replace('.', "_"));
    if let Ok(p) = std::env::var(&var) {
        return PathBuf::from(p);
    }
    let root = repo_root();
    let dir = root.join("target").join("released").join(version);
    let lib = dir.join("libpg_kms.so");
    if lib.exists() {
        return lib;
    }
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).unwrap();
    let archive = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "git -C '{}' archive --format=tar {commit} | tar -x -C '{}'",
            root.display(),
            src.display()
        ))
        .output()
        .unwrap();
    check(archive, "git archive of the release");
    let target = root.join("target").join("released").join("target");
    let build = Command::new("cargo")
        .args(["build", "--lib", "--manifest-path"])
        .arg(src.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .env("PGRX_PG_CONFIG_PATH", format!("{PG_BIN}/pg_config"))
        .output()
        .unwrap();
    check(build, "cargo build of the released library");
    std::fs::copy(target.join("debug").join("libpg_kms.so"), &lib).unwrap();
    lib
}

impl Cluster {
    /// Writes `hex` as the previous master key (mode 0600, owned by
    /// `postgres`) and points `pg_kms.previous_master_key_file` at it (the
    /// caller reloads).
    pub fn set_previous_key(&self, hex: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.join("keys").join("previous.key");
        std::fs::write(&path, format!("{hex}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        chown_postgres(&path);
        self.append_conf(&format!(
            "pg_kms.previous_master_key_file = '{}'\n",
            path.display()
        ));
    }

    /// `pg_reload_conf()`, then waits until a new session sees `setting`
    /// set to `value`.
    pub fn reload_and_wait(&self, setting: &str, value: &str) {
        self.connect()
            .batch_execute("SELECT pg_reload_conf()")
            .unwrap();
        poll(
            &format!("{setting} = {value} after reload"),
            Duration::from_secs(30),
            || {
                let v: String = self
                    .connect()
                    .query_one(&format!("SHOW {setting}"), &[])
                    .ok()?
                    .get(0);
                (v == value).then_some(())
            },
        );
    }
}

/// Starts, in a thread, a transaction that caches `key` (one encryption)
/// and then runs one slow statement inserting rows `ids` into `table (id,
/// v)`, each sealed with `key` after a pause of `pause_s` seconds, then
/// commits. Returns once that statement is running: a rotation made now
/// happens while the statement still seals under the version it had
/// cached (a statement takes in invalidations only when it opens a
/// relation). Join the handle to wait for its commit.
pub fn slow_insert_from_before(
    c: &Cluster,
    table: &str,
    key: &str,
    ids: std::ops::RangeInclusive<i32>,
    pause_s: f64,
) -> std::thread::JoinHandle<()> {
    let mut app = c.connect();
    app.batch_execute(&format!("BEGIN; SELECT kms_encrypt('warm', '{key}')"))
        .unwrap();
    let sql = format!(
        "INSERT INTO {table} SELECT g, kms_encrypt('late' || g || pg_sleep({pause_s})::text, '{key}')
           FROM generate_series({}, {}) g;
         COMMIT;",
        ids.start(),
        ids.end()
    );
    let handle = std::thread::spawn(move || app.batch_execute(&sql).unwrap());
    let mut db = c.connect();
    let like = format!("INSERT INTO {table} SELECT%");
    poll(
        "the slow statement running",
        Duration::from_secs(30),
        || {
            let n: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1",
                &[&like],
            )
            .ok()?
            .get(0);
            (n == 1).then_some(())
        },
    );
    handle
}
