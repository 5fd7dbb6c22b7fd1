//! Keyed derivation for searchable encryption (HMAC-SHA256, HKDF-SHA256):
//! the blind index, `HMAC(index key, u64be(len ctx) || ctx || plaintext)`
//! truncated to `bits`. The index key belongs to the key *name* (derived
//! from a per-key random root, independent of data-key versions). Context
//! and plaintext are the UTF-8 bytes, whatever the database encoding.
//! (Deterministic encryption is AES-SIV, see [`super::siv`].)

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use zeroize::Zeroizing;

pub const INFO_BLIND_INDEX: &[u8] = b"pg_kms v1 blind index";

/// A 32-byte HMAC key, wiped on drop.
pub struct MacKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for MacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MacKey(..)")
    }
}

impl MacKey {
    /// HKDF-SHA256(salt "pg_kms", ikm, info) as an HMAC key.
    pub fn derive(ikm: &[u8], info: &[u8]) -> MacKey {
        MacKey(super::kdf::hkdf32(super::kdf::HKDF_SALT, ikm, info))
    }

    fn mac(&self, context: &[u8], plaintext: &[u8]) -> [u8; 32] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_ref()).expect("any key length");
        m.update(&(context.len() as u64).to_be_bytes());
        m.update(context);
        m.update(plaintext);
        m.finalize().into_bytes().into()
    }

    /// HMAC-SHA256 of `msg` (the catalog-row and audit-chain MACs).
    pub fn hmac(&self, msg: &[u8]) -> [u8; 32] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_ref()).expect("any key length");
        m.update(msg);
        m.finalize().into_bytes().into()
    }

    /// Whether `tag` is the HMAC of `msg` (constant-time comparison).
    pub fn verify(&self, msg: &[u8], tag: &[u8]) -> bool {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_ref()).expect("any key length");
        m.update(msg);
        m.verify_slice(tag).is_ok()
    }

    /// Blind index of `bits` bits (a multiple of 8, 16..=256).
    pub fn blind_index(&self, context: &[u8], plaintext: &[u8], bits: u32) -> Option<Vec<u8>> {
        if !(16..=256).contains(&bits) || !bits.is_multiple_of(8) {
            return None;
        }
        Some(self.mac(context, plaintext)[..(bits / 8) as usize].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers pinned in the repository (computed independently with
    /// Python's hmac/hashlib: see the comment on each).
    #[test]
    fn known_answers() {
        let k = MacKey(Zeroizing::new([0x0b; 32]));
        // hmac.new(b'\x0b'*32, (0).to_bytes(8,'big') + b'abc', sha256).hexdigest()
        assert_eq!(
            hex::encode(k.blind_index(b"", b"abc", 256).unwrap()),
            KA_EMPTY_CTX
        );
        // hmac.new(b'\x0b'*32, (3).to_bytes(8,'big') + b'ctx' + b'abc', sha256).hexdigest()
        assert_eq!(
            hex::encode(k.blind_index(b"ctx", b"abc", 256).unwrap()),
            KA_CTX
        );
        assert_eq!(
            hex::encode(k.blind_index(b"ctx", b"abc", 16).unwrap()),
            &KA_CTX[..4]
        );
        // HKDF-SHA256(salt=b'pg_kms', ikm=b'\x01'*32, info=b'pg_kms v1 blind index', L=32)
        let d = MacKey::derive(&[1u8; 32], INFO_BLIND_INDEX);
        assert_eq!(hex::encode(d.0.as_ref()), KA_HKDF_INDEX);
    }

    #[test]
    fn bits_are_checked_and_inputs_separated() {
        let k = MacKey(Zeroizing::new([7; 32]));
        for bad in [0, 8, 12, 264, 257] {
            assert!(k.blind_index(b"", b"x", bad).is_none(), "{bad}");
        }
        // length-prefixed context: ("a", "bc") and ("ab", "c") differ
        assert_ne!(
            k.blind_index(b"a", b"bc", 256),
            k.blind_index(b"ab", b"c", 256)
        );
        assert_ne!(k.blind_index(b"", b"x", 256), k.blind_index(b"", b"y", 256));
        assert_eq!(k.blind_index(b"", b"x", 256), k.blind_index(b"", b"x", 256));
    }

    const KA_EMPTY_CTX: &str = "d06a5d9ac65b5f686a379be91ff227b843f9164050d6c012b74bb5a33449019a";
    const KA_CTX: &str = "be8587c9c661e7e1dda67857417ef0411b12a405f19cb5f1696d4949746e435a";
    const KA_HKDF_INDEX: &str = "4b20baae471cdd5ffebbaec45e801e0b89fcf380527cd719c90f4256f21b0ae3";
}
