//! Settings. The master-key settings are superuser-only and hidden from
//! `SHOW ALL` and from non-superusers.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

pub static MASTER_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static MASTER_KEY_COMMAND: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static PREVIOUS_MASTER_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static PREVIOUS_MASTER_KEY_COMMAND: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static MASTER_KEY_COMMAND_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);

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
}

/// A non-empty string setting.
pub fn get(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|s| !s.trim().is_empty())
}
