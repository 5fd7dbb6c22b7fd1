//! The master key: parsing, loading from a file or a command, fingerprint.
//!
//! The master key never enters the database. It is 64 hex characters
//! (surrounding whitespace ignored) read from a file that only its owner may
//! access, or printed on stdout by a command (any KMS CLI).

//!
//! Memory: the key source's text is read straight into a pre-sized buffer
//! in a locked, non-dumpable region (never a growing `Vec`), decoded in
//! place into another such region, and both are zeroized when dropped;
//! derivations wipe the stack they used (see [`super::secure`]).

use super::kdf::{hkdf32, Kek, HKDF_SALT, INFO_FINGERPRINT, INFO_KEK};
use super::secure::{wipe_stack, Locked};
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Most bytes read from a key file or command (the key is 64 characters
/// plus whitespace).
const TEXT_MAX: usize = 4096;

pub struct MasterKey {
    bytes: Locked<[u8; 32]>,
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
                write!(
                    f,
                    "expected exactly 64 hexadecimal characters, found {found} characters"
                )
            }
            MasterKeyError::NotHex => {
                f.write_str("expected 64 hexadecimal characters, found other characters")
            }
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
        let mut bytes = Locked::<[u8; 32]>::zeroed();
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
        let unreadable = |e: std::io::Error| MasterKeyError::Unreadable {
            reason: e.kind().to_string(),
        };
        let mut f = std::fs::File::open(path).map_err(unreadable)?;
        let meta = f.metadata().map_err(unreadable)?;
        check_file_mode(meta.permissions().mode())?;
        if !meta.is_file() {
            return Err(MasterKeyError::Unreadable {
                reason: "not a regular file".into(),
            });
        }
        // A key file is tiny; anything past TEXT_MAX bytes is not read.
        let mut text = Locked::<[u8; TEXT_MAX]>::zeroed();
        let n = read_secret(&mut f, &mut text[..]).map_err(unreadable)?;
        MasterKey::from_hex_text(&text[..n])
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
                    return Err(failed(format!(
                        "timed out after {} ms",
                        timeout.as_millis()
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(failed(format!("wait failed: {}", e.kind()))),
            }
        };
        let mut text = Locked::<[u8; TEXT_MAX]>::zeroed();
        let mut n = 0;
        if let Some(mut out) = child.stdout.take() {
            n = read_secret(&mut out, &mut text[..])
                .map_err(|e| failed(format!("reading its output failed: {}", e.kind())))?;
        }
        if !status.success() {
            return Err(failed(match status.code() {
                Some(c) => format!("exited with status {c}"),
                None => "was killed by a signal".into(),
            }));
        }
        MasterKey::from_hex_text(&text[..n])
    }

    /// A one-way commitment to this key, safe to store in the catalog.
    pub fn fingerprint(&self) -> [u8; 32] {
        let fp = *hkdf32(HKDF_SALT, self.bytes.as_ref(), INFO_FINGERPRINT);
        wipe_stack();
        fp
    }

    /// The audit-chain and catalog-row MAC keys of this master key.
    pub fn integrity_keys(&self) -> super::integrity::IntegrityKeys {
        let keys = super::integrity::IntegrityKeys::from_master(self.bytes.as_ref());
        wipe_stack();
        keys
    }

    /// The KEK, itself kept in a locked region (see [`Kek`]).
    pub fn kek(&self) -> Kek {
        let kek = Kek::from_bytes(&hkdf32(HKDF_SALT, self.bytes.as_ref(), INFO_KEK));
        wipe_stack();
        kek
    }
}

