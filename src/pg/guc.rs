//! Settings. The master-key settings are superuser-only and hidden from
//! `SHOW ALL` and from non-superusers.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use std::ffi::CString;

pub static MASTER_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static MASTER_KEY_COMMAND: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static PREVIOUS_MASTER_KEY_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static PREVIOUS_MASTER_KEY_COMMAND: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static MASTER_KEY_COMMAND_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static KEY_CACHE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(16384);
pub static REDACT_STATEMENT_LOGS: GucSetting<RedactMode> =
    GucSetting::<RedactMode>::new(RedactMode::On);
pub static NONCE_WARNING_ENCRYPTIONS: GucSetting<i32> = GucSetting::<i32>::new(i32::MAX);
pub static REENCRYPT_ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static REENCRYPT_BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static REENCRYPT_MAX_ROWS_PER_SECOND: GucSetting<i32> = GucSetting::<i32>::new(5_000);
pub static REENCRYPT_NAPTIME_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static REENCRYPT_STATEMENT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(300_000);
/// `pg_kms.rotation_warning`, in seconds (default 7 days).
pub static ROTATION_WARNING_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 86_400);
pub static ACCESS_AUDIT: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static ACCESS_AUDIT_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// `pg_kms.redact_statement_logs`. The hidden spellings keep the boolean
/// values of earlier versions working.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum RedactMode {
    #[name = c"off"]
    Off,
    #[name = c"on"]
    On,
    #[name = c"all"]
    All,
    #[name = c"false"]
    #[hidden = true]
    False,
    #[name = c"true"]
    #[hidden = true]
    True,
    #[name = c"no"]
    #[hidden = true]
    No,
    #[name = c"yes"]
    #[hidden = true]
    Yes,
    #[name = c"0"]
    #[hidden = true]
    Zero,
    #[name = c"1"]
    #[hidden = true]
    One,
}

impl RedactMode {
    /// Off, On or All (the hidden spellings folded).
    pub fn effective(self) -> RedactMode {
        match self {
            RedactMode::Off | RedactMode::False | RedactMode::No | RedactMode::Zero => {
                RedactMode::Off
            }
            RedactMode::All => RedactMode::All,
            _ => RedactMode::On,
        }
    }
}

pub fn init() {
    let secret = GucFlags::NO_SHOW_ALL | GucFlags::SUPERUSER_ONLY;
    GucRegistry::define_string_guc(
        c"pg_kms.master_key_file",
        c"File holding the 64-hex-character master key (mode 0600).",
        c"Read by each backend when it first needs a data key. The file must not be accessible by group or others.",
        &MASTER_KEY_FILE,
        GucContext::Suset,
        secret,
    );
    GucRegistry::define_string_guc(
        c"pg_kms.master_key_command",
        c"Shell command that prints the 64-hex-character master key on stdout.",
        c"Used when pg_kms.master_key_file is not set; lets any external KMS supply the key.",
        &MASTER_KEY_COMMAND,
        GucContext::Suset,
        secret,
    );
    GucRegistry::define_string_guc(
        c"pg_kms.previous_master_key_file",
        c"File holding the previous master key, read by kms_rotate_master_key().",
        c"",
        &PREVIOUS_MASTER_KEY_FILE,
        GucContext::Suset,
        secret,
    );
    GucRegistry::define_string_guc(
        c"pg_kms.previous_master_key_command",
        c"Command printing the previous master key, read by kms_rotate_master_key().",
        c"",
        &PREVIOUS_MASTER_KEY_COMMAND,
        GucContext::Suset,
        secret,
    );
    GucRegistry::define_int_guc(
        c"pg_kms.master_key_command_timeout",
        c"Milliseconds a master-key command may run before it is killed.",
        c"",
        &MASTER_KEY_COMMAND_TIMEOUT_MS,
        100,
        600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_kms.nonce_warning_encryptions",
        c"Encryptions under one key version (since server start) that trigger a warning.",
        c"AES-GCM with random 96-bit nonces must not seal more than 2^32 values under one key; the default warns at 2^31 - 1.",
        &NONCE_WARNING_ENCRYPTIONS,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"pg_kms.key_cache_size",
        c"Keys each backend keeps unwrapped in memory (evicted keys are zeroized).",
        c"",
        &KEY_CACHE_SIZE,
        1,
        1_000_000,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_enum_guc(
        c"pg_kms.redact_statement_logs",
        c"Redact literals in logged statements: on (those involving kms_ functions), all (every statement) or off.",
        c"'all' is the safe choice: 'on' cannot see plaintext passed through a wrapper function. Effective for statements logged after pg_kms is loaded: put pg_kms in shared_preload_libraries.",
        &REDACT_STATEMENT_LOGS,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_bool_guc(
        c"pg_kms.reencrypt_enabled",
        c"Whether the background worker re-encrypts rows after a rotation.",
        c"Off pauses the worker; it resumes where it left off.",
        &REENCRYPT_ENABLED,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"pg_kms.reencrypt_batch_size",
        c"Rows the background worker re-encrypts per transaction.",
        c"",
        &REENCRYPT_BATCH_SIZE,
        1,
        100_000,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"pg_kms.reencrypt_max_rows_per_second",
        c"Upper bound on the rows per second the background worker re-encrypts (0 = unlimited).",
        c"",
        &REENCRYPT_MAX_ROWS_PER_SECOND,
        0,
        10_000_000,
        GucContext::Sighup,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"pg_kms.reencrypt_naptime",
        c"How long the background worker sleeps when it has nothing to do.",
        c"A committed rotation wakes it at once.",
        &REENCRYPT_NAPTIME_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_kms.reencrypt_statement_timeout",
        c"Longest time one transaction of the background worker may take (0: no limit).",
        c"Table code (a trigger, policy or index expression) that sleeps cannot stall the worker: the transaction is cancelled, named in last_error, and the worker moves on.",
        &REENCRYPT_STATEMENT_TIMEOUT_MS,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_kms.rotation_warning",
        c"How long before a key's scheduled rotation kms_warnings and kms_health() warn that it is due.",
        c"0 warns only once a rotation is overdue.",
        &ROTATION_WARNING_S,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"pg_kms.access_audit",
        c"Whether every use of a key version is counted per role, key, version and operation in kms.access_log.",
        c"Counts gather in each backend and reach shared memory at transaction end (needs shared_preload_libraries = 'pg_kms'); the worker appends them to kms.access_log.",
        &ACCESS_AUDIT,
        GucContext::Suset,
        GucFlags::empty(),
    );
    GucRegistry::define_int_guc(
        c"pg_kms.access_audit_interval",
        c"How often each database's worker appends the access counts to kms.access_log.",
        c"A crash loses at most the counts of the last interval.",
        &ACCESS_AUDIT_INTERVAL_MS,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
}

/// A non-empty string setting.
pub fn get(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|s| !s.trim().is_empty())
}
