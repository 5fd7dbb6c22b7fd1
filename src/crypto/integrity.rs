//! Integrity of the keyring catalog and of the audit chain (pure Rust).
//!
//! Two HMAC-SHA256 keys are derived from the master key (HKDF-SHA256, salt
//! "pg_kms", as the KEK):
//!
//! * `pg_kms v1 audit chain`: each audit row's `hash` is
//!   `SHA-256(prev_hash || canonical(row))` and its `mac` is
//!   `HMAC(audit key, hash)`. The hash commits to the whole history, so the
//!   newest row's MAC authenticates every row before it, including rows
//!   MAC'd under a retired master key.
//! * `pg_kms v1 catalog row`: the MAC of each key-state row (`kms.keyring`,
//!   `kms.keys`, `kms.key_versions`) over everything that decides what the
//!   key may do, including the key's generation (the id of the audit row of
//!   its latest change), so that a saved row put back is refused.
//!
//! The canonical encoding is a sequence of typed fields: `i` + 8 bytes
//! big-endian for an integer, `b` + 4-byte big-endian length + bytes for a
//! string or byte string, `n` for NULL. Every encoding starts with a label
//! field naming what it encodes. It is pinned by known-answer tests below.

use super::derive::MacKey;
use sha2::{Digest, Sha256};

pub const INFO_AUDIT: &[u8] = b"pg_kms v1 audit chain";
pub const INFO_ROW: &[u8] = b"pg_kms v1 catalog row";
/// The MAC key of keyring export documents (see [`super::export`]).
pub const INFO_EXPORT: &[u8] = b"pg_kms v1 keyring export";

const LABEL_AUDIT_ROW: &str = "pg_kms v1 audit row";
const LABEL_KEYRING_ROW: &str = "pg_kms v1 keyring row";
const LABEL_KEY_ROW: &str = "pg_kms v1 key row";
const LABEL_VERSION_ROW: &str = "pg_kms v1 key version row";
const LABEL_DESTROYED: &str = "pg_kms v1 destroyed material";

/// Builder of a canonical encoding.
#[derive(Debug, Clone)]
pub struct Canon(Vec<u8>);

impl Canon {
    pub fn new(label: &str) -> Canon {
        Canon(Vec::with_capacity(128)).bytes(Some(label.as_bytes()))
    }

