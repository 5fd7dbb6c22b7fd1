//! HKDF-SHA256 derivations from the master key, and data-key wrapping.
//!
//! ```text
//! master key (32 bytes, outside the database)
//!   ├─ HKDF(info = "pg_kms v1 master-key fingerprint") → fingerprint, stored in kms.keyring
//!   └─ HKDF(info = "pg_kms v1 key-encryption key")     → KEK
//!        └─ AES-256-GCM(KEK, random nonce, aad = label || key id || version) wraps each data key
//! ```

use super::secure::Locked;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;
use std::fmt;
use zeroize::Zeroizing;

pub const HKDF_SALT: &[u8] = b"pg_kms";
pub const INFO_FINGERPRINT: &[u8] = b"pg_kms v1 master-key fingerprint";
pub const INFO_KEK: &[u8] = b"pg_kms v1 key-encryption key";
const WRAP_AAD_LABEL: &[u8] = b"pg_kms v1 data key";
const INDEX_AAD_LABEL: &[u8] = b"pg_kms v1 idx root";
/// nonce (12) || wrapped key (32) || tag (16)
pub const WRAPPED_LEN: usize = 12 + 32 + 16;

/// HKDF-SHA256 expand of `ikm` to 32 bytes.
pub fn hkdf32(salt: &[u8], ikm: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand(info, out.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 length");
    out
}

/// The key-encryption key derived from the master key. Its AES key
/// schedule (which starts with the raw KEK) lives in a locked,
/// non-dumpable region, zeroized on drop (see [`super::secure`]).
pub struct Kek {
    cipher: Locked<Aes256Gcm>,
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(..)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrapError {
    /// Wrong length of stored material.
    Malformed,
    /// The KEK does not open it (wrong master key or tampered catalog row).
    Auth,
}

impl fmt::Display for WrapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WrapError::Malformed => f.write_str("wrapped data key has the wrong length"),
            WrapError::Auth => {
                f.write_str("wrapped data key does not authenticate under this master key")
            }
        }
    }
}

fn wrap_aad(key_id: u32, version: u32) -> [u8; 26] {
    labeled_aad(WRAP_AAD_LABEL, key_id, version)
}

/// `label (18 bytes) || key id || version`, all big endian.
fn labeled_aad(label: &[u8], key_id: u32, version: u32) -> [u8; 26] {
    let mut aad = [0u8; 26];
    aad[..18].copy_from_slice(label);
    aad[18..22].copy_from_slice(&key_id.to_be_bytes());
    aad[22..26].copy_from_slice(&version.to_be_bytes());
    aad
}

impl Kek {
    pub fn from_bytes(k: &Zeroizing<[u8; 32]>) -> Kek {
        // The schedule is built on the stack and moved in once; callers
        // that must leave no copy behind wipe the stack afterwards.
        Kek {
            cipher: Locked::new(Aes256Gcm::new(k.as_ref().into())),
        }
    }

    /// Wraps a data key, binding it to its key id and version.
    pub fn wrap(
        &self,
        key_id: u32,
        version: u32,
        data_key: &Zeroizing<[u8; 32]>,
        nonce: &[u8; 12],
    ) -> Vec<u8> {
        self.wrap_with(&wrap_aad(key_id, version), data_key, nonce)
    }

    /// Wraps a key's blind-index root (one per key name, no version).
    pub fn wrap_index_root(
        &self,
        key_id: u32,
        root: &Zeroizing<[u8; 32]>,
        nonce: &[u8; 12],
    ) -> Vec<u8> {
        self.wrap_with(&labeled_aad(INDEX_AAD_LABEL, key_id, 0), root, nonce)
    }

    pub fn unwrap_index_root(
        &self,
        key_id: u32,
        wrapped: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, WrapError> {
        self.unwrap_with(&labeled_aad(INDEX_AAD_LABEL, key_id, 0), wrapped)
    }

    fn wrap_with(&self, aad: &[u8], data_key: &Zeroizing<[u8; 32]>, nonce: &[u8; 12]) -> Vec<u8> {
        let mut out = vec![0u8; WRAPPED_LEN];
        out[..12].copy_from_slice(nonce);
        out[12..44].copy_from_slice(data_key.as_ref());
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, &mut out[12..44])
            .expect("32-byte payload");
        out[44..].copy_from_slice(&tag);
        out
    }

