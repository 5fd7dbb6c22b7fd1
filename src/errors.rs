//! The one error type of pg_kms: every failure maps to a SQLSTATE, a message
//! and a hint. No variant carries plaintext or key bytes.

use crate::core::states::{Privilege, State};
use crate::crypto::names::NameError;
use crate::crypto::text::TextFormError;
use crate::crypto::{EnvelopeError, MasterKeyError};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug)]
pub enum KmsError {
    /// 22P02: an `encrypted_text` literal or binary value is malformed.
    Malformed(TextFormError),
    /// 42704: no key with that name.
    UnknownKey(String),
    /// 42704: a value names a key id this keyring does not have.
    UnknownKeyId(u32),
    /// 39000: a value names a version its key does not have (tampering).
    UnknownVersion { key: String, version: i32 },
    /// 42710
    KeyExists(String),
    /// 42704: no such secret (or no such version of it).
    UnknownSecret { name: String, version: Option<i32> },
    /// 55000: the secret's version has expired (at `at`, UTC text).
    SecretExpired {
        name: String,
        version: i32,
        at: String,
    },
    /// 22023
    BadArgument { message: String, hint: &'static str },
    /// 55000: the version exists but its state forbids the operation.
    VersionState {
        key: String,
        version: i32,
        state: State,
        action: &'static str,
    },
    /// 55000: the operation would touch the primary version.
    PrimaryVersion {
        key: String,
        version: i32,
        action: &'static str,
    },
    /// 55000: rows in this database still reference the version.
    StillReferenced {
        key: String,
        version: i32,
        rows: i64,
    },
    /// 42501: the destroy guard cannot count every column (the caller may
    /// not read some of them).
    UsageUnverifiable {
        key: String,
        version: i32,
        detail: String,
    },
    /// 55000: neither master-key setting is configured.
    MasterKeyMissing { previous: bool },
    /// 55000: the configured source could not give a valid key.
    MasterKeyInvalid {
        setting: &'static str,
        cause: MasterKeyError,
    },
    /// 55000: the master key's fingerprint differs from the keyring's.
    MasterKeyMismatch { previous: bool },
    /// 55000: the extension's catalog is not there (not installed in this database).
    NotInstalled,
    /// 0A000: this build needs CPU instructions (AES-NI, PCLMULQDQ) the CPU lacks.
    CpuUnsupported,
    /// 39000: AEAD authentication failed.
    AuthFailed,
    /// 22021: decrypted bytes are not valid text in the database encoding.
    NotText,
    /// XX001: a catalog row does not unwrap under a matching master key.
    CatalogCorrupt { key: String, version: i32 },
    /// 58000: the OS random generator failed.
    Random,
    /// XX001: a key-state row (or the keyring row) does not carry a valid
    /// MAC under the master key, or is older than the audit trail says.
    CatalogAltered { what: String, why: &'static str },
    /// 55000: the key was destroyed with kms_destroy_key().
    KeyDestroyed { key: String, action: &'static str },
    /// 25006: a lifecycle act on a standby or in a read-only transaction.
    ReadOnly,
    /// 25006: kms_secret_get on a standby or in a read-only transaction
    /// (every read of a secret appends an audit row).
    SecretReadOnly,
    /// 42501: the caller lacks SELECT and UPDATE on a column it asked pg_kms
    /// to rewrite (`kms_reencrypt_now`). Names as they print in SQL.
    NotAllowed {
        role: String,
        column: String,
        table: String,
    },
    /// 42501: the key has per-key grants and none of them covers the role.
    /// `role` is the role's name as `regrole` prints it (quoted if needed).
    KeyNotAllowed {
        role: String,
        privilege: Privilege,
        key: String,
    },
    /// 42501: the role may not read the secret, or it does not exist (one
    /// error for both, so that existence is not revealed).
    SecretNotAllowed { role: String, name: String },
    /// 0A000: a function of an older version's SQL that this library no
    /// longer implements (the database's pg_kms is not updated yet).
    RemovedFunction {
        function: &'static str,
        since: &'static str,
    },
    /// XX000: an SPI call into our own catalog failed; always a pg_kms bug.
    Spi(String),
    /// 55000: the database holds the SQL objects of another pg_kms version
    /// than the library the server runs.
    ExtensionVersion {
        installed: String,
        library: &'static str,
    },
    /// 22023: the argument of kms_keyring_import() is not a keyring export.
    ExportMalformed(String),
    /// XX001: a keyring export's MAC does not verify under this master key.
    ExportAltered,
    /// 55000: a keyring export made under another master key.
    ExportOtherMasterKey,
    /// 42710: a key id or name of the export names another key here.
    KeyCollision { name: String, why: String },
    /// 55000: the export is older than what this keyring already holds
    /// from the same source (it would undo a later change).
    ExportStale { what: String },
    /// 55000: this keyring's copy of an imported key was changed here.
    KeyDiverged { key: String, why: String },
    /// A protected-column policy refused (kms_protect_column,
    /// kms_unprotect_column, or DDL that would strand protected values).
    Protect {
        code: ProtectCode,
        message: String,
        hint: String,
    },
}

/// Why a protected-column request was refused (each its own SQLSTATE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtectCode {
    /// 42703: no such column.
    UndefinedColumn,
    /// 42804: the column's type cannot be protected.
    WrongType,
    /// 42P17: the context expression is not valid for a policy.
    BadContext,
    /// 42710: the column is protected already.
    Duplicate,
    /// 42701: a column pg_kms needs to add exists already.
    DuplicateColumn,
    /// 42P07: the decrypted view's name is taken.
    DuplicateView,
    /// 42704: the column is not protected.
    NotProtected,
    /// 55006: other objects use the column, or DDL would change it.
    InUse,
    /// 2BP01: DDL would drop a protected table or column.
    Dropped,
    /// 42501: only the table's owner may protect its columns.
    NotOwner,
    /// 55000: the table is not in a state that allows it.
    Prerequisite,
    /// 0A000: not supported (e.g. a partitioned table).
    Unsupported,
}

pub type KmsResult<T> = Result<T, KmsError>;

const HINT_CONFIGURE: &str = "Set pg_kms.master_key_file to a file (mode 0600, owned by the server's user) holding 64 hex characters, or pg_kms.master_key_command to a command printing them, then reload the configuration.";

impl KmsError {
    fn parts(&self) -> (PgSqlErrorCode, String, Option<String>, Option<String>) {
        use PgSqlErrorCode::*;
        match self {
            KmsError::Malformed(why) => (
                ERRCODE_INVALID_TEXT_REPRESENTATION,
                "invalid input syntax for type encrypted_text".into(),
                Some(why.to_string()),
                Some("encrypted_text values are produced by kms_encrypt(); their text form is \"kms:\" followed by base64. Plain text is never encrypted implicitly.".into()),
            ),
            KmsError::UnknownKey(name) => (
                ERRCODE_UNDEFINED_OBJECT,
                format!("key \"{name}\" does not exist"),
                None,
                Some("Create it with kms_create_key(), or list keys in the kms_keys view.".into()),
            ),
            KmsError::UnknownKeyId(id) => (
                ERRCODE_UNDEFINED_OBJECT,
                format!("value was sealed under key id {id}, which is not in this database's keyring"),
                None,
                Some("The value may come from another database or cluster: give this database that keyring (kms_keyring_import() of a kms_keyring_export() taken there, e.g. on a logical-replication subscriber; or restore its kms schema), then retry.".into()),
            ),
            KmsError::UnknownVersion { key, version } => (
                ERRCODE_EXTERNAL_ROUTINE_INVOCATION_EXCEPTION,
                format!("decryption failed: the value names version {version} of key \"{key}\", which does not exist"),
                None,
                Some("The value was altered, or it comes from another keyring, or this keyring is behind the one that sealed it: on a logical-replication subscriber, import a fresh kms_keyring_export() of the publisher with kms_keyring_import(), then retry.".into()),
            ),
            KmsError::UnknownSecret { name, version } => (
                ERRCODE_UNDEFINED_OBJECT,
                match version {
                    Some(v) => format!("secret \"{name}\" has no version {v}"),
                    None => format!("secret \"{name}\" does not exist"),
                },
                None,
                Some("See the kms_secrets view.".into()),
            ),
            KmsError::SecretExpired { name, version, at } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("version {version} of secret \"{name}\" expired at {at}"),
                None,
                Some("Set a new version with kms_secret_set().".into()),
            ),
            KmsError::KeyExists(name) => (
                ERRCODE_DUPLICATE_OBJECT,
                format!("key \"{name}\" already exists"),
                None,
                Some("Use kms_rotate_key() to add a new version to an existing key.".into()),
            ),
            KmsError::BadArgument { message, hint } => {
                (ERRCODE_INVALID_PARAMETER_VALUE, message.clone(), None, Some((*hint).into()))
            }
            KmsError::VersionState { key, version, state, action } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("cannot {action}: version {version} of key \"{key}\" is {state}"),
                None,
                Some(match state {
                    State::Disabled => "Re-enable it with kms_enable_key_version() if this is intended.".into(),
                    State::Destroyed => "A destroyed version's key material is erased for good; values sealed under it cannot be recovered.".into(),
                    _ => "See the kms_keys view.".into(),
                }),
            ),
            KmsError::PrimaryVersion { key, version, action } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("cannot {action} version {version} of key \"{key}\": it is the primary version"),
                None,
                Some("Rotate the key or promote another version with kms_set_primary() first.".into()),
            ),
            KmsError::StillReferenced { key, version, rows } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("cannot destroy version {version} of key \"{key}\": {rows} rows in this database still reference it"),
                None,
                Some("Re-encrypt them first (the background worker does it after a rotation; see kms_reencryption_progress, or run kms_reencrypt_now()), or pass force => true to make them unrecoverable on purpose.".into()),
            ),
            KmsError::UsageUnverifiable { key, version, detail } => (
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("cannot verify that no row still references version {version} of key \"{key}\""),
                Some(detail.clone()),
                Some("Have a role that may read those columns (their owners, or a superuser) destroy the version, or pass force => true to make any such rows unrecoverable on purpose.".into()),
            ),
            KmsError::MasterKeyMissing { previous: false } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "pg_kms master key is not configured".into(),
                None,
                Some(HINT_CONFIGURE.into()),
            ),
            KmsError::MasterKeyMissing { previous: true } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "pg_kms previous master key is not configured".into(),
                None,
                Some("To rotate the master key, set pg_kms.previous_master_key_file or pg_kms.previous_master_key_command to the old key and pg_kms.master_key_file or pg_kms.master_key_command to the new one.".into()),
            ),
            KmsError::MasterKeyInvalid { setting, cause } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("pg_kms master key from {setting} is unusable"),
                Some(cause.to_string()),
                Some(match cause {
                    MasterKeyError::InsecureFile { .. } => "Run chmod 600 on the key file.".to_string(),
                    _ => HINT_CONFIGURE.to_string(),
                }),
            ),
            KmsError::MasterKeyMismatch { previous } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                if *previous {
                    "the previous master key does not match this keyring".into()
                } else {
                    "the master key does not match this keyring".into()
                },
                Some("The keyring's stored fingerprint was made by a different master key.".into()),
                Some("Configure the master key this keyring was created with; to change master keys use kms_rotate_master_key().".into()),
            ),
            KmsError::NotInstalled => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "the pg_kms catalog is not available in this database".into(),
                None,
                Some("Run CREATE EXTENSION pg_kms in this database.".into()),
            ),
            KmsError::CpuUnsupported => (
                ERRCODE_FEATURE_NOT_SUPPORTED,
                "this pg_kms build needs a CPU with AES-NI, PCLMULQDQ, SSSE3 and SSE4.1".into(),
                Some("It was compiled with -C target-feature=+aes,+pclmulqdq,+ssse3,+sse4.1 (.cargo/config.toml), and this CPU, or the virtual CPU model it is given, lacks one of them.".into()),
                Some("Build pg_kms for this machine with RUSTFLAGS=\"\" cargo pgrx install --release (a portable build that picks the instructions at run time), or expose these instructions to the virtual machine.".into()),
            ),
            KmsError::AuthFailed => (
                ERRCODE_EXTERNAL_ROUTINE_INVOCATION_EXCEPTION,
                "decryption failed: wrong key, wrong context, or corrupt data".into(),
                None,
                Some("Pass the same context that was given to kms_encrypt(); the value itself may have been altered.".into()),
            ),
            KmsError::NotText => (
                ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
                "decrypted value is not valid text in the database encoding".into(),
                None,
                Some("The value was probably sealed from bytea; use kms_decrypt_bytea().".into()),
            ),
            KmsError::CatalogCorrupt { key, version } => (
                ERRCODE_DATA_CORRUPTED,
                format!("wrapped material of version {version} of key \"{key}\" does not authenticate"),
                Some("The master key matches the keyring fingerprint, so the catalog row was altered.".into()),
                Some("Restore the kms schema from a backup.".into()),
            ),
            KmsError::CatalogAltered { what, why } => (
                ERRCODE_DATA_CORRUPTED,
                format!("catalog row altered: {what}"),
                Some((*why).into()),
                Some("The row was changed behind pg_kms's back (its MAC under the master key does not match). Restore the kms schema from a backup taken after the last key change, and run kms_audit_log_check().".into()),
            ),
            KmsError::KeyDestroyed { key, action } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("cannot {action}: key \"{key}\" is destroyed"),
                None,
                Some("A destroyed key stays destroyed: its key material is erased and its name cannot be reused. Create a key under a new name.".into()),
            ),
            KmsError::Random => (
                ERRCODE_SYSTEM_ERROR,
                "the operating system's random number generator failed".into(),
                None,
                None,
            ),
            KmsError::NotAllowed { role, column, table } => (
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("permission denied for role {role} to re-encrypt column {column} of table {table}"),
                None,
                Some("Ask the table owner for SELECT and UPDATE on the column.".into()),
            ),
            KmsError::KeyNotAllowed { role, privilege, key } => (
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("permission denied for role {role} to {privilege} with key \"{key}\""),
                None,
                Some(format!(
                    "Key \"{key}\" has per-key grants (see the kms_key_grants view); a kms_admin can allow this with kms_grant_key('{key}', <role>, '{privilege}')."
                )),
            ),
            KmsError::SecretNotAllowed { role, name } => (
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("permission denied for role {role} to read secret \"{name}\", or it does not exist"),
                None,
                Some("Secrets can be read by members of kms_admin and by roles granted 'decrypt' on the secret's key with kms_grant_key(); an unknown secret gives this same error.".into()),
            ),
            KmsError::ExtensionVersion { installed, library } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("pg_kms {installed} is installed in this database, but the server runs the pg_kms {library} library"),
                None,
                Some("Run ALTER EXTENSION pg_kms UPDATE in this database (after installing a new pg_kms, every database that has the extension needs it).".into()),
            ),
            KmsError::RemovedFunction { function, since } => (
                ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("{function} was removed in pg_kms {since}"),
                Some("This database's pg_kms objects are older than the installed pg_kms library.".into()),
                Some("Run ALTER EXTENSION pg_kms UPDATE in this database.".into()),
            ),
            KmsError::Protect { code, message, hint } => (
                match code {
                    ProtectCode::UndefinedColumn => ERRCODE_UNDEFINED_COLUMN,
                    ProtectCode::WrongType => ERRCODE_DATATYPE_MISMATCH,
                    ProtectCode::BadContext => ERRCODE_INVALID_OBJECT_DEFINITION,
                    ProtectCode::Duplicate => ERRCODE_DUPLICATE_OBJECT,
                    ProtectCode::DuplicateColumn => ERRCODE_DUPLICATE_COLUMN,
                    ProtectCode::DuplicateView => ERRCODE_DUPLICATE_TABLE,
                    ProtectCode::NotProtected => ERRCODE_UNDEFINED_OBJECT,
                    ProtectCode::InUse => ERRCODE_OBJECT_IN_USE,
                    ProtectCode::Dropped => ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
                    ProtectCode::NotOwner => ERRCODE_INSUFFICIENT_PRIVILEGE,
                    ProtectCode::Prerequisite => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    ProtectCode::Unsupported => ERRCODE_FEATURE_NOT_SUPPORTED,
                },
                message.clone(),
                None,
                Some(hint.clone()),
            ),
            KmsError::Spi(what) => (
                ERRCODE_INTERNAL_ERROR,
                "pg_kms catalog query failed".into(),
                Some(what.clone()),
                Some("This is a bug in pg_kms; please report it with the server log.".into()),
            ),
            KmsError::ExportMalformed(why) => (
                ERRCODE_INVALID_PARAMETER_VALUE,
                "not a pg_kms keyring export".into(),
                Some(why.clone()),
                Some("Pass the jsonb document returned by kms_keyring_export() on the source database, unchanged.".into()),
            ),
            KmsError::ExportAltered => (
                ERRCODE_DATA_CORRUPTED,
                "keyring export does not authenticate: it was altered".into(),
                Some("Its MAC, keyed by the master key, does not match its content.".into()),
                Some("Take a new export with kms_keyring_export() on the source and pass it unchanged.".into()),
            ),
            KmsError::ExportOtherMasterKey => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "keyring export was made under a different master key".into(),
                Some("Its master-key fingerprint differs from this keyring's.".into()),
                Some("Both clusters must be configured with the same master key (pg_kms.master_key_file or pg_kms.master_key_command); rotate the master key on both alike.".into()),
            ),
            KmsError::KeyCollision { name, why } => (
                ERRCODE_DUPLICATE_OBJECT,
                format!("cannot import key \"{name}\": {why}"),
                None,
                Some("Key ids and names must name the same key in both keyrings: drop or rename nothing by hand; import into a database where the colliding key does not exist, or create keys only on the source.".into()),
            ),
            KmsError::ExportStale { what } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("keyring export is older than this keyring: {what}"),
                None,
                Some("Take a new export with kms_keyring_export() on the source; an older one is never applied over a newer one (it could revive destroyed keys).".into()),
            ),
            KmsError::KeyDiverged { key, why } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("cannot import key \"{key}\": this keyring's copy was changed here ({why})"),
                None,
                Some("Change imported keys only on the source cluster; on a subscriber set pg_kms.reencrypt_enabled = off so that scheduled rotations do not run there.".into()),
            ),
            KmsError::ReadOnly => (
                ERRCODE_READ_ONLY_SQL_TRANSACTION,
                "key lifecycle functions cannot run in a read-only transaction".into(),
                None,
                Some("Run them on the primary server, outside a read-only transaction.".into()),
            ),
            KmsError::SecretReadOnly => (
                ERRCODE_READ_ONLY_SQL_TRANSACTION,
                "kms_secret_get() cannot run in a read-only transaction".into(),
                None,
                Some("Every read of a secret is written to the audit log: read secrets on the primary server, outside a read-only transaction.".into()),
            ),
        }
    }

    /// Raises this error as a PostgreSQL ERROR. Does not return.
    pub fn raise(self) -> ! {
        let (code, message, detail, hint) = self.parts();
        let mut report = ErrorReport::new(code, message, "pg_kms");
        if let Some(d) = detail {
            report = report.set_detail(d);
        }
        if let Some(h) = hint {
            report = report.set_hint(h);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }

    /// The user-facing message alone (for `kms_health()`).
    pub fn message(&self) -> String {
        self.parts().1
    }

    pub fn spi(e: pgrx::spi::Error) -> KmsError {
        KmsError::Spi(e.to_string())
    }
}

