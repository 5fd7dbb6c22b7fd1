//! The master key: parsing, loading from a file or a command, fingerprint.
//!
//! The master key never enters the database. It is 64 hex characters
//! (surrounding whitespace ignored) read from a file that only its owner may
//! access, or printed on stdout by a command (any KMS CLI).

use super::kdf::{hkdf32, Kek, HKDF_SALT, INFO_FINGERPRINT, INFO_KEK};
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

pub struct MasterKey {
    bytes: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// Errors never include any byte of the key source's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeyError {
    /// Not exactly 64 hex characters after trimming (`found` characters).
    WrongLength { found: usize },
    /// 64 characters, but not all hexadecimal.
    NotHex,
    /// The key file is accessible by group or others (octal mode).
    InsecureFile { mode: u32 },
    /// The key file could not be read (an OS error description).
    Unreadable { reason: String },
    /// The command could not be started, failed or timed out.
    CommandFailed { reason: String },
}

impl fmt::Display for MasterKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MasterKeyError::WrongLength { found } => {
                write!(f, "expected exactly 64 hexadecimal characters, found {found} characters")
            }
            MasterKeyError::NotHex => f.write_str("expected 64 hexadecimal characters, found other characters"),
            MasterKeyError::InsecureFile { mode } => {
                write!(f, "file mode {mode:04o} allows access by group or others")
            }
            MasterKeyError::Unreadable { reason } => write!(f, "cannot read file: {reason}"),
            MasterKeyError::CommandFailed { reason } => write!(f, "command failed: {reason}"),
        }
    }
}

impl std::error::Error for MasterKeyError {}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl MasterKey {
    /// Parses 64 hex characters, ignoring surrounding ASCII whitespace.
    pub fn from_hex_text(text: &[u8]) -> Result<MasterKey, MasterKeyError> {
        let t = text.trim_ascii();
        if t.len() != 64 {
            return Err(MasterKeyError::WrongLength { found: t.len() });
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        for (i, pair) in t.chunks_exact(2).enumerate() {
            match (hex_val(pair[0]), hex_val(pair[1])) {
                (Some(hi), Some(lo)) => bytes[i] = (hi << 4) | lo,
                _ => return Err(MasterKeyError::NotHex),
            }
        }
        Ok(MasterKey { bytes })
    }

    /// Reads a key file, refusing one that group or others may access.
    pub fn from_file(path: &Path) -> Result<MasterKey, MasterKeyError> {
        use std::os::unix::fs::PermissionsExt;
        let unreadable = |e: std::io::Error| MasterKeyError::Unreadable { reason: e.kind().to_string() };
        let mut f = std::fs::File::open(path).map_err(unreadable)?;
        let meta = f.metadata().map_err(unreadable)?;
        check_file_mode(meta.permissions().mode())?;
        if !meta.is_file() {
            return Err(MasterKeyError::Unreadable { reason: "not a regular file".into() });
        }
        let mut text = Zeroizing::new(Vec::with_capacity(128));
        // A key file is tiny; refuse to read anything huge.
        f.by_ref().take(4096).read_to_end(&mut text).map_err(unreadable)?;
        MasterKey::from_hex_text(&text)
    }

    /// Runs `sh -c command` and parses its stdout. The command is killed
    /// after `timeout`. Its stderr is discarded: it is never logged.
    pub fn from_command(command: &str, timeout: Duration) -> Result<MasterKey, MasterKeyError> {
        let failed = |reason: String| MasterKeyError::CommandFailed { reason };
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| failed(format!("could not start /bin/sh: {}", e.kind())))?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(failed(format!("timed out after {} ms", timeout.as_millis())));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(failed(format!("wait failed: {}", e.kind()))),
            }
        };
        let mut text = Zeroizing::new(Vec::with_capacity(128));
        if let Some(mut out) = child.stdout.take() {
            out.by_ref()
                .take(4096)
                .read_to_end(&mut text)
                .map_err(|e| failed(format!("reading its output failed: {}", e.kind())))?;
        }
        if !status.success() {
            return Err(failed(match status.code() {
                Some(c) => format!("exited with status {c}"),
                None => "was killed by a signal".into(),
            }));
        }
        MasterKey::from_hex_text(&text)
    }

    /// A one-way commitment to this key, safe to store in the catalog.
    pub fn fingerprint(&self) -> [u8; 32] {
        *hkdf32(HKDF_SALT, self.bytes.as_ref(), INFO_FINGERPRINT)
    }

    /// The audit-chain and catalog-row MAC keys of this master key.
    pub fn integrity_keys(&self) -> super::integrity::IntegrityKeys {
        super::integrity::IntegrityKeys::from_master(self.bytes.as_ref())
    }

    pub fn kek(&self) -> Kek {
        Kek::from_bytes(&hkdf32(HKDF_SALT, self.bytes.as_ref(), INFO_KEK))
    }
}