/// Reads until end of input or until `buf` is full, straight into `buf`
/// (no intermediate buffer, nothing that grows and leaves a copy behind).
fn read_secret(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A key file must not be accessible by group or others (like ssh keys).
pub fn check_file_mode(mode: u32) -> Result<(), MasterKeyError> {
    if mode & 0o077 != 0 {
        return Err(MasterKeyError::InsecureFile {
            mode: mode & 0o7777,
        });
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
        assert_eq!(
            MasterKey::from_hex_text(b"").unwrap_err(),
            MasterKeyError::WrongLength { found: 0 }
        );
    }

    #[test]
    fn file_mode_is_checked() {
        assert!(check_file_mode(0o100600).is_ok());
        assert!(check_file_mode(0o100400).is_ok());
        assert_eq!(
            check_file_mode(0o100640).unwrap_err(),
            MasterKeyError::InsecureFile { mode: 0o640 }
        );
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
        assert!(matches!(
            MasterKey::from_file(&path),
            Err(MasterKeyError::InsecureFile { .. })
        ));
        assert!(matches!(
            MasterKey::from_file(&dir.join("missing")),
            Err(MasterKeyError::Unreadable { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();

        let e = MasterKey::from_command("exit 3", Duration::from_secs(5)).unwrap_err();
        assert_eq!(
            e,
            MasterKeyError::CommandFailed {
                reason: "exited with status 3".into()
            }
        );
        let e = MasterKey::from_command("sleep 5", Duration::from_millis(100)).unwrap_err();
        assert!(
            matches!(e, MasterKeyError::CommandFailed { ref reason } if reason.starts_with("timed out"))
        );
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

    /// After loading a key (from a file and from a command) and deriving
    /// from it, no copy of the raw key or its hex text is left anywhere in
    /// this process's memory. The key is generated by a shell the test never
    /// reads from; this process's memory is dumped to a file first, and only
    /// then is the key file read to know what to look for.
    #[test]
    fn no_copy_left_in_process_memory() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = std::env::temp_dir().join(format!("pg_kms_mk_scan_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("master.key");
        let gen = format!(
            "umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \\n' > {}",
            path.display()
        );
        assert!(Command::new("/bin/sh")
            .arg("-c")
            .arg(&gen)
            .status()
            .unwrap()
            .success());
        let mut fps = Vec::new();
        for _ in 0..3 {
            let a = MasterKey::from_file(&path).unwrap();
            let b =
                MasterKey::from_command(&format!("cat {}", path.display()), Duration::from_secs(5))
                    .unwrap();
            fps.push((a.fingerprint(), b.fingerprint()));
            let _kek = (a.kek(), b.kek());
        }
        assert!(fps.iter().all(|(a, b)| a == b));
        // Dump every readable mapping through a buffer allocated beforehand.
        let dump_path = dir.join("mem.bin");
        let mut dump = std::fs::File::create(&dump_path).unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mut mem = std::fs::File::open("/proc/self/mem").unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for line in maps.lines() {
            let mut f = line.split_whitespace();
            let (range, perms) = (f.next().unwrap(), f.next().unwrap());
            let name = f.nth(3).unwrap_or("");
            if !perms.starts_with('r')
                || name.starts_with("[vvar")
                || name == "[vsyscall]"
                || name.ends_with("mem.bin")
            {
                continue;
            }
            let (a, b) = range.split_once('-').unwrap();
            let (mut at, end) = (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            );
            while at < end {
                let n = ((end - at) as usize).min(buf.len());
                if mem.seek(SeekFrom::Start(at)).is_err() || mem.read_exact(&mut buf[..n]).is_err()
                {
                    break;
                }
                dump.write_all(&buf[..n]).unwrap();
                at += n as u64;
            }
        }
        drop(dump);
        // Only now learn the key, and look for it in the dump.
        let hex_text = std::fs::read_to_string(&path).unwrap();
        let raw = hex::decode(hex_text.trim()).unwrap();
        let data = std::fs::read(&dump_path).unwrap();
        let raw_hits = data.windows(32).filter(|w| *w == &raw[..]).count();
        let hex_hits = data
            .windows(64)
            .filter(|w| *w == hex_text.trim().as_bytes())
            .count();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            (raw_hits, hex_hits),
            (0, 0),
            "copies of the master key left in memory (raw, hex)"
        );
    }
}