/// A role's name as `regrole` prints it (quoted when needed; the oid if
/// the role does not exist), for messages.
pub fn role_display(role: pgrx::pg_sys::Oid) -> String {
    use pgrx::IntoDatum;
    // SAFETY: regroleout takes one oid argument and returns a palloc'd C
    // string; it never fails for a missing role (it prints the number).
    let s = unsafe {
        pgrx::direct_function_call::<&std::ffi::CStr>(
            pgrx::pg_sys::regroleout,
            &[role.into_datum()],
        )
    };
    s.map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A relation's name as `regclass` prints it (schema-qualified unless it
/// is visible in the search_path, quoted when needed), for messages.
pub fn relation_display(rel: pgrx::pg_sys::Oid) -> String {
    use pgrx::IntoDatum;
    // SAFETY: as for regroleout: one oid argument, a palloc'd C string.
    let s = unsafe {
        pgrx::direct_function_call::<&std::ffi::CStr>(
            pgrx::pg_sys::regclassout,
            &[rel.into_datum()],
        )
    };
    s.map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// An identifier quoted as `quote_ident` would (only when needed), for
/// messages (e.g. a column name).
pub fn quote_ident(ident: &str) -> String {
    let Ok(c) = std::ffi::CString::new(ident) else {
        return format!("{ident:?}");
    };
    // SAFETY: quote_identifier reads a NUL-terminated string and returns
    // either it or a palloc'd quoted copy, both valid while `c` lives.
    unsafe { std::ffi::CStr::from_ptr(pgrx::pg_sys::quote_identifier(c.as_ptr())) }
        .to_string_lossy()
        .into_owned()
}

impl From<EnvelopeError> for KmsError {
    fn from(e: EnvelopeError) -> Self {
        KmsError::Malformed(TextFormError::Envelope(e))
    }
}

impl From<TextFormError> for KmsError {
    fn from(e: TextFormError) -> Self {
        KmsError::Malformed(e)
    }
}

impl From<NameError> for KmsError {
    fn from(e: NameError) -> Self {
        KmsError::BadArgument {
            message: format!("invalid {} name (length {})", e.kind.noun(), e.len),
            hint: e.kind.rule(),
        }
    }
}

/// Unwraps a result or raises its error.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for KmsResult<T> {
    #[inline]
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.raise(),
        }
    }
}
