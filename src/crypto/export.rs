//! The keyring export document (`kms_keyring_export` /
//! `kms_keyring_import`), pure Rust: what it holds and the canonical
//! encoding its MAC covers.
//!
//! The document carries wrapped material only (each data key and
//! blind-index root exactly as `kms.key_versions.wrapped_key` /
//! `kms.keys.index_key` store it, wrapped under the KEK, bound to key id and
//! version), never a plaintext key. Its MAC is
//! `HMAC-SHA256(K_export, canonical(document))` with
//! `K_export = HKDF-SHA256(salt "pg_kms", master key, info "pg_kms v1 keyring export")`
//! ([`super::integrity::INFO_EXPORT`]): only a holder of the master key can
//! make a document another cluster accepts, and any edit is refused.
//!
//! Canonical encoding ([`super::integrity::Canon`]: typed, length-prefixed
//! fields): label `pg_kms v1 keyring export`, fingerprint, source, head id,
//! number of keys, then per key (in the document's order) key id, name,
//! primary version, destroyed (0/1), index root (or NULL), number of
//! versions, then per version its number, state and wrapped key (or NULL).
//! Pinned by a known-answer test below.

use super::integrity::Canon;

/// The `format` field of a document.
pub const FORMAT: &str = "pg_kms keyring export v1";
const LABEL_EXPORT: &str = "pg_kms v1 keyring export";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedVersion {
    pub version: i32,
    pub state: String,
    /// nonce || wrapped key || tag, as stored; None once destroyed.
    pub wrapped: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedKey {
    pub key_id: i32,
    pub name: String,
    pub primary: i32,
    pub destroyed: bool,
    /// The wrapped blind-index root; None once destroyed.
    pub index_key: Option<Vec<u8>>,
    pub versions: Vec<ExportedVersion>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The master key's fingerprint (as stored in `kms.keyring`).
    pub fingerprint: Vec<u8>,
    /// Where it was made: `<system identifier>/<database>`.
    pub source: String,
    /// The id of the source's audit row recording the export: documents
    /// from one source are ordered by it (an older one is refused).
    pub head_id: i64,
    pub keys: Vec<ExportedKey>,
}

impl Export {
    /// The bytes the document's MAC covers.
    pub fn canonical(&self) -> Vec<u8> {
        let mut c = Canon::new(LABEL_EXPORT)
            .bytes(Some(&self.fingerprint))
            .bytes(Some(self.source.as_bytes()))
            .int(self.head_id)
            .int(self.keys.len() as i64);
        for k in &self.keys {
            c = c
                .int(k.key_id.into())
                .bytes(Some(k.name.as_bytes()))
                .int(k.primary.into())
                .int(k.destroyed.into())
                .bytes(k.index_key.as_deref())
                .int(k.versions.len() as i64);
            for v in &k.versions {
                c = c
                    .int(v.version.into())
                    .bytes(Some(v.state.as_bytes()))
                    .bytes(v.wrapped.as_deref());
            }
        }
        c.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::IntegrityKeys;

    fn sample() -> Export {
        Export {
            fingerprint: vec![0xAB; 32],
            source: "7300000000000000001/shop".into(),
            head_id: 42,
            keys: vec![
                ExportedKey {
                    key_id: 7,
                    name: "pii".into(),
                    primary: 2,
                    destroyed: false,
                    index_key: Some(vec![0x01; 60]),
                    versions: vec![
                        ExportedVersion {
                            version: 1,
                            state: "decrypt_only".into(),
                            wrapped: Some(vec![0x02; 60]),
                        },
                        ExportedVersion {
                            version: 2,
                            state: "active".into(),
                            wrapped: Some(vec![0x03; 60]),
                        },
                    ],
                },
                ExportedKey {
                    key_id: 9,
                    name: "gone".into(),
                    primary: 1,
                    destroyed: true,
                    index_key: None,
                    versions: vec![ExportedVersion {
                        version: 1,
                        state: "destroyed".into(),
                        wrapped: None,
                    }],
                },
            ],
        }
    }

    /// The canonical encoding and its MAC are pinned: computed
    /// independently with Python (hashlib, hmac; HKDF by hand from RFC
    /// 5869), see `KA_*` below.
    #[test]
    fn known_answers() {
        let e = sample();
        assert_eq!(
            hex::encode(Sha256Of::of(&e.canonical())),
            KA_CANON_SHA256,
            "canonical encoding"
        );
        // K = HKDF-SHA256(salt=b'pg_kms', ikm=b'\x42'*32, info=b'pg_kms v1 keyring export')
        // hmac.new(K, canon, sha256).hexdigest()
        let keys = IntegrityKeys::from_master(&[0x42; 32]);
        let mac = keys.export.hmac(&e.canonical());
        assert_eq!(hex::encode(mac), KA_MAC);
        assert!(keys.export.verify(&e.canonical(), &mac));
        // The export key is none of the other MAC keys.
        assert!(!keys.row.verify(&e.canonical(), &mac));
        assert!(!keys.audit.verify(&e.canonical(), &mac));
    }

    #[test]
    fn every_field_is_covered() {
        let base = sample().canonical();
        type Edit = Box<dyn Fn(&mut Export)>;
        let edits: Vec<Edit> = vec![
            Box::new(|e| e.fingerprint[0] ^= 1),
            Box::new(|e| e.source.push('x')),
            Box::new(|e| e.head_id += 1),
            Box::new(|e| e.keys[0].key_id += 1),
            Box::new(|e| e.keys[0].name.push('x')),
            Box::new(|e| e.keys[0].primary = 1),
            Box::new(|e| e.keys[0].destroyed = true),
            Box::new(|e| e.keys[0].index_key = None),
            Box::new(|e| e.keys[0].versions[1].state = "disabled".into()),
            Box::new(|e| e.keys[0].versions[0].wrapped.as_mut().unwrap()[5] ^= 1),
            Box::new(|e| {
                e.keys[0].versions.pop();
            }),
            Box::new(|e| e.keys.swap(0, 1)),
            Box::new(|e| {
                e.keys.pop();
            }),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut e = sample();
            edit(&mut e);
            assert_ne!(e.canonical(), base, "edit {i} is not covered");
        }
    }

    struct Sha256Of;
    impl Sha256Of {
        fn of(b: &[u8]) -> [u8; 32] {
            use sha2::{Digest, Sha256};
            Sha256::digest(b).into()
        }
    }

    const KA_CANON_SHA256: &str =
        "22edc1270a1a8951d7c97189071b1a7f5ff1f524c677afd74e3799cd5e2d1d4f";
    const KA_MAC: &str = "89ce23e0133eb805d4353d808a00a30b1ba275161d44c363adb27409a5146cf3";
}
