//! Where the master key comes from (`pg_kms.master_key_file` or
//! `pg_kms.master_key_command`, current and previous), and its commitment:
//! the keyring stores the fingerprint of the master key it was made with,
//! and a different key is refused instead of producing garbage.

use crate::crypto::MasterKey;
use crate::errors::{KmsError, KmsResult};
use crate::pg::guc;
use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Which {
    Current,
    Previous,
}

/// Where the master key comes from, as configured now: (setting name, value).
pub fn master_key_source(which: Which) -> Option<(&'static str, bool, String)> {
    let (file, cmd, fname, cname) = match which {
        Which::Current => (
            &guc::MASTER_KEY_FILE,
            &guc::MASTER_KEY_COMMAND,
            "pg_kms.master_key_file",
            "pg_kms.master_key_command",
        ),
        Which::Previous => (
            &guc::PREVIOUS_MASTER_KEY_FILE,
            &guc::PREVIOUS_MASTER_KEY_COMMAND,
            "pg_kms.previous_master_key_file",
            "pg_kms.previous_master_key_command",
        ),
    };
    if let Some(path) = guc::get(file) {
        return Some((fname, true, path));
    }
    guc::get(cmd).map(|c| (cname, false, c))
}

/// Reads the master key from its configured source (file wins over command).
pub fn load_master_key(which: Which) -> KmsResult<MasterKey> {
    let (setting, is_file, value) = master_key_source(which).ok_or(KmsError::MasterKeyMissing {
        previous: which == Which::Previous,
    })?;
    let r = if is_file {
        MasterKey::from_file(std::path::Path::new(&value))
    } else {
        let ms = guc::MASTER_KEY_COMMAND_TIMEOUT_MS.get().max(1) as u64;
        MasterKey::from_command(&value, Duration::from_millis(ms))
    };
    r.map_err(|cause| KmsError::MasterKeyInvalid { setting, cause })
}

/// Checks a master key against the stored fingerprint (none stored: ok).
pub fn check_commitment(mk: &MasterKey, stored: Option<&[u8]>, which: Which) -> KmsResult<()> {
    match stored {
        Some(fp) if fp != mk.fingerprint().as_slice() => Err(KmsError::MasterKeyMismatch {
            previous: which == Which::Previous,
        }),
        _ => Ok(()),
    }
}

/// Names of the settings that hold the master key now, for `kms_health()`.
pub fn describe_source(which: Which) -> Option<(&'static str, bool)> {
    master_key_source(which).map(|(s, is_file, _)| (s, is_file))
}