    pub fn unwrap_raw(
        &self,
        key_id: u32,
        version: u32,
        wrapped: &[u8],
    ) -> Result<Zeroizing<[u8; 32]>, WrapError> {
        self.unwrap_with(&wrap_aad(key_id, version), wrapped)
    }

    fn unwrap_with(&self, aad: &[u8], wrapped: &[u8]) -> Result<Zeroizing<[u8; 32]>, WrapError> {
        if wrapped.len() != WRAPPED_LEN {
            return Err(WrapError::Malformed);
        }
        let mut dk = Zeroizing::new([0u8; 32]);
        dk.copy_from_slice(&wrapped[12..44]);
        self.cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(&wrapped[..12]),
                aad,
                dk.as_mut(),
                Tag::from_slice(&wrapped[44..]),
            )
            .map_err(|_| WrapError::Auth)?;
        Ok(dk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// RFC 5869 appendix A, test cases 1 and 3 (SHA-256).
    #[test]
    fn rfc5869_vectors() {
        let ikm = h("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b");
        let salt = h("000102030405060708090a0b0c");
        let info = h("f0f1f2f3f4f5f6f7f8f9");
        let (prk, hk) = Hkdf::<Sha256>::extract(Some(&salt), &ikm);
        assert_eq!(
            hex::encode(prk),
            "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
        );
        let mut okm = [0u8; 42];
        hk.expand(&info, &mut okm).unwrap();
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );

        let (prk, hk) = Hkdf::<Sha256>::extract(None, &ikm);
        assert_eq!(
            hex::encode(prk),
            "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04"
        );
        let mut okm = [0u8; 42];
        hk.expand(&[], &mut okm).unwrap();
        assert_eq!(
            hex::encode(okm),
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
        );
    }

    #[test]
    fn derivations_are_separated_and_stable() {
        let mk = [0x42u8; 32];
        let fp = hkdf32(HKDF_SALT, &mk, INFO_FINGERPRINT);
        let kek = hkdf32(HKDF_SALT, &mk, INFO_KEK);
        assert_ne!(fp.as_ref(), kek.as_ref());
        assert_ne!(fp.as_ref(), &mk);
        assert_eq!(
            hkdf32(HKDF_SALT, &mk, INFO_FINGERPRINT).as_ref(),
            fp.as_ref()
        );
    }

    #[test]
    fn wrap_round_trip_and_binding() {
        let kek = Kek::from_bytes(&Zeroizing::new([1u8; 32]));
        let dk = Zeroizing::new([9u8; 32]);
        let w = kek.wrap(5, 2, &dk, &[3; 12]);
        assert_eq!(w.len(), WRAPPED_LEN);
        assert!(
            !w.windows(32).any(|win| win == dk.as_ref()),
            "data key must not appear in clear"
        );
        assert_eq!(kek.unwrap_raw(5, 2, &w).unwrap().as_ref(), dk.as_ref());
        assert_eq!(kek.unwrap_raw(5, 3, &w).unwrap_err(), WrapError::Auth);
        assert_eq!(kek.unwrap_raw(6, 2, &w).unwrap_err(), WrapError::Auth);
        assert_eq!(
            kek.unwrap_raw(5, 2, &w[1..]).unwrap_err(),
            WrapError::Malformed
        );
        let other = Kek::from_bytes(&Zeroizing::new([2u8; 32]));
        assert_eq!(other.unwrap_raw(5, 2, &w).unwrap_err(), WrapError::Auth);
        // An index root cannot pass for a data key, nor the reverse.
        let r = kek.wrap_index_root(5, &dk, &[4; 12]);
        assert_eq!(kek.unwrap_index_root(5, &r).unwrap().as_ref(), dk.as_ref());
        assert_eq!(kek.unwrap_raw(5, 0, &r).unwrap_err(), WrapError::Auth);
        assert_eq!(kek.unwrap_index_root(5, &w).unwrap_err(), WrapError::Auth);
    }
}