/// A key file must not be accessible by group or others (like ssh keys).
pub fn check_file_mode(mode: u32) -> Result<(), MasterKeyError> {
    if mode & 0o077 != 0 {
        return Err(MasterKeyError::InsecureFile { mode: mode & 0o7777 });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191A1B1C1D1E1F";

    fn random_hex() -> String {
        let mut b = [0u8; 32];
        getrandom::getrandom(&mut b).unwrap();
        hex::encode(b)
    }

    #[test]
    fn parses_hex_with_whitespace() {
        let a = MasterKey::from_hex_text(HEX.as_bytes()).unwrap();
        let b = MasterKey::from_hex_text(format!("  \n{HEX}\r\n\t").as_bytes()).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.bytes[31], 0x1f);
    }

    #[test]
    fn rejects_bad_text_without_echoing_it() {
        let e = MasterKey::from_hex_text(&HEX.as_bytes()[..63]).unwrap_err();
        assert_eq!(e, MasterKeyError::WrongLength { found: 63 });
        let e = MasterKey::from_hex_text(format!("{HEX}00").as_bytes()).unwrap_err();
        assert_eq!(e, MasterKeyError::WrongLength { found: 66 });
        let bad = HEX.replace('A', "g");
        let e = MasterKey::from_hex_text(bad.as_bytes()).unwrap_err();
        assert_eq!(e, MasterKeyError::NotHex);
        assert!(!e.to_string().contains("0102"));
        assert_eq!(MasterKey::from_hex_text(b"").unwrap_err(), MasterKeyError::WrongLength { found: 0 });
    }

    #[test]
    fn file_mode_is_checked() {
        assert!(check_file_mode(0o100600).is_ok());
        assert!(check_file_mode(0o100400).is_ok());
        assert_eq!(check_file_mode(0o100640).unwrap_err(), MasterKeyError::InsecureFile { mode: 0o640 });
        assert!(check_file_mode(0o100604).is_err());
        assert!(check_file_mode(0o100602).is_err());
    }

    #[test]
    fn loads_from_file_and_command() {
        let dir = std::env::temp_dir().join(format!("pg_kms_mk_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("master.key");
        let hex = random_hex();
        std::fs::write(&path, format!("{hex}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let from_file = MasterKey::from_file(&path).unwrap();
        let cmd = format!("cat {}", path.display());
        let from_cmd = MasterKey::from_command(&cmd, Duration::from_secs(5)).unwrap();
        assert_eq!(from_file.fingerprint(), from_cmd.fingerprint());

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(MasterKey::from_file(&path), Err(MasterKeyError::InsecureFile { .. })));
        assert!(matches!(MasterKey::from_file(&dir.join("missing")), Err(MasterKeyError::Unreadable { .. })));
        std::fs::remove_dir_all(&dir).unwrap();

        let e = MasterKey::from_command("exit 3", Duration::from_secs(5)).unwrap_err();
        assert_eq!(e, MasterKeyError::CommandFailed { reason: "exited with status 3".into() });
        let e = MasterKey::from_command("sleep 5", Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, MasterKeyError::CommandFailed { ref reason } if reason.starts_with("timed out")));
        let e = MasterKey::from_command("echo nothex", Duration::from_secs(5)).unwrap_err();
        assert_eq!(e, MasterKeyError::WrongLength { found: 6 });
    }

    #[test]
    fn fingerprint_differs_per_key_and_hides_it() {
        let a = MasterKey::from_hex_text(random_hex().as_bytes()).unwrap();
        let b = MasterKey::from_hex_text(random_hex().as_bytes()).unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_ne!(&a.fingerprint(), a.bytes.as_ref());
    }
}