    pub fn int(mut self, v: i64) -> Canon {
        self.0.push(b'i');
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn opt_int(self, v: Option<i64>) -> Canon {
        match v {
            Some(v) => self.int(v),
            None => self.null(),
        }
    }

    pub fn bytes(mut self, v: Option<&[u8]>) -> Canon {
        match v {
            Some(b) => {
                self.0.push(b'b');
                self.0.extend_from_slice(&(b.len() as u32).to_be_bytes());
                self.0.extend_from_slice(b);
            }
            None => self.0.push(b'n'),
        }
        self
    }

    fn null(mut self) -> Canon {
        self.0.push(b'n');
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// One audit row as it is chained. Text fields are the UTF-8 bytes of the
/// stored text; `at_us` is microseconds since 1970-01-01 UTC; `key_fp` is
/// the fingerprint of the master key whose audit key MAC'd the row.
#[derive(Debug, Clone, Default)]
pub struct AuditRow<'a> {
    pub id: i64,
    pub at_us: i64,
    pub actor: &'a [u8],
    pub operation: &'a [u8],
    pub key_name: Option<&'a [u8]>,
    pub version: Option<i32>,
    pub reason: Option<&'a [u8]>,
    pub detail: Option<&'a [u8]>,
    pub key_fp: &'a [u8],
    /// `current_user` at the act (the role whose privileges it used; `actor`
    /// is `session_user`). Encoded only when present, as a last field, so
    /// rows written before the column existed keep their hashes.
    pub role: Option<&'a [u8]>,
}

impl AuditRow<'_> {
    pub fn canonical(&self) -> Vec<u8> {
        let c = Canon::new(LABEL_AUDIT_ROW)
            .int(self.id)
            .int(self.at_us)
            .bytes(Some(self.actor))
            .bytes(Some(self.operation))
            .bytes(self.key_name)
            .opt_int(self.version.map(i64::from))
            .bytes(self.reason)
            .bytes(self.detail)
            .bytes(Some(self.key_fp));
        match self.role {
            Some(role) => c.bytes(Some(role)).finish(),
            None => c.finish(),
        }
    }

    /// `SHA-256(prev_hash || canonical(row))`.
    pub fn chain_hash(&self, prev_hash: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(prev_hash);
        h.update(self.canonical());
        h.finalize().into()
    }
}

/// The keyring row: the master key's fingerprint and since when the
/// catalog is MAC'd (microseconds since the epoch).
pub fn keyring_row(fingerprint: &[u8], integrity_since_us: i64) -> Vec<u8> {
    Canon::new(LABEL_KEYRING_ROW)
        .bytes(Some(fingerprint))
        .int(integrity_since_us)
        .finish()
}

/// A `kms.keys` row: what decides which version seals, whether the key is
/// destroyed, its blind-index root, and its generation.
pub fn key_row(
    key_id: i32,
    name: &[u8],
    primary: i32,
    destroyed_at_us: Option<i64>,
    index_key: Option<&[u8]>,
    generation: i64,
) -> Vec<u8> {
    Canon::new(LABEL_KEY_ROW)
        .int(key_id.into())
        .bytes(Some(name))
        .int(primary.into())
        .opt_int(destroyed_at_us)
        .bytes(index_key)
        .int(generation)
        .finish()
}

/// A `kms.key_versions` row, bound to its key's generation.
pub fn version_row(
    key_id: i32,
    version: i32,
    state: &[u8],
    wrapped: Option<&[u8]>,
    generation: i64,
) -> Vec<u8> {
    Canon::new(LABEL_VERSION_ROW)
        .int(key_id.into())
        .int(version.into())
        .bytes(Some(state))
        .bytes(wrapped)
        .int(generation)
        .finish()
}

/// What a destruction receipt MACs: the erased wrapped material of a
/// version (version 0: the key's blind-index root).
pub fn destroyed_material(key_id: i32, version: i32, wrapped: &[u8]) -> Vec<u8> {
    Canon::new(LABEL_DESTROYED)
        .int(key_id.into())
        .int(version.into())
        .bytes(Some(wrapped))
        .finish()
}

/// The two integrity keys of one master key.
#[derive(Debug)]
pub struct IntegrityKeys {
    pub audit: MacKey,
    pub row: MacKey,
    /// MACs keyring export documents (`kms_keyring_export`).
    pub export: MacKey,
}

impl IntegrityKeys {
    pub fn from_master(master: &[u8]) -> IntegrityKeys {
        IntegrityKeys {
            audit: MacKey::derive(master, INFO_AUDIT),
            row: MacKey::derive(master, INFO_ROW),
            export: MacKey::derive(master, INFO_EXPORT),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AuditRow<'static> {
        AuditRow {
            id: 2,
            at_us: 1_700_000_000_123_456,
            actor: b"alice",
            operation: b"rotate_key",
            key_name: Some(b"pii"),
            version: Some(2),
            reason: None,
            detail: Some(b"{}"),
            key_fp: &[0xAB; 32],
            role: None,
        }
    }

    /// The canonical encoding, the chain hash and the MAC are pinned:
    /// computed independently with Python (hashlib, hmac), see below.
    #[test]
    fn known_answers() {
        let row = sample();
        assert_eq!(hex::encode(row.canonical()), KA_CANON);
        let prev = [0x11u8; 32];
        // hashlib.sha256(b'\x11'*32 + canon).hexdigest()
        let hash = row.chain_hash(&prev);
        assert_eq!(hex::encode(hash), KA_HASH);
        // HKDF-SHA256(salt=b'pg_kms', ikm=b'\x42'*32, info=b'pg_kms v1 audit chain'), then
        // hmac.new(key, hash, sha256).hexdigest()
        let keys = IntegrityKeys::from_master(&[0x42; 32]);
        assert_eq!(hex::encode(keys.audit.hmac(&hash)), KA_MAC);
        assert!(keys.audit.verify(&hash, &hex::decode(KA_MAC).unwrap()));
        assert!(
            !keys.row.verify(&hash, &hex::decode(KA_MAC).unwrap()),
            "row and audit keys differ"
        );
        // With the role (current_user) recorded: pinned the same way.
        let with_role = AuditRow {
            role: Some(b"sec_admin"),
            ..sample()
        };
        assert_eq!(hex::encode(with_role.canonical()), KA_ROLE_CANON);
        let role_hash = with_role.chain_hash(&prev);
        assert_eq!(hex::encode(role_hash), KA_ROLE_HASH);
        assert_eq!(hex::encode(keys.audit.hmac(&role_hash)), KA_ROLE_MAC);
        assert_eq!(
            hex::encode(version_row(7, 3, b"destroyed", None, 9)),
            KA_VERSION_ROW
        );
        assert_eq!(
            hex::encode(keys.row.hmac(&key_row(7, b"k", 2, None, Some(&[1, 2]), 9))),
            KA_KEY_ROW_MAC
        );
    }

    #[test]
    fn fields_are_separated() {
        // NULL, empty and absent fields all differ; adjacent strings cannot shift.
        let a = AuditRow {
            reason: None,
            ..sample()
        };
        let b = AuditRow {
            reason: Some(b""),
            ..sample()
        };
        assert_ne!(a.canonical(), b.canonical());
        let c = AuditRow {
            actor: b"ab",
            operation: b"c",
            ..sample()
        };
        let d = AuditRow {
            actor: b"a",
            operation: b"bc",
            ..sample()
        };
        assert_ne!(c.canonical(), d.canonical());
        // No role, an empty role and a role all differ; a role cannot pass
        // for a longer fingerprint.
        let e = AuditRow {
            role: Some(b""),
            ..sample()
        };
        let f = AuditRow {
            role: Some(b"x"),
            ..sample()
        };
        assert_ne!(sample().canonical(), e.canonical());
        assert_ne!(e.canonical(), f.canonical());
        assert_ne!(sample().chain_hash(&[0; 32]), f.chain_hash(&[0; 32]));
        assert_ne!(
            version_row(1, 2, b"active", Some(b"w"), 3),
            version_row(1, 2, b"active", Some(b"w"), 4)
        );
        assert_ne!(
            key_row(1, b"k", 1, None, None, 0),
            key_row(1, b"k", 1, Some(0), None, 0)
        );
        // Different labels: a key row never verifies as a version row.
        assert_ne!(
            Canon::new(LABEL_KEY_ROW).finish(),
            Canon::new(LABEL_VERSION_ROW).finish()
        );
    }

    const KA_CANON: &str = "620000001370675f6b6d7320763120617564697420726f776900000000000000026900060a24182022406200000005616c696365620000000a726f746174655f6b657962000000037069696900000000000000026e62000000027b7d6200000020abababababababababababababababababababababababababababababababab";
    const KA_HASH: &str = "e0375a5644f59b138a55b1d0ab9270765e9c5bf014e938be2a0e4fd8c23b6a9d";
    const KA_MAC: &str = "201c79a6415b90b4c67f0b3cde4dc2f695cfc5e238d5ac797a97803d4c52da9b";
    const KA_ROLE_CANON: &str = "620000001370675f6b6d7320763120617564697420726f776900000000000000026900060a24182022406200000005616c696365620000000a726f746174655f6b657962000000037069696900000000000000026e62000000027b7d6200000020abababababababababababababababababababababababababababababababab62000000097365635f61646d696e";
    const KA_ROLE_HASH: &str = "0680bfdf73ebfa747c6284f92de975e48ac8c0a8444ece9f68c434e27eb4a4e0";
    const KA_ROLE_MAC: &str = "742dec40d1a9e4618af696b70603f4375adab08c37d8ed98aaf2f96ae7245673";
    const KA_VERSION_ROW: &str = "620000001970675f6b6d73207631206b65792076657273696f6e20726f77690000000000000007690000000000000003620000000964657374726f7965646e690000000000000009";
    const KA_KEY_ROW_MAC: &str = "f99e25f8c8d3f8ef490b0880af514ad68cd884b0eac9fd25b22aa284f994c7e2";
}
