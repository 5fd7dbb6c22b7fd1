//! The access log's rows as they are chained (pure Rust).
//!
//! `kms.access_log` is a chain of its own, keyed like the lifecycle audit:
//! each row's `hash` is `SHA-256(prev_hash || canonical(row))` (the first
//! row's `prev_hash` is 32 zero bytes) and its `mac` is `HMAC(audit-chain
//! key, hash)` under the audit-chain key derived from the master key
//! ([`super::integrity::INFO_AUDIT`]). The canonical encoding is that of
//! [`super::integrity::Canon`] under its own label, so an access row never
//! verifies as an audit row. Pinned by a known-answer test below.

use super::integrity::Canon;
use sha2::{Digest, Sha256};

const LABEL_ACCESS_ROW: &str = "pg_kms v1 access row";

/// One access-log row. Times are microseconds since 1970-01-01 UTC; role
/// names are those resolved when the row was written (None: the role no
/// longer existed); `version` is None for a blind index (a key's, not a
/// version's); `key_fp` is the fingerprint of the master key whose audit
/// key MAC'd the row.
#[derive(Debug, Clone, Default)]
pub struct AccessRow<'a> {
    pub id: i64,
    pub logged_at_us: i64,
    pub session_user_oid: u32,
    pub session_user: Option<&'a [u8]>,
    pub current_user_oid: u32,
    pub current_user: Option<&'a [u8]>,
    pub key_id: i32,
    pub key_name: Option<&'a [u8]>,
    pub version: Option<i32>,
    pub operation: &'a [u8],
    pub count: i64,
    pub first_at_us: i64,
    pub last_at_us: i64,
    pub key_fp: &'a [u8],
}

impl AccessRow<'_> {
    pub fn canonical(&self) -> Vec<u8> {
        Canon::new(LABEL_ACCESS_ROW)
            .int(self.id)
            .int(self.logged_at_us)
            .int(self.session_user_oid.into())
            .bytes(self.session_user)
            .int(self.current_user_oid.into())
            .bytes(self.current_user)
            .int(self.key_id.into())
            .bytes(self.key_name)
            .opt_int(self.version.map(i64::from))
            .bytes(Some(self.operation))
            .int(self.count)
            .int(self.first_at_us)
            .int(self.last_at_us)
            .bytes(Some(self.key_fp))
            .finish()
    }

    /// `SHA-256(prev_hash || canonical(row))`.
    pub fn chain_hash(&self, prev_hash: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(prev_hash);
        h.update(self.canonical());
        h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::super::integrity::{AuditRow, IntegrityKeys};
    use super::*;

    fn sample() -> AccessRow<'static> {
        AccessRow {
            id: 3,
            logged_at_us: 1_700_000_000_123_456,
            session_user_oid: 16384,
            session_user: Some(b"alice"),
            current_user_oid: 16385,
            current_user: Some(b"app"),
            key_id: 7,
            key_name: Some(b"pii"),
            version: Some(2),
            operation: b"decrypt",
            count: 1000,
            first_at_us: 1_699_999_990_000_000,
            last_at_us: 1_699_999_999_000_000,
            key_fp: &[0xAB; 32],
        }
    }

    /// The encoding, the chain hash and the MAC are pinned: computed
    /// independently with Python (struct, hashlib, hmac; HKDF-SHA256 with
    /// salt b'pg_kms', ikm b'\x42'*32, info b'pg_kms v1 audit chain').
    #[test]
    fn known_answers() {
        let row = sample();
        assert_eq!(hex::encode(row.canonical()), KA_CANON);
        let hash = row.chain_hash(&[0x11u8; 32]);
        assert_eq!(hex::encode(hash), KA_HASH);
        let keys = IntegrityKeys::from_master(&[0x42; 32]);
        assert_eq!(hex::encode(keys.audit.hmac(&hash)), KA_MAC);
        let blind = AccessRow {
            version: None,
            operation: b"blind_index",
            session_user: None,
            ..sample()
        };
        assert_eq!(hex::encode(blind.chain_hash(&[0u8; 32])), KA_HASH_BLIND);
    }

    #[test]
    fn fields_are_separated() {
        let a = AccessRow {
            session_user: Some(b"ab"),
            current_user: Some(b"c"),
            ..sample()
        };
        let b = AccessRow {
            session_user: Some(b"a"),
            current_user: Some(b"bc"),
            ..sample()
        };
        assert_ne!(a.canonical(), b.canonical());
        let n = AccessRow {
            version: None,
            ..sample()
        };
        assert_ne!(n.canonical(), sample().canonical());
        // Never the encoding of a lifecycle audit row.
        let audit = AuditRow {
            id: 3,
            ..Default::default()
        };
        assert_ne!(audit.canonical()[..28], sample().canonical()[..28]);
    }

    const KA_CANON: &str = "620000001470675f6b6d732076312061636365737320726f776900000000000000036900060a24182022406900000000000040006200000005616c696365690000000000004001620000000361707069000000000000000762000000037069696900000000000000026200000007646563727970746900000000000003e86900060a241785a9806900060a24180efdc06200000020abababababababababababababababababababababababababababababababab";
    const KA_HASH: &str = "fcce2cb84b9b68d1fbf928a7e6d481d81b05d66adb561abe2f5b603e265333b1";
    const KA_MAC: &str = "0bbc5564a469cd0a11fc26b8bc84df1ec6cdd0549f989a03cf67f0b4b60fd78c";
    const KA_HASH_BLIND: &str = "1f62ceb2e9d705e681f9deb2e7933315380eff40b907686f5fad8c1fe45eb0a3";
}
