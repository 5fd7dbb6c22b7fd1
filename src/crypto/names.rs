//! Name rules for keys and secrets. A name is checked before it reaches a
//! query, a log line or an audit row, so a rule violation is reported by
//! length only, never by echoing the name.

/// Longest key name (PostgreSQL's NAMEDATALEN - 1).
pub const KEY_NAME_MAX: usize = 63;
/// Longest secret name.
pub const SECRET_NAME_MAX: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Key,
    Secret,
}

impl NameKind {
    pub fn noun(self) -> &'static str {
        match self {
            NameKind::Key => "key",
            NameKind::Secret => "secret",
        }
    }

    /// The rule, as shown to users in a hint.
    pub fn rule(self) -> &'static str {
        match self {
            NameKind::Key => "Key names are 1 to 63 characters: letters, digits, and _ . : -",
            NameKind::Secret => {
                "Secret names are 1 to 255 characters: letters, digits, and _ . : - /"
            }
        }
    }

    fn max(self) -> usize {
        match self {
            NameKind::Key => KEY_NAME_MAX,
            NameKind::Secret => SECRET_NAME_MAX,
        }
    }

    fn allowed(self, c: u8) -> bool {
        c.is_ascii_alphanumeric()
            || matches!(c, b'_' | b'.' | b':' | b'-')
            || (self == NameKind::Secret && c == b'/')
    }
}

/// A name that breaks its rule: only its kind and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameError {
    pub kind: NameKind,
    pub len: usize,
}

/// `name` as a `str` when it follows the rule of `kind`.
pub fn validate(kind: NameKind, name: &[u8]) -> Result<&str, NameError> {
    let ok = !name.is_empty() && name.len() <= kind.max() && name.iter().all(|&c| kind.allowed(c));
    if !ok {
        return Err(NameError {
            kind,
            len: name.len(),
        });
    }
    Ok(std::str::from_utf8(name).expect("ASCII"))
}

pub fn key_name(name: &[u8]) -> Result<&str, NameError> {
    validate(NameKind::Key, name)
}

pub fn secret_name(name: &[u8]) -> Result<&str, NameError> {
    validate(NameKind::Secret, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_and_secret_rules() {
        assert_eq!(key_name(b"tenant-1:pii.v_2"), Ok("tenant-1:pii.v_2"));
        assert_eq!(key_name(&[b'a'; 63]).map(str::len), Ok(63));
        for bad in [
            &b""[..],
            &[b'a'; 64],
            b"a/b",
            b"a b",
            b"caf\xc3\xa9",
            b"a'b",
        ] {
            assert_eq!(key_name(bad).unwrap_err().len, bad.len());
        }
        assert_eq!(secret_name(b"app/db:password"), Ok("app/db:password"));
        assert_eq!(secret_name(&[b's'; 255]).map(str::len), Ok(255));
        assert!(secret_name(&[b's'; 256]).is_err());
        assert!(secret_name(b"a\\b").is_err());
    }
}
